//! Plain-old-data shared by the eBPF programs and the agent: the process
//! event record, counter slots and the tracepoint field offsets the agent
//! hands to the kernel side. `#[repr(C)]`, explicit sizes, no padding.
#![no_std]

/// Bytes of `comm` the kernel keeps (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;
/// Bytes of the exec'd filename carried in a record; longer paths are cut
/// (the agent reads the full path from /proc/PID/exe).
pub const FILENAME_LEN: usize = 256;

/// What happened to a process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Exec = 1,
    Fork = 2,
    Exit = 3,
}

impl EventKind {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Exec),
            2 => Some(Self::Fork),
            3 => Some(Self::Exit),
            _ => None,
        }
    }
}

/// One record in the `EVENTS` ring buffer.
///
/// * exec: `pid`/`tgid` of the process that exec'd, `ppid` 0 (its parent
///   at fork came in its fork record), `filename` the path given to exec,
///   `start_boottime_ns` its start time (0 where the kernel's BTF did not
///   say where task_struct keeps it).
/// * fork: `pid`/`tgid` of the new process, `ppid` the forking tgid,
///   `cgroup_id` the parent's cgroup, which the child inherits. Threads are
///   not reported.
/// * exit: the thread group leader's exit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ktime_ns: u64,
    /// cgroup v2 id (the cgroup directory's inode number).
    pub cgroup_id: u64,
    /// exec: `task_struct.start_boottime`, the start time /proc/PID/stat
    /// gives in clock ticks (ns / 10^7); 0 in other records.
    pub start_boottime_ns: u64,
    /// An `EventKind` as u32.
    pub kind: u32,
    pub pid: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub comm: [u8; COMM_LEN],
    pub filename: [u8; FILENAME_LEN],
}

/// Slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Records the ring buffer had no room for.
    pub const RINGBUF_FULL: u32 = 0;
    /// Records written.
    pub const EVENTS_SENT: u32 = 1;
    /// Tracepoint fields that could not be read.
    pub const READ_FAILED: u32 = 2;
    /// Thread creations seen (not forwarded).
    pub const THREADS_SKIPPED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Where the fields of the tracepoints live on the running kernel. The
/// agent reads them from tracefs `format` files and sets this global before
/// load, so one object works across kernels whose layouts differ (6.1 has
/// `char parent_comm[16]`, 6.18 a `__data_loc` string).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TracepointLayout {
    /// sched_process_exec: offset of the `__data_loc` filename word.
    pub exec_filename: u32,
    /// sched_process_fork: offset of `child_pid`.
    pub fork_child_pid: u32,
    /// task_newtask: offset of `pid` and of `clone_flags`.
    pub newtask_pid: u32,
    pub newtask_clone_flags: u32,
    /// Byte offset of `start_boottime` in `struct task_struct`, from the
    /// kernel's BTF; 0: unknown, not read.
    pub task_start_boottime: u32,
}

/// Run-queue latency buckets: bucket i counts waits in [2^i, 2^(i+1)) µs
/// (bucket 0 also takes waits under 1 µs; the last one everything longer).
pub const RUNQ_BUCKETS: usize = 26;
/// Class slots in the telemetry maps: slot 0 is "not a managed class",
/// the agent numbers its class groups from 1.
pub const CLASS_SLOTS: u32 = 16;

/// Scheduling facts per class slot, summed by the agent over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ClassStats {
    /// Time tasks of the class spent on a CPU.
    pub oncpu_ns: u64,
    /// Wake-up (or preemption) to on-CPU waits seen, and their sum.
    pub runq_count: u64,
    pub runq_sum_ns: u64,
    pub runq_hist: [u64; RUNQ_BUCKETS],
}

/// Field offsets of the scheduler tracepoints used for telemetry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SchedLayout {
    pub switch_prev_pid: u32,
    pub switch_prev_state: u32,
    pub switch_next_pid: u32,
    /// sched_wakeup and sched_wakeup_new: offset of `pid`.
    pub wakeup_pid: u32,
}

/// `CLONE_THREAD` from linux/sched.h.
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// `bpf_ringbuf_submit` flags (linux/bpf.h): leave the reader asleep, or
/// always wake it. The agent picks one for exec and fork records at load.
pub const BPF_RB_NO_WAKEUP: u64 = 1;
pub const BPF_RB_FORCE_WAKEUP: u64 = 2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are repr(C), made only of integers and byte arrays,
    // with no padding (checked by the size assertions below).
    unsafe impl aya::Pod for super::ProcEvent {}
    unsafe impl aya::Pod for super::TracepointLayout {}
    unsafe impl aya::Pod for super::ClassStats {}
    unsafe impl aya::Pod for super::SchedLayout {}
    const _: () =
        assert!(core::mem::size_of::<super::ClassStats>() == 8 * (3 + super::RUNQ_BUCKETS));
    const _: () = assert!(core::mem::size_of::<super::SchedLayout>() == 16);
    const _: () = assert!(core::mem::size_of::<super::ProcEvent>() == 8 + 8 + 8 + 16 + 16 + 256);
    const _: () = assert!(core::mem::size_of::<super::TracepointLayout>() == 20);
}
