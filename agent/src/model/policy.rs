//! The policy: classes (core sets, cpu weights), ordered rules that say
//! which processes belong to which class, dynamic-mode timing and the
//! optional ananicy-cpp rule source. Parsing, layering (shipped default,
//! then the user's override, key by key) and validation; matching lives in
//! `classify`, core-set resolution in `topology`.
//!
//! Length: the policy's whole schema with spanned validation, one type per section; its tests are in policy/tests.rs.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use globset::{Glob, GlobBuilder, GlobMatcher};
use indexmap::IndexMap;
use serde::Deserialize;

use crate::{
    gpu::arbiter::{Amount, ArbiterConfig, ClassBudget, Step},
    gpu::askers,
    gpu::thermal::ThermalConfig,
    model::modes::ModeConfig,
    model::topology::{self, CoreSetError, CoreSpec, Resolved, Topology},
};

/// The class every process has when no rule claims it. Never moved.
pub const SYSTEM: &str = "system";
/// The default of `[modes] protected_class`. Code asks
/// [`Policy::protected_class`], which is what the policy says.
pub const GAME: &str = "game";

/// The default of `[gpu.thermal] classes`: the classes whose core sets the
/// thermal guard halves while it is too hot.
pub const COOLED_BY_DEFAULT: &[&str] = &["render", "ai"];

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
struct PolicyFile {
    #[serde(default)]
    classes: IndexMap<String, toml::Spanned<ClassSpec>>,
    #[serde(default)]
    rules: Vec<toml::Spanned<RuleSpec>>,
    modes: Option<ModesSpec>,
    ananicy: Option<AnanicySpec>,
    telemetry: Option<TelemetrySpec>,
    gpu: Option<GpuSpec>,
    power: Option<PowerSpec>,
    notifications: Option<NotificationsSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct GpuSpec {
    enabled: Option<bool>,
    library: Option<PathBuf>,
    poll_interval_ms: Option<u64>,
    grace_ms: Option<u64>,
    margin: Option<Amount>,
    classes: Option<IndexMap<String, toml::Spanned<GpuClassSpec>>>,
    thermal: Option<ThermalSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuClassSpec {
    /// Required where the class first gets a budget; an override may
    /// change any key alone.
    priority: Option<u32>,
    reserve: Option<Amount>,
    min: Option<Amount>,
    max: Option<Amount>,
    ladder: Option<Vec<Step>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThermalSpec {
    gpu_max_c: Option<f64>,
    cpu_max_c: Option<f64>,
    hysteresis_c: Option<f64>,
    hold_ms: Option<u64>,
    classes: Option<toml::Spanned<Vec<String>>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct TelemetrySpec {
    enabled: Option<bool>,
    metrics_addr: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct ClassSpec {
    /// A CPU list ("0-7") or an intent table (`{ share = 0.4, prefer =
    /// "performance" }`). Absent: the class is never moved. Spanned, so an
    /// intent this machine cannot serve points at where it was written.
    cpus: Option<toml::Spanned<CoreSpec>>,
    /// cgroup v2 `cpu.weight`, 1..=10000 (default 100).
    cpu_weight: Option<u32>,
    /// Environment for programs started with `corral run --class`.
    env: Option<BTreeMap<String, String>>,
    /// Whether users other than root may `corral run --class` into it.
    user_run: Option<bool>,
    #[allow(dead_code, reason = "documentation for readers of the policy file")]
    description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct RuleSpec {
    name: String,
    class: Option<String>,
    /// In an override: drop the shipped rule of this name.
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    inherit: bool,
    #[serde(default)]
    ignore_case: bool,
    #[serde(default)]
    exe: Vec<String>,
    #[serde(default)]
    comm: Vec<String>,
    #[serde(default)]
    argv: Vec<String>,
    #[serde(default)]
    cwd: Vec<String>,
    #[serde(default)]
    cgroup: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    ancestor: Option<MatcherSpec>,
    unless: Option<MatcherSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct MatcherSpec {
    #[serde(default)]
    exe: Vec<String>,
    #[serde(default)]
    comm: Vec<String>,
    #[serde(default)]
    argv: Vec<String>,
    #[serde(default)]
    cwd: Vec<String>,
    #[serde(default)]
    cgroup: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ModesSpec {
    hold_down_ms: Option<u64>,
    min_dwell_ms: Option<u64>,
    protected_class: Option<toml::Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct AnanicySpec {
    enabled: Option<bool>,
    dirs: Option<Vec<PathBuf>>,
    types: Option<BTreeMap<String, String>>,
}

/// Keys each table may hold; anything else is warned about (a typo would
/// otherwise silently do nothing).
const TOP_KEYS: &[&str] = &[
    "classes",
    "rules",
    "modes",
    "ananicy",
    "telemetry",
    "gpu",
    "power",
    "notifications",
];
const GPU_KEYS: &[&str] = &[
    "enabled",
    "library",
    "poll_interval_ms",
    "grace_ms",
    "margin",
    "classes",
    "thermal",
];
const TELEMETRY_KEYS: &[&str] = &["enabled", "metrics_addr"];
const CLASS_KEYS: &[&str] = &["cpus", "cpu_weight", "env", "user_run", "description"];
const RULE_KEYS: &[&str] = &[
    "name",
    "class",
    "disabled",
    "inherit",
    "ignore_case",
    "exe",
    "comm",
    "argv",
    "cwd",
    "cgroup",
    "env",
    "ancestor",
    "unless",
];
const MATCHER_KEYS: &[&str] = &["exe", "comm", "argv", "cwd", "cgroup", "env"];
const MODES_KEYS: &[&str] = &["hold_down_ms", "min_dwell_ms", "protected_class"];
const ANANICY_KEYS: &[&str] = &["enabled", "dirs", "types"];

/// A class as resolved from the policy.
#[derive(Debug, Clone)]
pub struct Class {
    pub name: String,
    /// Requested core set. None: never moved.
    pub cpus: Option<CoreSpec>,
    pub cpu_weight: u32,
    /// Environment for programs started with `corral run --class`.
    pub env: BTreeMap<String, String>,
    /// Users other than root may `corral run --class` into it.
    pub user_run: bool,
    /// Where the class was (last) defined, for validation messages.
    pub source: Source,
    /// Where its `cpus` value was (last) written, for core-set errors; the
    /// class's `source` when it has no `cpus`.
    pub cpus_source: Source,
}

impl Class {
    pub fn is_managed(&self) -> bool {
        self.cpus.is_some()
    }
}

/// Where something was written, for `corral explain` and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Glob lists compiled once. Every given field must match; within a list,
/// `exe`, `comm`, `cwd` and `cgroup` match when any glob does, while every
/// `argv` glob must match some argument, and every `env` key must be set to
/// a value its glob matches.
#[derive(Debug, Default)]
pub struct Matcher {
    pub exe: Vec<GlobMatcher>,
    pub comm: Vec<GlobMatcher>,
    pub argv: Vec<GlobMatcher>,
    pub cwd: Vec<GlobMatcher>,
    pub cgroup: Vec<GlobMatcher>,
    pub env: Vec<(String, GlobMatcher)>,
}

#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub class: String,
    /// Unclassified descendants take this rule's class.
    pub inherit: bool,
    pub matcher: Matcher,
    pub ancestor: Option<Matcher>,
    pub unless: Option<Matcher>,
    pub source: Source,
}

// [power] and [notifications]: the desktop's power profile while the
// protected class runs, and desktop notifications of VRAM and thermal steps.

#[derive(Debug, Clone, Default, Deserialize)]
struct PowerSpec {
    enabled: Option<bool>,
    sysfs: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct NotificationsSpec {
    desktop: Option<bool>,
    min_interval_ms: Option<u64>,
}

const POWER_KEYS: &[&str] = &["enabled", "sysfs"];
const NOTIFICATIONS_KEYS: &[&str] = &["desktop", "min_interval_ms"];

/// `[power]`: hold `performance` while the protected class runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerConfig {
    pub enabled: bool,
    /// Without power-profiles-daemon, write cpufreq's EPP or governor.
    pub sysfs: bool,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig {
            enabled: true,
            sysfs: true,
        }
    }
}

impl PowerConfig {
    fn merged(layers: &[Layer]) -> Self {
        let mut c = PowerConfig::default();
        for p in layers.iter().filter_map(|l| l.file.power.as_ref()) {
            c.enabled = p.enabled.unwrap_or(c.enabled);
            c.sysfs = p.sysfs.unwrap_or(c.sysfs);
        }
        c
    }
}

/// `[notifications]`: desktop notifications to the affected users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotificationsConfig {
    pub desktop: bool,
    /// At most one notification of a kind per user this often.
    pub min_interval: Duration,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            desktop: true,
            min_interval: Duration::from_secs(60),
        }
    }
}

impl NotificationsConfig {
    fn merged(layers: &[Layer]) -> Self {
        let mut c = NotificationsConfig::default();
        for n in layers.iter().filter_map(|l| l.file.notifications.as_ref()) {
            c.desktop = n.desktop.unwrap_or(c.desktop);
            if let Some(ms) = n.min_interval_ms {
                c.min_interval = Duration::from_millis(ms);
            }
        }
        c
    }
}

/// The optional ananicy-cpp rule source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnanicyConfig {
    pub enabled: bool,
    pub dirs: Vec<PathBuf>,
    /// ananicy type -> corral class.
    pub types: BTreeMap<String, String>,
}

impl Default for AnanicyConfig {
    fn default() -> Self {
        AnanicyConfig {
            enabled: false,
            dirs: vec![PathBuf::from("/etc/ananicy.d")],
            types: BTreeMap::from([("Game".to_owned(), GAME.to_owned())]),
        }
    }
}

/// Scheduling telemetry and the metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Attach the scheduler tracepoints (run-queue latency, on-CPU time).
    /// Off: the programs are detached and cost nothing.
    pub enabled: bool,
    /// Where Prometheus metrics are served; None: not served.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            metrics_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9187))),
        }
    }
}

