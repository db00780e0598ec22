//! The agent: one loop that owns the process table and turns every source
//! (kernel events, the /proc seed, policy reloads, the dynamic-mode timer,
//! control requests, signals) into decisions and moves.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use corral_common::{EventKind, ProcEvent};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, sync::mpsc};
use tracing::{debug, error, info, warn};

use crate::{
    actuate::cgroup as cgroupfs,
    actuate::{
        Placer, Target,
        cgroup::{Groups, MoveError},
    },
    gpu::arbiter::{Action, ActionKind, Arbiter, Observation},
    gpu::askers,
    gpu::nvml::{GpuEvent, GpuSnapshot},
    gpu::thermal::{self, ThermalAction, ThermalGuard},
    kernel::bpf::{self, KernelCounters, SchedStats, Tracer},
    model::ananicy::AnanicyRules,
    model::classify,
    model::cpus::CpuList,
    model::modes::{self, Mode, ModeSwitch},
    model::policy::{Policy, PolicySource},
    model::procs::{LiveProcs, Proc, ProcInfo, ProcRead, ProcSource, ReadError, Table},
    model::topology::{Resolved, Topology},
    observe::metrics::{self, ClassMetrics, GpuMetrics, Histogram, Metrics, ReloadCounts},
    service::control::{
        self, AncestorLine, ClassStatus, EventCounts, Explanation, GpuActionRecord, GpuStatus,
        Peer, Placement, ReloadStatus, Request, Response, Status,
    },
    service::desktop_notify,
};

/// Everything the loop reacts to.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "kernel events are handled at once, never queued; boxing would allocate on the exec path"
)]
pub enum Event {
    /// Read every process from /proc and place what the policy manages
    /// (start-up).
    Seed,
    Kernel(ProcEvent),
    /// The ring buffer was drained: apply what the batch changed.
    KernelBatchDone,
    Control(control::Incoming),
    /// A policy file changed or SIGHUP arrived (`corral reload` comes as a
    /// control request); all three take the same path.
    Reload(ReloadCause),
    /// The dynamic mode's deadline passed.
    ModeTimer,
    /// From the NVML poller thread.
    Gpu(GpuEvent),
    /// The slow /proc sweep timer.
    SweepTick,
    /// Once a second: read the kernel counters (a full sweep when records
    /// were dropped) and refresh the metrics.
    CountersTick,
    /// Time to tell systemd's watchdog the loop is alive.
    WatchdogTick,
    /// SIGTERM or SIGINT.
    Stop,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadCause {
    FileChanged,
    Signal,
    Request,
}

/// What the runner carries out for the loop, after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Tell systemd (sd_notify).
    Notify(Notice),
    /// Re-render the metrics page.
    RenderMetrics,
    /// Leave the loop.
    Exit,
}

/// The sd_notify messages the loop sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready { status: String },
    Reloading,
    Watchdog,
    Stopping,
}

/// How many GPU actions are kept for `corral status` and `explain`.
const GPU_ACTION_LOG: usize = 64;

/// VRAM coordination state: the last poll, the arbiter, the thermal guard.
struct GpuState {
    on: bool,
    /// Why the GPU feature is off (said once).
    off_reason: Option<String>,
    last: Option<GpuSnapshot>,
    arbiter: Arbiter,
    thermal: ThermalGuard,
    /// The thermal guard shrank the background classes' core sets.
    cooling: Option<String>,
    actions: VecDeque<GpuActionRecord>,
    action_counts: BTreeMap<String, u64>,
    /// dmem limits written ("class file bytes").
    dmem_applied: Vec<String>,
}

impl GpuState {
    fn new(policy: &Policy) -> Self {
        GpuState {
            on: false,
            off_reason: (!policy.gpu.enabled)
                .then(|| "off in the policy ([gpu] enabled = false)".to_owned()),
            last: None,
            arbiter: Arbiter::new(policy.gpu.arbiter.clone()),
            thermal: ThermalGuard::new(policy.gpu.thermal.clone()),
            cooling: None,
            actions: VecDeque::new(),
            action_counts: BTreeMap::new(),
            dmem_applied: Vec::new(),
        }
    }
}

/// Classes the thermal guard slows down when it is too hot.
const COOLED_CLASSES: &[&str] = &["render", "ai"];

/// How many placements are kept for `corral placements`.
const PLACEMENT_LOG: usize = 100_000;

/// How long file events are collected before one reload: editors write a
/// file in several steps.
const RELOAD_SETTLE: Duration = Duration::from_millis(20);

pub struct Options {
    pub source: PolicySource,
    pub sysfs_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub socket: PathBuf,
    pub dry_run: bool,
    pub ring_bytes: u32,
    /// How often /proc is swept for processes whose events were missed.
    pub sweep_interval: Duration,
}

/// The state the loop owns.
pub struct Agent {
    source: PolicySource,
    sysfs_root: PathBuf,
    policy: Policy,
    ananicy: Option<AnanicyRules>,
    env_keys: BTreeSet<String>,
    table: Table,
    /// Where placement is carried out (cgroupfs, systemd, a recording).
    placer: Box<dyn Placer>,
    /// Where processes are read from (/proc, or a script in tests).
    procs: Box<dyn ProcSource>,
    modes: ModeSwitch,
    epoch: Instant,
    counts: EventCounts,
    placements_by_class: BTreeMap<String, u64>,
    placements: VecDeque<Placement>,
    kernel: KernelCounters,
    last_reload: Option<ReloadStatus>,
    own_pid: u32,
    /// The kernel side; None in tests that drive the agent without eBPF.
    tracer: Option<Tracer>,
    /// Telemetry slot of each managed class (slot 0: everything else).
    slots: BTreeMap<String, u32>,
    /// Kernel exec timestamp -> cgroup write, for every exec placement.
    placement_latency: Histogram,
    reloads: ReloadCounts,
    /// The metrics endpoint's address once bound.
    metrics_bound: Option<std::net::SocketAddr>,
    gpu: GpuState,
    /// The dropped-records count the last full sweep covered.
    dropped_swept: u64,
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Loads the ananicy-cpp rules when the policy enables them; failures
/// turn the source off with a warning.
pub fn load_ananicy(policy: &Policy) -> Option<AnanicyRules> {
    if !policy.ananicy.enabled {
        return None;
    }
    match AnanicyRules::load(&policy.ananicy.dirs, &policy.ananicy.types) {
        Ok((rules, warnings)) => {
            for w in warnings.iter().take(20) {
                warn!("ananicy rules: {w}");
            }
            info!(rules = rules.len(), "ananicy-cpp rules loaded");
            Some(rules)
        }
        Err(e) => {
            warn!("ananicy-cpp rules not used: {e}");
            None
        }
    }
}

/// Reads the topology and resolves the policy's core sets on it.
pub fn resolve(policy: &Policy, sysfs_root: &Path) -> anyhow::Result<(Vec<Resolved>, CpuList)> {
    let topology = Topology::read(sysfs_root)?;
    let resolved = policy.resolve_cpus(&topology)?;
    Ok((resolved, topology.online().clone()))
}

impl Agent {
    pub fn new(
        source: PolicySource,
        sysfs_root: PathBuf,
        policy: Policy,
        placer: Box<dyn Placer>,
        procs: Box<dyn ProcSource>,
        tracer: Option<Tracer>,
    ) -> Self {
        let env_keys = policy.env_keys();
        let ananicy = load_ananicy(&policy);
        let modes = ModeSwitch::new(policy.modes, Duration::ZERO);
        let gpu = GpuState::new(&policy);
        Agent {
            source,
            sysfs_root,
            policy,
            ananicy,
            env_keys,
            table: Table::default(),
            placer,
            procs,
            modes,
            epoch: Instant::now(),
            counts: EventCounts::default(),
            placements_by_class: BTreeMap::new(),
            placements: VecDeque::new(),
            kernel: KernelCounters::default(),
            last_reload: None,
            own_pid: std::process::id(),
            tracer,
            slots: BTreeMap::new(),
            placement_latency: Histogram::placement_latency(),
            reloads: ReloadCounts::default(),
            metrics_bound: None,
            gpu,
            dropped_swept: 0,
        }
    }

