# service: the packaged unit, started the way a user would. Must pass today.

scenario_service() {
    local since
    since=$(journal_cursor)
    check "service: systemctl enable --now corral" \
        timed service_enable_now systemctl enable --now corral.service
    check_eq "service: corral.service is active" active "$(systemctl is-active corral.service)"
    check_eq "service: enabled for multi-user.target" enabled "$(systemctl is-enabled corral.service)"

    local main_pid
    main_pid=$(systemctl show -P MainPID corral.service)
    check_eq "service: the agent runs in the unit's own cgroup" \
        /system.slice/corral.service "$(cgroup_of "$main_pid")"
    check "service: corral status answers" timed corral_status corral status
    artifact corral-status.txt corral status

    # The watchdog: WatchdogSec=10s, and the agent must ping it in time even
    # under TCG. Soak long enough for a missed ping to show (two periods).
    sleep 25
    local shown journal
    shown=$(systemctl show corral.service -p WatchdogUSec,WatchdogTimestampMonotonic,NRestarts,ActiveState,SubState,ExecMainStartTimestampMonotonic,MainPID)
    printf '%s\n' "$shown" > "$ARTIFACTS/service-watchdog.txt"
    diag "$(tr '\n' ' ' <<< "$shown")"
    journal=$(journalctl --no-pager -b -u corral.service)
    check_absent "service: no watchdog timeout for corral in the journal" \
        'Watchdog timeout|watchdog.*(SIGABRT|killed)' "$journal"
    check_eq "service: not restarted" NRestarts=0 "$(grep '^NRestarts=' <<< "$shown")"
    check_eq "service: still the same main pid" "MainPID=$main_pid" "$(grep '^MainPID=' <<< "$shown")"

    check "service: systemctl reload corral" systemctl reload corral.service
    check_eq "service: active after reload" active "$(systemctl is-active corral.service)"
    journal_since "$since" -u corral.service > "$ARTIFACTS/journal-service.txt"
}
