//! corral's kernel side: records process exec, fork and exit facts into one
//! ring buffer, and (in `sched`) per-class scheduling statistics. No policy
//! and no string matching here; the agent decides.
#![no_std]
#![no_main]

mod sched;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use corral_common::{
    BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, CLONE_THREAD, EventKind, ProcEvent, TracepointLayout,
    counter,
};

/// Process records, read by the agent. Its size is set by the agent at load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU counters, indexed by `corral_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Task pid -> clone flags, from task_newtask, read by the fork program to
/// tell threads from processes.
#[map]
static CLONE_FLAGS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(8192, 0);

/// Field offsets on this kernel, set by the agent from tracefs.
#[unsafe(no_mangle)]
static LAYOUT: TracepointLayout = TracepointLayout {
    exec_filename: 8,
    fork_child_pid: 20,
    newtask_pid: 8,
    newtask_clone_flags: 32,
    task_start_boottime: 0,
};

fn layout() -> TracepointLayout {
    // SAFETY: a read of a global the loader may have rewritten; volatile so
    // the compiler does not fold in the default above.
    unsafe { core::ptr::read_volatile(&LAYOUT) }
}

fn bump(slot: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *count += 1 };
    }
}

/// How exec and fork records are submitted, set by the agent at load:
/// `BPF_RB_NO_WAKEUP` when the kernel's proc connector wakes it (it rings
/// right after this tracepoint, in the same task), else
/// `BPF_RB_FORCE_WAKEUP`.
#[unsafe(no_mangle)]
static EXEC_WAKE: u64 = BPF_RB_FORCE_WAKEUP;

/// Reserve a record and fill the fields every kind shares. Counts a full
/// ring buffer instead of losing the record silently.
///
/// Exec and fork records must wake the agent; exit records need not. A
/// wake-up from here is an interrupt the traced process pays for (about
/// 19 us of a 20 us program in a VM, measured with kernel.bpf_stats_enabled:
/// the ring's wake-up is deferred to irq_work, a self-IPI). So where the
/// proc connector is there, the agent listens on it for execs and process
/// forks and these records wake nobody (`EXEC_WAKE`). Otherwise they are
/// forced: the kernel's default wakes only a reader that has caught up, and
/// a waiting exit record means it has not. A fork's wake-up is paid for
/// latency: it starts the agent before the child's exec, which is then read
/// in the same pass (at 100 exec/s it took p99 exec -> placement from
/// 1.35 ms to 0.29 ms). Exit records wait in the ring for the next wake-up
/// or for the agent's once-a-second drain.
fn emit(kind: EventKind, pid: u32, tgid: u32, ppid: u32, fill: impl FnOnce(&mut ProcEvent)) {
    let wake = match kind {
        // SAFETY: a read of a global the loader may have rewritten.
        EventKind::Exec | EventKind::Fork => unsafe { core::ptr::read_volatile(&EXEC_WAKE) },
        EventKind::Exit => BPF_RB_NO_WAKEUP,
    };
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        bump(counter::RINGBUF_FULL);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, writable ProcEvent-sized slot.
    unsafe {
        (*event).ktime_ns = bpf_ktime_get_ns();
        (*event).cgroup_id = bpf_get_current_cgroup_id();
        (*event).start_boottime_ns = 0;
        (*event).kind = kind as u32;
        (*event).pid = pid;
        (*event).tgid = tgid;
        (*event).ppid = ppid;
        (*event).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*event).filename[0] = 0;
        fill(&mut *event);
    }
    entry.submit(wake);
    bump(counter::EVENTS_SENT);
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    if try_exec(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

fn try_exec(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let pid = pid_tgid as u32;
    // SAFETY: offsets come from the running kernel's tracefs format file.
    let layout = layout();
    let data_loc: u32 = unsafe { ctx.read_at(layout.exec_filename as usize)? };
    let offset = (data_loc & 0xffff) as usize;
    let mut read_failed = false;
    // The parent at fork came in the fork record.
    emit(EventKind::Exec, pid, tgid, 0, |event| {
        // SAFETY: `offset` lies within the tracepoint record.
        let src = unsafe { ctx.as_ptr().add(offset) } as *const u8;
        if unsafe { bpf_probe_read_kernel_str_bytes(src, &mut event.filename) }.is_err() {
            read_failed = true;
        }
        // The start time, so the agent need not read /proc/PID/stat for it.
        // After exec the caller is the thread group's leader (de_thread
        // gave it the leader's start time), as /proc/PID reports.
        if layout.task_start_boottime != 0 {
            // SAFETY: a probe read (fault-safe) at the offset the kernel's
            // BTF gives for task_struct.start_boottime.
            let field = unsafe { bpf_get_current_task() }
                .wrapping_add(u64::from(layout.task_start_boottime))
                as *const u64;
            event.start_boottime_ns = unsafe { bpf_probe_read_kernel(field) }.unwrap_or(0);
        }
    });
    if read_failed { Err(-1) } else { Ok(()) }
}

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    if try_newtask(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

fn try_newtask(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = layout();
    // SAFETY: offsets come from the running kernel's tracefs format file.
    let pid: i32 = unsafe { ctx.read_at(layout.newtask_pid as usize)? };
    let flags: u64 = unsafe { ctx.read_at(layout.newtask_clone_flags as usize)? };
    CLONE_FLAGS.insert(pid as u32, flags, 0)
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    if try_fork(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

fn try_fork(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets come from the running kernel's tracefs format file.
    let child: i32 = unsafe { ctx.read_at(layout().fork_child_pid as usize)? };
    let child = child as u32;
    // SAFETY: a lookup in our own map.
    let flags = unsafe { CLONE_FLAGS.get(child) }.copied().unwrap_or(0);
    let _ = CLONE_FLAGS.remove(child);
    if flags & CLONE_THREAD != 0 {
        bump(counter::THREADS_SKIPPED);
        return Ok(());
    }
    let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    emit(EventKind::Fork, child, child, parent_tgid, |_| {});
    Ok(())
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    sched::forget_task(pid);
    // Only the group leader's exit ends a process for the agent.
    if tgid == pid {
        emit(EventKind::Exit, pid, tgid, 0, |_| {});
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