/// VRAM coordination and the thermal guard.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    pub enabled: bool,
    /// libnvidia-ml to load; None: `libnvidia-ml.so.1` from the loader path.
    pub library: Option<PathBuf>,
    pub poll_interval: Duration,
    pub arbiter: ArbiterConfig,
    pub thermal: ThermalConfig,
    /// `[gpu.thermal] classes`: whose core sets the thermal guard halves
    /// while it is too hot. Kept beside [`ThermalConfig`] rather than in it:
    /// the guard only decides when, and its config is built field by field
    /// elsewhere.
    pub cooled_classes: Vec<String>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: false,
            library: None,
            poll_interval: Duration::from_secs(1),
            arbiter: ArbiterConfig {
                protected_class: GAME.to_owned(),
                grace: Duration::from_secs(5),
                margin: Amount::Percent(5.0),
                classes: Vec::new(),
            },
            thermal: ThermalConfig {
                gpu_max_c: None,
                cpu_max_c: None,
                hysteresis_c: 5.0,
                hold: Duration::from_secs(30),
            },
            cooled_classes: COOLED_BY_DEFAULT.iter().map(|c| (*c).to_owned()).collect(),
        }
    }
}

#[derive(Debug)]
pub struct Policy {
    /// The files this policy was read from, default first.
    pub files: Vec<PathBuf>,
    pub classes: IndexMap<String, Class>,
    pub rules: Vec<Rule>,
    pub modes: ModeConfig,
    pub ananicy: AnanicyConfig,
    pub telemetry: TelemetryConfig,
    pub gpu: GpuConfig,
    pub power: PowerConfig,
    pub notifications: NotificationsConfig,
    /// Things that did not stop the policy from loading (unknown keys).
    pub warnings: Vec<String>,
}

