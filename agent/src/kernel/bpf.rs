//! Loads the eBPF programs, attaches them to the process tracepoints, and
//! reads their ring buffer and counters. Nothing here decides what to do
//! with a process; the one thing it settles itself is that scheduling
//! telemetry is optional: a kernel without the sched tracepoints turns it
//! off with one warning, and process tracing goes on.

use std::{fmt::Display, path::Path};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use corral_common::{
    CLASS_SLOTS, ClassStats, ProcEvent, RUNQ_BUCKETS, SchedLayout, TracepointLayout, counter,
};
use tracing::{info, warn};

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
/// wants telemetry, so switched off they cost nothing. Optional: see
/// [`Telemetry`].
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
    telemetry: Telemetry<TracePointLinkId>,
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

/// What wakes the loop when an exec or fork record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The proc connector ([`super::doorbell`]); the records wake nobody.
    Doorbell,
    /// The ring buffer: each such record forces a wake-up.
    Ring,
}

impl Wake {
    /// `bpf_ringbuf_submit` flags for exec and fork records.
    fn submit_flags(self) -> u64 {
        match self {
            Wake::Doorbell => corral_common::BPF_RB_NO_WAKEUP,
            Wake::Ring => corral_common::BPF_RB_FORCE_WAKEUP,
        }
    }
}

impl Tracer {
    /// Loads everything and attaches the process programs. `ring_bytes`
    /// must be a power of two multiple of the page size. Returns the ring
    /// buffer of process events separately, for the event loop to poll.
    /// `woken_by` says whether exec and fork records wake the ring's reader.
    pub fn load(ring_bytes: u32, woken_by: Wake) -> anyhow::Result<(Self, RingBuf<MapData>)> {
        ensure_tracefs()?;
        let tracefs = Path::new(TRACEFS);
        let mut layout = layout_from_tracefs(tracefs)?;
        // Without it exec records carry no start time and the agent reads
        // /proc/PID/stat for it, as before.
        match super::btf::task_start_boottime_offset(Path::new(super::btf::VMLINUX_BTF)) {
            Ok(offset) => layout.task_start_boottime = offset,
            Err(e) => info!("exec records without start times ({e:#}): read from /proc"),
        }
        let mut telemetry = Telemetry::default();
        let sched_layout = telemetry_layout(tracefs).unwrap_or_else(|reason| {
            // The telemetry programs are then neither loaded nor attached,
            // so any layout does.
            telemetry.turn_off(reason);
            SchedLayout::default()
        });
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &layout, true)
            .override_global("SCHED_LAYOUT", &sched_layout, true)
            .override_global("EXEC_WAKE", &woken_by.submit_flags(), true)
            .map_max_entries("EVENTS", ring_bytes)
            .load(OBJECT)
            .context("loading the eBPF object (are you root, with BPF enabled in the kernel?)")?;
        for (category, name) in TRACEPOINTS {
            let program = tracepoint(&mut ebpf, name)?;
            program.load().with_context(|| format!("loading {name}"))?;
            program
                .attach(category, name)
                .with_context(|| format!("attaching to tracepoint {category}/{name}"))?;
        }
        let events = RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?)?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?)?;
        let class_of = BpfHashMap::try_from(take_map(&mut ebpf, "CLASS_OF")?)?;
        let class_stats = PerCpuArray::try_from(take_map(&mut ebpf, "CLASS_STATS")?)?;
        if telemetry.off_reason().is_none() {
            for (_, name) in TELEMETRY {
                if let Err(e) = tracepoint(&mut ebpf, name)?.load() {
                    telemetry.turn_off(format!(
                        "the kernel refused the telemetry program {name} ({e}); {TELEMETRY_OFF}"
                    ));
                    break;
                }
            }
        }
        if let Some(reason) = telemetry.off_reason() {
            warn!("{reason}");
        }
        let tracer = Tracer {
            ebpf,
            counters,
            class_of,
            class_stats,
            telemetry,
        };
        Ok((tracer, events))
    }

    /// Attaches or detaches the scheduling telemetry programs. Where this
    /// kernel cannot run them, telemetry stays off: the first failure is
    /// logged once (naming the tracepoint), later calls do nothing, and
    /// [`Tracer::telemetry_off_reason`] says why. An error here is only a
    /// failure to detach.
    pub fn set_telemetry(&mut self, on: bool) -> anyhow::Result<()> {
        let warning = self.telemetry.set(
            on,
            TELEMETRY,
            Path::new(TRACEFS),
            &mut self.ebpf,
            |ebpf, category, name| -> anyhow::Result<TracePointLinkId> {
                Ok(tracepoint(ebpf, name)?.attach(category, name)?)
            },
            |ebpf, name, link| -> anyhow::Result<()> {
                tracepoint(ebpf, name)?
                    .detach(link)
                    .with_context(|| format!("detaching {name}"))
            },
        )?;
        if let Some(warning) = warning {
            warn!("{warning}");
        }
        Ok(())
    }

    pub fn telemetry_on(&self) -> bool {
        self.telemetry.is_on()
    }

    /// Why scheduling telemetry cannot run on this kernel (which tracepoint
    /// is missing, or what refused it); `None` when it can, whether the
    /// policy has it on or not.
    pub fn telemetry_off_reason(&self) -> Option<&str> {
        self.telemetry.off_reason()
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
                        || self.telemetry.is_attached(name),
                    run_count: field("run_cnt:"),
                    run_time_ns: field("run_time_ns:"),
                })
            })
            .collect()
    }
}

