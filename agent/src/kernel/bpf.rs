//! Loads the eBPF programs, attaches them to the process tracepoints, and
//! reads their ring buffer and counters. Nothing here decides anything.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use corral_common::{
    CLASS_SLOTS, ClassStats, ProcEvent, RUNQ_BUCKETS, SchedLayout, TracepointLayout, counter,
};

/// The object built from `ebpf/` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/corral"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// The tracepoints corral attaches, as (category, name).
const TRACEPOINTS: &[(&str, &str)] = &[
    ("sched", "sched_process_exec"),
    ("task", "task_newtask"),
    ("sched", "sched_process_fork"),
    ("sched", "sched_process_exit"),
];

/// The scheduling telemetry programs; attached only while the policy
/// wants telemetry, so switched off they cost nothing.
const TELEMETRY: &[(&str, &str)] = &[
    ("sched", "sched_wakeup"),
    ("sched", "sched_wakeup_new"),
    ("sched", "sched_switch"),
];

/// Loaded, attached programs and the maps the agent reads.
pub struct Tracer {
    /// Owns the programs and their links; dropping it detaches them.
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    class_of: BpfHashMap<MapData, u64, u32>,
    class_stats: PerCpuArray<MapData, ClassStats>,
    telemetry: Vec<(&'static str, TracePointLinkId)>,
}

/// One program's cost, from the kernel's BPF statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProgramStats {
    pub name: String,
    pub attached: bool,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// One class slot's scheduling statistics, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SchedStats {
    pub oncpu_ns: u64,
    pub runq_count: u64,
    pub runq_sum_ns: u64,
    /// Bucket i: waits in [2^i, 2^(i+1)) µs.
    pub runq_hist: Vec<u64>,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct KernelCounters {
    /// Records the ring buffer had no room for.
    pub dropped: u64,
    pub sent: u64,
    pub read_failed: u64,
    pub threads_skipped: u64,
}

impl Tracer {
    /// Loads everything and attaches the process programs. `ring_bytes`
    /// must be a power of two multiple of the page size. Returns the ring
    /// buffer of process events separately, for the event loop to poll.
    pub fn load(ring_bytes: u32) -> anyhow::Result<(Self, RingBuf<MapData>)> {
        ensure_tracefs()?;
        let layout = layout_from_tracefs(Path::new(TRACEFS))?;
        let sched_layout = sched_layout_from_tracefs(Path::new(TRACEFS))?;
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &layout, true)
            .override_global("SCHED_LAYOUT", &sched_layout, true)
            .map_max_entries("EVENTS", ring_bytes)
            .load(OBJECT)
            .context("loading the eBPF object (are you root, with BPF enabled in the kernel?)")?;
        for (category, name) in TRACEPOINTS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
            program
                .attach(category, name)
                .with_context(|| format!("attaching to tracepoint {category}/{name}"))?;
        }
        let events = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or_else(|| anyhow!("EVENTS map missing"))?,
        )?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .ok_or_else(|| anyhow!("COUNTERS map missing"))?,
        )?;
        let class_of = BpfHashMap::try_from(
            ebpf.take_map("CLASS_OF")
                .ok_or_else(|| anyhow!("CLASS_OF map missing"))?,
        )?;
        let class_stats = PerCpuArray::try_from(
            ebpf.take_map("CLASS_STATS")
                .ok_or_else(|| anyhow!("CLASS_STATS map missing"))?,
        )?;
        for (_, name) in TELEMETRY {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        let tracer = Tracer {
            ebpf,
            counters,
            class_of,
            class_stats,
            telemetry: Vec::new(),
        };
        Ok((tracer, events))
    }

    /// Attaches or detaches the scheduling telemetry programs.
    pub fn set_telemetry(&mut self, on: bool) -> anyhow::Result<()> {
        if on != self.telemetry.is_empty() {
            return Ok(());
        }
        if on {
            for (category, name) in TELEMETRY {
                let program: &mut TracePoint = self
                    .ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("program {name} missing"))?
                    .try_into()?;
                let link = program
                    .attach(category, name)
                    .with_context(|| format!("attaching to tracepoint {category}/{name}"))?;
                self.telemetry.push((name, link));
            }
        } else {
            for (name, link) in self.telemetry.drain(..) {
                let program: &mut TracePoint = self
                    .ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("program {name} missing"))?
                    .try_into()?;
                program.detach(link)?;
            }
        }
        Ok(())
    }

    pub fn telemetry_on(&self) -> bool {
        !self.telemetry.is_empty()
    }

    /// Tells the kernel which cgroup ids are which class slot (1..).
    pub fn set_class_cgroups(&mut self, slots: &[(u64, u32)]) -> anyhow::Result<()> {
        let stale: Vec<u64> = self.class_of.keys().filter_map(Result::ok).collect();
        for id in stale {
            let _ = self.class_of.remove(&id);
        }
        for (id, slot) in slots {
            if *slot < CLASS_SLOTS && *id != 0 {
                self.class_of.insert(id, slot, 0)?;
            }
        }
        Ok(())
    }

    /// Scheduling statistics of one class slot, summed over CPUs.
    pub fn sched_stats(&self, slot: u32) -> SchedStats {
        let mut total = SchedStats {
            runq_hist: vec![0; RUNQ_BUCKETS],
            ..Default::default()
        };
        if let Ok(values) = self.class_stats.get(&slot, 0) {
            for v in values.iter() {
                total.oncpu_ns += v.oncpu_ns;
                total.runq_count += v.runq_count;
                total.runq_sum_ns += v.runq_sum_ns;
                for (t, b) in total.runq_hist.iter_mut().zip(v.runq_hist.iter()) {
                    *t += b;
                }
            }
        }
        total
    }

    /// Reads the kernel-side counters.
    pub fn counters(&self) -> KernelCounters {
        let sum = |slot: u32| {
            self.counters
                .get(&slot, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            dropped: sum(counter::RINGBUF_FULL),
            sent: sum(counter::EVENTS_SENT),
            read_failed: sum(counter::READ_FAILED),
            threads_skipped: sum(counter::THREADS_SKIPPED),
        }
    }

    /// Run counts and run time of each program, from the kernel's BPF
    /// statistics (/proc/self/fdinfo of the program). Both stay 0 unless
    /// `kernel.bpf_stats_enabled` is 1.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let fd = program.fd().ok()?.as_fd().as_raw_fd();
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
                let field = |key: &str| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(key))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                Some(ProgramStats {
                    name: name.to_owned(),
                    attached: TRACEPOINTS.iter().any(|(_, n)| *n == name)
                        || self.telemetry.iter().any(|(n, _)| *n == name),
                    run_count: field("run_cnt:"),
                    run_time_ns: field("run_time_ns:"),
                })
            })
            .collect()
    }
}

