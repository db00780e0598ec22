# Guest test library for the systemd VM tier (sourced by run-tests.sh, bash).
#
# Results: TAP lines in $RESULTS (/host/results.tap), numbered across all
# scenarios of the run; artifacts (journal excerpts, systemd-cgls, timings)
# under $ARTIFACTS (/host/artifacts). A check never aborts the run: it
# writes `ok N - name` or `not ok N - name # reason` and returns 0/1.
#
# While $TODO is set, every check is marked `# TODO $TODO`: it is recorded
# and printed but does not fail the run (TAP's TODO directive). A scenario
# sets it around checks that describe behaviour not built yet; turning them
# into hard checks is deleting the TODO= line.

SHARE=${SHARE:-/host}
RESULTS=${RESULTS:-$SHARE/results.tap}
ARTIFACTS=${ARTIFACTS:-$SHARE/artifacts}
ALICE=alice
ALICE_UID=1000
ALICE_RUNTIME=/run/user/$ALICE_UID
# Where run-tests.sh puts the launcher's copies (see install_fakeapps).
FAKEAPPS=/opt/fakeapps
FAKEAPPS_PATH=$FAKEAPPS/bin
STEAM_ROOT=/home/$ALICE/.local/share/Steam
TODO=
TAP_N=0

# ---------------------------------------------------------------- TAP ----

# Appends one raw line to the results (and echoes it to the console).
_tap_line() {
    printf '%s\n' "$1" >> "$RESULTS"
    printf '%s\n' "$1"
}

# diag TEXT...: a `# ` comment line in the results (context for a reader).
diag() {
    local line
    while IFS= read -r line; do
        _tap_line "# $line"
    done <<< "$*"
}

# One line, no '#' (TAP reads what follows '#' as a directive).
_oneline() {
    tr '\n#' ' .' <<< "$*" | sed 's/ *$//' | cut -c1-300
}

# pass NAME / fail NAME REASON: record a result directly.
pass() {
    TAP_N=$((TAP_N + 1))
    if [[ -n $TODO ]]; then
        _tap_line "ok $TAP_N - $(_oneline "$1") # TODO $(_oneline "$TODO")"
    else
        _tap_line "ok $TAP_N - $(_oneline "$1")"
    fi
    return 0
}
fail() {
    TAP_N=$((TAP_N + 1))
    if [[ -n $TODO ]]; then
        _tap_line "not ok $TAP_N - $(_oneline "$1") # TODO $(_oneline "$TODO"); got: $(_oneline "$2")"
    else
        _tap_line "not ok $TAP_N - $(_oneline "$1") # $(_oneline "$2")"
    fi
    return 1
}

# check NAME CMD...: ok when CMD exits 0; the reason quotes its exit status
# and the last lines of its output.
check() {
    local name=$1 out rc
    shift
    out=$("$@" 2>&1)
    rc=$?
    if ((rc == 0)); then
        pass "$name"
    else
        fail "$name" "\`$*\` exited $rc: $(tail -n 3 <<< "$out")"
    fi
}

# check_eq NAME EXPECTED ACTUAL
check_eq() {
    if [[ $3 == "$2" ]]; then pass "$1"; else fail "$1" "expected '$2', got '$3'"; fi
}

# check_match NAME GLOB ACTUAL: ACTUAL matches the shell pattern GLOB.
check_match() {
    # shellcheck disable=SC2053
    if [[ $3 == $2 ]]; then pass "$1"; else fail "$1" "expected $2, got '$3'"; fi
}

# check_no_match NAME GLOB ACTUAL
check_no_match() {
    # shellcheck disable=SC2053
    if [[ $3 != $2 ]]; then pass "$1"; else fail "$1" "did not expect $2, got '$3'"; fi
}

# check_absent NAME REGEX TEXT: no line of TEXT matches REGEX (grep -E).
check_absent() {
    local hits
    hits=$(grep -E -- "$2" <<< "$3")
    if [[ -z $hits ]]; then pass "$1"; else fail "$1" "found: $(head -n 2 <<< "$hits")"; fi
}

# Closes the results with the plan line; the host treats a file without it
# as a run that died half-way.
tap_plan() {
    _tap_line "1..$TAP_N"
}

# ----------------------------------------------------------- waiting ----

