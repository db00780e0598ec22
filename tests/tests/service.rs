//! Running as a system service that never hurts what it manages:
//! sd_notify against a test-made NOTIFY_SOCKET, `corral recover` after a
//! kill -9 with a group frozen, SIGTERM with 100 placed processes, a
//! restart that re-adopts without moving anything twice, and a ring buffer
//! so small it overflows, after which the /proc sweep places every
//! survivor.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use corral_tests::{
    Agent, KillOnDrop, cgroup_of, cpus_allowed, cpuset_available, named_copy, wait_for,
};

fn policy(prefix: &str) -> String {
    format!(
        "[classes.game]\ncpus = \"0\"\n\n[telemetry]\nmetrics_addr = \"\"\n\n[[rules]]\nname = \"{prefix}-game\"\nclass = \"game\"\ninherit = true\nexe = [\"*/{prefix}-game\"]\n"
    )
}

/// Whether the group is frozen, as its `cgroup.events` says.
fn frozen(group: &Path) -> bool {
    corral::actuate::cgroup::is_frozen(group).unwrap_or(false)
}

#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let dir = Agent::dir_for("notify");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut agent = Agent::start_env(
        "notify",
        &policy("csn"),
        &[],
        &[
            ("NOTIFY_SOCKET", &socket_path),
            ("WATCHDOG_USEC", Path::new("400000")),
        ],
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && messages
            .iter()
            .filter(|m: &&String| m.starts_with("WATCHDOG=1"))
            .count()
            < 3
    {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(messages[0].starts_with("READY=1\nSTATUS="), "{messages:?}");
    assert!(
        messages
            .iter()
            .filter(|m| m.starts_with("WATCHDOG=1"))
            .count()
            >= 3,
        "the loop must keep feeding a 400 ms watchdog: {messages:?}"
    );
    // A reload is bracketed by RELOADING=1 and READY=1.
    agent.corral(&["reload"]).unwrap();
    let mut seen_reload = Vec::new();
    while !seen_reload
        .iter()
        .any(|m: &String| m.starts_with("READY=1"))
    {
        let n = socket.recv(&mut buf).expect("READY after reload");
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !m.starts_with("WATCHDOG") {
            seen_reload.push(m);
        }
    }
    assert!(
        seen_reload[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{seen_reload:?}"
    );
    agent.stop().unwrap();
    let mut stopping = false;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        stopping |= buf[..n].starts_with(b"STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 on SIGTERM");
}

#[test]
fn kill_9_with_a_frozen_group_then_corral_recover_thaws_it() {
    let mut agent = Agent::start("recover", &policy("csr")).unwrap();
    let game_bin = named_copy(&agent.dir, "sleep", "csr-game").unwrap();
    let mut kids = KillOnDrop(vec![Command::new(&game_bin).arg("60").spawn().unwrap()]);
    let group = agent.cgroup_root.join("game");
    assert!(wait_for(Duration::from_secs(5), || cgroup_of(
        kids.0[0].id()
    ) == agent
        .group_of("game")));
    // Something froze the group (a VRAM ladder), then the agent died hard.
    corral::actuate::cgroup::set_frozen(&group, true).unwrap();
    assert!(wait_for(Duration::from_secs(5), || frozen(&group)));
    agent.signal(libc::SIGKILL);
    let _ = agent.stop();
    assert!(
        frozen(&group),
        "still frozen after kill -9: the situation recover is for"
    );
    let out = Command::new(corral_tests::corral_bin())
        .args(["recover", "--cgroup-root"])
        .arg(&agent.cgroup_root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("thawed 1 groups"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!frozen(&group));
    assert!(
        kids.0[0].try_wait().unwrap().is_none(),
        "recover must not kill anything"
    );
    kids.0.clear();
}

#[test]
fn sigterm_with_100_placed_processes_leaves_them_runnable_on_all_cpus_within_1s() {
    let mut agent = Agent::start("term", &policy("cst")).unwrap();
    let game_bin = named_copy(&agent.dir, "sleep", "cst-game").unwrap();
    let kids = KillOnDrop(
        (0..100)
            .map(|_| Command::new(&game_bin).arg("60").spawn().unwrap())
            .collect(),
    );
    let group_rel = agent.group_of("game");
    assert!(wait_for(Duration::from_secs(10), || kids
        .0
        .iter()
        .all(|k| cgroup_of(k.id()) == group_rel)));
    let group = agent.cgroup_root.join("game");
    corral::actuate::cgroup::set_frozen(&group, true).unwrap();
    assert!(wait_for(Duration::from_secs(5), || frozen(&group)));
    let started = Instant::now();
    let status = agent.stop().unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(1) * corral_tests::timeout_scale(),
        "stop took {took:?}"
    );
    assert!(!frozen(&group), "SIGTERM must thaw");
    let all = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    for k in &kids.0 {
        let state = std::fs::read_to_string(format!("/proc/{}/stat", k.id())).unwrap();
        assert!(!state.contains(") Z"), "a placed process died");
        if cpuset_available() {
            assert_eq!(cpus_allowed(k.id()), all.trim(), "not widened to all CPUs");
        }
    }
}

#[test]
fn restart_re_adopts_without_moving_anything_twice() {
    let mut first = Agent::start("adopt", &policy("csa")).unwrap();
    let game_bin = named_copy(&first.dir, "sleep", "csa-game").unwrap();
    let kids = KillOnDrop(
        (0..5)
            .map(|_| Command::new(&game_bin).arg("60").spawn().unwrap())
            .collect(),
    );
    let group_rel = first.group_of("game");
    assert!(wait_for(Duration::from_secs(5), || kids
        .0
        .iter()
        .all(|k| cgroup_of(k.id()) == group_rel)));
    // Keep the cgroup tree: stop without the harness's cleanup, then start
    // a new agent on the same root.
    first.stop().unwrap();
    let root = first.cgroup_root.clone();
    std::mem::forget(first);
    let second = Agent::start_with(
        "adopt2",
        &policy("csa"),
        &["--cgroup-root", root.to_str().unwrap()],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let game = second.class_status("game");
    assert_eq!(
        game["placements"], 0,
        "processes already in their group were moved again: {game}"
    );
    assert!(game["processes"].as_u64().unwrap() >= 5, "{game}");
    for k in &kids.0 {
        assert_eq!(cgroup_of(k.id()), group_rel);
        let explain = second.corral(&["explain", &k.id().to_string()]).unwrap();
        assert!(explain.contains("rule      csa-game"), "{explain}");
    }
    drop(second);
    corral_tests::remove_cgroup_tree(&root);
}

#[test]
fn overflowing_a_tiny_ring_buffer_still_places_every_survivor_after_the_sweep() {
    let agent = Agent::start_with(
        "overflow",
        &policy("cso"),
        &["--ring-buffer-kib", "4", "--sweep-interval-ms", "60000"],
    )
    .unwrap();
    let game_bin = named_copy(&agent.dir, "sleep", "cso-game").unwrap();
    // Stop the agent while processes start, so the 4 KiB ring buffer (about
    // a dozen records) certainly overflows, then let it go on.
    agent.signal(libc::SIGSTOP);
    let kids = KillOnDrop(
        (0..100)
            .map(|_| Command::new(&game_bin).arg("60").spawn().unwrap())
            .collect(),
    );
    agent.signal(libc::SIGCONT);
    let group_rel = agent.group_of("game");
    assert!(
        wait_for(
            Duration::from_secs(10),
            || agent.status().unwrap()["kernel"]["dropped"]
                .as_u64()
                .unwrap()
                > 0
        ),
        "100 execs while the agent was stopped did not overflow a 4 KiB ring buffer"
    );
    // The periodic sweep is a minute away: the dropped counter triggers one.
    let stragglers = || {
        kids.0
            .iter()
            .filter(|k| cgroup_of(k.id()) != group_rel)
            .count()
    };
    let placed = wait_for(Duration::from_secs(10), || stragglers() == 0);
    let detail: Vec<String> = kids
        .0
        .iter()
        .filter(|k| cgroup_of(k.id()) != group_rel)
        .take(3)
        .map(|k| {
            let pid = k.id().to_string();
            format!(
                "{pid} in {}: {}",
                cgroup_of(k.id()),
                agent
                    .corral(&["explain", &pid])
                    .unwrap_or_else(|e| e.to_string())
            )
        })
        .collect();
    assert!(placed, "{} never placed: {detail:#?}", stragglers());
}
