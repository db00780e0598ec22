# gamemode: corral speaks GameMode's D-Bus API on alice's session bus.
# With Debian's gamemode installed and gamemoded masked, corral owns
# com.feralinteractive.GameMode: `gamemoderun GAME` registers through the
# real libgamemode (pidfd methods) and GAME lands in game; `gamemoded -s`
# (QueryStatus) answers active while it runs and inactive after. With
# gamemoded unmasked, corral leaves it the name (gamemoded exits when the
# name is taken: sd-bus never queues), and once it runs, corral follows its
# GameRegistered/GameUnregistered signals and still places the game.
GM_RUN=/usr/games/gamemoderun

GM_NAME=com.feralinteractive.GameMode
GM_PATH=/com/feralinteractive/GameMode
# A dynamic binary no policy rule knows (libgamemodeauto needs LD_PRELOAD
# to work, which a static launcher ignores): only GameMode makes it a game.
GM_GAME=$FAKEAPPS_PATH/indiegame
GM_UM=/user.slice/user-$ALICE_UID.slice/user@$ALICE_UID.service

# gm_in_game PID: PID sits in a scope of alice's corral-game.slice.
gm_in_game() { [[ $(cgroup_of "$1") == "$GM_UM/corral.slice/corral-game.slice/"*.scope ]]; }

# gm_owner_pid: the pid owning GameMode's name on alice's bus (empty: none).
gm_owner_pid() {
    as_alice busctl --user call org.freedesktop.DBus /org/freedesktop/DBus \
        org.freedesktop.DBus GetConnectionUnixProcessID s "$GM_NAME" 2>/dev/null |
        awk '{print $2}'
}

# gm_owner_is PID: PID owns GameMode's name (polled by wait_for).
gm_owner_is() { [[ -n $1 && $(gm_owner_pid) == "$1" ]]; }

# gm_client_count: GameMode's ClientCount property.
gm_client_count() {
    as_alice busctl --user get-property "$GM_NAME" "$GM_PATH" "$GM_NAME" ClientCount 2>&1 |
        awk '{print $2}'
}

gm_count_is() { [[ $(gm_client_count) == "$1" ]]; }

# gm_launch UNIT: starts `gamemoderun GAME 600` from the desktop shell in
# app.slice/UNIT and prints the game's pid once it has exec'd the game
# (gamemoderun execs env, which execs the game: one pid throughout).
gm_launch() {
    local unit=$1 pidfile=$SHELL_PIDS/$1 pid
    rm -f "$pidfile"
    printf '%s %s\n' "$unit" "$GM_RUN $GM_GAME 600" > "$SHELL_FIFO"
    wait_for 30 test -s "$pidfile" || return 1
    pid=$(cat "$pidfile")
    wait_for 30 _execd "$pid" indiegame || return 1
    echo "$pid"
}

# gm_status_has TEXT: `corral status` has a line with TEXT.
gm_status_has() { corral status 2>/dev/null | grep -qF -- "$1"; }

# gm_latency_us CURSOR: the last register-to-placement latency corral logged.
# (-a and the sed: tracing colours its fields, which journalctl would
# otherwise show as a blob.)
gm_latency_us() {
    journal_since "$1" -u corral.service -q -a | sed 's/\x1b\[[0-9;]*m//g' |
        sed -n 's/.*GameMode: registered and placed.*latency_us=\([0-9]*\).*/\1/p;
                s/.*latency_us=\([0-9]*\).*GameMode: registered and placed.*/\1/p' | tail -n 1
}