/// One policy file, parsed, with its text for positions.
struct Layer {
    path: PathBuf,
    text: String,
    file: PolicyFile,
}

impl Layer {
    fn parse(path: &Path, text: &str, warnings: &mut Vec<String>) -> Result<Layer, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|err| {
            let offset = err.span().map(|s| s.start).unwrap_or(0);
            invalid_at(path, text, offset, err.message().trim().to_owned())
        })?;
        if let Ok(table) = text.parse::<toml::Table>() {
            unknown_keys(path, text, &table, warnings);
        }
        Ok(Layer {
            path: path.to_owned(),
            text: text.to_owned(),
            file,
        })
    }

    fn invalid(&self, offset: usize, message: String) -> PolicyError {
        invalid_at(&self.path, &self.text, offset, message)
    }

    fn source(&self, offset: usize) -> Source {
        let (line, column) = line_column(&self.text, offset);
        Source {
            file: self.path.clone(),
            line,
            column,
        }
    }
}

fn invalid_at(path: &Path, text: &str, offset: usize, message: String) -> PolicyError {
    let (line, column) = line_column(text, offset);
    PolicyError::Invalid {
        path: path.to_owned(),
        line,
        column,
        message,
    }
}

fn invalid_source(source: &Source, message: String) -> PolicyError {
    PolicyError::Invalid {
        path: source.file.clone(),
        line: source.line,
        column: source.column,
        message,
    }
}

