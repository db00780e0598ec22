#!/bin/bash
# Entry point in the guest, run once per boot by corral-vm-tests.service
# from the host's share (/host). Installs the package with dpkg as a user
# would, runs the scenarios (scenarios/NN-NAME.sh, each defining
# scenario_NAME; /host/scenario, when present, names the ones to run,
# comma-separated) and writes TAP to /host/results.tap, artifacts to
# /host/artifacts/. The unit powers the VM off when this exits.
set -u
SHARE=/host
source "$SHARE/lib.sh"

mkdir -p "$ARTIFACTS"
: > "$RESULTS"
exec > >(tee -a "$ARTIFACTS/run-tests.log") 2>&1
echo "corral-vm-tests: started at uptime $(cut -d' ' -f1 /proc/uptime) s"
touch "$SHARE/started"

# Kernel trouble shows in full and ends the run: the command line's `quiet`
# hides the backtraces of a lockup or a stall (printed at the default level,
# 4), and a locked-up guest would otherwise sit until the host's 15 minute
# timeout. The third RCU stall report in a row (about 2.5 minutes stuck)
# panics, which panic=-1 and qemu's -no-reboot turn into qemu's exit; one
# report alone may be the emulation falling behind on a busy host.
dmesg -n 5
sysctl -q -w kernel.softlockup_all_cpu_backtrace=1 kernel.panic_on_rcu_stall=1 \
    kernel.max_rcu_stall_to_panic=3 \
    || diag "could not set the kernel's lockup sysctls"

# Boot: wait until systemd says the system is up (degraded still runs).
state=$(timeout 300 systemctl is-system-running --wait 2>&1)
record_ms boot_uptime "$(awk '{printf "%d", $1 * 1000}' /proc/uptime)"
diag "guest: $(uname -r), systemd $(systemctl --version | awk 'NR == 1 {print $2}'), system state: $state"
artifact boot-analyze.txt systemd-analyze
artifact boot-failed-units.txt systemctl --failed --no-pager
wait_user_manager 120 || diag "alice's manager (user@$ALICE_UID.service) is not up after 120 s"

# The fake desktop programs: copies of the launcher, at paths like the real
# ones (the policy matches exe paths and comm).
install_fakeapps() {
    install -d -o "$ALICE" -g "$ALICE" "$STEAM_ROOT/ubuntu12_32" \
        "$STEAM_ROOT/steamapps/common/FakeGame"
    install -o "$ALICE" -g "$ALICE" -m 755 "$SHARE/launcher" "$STEAM_ROOT/ubuntu12_32/steam"
    install -o "$ALICE" -g "$ALICE" -m 755 "$SHARE/launcher" "$STEAM_ROOT/ubuntu12_32/reaper"
    install -o "$ALICE" -g "$ALICE" -m 755 "$SHARE/launcher" "$STEAM_ROOT/steamapps/common/FakeGame/game.x86_64"
    install -d "$FAKEAPPS_PATH" "$FAKEAPPS/blender"
    install -m 755 "$SHARE/launcher" "$FAKEAPPS_PATH/nvim"
    install -m 755 "$SHARE/launcher" "$FAKEAPPS_PATH/rust-analyzer"
    install -m 755 "$SHARE/launcher" "$FAKEAPPS/blender/blender"
}
install_fakeapps

# The package, as a user installs it. Without it the scenarios mean nothing.
debs=("$SHARE"/*.deb)
installed=no
if [[ ! -f ${debs[0]} ]]; then
    fail "install: dpkg -i the package" "no .deb in the share"
elif timed install_deb check "install: dpkg -i $(basename "${debs[0]}")" dpkg -i "${debs[0]}"; then
    installed=yes
    artifact dpkg-status.txt dpkg -s corral
else
    artifact dpkg-install.txt dpkg -i "${debs[0]}"
fi

# Scenarios, in file order, filtered by /host/scenario.
wanted=$(tr ',' ' ' < "$SHARE/scenario" 2>/dev/null)
for file in "$SHARE"/scenarios/[0-9]*-*.sh; do
    name=$(basename "$file" .sh)
    name=${name#*-}
    if [[ -n $wanted ]] && [[ " $wanted " != *" $name "* ]]; then
        continue
    fi
    if [[ $installed != yes ]]; then
        diag "scenario $name skipped: the package did not install"
        continue
    fi
    diag "scenario $name"
    # shellcheck source=/dev/null
    source "$file"
    TODO=
    timed "scenario_$name" "scenario_$name"
    TODO=
done

# Whatever the scenarios did, the whole picture at the end.
artifact cgls-end.txt systemd-cgls --no-pager
artifact journal-corral.txt journalctl --no-pager -o short-monotonic -b -u corral.service
artifact journal-all.txt journalctl --no-pager -o short-monotonic -b
record_ms total_uptime "$(awk '{printf "%d", $1 * 1000}' /proc/uptime)"
tap_plan
sync
echo "corral-vm-tests: done at uptime $(cut -d' ' -f1 /proc/uptime) s"
