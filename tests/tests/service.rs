//! Running as a system service that never hurts what it manages:
//! sd_notify against a test-made NOTIFY_SOCKET, `corral recover` after a
//! kill -9 with a group frozen, SIGTERM with 100 placed processes, a
//! restart that re-adopts without moving anything twice, and a ring buffer
//! so small it overflows, after which the /proc sweep places every
//! survivor.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use corral_tests::{
    Agent, KillOnDrop, cgroup_of, cpus_allowed, cpuset_available, frozen, named_copy, online_cpus,
    wait_for,
};

fn policy(prefix: &str) -> String {
    format!(
        "[classes.game]\ncpus = \"0\"\n\n[telemetry]\nmetrics_addr = \"\"\n\n[[rules]]\nname = \"{prefix}-game\"\nclass = \"game\"\ninherit = true\nexe = [\"*/{prefix}-game\"]\n"
    )
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
    let mut agent = Agent::builder("notify", &policy("csn"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .start()
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
    let all = online_cpus();
    for k in &kids.0 {
        let state = std::fs::read_to_string(format!("/proc/{}/stat", k.id())).unwrap();
        assert!(!state.contains(") Z"), "a placed process died");
        if cpuset_available() {
            assert_eq!(cpus_allowed(k.id()), all, "not widened to all CPUs");
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
    let second = Agent::builder("adopt2", &policy("csa"))
        .cgroup_root(&root)
        .start()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let game = second.class_status("game");
    assert_eq!(
        game.placements, 0,
        "processes already in their group were moved again: {game:?}"
    );
    assert!(game.processes >= 5, "{game:?}");
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
    let agent = Agent::builder("overflow", &policy("cso"))
        .args(&["--ring-buffer-kib", "4", "--sweep-interval-ms", "60000"])
        .start()
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
        wait_for(Duration::from_secs(10), || agent
            .status()
            .unwrap()
            .kernel
            .dropped
            > 0),
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

#[test]
fn release_all_thaws_and_widens_every_class_group_and_goes_on_past_a_failure() {
    // A stand-in tree of plain files: what recover and the stop path write
    // is the same as on cgroupfs, and no root or agent is needed.
    let root = Agent::dir_for("release").join("corral");
    let _ = std::fs::remove_dir_all(&root);
    for (group, files) in [
        ("game", &[("cpuset.cpus", "0"), ("cgroup.freeze", "0")][..]),
        ("ai", &[("cpuset.cpus", "1"), ("cgroup.freeze", "1")][..]),
        ("dev", &[("cgroup.freeze", "0")][..]),
    ] {
        std::fs::create_dir_all(root.join(group)).unwrap();
        for (file, text) in files {
            std::fs::write(root.join(group).join(file), text).unwrap();
        }
    }
    // A core set that cannot be written (a directory in its place).
    std::fs::create_dir_all(root.join("render/cpuset.cpus")).unwrap();
    let online = corral::model::cpus::CpuList::parse("0-3").unwrap();

    let report = corral::actuate::cgroup::release_all(&root, &online);

    assert_eq!(report.thawed, 1, "{report:?}");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    assert_eq!(read("ai/cgroup.freeze"), "0");
    assert_eq!(report.widened, 2, "{report:?}");
    assert_eq!(read("game/cpuset.cpus"), "0-3");
    assert_eq!(read("ai/cpuset.cpus"), "0-3");
    assert!(!root.join("dev/cpuset.cpus").exists(), "no file is created");
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].to_string().contains("render/cpuset.cpus"),
        "{report:?}"
    );
    let missing = corral::actuate::cgroup::release_all(&root.join("absent"), &online);
    assert_eq!((missing.thawed, missing.widened), (0, 0));
    assert!(missing.errors.is_empty(), "{missing:?}");
    let _ = std::fs::remove_dir_all(root.parent().unwrap());
}