/// One of the loaded programs, as a tracepoint program.
/// A map of the object, by name.
fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("{name} map missing from the eBPF object"))
}

fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut TracePoint> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()?)
}

/// What every "telemetry is off" warning ends with.
const TELEMETRY_OFF: &str = "scheduling telemetry (run-queue latency, on-CPU time) is off; \
     exec, fork and exit tracing and placement keep working";

/// The scheduling telemetry programs' links, or why this kernel cannot run
/// them. All or nothing: a run-queue wait is only measured right with the
/// wakeup and the switch that ends it, so one tracepoint failing detaches
/// the others. Generic over the link (and what attaches it) so the
/// decisions can be tested without a kernel.
#[derive(Debug)]
struct Telemetry<L> {
    links: Vec<(&'static str, L)>,
    /// Set once it turned out impossible; then it is never tried again.
    off: Option<String>,
}

impl<L> Default for Telemetry<L> {
    fn default() -> Self {
        Telemetry {
            links: Vec::new(),
            off: None,
        }
    }
}

impl<L> Telemetry<L> {
    fn is_on(&self) -> bool {
        !self.links.is_empty()
    }

    fn is_attached(&self, name: &str) -> bool {
        self.links.iter().any(|(n, _)| *n == name)
    }

    fn off_reason(&self) -> Option<&str> {
        self.off.as_deref()
    }

    fn turn_off(&mut self, reason: String) {
        self.off.get_or_insert(reason);
    }

