//! The policy: classes (core sets, cpu weights), ordered rules that say
//! which processes belong to which class, dynamic-mode timing and the
//! optional ananicy-cpp rule source. Parsing, layering (shipped default,
//! then the user's override, key by key) and validation; matching lives in
//! `classify`, core-set resolution in `coresets`. Rules and matchers are in
//! policy/rules.rs, `[gpu]` in policy/gpu.rs, key checks and positions in
//! policy/keys.rs, tests in policy/tests.rs.
//!
//! Length: parsing, layering and validation of one file format; the sections with their own rules live in policy/ (rules, gpu, keys, desktop).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use indexmap::IndexMap;
use serde::Deserialize;

use crate::{
    gpu::askers,
    model::modes::ModeConfig,
    model::{
        coresets::{self, CoreSetError, CoreSpec, Resolved},
        topology::Topology,
    },
};

pub use desktop::{NotificationsConfig, PowerConfig};
use desktop::{NotificationsSpec, PowerSpec};
pub use gpu::GpuConfig;
use gpu::GpuSpec;
use keys::{find_key, line_column, unknown_keys};
pub use rules::{Matcher, Rule, STEAM_APP_ENV, SteamApp};
use rules::{RuleSpec, build_rule};

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
        coresets::check_intents(&core_specs(&classes)).map_err(|e| core_set_error(&classes, &e))?;

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
                gpu::merge(&mut gpu, layer, g, &classes)?;
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
                        return Err(layer.invalid(
                            class.span().start,
                            format!(
                                "[modes] protected_class: `{name}` is not a class corral places; use one of: {}",
                                class_names(&classes, |c| c.name != SYSTEM)
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
            gpu::validate(&gpu, &layers, &classes)?;
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
        coresets::assign_core_sets(&core_specs(&self.classes), topology)
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
                keys.extend(m.env_keys().map(str::to_owned));
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

/// The names of the classes `keep` keeps, in policy order, for messages.
fn class_names(classes: &IndexMap<String, Class>, keep: impl Fn(&Class) -> bool) -> String {
    classes
        .values()
        .filter(|c| keep(c))
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
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

mod desktop;
mod gpu;
mod keys;
mod rules;
#[cfg(test)]
mod tests;
