# login: the package's user@.service drop-in (Delegate=cpu cpuset io memory
# pids) takes effect at a user's next login. alice's lingering manager
# started before the package was installed; restarting it is her next login.

scenario_login() {
    check "login: the package installed user@.service.d/corral.conf" \
        test -f /usr/lib/systemd/system/user@.service.d/corral.conf
    systemctl daemon-reload
    check "login: restart user@$ALICE_UID.service (alice logs in again)" \
        systemctl restart "user@$ALICE_UID.service"
    check "login: alice's manager is up again" wait_user_manager 120
    check_match "login: alice's manager now has the cpuset controller" \
        "*cpuset*" "$(cat "/sys/fs/cgroup/user.slice/user-$ALICE_UID.slice/user@$ALICE_UID.service/cgroup.controllers" 2>&1)"
}
