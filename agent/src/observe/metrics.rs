//! What the agent measures, as one documented struct ([`Metrics`]) the daemon
//! fills in, rendered in the Prometheus text exposition format (0.0.4) and
//! served on `GET /metrics` by a tiny HTTP server ([`serve`]).
//!
//! Plain data, no global registry and no Prometheus crate at run time: the
//! daemon owns a `Metrics`, updates it from its one loop, and hands the
//! server a closure that returns the latest rendering. `corral status` and
//! `corral top` read the same struct (e.g. [`Histogram::percentile`] for
//! p50/p99).
//!
//! Every family is named `corral_...`, counters end in `_total`, and values
//! are in base units (seconds, bytes, ratios 0..1). The first doc line of
//! each field below is, word for word, the `# HELP` text of its family (a
//! unit test checks that). [`Metrics::names`] lists every family the agent
//! can export; a histogram family `X` also writes `X_bucket`, `X_sum` and
//! `X_count` series.
//!
//! Length: one documented struct for every exported metric (STYLE 14), its renderer and endpoint; about 260 lines are tests.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
    time::timeout,
};
use tracing::{debug, warn};

use crate::model::modes::Mode;

/// Where the metrics server listens unless told otherwise: loopback only,
/// port 9187 (free in the Prometheus exporter port list's range).
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9187));

/// `Content-Type` of a `/metrics` answer: the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Number of log2 microsecond buckets the kernel keeps per class: bucket `i`
/// counts latencies in `[2^i, 2^(i+1))` µs, `i = 0..=25`.
pub const LOG2_US_BUCKETS: usize = 26;

/// Upper bounds (seconds) of [`Histogram::placement_latency`]'s buckets.
pub const PLACEMENT_LATENCY_BUCKETS_SECONDS: [f64; 10] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1,
];

/// A request head larger than this is answered `431` and dropped.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long, and how many bytes, a closing connection still reads (see `linger`).
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;
/// Connections served at once; more are closed at once rather than queued,
/// so a flood of idle clients cannot hold the agent's memory.
const MAX_CONNECTIONS: usize = 64;

// ---------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------

/// A histogram with fixed upper bounds in seconds, Prometheus style: a sample
/// `v` falls in the first bucket whose bound `le` satisfies `v <= le`, or in
/// the overflow (`+Inf`) bucket after the last bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending, finite.
    bounds: Vec<f64>,
    /// Samples per bucket (not cumulative); one more than `bounds`, the last
    /// being the overflow bucket.
    counts: Vec<u64>,
    /// Sum of all samples, in seconds (approximate for [`Self::from_log2_us`]).
    sum: f64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (seconds). Bounds that are
    /// not finite are dropped; the rest are sorted and deduplicated.
    pub fn new(bounds_seconds: &[f64]) -> Self {
        let mut bounds: Vec<f64> = bounds_seconds
            .iter()
            .copied()
            .filter(|b| b.is_finite())
            .collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let counts = vec![0; bounds.len() + 1];
        Self {
            bounds,
            counts,
            sum: 0.0,
        }
    }

    /// An empty placement-latency histogram: 50 µs, 100 µs, 250 µs, 500 µs,
    /// 1 ms, 2.5 ms, 5 ms, 10 ms, 25 ms, 100 ms and `+Inf`.
    pub fn placement_latency() -> Self {
        Self::new(&PLACEMENT_LATENCY_BUCKETS_SECONDS)
    }

    /// From the kernel's log2 microsecond buckets: `buckets[i]` counts
    /// latencies in `[2^i, 2^(i+1))` µs. The result always has the
    /// [`LOG2_US_BUCKETS`] bounds `le = 2^(i+1)` µs (in seconds), so every
    /// scrape has the same layout: a shorter input counts as zeros, and
    /// entries past index 25 go to the `+Inf` bucket only.
    ///
    /// The kernel keeps no sum, so [`Self::sum`] is approximate: each sample
    /// is taken at its bucket's midpoint, `1.5 * 2^i` µs. The kernel's bound
    /// is exclusive where Prometheus's `le` is inclusive; with integer
    /// microseconds that only moves a sample of exactly `2^(i+1)` µs one
    /// bucket up.
    pub fn from_log2_us(buckets: &[u64]) -> Self {
        let bounds: Vec<f64> = (0..LOG2_US_BUCKETS).map(|i| pow2(i + 1) / 1e6).collect();
        let mut counts = vec![0u64; LOG2_US_BUCKETS + 1];
        let mut sum = 0.0;
        for (i, &n) in buckets.iter().enumerate() {
            let slot = i.min(LOG2_US_BUCKETS);
            counts[slot] = counts[slot].saturating_add(n);
            sum += n as f64 * 1.5 * pow2(i) / 1e6;
        }
        Self {
            bounds,
            counts,
            sum,
        }
    }

    /// Records one sample, in seconds. Negative values (clock skew between
    /// the kernel's timestamp and ours) count as 0; NaN is ignored.
    pub fn observe(&mut self, seconds: f64) {
        if seconds.is_nan() {
            return;
        }
        let v = seconds.max(0.0);
        let slot = self.bounds.partition_point(|&le| le < v);
        self.counts[slot] = self.counts[slot].saturating_add(1);
        self.sum += v;
    }

    /// Upper bounds in seconds, ascending, without `+Inf`.
    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    /// Cumulative counts, one per bound, then the `+Inf` bucket (= [`Self::count`]).
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |acc, &n| {
                *acc = acc.saturating_add(n);
                Some(*acc)
            })
            .collect()
    }

    /// Sum of the samples, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, &n| a.saturating_add(n))
    }

    /// The `q`-quantile (`q` in `0..=1`, e.g. `0.99` for p99), in seconds:
    /// the upper bound of the bucket holding the `ceil(q * count)`-th
    /// smallest sample. `f64::INFINITY` when that sample is past the last
    /// bound; `None` with no samples or a `q` outside `0..=1`.
    pub fn percentile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let slot = self.cumulative().iter().position(|&c| c >= rank)?;
        Some(self.bounds.get(slot).copied().unwrap_or(f64::INFINITY))
    }
}