impl Policy {
    /// Reads one policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::load_layers(&[path.to_owned()])
    }

    /// Reads the shipped default and then each override in turn; later
    /// files win key by key. Missing override files are skipped; the first
    /// file must exist.
    pub fn load_layers(paths: &[PathBuf]) -> Result<Self, PolicyError> {
        let mut texts = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            match read_policy_file(path) {
                Ok(text) => texts.push((path.clone(), text)),
                Err(PolicyError::Read { source, .. })
                    if i > 0 && source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let borrowed: Vec<(&Path, &str)> = texts
            .iter()
            .map(|(p, t)| (p.as_path(), t.as_str()))
            .collect();
        Self::parse_layers(&borrowed)
    }

    /// Parses one policy text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        Self::parse_layers(&[(path, text)])
    }

    /// Parses policy texts, default first, and merges them.
    pub fn parse_layers(texts: &[(&Path, &str)]) -> Result<Self, PolicyError> {
        let mut warnings = Vec::new();
        let layers: Vec<Layer> = texts
            .iter()
            .map(|(path, text)| Layer::parse(path, text, &mut warnings))
            .collect::<Result<_, _>>()?;

        // Classes: key by key, later layers win.
        let mut class_specs: IndexMap<String, MergedClass> = IndexMap::new();
        for layer in &layers {
            for (name, spanned) in &layer.file.classes {
                let source = layer.source(spanned.span().start);
                let spec = spanned.get_ref().clone();
                let entry = class_specs
                    .entry(name.clone())
                    .or_insert_with(|| MergedClass {
                        spec: ClassSpec::default(),
                        source: source.clone(),
                        cpus_source: None,
                    });
                if let Some(cpus) = spec.cpus {
                    entry.cpus_source = Some(layer.source(cpus.span().start));
                    entry.spec.cpus = Some(cpus);
                }
                if spec.cpu_weight.is_some() {
                    entry.spec.cpu_weight = spec.cpu_weight;
                }
                if let Some(env) = spec.env {
                    entry.spec.env.get_or_insert_with(BTreeMap::new).extend(env);
                }
                if spec.user_run.is_some() {
                    entry.spec.user_run = spec.user_run;
                }
                entry.source = source;
            }
        }
        let mut classes = IndexMap::new();
        for (name, merged) in class_specs {
            let class = build_class(&name, merged)?;
            classes.insert(name, class);
        }
        classes.entry(SYSTEM.to_owned()).or_insert_with(|| Class {
            name: SYSTEM.to_owned(),
            cpus: None,
            cpu_weight: 100,
            env: BTreeMap::new(),
            user_run: false,
            source: built_in(),
            cpus_source: built_in(),
        });
        // Core-set intents that no machine could serve (a share outside
        // (0, 1], `with` naming no class or going round in a circle) are
        // refused now, at the class that asked.
        topology::check_intents(&core_specs(&classes)).map_err(|e| core_set_error(&classes, &e))?;

        // Rules: an override's rule replaces the shipped one of the same
        // name in place (or drops it with `disabled = true`); new rules go
        // before all shipped ones, so the user's rules win.
        let mut merged: Vec<(RuleSpec, Source)> = Vec::new();
        for (index, layer) in layers.iter().enumerate() {
            let mut fresh = Vec::new();
            let mut seen = BTreeSet::new();
            for spanned in &layer.file.rules {
                let spec = spanned.get_ref().clone();
                let source = layer.source(spanned.span().start);
                if !seen.insert(spec.name.clone()) {
                    return Err(layer.invalid(
                        spanned.span().start,
                        format!("rule `{}`: a rule with this name already exists in this file; names must be unique", spec.name),
                    ));
                }
                match merged.iter().position(|(r, _)| r.name == spec.name) {
                    Some(at) if index > 0 => {
                        if spec.disabled {
                            merged.remove(at);
                        } else {
                            merged[at] = (spec, source);
                        }
                    }
                    _ if spec.disabled => {
                        warnings.push(format!(
                            "{source}: rule `{}` is disabled but no earlier policy file has a rule of that name",
                            spec.name
                        ));
                    }
                    _ => fresh.push((spec, source)),
                }
            }
            if index == 0 {
                merged = fresh;
            } else {
                fresh.extend(merged);
                merged = fresh;
            }
        }
        let mut rules = Vec::with_capacity(merged.len());
        for (spec, source) in merged {
            rules.push(build_rule(spec, source, &classes)?);
        }

        let mut modes = ModeConfig::default();
        let mut ananicy = AnanicyConfig::default();
        let mut telemetry = TelemetryConfig::default();
        let mut gpu = GpuConfig::default();
        for layer in &layers {
            if let Some(g) = &layer.file.gpu {
                if let Some(enabled) = g.enabled {
                    gpu.enabled = enabled;
                }
                if let Some(library) = &g.library {
                    gpu.library = Some(library.clone());
                }
                if let Some(ms) = g.poll_interval_ms {
                    gpu.poll_interval = Duration::from_millis(ms.max(50));
                }
                if let Some(ms) = g.grace_ms {
                    gpu.arbiter.grace = Duration::from_millis(ms);
                }
                if let Some(margin) = g.margin {
                    gpu.arbiter.margin = margin;
                }
                if let Some(classes) = &g.classes {
                    // Key by key, like everything else: an override may
                    // change one class's `max` alone.
                    for (class, spanned) in classes {
                        let spec = spanned.get_ref();
                        let at = match gpu.arbiter.classes.iter().position(|b| b.class == *class) {
                            Some(at) => at,
                            None => {
                                let Some(priority) = spec.priority else {
                                    return Err(layer.invalid(
                                        spanned.span().start,
                                        format!("[gpu.classes.{class}]: missing `priority` (1 = highest; the largest number is acted on first)"),
                                    ));
                                };
                                gpu.arbiter.classes.push(ClassBudget {
                                    class: class.clone(),
                                    priority,
                                    reserve: None,
                                    min: None,
                                    max: None,
                                    ladder: Vec::new(),
                                });
                                gpu.arbiter.classes.len() - 1
                            }
                        };
                        let budget = &mut gpu.arbiter.classes[at];
                        if let Some(priority) = spec.priority {
                            budget.priority = priority;
                        }
                        if spec.reserve.is_some() {
                            budget.reserve = spec.reserve;
                        }
                        if spec.min.is_some() {
                            budget.min = spec.min;
                        }
                        if spec.max.is_some() {
                            budget.max = spec.max;
                        }
                        if let Some(ladder) = &spec.ladder {
                            budget.ladder = ladder.clone();
                        }
                    }
                }
                if let Some(t) = &g.thermal {
                    if t.gpu_max_c.is_some() {
                        gpu.thermal.gpu_max_c = t.gpu_max_c;
                    }
                    if t.cpu_max_c.is_some() {
                        gpu.thermal.cpu_max_c = t.cpu_max_c;
                    }
                    if let Some(h) = t.hysteresis_c {
                        gpu.thermal.hysteresis_c = h;
                    }
                    if let Some(ms) = t.hold_ms {
                        gpu.thermal.hold = Duration::from_millis(ms);
                    }
                    if let Some(cooled) = &t.classes {
                        check_cooled(layer, cooled, &classes)?;
                        gpu.cooled_classes = cooled.get_ref().clone();
                    }
                }
            }
            if let Some(t) = &layer.file.telemetry {
                if let Some(enabled) = t.enabled {
                    telemetry.enabled = enabled;
                }
                if let Some(addr) = &t.metrics_addr {
                    telemetry.metrics_addr = if addr.is_empty() {
                        None
                    } else {
                        Some(addr.parse().map_err(|_| PolicyError::Invalid {
                            path: layer.path.clone(),
                            line: find_key(&layer.text, "metrics_addr").map_or(0, |o| line_column(&layer.text, o).0),
                            column: 1,
                            message: format!("[telemetry] metrics_addr `{addr}` is not an address like \"127.0.0.1:9187\" (\"\" turns the endpoint off)"),
                        })?)
                    };
                }
            }
            if let Some(m) = &layer.file.modes {
                if let Some(ms) = m.hold_down_ms {
                    modes.hold_down = Duration::from_millis(ms);
                }
                if let Some(ms) = m.min_dwell_ms {
                    modes.min_dwell = Duration::from_millis(ms);
                }
                if let Some(class) = &m.protected_class {
                    let name = class.get_ref();
                    if name == SYSTEM || !classes.contains_key(name) {
                        let known: Vec<&str> = classes
                            .keys()
                            .map(String::as_str)
                            .filter(|c| *c != SYSTEM)
                            .collect();
                        return Err(layer.invalid(
                            class.span().start,
                            format!(
                                "[modes] protected_class: `{name}` is not a class corral places; use one of: {}",
                                known.join(", ")
                            ),
                        ));
                    }
                    gpu.arbiter.protected_class = name.clone();
                }
            }
            if let Some(a) = &layer.file.ananicy {
                if let Some(enabled) = a.enabled {
                    ananicy.enabled = enabled;
                }
                if let Some(dirs) = &a.dirs {
                    ananicy.dirs = dirs.clone();
                }
                if let Some(types) = &a.types {
                    ananicy.types = types.clone();
                }
            }
        }
        // The default list names classes a policy may not have.
        gpu.cooled_classes
            .retain(|c| classes.get(c).is_some_and(Class::is_managed));
        if ananicy.enabled {
            for (kind, class) in &ananicy.types {
                if !classes.contains_key(class) {
                    // The last layer that sets `types` is the one to fix.
                    let layer = layers
                        .iter()
                        .rev()
                        .find(|l| l.file.ananicy.as_ref().is_some_and(|a| a.types.is_some()))
                        .or(layers.last());
                    let (path, offset) = layer.map_or((PathBuf::new(), 0), |l| {
                        (l.path.clone(), find_key(&l.text, "types").unwrap_or(0))
                    });
                    let text = layer.map_or("", |l| l.text.as_str());
                    return Err(invalid_at(
                        &path,
                        text,
                        offset,
                        format!(
                            "[ananicy] types: `{kind}` maps to unknown class `{class}`; map it to a class defined under [classes]"
                        ),
                    ));
                }
            }
        }
        if gpu.enabled {
            let last = layers
                .iter()
                .rev()
                .find(|l| l.file.gpu.is_some())
                .or(layers.last());
            let fail = |message: String| match last {
                Some(l) => invalid_at(
                    &l.path,
                    &l.text,
                    find_key(&l.text, "gpu")
                        .or_else(|| l.text.find("[gpu"))
                        .unwrap_or(0),
                    message,
                ),
                None => invalid_at(Path::new(""), "", 0, message),
            };
            for budget in &gpu.arbiter.classes {
                if !classes.contains_key(&budget.class) {
                    return Err(fail(format!(
                        "[gpu.classes.{}]: no such class; define it under [classes]",
                        budget.class
                    )));
                }
            }
            gpu.arbiter
                .validate()
                .map_err(|e| fail(format!("[gpu]: {e}")))?;
        }

        Ok(Policy {
            files: layers.iter().map(|l| l.path.clone()).collect(),
            classes,
            rules,
            modes,
            ananicy,
            telemetry,
            gpu,
            power: PowerConfig::merged(&layers),
            notifications: NotificationsConfig::merged(&layers),
            warnings,
        })
    }

    /// The files, for messages: "default.toml + /etc/corral/policy.toml".
    pub fn describe_files(&self) -> String {
        self.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    }

    pub fn class(&self, name: &str) -> Option<&Class> {
        self.classes.get(name)
    }

    /// Resolves every managed class's core set on `topology`, in policy
    /// order. An explicit CPU list that names CPUs this machine does not
    /// have is refused, with the position of the class and the CPUs that
    /// exist.
    pub fn resolve_cpus(&self, topology: &Topology) -> Result<Vec<Resolved>, PolicyError> {
        topology::assign_core_sets(&core_specs(&self.classes), topology)
            .map_err(|e| core_set_error(&self.classes, &e))
    }

    /// The class corral protects (`[modes] protected_class`, default
    /// `game`): while one of its processes runs, dynamic modes keep the
    /// other classes off its cores, and the GPU ladder keeps VRAM for it and
    /// never acts on it. The one source of truth; the arbiter's
    /// `protected_class` is the same value.
    pub fn protected_class(&self) -> &str {
        &self.gpu.arbiter.protected_class
    }

    /// The classes whose core sets the thermal guard halves while it is too
    /// hot (`[gpu.thermal] classes`; by default `render` and `ai`, those of
    /// them that the policy has).
    pub fn cooled_classes(&self) -> &[String] {
        &self.gpu.cooled_classes
    }

    /// Environment variables the agent reads: those some rule looks at, and
    /// those the askers need to find an application's address
    /// ([`askers::ENV_KEYS`]). The process table keeps only these (and
    /// `procs::ENV_ALWAYS`) from /proc/PID/environ.
    pub fn env_keys(&self) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = askers::ENV_KEYS.iter().map(|k| (*k).to_owned()).collect();
        for rule in &self.rules {
            for m in [
                Some(&rule.matcher),
                rule.ancestor.as_ref(),
                rule.unless.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                keys.extend(m.env.iter().map(|(k, _)| k.clone()));
            }
        }
        keys
    }
}