/// Field offsets of the scheduler tracepoints under `tracefs`.
pub fn sched_layout_from_tracefs(tracefs: &Path) -> anyhow::Result<SchedLayout> {
    let offset = |event: &str, field: &str| -> anyhow::Result<u32> {
        let path = tracefs.join("events/sched").join(event).join("format");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        field_offset(&text, field).ok_or_else(|| anyhow!("{}: no field `{field}`", path.display()))
    };
    let wakeup = offset("sched_wakeup", "pid")?;
    let wakeup_new = offset("sched_wakeup_new", "pid")?;
    if wakeup != wakeup_new {
        return Err(anyhow!(
            "sched_wakeup and sched_wakeup_new place `pid` differently ({wakeup} vs {wakeup_new})"
        ));
    }
    Ok(SchedLayout {
        switch_prev_pid: offset("sched_switch", "prev_pid")?,
        switch_prev_state: offset("sched_switch", "prev_state")?,
        switch_next_pid: offset("sched_switch", "next_pid")?,
        wakeup_pid: wakeup,
    })
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Option<ProcEvent> {
    (bytes.len() >= size_of::<ProcEvent>())
        // SAFETY: length checked; ProcEvent is plain old data.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProcEvent>()) })
}

/// A NUL-terminated byte field as text.
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Mounts tracefs where aya expects it, if it is not mounted yet.
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
        .context("running mount for tracefs")?;
    if !status.success() {
        return Err(anyhow!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed; run `mount -t tracefs nodev {TRACEFS}` as root"
        ));
    }
    Ok(())
}

/// Reads the field offsets the programs need from the tracepoints' format
/// files under `tracefs`.
pub fn layout_from_tracefs(tracefs: &Path) -> anyhow::Result<TracepointLayout> {
    let offset = |category: &str, event: &str, field: &str| -> anyhow::Result<u32> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(event)
            .join("format");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        field_offset(&text, field).ok_or_else(|| anyhow!("{}: no field `{field}`", path.display()))
    };
    Ok(TracepointLayout {
        exec_filename: offset("sched", "sched_process_exec", "filename")?,
        fork_child_pid: offset("sched", "sched_process_fork", "child_pid")?,
        newtask_pid: offset("task", "task_newtask", "pid")?,
        newtask_clone_flags: offset("task", "task_newtask", "clone_flags")?,
    })
}

/// The offset of `field` in a tracefs format description.
fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?.split('[').next()?;
        if name != field {
            return None;
        }
        let offset = line.split("offset:").nth(1)?.split(';').next()?;
        offset.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORK_6_1: &str = "name: sched_process_fork
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;
";
    const FORK_6_18: &str = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    #[test]
    fn finds_fields_in_both_kernel_layouts() {
        assert_eq!(field_offset(FORK_6_1, "child_pid"), Some(44));
        assert_eq!(field_offset(FORK_6_1, "parent_comm"), Some(8));
        assert_eq!(field_offset(FORK_6_18, "child_pid"), Some(20));
        assert_eq!(field_offset(FORK_6_18, "child_comm"), Some(16));
        assert_eq!(field_offset(FORK_6_18, "pid"), None);
    }
}