/// `2^i` as a float, exact for any `i` a histogram can have.
fn pow2(i: usize) -> f64 {
    2f64.powi(i32::try_from(i).unwrap_or(i32::MAX))
}

// ---------------------------------------------------------------------------
// The metrics struct
// ---------------------------------------------------------------------------

/// Everything the agent exports. The daemon fills it in; [`Self::render`]
/// writes it out. Options that are `None` (no GPU, no `cpu.pressure`) write
/// no sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Per-class figures, keyed by class name (`game`, `dev`, `render`,
    /// `ai`, `system`); written with the label `class`.
    pub classes: BTreeMap<String, ClassMetrics>,
    /// Time from a process's exec (kernel timestamp) to its cgroup write, in seconds.
    pub placement_latency: Histogram,
    /// Process events read from the kernel ring buffer, by kind.
    pub events: EventCounts,
    /// Events the kernel could not put in the full ring buffer.
    pub events_dropped_total: u64,
    /// Processes that exited before they could be placed.
    pub events_vanished_total: u64,
    /// Failed writes of a process into a cgroup.
    pub move_errors_total: u64,
    /// Policy reloads, by result (ok, or refused and the last good policy kept).
    pub policy_reloads: ReloadCounts,
    /// GPUs seen through NVML, in index order (empty without a GPU); written
    /// with the labels `gpu` (index) and `name`.
    pub gpus: Vec<GpuMetrics>,
    /// Resident memory of the agent itself, in bytes.
    pub agent_resident_memory_bytes: u64,
    /// CPU time the agent itself used (user + system), in seconds.
    pub agent_cpu_seconds_total: f64,
    /// Layout mode now: 1 for the active mode (protected or shared), 0 for the other.
    pub mode: Mode,
    /// What holds the performance power profile while the protected class runs: 1 for the method in use (ppd: power-profiles-daemon, sysfs: cpufreq files), 0 otherwise.
    ///
    /// `None`: nothing is held.
    pub power_held: Option<String>,
    /// Tools found that tune the same knobs (sched_ext, gamemoded, ananicy-cpp, system76-scheduler, falcond, tuned): 1 each, with the label `tool`.
    pub coexisting: Vec<String>,
}

/// One class's figures (see [`Metrics::classes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMetrics {
    /// Processes currently placed in the class.
    pub processes: u64,
    /// CPU time the class's tasks spent on a CPU, as counted by the kernel, in seconds.
    pub cpu_seconds: f64,
    /// Time the class's tasks waited in a run queue before running, in seconds (from the kernel's log2 microsecond buckets; the sum takes bucket midpoints).
    ///
    /// Build it with [`Histogram::from_log2_us`].
    pub runqueue_latency: Histogram,
    /// Processes moved into the class's cgroup.
    pub placements: u64,
    /// Share of the last 10 s in which some of the class's tasks waited for a CPU (cpu.pressure some avg10 / 100).
    ///
    /// A ratio 0..1, not the file's percent; [`Self::set_cpu_pressure`]
    /// converts. `None` where the group has no `cpu.pressure`.
    pub pressure_some_avg10: Option<f64>,
    /// Share of the last 10 s in which all of the class's tasks waited for a CPU (cpu.pressure full avg10 / 100).
    pub pressure_full_avg10: Option<f64>,
    /// Total time some of the class's tasks waited for a CPU (cpu.pressure some total), in seconds.
    pub pressure_some_total_seconds: Option<f64>,
    /// GPU memory used by the class's processes, in bytes.
    ///
    /// `None` unless the GPU feature is on.
    pub vram_used_bytes: Option<u64>,
    /// GPU memory the class may use, in bytes.
    ///
    /// `None` unless the GPU feature is on and the class has a budget.
    pub vram_budget_bytes: Option<u64>,
    /// CPUs in the class's cpuset now.
    pub cpus: u64,
}

/// Process events by kind (see [`Metrics::events`]); label `kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// `kind="exec"`: a process replaced its program.
    pub exec: u64,
    /// `kind="fork"`: a process was created.
    pub fork: u64,
    /// `kind="exit"`: a process ended.
    pub exit: u64,
}

/// Policy reloads by result (see [`Metrics::policy_reloads`]); label `result`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadCounts {
    /// `result="ok"`: the new policy is in force.
    pub ok: u64,
    /// `result="refused"`: the file was bad; the last good policy stays.
    pub refused: u64,
}

