# desktop: alice's desktop starts three apps the way GNOME/KDE do (each in
# its own app-*.scope under app.slice, from a shell service in
# session.slice): a Steam game (steam -> reaper SteamLaunch -> game.x86_64),
# an editor with a language server (nvim -> rust-analyzer) and a batch
# render (blender -b). Records where corral puts each process and what
# systemd makes of it: each placed process stays in alice's manager
# (STYLE.md 17), in a scope that keeps its app's id (app-steam-corralPID,
# app-nvim-corralPID), and closing the app or logging out ends it. The
# app's first scope is left to systemd: steam's lives on with steam in it,
# nvim's and blender's are collected once their only process has moved.

GAME_SCOPE=app-steam-1001.scope
DEV_SCOPE=app-nvim-1002.scope
RENDER_SCOPE=app-blender-1003.scope
USER_MANAGER_CGROUP=/user.slice/user-$ALICE_UID.slice/user@$ALICE_UID.service

# record_placement LABEL PID: where PID is, for the artifacts and the TAP
# comments: cgroup, CPUs, the unit alice's manager gives it, corral's view.
record_placement() {
    local label=$1 pid=$2
    {
        echo "== $label"
        describe_pid "$pid"
        echo "systemctl --user status: $(user_status_line "$pid")"
        corral explain "$pid" 2>&1
        echo
    } >> "$ARTIFACTS/desktop-placement.txt"
    diag "$label: $(describe_pid "$pid"); systemctl --user status: $(user_status_line "$pid")"
}

scenario_desktop() {
    check "desktop: corral.service is running" corral_ensure_started
    check "desktop: alice's manager (user@$ALICE_UID.service) is up" wait_user_manager 120
    check "desktop: stand-in shell runs in alice's session.slice" desktop_shell_start
    debug_logging on
    local since
    since=$(journal_cursor)

    # --- launch ---------------------------------------------------------
    local steam reaper game nvim analyzer blender
    timer_start desktop_launch_game
    steam=$(launch_app "$GAME_SCOPE" "$STEAM_ROOT/ubuntu12_32/steam" \
        "$STEAM_ROOT/ubuntu12_32/reaper" SteamLaunch AppId=570 -- \
        "$STEAM_ROOT/steamapps/common/FakeGame/game.x86_64")
    reaper=$(child_of "$steam")
    game=$(child_of "$reaper")
    check "desktop: steam -> reaper -> game.x86_64 started in $GAME_SCOPE" \
        test -n "$game" -a "$(comm_of "$game")" = game.x86_64
    check "desktop: corral classifies game.x86_64 as game" wait_class "$game" game 60
    timer_stop desktop_launch_game

    timer_start desktop_launch_dev
    nvim=$(launch_app "$DEV_SCOPE" nvim src/main.rs rust-analyzer)
    analyzer=$(child_of "$nvim")
    check "desktop: nvim -> rust-analyzer started in $DEV_SCOPE" \
        test -n "$analyzer" -a "$(comm_of "$analyzer")" = rust-analyzer
    check "desktop: corral classifies rust-analyzer as dev" wait_class "$analyzer" dev 60
    timer_stop desktop_launch_dev

    timer_start desktop_launch_render
    blender=$(launch_app "$RENDER_SCOPE" "$FAKEAPPS/blender/blender" -b scene.blend -a)
    check "desktop: blender -b started in $RENDER_SCOPE" test -n "$blender"
    check "desktop: corral classifies blender as render" wait_class "$blender" render 60
    timer_stop desktop_launch_render
    check_eq "desktop: steam itself stays system" system "$(class_of "$steam")"

    # Placement is immediate; give systemd time to collect emptied scopes.
    sleep 5
    : > "$ARTIFACTS/desktop-placement.txt"
    local label pid
    for label in steam:$steam reaper:$reaper game.x86_64:$game nvim:$nvim \
                 rust-analyzer:$analyzer blender:$blender; do
        record_placement "${label%%:*}" "${label#*:}"
    done
    artifact desktop-cgls.txt systemd-cgls --no-pager
    artifact desktop-loginctl.txt loginctl user-status "$ALICE" --no-pager
    artifact desktop-user-units.txt user_systemctl list-units --no-pager --all 'app-*'

    # --- what the systemd backend must do --------------------------------
    for label in reaper:$reaper game.x86_64:$game nvim:$nvim \
                 rust-analyzer:$analyzer blender:$blender; do
        pid=${label#*:}
        check_match "desktop: ${label%%:*} stays under $USER_MANAGER_CGROUP" \
            "$USER_MANAGER_CGROUP/*" "$(cgroup_of "$pid")"
        check_match "desktop: systemctl --user status of ${label%%:*} names its scope" \
            "*.scope*" "$(user_status_line "$pid")"
    done
    check "desktop: $GAME_SCOPE survives placement (steam is still in it)" scope_active "$GAME_SCOPE"
    check_match "desktop: nvim's new scope keeps its app id" \
        "*/app-nvim-corral$nvim.scope" "$(cgroup_of "$nvim")"
    check_match "desktop: blender's new scope keeps its app id" \
        "*/app-blender-corral$blender.scope" "$(cgroup_of "$blender")"

    # PID 1 re-applies its cgroup settings on daemon-reload; cgroups made
    # beside its own show up as controller conflicts (logged at debug).
    local before_reload
    before_reload=$(journal_cursor)
    systemctl daemon-reload
    sleep 2
    check_absent "desktop: daemon-reload logs no cgroup controller conflict" \
        'Failed to (disable|enable) controller|controller.*busy' \
        "$(journal_since "$before_reload" -q _PID=1)"

    # Closing the app: stopping the unit the game is in ends it (and the
    # reaper with it).
    local game_unit
    game_unit=$(basename "$(cgroup_of "$game")")
    user_systemctl stop "$game_unit" 2>/dev/null
    check "desktop: stopping the game's unit $game_unit ends game.x86_64" \
        wait_for 10 gone "$game"
    # Logging out: stopping alice's manager ends her apps.
    systemctl stop "user@$ALICE_UID.service"
    wait_for 10 all_gone "$nvim" "$analyzer" "$blender"
    for label in nvim:$nvim rust-analyzer:$analyzer blender:$blender; do
        check "desktop: logging out (stop user@$ALICE_UID) ends ${label%%:*}" gone "${label#*:}"
    done

    debug_logging off
    journal_since "$since" > "$ARTIFACTS/journal-desktop.txt"
    # Leave the machine as found: no leftovers, alice's manager back.
    for pid in "$game" "$reaper" "$steam" "$analyzer" "$nvim" "$blender"; do
        [[ -n $pid ]] && kill -9 "$pid" 2>/dev/null
    done
    systemctl start "user@$ALICE_UID.service"
}