/// Where the agent's policy comes from: the shipped default (a file, or the
/// copy built into the binary) and the user's override, which may not
/// exist yet.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub default: DefaultPolicy,
    pub override_path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum DefaultPolicy {
    File(PathBuf),
    /// (name for messages, text)
    BuiltIn(&'static str, &'static str),
}

impl PolicySource {
    pub fn load(&self) -> Result<Policy, PolicyError> {
        let (default_path, default_text) = match &self.default {
            DefaultPolicy::File(path) => (path.clone(), read_policy_file(path)?),
            DefaultPolicy::BuiltIn(name, text) => (PathBuf::from(name), (*text).to_owned()),
        };
        let mut texts = vec![(default_path, default_text)];
        if let Some(path) = &self.override_path {
            match read_policy_file(path) {
                Ok(text) => texts.push((path.clone(), text)),
                Err(PolicyError::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let borrowed: Vec<(&Path, &str)> = texts
            .iter()
            .map(|(p, t)| (p.as_path(), t.as_str()))
            .collect();
        Policy::parse_layers(&borrowed)
    }

    /// The files to watch for changes (the override may not exist yet).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let DefaultPolicy::File(path) = &self.default {
            files.push(path.clone());
        }
        files.extend(self.override_path.clone());
        files
    }
}

/// Reads a policy file, refusing one that anybody may write: corral runs as
/// root and moves other users' processes by these rules.
fn read_policy_file(path: &Path) -> Result<String, PolicyError> {
    let read_err = |source| PolicyError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.permissions().mode() & 0o002 != 0 {
        return Err(PolicyError::Invalid {
            path: path.to_owned(),
            line: 1,
            column: 1,
            message: format!(
                "the file is world-writable, so any user could change what root does with it; run `chmod o-w {}`",
                path.display()
            ),
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

/// One class as the layers leave it, before it is checked.
struct MergedClass {
    spec: ClassSpec,
    /// The last layer's `[classes.NAME]`.
    source: Source,
    /// The last layer's `cpus` value.
    cpus_source: Option<Source>,
}

fn built_in() -> Source {
    Source {
        file: PathBuf::from("<built-in>"),
        line: 0,
        column: 0,
    }
}

/// Every managed class's core-set request, in policy order.
fn core_specs(classes: &IndexMap<String, Class>) -> Vec<(String, CoreSpec)> {
    classes
        .values()
        .filter_map(|c| Some((c.name.clone(), c.cpus.clone()?)))
        .collect()
}

/// A core-set error, at the `cpus` of the class that asked.
fn core_set_error(classes: &IndexMap<String, Class>, error: &CoreSetError) -> PolicyError {
    let source = classes
        .get(error.class())
        .map_or_else(built_in, |c| c.cpus_source.clone());
    invalid_source(&source, error.to_string())
}

/// Checks `[gpu.thermal] classes` in `layer`: each must be a class with
/// cpus, or there is nothing to halve.
fn check_cooled(
    layer: &Layer,
    cooled: &toml::Spanned<Vec<String>>,
    classes: &IndexMap<String, Class>,
) -> Result<(), PolicyError> {
    for class in cooled.get_ref() {
        if !classes.get(class).is_some_and(Class::is_managed) {
            let managed: Vec<&str> = classes
                .values()
                .filter(|c| c.is_managed())
                .map(|c| c.name.as_str())
                .collect();
            return Err(layer.invalid(
                cooled.span().start,
                format!(
                    "[gpu.thermal] classes: `{class}` is not a class with cpus, so the thermal guard has no cores of it to halve; use some of: {}",
                    managed.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn build_class(name: &str, merged: MergedClass) -> Result<Class, PolicyError> {
    let MergedClass {
        spec,
        source,
        cpus_source,
    } = merged;
    let fail = |message: String| invalid_source(&source, format!("class `{name}`: {message}"));
    let cpus = spec.cpus.map(toml::Spanned::into_inner);
    let cpu_weight = spec.cpu_weight.unwrap_or(100);
    if !(1..=10000).contains(&cpu_weight) {
        return Err(fail(format!(
            "cpu_weight {cpu_weight} is outside 1..=10000"
        )));
    }
    if name == SYSTEM && cpus.is_some() {
        return Err(fail(
            "`system` is left alone by design; remove its `cpus`".into(),
        ));
    }
    Ok(Class {
        name: name.to_owned(),
        cpus,
        cpu_weight,
        env: spec.env.unwrap_or_default(),
        user_run: spec.user_run.unwrap_or(false),
        cpus_source: cpus_source.unwrap_or_else(|| source.clone()),
        source,
    })
}

fn build_rule(
    spec: RuleSpec,
    source: Source,
    classes: &IndexMap<String, Class>,
) -> Result<Rule, PolicyError> {
    let fail =
        |message: String| invalid_source(&source, format!("rule `{}`: {message}", spec.name));
    let class = spec
        .class
        .clone()
        .ok_or_else(|| fail("has no `class`".into()))?;
    if !classes.contains_key(&class) {
        let known: Vec<_> = classes.keys().cloned().collect();
        return Err(fail(format!(
            "unknown class `{class}`; define it under [classes] or use one of: {}",
            known.join(", ")
        )));
    }
    let own = MatcherSpec {
        exe: spec.exe.clone(),
        comm: spec.comm.clone(),
        argv: spec.argv.clone(),
        cwd: spec.cwd.clone(),
        cgroup: spec.cgroup.clone(),
        env: spec.env.clone(),
    };
    let compile = |m: &MatcherSpec| compile_matcher(m, spec.ignore_case).map_err(&fail);
    let matcher = compile(&own)?;
    let ancestor = spec.ancestor.as_ref().map(compile).transpose()?;
    let unless = spec.unless.as_ref().map(compile).transpose()?;
    if matcher.is_empty() && ancestor.as_ref().is_none_or(Matcher::is_empty) {
        return Err(fail(
            "matches every process; give it at least one matcher".into(),
        ));
    }
    Ok(Rule {
        name: spec.name,
        class,
        inherit: spec.inherit,
        matcher,
        ancestor,
        unless,
        source,
    })
}

impl Matcher {
    pub fn is_empty(&self) -> bool {
        self.exe.is_empty()
            && self.comm.is_empty()
            && self.argv.is_empty()
            && self.cwd.is_empty()
            && self.cgroup.is_empty()
            && self.env.is_empty()
    }
}

fn compile_matcher(spec: &MatcherSpec, ignore_case: bool) -> Result<Matcher, String> {
    let globs = |field: &str, list: &[String]| -> Result<Vec<GlobMatcher>, String> {
        list.iter().map(|g| glob(field, g, ignore_case)).collect()
    };
    Ok(Matcher {
        exe: globs("exe", &spec.exe)?,
        comm: globs("comm", &spec.comm)?,
        argv: globs("argv", &spec.argv)?,
        cwd: globs("cwd", &spec.cwd)?,
        cgroup: globs("cgroup", &spec.cgroup)?,
        env: spec
            .env
            .iter()
            .map(|(k, v)| Ok((k.clone(), glob("env", v, ignore_case)?)))
            .collect::<Result<_, String>>()?,
    })
}

fn glob(field: &str, pattern: &str, ignore_case: bool) -> Result<GlobMatcher, String> {
    let built: Result<Glob, _> = GlobBuilder::new(pattern)
        .case_insensitive(ignore_case)
        .literal_separator(false)
        .build();
    built
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{field} pattern `{pattern}` is not a valid glob: {e}"))
}

/// Warns about keys no part of corral reads, with their position.
fn unknown_keys(path: &Path, text: &str, table: &toml::Table, warnings: &mut Vec<String>) {
    let mut warn = |key: &str, place: &str, known: &[&str]| {
        // toml's untyped table has no spans: find the key's first use.
        let offset = find_key(text, key).unwrap_or(0);
        let (line, column) = line_column(text, offset);
        warnings.push(format!(
            "{}:{line}:{column}: unknown key `{key}` in {place} is ignored (known keys: {})",
            path.display(),
            known.join(", ")
        ));
    };
    let check = |t: &toml::Table,
                 place: &str,
                 known: &[&str],
                 warn: &mut dyn FnMut(&str, &str, &[&str])| {
        for key in t.keys() {
            if !known.contains(&key.as_str()) {
                warn(key, place, known);
            }
        }
    };
    check(table, "the top level", TOP_KEYS, &mut warn);
    if let Some(classes) = table.get("classes").and_then(|v| v.as_table()) {
        for (name, class) in classes {
            if let Some(class) = class.as_table() {
                check(class, &format!("[classes.{name}]"), CLASS_KEYS, &mut warn);
            }
        }
    }
    if let Some(rules) = table.get("rules").and_then(|v| v.as_array()) {
        for rule in rules.iter().filter_map(|r| r.as_table()) {
            let name = rule.get("name").and_then(|n| n.as_str()).unwrap_or("?");
            check(rule, &format!("rule `{name}`"), RULE_KEYS, &mut warn);
            for nested in ["ancestor", "unless"] {
                if let Some(m) = rule.get(nested).and_then(|v| v.as_table()) {
                    check(
                        m,
                        &format!("rule `{name}` {nested}"),
                        MATCHER_KEYS,
                        &mut warn,
                    );
                }
            }
        }
    }
    if let Some(m) = table.get("modes").and_then(|v| v.as_table()) {
        check(m, "[modes]", MODES_KEYS, &mut warn);
    }
    if let Some(a) = table.get("ananicy").and_then(|v| v.as_table()) {
        check(a, "[ananicy]", ANANICY_KEYS, &mut warn);
    }
    if let Some(t) = table.get("telemetry").and_then(|v| v.as_table()) {
        check(t, "[telemetry]", TELEMETRY_KEYS, &mut warn);
    }
    if let Some(g) = table.get("gpu").and_then(|v| v.as_table()) {
        check(g, "[gpu]", GPU_KEYS, &mut warn);
    }
    for (key, known) in [("power", POWER_KEYS), ("notifications", NOTIFICATIONS_KEYS)] {
        if let Some(t) = table.get(key).and_then(|v| v.as_table()) {
            check(t, &format!("[{key}]"), known, &mut warn);
        }
    }
}

/// Byte offset of the first `key =` (or `key=`) at the start of a line or
/// after `{`/`,`.
fn find_key(text: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find(key) {
        let at = from + found;
        let before = text[..at].trim_end_matches([' ', '\t']);
        let after = text[at + key.len()..].trim_start_matches([' ', '\t']);
        let starts = before.is_empty() || before.ends_with(['\n', '{', ',']);
        if starts && after.starts_with('=') {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