/// One GPU's figures (see [`Metrics::gpus`]). Each reading is `None` where
/// the driver does not report it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuMetrics {
    /// NVML index, written as the label `gpu`.
    pub index: u32,
    /// Product name, written as the label `name`.
    pub name: String,
    /// GPU busy share over the last sample period, 0 to 1.
    pub utilization_ratio: Option<f64>,
    /// GPU temperature, in degrees Celsius.
    pub temperature_celsius: Option<f64>,
    /// GPU power draw, in watts.
    pub power_watts: Option<f64>,
    /// GPU memory in use, in bytes.
    pub memory_used_bytes: Option<u64>,
    /// GPU memory in total, in bytes.
    pub memory_total_bytes: Option<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            classes: BTreeMap::new(),
            placement_latency: Histogram::placement_latency(),
            events: EventCounts::default(),
            events_dropped_total: 0,
            events_vanished_total: 0,
            move_errors_total: 0,
            policy_reloads: ReloadCounts::default(),
            gpus: Vec::new(),
            agent_resident_memory_bytes: 0,
            agent_cpu_seconds_total: 0.0,
            mode: Mode::Shared,
            power_held: None,
            coexisting: Vec::new(),
        }
    }
}

impl Default for ClassMetrics {
    fn default() -> Self {
        Self {
            processes: 0,
            cpu_seconds: 0.0,
            runqueue_latency: Histogram::from_log2_us(&[]),
            placements: 0,
            pressure_some_avg10: None,
            pressure_full_avg10: None,
            pressure_some_total_seconds: None,
            vram_used_bytes: None,
            vram_budget_bytes: None,
            cpus: 0,
        }
    }
}

impl ClassMetrics {
    /// Fills the three pressure fields from the text of the group's
    /// `cpu.pressure`:
    ///
    /// ```text
    /// some avg10=1.50 avg60=0.80 avg300=0.20 total=123456
    /// full avg10=0.00 avg60=0.00 avg300=0.00 total=0
    /// ```
    ///
    /// `avg10` (percent) becomes a ratio, `total` (µs) seconds. A missing
    /// line or field leaves that value `None` (older kernels have no `full`
    /// line for CPU).
    pub fn set_cpu_pressure(&mut self, cpu_pressure: &str) {
        let field = |kind: &str, key: &str| -> Option<f64> {
            let line = cpu_pressure
                .lines()
                .find(|l| l.split_whitespace().next() == Some(kind))?;
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
        };
        self.pressure_some_avg10 = field("some", "avg10").map(|p| p / 100.0);
        self.pressure_full_avg10 = field("full", "avg10").map(|p| p / 100.0);
        self.pressure_some_total_seconds = field("some", "total").map(|us| us / 1e6);
    }
}

// ---------------------------------------------------------------------------
// Families
// ---------------------------------------------------------------------------

/// Prometheus metric type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: name, type and `# HELP` text (the field's first doc line).
#[derive(Debug, Clone, Copy)]
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
}

macro_rules! family {
    ($id:ident, $name:literal, $kind:ident, $help:literal) => {
        const $id: Family = Family {
            name: $name,
            kind: Kind::$kind,
            help: $help,
        };
    };
}

family!(
    CLASS_PROCESSES,
    "corral_class_processes",
    Gauge,
    "Processes currently placed in the class."
);
family!(
    CLASS_CPU_SECONDS,
    "corral_class_cpu_seconds_total",
    Counter,
    "CPU time the class's tasks spent on a CPU, as counted by the kernel, in seconds."
);
family!(
    CLASS_RUNQUEUE_LATENCY,
    "corral_class_runqueue_latency_seconds",
    Histogram,
    "Time the class's tasks waited in a run queue before running, in seconds (from the kernel's log2 microsecond buckets; the sum takes bucket midpoints)."
);
family!(
    CLASS_PLACEMENTS,
    "corral_class_placements_total",
    Counter,
    "Processes moved into the class's cgroup."
);
family!(
    CLASS_PRESSURE_SOME_AVG10,
    "corral_class_cpu_pressure_some_avg10_ratio",
    Gauge,
    "Share of the last 10 s in which some of the class's tasks waited for a CPU (cpu.pressure some avg10 / 100)."
);
family!(
    CLASS_PRESSURE_FULL_AVG10,
    "corral_class_cpu_pressure_full_avg10_ratio",
    Gauge,
    "Share of the last 10 s in which all of the class's tasks waited for a CPU (cpu.pressure full avg10 / 100)."
);
family!(
    CLASS_PRESSURE_SOME_TOTAL,
    "corral_class_cpu_pressure_some_seconds_total",
    Counter,
    "Total time some of the class's tasks waited for a CPU (cpu.pressure some total), in seconds."
);
family!(
    CLASS_VRAM_USED,
    "corral_class_vram_used_bytes",
    Gauge,
    "GPU memory used by the class's processes, in bytes."
);
family!(
    CLASS_VRAM_BUDGET,
    "corral_class_vram_budget_bytes",
    Gauge,
    "GPU memory the class may use, in bytes."
);
family!(
    CLASS_CPUS,
    "corral_class_cpus",
    Gauge,
    "CPUs in the class's cpuset now."
);
family!(
    PLACEMENT_LATENCY,
    "corral_placement_latency_seconds",
    Histogram,
    "Time from a process's exec (kernel timestamp) to its cgroup write, in seconds."
);
family!(
    EVENTS,
    "corral_events_total",
    Counter,
    "Process events read from the kernel ring buffer, by kind."
);
family!(
    EVENTS_DROPPED,
    "corral_events_dropped_total",
    Counter,
    "Events the kernel could not put in the full ring buffer."
);
family!(
    EVENTS_VANISHED,
    "corral_events_vanished_total",
    Counter,
    "Processes that exited before they could be placed."
);
family!(
    MOVE_ERRORS,
    "corral_move_errors_total",
    Counter,
    "Failed writes of a process into a cgroup."
);
family!(
    POLICY_RELOADS,
    "corral_policy_reloads_total",
    Counter,
    "Policy reloads, by result (ok, or refused and the last good policy kept)."
);
family!(
    GPU_UTILIZATION,
    "corral_gpu_utilization_ratio",
    Gauge,
    "GPU busy share over the last sample period, 0 to 1."
);
family!(
    GPU_TEMPERATURE,
    "corral_gpu_temperature_celsius",
    Gauge,
    "GPU temperature, in degrees Celsius."
);
family!(
    GPU_POWER,
    "corral_gpu_power_watts",
    Gauge,
    "GPU power draw, in watts."
);
family!(
    GPU_MEMORY_USED,
    "corral_gpu_memory_used_bytes",
    Gauge,
    "GPU memory in use, in bytes."
);
family!(
    GPU_MEMORY_TOTAL,
    "corral_gpu_memory_total_bytes",
    Gauge,
    "GPU memory in total, in bytes."
);
family!(
    AGENT_RSS,
    "corral_agent_resident_memory_bytes",
    Gauge,
    "Resident memory of the agent itself, in bytes."
);
family!(
    AGENT_CPU,
    "corral_agent_cpu_seconds_total",
    Counter,
    "CPU time the agent itself used (user + system), in seconds."
);
family!(
    MODE,
    "corral_mode",
    Gauge,
    "Layout mode now: 1 for the active mode (protected or shared), 0 for the other."
);
family!(
    POWER_HELD,
    "corral_power_held",
    Gauge,
    "What holds the performance power profile while the protected class runs: 1 for the method in use (ppd: power-profiles-daemon, sysfs: cpufreq files), 0 otherwise."
);
family!(
    COEXISTING,
    "corral_coexisting_tool",
    Gauge,
    "Tools found that tune the same knobs (sched_ext, gamemoded, ananicy-cpp, system76-scheduler, falcond, tuned): 1 each, with the label `tool`."
);

