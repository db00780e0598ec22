//! The eBPF side on the running kernel, without the agent: what its records
//! say is what /proc says. Needs root (BPF).

use std::{
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

use corral::{
    kernel::bpf::{Tracer, Wake, decode},
    model::procs::{start_ticks, start_ticks_of_boottime_ns},
};
use corral_common::EventKind;

#[test]
fn an_exec_record_carries_the_start_time_proc_reports() {
    let (_tracer, mut ring) =
        Tracer::load(256 * 1024, Wake::Ring).expect("loading the eBPF side (root?)");
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

/// How many wake-ups an edge-triggered epoll on the ring sees while one
/// child is spawned: records that wake nobody never put it on the ready
/// list, though they are in the ring.
fn ring_wakeups_for_a_spawn(woken_by: Wake) -> (i32, usize) {
    let (_tracer, mut ring) =
        Tracer::load(256 * 1024, woken_by).expect("loading the eBPF side (root?)");
    while ring.next().is_some() {}
    // SAFETY: a new epoll instance, closed below.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epoll >= 0);
    let mut wanted = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: valid epoll and ring fds, event struct on the stack.
    let added =
        unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, ring.as_raw_fd(), &mut wanted) };
    assert_eq!(added, 0);
    // Anything already there was drained; a wake-up from now on is new.
    let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: as above; `ready` has room for 4 events.
    unsafe { libc::epoll_wait(epoll, ready.as_mut_ptr(), 4, 0) };
    while ring.next().is_some() {}
    let status = Command::new("/bin/true").status().unwrap();
    assert!(status.success());
    // SAFETY: as above.
    let woken = unsafe { libc::epoll_wait(epoll, ready.as_mut_ptr(), 4, 300) };
    let mut records = 0;
    while ring.next().is_some() {
        records += 1;
    }
    // SAFETY: our own epoll fd.
    unsafe { libc::close(epoll) };
    (woken, records)
}

#[test]
fn exec_and_fork_records_wake_the_reader_unless_the_proc_connector_does() {
    let (woken, records) = ring_wakeups_for_a_spawn(Wake::Ring);
    assert_eq!(
        woken, 1,
        "a spawn's fork and exec records woke the ring's epoll {woken} times"
    );
    assert!(records >= 2, "{records} records for a fork and an exec");
    // Nothing this machine does wakes it then: exits never do, and
    // neither do execs and forks.
    let (woken, records) = ring_wakeups_for_a_spawn(Wake::Doorbell);
    assert_eq!(
        woken, 0,
        "records woke the ring's epoll though the doorbell wakes the agent"
    );
    assert!(records >= 2, "{records} records for a fork and an exec");
}
