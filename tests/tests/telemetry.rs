//! Scheduling telemetry from the kernel: two busy loops sharing one CPU in
//! a class show run-queue latency and on-CPU time for that class; an idle
//! class shows none.

use std::{process::Command, time::Duration};

use corral_tests::{
    Agent, KillOnDrop, busy_loops_on_cpu0, cgroup_of, named_copy, named_shell, wait_for,
};

const POLICY: &str = r#"
[classes.busy]
cpus = "0"

[classes.idle]
cpus = "0"

[[rules]]
name = "busy"
class = "busy"
exe = ["*/ctl-busy"]

[[rules]]
name = "idle"
class = "idle"
exe = ["*/ctl-idle"]
"#;

fn sched(agent: &Agent, class: &str) -> (u64, u64) {
    let s = agent.class_status(class);
    let sched = s
        .sched
        .clone()
        .unwrap_or_else(|| panic!("telemetry missing for {class}: {s:?}"));
    (sched.runq_count, sched.oncpu_ns)
}

#[test]
fn contended_class_shows_runqueue_latency_and_idle_class_none() {
    let agent = Agent::start("telemetry", POLICY).unwrap();
    let busy = named_shell(&agent.dir, "ctl-busy");
    let idle = named_copy(&agent.dir, "sleep", "ctl-idle").unwrap();
    let _idle = KillOnDrop(vec![Command::new(&idle).arg("60").spawn().unwrap()]);
    // Both loops on CPU 0, so each waits while the other runs.
    let children = busy_loops_on_cpu0(&busy, 2);
    let busy_group = agent.group_of("busy");
    assert!(wait_for(Duration::from_secs(5), || children
        .0
        .iter()
        .all(|c| cgroup_of(c.id()) == busy_group)));
    std::thread::sleep(Duration::from_millis(300));
    let (busy_before, busy_cpu_before) = sched(&agent, "busy");
    let (idle_before, _) = sched(&agent, "idle");
    std::thread::sleep(Duration::from_millis(1500));
    let (busy_after, busy_cpu_after) = sched(&agent, "busy");
    let (idle_after, idle_cpu_after) = sched(&agent, "idle");
    assert!(
        busy_after > busy_before,
        "no run-queue waits recorded for busy: {busy_before} -> {busy_after}"
    );
    // Two loops sharing one CPU for 1.5 s: about 1.5 s of CPU between them.
    let cpu = (busy_cpu_after - busy_cpu_before) as f64 / 1e9;
    assert!(
        (0.5..=3.1).contains(&cpu),
        "busy on-CPU {cpu} s over 1.5 s on one CPU"
    );
    let busy_sched = agent.class_status("busy").sched.unwrap();
    let hist: u64 = busy_sched.runq_hist.iter().sum();
    assert_eq!(
        hist, busy_sched.runq_count,
        "every wait lands in one histogram bucket"
    );
    assert_eq!(idle_after, idle_before, "the idle class waited for a CPU");
    assert!(
        idle_cpu_after < 50_000_000,
        "idle class used {idle_cpu_after} ns of CPU"
    );
}