# wait_for TIMEOUT_S CMD...: polls CMD (every 0.2 s) until it exits 0;
# returns 1 after TIMEOUT_S seconds.
wait_for() {
    local timeout=$1 deadline
    shift
    deadline=$(( $(date +%s%N) + timeout * 1000000000 ))
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s%N) > deadline )); then
            return 1
        fi
        sleep 0.2
    done
}

# --------------------------------------------------------- processes ----

cgroup_of() { sed -n 's/^0:://p' "/proc/$1/cgroup" 2>/dev/null; }
cpus_allowed() { awk '/^Cpus_allowed_list:/ {print $2}' "/proc/$1/status" 2>/dev/null; }
comm_of() { cat "/proc/$1/comm" 2>/dev/null; }
exe_of() { readlink "/proc/$1/exe" 2>/dev/null; }
# all_gone PID...: none of them runs any more.
all_gone() {
    local pid
    for pid; do alive "$pid" && return 1; done
    return 0
}
alive() { [[ -d /proc/$1 ]] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
gone() { ! alive "$1"; }
# children_of PID: its child pids, one a line.
children_of() { tr ' ' '\n' < "/proc/$1/task/$1/children" 2>/dev/null | sed '/^$/d'; }
has_child() { [[ -n $(children_of "$1") ]]; }

# child_of PID [TIMEOUT_S]: waits for PID's first child and prints it.
child_of() {
    wait_for "${2:-30}" has_child "$1" || return 1
    children_of "$1" | head -n 1
}

# describe_pid PID: one diagnostic block: comm, exe, cgroup, CPUs.
describe_pid() {
    printf 'pid %s comm=%s exe=%s cgroup=%s cpus=%s\n' "$1" "$(comm_of "$1")" \
        "$(exe_of "$1")" "$(cgroup_of "$1")" "$(cpus_allowed "$1")"
}

# ------------------------------------------------------ alice, desktop ----

# as_alice CMD...: runs CMD as alice, talking to her own manager and bus.
as_alice() {
    runuser -u "$ALICE" -- env XDG_RUNTIME_DIR="$ALICE_RUNTIME" \
        DBUS_SESSION_BUS_ADDRESS="unix:path=$ALICE_RUNTIME/bus" "$@"
}
user_systemctl() { as_alice systemctl --user "$@"; }

_user_manager_up() {
    [[ $(systemctl is-active "user@$ALICE_UID.service") == active ]] &&
        [[ -S $ALICE_RUNTIME/bus ]] &&
        [[ $(user_systemctl is-system-running 2>/dev/null) == @(running|degraded) ]]
}
# wait_user_manager [TIMEOUT_S]: alice's lingering manager is up.
wait_user_manager() { wait_for "${1:-120}" _user_manager_up; }

SHELL_UNIT=corral-test-shell.service
SHELL_FIFO=$ALICE_RUNTIME/corral-test-shell.fifo
SHELL_PIDS=$ALICE_RUNTIME/corral-test-shell.pids

# desktop_shell_start: a long-lived "shell" service in alice's session.slice
# (as gnome-shell or plasmashell is) that launches what launch_app asks
# for, so apps are its children and each gets its own scope.
desktop_shell_start() {
    user_systemctl is-active --quiet "$SHELL_UNIT" && return 0
    as_alice mkdir -p "$SHELL_PIDS"
    [[ -p $SHELL_FIFO ]] || as_alice mkfifo "$SHELL_FIFO"
    as_alice systemd-run --user --quiet --unit="$SHELL_UNIT" --slice=session.slice \
        -p Type=exec -p Description="stand-in desktop shell (corral VM tests)" \
        --setenv=PATH="$FAKEAPPS_PATH:/usr/sbin:/usr/bin:/sbin:/bin" \
        --setenv=DBUS_SESSION_BUS_ADDRESS="unix:path=$ALICE_RUNTIME/bus" \
        /bin/bash "$SHARE/desktop-shell.sh" "$SHELL_FIFO" "$SHELL_PIDS"
    wait_for 30 user_systemctl is-active --quiet "$SHELL_UNIT"
}

# launch_app UNIT CMD...: starts CMD from the shell in its own scope
# app.slice/UNIT (e.g. app-steam-1001.scope, the name GNOME would give) and
# prints its pid. Words of CMD must not need quoting.
launch_app() {
    local unit=$1 pidfile
    shift
    pidfile=$SHELL_PIDS/$unit
    rm -f "$pidfile"
    printf '%s %s\n' "$unit" "$*" > "$SHELL_FIFO"
    wait_for 30 test -s "$pidfile" || return 1
    local pid
    pid=$(cat "$pidfile")
    # Until systemd-run has exec'd, the pid's comm is systemd-run.
    wait_for 30 _execd "$pid" "$(basename "$1")" || return 1
    echo "$pid"
}
_execd() { [[ $(comm_of "$1") == "${2:0:15}" ]]; }

# scope_active UNIT: alice's manager still has UNIT active.
scope_active() { [[ $(user_systemctl is-active "$1" 2>/dev/null) == active ]]; }

# user_status_line PID: first line of `systemctl --user status PID` (which
# unit alice's manager thinks PID belongs to), or its error.
user_status_line() { user_systemctl status --no-pager "$1" 2>&1 | head -n 1; }

# --------------------------------------------------------------- corral ----

corral_active() { [[ $(systemctl is-active corral.service) == active ]]; }

# corral_ensure_started: for scenarios run alone (--scenario NAME).
corral_ensure_started() {
    corral_active || systemctl start corral.service
}

# class_of PID: the class `corral explain` gives PID (empty if unknown).
class_of() { corral explain "$1" 2>/dev/null | awk '$1 == "class" {print $2; exit}'; }
# wait_class PID CLASS [TIMEOUT_S]
wait_class() { wait_for "${3:-30}" _has_class "$1" "$2"; }
_has_class() { [[ $(class_of "$1") == "$2" ]]; }

# -------------------------------------------------------- artifacts ----

# artifact NAME CMD...: saves CMD's output (and exit status) as
# $ARTIFACTS/NAME.
artifact() {
    local name=$1
    shift
    { "$@"; echo "(exit $?)"; } > "$ARTIFACTS/$name" 2>&1
}

# journal_cursor: where the journal is now (for journal_since).
journal_cursor() {
    journalctl -n 0 --show-cursor -q 2>/dev/null | sed -n 's/^-- cursor: //p'
}
# journal_since CURSOR [JOURNALCTL ARGS]: what was logged after CURSOR (the
# whole boot if it is empty).
journal_since() {
    local cursor=$1
    shift
    if [[ -n $cursor ]]; then
        journalctl --no-pager -o short-monotonic --after-cursor="$cursor" "$@"
    else
        journalctl --no-pager -o short-monotonic -b "$@"
    fi
}

# debug_logging on|off: PID 1's and alice's manager's log level (controller
# conflicts and scope garbage collection are only logged at debug).
debug_logging() {
    local level=info
    [[ $1 == on ]] && level=debug
    systemd-analyze log-level "$level"
    user_systemctl log-level "$level" 2>/dev/null || true
}

# ------------------------------------------------------------ timing ----

_now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
declare -A _TIMER_START=()
timer_start() { _TIMER_START[$1]=$(_now_ms); }
# timer_stop NAME: records the time since timer_start NAME, in ms.
timer_stop() {
    record_ms "$1" $(( $(_now_ms) - ${_TIMER_START[$1]:-$(_now_ms)} ))
}
# timed NAME CMD...: runs CMD, records how long it took, returns its status.
timed() {
    local name=$1 start rc
    shift
    start=$(_now_ms)
    "$@"
    rc=$?
    record_ms "$name" $(( $(_now_ms) - start ))
    return $rc
}
# record_ms NAME MS: one timing. Appended to timings.txt (so it also works
# from the subshell a check runs in) and timings.json rewritten from it, so
# a run that dies still leaves what it measured; the last value of a name
# wins.
record_ms() {
    printf '%s %s\n' "$1" "$2" >> "$ARTIFACTS/timings.txt"
    tac "$ARTIFACTS/timings.txt" | sort -s -u -k1,1 |
        awk 'BEGIN { printf "{" } { printf "%s\"%s\": %s", (NR > 1 ? ", " : ""), $1, $2 } END { print "}" }' \
        > "$ARTIFACTS/timings.json"
}
