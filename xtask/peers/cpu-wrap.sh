#!/bin/bash
# cpu-wrap.sh OUT DELAY_S AGENT...: runs AGENT, and writes to OUT its CPU
# time (ns, every thread's schedstat) DELAY_S after the start (before the
# storm) and when asked to stop (after it), plus its RSS then and how often
# its threads went to sleep meanwhile (voluntary context switches: wake-ups):
#   cpu_start_ns=.. cpu_end_ns=.. rss_kib=.. hwm_kib=.. sleeps=..
# For `cargo xtask bench peers`: run.sh starts the agent, waits, storms,
# then sends SIGTERM to this script's process group.
set -u
out=$1 delay=$2; shift 2
cpu_ns() {
	local total=0 t
	for t in /proc/"$1"/task/*/schedstat; do
		read -r run _ < "$t" 2>/dev/null && total=$((total + run))
	done
	echo "$total"
}
sleeps() {
	awk '/^voluntary_ctxt_switches:/{n += $2} END{print n + 0}' /proc/"$1"/task/*/status 2>/dev/null
}
# Its own process group: run.sh stops the group, and the numbers must be
# read before the agent sees the signal.
setsid "$@" &
agent=$!
stop() {
	local end rss hwm slept
	end=$(cpu_ns "$agent")
	slept=$(($(sleeps "$agent") - ${sleeps_start:-0}))
	rss=$(awk '/^VmRSS:/{print $2}' /proc/"$agent"/status 2>/dev/null)
	hwm=$(awk '/^VmHWM:/{print $2}' /proc/"$agent"/status 2>/dev/null)
	echo "cpu_start_ns=${start:-0} cpu_end_ns=$end rss_kib=${rss:-0} hwm_kib=${hwm:-0} sleeps=$slept" > "$out"
	kill -TERM "$agent" 2>/dev/null
	wait "$agent"
	exit 0
}
trap stop TERM INT
sleep "$delay" & wait $!
start=$(cpu_ns "$agent")
sleeps_start=$(sleeps "$agent")
while kill -0 "$agent" 2>/dev/null; do sleep 0.2 & wait $!; done
