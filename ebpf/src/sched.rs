//! Scheduling telemetry: per class slot, on-CPU time and how long tasks
//! wait between being made runnable and getting a CPU (a log2 histogram).
//! Aggregated in per-CPU maps; nothing goes through the ring buffer. The
//! agent tells the kernel which cgroups are its classes (`CLASS_OF`).

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};
use corral_common::{CLASS_SLOTS, ClassStats, RUNQ_BUCKETS, SchedLayout};

/// cgroup id -> class slot, written by the agent.
#[map]
static CLASS_OF: HashMap<u64, u32> = HashMap::with_max_entries(CLASS_SLOTS, 0);

/// Per class slot statistics.
#[map]
static CLASS_STATS: PerCpuArray<ClassStats> = PerCpuArray::with_max_entries(CLASS_SLOTS, 0);

/// pid -> cgroup id a task of a class had when it last left a CPU.
#[map]
static TASK_CGROUP: LruHashMap<u32, u64> = LruHashMap::with_max_entries(32768, 0);

/// pid -> when it became runnable.
#[map]
static RUNNABLE_SINCE: LruHashMap<u32, u64> = LruHashMap::with_max_entries(32768, 0);

/// When the task now on this CPU got it.
#[map]
static ON_CPU_SINCE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static SCHED_LAYOUT: SchedLayout = SchedLayout {
    switch_prev_pid: 24,
    switch_prev_state: 32,
    switch_next_pid: 56,
    wakeup_pid: 24,
};

fn layout() -> SchedLayout {
    // SAFETY: volatile read of a global the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&SCHED_LAYOUT) }
}

fn slot_of(cgroup: u64) -> u32 {
    // SAFETY: a lookup in our own map.
    unsafe { CLASS_OF.get(cgroup) }.copied().unwrap_or(0)
}

/// floor(log2(us)), capped to the last bucket.
fn bucket(delta_ns: u64) -> usize {
    let mut us = delta_ns / 1000;
    let mut log = 0usize;
    let mut shift = 32u32;
    while shift > 0 {
        if us >= (1u64 << shift) {
            us >>= shift;
            log += shift as usize;
        }
        shift /= 2;
    }
    if log >= RUNQ_BUCKETS {
        RUNQ_BUCKETS - 1
    } else {
        log
    }
}

fn stats(slot: u32) -> Option<*mut ClassStats> {
    CLASS_STATS.get_ptr_mut(slot)
}

/// Forgets an exiting task, so the maps hold live tasks only and never
/// need to evict (LRU eviction under the scheduler's locks is costly).
pub fn forget_task(pid: u32) {
    // Only tasks of the classes are in these maps, and a lookup is
    // lock-free where a delete is not: delete only what is there.
    // SAFETY: lookups in our own maps.
    if unsafe { TASK_CGROUP.get(pid) }.is_some() {
        let _ = TASK_CGROUP.remove(pid);
    }
    if unsafe { RUNNABLE_SINCE.get(pid) }.is_some() {
        let _ = RUNNABLE_SINCE.remove(pid);
    }
}

#[tracepoint]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    mark_runnable(&ctx);
    0
}

#[tracepoint]
pub fn sched_wakeup_new(ctx: TracePointContext) -> u32 {
    mark_runnable(&ctx);
    0
}

/// Notes when a task of a managed class became runnable. Tasks outside
/// the classes (most of the machine) cost one lookup and nothing else.
fn mark_runnable(ctx: &TracePointContext) {
    // SAFETY: offset from the running kernel's tracefs format file.
    let Ok(pid) = (unsafe { ctx.read_at::<i32>(layout().wakeup_pid as usize) }) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: a lookup in our own map.
    let cgroup = unsafe { TASK_CGROUP.get(pid as u32) }.copied().unwrap_or(0);
    if slot_of(cgroup) != 0 {
        let _ = RUNNABLE_SINCE.insert(pid as u32, unsafe { bpf_ktime_get_ns() }, 0);
    }
}

#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let _ = try_switch(&ctx);
    0
}

fn try_switch(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = layout();
    // SAFETY: offsets from the running kernel's tracefs format file.
    let prev: i32 = unsafe { ctx.read_at(layout.switch_prev_pid as usize)? };
    let prev_state: i64 = unsafe { ctx.read_at(layout.switch_prev_state as usize)? };
    let next: i32 = unsafe { ctx.read_at(layout.switch_next_pid as usize)? };
    let now = unsafe { bpf_ktime_get_ns() };

    // The outgoing task is still `current`: its cgroup is exact.
    let since = ON_CPU_SINCE.get_ptr_mut(0).ok_or(-1)?;
    if prev > 0 {
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        let slot = slot_of(cgroup);
        // SAFETY: per-CPU slots, only this CPU touches them now.
        unsafe {
            if *since != 0
                && let Some(s) = stats(slot)
            {
                (*s).oncpu_ns += now.saturating_sub(*since);
            }
        }
        // Only tasks of the classes are kept (the rest of the machine costs
        // a lookup here and nothing at its exit). Map updates cost more
        // than lookups: write only what changed.
        // SAFETY: a lookup in our own map.
        let known = unsafe { TASK_CGROUP.get(prev as u32) }.copied();
        if slot != 0 && known != Some(cgroup) {
            let _ = TASK_CGROUP.insert(prev as u32, cgroup, 0);
        } else if slot == 0 && known.is_some() {
            let _ = TASK_CGROUP.remove(prev as u32);
        }
        // Preempted or yielding (no sleep state bits): it waits again.
        if slot != 0 && prev_state & 0x7f == 0 {
            let _ = RUNNABLE_SINCE.insert(prev as u32, now, 0);
        }
    }
    unsafe { *since = now };

    if next > 0 {
        let next = next as u32;
        // SAFETY: lookups in our own maps.
        if let Some(&queued) = unsafe { RUNNABLE_SINCE.get(next) } {
            let _ = RUNNABLE_SINCE.remove(next);
            let cgroup = unsafe { TASK_CGROUP.get(next) }.copied().unwrap_or(0);
            if let Some(s) = stats(slot_of(cgroup)) {
                let wait = now.saturating_sub(queued);
                let b = bucket(wait);
                // SAFETY: per-CPU slot; `b` < RUNQ_BUCKETS.
                unsafe {
                    (*s).runq_count += 1;
                    (*s).runq_sum_ns += wait;
                    if b < RUNQ_BUCKETS {
                        (*s).runq_hist[b] += 1;
                    }
                }
            }
        }
    }
    Ok(())
}