    /// Tracked processes per class.
    fn processes_by_class(&self) -> BTreeMap<&str, u64> {
        self.table
            .counts()
            .iter()
            .map(|(class, n)| (class.as_str(), *n as u64))
            .collect()
    }

    /// The class the dynamic mode and the GPU arbiter protect.
    fn protected(&self) -> &str {
        &self.policy.gpu.arbiter.protected_class
    }

    /// How many processes of the protected class run.
    fn protected_running(&self) -> usize {
        self.table.count(self.protected())
    }

    /// Everything the agent exports, as of now.
    pub fn metrics(&self) -> Metrics {
        let vram = self
            .gpu
            .last
            .as_ref()
            .map(|s| self.vram_by_class(s))
            .unwrap_or_default();
        let processes = self.processes_by_class();
        let classes = self
            .policy
            .classes
            .values()
            .map(|class| {
                let group = self.placer.layout().group(&class.name);
                let sched = self.sched_stats(&class.name);
                let mut m = ClassMetrics {
                    processes: processes.get(class.name.as_str()).copied().unwrap_or(0),
                    cpu_seconds: sched.as_ref().map_or(0.0, |s| s.oncpu_ns as f64 / 1e9),
                    runqueue_latency: sched.as_ref().map_or_else(
                        || Histogram::from_log2_us(&[]),
                        |s| Histogram::from_log2_us(&s.runq_hist),
                    ),
                    placements: self
                        .placements_by_class
                        .get(&class.name)
                        .copied()
                        .unwrap_or(0),
                    cpus: group.map_or(0, |g| g.cpus.len() as u64),
                    ..Default::default()
                };
                if let Some(pressure) =
                    group.and_then(|g| std::fs::read_to_string(g.path.join("cpu.pressure")).ok())
                {
                    m.set_cpu_pressure(&pressure);
                }
                if let Some(snapshot) = &self.gpu.last {
                    m.vram_used_bytes = Some(vram.get(&class.name).copied().unwrap_or(0));
                    let total = snapshot.devices.first().map_or(0, |d| d.total_bytes);
                    m.vram_budget_bytes = self
                        .policy
                        .gpu
                        .arbiter
                        .classes
                        .iter()
                        .find(|b| b.class == class.name)
                        .and_then(|b| b.max.or(b.reserve))
                        .map(|a| a.bytes(total));
                }
                (class.name.clone(), m)
            })
            .collect();
        let (rss, cpu) = metrics::read_self();
        Metrics {
            classes,
            placement_latency: self.placement_latency.clone(),
            events: metrics::EventCounts {
                exec: self.counts.exec,
                fork: self.counts.fork,
                exit: self.counts.exit,
            },
            events_dropped_total: self.kernel.dropped,
            events_vanished_total: self.counts.vanished,
            move_errors_total: self.counts.move_errors,
            policy_reloads: self.reloads,
            gpus: self
                .gpu
                .last
                .as_ref()
                .map(|snapshot| {
                    snapshot
                        .devices
                        .iter()
                        .map(|d| GpuMetrics {
                            index: d.index,
                            name: d.name.clone(),
                            utilization_ratio: d.utilization_gpu.map(|u| f64::from(u) / 100.0),
                            temperature_celsius: d.temperature_c.map(f64::from),
                            power_watts: d.power_mw.map(|mw| f64::from(mw) / 1000.0),
                            memory_used_bytes: Some(d.used_bytes),
                            memory_total_bytes: Some(d.total_bytes),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            agent_resident_memory_bytes: rss,
            agent_cpu_seconds_total: cpu,
            mode: self.modes.mode(),
        }
    }

    /// Attaches or detaches scheduling telemetry as the policy says, and
    /// tells the kernel which cgroups are which class.
    pub fn sync_telemetry(&mut self) {
        self.slots = self
            .placer
            .layout()
            .iter()
            .zip(1..)
            .map(|(g, slot)| (g.class.clone(), slot))
            .collect();
        let Some(tracer) = self.tracer.as_mut() else {
            return;
        };
        let ids: Vec<(u64, u32)> = self
            .placer
            .layout()
            .iter()
            .filter_map(|g| self.slots.get(&g.class).map(|slot| (g.id, *slot)))
            .collect();
        if let Err(e) = tracer.set_class_cgroups(&ids) {
            warn!("telemetry: could not map class cgroups: {e:#}");
        }
        if let Err(e) = tracer.set_telemetry(self.policy.telemetry.enabled) {
            warn!("telemetry is off: {e:#}");
        }
    }

    /// Scheduling statistics of a class, when telemetry is on.
    pub fn sched_stats(&self, class: &str) -> Option<SchedStats> {
        let tracer = self.tracer.as_ref().filter(|t| t.telemetry_on())?;
        Some(tracer.sched_stats(*self.slots.get(class)?))
    }

    /// Reads the kernel counters.
    pub fn read_kernel_counters(&mut self) {
        if let Some(tracer) = &self.tracer {
            self.kernel = tracer.counters();
        }
    }

    /// Whether records were dropped since the last full sweep (then one is
    /// due); remembers that it said so.
    fn dropped_since_sweep(&mut self) -> bool {
        if self.kernel.dropped > self.dropped_swept {
            warn!(
                dropped = self.kernel.dropped - self.dropped_swept,
                "the kernel dropped process events (ring buffer full); sweeping /proc"
            );
            self.dropped_swept = self.kernel.dropped;
            return true;
        }
        false
    }

    /// Reads every process from /proc, classifies parents before children
    /// and places what the policy manages. A process already in its class's
    /// group (an agent restart) is adopted, not moved.
    fn seed(&mut self) {
        self.table = Table::read_all(self.procs.as_ref(), &self.env_keys);
        for pid in self.table.parents_first() {
            self.decide(pid);
            self.adopt_if_placed(pid);
            self.place(pid, None);
        }
        self.update_mode();
        info!(
            processes = self.table.len(),
            "process table seeded from /proc"
        );
    }

    fn adopt_if_placed(&mut self, pid: u32) {
        let Some(p) = self.table.get(pid) else { return };
        if self.placer.holds_cgroup(&p.decision.class, &p.info.cgroup) {
            let class = p.decision.class.clone();
            if let Some(p) = self.table.get_mut(pid) {
                p.placed_class = Some(class);
            }
        }
    }

    /// Decides what one event changes. Placement is carried out through the
    /// placer at once (the exec path cannot wait); everything else the
    /// runner must do comes back as effects.
    pub fn handle(&mut self, event: Event) -> Vec<Effect> {
        match event {
            Event::Seed => {
                self.seed();
                self.sync_telemetry();
                self.apply_dmem();
                vec![
                    Effect::Notify(Notice::Ready {
                        status: self.one_line_status(),
                    }),
                    Effect::Notify(Notice::Watchdog),
                    Effect::RenderMetrics,
                ]
            }
            Event::Kernel(e) => {
                match EventKind::from_u32(e.kind) {
                    Some(EventKind::Exec) => self.on_exec(&e),
                    Some(EventKind::Fork) => self.on_fork(&e),
                    Some(EventKind::Exit) => self.on_exit(&e),
                    None => warn!(kind = e.kind, "unknown event kind from the kernel"),
                }
                Vec::new()
            }
            Event::KernelBatchDone | Event::ModeTimer => {
                self.update_mode();
                Vec::new()
            }
            Event::Control((request, peer, reply)) => {
                let mut effects = Vec::new();
                let response = match self.refusal(&request, peer) {
                    Some(message) => {
                        warn!(?request, uid = ?peer.uid, "refused: {message}");
                        Response::Error { message }
                    }
                    None => match request {
                        Request::Reload => {
                            let (status, notices) = self.reload_notified();
                            effects = notices;
                            Response::Reloaded(status)
                        }
                        Request::Enter { class } => self.enter(&class, peer),
                        other => {
                            self.read_kernel_counters();
                            self.answer(other)
                        }
                    },
                };
                let _ = reply.send(response);
                effects
            }
            Event::Reload(cause) => {
                debug!(?cause, "reload");
                self.reload_notified().1
            }
            Event::Gpu(event) => {
                self.on_gpu(event);
                Vec::new()
            }
            Event::SweepTick => {
                self.sweep(false);
                Vec::new()
            }
            Event::CountersTick => {
                self.read_kernel_counters();
                if self.dropped_since_sweep() {
                    self.sweep(true);
                }
                vec![Effect::RenderMetrics]
            }
            Event::WatchdogTick => vec![Effect::Notify(Notice::Watchdog)],
            Event::Stop => {
                info!("stopping: thawing and widening every managed group to all CPUs");
                self.placer.release_all();
                vec![Effect::Notify(Notice::Stopping), Effect::Exit]
            }
        }
    }

    /// One reload, whatever asked for it, between RELOADING=1 and READY=1.
    fn reload_notified(&mut self) -> (ReloadStatus, Vec<Effect>) {
        let status = self.reload();
        let effects = vec![
            Effect::Notify(Notice::Reloading),
            Effect::Notify(Notice::Ready {
                status: self.one_line_status(),
            }),
            Effect::RenderMetrics,
        ];
        (status, effects)
    }

    fn on_exec(&mut self, e: &ProcEvent) {
        let handled_ns = monotonic_ns();
        self.counts.exec += 1;
        let pid = e.tgid;
        let ProcRead {
            info,
            ppid: proc_ppid,
            start_ticks,
        } = match self.procs.read(pid, &self.env_keys) {
            Ok(read) => read,
            Err(err) => {
                self.forget(pid, &err);
                return;
            }
        };
        // The parent at fork is the better ancestor for classification: a
        // reparented daemon still descends from what launched it.
        let previous = self.table.get(pid);
        let ppid = previous
            .map(|p| p.ppid)
            .filter(|p| *p != 0)
            .or((e.ppid != 0).then_some(e.ppid))
            .unwrap_or(proc_ppid);
        let mut process = Proc::new(info, ppid, start_ticks);
        if let Some(previous) = previous {
            process.placed_class = previous.placed_class.clone();
            process.origin_cgroup = previous.origin_cgroup.clone();
            if previous.pinned {
                // `corral run --class`: the class holds across exec.
                process.pinned = true;
                process.decision = previous.decision.clone();
                self.table.insert(pid, process);
                return;
            }
        }
        self.table.insert(pid, process);
        self.decide(pid);
        self.place(pid, Some((e.ktime_ns, handled_ns)));
    }

    fn on_fork(&mut self, e: &ProcEvent) {
        self.counts.fork += 1;
        let child = e.pid;
        let Some(parent) = self.table.get(e.ppid).cloned() else {
            // A parent we never saw: learn the child from /proc.
            match self.procs.read(child, &self.env_keys) {
                Ok(read) => {
                    self.table.insert(child, read.into_proc());
                    self.decide(child);
                    self.place(child, None);
                }
                Err(err) => self.forget(child, &err),
            }
            return;
        };
        // The child runs the parent's program with the parent's decision,
        // and starts in the cgroup the parent was in when it forked.
        let mut info = parent.info.clone();
        info.pid = child;
        let mut process = Proc::new(info, e.ppid, 0);
        process.decision = parent.decision.clone();
        process.origin_cgroup = parent.origin_cgroup.clone();
        process.pinned = parent.pinned;
        self.table.insert(child, process);
        if let Some(class) = parent.placed_class {
            if self.placer.holds_cgroup_id(&class, e.cgroup_id) {
                if let Some(p) = self.table.get_mut(child) {
                    p.placed_class = Some(class);
                }
            } else {
                // Forked between the parent's exec and its move: follow it.
                self.place(child, None);
            }
        }
    }

    fn on_exit(&mut self, e: &ProcEvent) {
        self.counts.exit += 1;
        self.table.remove(e.tgid);
    }

    fn forget(&mut self, pid: u32, err: &ReadError) {
        match err {
            ReadError::Gone(_) => self.counts.vanished += 1,
            ReadError::Other { .. } => debug!("{err}"),
        }
        self.table.remove(pid);
    }

    /// Classifies `pid` from its table entry and its ancestors' decisions.
    /// Returns whether the class changed.
    fn decide(&mut self, pid: u32) -> bool {
        let ancestors = self.table.ancestors(pid);
        let Some(process) = self.table.get(pid) else {
            return false;
        };
        let infos: Vec<&ProcInfo> = ancestors
            .iter()
            .filter_map(|a| self.table.get(*a).map(|p| &p.info))
            .collect();
        let parent_decision = ancestors
            .last()
            .and_then(|a| self.table.get(*a))
            .map(|p| &p.decision);
        let decision = classify::classify_one(
            &self.policy,
            self.ananicy.as_ref(),
            &process.info,
            &infos,
            parent_decision,
        );
        self.table.set_decision(pid, decision)
    }

    /// Moves `pid` into its class's group unless it is there already or
    /// its class is left alone. `exec` holds the kernel's exec timestamp and
    /// when the agent began handling it, for the placement log. Returns
    /// whether it moved.
    fn place(&mut self, pid: u32, exec: Option<(u64, u64)>) -> bool {
        if pid == self.own_pid || pid <= 2 {
            return false;
        }
        let Some(process) = self.table.get(pid) else {
            return false;
        };
        let class = process.decision.class.clone();
        if self.placer.layout().group(&class).is_none()
            || process.placed_class.as_deref() == Some(&class)
        {
            return false;
        }
        let target = Target {
            pid,
            start_ticks: process.start_ticks,
            cgroup: &process.info.cgroup,
            comm: &process.info.comm,
        };
        match self.placer.place(&class, target) {
            Ok(()) => {
                let placed_ns = monotonic_ns();
                if self.placer.layout().dry_run {
                    info!(pid, comm = %process.info.comm, class, rule = %process.decision.rule, "dry run: would move");
                } else {
                    debug!(pid, comm = %process.info.comm, class, rule = %process.decision.rule, "moved");
                }
                *self.placements_by_class.entry(class.clone()).or_default() += 1;
                if let Some((exec_ns, handled_ns)) = exec {
                    self.placement_latency
                        .observe(placed_ns.saturating_sub(exec_ns) as f64 / 1e9);
                    if self.placements.len() == PLACEMENT_LOG {
                        self.placements.pop_front();
                    }
                    self.placements.push_back(Placement {
                        pid,
                        class: class.clone(),
                        exec_ns,
                        handled_ns,
                        placed_ns,
                    });
                }
                if let Some(p) = self.table.get_mut(pid) {
                    if p.origin_cgroup.is_none() {
                        p.origin_cgroup = Some(p.info.cgroup.clone());
                    }
                    p.placed_class = Some(class);
                }
                true
            }
            Err(MoveError::Gone(_)) => {
                self.counts.vanished += 1;
                self.table.remove(pid);
                false
            }
            Err(err) => {
                self.counts.move_errors += 1;
                warn!("{err}");
                false
            }
        }
    }

    /// Moves a process the policy no longer manages back where it came
    /// from. Returns whether it moved.
    fn release(&mut self, pid: u32) -> bool {
        let Some(p) = self.table.get(pid) else {
            return false;
        };
        if p.placed_class.is_none() {
            return false;
        }
        let moved = match p.origin_cgroup.clone() {
            Some(origin) => match self.placer.unplace(&origin, pid) {
                Ok(()) => true,
                Err(e) => {
                    warn!("could not return {pid} to {origin}: {e}");
                    false
                }
            },
            None => false,
        };
        if let Some(p) = self.table.get_mut(pid) {
            p.placed_class = None;
        }
        moved
    }

    /// Re-reads the policy. A bad policy is refused and the last good one
    /// stays in force; a good one re-classifies every tracked process and
    /// re-places those whose class or core set changed.
    pub fn reload(&mut self) -> ReloadStatus {
        let started = Instant::now();
        let loaded = self
            .source
            .load()
            .map_err(anyhow::Error::from)
            .and_then(|policy| {
                resolve(&policy, &self.sysfs_root).map(|(resolved, _)| (policy, resolved))
            });
        let (policy, resolved) = match loaded {
            Ok(ok) => ok,
            Err(e) => return self.refused(started, format!("{e:#}")),
        };
        if let Err(e) = self.placer.reconfigure(&policy, &resolved) {
            return self.refused(started, format!("{e:#}"));
        }
        for w in &policy.warnings {
            warn!("{w}");
        }
        let message = policy.warnings.join("\n");
        self.ananicy = load_ananicy(&policy);
        let new_keys = policy.env_keys();
        if new_keys != self.env_keys {
            // Rules look at environment variables the table did not keep.
            self.env_keys = new_keys;
            let pids: Vec<u32> = self.table.iter().map(|(pid, _)| *pid).collect();
            for pid in pids {
                if let Ok(read) = self.procs.read(pid, &self.env_keys)
                    && let Some(p) = self.table.get_mut(pid)
                {
                    p.info.env = read.info.env;
                }
            }
        }
        let mode_config_changed = policy.modes != self.modes.config();
        if policy.gpu.arbiter != self.policy.gpu.arbiter {
            let now = self.epoch.elapsed();
            let actions = self
                .gpu
                .arbiter
                .reconfigure(policy.gpu.arbiter.clone(), now);
            self.execute(actions);
        }
        if policy.gpu.thermal != self.policy.gpu.thermal {
            self.gpu.thermal = ThermalGuard::new(policy.gpu.thermal.clone());
        }
        self.policy = policy;
        if mode_config_changed {
            let now = self.epoch.elapsed();
            self.modes = ModeSwitch::new(self.policy.modes, now);
        }
        let (mut reclassified, mut moves) = (0, 0);
        for pid in self.table.parents_first() {
            if self.table.get(pid).is_some_and(|p| p.pinned) {
                continue;
            }
            if self.decide(pid) {
                reclassified += 1;
            }
            if !self.same_process(pid) {
                // The pid now belongs to another process: forget the old one.
                self.table.remove(pid);
                continue;
            }
            let class = self
                .table
                .get(pid)
                .map(|p| p.decision.class.clone())
                .unwrap_or_default();
            let moved = if self.placer.layout().group(&class).is_some() {
                self.place(pid, None)
            } else {
                self.release(pid)
            };
            moves += usize::from(moved);
        }
        self.apply_layout();
        self.update_mode();
        self.sync_telemetry();
        self.apply_dmem();
        self.reloads.ok += 1;
        let status = ReloadStatus {
            ok: true,
            message,
            finished_ns: monotonic_ns(),
            duration_us: started.elapsed().as_micros() as u64,
            reclassified,
            moves,
        };
        info!(
            files = %self.policy.describe_files(),
            reclassified,
            moves,
            duration_us = status.duration_us,
            "policy reloaded"
        );
        self.last_reload = Some(status.clone());
        status
    }

    fn refused(&mut self, started: Instant, message: String) -> ReloadStatus {
        error!("policy reload refused, keeping the last good policy: {message}");
        self.reloads.refused += 1;
        let status = ReloadStatus {
            ok: false,
            message,
            finished_ns: monotonic_ns(),
            duration_us: started.elapsed().as_micros() as u64,
            reclassified: 0,
            moves: 0,
        };
        self.last_reload = Some(status.clone());
        status
    }

    /// Feeds the game count to the dynamic mode and applies a switch.
    fn update_mode(&mut self) {
        let now = self.epoch.elapsed();
        if let Some(mode) = self.modes.observe(now, self.protected_running()) {
            info!(%mode, why = %self.modes.why(), "dynamic mode changed");
            self.apply_layout();
        }
    }

    /// Writes every group's core set for the current mode.
    fn apply_layout(&mut self) {
        let base: BTreeMap<String, CpuList> = self
            .placer
            .layout()
            .iter()
            .map(|g| (g.class.clone(), g.base.clone()))
            .collect();
        let protected = self.protected().to_owned();
        for (class, (cpus, note)) in modes::layout(self.modes.mode(), &base, &protected) {
            let (cpus, note) = match &self.gpu.cooling {
                Some(why) if COOLED_CLASSES.contains(&class.as_str()) => {
                    (halve(&cpus), Some(format!("thermal guard: {why}")))
                }
                _ => (cpus, note),
            };
            if let Err(e) = self.placer.set_cpus(&class, cpus, note) {
                warn!(class, "could not set the core set: {e:#}");
            }
        }
    }

    /// Why `peer` may not make `request`, if it may not. Reading is open to
    /// every local user (explain only for their own processes); changing
    /// anything is for root, except `corral run --class` into classes the
    /// policy opens to users (`user_run = true`).
    fn refusal(&self, request: &Request, peer: Peer) -> Option<String> {
        let Some(uid) = peer.uid else {
            // Fail closed: a peer whose credentials could not be read is no
            // one, and may read nothing and change nothing.
            return Some("cannot tell who is asking (no SO_PEERCRED); refused".into());
        };
        if uid == 0 {
            return None;
        }
        match request {
            Request::Status | Request::Placements => None,
            Request::Explain { pid } => match self.procs.owner(*pid) {
                Some(owner) if owner == uid => None,
                Some(_) => Some(format!(
                    "process {pid} belongs to another user; only root can explain it"
                )),
                None => None,
            },
            Request::Reload => {
                Some("only root can reload the policy (try `sudo corral reload`)".into())
            }
            Request::Enter { class } => match self.policy.class(class) {
                Some(c) if c.user_run => None,
                Some(_) => Some(format!(
                    "class `{class}` is not open to users; root can allow it with `user_run = true` under [classes.{class}]"
                )),
                None => None,
            },
        }
    }

    /// A short line for systemd's STATUS=.
    fn one_line_status(&self) -> String {
        let placed: u64 = self.placements_by_class.values().sum();
        format!(
            "{} processes tracked, {placed} placed, mode {}",
            self.table.len(),
            self.modes.mode()
        )
    }

    /// `corral run --class CLASS`: moves the asking process into the class's
    /// group before it execs the program, so there is no exec race, and
    /// pins the class across that exec.
    fn enter(&mut self, class: &str, peer: Peer) -> Response {
        let Some(pid) = peer.pid else {
            return Response::Error {
                message: "cannot tell which process is asking (no SO_PEERCRED)".into(),
            };
        };
        let Some(group) = self.placer.layout().group(class) else {
            let managed: Vec<String> = self
                .placer
                .layout()
                .iter()
                .map(|g| g.class.clone())
                .collect();
            return Response::Error {
                message: format!(
                    "class `{class}` has no group; `corral run --class` takes one of: {}",
                    managed.join(", ")
                ),
            };
        };
        let group_path = group.path.display().to_string();
        let info = match self.procs.read(pid, &self.env_keys) {
            Ok(read) => read.into_proc(),
            Err(e) => {
                return Response::Error {
                    message: e.to_string(),
                };
            }
        };
        self.table.insert(pid, info);
        self.table.set_decision(
            pid,
            classify::Decision {
                class: class.to_owned(),
                rule: format!("corral run --class {class}"),
                source: None,
                inherited_from: None,
                passes_down: true,
            },
        );
        if let Some(p) = self.table.get_mut(pid) {
            p.pinned = true;
        }
        if !self.place(pid, None)
            && self.table.get(pid).and_then(|p| p.placed_class.as_deref()) != Some(class)
        {
            return Response::Error {
                message: format!("could not move process {pid} into {group_path}"),
            };
        }
        info!(pid, class, uid = ?peer.uid, "corral run --class");
        let env = self
            .policy
            .class(class)
            .map(|c| c.env.clone())
            .unwrap_or_default();
        Response::Entered {
            group: group_path,
            env,
        }
    }

    fn on_gpu(&mut self, event: GpuEvent) {
        match event {
            GpuEvent::Off { reason } => {
                warn!("GPU features off: {reason}");
                self.gpu.on = false;
                self.gpu.off_reason = Some(reason);
                let now = self.epoch.elapsed();
                let actions = self.gpu.arbiter.release_all(now, "the GPU went away");
                self.execute(actions);
            }
            GpuEvent::On => {
                info!("GPU features on");
                self.gpu.on = true;
                self.gpu.off_reason = None;
            }
            GpuEvent::Snapshot(snapshot) => {
                self.gpu.on = true;
                self.gpu.off_reason = None;
                self.arbitrate(&snapshot);
                self.thermal(&snapshot);
                self.gpu.last = Some(snapshot);
            }
        }
    }

    /// VRAM used per class on the first GPU, from its process list.
    fn vram_by_class(&self, snapshot: &GpuSnapshot) -> BTreeMap<String, u64> {
        let mut used = BTreeMap::new();
        if let Some(device) = snapshot.devices.first() {
            for p in &device.processes {
                let Some(bytes) = p.used_bytes else { continue };
                let class = self
                    .table
                    .get(p.pid)
                    .map_or(crate::model::policy::SYSTEM, |t| t.decision.class.as_str());
                *used.entry(class.to_owned()).or_insert(0) += bytes;
            }
        }
        used
    }

    fn arbitrate(&mut self, snapshot: &GpuSnapshot) {
        let Some(device) = snapshot.devices.first() else {
            return;
        };
        let observation = Observation {
            now: self.epoch.elapsed(),
            total_bytes: device.total_bytes,
            free_bytes: device.free_bytes,
            used_by_class: self.vram_by_class(snapshot),
            protected_running: self.protected_running() > 0,
        };
        let actions = self.gpu.arbiter.decide(&observation);
        self.execute(actions);
    }

    fn thermal(&mut self, snapshot: &GpuSnapshot) {
        let gpu_c = snapshot
            .devices
            .iter()
            .filter_map(|d| d.temperature_c)
            .max()
            .map(f64::from);
        let cpu_c = thermal::cpu_temperature(&self.sysfs_root);
        match self.gpu.thermal.observe(self.epoch.elapsed(), gpu_c, cpu_c) {
            Some(ThermalAction::Cool { reason }) => {
                warn!("thermal guard: {reason}; halving the core sets of {COOLED_CLASSES:?}");
                self.gpu.cooling = Some(reason);
                self.apply_layout();
            }
            Some(ThermalAction::Restore { reason }) => {
                info!("thermal guard: {reason}; core sets restored");
                self.gpu.cooling = None;
                self.apply_layout();
            }
            None => {}
        }
    }

    /// Carries out arbiter actions; each is logged with its reason and
    /// counted. Asking applications happens in the background.
    fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            if action.class == self.protected() {
                error!(
                    "refusing a GPU action on the protected class `{}`: {:?}",
                    action.class, action.kind
                );
                continue;
            }
            let managed = self.placer.layout().group(&action.class).is_some();
            let outcome = match (action.kind, managed) {
                (ActionKind::Notify, _) => {
                    desktop_notify::notify_desktop("corral: VRAM needed by a game", &action.reason);
                    "notified".to_owned()
                }
                (ActionKind::Ask, _) => self.ask(&action.class),
                (ActionKind::Freeze, true) => match self.placer.set_frozen(&action.class, true) {
                    Ok(()) => "frozen".to_owned(),
                    Err(e) => format!("freeze failed: {e}"),
                },
                (ActionKind::Thaw, true) => match self.placer.set_frozen(&action.class, false) {
                    Ok(()) => "thawed".to_owned(),
                    Err(e) => format!("thaw failed: {e}"),
                },
                (ActionKind::Kill, true) => match self.placer.kill(&action.class) {
                    Ok(n) => format!("killed {n} processes"),
                    Err(e) => format!("kill failed: {e}"),
                },
                (_, false) => "class has no group; nothing to do".to_owned(),
            };
            warn!(class = %action.class, kind = ?action.kind, "{} -> {outcome}", action.reason);
            let kind = format!("{:?}", action.kind).to_lowercase();
            *self
                .gpu
                .action_counts
                .entry(format!("{}:{kind}", action.class))
                .or_default() += 1;
            if self.gpu.actions.len() == GPU_ACTION_LOG {
                self.gpu.actions.pop_front();
            }
            self.gpu.actions.push_back(GpuActionRecord {
                at_ns: monotonic_ns(),
                class: action.class,
                kind,
                reason: action.reason,
                outcome,
            });
        }
    }

    /// Asks the class's applications that can give VRAM back (ComfyUI,
    /// ollama) to do so, in the background. Returns what was asked.
    fn ask(&self, class: &str) -> String {
        let mut asked = Vec::new();
        for (_, p) in self.table.iter().filter(|(_, p)| p.decision.class == class) {
            let comfy = p.info.argv.iter().any(|a| a.ends_with("main.py"))
                && (p
                    .info
                    .argv
                    .iter()
                    .any(|a| a.to_lowercase().contains("comfy"))
                    || p.info.cwd.to_lowercase().contains("comfy"));
            if comfy {
                let addr = askers::comfyui_addr(&p.info.argv);
                if !asked.contains(&addr) {
                    asked.push(addr);
                    tokio::spawn(async move {
                        match askers::ask_comfyui(addr).await {
                            Ok(()) => info!(%addr, "ComfyUI asked to free its VRAM"),
                            Err(e) => warn!("{e}"),
                        }
                    });
                }
            } else if p.info.exe.ends_with("/ollama") && p.info.argv.iter().any(|a| a == "serve") {
                let addr = askers::ollama_addr(&p.info.env);
                if !asked.contains(&addr) {
                    asked.push(addr);
                    tokio::spawn(async move {
                        match askers::ask_ollama(addr).await {
                            Ok(models) => {
                                info!(%addr, ?models, "ollama asked to unload its models")
                            }
                            Err(e) => warn!("{e}"),
                        }
                    });
                }
            }
        }
        if asked.is_empty() {
            "nothing in the class knows how to give VRAM back (ComfyUI, ollama)".to_owned()
        } else {
            format!(
                "asked {}",
                asked
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    /// The GPU part of `corral status`.
    fn gpu_status(&self) -> GpuStatus {
        GpuStatus {
            on: self.gpu.on,
            off_reason: self.gpu.off_reason.clone(),
            snapshot: self.gpu.last.clone(),
            vram_by_class: self
                .gpu
                .last
                .as_ref()
                .map(|s| self.vram_by_class(s))
                .unwrap_or_default(),
            arbiter: Some(self.gpu.arbiter.state()),
            cooling: self.gpu.cooling.clone(),
            actions: self.gpu.actions.iter().cloned().collect(),
            action_counts: self.gpu.action_counts.clone(),
            dmem: match cgroupfs::dmem_support(&place_mount(self.placer.layout())) {
                cgroupfs::DmemSupport::Absent { reason } => format!("absent: {reason}"),
                cgroupfs::DmemSupport::Present { regions } => {
                    format!("present: {regions:?}; set: {:?}", self.gpu.dmem_applied)
                }
            },
        }
    }

    /// Reconciles the table with /proc: learns processes whose events were
    /// lost (a full ring buffer, a missed exec), places them, and forgets
    /// processes that are gone. Runs on a slow timer and at once when the
    /// kernel reports dropped events. Returns how many were newly placed.
    ///
    /// `full`: after dropped events, also re-read every known process,
    /// since a lost exec leaves a process known only by its parent's fork.
    pub fn sweep(&mut self, full: bool) -> usize {
        let live: HashSet<u32> = self.procs.pids().into_iter().collect();
        if live.is_empty() {
            return 0;
        }
        let mut stale = Vec::new();
        if full {
            let known: Vec<u32> = self
                .table
                .iter()
                .map(|(pid, _)| *pid)
                .filter(|pid| live.contains(pid))
                .collect();
            for pid in known {
                let Ok(ProcRead {
                    info,
                    start_ticks: start,
                    ..
                }) = self.procs.read(pid, &self.env_keys)
                else {
                    continue;
                };
                if let Some(p) = self.table.get_mut(pid)
                    && !p.pinned
                    && (p.info != info || p.start_ticks != start)
                {
                    p.info = info;
                    p.start_ticks = start;
                    stale.push(pid);
                }
            }
        }
        let gone: Vec<u32> = self
            .table
            .iter()
            .map(|(pid, _)| *pid)
            .filter(|pid| !live.contains(pid))
            .collect();
        for pid in gone {
            self.table.remove(pid);
        }
        let mut fresh = std::collections::HashSet::new();
        for pid in live {
            if self.table.get(pid).is_none()
                && let Ok(read) = self.procs.read(pid, &self.env_keys)
            {
                self.table.insert(pid, read.into_proc());
                fresh.insert(pid);
            }
        }
        let mut placed = 0;
        fresh.extend(stale);
        let order: Vec<u32> = self
            .table
            .parents_first()
            .into_iter()
            .filter(|p| fresh.contains(p))
            .collect();
        for pid in order {
            self.decide(pid);
            self.adopt_if_placed(pid);
            placed += usize::from(self.place(pid, None));
        }
        if placed > 0 {
            info!(placed, "sweep placed processes whose events were missed");
            self.update_mode();
        }
        placed
    }

    /// Whether `pid` is still the process the table knows (not a reused
    /// pid): its start time matches. Unknown start times pass.
    fn same_process(&self, pid: u32) -> bool {
        let Some(known) = self
            .table
            .get(pid)
            .map(|p| p.start_ticks)
            .filter(|t| *t != 0)
        else {
            return true;
        };
        self.procs
            .read(pid, &BTreeSet::new())
            .is_ok_and(|read| read.start_ticks == known)
    }

    /// Where the kernel has the dmem cgroup controller and the driver a
    /// VRAM region: `dmem.low` for the game's reserve and `dmem.max` for the
    /// other classes' budgets, on the first region. Absent: said in status.
    pub fn apply_dmem(&mut self) {
        if !self.policy.gpu.enabled || self.placer.layout().dry_run {
            return;
        }
        let cgroupfs::DmemSupport::Present { regions } =
            cgroupfs::dmem_support(&place_mount(self.placer.layout()))
        else {
            return;
        };
        let Some((region, capacity)) = regions.first().cloned() else {
            return;
        };
        let mut applied = Vec::new();
        for budget in &self.policy.gpu.arbiter.classes {
            let Some(group) = self.placer.layout().group(&budget.class) else {
                continue;
            };
            let (file, amount) = if budget.class == self.policy.gpu.arbiter.protected_class {
                ("dmem.low", budget.reserve)
            } else {
                ("dmem.max", budget.max)
            };
            let Some(amount) = amount else { continue };
            let bytes = amount.bytes(capacity);
            match cgroupfs::set_dmem(&group.path, file, &region, bytes) {
                Ok(()) => applied.push(format!("{} {file} {bytes}", budget.class)),
                Err(e) => warn!(class = %budget.class, "could not set {file}: {e}"),
            }
        }
        if !applied.is_empty() {
            info!(region, ?applied, "dmem limits set");
        }
        self.gpu.dmem_applied = applied;
    }

    /// When the loop must wake for the dynamic mode even without events.
    pub fn mode_deadline(&self) -> Option<Instant> {
        self.modes.next_deadline().map(|d| self.epoch + d)
    }

    pub fn answer(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Explain { pid } => match self.explain(pid) {
                Some(e) => Response::Explain(Box::new(e)),
                None => Response::Error {
                    message: format!("process {pid} is not tracked (it may have exited)"),
                },
            },
            Request::Placements => Response::Placements {
                placements: self.placements.iter().cloned().collect(),
            },
            Request::Reload | Request::Enter { .. } => Response::Error {
                message: "handled by the loop".into(),
            },
        }
    }

    fn status(&self) -> Status {
        let (rss, cpu) = metrics::read_self();
        let processes = self.processes_by_class();
        let classes = self
            .policy
            .classes
            .values()
            .map(|class| {
                let group = self.placer.layout().group(&class.name);
                ClassStatus {
                    class: class.name.clone(),
                    processes: processes.get(class.name.as_str()).copied().unwrap_or(0) as usize,
                    cgroup: group.map(|g| g.path.display().to_string()),
                    cpus: group.map(|g| g.cpus.to_string()),
                    base_cpus: group.map(|g| g.base.to_string()),
                    why: group.map(|g| g.why.clone()),
                    cpu_weight: group.map(|g| g.cpu_weight),
                    placements: self
                        .placements_by_class
                        .get(&class.name)
                        .copied()
                        .unwrap_or(0),
                    note: group.and_then(|g| g.note.clone()),
                    sched: self.sched_stats(&class.name),
                }
            })
            .collect();
        Status {
            policy: self.policy.describe_files(),
            policy_warnings: self.policy.warnings.clone(),
            last_reload: self.last_reload.clone(),
            mode: match self.modes.mode() {
                Mode::Shared => "shared",
                Mode::Protected => "protected",
            }
            .to_owned(),
            mode_why: self.modes.why(),
            cgroup_root: self.placer.layout().root.display().to_string(),
            cpuset_enforced: self.placer.layout().cpuset,
            dry_run: self.placer.layout().dry_run,
            tracked: self.table.len(),
            classes,
            events: self.counts.clone(),
            kernel: self.kernel,
            bpf_programs: self
                .tracer
                .as_ref()
                .map(Tracer::program_stats)
                .unwrap_or_default(),
            metrics_addr: self.metrics_bound.map(|a| a.to_string()),
            gpu: self.gpu_status(),
            agent_rss_bytes: rss,
            agent_cpu_seconds: cpu,
        }
    }

    fn explain(&self, pid: u32) -> Option<Explanation> {
        let process = self.table.get(pid)?;
        let group = self.placer.layout().group(&process.decision.class);
        let ancestry = self
            .table
            .ancestors(pid)
            .iter()
            .filter_map(|a| self.table.get(*a).map(|p| (a, p)))
            .map(|(a, p)| AncestorLine {
                pid: *a,
                comm: p.info.comm.clone(),
                class: p.decision.class.clone(),
                rule: p.decision.rule.clone(),
            })
            .collect();
        let cgroup_now = self
            .procs
            .read(pid, &BTreeSet::new())
            .map(|read| read.info.cgroup)
            .unwrap_or_default();
        Some(Explanation {
            pid,
            comm: process.info.comm.clone(),
            exe: process.info.exe.clone(),
            argv: process.info.argv.clone(),
            decision: process.decision.clone(),
            group: group.map(|g| g.path.display().to_string()),
            class_cpus: group.map(|g| g.cpus.to_string()),
            cgroup_now,
            cpus_allowed: cpus_allowed(pid).unwrap_or_default(),
            ancestry,
            vram_bytes: self.gpu.last.as_ref().and_then(|s| {
                s.devices
                    .iter()
                    .flat_map(|d| &d.processes)
                    .filter(|p| p.pid == pid)
                    .filter_map(|p| p.used_bytes)
                    .reduce(|a, b| a + b)
            }),
            gpu_actions: self
                .gpu
                .actions
                .iter()
                .filter(|a| a.class == process.decision.class)
                .cloned()
                .collect(),
        })
    }

    /// The class layout of the placement backend.
    pub fn layout(&self) -> &Groups {
        self.placer.layout()
    }
}

/// The first half of a CPU list (at least one CPU): what the thermal guard
/// leaves the background classes.
fn halve(cpus: &CpuList) -> CpuList {
    let all: Vec<u32> = cpus.iter().collect();
    let keep = all.len().div_ceil(2).max(1).min(all.len());
    all[..keep].iter().copied().collect()
}

fn place_mount(groups: &Groups) -> PathBuf {
    crate::actuate::cgroup::cgroup2_mount_of(&groups.root)
}

/// `Cpus_allowed_list` of a process.
pub fn cpus_allowed(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
}

/// Watches the directories of the policy files; sends `Event::Reload`-worthy
/// notifications on `tx` when one of the files is written, moved in or
/// removed.
fn watch_policy(files: Vec<PathBuf>, tx: mpsc::Sender<()>) -> anyhow::Result<()> {
    use inotify::{Inotify, WatchMask};
    use tokio_stream_shim::next_event;
    let inotify = Inotify::init().context("inotify")?;
    let mut dirs = BTreeSet::new();
    for file in &files {
        if let Some(dir) = file.parent().filter(|d| d.is_dir()) {
            dirs.insert(dir.to_owned());
        } else {
            info!(file = %file.display(), "its directory does not exist yet: create it, then `corral reload`");
        }
    }
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM;
    for dir in &dirs {
        inotify
            .watches()
            .add(dir, mask)
            .with_context(|| format!("watching {}", dir.display()))?;
    }
    let names: BTreeSet<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(Into::into))
        .collect();
    let mut stream = inotify.into_event_stream(vec![0u8; 4096])?;
    tokio::spawn(async move {
        while let Some(name) = next_event(&mut stream).await {
            if name.as_ref().is_some_and(|n| names.contains(n)) && tx.send(()).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// The one place that touches inotify's stream type.
mod tokio_stream_shim {
    use std::ffi::OsString;

    use inotify::EventStream;

    /// The name in the next event (None for events without one); None at the end.
    pub async fn next_event(stream: &mut EventStream<Vec<u8>>) -> Option<Option<OsString>> {
        std::future::poll_fn(|cx| {
            use futures_core::Stream as _;
            std::pin::Pin::new(&mut *stream).poll_next(cx)
        })
        .await
        .and_then(Result::ok)
        .map(|event| event.name)
    }
}

/// Runs the agent until SIGINT or SIGTERM: turns every source into an
/// [`Event`], lets [`Agent::handle`] decide, and carries out the effects.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let policy = options.source.load()?;
    for w in &policy.warnings {
        warn!("{w}");
    }
    let (resolved, online) = resolve(&policy, &options.sysfs_root)?;
    let mut groups = Groups::setup(
        &options.cgroup_root,
        &policy,
        &resolved,
        online,
        options.dry_run,
    )?;
    // A crashed agent may have left a group frozen or narrowed: never keep
    // it so.
    groups.release_all();
    // Attach before seeding, so nothing started in between is missed.
    let (tracer, events) = Tracer::load(options.ring_bytes)?;
    let watched = options.source.watched_files();
    let gpu_config = policy.gpu.clone();
    let metrics_addr = policy.telemetry.metrics_addr;
    let mut agent = Agent::new(
        options.source,
        options.sysfs_root,
        policy,
        Box::new(groups),
        Box::new(LiveProcs),
        Some(tracer),
    );
    let (gpu_tx, mut gpu_rx) = mpsc::channel(8);
    let _poller = gpu_config.enabled.then(|| {
        crate::gpu::nvml::spawn_poller(gpu_config.library.clone(), gpu_config.poll_interval, gpu_tx)
    });
    let (control_tx, mut control_rx) = mpsc::channel(64);
    let server = control::serve(&options.socket, control_tx)?;
    let (file_tx, mut file_rx) = mpsc::channel(16);
    if let Err(e) = watch_policy(watched, file_tx) {
        warn!("policy files are not watched ({e:#}); reload with SIGHUP or `corral reload`");
    }
    // SAFETY: the ring buffer owns its fd and outlives the registration
    // (both live until this function returns).
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    // The metrics endpoint serves the latest rendering, refreshed by the
    // loop (scrapes never touch the agent's state).
    let rendered = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let metrics_server = match metrics_addr {
        Some(addr) => {
            let shared = rendered.clone();
            match metrics::serve(addr, move || {
                shared.lock().map(|t| t.clone()).unwrap_or_default()
            })
            .await
            {
                Ok((bound, handle)) => {
                    info!(%bound, "metrics at http://{bound}/metrics");
                    agent.metrics_bound = Some(bound);
                    Some(handle)
                }
                Err(e) => {
                    warn!("metrics endpoint off: {e:#}");
                    None
                }
            }
        }
        None => None,
    };
    let notifier = crate::service::notify::Notifier::from_env();
    let carry_out = |effects: Vec<Effect>, agent: &Agent| -> bool {
        let mut go_on = true;
        for effect in effects {
            match effect {
                Effect::Notify(Notice::Ready { status }) => notifier.ready(&status),
                Effect::Notify(Notice::Reloading) => notifier.reloading(),
                Effect::Notify(Notice::Watchdog) => notifier.watchdog(),
                Effect::Notify(Notice::Stopping) => notifier.stopping(),
                // Rendering is only worth it when something can scrape it.
                Effect::RenderMetrics if metrics_server.is_some() => {
                    let text = agent.metrics().render();
                    if let Ok(mut shared) = rendered.lock() {
                        *shared = text;
                    }
                }
                Effect::RenderMetrics => {}
                Effect::Exit => go_on = false,
            }
        }
        go_on
    };
    let effects = agent.handle(Event::Seed);
    carry_out(effects, &agent);
    let mut counters = tokio::time::interval(Duration::from_secs(1));
    let mut sweeps = tokio::time::interval(options.sweep_interval);
    sweeps.tick().await;
    // Fed from the loop itself, so a stuck loop stops feeding it.
    let mut watchdog =
        tokio::time::interval(notifier.watchdog_every.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    info!(
        socket = %options.socket.display(),
        root = %agent.layout().root.display(),
        dry_run = options.dry_run,
        "corral is running"
    );
    loop {
        let deadline = agent.mode_deadline();
        let effects = tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(event) = bpf::decode(&item) {
                        drop(item);
                        agent.handle(Event::Kernel(event));
                    }
                }
                guard.clear_ready();
                agent.handle(Event::KernelBatchDone)
            }
            Some(event) = gpu_rx.recv() => agent.handle(Event::Gpu(event)),
            Some(incoming) = control_rx.recv() => agent.handle(Event::Control(incoming)),
            Some(()) = file_rx.recv() => {
                // Let the editor finish, then reload once for the burst.
                tokio::time::sleep(RELOAD_SETTLE).await;
                while file_rx.try_recv().is_ok() {}
                agent.handle(Event::Reload(ReloadCause::FileChanged))
            }
            _ = sighup.recv() => agent.handle(Event::Reload(ReloadCause::Signal)),
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()).await },
                if deadline.is_some() => agent.handle(Event::ModeTimer),
            _ = watchdog.tick() => agent.handle(Event::WatchdogTick),
            _ = sweeps.tick() => agent.handle(Event::SweepTick),
            _ = counters.tick() => agent.handle(Event::CountersTick),
            _ = sigterm.recv() => agent.handle(Event::Stop),
            _ = sigint.recv() => agent.handle(Event::Stop),
        };
        if !carry_out(effects, &agent) {
            break;
        }
    }
    server.abort();
    if let Some(handle) = metrics_server {
        handle.abort();
    }
    let _ = std::fs::remove_file(&options.socket);
    Ok(())
}