scenario_gamemode() {
    check "gamemode: corral.service is running" corral_ensure_started
    check "gamemode: alice's manager is up" wait_user_manager 120
    check "gamemode: Debian's gamemode is installed (gamemoderun, gamemoded)" \
        test -x "$GM_RUN" -a -x /usr/bin/gamemoded
    install -m 755 /bin/sleep "$GM_GAME"
    user_systemctl mask gamemoded.service > /dev/null 2>&1
    user_systemctl stop gamemoded.service > /dev/null 2>&1
    check "gamemode: alice's gamemoded is masked" \
        test "$(user_systemctl is-enabled gamemoded.service 2>&1)" = masked
    check "gamemode: stand-in shell runs" desktop_shell_start
    local since corral_pid
    since=$(journal_cursor)
    corral_pid=$(systemctl show -P MainPID corral.service)

    # --- corral provides GameMode --------------------------------------
    check "gamemode: corral owns $GM_NAME on alice's bus" \
        wait_for 30 gm_owner_is "$corral_pid"
    check "gamemode: corral status says corral provides GameMode on uid $ALICE_UID's bus" \
        wait_for 10 gm_status_has "GameMode: provided by corral on uid $ALICE_UID's bus"
    local idle
    idle=$(as_alice gamemoded -s 2>&1)
    check_match "gamemode: gamemoded -s before a game: inactive" "*gamemode is inactive*" "$idle"

    local game
    timer_start gamemode_launch_to_game_slice
    game=$(gm_launch app-indiegame-5001.scope)
    check "gamemode: gamemoderun indiegame started" test -n "$game"
    check "gamemode: the registered game lands in alice's corral-game.slice" \
        wait_for 30 gm_in_game "$game"
    timer_stop gamemode_launch_to_game_slice
    check_eq "gamemode: corral explain says class game" game "$(class_of "$game")"
    check_match "gamemode: corral explain says it was registered through GameMode" \
        "*registered through GameMode by pid $game*" "$(corral explain "$game" 2>&1)"
    local query query_pid count
    query=$(as_alice gamemoded -s 2>&1)
    query_pid=$(as_alice gamemoded -s"$game" 2>&1)
    count=$(gm_client_count)
    check_match "gamemode: gamemoded -s (QueryStatus) while it runs: active (1)" \
        "*gamemode is active*" "$query"
    check_match "gamemode: gamemoded -s PID (QueryStatusByPID) for the game: registered (2)" \
        "*gamemode is active and \[$game\] registered*" "$query_pid"
    check_eq "gamemode: ClientCount is 1" 1 "$count"
    diag "QueryStatus answers: gamemoded -s: $query; gamemoded -s$game: $query_pid; ClientCount $count"
    local latency
    latency=$(gm_latency_us "$since")
    check "gamemode: corral logged the RegisterGame-to-placement latency" test -n "$latency"
    diag "RegisterGame -> placed (corral's loop, from the D-Bus call): ${latency:-?} us"
    [[ -n $latency ]] && record_ms gamemode_register_to_placed_ms $((latency / 1000))
    artifact gamemode-explain.txt corral explain "$game"
    artifact gamemode-status.txt corral status

    # The game exits (killed: libgamemode's destructor never runs): the
    # registration ends with it.
    kill "$game"
    check "gamemode: the game is gone" wait_for 10 gone "$game"
    check "gamemode: its exit ends the registration (ClientCount 0)" \
        wait_for 10 gm_count_is 0
    check_match "gamemode: gamemoded -s after the game: inactive" \
        "*gamemode is inactive*" "$(as_alice gamemoded -s 2>&1)"

    # --- gamemoded runs: corral follows it -----------------------------
    user_systemctl unmask gamemoded.service > /dev/null 2>&1
    check "gamemode: once gamemoded is unmasked corral leaves it the name" \
        wait_for 10 gm_status_has "GameMode: following gamemoded on uid $ALICE_UID's bus"
    check_eq "gamemode: nobody holds the name before gamemoded starts" "" "$(gm_owner_pid)"
    check "gamemode: alice's gamemoded starts" \
        timeout 60 runuser -u "$ALICE" -- env XDG_RUNTIME_DIR="$ALICE_RUNTIME" \
        DBUS_SESSION_BUS_ADDRESS="unix:path=$ALICE_RUNTIME/bus" \
        systemctl --user start gamemoded.service
    local gamemoded_pid
    gamemoded_pid=$(user_systemctl show -P MainPID gamemoded.service)
    check "gamemode: gamemoded owns $GM_NAME, not corral" \
        wait_for 10 gm_owner_is "$gamemoded_pid"
    check "gamemode: corral status says it follows gamemoded on uid $ALICE_UID's bus" \
        wait_for 10 gm_status_has "GameMode: following gamemoded on uid $ALICE_UID's bus"
    local followed
    followed=$(gm_launch app-indiegame-5002.scope)
    check "gamemode: gamemoderun indiegame started under gamemoded" test -n "$followed"
    check "gamemode: the game gamemoded registered lands in corral-game.slice" \
        wait_for 30 gm_in_game "$followed"
    check_match "gamemode: explain says corral followed gamemoded's signal" \
        "*gamemoded's signal*" "$(corral explain "$followed" 2>&1)"
    check_match "gamemode: gamemoded itself answers QueryStatus: active" \
        "*gamemode is active*" "$(as_alice gamemoded -s 2>&1)"
    check "gamemode: corral still does not hold the name" \
        gm_owner_is "$gamemoded_pid"
    artifact gamemode-status-following.txt corral status
    artifact gamemoded-journal.txt journalctl --no-pager -q -a _SYSTEMD_USER_UNIT=gamemoded.service
    kill "$followed" 2>/dev/null

    # Leave the machine as found: gamemoded stopped and masked again, so
    # corral provides the name.
    user_systemctl mask gamemoded.service > /dev/null 2>&1
    user_systemctl stop gamemoded.service > /dev/null 2>&1
    check "gamemode: corral takes the name back once gamemoded stops" \
        wait_for 30 gm_owner_is "$corral_pid"
    journal_since "$since" -u corral.service > "$ARTIFACTS/journal-gamemode.txt"
}