    /// Attaches (`on`) or detaches every program of `points`, in order,
    /// through `attach` and `detach` (which get `ctx`). If attaching one
    /// fails, the ones attached before it are detached again, telemetry is
    /// off for good, and the warning to log is returned: only that once.
    /// Errors are failures to detach.
    fn set<C, E: Display, D>(
        &mut self,
        on: bool,
        points: &[(&'static str, &'static str)],
        tracefs: &Path,
        ctx: &mut C,
        mut attach: impl FnMut(&mut C, &'static str, &'static str) -> Result<L, E>,
        mut detach: impl FnMut(&mut C, &'static str, L) -> Result<(), D>,
    ) -> Result<Option<String>, D> {
        if !on {
            for (name, link) in self.links.drain(..) {
                detach(ctx, name, link)?;
            }
            return Ok(None);
        }
        if self.is_on() || self.off.is_some() {
            return Ok(None);
        }
        for &(category, name) in points {
            match attach(ctx, category, name) {
                Ok(link) => self.links.push((name, link)),
                Err(e) => {
                    for (name, link) in self.links.drain(..) {
                        // Best effort: the links go with the programs anyway.
                        let _ = detach(ctx, name, link);
                    }
                    let reason = telemetry_off_reason(
                        tracefs,
                        &[(category, name)],
                        &format!("attaching to tracepoint {category}/{name} failed: {e:#}"),
                    );
                    self.off = Some(reason.clone());
                    return Ok(Some(reason));
                }
            }
        }
        Ok(None)
    }
}

/// The telemetry programs' field offsets, or why telemetry is off when
/// this kernel does not describe their tracepoints.
fn telemetry_layout(tracefs: &Path) -> Result<SchedLayout, String> {
    sched_layout_from_tracefs(tracefs)
        .map_err(|e| telemetry_off_reason(tracefs, TELEMETRY, &format!("{e:#}")))
}

/// Why telemetry is off: the first of `points` this kernel does not have
/// (no `events/CATEGORY/NAME` under `tracefs`), else `error`.
fn telemetry_off_reason(tracefs: &Path, points: &[(&str, &str)], error: &str) -> String {
    match points
        .iter()
        .find(|(category, name)| !tracefs.join("events").join(category).join(name).exists())
    {
        Some((category, name)) => format!(
            "this kernel has no tracepoint {category}/{name} ({} is missing); {TELEMETRY_OFF}",
            tracefs.join("events").join(category).join(name).display()
        ),
        None => format!("{error}; {TELEMETRY_OFF}"),
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
        task_start_boottime: 0,
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

    /// A tracefs with only the given sched events, each with a format file
    /// whose fields sit at made-up offsets.
    fn fake_tracefs(name: &str, events: &[&str]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("corral-bpf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for event in events {
            let dir = root.join("events/sched").join(event);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("format"),
                "\tfield:pid_t prev_pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:16;\tsize:8;\tsigned:1;
\tfield:pid_t next_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
",
            )
            .unwrap();
        }
        root
    }

    /// What the fake attach/detach did, in order.
    type Calls = Vec<String>;

    fn attach_unless(
        missing: &'static str,
    ) -> impl FnMut(&mut Calls, &'static str, &'static str) -> Result<&'static str, String> {
        move |calls, category, name| {
            calls.push(format!("attach {category}/{name}"));
            if name == missing {
                Err(format!("`{name}` not found (os error 2)"))
            } else {
                Ok(name)
            }
        }
    }

    /// The calls of attaching every telemetry tracepoint, in order.
    const ATTACHED_ALL: [&str; 3] = [
        "attach sched/sched_wakeup",
        "attach sched/sched_wakeup_new",
        "attach sched/sched_switch",
    ];

    fn detach(calls: &mut Calls, name: &'static str, link: &'static str) -> Result<(), String> {
        assert_eq!(name, link);
        calls.push(format!("detach {name}"));
        Ok(())
    }

    impl Telemetry<&'static str> {
        /// `set` with the fake attach (failing for `missing`) and detach.
        fn switch(
            &mut self,
            on: bool,
            tracefs: &Path,
            calls: &mut Calls,
            missing: &'static str,
        ) -> Result<Option<String>, String> {
            self.set(
                on,
                TELEMETRY,
                tracefs,
                calls,
                attach_unless(missing),
                detach,
            )
        }
    }