/// Every family, in the order [`Metrics::render`] writes them.
const FAMILIES: &[Family] = &[
    CLASS_PROCESSES,
    CLASS_CPU_SECONDS,
    CLASS_RUNQUEUE_LATENCY,
    CLASS_PLACEMENTS,
    CLASS_PRESSURE_SOME_AVG10,
    CLASS_PRESSURE_FULL_AVG10,
    CLASS_PRESSURE_SOME_TOTAL,
    CLASS_VRAM_USED,
    CLASS_VRAM_BUDGET,
    CLASS_CPUS,
    PLACEMENT_LATENCY,
    EVENTS,
    EVENTS_DROPPED,
    EVENTS_VANISHED,
    MOVE_ERRORS,
    POLICY_RELOADS,
    GPU_UTILIZATION,
    GPU_TEMPERATURE,
    GPU_POWER,
    GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL,
    AGENT_RSS,
    AGENT_CPU,
    MODE,
    POWER_HELD,
    COEXISTING,
];

/// One sample of a counter or gauge: its labels and its value, already formatted.
type Sample = (Vec<(&'static str, String)>, String);

impl Metrics {
    /// Every metric family name the agent can export, in render order. A
    /// histogram family `X` is written as `X_bucket`, `X_sum` and `X_count`;
    /// see [`Self::exports`] to check a series name.
    pub fn names() -> Vec<&'static str> {
        FAMILIES.iter().map(|f| f.name).collect()
    }

    /// Whether `series` is a series the agent can write: a family name, or a
    /// histogram family's `_bucket`, `_sum` or `_count`. For dashboards and
    /// alert rules that must only use existing names.
    pub fn exports(series: &str) -> bool {
        FAMILIES.iter().any(|f| {
            series == f.name
                || (f.kind == Kind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| series.strip_suffix(s) == Some(f.name)))
        })
    }

    /// The text exposition format (0.0.4): `# HELP`, `# TYPE` and samples
    /// of each family that has at least one sample, label values escaped.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);

        let per_class = |value: &dyn Fn(&ClassMetrics) -> Option<String>| -> Vec<Sample> {
            self.classes
                .iter()
                .filter_map(|(name, c)| Some((vec![("class", name.clone())], value(c)?)))
                .collect()
        };
        scalar(
            &mut out,
            &CLASS_PROCESSES,
            per_class(&|c| Some(c.processes.to_string())),
        );
        scalar(
            &mut out,
            &CLASS_CPU_SECONDS,
            per_class(&|c| Some(float(c.cpu_seconds))),
        );
        let latencies: Vec<_> = self
            .classes
            .iter()
            .map(|(name, c)| (vec![("class", name.clone())], &c.runqueue_latency))
            .collect();
        histogram(&mut out, &CLASS_RUNQUEUE_LATENCY, &latencies);
        scalar(
            &mut out,
            &CLASS_PLACEMENTS,
            per_class(&|c| Some(c.placements.to_string())),
        );
        scalar(
            &mut out,
            &CLASS_PRESSURE_SOME_AVG10,
            per_class(&|c| c.pressure_some_avg10.map(float)),
        );
        scalar(
            &mut out,
            &CLASS_PRESSURE_FULL_AVG10,
            per_class(&|c| c.pressure_full_avg10.map(float)),
        );
        scalar(
            &mut out,
            &CLASS_PRESSURE_SOME_TOTAL,
            per_class(&|c| c.pressure_some_total_seconds.map(float)),
        );
        scalar(
            &mut out,
            &CLASS_VRAM_USED,
            per_class(&|c| c.vram_used_bytes.map(|v| v.to_string())),
        );
        scalar(
            &mut out,
            &CLASS_VRAM_BUDGET,
            per_class(&|c| c.vram_budget_bytes.map(|v| v.to_string())),
        );
        scalar(
            &mut out,
            &CLASS_CPUS,
            per_class(&|c| Some(c.cpus.to_string())),
        );

        histogram(
            &mut out,
            &PLACEMENT_LATENCY,
            &[(Vec::new(), &self.placement_latency)],
        );
        let e = self.events;
        scalar(
            &mut out,
            &EVENTS,
            vec![
                (vec![("kind", "exec".into())], e.exec.to_string()),
                (vec![("kind", "fork".into())], e.fork.to_string()),
                (vec![("kind", "exit".into())], e.exit.to_string()),
            ],
        );
        scalar(
            &mut out,
            &EVENTS_DROPPED,
            vec![(Vec::new(), self.events_dropped_total.to_string())],
        );
        scalar(
            &mut out,
            &EVENTS_VANISHED,
            vec![(Vec::new(), self.events_vanished_total.to_string())],
        );
        scalar(
            &mut out,
            &MOVE_ERRORS,
            vec![(Vec::new(), self.move_errors_total.to_string())],
        );
        let r = self.policy_reloads;
        scalar(
            &mut out,
            &POLICY_RELOADS,
            vec![
                (vec![("result", "ok".into())], r.ok.to_string()),
                (vec![("result", "refused".into())], r.refused.to_string()),
            ],
        );

        let per_gpu = |value: &dyn Fn(&GpuMetrics) -> Option<String>| -> Vec<Sample> {
            self.gpus
                .iter()
                .filter_map(|g| {
                    let labels = vec![("gpu", g.index.to_string()), ("name", g.name.clone())];
                    Some((labels, value(g)?))
                })
                .collect()
        };
        scalar(
            &mut out,
            &GPU_UTILIZATION,
            per_gpu(&|g| g.utilization_ratio.map(float)),
        );
        scalar(
            &mut out,
            &GPU_TEMPERATURE,
            per_gpu(&|g| g.temperature_celsius.map(float)),
        );
        scalar(&mut out, &GPU_POWER, per_gpu(&|g| g.power_watts.map(float)));
        scalar(
            &mut out,
            &GPU_MEMORY_USED,
            per_gpu(&|g| g.memory_used_bytes.map(|v| v.to_string())),
        );
        scalar(
            &mut out,
            &GPU_MEMORY_TOTAL,
            per_gpu(&|g| g.memory_total_bytes.map(|v| v.to_string())),
        );

        scalar(
            &mut out,
            &AGENT_RSS,
            vec![(Vec::new(), self.agent_resident_memory_bytes.to_string())],
        );
        scalar(
            &mut out,
            &AGENT_CPU,
            vec![(Vec::new(), float(self.agent_cpu_seconds_total))],
        );
        let on = |m: Mode| if self.mode == m { "1" } else { "0" }.to_string();
        scalar(
            &mut out,
            &MODE,
            vec![
                (vec![("mode", "protected".into())], on(Mode::Protected)),
                (vec![("mode", "shared".into())], on(Mode::Shared)),
            ],
        );
        let held = |m: &str| {
            if self.power_held.as_deref() == Some(m) {
                "1"
            } else {
                "0"
            }
            .to_string()
        };
        scalar(
            &mut out,
            &POWER_HELD,
            ["ppd", "sysfs"]
                .into_iter()
                .map(|m| (vec![("method", m.into())], held(m)))
                .collect(),
        );
        scalar(
            &mut out,
            &COEXISTING,
            self.coexisting
                .iter()
                .map(|t| (vec![("tool", t.clone())], "1".to_string()))
                .collect(),
        );
        out
    }
}

