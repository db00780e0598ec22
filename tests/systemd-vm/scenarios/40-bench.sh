# bench: exec -> confined and exec -> in-unit latency of the systemd backend
# at 10 and 100 execs/s, beside the floor measured in the same guest: the
# same agent with the cgroupfs backend (one cgroup.procs write). Under TCG
# only the ratios mean something. Numbers, not assertions: they go to
# artifacts/bench.json and the TAP comments.

BENCH_GAME=$STEAM_ROOT/steamapps/common/FakeGame/game.x86_64

# bench_run LABEL SOCKET RATE COUNT: storms from alice's app scope, waits
# for the placements, prints the latency JSON.
bench_run() {
    local label=$1 socket=$2 rate=$3 count=$4 pidfile=$ALICE_RUNTIME/bench-$1.pids
    rm -f "$pidfile"
    local spawner
    spawner=$(launch_app "app-bench-$label.scope" /usr/bin/python3 "$SHARE/spawner.py" \
        "$BENCH_GAME" "$rate" "$count" "$pidfile")
    wait_for 120 test -s "$pidfile"
    sleep 5
    local result
    result=$(corral placements --socket "$socket" | python3 "$SHARE/latency.py" "$pidfile")
    diag "bench $label: $result"
    printf '"%s": %s,\n' "$label" "$result" >> "$ARTIFACTS/bench.parts"
    xargs -r kill -9 < "$pidfile" 2>/dev/null
    kill -9 "$spawner" 2>/dev/null
    sleep 2
}

scenario_bench() {
    check "bench: corral.service is running" corral_ensure_started
    check "bench: alice's manager is up" wait_user_manager 120
    check "bench: stand-in shell runs" desktop_shell_start
    : > "$ARTIFACTS/bench.parts"
    bench_run systemd-10 /run/corral/control.sock 10 50
    bench_run systemd-100 /run/corral/control.sock 100 200

    # The floor: the same agent placing with one cgroupfs write.
    systemctl stop corral.service
    mkdir -p /run/corral-floor
    corral run --backend cgroupfs --cgroup-root /sys/fs/cgroup/corral-floor \
        --socket /run/corral-floor/control.sock > "$ARTIFACTS/bench-floor-agent.log" 2>&1 &
    local floor=$!
    wait_for 120 corral status --socket /run/corral-floor/control.sock > /dev/null
    bench_run floor-10 /run/corral-floor/control.sock 10 50
    bench_run floor-100 /run/corral-floor/control.sock 100 200
    kill "$floor"
    wait "$floor" 2>/dev/null
    find /sys/fs/cgroup/corral-floor -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
    rmdir /sys/fs/cgroup/corral-floor 2>/dev/null
    systemctl start corral.service
    { echo "{"; sed '$ s/,$//' "$ARTIFACTS/bench.parts"; echo "}"; } > "$ARTIFACTS/bench.json"
    check "bench: every storm was placed" python3 -c '
import json, sys
b = json.load(open(sys.argv[1]))
sys.exit(0 if all(r["placed"] == r["n"] for r in b.values()) else 1)' "$ARTIFACTS/bench.json"
}
