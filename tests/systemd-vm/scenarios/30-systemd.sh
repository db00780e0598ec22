# systemd: what the systemd placement backend promises beyond the desktop
# scenario: the class's CPUs come from its slice, explain names the unit, a
# delegated (container-shaped) scope keeps its processes and gets the class
# as properties, dynamic modes reach placed processes through the slices,
# reloads and set-property on user.slice move nothing, kill -9 of the agent
# leaves units intact and properties restored, and logout ends everything.

UM=/user.slice/user-$ALICE_UID.slice/user@$ALICE_UID.service

# class_cpus CLASS: the class's CPUs now, from `corral status --json`.
class_cpus() {
    corral status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(next((c.get("cpus") or "") for c in s["classes"] if c["class"] == sys.argv[1]))' "$1"
}

# in_class_slice PID CLASS: PID sits in a scope of CLASS's slice in alice's manager.
in_class_slice() {
    [[ $(cgroup_of "$1") == "$UM/corral.slice/corral-$2.slice/"*.scope ]]
}

# fenced PID CLASS: PID's Cpus_allowed_list is its class's CPUs.
fenced() { [[ $(cpus_allowed "$1") == "$(class_cpus "$2")" ]]; }

user_prop() { user_systemctl show -P "$2" "$1" 2>/dev/null; }