/// Writes `# HELP` and `# TYPE` of `f`.
fn header(out: &mut String, f: &Family) {
    let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
    let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
}

/// Writes one sample line: `name{labels} value`.
fn line(out: &mut String, name: &str, suffix: &str, labels: &[(&str, String)], value: &str) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// Writes a counter or gauge family; nothing at all when it has no samples.
fn scalar(out: &mut String, f: &Family, samples: Vec<Sample>) {
    if samples.is_empty() {
        return;
    }
    header(out, f);
    for (labels, value) in &samples {
        line(out, f.name, "", labels, value);
    }
}

/// Writes a histogram family: cumulative `_bucket` lines with `le` in
/// seconds and a final `+Inf`, then `_sum` and `_count`, per label set.
fn histogram(out: &mut String, f: &Family, series: &[(Vec<(&'static str, String)>, &Histogram)]) {
    if series.is_empty() {
        return;
    }
    header(out, f);
    for (labels, h) in series {
        let cumulative = h.cumulative();
        let les = h
            .bounds()
            .iter()
            .map(|&b| float(b))
            .chain(["+Inf".to_string()]);
        for (le, n) in les.zip(&cumulative) {
            let mut with_le = labels.clone();
            with_le.push(("le", le));
            line(out, f.name, "_bucket", &with_le, &n.to_string());
        }
        line(out, f.name, "_sum", labels, &float(h.sum()));
        line(out, f.name, "_count", labels, &h.count().to_string());
    }
}

/// A float as the exposition format spells it (`+Inf`, `-Inf`, `NaN`).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

/// A label value escaped for the text format: `\` → `\\`, `"` → `\"`,
/// newline → `\n`.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// `# HELP` text escaped for the text format: `\` → `\\`, newline → `\n`.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

// ---------------------------------------------------------------------------
// The agent itself
// ---------------------------------------------------------------------------

/// The agent's own resident memory (bytes, `VmRSS` of /proc/self/status)
/// and CPU time (seconds, `utime + stime` of /proc/self/stat). A value that
/// cannot be read is 0 (with a debug log): self-metrics never stop the agent.
pub fn read_self() -> (u64, f64) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status_rss(&s));
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_second = if ticks_per_second > 0 {
        ticks_per_second as f64
    } else {
        100.0
    };
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat_ticks(&s))
        .map(|t| t as f64 / ticks_per_second);
    if rss.is_none() || cpu.is_none() {
        debug!("could not read the agent's own rss or cpu time from /proc/self");
    }
    (rss.unwrap_or(0), cpu.unwrap_or(0.0))
}

