//! The eBPF side on the running kernel, without the agent: what its records
//! say is what /proc says. Needs root (BPF).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use corral::{
    kernel::bpf::{Tracer, decode},
    model::procs::{start_ticks, start_ticks_of_boottime_ns},
};
use corral_common::EventKind;

#[test]
fn an_exec_record_carries_the_start_time_proc_reports() {
    let (_tracer, mut ring) = Tracer::load(256 * 1024).expect("loading the eBPF side (root?)");
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut exec = None;
    while exec.is_none() && Instant::now() < deadline {
        while let Some(item) = ring.next() {
            if let Some(e) = decode(&item)
                && e.kind == EventKind::Exec as u32
                && e.tgid == pid
            {
                exec = Some(e);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let from_proc = start_ticks(pid);
    let _ = child.kill();
    let _ = child.wait();
    let exec = exec.expect("an exec record of the child within 10 s");
    assert_ne!(
        exec.start_boottime_ns, 0,
        "the kernel's BTF names task_struct.start_boottime"
    );
    assert_eq!(
        Some(start_ticks_of_boottime_ns(exec.start_boottime_ns)),
        from_proc,
        "record {} ns",
        exec.start_boottime_ns
    );
}