scenario_systemd() {
    check "systemd: corral.service is running" corral_ensure_started
    check "systemd: alice's manager is up" wait_user_manager 120
    check "systemd: stand-in shell runs" desktop_shell_start
    check_match "systemd: corral status names the systemd backend" \
        "*backend systemd*" "$(corral status 2>&1)"
    # Quick mode switches for this scenario: hot-reloaded override.
    mkdir -p /etc/corral
    printf '[modes]\nhold_down_ms = 3000\nmin_dwell_ms = 0\n' > /etc/corral/policy.toml
    chmod 644 /etc/corral/policy.toml
    corral reload > /dev/null 2>&1
    local since
    since=$(journal_cursor)
    debug_logging on

    local steam reaper game nvim analyzer blender
    steam=$(launch_app app-steam-2001.scope "$STEAM_ROOT/ubuntu12_32/steam" \
        "$STEAM_ROOT/ubuntu12_32/reaper" SteamLaunch AppId=570 -- \
        "$STEAM_ROOT/steamapps/common/FakeGame/game.x86_64")
    reaper=$(child_of "$steam")
    game=$(child_of "$reaper")
    nvim=$(launch_app app-nvim-2002.scope nvim src/main.rs rust-analyzer)
    analyzer=$(child_of "$nvim")
    blender=$(launch_app app-blender-2003.scope "$FAKEAPPS/blender/blender" -b scene.blend -a)

    local label pid class
    for label in game:$reaper game:$game dev:$nvim dev:$analyzer render:$blender; do
        class=${label%%:*} pid=${label#*:}
        check "systemd: $(comm_of "$pid") lands in a scope of alice's corral-$class.slice" \
            wait_for 60 in_class_slice "$pid" "$class"
        check "systemd: $(comm_of "$pid")'s Cpus_allowed_list is $class's CPUs ($(class_cpus "$class"))" \
            wait_for 30 fenced "$pid" "$class"
        check_match "systemd: systemctl --user status $(comm_of "$pid") names an app scope" \
            "*app-*.scope*" "$(user_status_line "$pid")"
        check_match "systemd: corral explain $(comm_of "$pid") names its unit and slice" \
            "*unit*app-*.scope in corral-$class.slice*" "$(corral explain "$pid" 2>&1)"
    done
    check_match "systemd: the game's scope keeps steam's app id" \
        "*/app-steam-corral*.scope" "$(cgroup_of "$reaper")"
    check_eq "systemd: the game joined the reaper's unit (forked before its move or after)" \
        "$(cgroup_of "$reaper")" "$(cgroup_of "$game")"
    check_eq "systemd: steam itself stays in app-steam-2001.scope" \
        "$UM/app.slice/app-steam-2001.scope" "$(cgroup_of "$steam")"
    artifact systemd-cgls.txt systemd-cgls --no-pager
    artifact systemd-explain-game.txt corral explain "$game"
    artifact systemd-status.txt corral status

    # Dynamic mode: while the game runs, everyone else leaves its CPUs,
    # through properties (the class slices and app.slice), never user.slice.
    local game_cpus
    game_cpus=$(class_cpus game)
    check_match "systemd: protected mode while the game runs" "*protected*" "$(corral status 2>&1)"
    check "systemd: app.slice's AllowedCPUs leaves the game's CPUs ($game_cpus)" \
        wait_for 20 _narrowed app.slice "$game_cpus"
    check "systemd: system.slice's AllowedCPUs leaves the game's CPUs too" \
        wait_for 20 _narrowed_system system.slice "$game_cpus"
    check_eq "systemd: user.slice is never narrowed" "" "$(systemctl show -P AllowedCPUs user.slice)"

    # A container-shaped unit: corral never lifts its processes out.
    local boxed
    as_alice systemd-run --user --scope --quiet -p Delegate=yes \
        --unit=app-podman-2004.scope -- "$FAKEAPPS_PATH/nvim" boxed.rs > /dev/null 2>&1 &
    wait_for 30 pgrep -n -f 'nvim boxed.rs' > /dev/null
    boxed=$(pgrep -n -f 'nvim boxed.rs')
    check "systemd: a process in a Delegate=yes scope is classified" wait_class "$boxed" dev 60
    sleep 3
    check_eq "systemd: it stays in its delegated scope" \
        "$UM/app.slice/app-podman-2004.scope" "$(cgroup_of "$boxed")"
    check_eq "systemd: the class reaches it as the scope's AllowedCPUs" \
        "$(class_cpus dev)" "$(user_prop app-podman-2004.scope AllowedCPUs)"
    check_match "systemd: explain says the delegated unit fences it" \
        "*app-podman-2004.scope*" "$(corral explain "$boxed" 2>&1)"

    # Reloads and set-property on user.slice move nothing and log no conflict.
    local before
    before=$(journal_cursor)
    systemctl daemon-reload
    user_systemctl daemon-reload
    systemctl set-property --runtime user.slice CPUWeight=100
    sleep 3
    check_absent "systemd: daemon-reload and set-property log no controller conflict" \
        'Failed to (disable|enable) controller|controller.*busy' "$(journal_since "$before" -q)"
    check "systemd: the game is still in its unit after the reloads" in_class_slice "$game" game
    check_eq "systemd: nothing under /sys/fs/cgroup/corral" "" "$(ls -d /sys/fs/cgroup/corral 2>/dev/null)"

    # kill -9: systemd restarts the agent; ExecStopPost recover and the new
    # start restore what it changed; nothing is moved back.
    local old_pid unit_before
    old_pid=$(systemctl show -P MainPID corral.service)
    unit_before=$(cgroup_of "$game")
    kill -9 "$old_pid"
    check "systemd: systemd restarts the agent after kill -9" \
        wait_for 60 _restarted "$old_pid"
    check_eq "systemd: the game's unit is intact after the restart" "$unit_before" "$(cgroup_of "$game")"
    check "systemd: the game is re-adopted in its class" wait_class "$game" game 60
    artifact systemd-restore-log.txt cat /run/corral/systemd-restore.json

    # The game ends: after the hold-down the others get the CPUs back.
    user_systemctl stop "$(basename "$(cgroup_of "$game")")"
    check "systemd: stopping the game's unit ends the game" wait_for 20 gone "$game"
    check "systemd: shared again after the hold-down" wait_for 60 _mode_is shared
    check_eq "systemd: app.slice's AllowedCPUs is restored" "" "$(user_prop app.slice AllowedCPUs)"

    # Stop the service: every property it changed goes back.
    systemctl stop corral.service
    check_eq "systemd: after stop, the delegated scope's AllowedCPUs is restored" \
        "" "$(user_prop app-podman-2004.scope AllowedCPUs)"
    check "systemd: after stop, placed processes keep running" alive "$nvim"
    systemctl start corral.service

    # Logout ends every placed process of alice.
    systemctl stop "user@$ALICE_UID.service"
    check "systemd: logout (stop user@$ALICE_UID) leaves no process of alice" \
        wait_for 20 _no_alice_processes
    debug_logging off
    journal_since "$since" > "$ARTIFACTS/journal-systemd.txt"
    systemctl start "user@$ALICE_UID.service"
    rm -f /etc/corral/policy.toml
}

_restarted() {
    local now
    now=$(systemctl show -P MainPID corral.service)
    [[ $now != 0 && $now != "$1" ]] && corral status > /dev/null 2>&1
}
# _narrowed UNIT CPUS: alice's UNIT has an AllowedCPUs= without CPUS.
_narrowed() { local a; a=$(user_prop "$1" AllowedCPUs); [[ -n $a && $a != *"$2"* ]]; }
_narrowed_system() { local a; a=$(systemctl show -P AllowedCPUs "$1"); [[ -n $a && $a != *"$2"* ]]; }
_mode_is() { [[ $(corral status 2>/dev/null) == *"mode    $1"* ]]; }
_no_alice_processes() { ! pgrep -u "$ALICE" > /dev/null; }