/// `VmRSS:  1234 kB` of /proc/PID/status, in bytes.
fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = line.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => n.checked_mul(1024),
        Some(_) => None,
    }
}

/// `utime + stime` (fields 14 and 15) of /proc/PID/stat, in clock ticks.
/// The command name (field 2) may hold spaces and parentheses, so fields are
/// counted from after its last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with field 3 (state): utime is field 14, index 11 here.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// Serves `GET /metrics` (and `HEAD`) on `addr` with what `render` gives
/// for each scrape, `200` with [`CONTENT_TYPE`] (`503` when it gives
/// nothing: the loop that renders is gone); any other path is `404`. Binds
/// before returning, so the returned address is the real one (ask for port 0
/// in tests). The accept loop runs until the returned task is aborted.
///
/// Robust against bad clients: each connection has its own task, at most
/// 64 at once (more are closed at once), a request head over 8 KiB gets
/// `431`, and a client that takes over 5 s to send its request or read the
/// answer is dropped. Before closing, the server reads and discards what
/// the client still sends (at most 64 KiB, 0.5 s), so a `431` is not lost
/// to a TCP reset. `render` is called once per scrape: the agent asks its
/// loop for the page then, so nothing is rendered when nobody scrapes.
pub async fn serve<R, F>(
    addr: SocketAddr,
    render: R,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)>
where
    R: Fn() -> F + Send + Sync + 'static,
    F: Future<Output = Option<String>> + Send,
{
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics server to {addr}: is another corral or exporter using it? choose another address")
    })?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("reading the address the metrics server bound for {addr}"))?;
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    warn!("metrics server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                debug!("metrics server: {MAX_CONNECTIONS} connections open, closing {peer}");
                continue;
            };
            let render = Arc::clone(&render);
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = answer(stream, &*render).await {
                    debug!("metrics server: {peer}: {e}");
                }
            });
        }
    });
    Ok((bound, task))
}

/// What the request head said.
enum Request {
    /// The client closed before sending anything.
    Closed,
    TooLarge,
    Malformed,
    Parsed {
        method: String,
        path: String,
    },
}

/// Reads one request head, answers it, closes.
async fn answer<F: Future<Output = Option<String>>>(
    mut stream: TcpStream,
    render: &(dyn Fn() -> F + Send + Sync),
) -> std::io::Result<()> {
    let request = match timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete request within the timeout",
            ));
        }
    };
    let response = match request {
        Request::Closed => return Ok(()),
        Request::TooLarge => response(
            "431 Request Header Fields Too Large",
            "text/plain",
            "request too large\n",
            true,
        ),
        Request::Malformed => response("400 Bad Request", "text/plain", "bad request\n", true),
        Request::Parsed { method, path } => {
            let path = path.split('?').next().unwrap_or_default();
            match (method.as_str(), path) {
                ("GET" | "HEAD", "/metrics") => match render().await {
                    Some(page) => response("200 OK", CONTENT_TYPE, &page, method == "GET"),
                    None => response(
                        "503 Service Unavailable",
                        "text/plain",
                        "the agent is stopping\n",
                        true,
                    ),
                },
                _ => response(
                    "404 Not Found",
                    "text/plain",
                    "not found; try /metrics\n",
                    true,
                ),
            }
        }
    };
    timeout(IO_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client did not read the answer",
        )
    })??;
    linger(&mut stream).await;
    Ok(())
}

