//! Policy changes under a running agent: a good edit re-places processes at
//! once, a bad edit is refused and moves nothing, SIGHUP and `corral
//! reload` reload too, and dynamic modes move the other classes off the
//! game's CPUs while a game runs.

use std::{process::Command, time::Duration};

use corral_tests::{
    Agent, StatusExt as _, cgroup_of, cpus_allowed, cpuset_available, named_copy, timeout_scale,
    wait_for, write_file,
};

fn policy(prefix: &str, extra_rules: &str, modes: &str) -> String {
    format!(
        r#"
[classes.game]
cpus = "0"
cpu_weight = 1000

[classes.dev]
cpus = "0-1"
cpu_weight = 200

{modes}

[[rules]]
name = "tool-is-dev"
class = "dev"
exe = ["*/{prefix}-tool"]
{extra_rules}
"#
    )
}

#[test]
fn editing_the_policy_moves_processes_and_a_bad_edit_keeps_everything() {
    let agent = Agent::start("reload", &policy("crl", "", "")).unwrap();
    let tool = named_copy(&agent.dir, "sleep", "crl-tool").unwrap();
    let mut proc = Command::new(&tool).arg("60").spawn().unwrap();
    let (dev, game) = (agent.group_of("dev"), agent.group_of("game"));
    assert!(
        wait_for(Duration::from_secs(5), || cgroup_of(proc.id()) == dev),
        "{}",
        agent.log()
    );

    // The user's override claims the tool for `game`: it moves, live.
    write_file(
        &agent.override_file,
        "[[rules]]\nname = \"tool-is-game\"\nclass = \"game\"\nexe = [\"*/crl-tool\"]\n",
    );
    assert!(
        wait_for(Duration::from_secs(5), || cgroup_of(proc.id()) == game),
        "after a good edit the tool is in {}\n{}",
        cgroup_of(proc.id()),
        agent.log()
    );
    let explain = agent.corral(&["explain", &proc.id().to_string()]).unwrap();
    assert!(explain.contains("tool-is-game"), "{explain}");
    assert!(explain.contains("override.toml:1"), "{explain}");
    let status = agent.status().unwrap();
    assert_eq!(status.last_reload_ok(), Some(true), "{status:?}");

    // A bad edit (unknown class) is refused: nothing moves, status says why.
    write_file(
        &agent.override_file,
        "[[rules]]\nname = \"tool-is-dev-again\"\nclass = \"devv\"\nexe = [\"*/crl-tool\"]\n",
    );
    assert!(wait_for(Duration::from_secs(5), || {
        agent.status().unwrap().last_reload_ok() == Some(false)
    }));
    let status = agent.status().unwrap();
    let message = &status.last_reload.as_ref().unwrap().message;
    assert!(message.contains("override.toml:1:1"), "{message}");
    assert!(message.contains("unknown class `devv`"), "{message}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cgroup_of(proc.id()),
        game,
        "a refused reload must not move anything"
    );
    // The process is still explained by the last good policy.
    let explain = agent.corral(&["explain", &proc.id().to_string()]).unwrap();
    assert!(explain.contains("tool-is-game"), "{explain}");

    let human = agent.corral(&["status"]).unwrap();
    assert!(
        human.contains("reload  REFUSED") && human.contains("unknown class `devv`"),
        "{human}"
    );
    // `corral reload` reports the refusal too, and fails.
    let err = agent.corral(&["reload"]).unwrap_err().to_string();
    assert!(err.contains("unknown class `devv`"), "{err}");

    // Removing the override sends the tool back to dev; SIGHUP reloads.
    std::fs::remove_file(&agent.override_file).unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(5), || cgroup_of(proc.id()) == dev),
        "{}",
        agent.log()
    );
    let _ = proc.kill();
    let _ = proc.wait();
}

#[test]
fn a_running_game_takes_its_cpus_from_the_other_classes_until_hold_down_passes() {
    let rules = "\n[[rules]]\nname = \"game\"\nclass = \"game\"\nexe = [\"*/crm-game\"]\n";
    // Slower machines (the VM tier) get proportionally longer times.
    let scale = timeout_scale();
    let modes = format!(
        "[modes]\nhold_down_ms = {}\nmin_dwell_ms = 100\n",
        1500 * scale
    );
    let modes = modes.as_str();
    let agent = Agent::start("modes", &policy("crm", rules, modes)).unwrap();
    // No game yet: dev keeps its own CPUs, game's included.
    assert_eq!(agent.status().unwrap().mode, "shared");
    assert_eq!(agent.class_status("dev").cpus.as_deref(), Some("0-1"));
    let tool = named_copy(&agent.dir, "sleep", "crm-tool").unwrap();
    let mut dev = Command::new(&tool).arg("60").spawn().unwrap();
    assert!(wait_for(Duration::from_secs(5), || cgroup_of(dev.id())
        == agent.group_of("dev")));
    let enforced = cpuset_available();
    if enforced {
        assert_eq!(cpus_allowed(dev.id()), "0-1");
    }

    let game_bin = named_copy(&agent.dir, "sleep", "crm-game").unwrap();
    let mut game = Command::new(&game_bin).arg("60").spawn().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || agent.status().unwrap().mode
            == "protected"),
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.class_status("dev").cpus.as_deref(),
        Some("1"),
        "dev must leave the game's CPU 0"
    );
    assert_eq!(agent.class_status("game").cpus.as_deref(), Some("0"));
    if enforced {
        assert_eq!(cpus_allowed(dev.id()), "1");
    }

    let _ = game.kill();
    let _ = game.wait();
    // Held down: still protected shortly after the game exits...
    std::thread::sleep(Duration::from_millis(500) * scale);
    assert_eq!(agent.status().unwrap().mode, "protected");
    // ...and shared once the hold-down has passed.
    assert!(wait_for(Duration::from_secs(5), || agent
        .status()
        .unwrap()
        .mode
        == "shared"));
    assert_eq!(agent.class_status("dev").cpus.as_deref(), Some("0-1"));
    if enforced {
        assert_eq!(cpus_allowed(dev.id()), "0-1");
    }
    let _ = dev.kill();
    let _ = dev.wait();
}