    #[test]
    fn telemetry_attaches_all_and_detaches_all() {
        let tracefs = fake_tracefs("all", &["sched_wakeup", "sched_wakeup_new", "sched_switch"]);
        let mut telemetry = Telemetry::default();
        let mut calls = Calls::new();
        let warning = telemetry
            .switch(true, &tracefs, &mut calls, "none")
            .unwrap();
        assert_eq!(warning, None);
        assert!(telemetry.is_on() && telemetry.is_attached("sched_switch"));
        // Already on: nothing is attached twice.
        telemetry
            .switch(true, &tracefs, &mut calls, "none")
            .unwrap();
        telemetry
            .switch(false, &tracefs, &mut calls, "none")
            .unwrap();
        assert!(!telemetry.is_on());
        assert_eq!(telemetry.off_reason(), None);
        let detached = [
            "detach sched_wakeup",
            "detach sched_wakeup_new",
            "detach sched_switch",
        ];
        assert_eq!(calls, [ATTACHED_ALL.as_slice(), &detached].concat());
        let _ = std::fs::remove_dir_all(&tracefs);
    }

    /// Regression: a kernel without sched_switch stopped the whole agent
    /// instead of turning telemetry off.
    #[test]
    fn kernel_without_sched_switch_turns_telemetry_off_with_one_warning_naming_it() {
        let tracefs = fake_tracefs("no-switch", &["sched_wakeup", "sched_wakeup_new"]);

        // At load: the layout cannot be read, and the reason names the
        // tracepoint, not just the file that could not be read.
        let reason = telemetry_layout(&tracefs).unwrap_err();
        assert!(
            reason.starts_with("this kernel has no tracepoint sched/sched_switch ("),
            "{reason}"
        );
        assert!(
            reason.ends_with("exec, fork and exit tracing and placement keep working"),
            "{reason}"
        );

        // At attach: the ones attached before it are detached again, the
        // warning comes once, and later tries do nothing.
        let mut telemetry = Telemetry::default();
        let mut calls = Calls::new();
        let warning = telemetry
            .switch(true, &tracefs, &mut calls, "sched_switch")
            .unwrap()
            .expect("a warning the first time");
        assert!(
            warning.contains("no tracepoint sched/sched_switch"),
            "{warning}"
        );
        assert!(!telemetry.is_on());
        assert_eq!(telemetry.off_reason(), Some(warning.as_str()));
        // sched_switch failed, so only the two before it are detached.
        let detached = ["detach sched_wakeup", "detach sched_wakeup_new"];
        assert_eq!(calls, [ATTACHED_ALL.as_slice(), &detached].concat());
        for on in [true, false, true] {
            let again = telemetry
                .switch(on, &tracefs, &mut calls, "sched_switch")
                .unwrap();
            assert_eq!(again, None);
        }
        assert_eq!(calls.len(), 5, "tried again: {calls:?}");
        assert_eq!(telemetry.off_reason(), Some(warning.as_str()));
        let _ = std::fs::remove_dir_all(&tracefs);
    }

    #[test]
    fn attach_failure_with_the_tracepoint_present_says_what_failed() {
        let tracefs = fake_tracefs(
            "refused",
            &["sched_wakeup", "sched_wakeup_new", "sched_switch"],
        );
        let mut telemetry = Telemetry::default();
        let warning = telemetry
            .switch(true, &tracefs, &mut Calls::new(), "sched_wakeup_new")
            .unwrap()
            .unwrap();
        assert!(
            warning.starts_with("attaching to tracepoint sched/sched_wakeup_new failed: `sched_wakeup_new` not found"),
            "{warning}"
        );
        assert!(telemetry_layout(&tracefs).is_ok());
        let _ = std::fs::remove_dir_all(&tracefs);
    }

    #[test]
    fn finds_fields_in_both_kernel_layouts() {
        assert_eq!(field_offset(FORK_6_1, "child_pid"), Some(44));
        assert_eq!(field_offset(FORK_6_1, "parent_comm"), Some(8));
        assert_eq!(field_offset(FORK_6_18, "child_pid"), Some(20));
        assert_eq!(field_offset(FORK_6_18, "child_comm"), Some(16));
        assert_eq!(field_offset(FORK_6_18, "pid"), None);
    }
}