/// Reads and discards what the client still sends (an oversized head, a
/// body we ignored) for a moment before closing: closing a socket with
/// unread data sends a reset, and the client would lose the answer (a `431`
/// most of all). Bounded in time and bytes; ends at the client's EOF.
async fn linger(stream: &mut TcpStream) {
    let drain = async {
        let mut chunk = [0u8; 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = timeout(LINGER, drain).await;
}

/// Reads until the blank line that ends the head, at most
/// [`MAX_REQUEST_BYTES`]; the body, if any, is ignored.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Request> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(if buf.is_empty() {
                Request::Closed
            } else {
                Request::Malformed
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        let end = find(&buf, b"\r\n\r\n").or_else(|| find(&buf, b"\n\n"));
        match end {
            Some(end) if end <= MAX_REQUEST_BYTES => return Ok(parse_request_line(&buf[..end])),
            _ if buf.len() > MAX_REQUEST_BYTES => return Ok(Request::TooLarge),
            _ => {}
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `METHOD TARGET HTTP/x.y` of the first line.
fn parse_request_line(head: &[u8]) -> Request {
    let Ok(head) = std::str::from_utf8(head) else {
        return Request::Malformed;
    };
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some(method), Some(path), Some(version), None) if version.starts_with("HTTP/") => {
            Request::Parsed {
                method: method.to_string(),
                path: path.to_string(),
            }
        }
        _ => Request::Malformed,
    }
}

/// A whole `HTTP/1.1` answer that closes the connection.
fn response(status: &str, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn populated() -> Metrics {
        let mut m = Metrics::default();
        let mut game = ClassMetrics {
            processes: 3,
            cpu_seconds: 12.5,
            runqueue_latency: Histogram::from_log2_us(&[1, 2, 0, 3]),
            placements: 7,
            vram_used_bytes: Some(1 << 30),
            vram_budget_bytes: Some(8 << 30),
            cpus: 8,
            ..ClassMetrics::default()
        };
        game.set_cpu_pressure("some avg10=1.50 avg60=0.80 avg300=0.20 total=2500000\nfull avg10=0.25 avg60=0.00 avg300=0.00 total=10\n");
        m.classes.insert("game".into(), game);
        m.gpus.push(GpuMetrics {
            index: 0,
            name: "Test GPU".into(),
            utilization_ratio: Some(0.5),
            temperature_celsius: Some(61.0),
            power_watts: Some(120.5),
            memory_used_bytes: Some(1 << 30),
            memory_total_bytes: Some(24 << 30),
        });
        m.mode = Mode::Protected;
        m.power_held = Some("ppd".into());
        m.coexisting = vec!["gamemoded".into()];
        m
    }

    /// The family names in a rendering, from its `# TYPE` lines.
    fn typed(text: &str) -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect()
    }

    #[test]
    fn log2_buckets_become_cumulative_seconds() {
        let h = Histogram::from_log2_us(&[1, 2, 0, 3]);
        assert_eq!(h.bounds().len(), LOG2_US_BUCKETS);
        assert_eq!(h.bounds()[0], 0.000_002);
        assert_eq!(h.bounds()[1], 0.000_004);
        assert_eq!(h.bounds()[25], 67.108_864);
        let c = h.cumulative();
        assert_eq!(c.len(), LOG2_US_BUCKETS + 1);
        assert_eq!(&c[..5], &[1, 3, 3, 6, 6]);
        assert!(c.iter().all(|&n| n <= 6));
        assert_eq!(*c.last().unwrap(), 6);
        assert_eq!(h.count(), 6);
        // Midpoints: 1 * 1.5 + 2 * 3 + 3 * 12 µs.
        assert!((h.sum() - 43.5e-6).abs() < 1e-12, "{}", h.sum());
    }

    #[test]
    fn log2_entries_past_the_last_bucket_go_to_inf() {
        let mut raw = vec![0u64; LOG2_US_BUCKETS + 2];
        raw[LOG2_US_BUCKETS - 1] = 1;
        raw[LOG2_US_BUCKETS + 1] = 2;
        let h = Histogram::from_log2_us(&raw);
        let c = h.cumulative();
        assert_eq!(c[LOG2_US_BUCKETS - 1], 1);
        assert_eq!(c[LOG2_US_BUCKETS], 3);
        assert_eq!(h.percentile(0.1), Some(67.108_864));
        assert_eq!(h.percentile(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn percentile_is_the_upper_bound_of_the_bucket() {
        // 50 samples in [1,2) µs, 49 in [8,16) µs, 1 in [1,2) ms.
        let mut raw = vec![0u64; LOG2_US_BUCKETS];
        raw[0] = 50;
        raw[3] = 49;
        raw[10] = 1;
        let h = Histogram::from_log2_us(&raw);
        assert_eq!(h.percentile(0.0), Some(0.000_002));
        assert_eq!(h.percentile(0.5), Some(0.000_002));
        assert_eq!(h.percentile(0.51), Some(0.000_016));
        assert_eq!(h.percentile(0.99), Some(0.000_016));
        assert_eq!(h.percentile(1.0), Some(0.002_048));
        assert_eq!(h.percentile(1.5), None);
        assert_eq!(h.percentile(f64::NAN), None);
        assert_eq!(Histogram::from_log2_us(&[]).percentile(0.5), None);
    }

    #[test]
    fn observe_uses_inclusive_upper_bounds() {
        let mut h = Histogram::placement_latency();
        h.observe(0.000_05); // exactly the first bound
        h.observe(0.000_051);
        h.observe(-1.0); // clock skew: counts as 0
        h.observe(f64::NAN); // ignored
        h.observe(3.0); // past 100 ms
        assert_eq!(h.count(), 4);
        assert_eq!(&h.cumulative()[..3], &[2, 3, 3]);
        assert_eq!(h.cumulative()[10], 4);
        assert!((h.sum() - 3.000_101).abs() < 1e-9);
        assert_eq!(h.percentile(0.5), Some(0.000_05));
        assert_eq!(h.percentile(1.0), Some(f64::INFINITY));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("plain"), "plain");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut m = Metrics::default();
        m.classes
            .insert("we\"ird\\na\nme".into(), ClassMetrics::default());
        let text = m.render();
        assert!(
            text.contains("corral_class_processes{class=\"we\\\"ird\\\\na\\nme\"} 0\n"),
            "{text}"
        );
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }

    #[test]
    fn empty_metrics_render_the_always_present_families() {
        let text = Metrics::default().render();
        assert_eq!(
            typed(&text),
            [
                "corral_placement_latency_seconds",
                "corral_events_total",
                "corral_events_dropped_total",
                "corral_events_vanished_total",
                "corral_move_errors_total",
                "corral_policy_reloads_total",
                "corral_agent_resident_memory_bytes",
                "corral_agent_cpu_seconds_total",
                "corral_mode",
                "corral_power_held",
            ]
        );
        assert!(text.contains(
            "corral_power_held{method=\"ppd\"} 0\ncorral_power_held{method=\"sysfs\"} 0\n"
        ));
        assert!(text.contains("corral_events_total{kind=\"exec\"} 0\n"));
        assert!(text.contains("corral_placement_latency_seconds_bucket{le=\"0.00005\"} 0\n"));
        assert!(text.contains("corral_placement_latency_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert!(text.contains("corral_placement_latency_seconds_count 0\n"));
        assert!(
            text.contains("corral_mode{mode=\"protected\"} 0\ncorral_mode{mode=\"shared\"} 1\n")
        );
        assert!(!text.contains("class="));
        assert!(!text.contains("gpu="));
        for l in text.lines() {
            assert!(
                l.starts_with("# HELP ") || l.starts_with("# TYPE ") || l.starts_with("corral_"),
                "{l}"
            );
        }
    }

    #[test]
    fn populated_metrics_render_every_family_once() {
        let text = populated().render();
        assert_eq!(typed(&text), Metrics::names());
        assert!(
            text.contains("corral_class_cpu_pressure_some_avg10_ratio{class=\"game\"} 0.015\n")
        );
        assert!(
            text.contains("corral_class_cpu_pressure_full_avg10_ratio{class=\"game\"} 0.0025\n")
        );
        assert!(
            text.contains("corral_class_cpu_pressure_some_seconds_total{class=\"game\"} 2.5\n")
        );
        assert!(text.contains(
            "corral_class_runqueue_latency_seconds_bucket{class=\"game\",le=\"0.000004\"} 3\n"
        ));
        assert!(text.contains("corral_gpu_power_watts{gpu=\"0\",name=\"Test GPU\"} 120.5\n"));
        assert!(text.contains("corral_mode{mode=\"protected\"} 1\n"));
        assert!(text.contains(
            "corral_power_held{method=\"ppd\"} 1\ncorral_power_held{method=\"sysfs\"} 0\n"
        ));
        assert!(text.contains("corral_coexisting_tool{tool=\"gamemoded\"} 1\n"));
    }

    #[test]
    fn names_are_unique_prefixed_and_follow_conventions() {
        let names = Metrics::names();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        for f in FAMILIES {
            assert!(f.name.starts_with("corral_"), "{}", f.name);
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
        }
        assert!(Metrics::exports(
            "corral_class_runqueue_latency_seconds_bucket"
        ));
        assert!(Metrics::exports("corral_placement_latency_seconds_count"));
        assert!(Metrics::exports("corral_mode"));
        assert!(!Metrics::exports("corral_mode_bucket"));
        assert!(!Metrics::exports("corral_nope"));
    }

    /// Each family's HELP text is the first doc line of its field, so the
    /// struct stays the one documentation of what is exported.
    #[test]
    fn help_texts_are_the_field_docs() {
        let source = include_str!("metrics.rs");
        for f in FAMILIES {
            assert!(
                source.contains(&format!("/// {}\n", f.help)),
                "no field doc line is the HELP of {}",
                f.name
            );
        }
    }

    #[test]
    fn cpu_pressure_without_full_line() {
        let mut c = ClassMetrics::default();
        c.set_cpu_pressure("some avg10=50.00 avg60=0.00 avg300=0.00 total=1000000\n");
        assert_eq!(c.pressure_some_avg10, Some(0.5));
        assert_eq!(c.pressure_full_avg10, None);
        assert_eq!(c.pressure_some_total_seconds, Some(1.0));
        c.set_cpu_pressure("");
        assert_eq!(c.pressure_some_avg10, None);
    }

    #[test]
    fn self_stat_and_status_parse() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 12 100000 300";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
        let status = "Name:\tcorral\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t1\n";
        assert_eq!(parse_status_rss(status), Some(5120 * 1024));
        assert_eq!(parse_status_rss("Name:\tx\n"), None);
        let (rss, cpu) = read_self();
        assert!(rss > 0);
        assert!(cpu >= 0.0);
    }

    #[test]
    fn floats_use_the_exposition_spelling() {
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(float(f64::NAN), "NaN");
        assert_eq!(float(0.000_05), "0.00005");
        assert_eq!(float(2.0), "2");
    }

    #[test]
    fn request_lines_parse() {
        assert!(matches!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Request::Parsed { ref method, ref path } if method == "GET" && path == "/metrics"
        ));
        assert!(matches!(
            parse_request_line(b"GET /metrics"),
            Request::Malformed
        ));
        assert!(matches!(
            parse_request_line(b"\xff\xfe"),
            Request::Malformed
        ));
    }
}
