//! Decides a process's class: the policy's own rules first, then the
//! optional ananicy-cpp rules (by process name), then the class its nearest
//! classified ancestor passes down, else `system`. One step
//! ([`classify_one`]) and the two walks over it: a process table, parents
//! first ([`classify_table`]), and a recorded chain ([`classify_chain`],
//! read by [`recorded_chains`]).
//!
//! Length: the matching walk, the offline chain reader and `--rules` share one file on purpose; the unit tests are the last 280 lines.

use std::io::BufRead;

use serde::{Deserialize, Serialize};

use crate::model::ananicy::AnanicyRules;
use globset::GlobMatcher;

use crate::model::policy::{Matcher, Policy, Rule, STEAM_APP_ENV, SYSTEM};
use crate::model::procs::{Facts, ProcInfo, Table};

/// Why a process is in its class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub class: String,
    /// Rule name; "default" when no rule matched.
    pub rule: String,
    /// `file:line` of the rule, when one matched.
    pub source: Option<String>,
    /// Set when the class came from an ancestor: that ancestor's pid (0 in
    /// offline chains) and comm.
    pub inherited_from: Option<Ancestor>,
    /// Whether descendants without a rule of their own take this class.
    pub passes_down: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
    /// Position in the chain, 0 = outermost.
    pub depth: usize,
}

impl Decision {
    pub fn default_system() -> Self {
        Decision {
            class: SYSTEM.to_owned(),
            rule: "default".to_owned(),
            source: None,
            inherited_from: None,
            passes_down: false,
        }
    }

    /// A process its user declared a member of `class` (a GameMode
    /// registration): `rule` says who declared it, `source` through what.
    /// Its descendants take the class.
    pub fn declared(class: &str, rule: String, source: String) -> Self {
        Decision {
            class: class.to_owned(),
            rule,
            source: Some(source),
            inherited_from: None,
            passes_down: true,
        }
    }

    fn from_rule(rule: &Rule) -> Self {
        Decision {
            class: rule.class.clone(),
            rule: rule.name.clone(),
            source: Some(rule.source.to_string()),
            inherited_from: None,
            passes_down: rule.inherit,
        }
    }

    /// What a process with no rule of its own gets from a parent that was
    /// decided as `self`.
    pub fn passed_to_child(&self, parent: &ProcInfo, depth: usize) -> Option<Decision> {
        if !self.passes_down {
            return None;
        }
        let mut child = self.clone();
        if child.inherited_from.is_none() {
            child.inherited_from = Some(Ancestor {
                pid: parent.pid,
                comm: parent.comm.clone(),
                depth,
            });
        }
        Some(child)
    }
}

/// Classifies `process`, given its ancestors (outermost first) and the
/// decision of its parent (None when unknown or unclassified).
pub fn classify_one(
    policy: &Policy,
    ananicy: Option<&AnanicyRules>,
    process: &ProcInfo,
    ancestors: &[&ProcInfo],
    parent_decision: Option<&Decision>,
) -> Decision {
    if let Some(rule) = policy
        .rules
        .iter()
        .find(|r| rule_matches(r, process, ancestors))
    {
        return Decision::from_rule(rule);
    }
    if let Some(found) = ananicy
        .and_then(|a| a.lookup_process(&process.comm, process.argv.first().map(String::as_str)))
    {
        // ananicy-cpp rules name one program each: nothing passes down.
        return Decision {
            class: found.class.to_owned(),
            rule: format!("ananicy:{} ({})", found.name, found.ananicy_type),
            source: Some(found.source.to_string()),
            inherited_from: None,
            passes_down: false,
        };
    }
    match (parent_decision, ancestors.last()) {
        (Some(decision), Some(parent)) => decision
            .passed_to_child(parent, ancestors.len() - 1)
            .unwrap_or_else(Decision::default_system),
        _ => Decision::default_system(),
    }
}

/// The optional facts (exe, argv, cwd, environment) `policy` can use for a
/// process whose facts are `known`, of which the optional ones `held` were
/// read: those of every rule whose comm glob, and exe glob once the exe is
/// read, let it match (its own matcher and `unless`). What the exec path
/// reads from /proc: asked first with no exe, and again with it if an exe
/// glob wanted it. A rule left out fails on comm or exe, which
/// [`first_miss`] checks first, so `--rules` reports the same miss from a
/// partial read as from a full one. Ancestor matchers are left to
/// [`ancestor_facts_needed`].
pub fn facts_needed(policy: &Policy, known: &ProcInfo, held: Facts) -> Facts {
    let passes = |globs: &[GlobMatcher], value: &str, read: bool| {
        globs.is_empty() || !read || globs.iter().any(|g| g.is_match(value))
    };
    policy.rules.iter().fold(Facts::NONE, |facts, rule| {
        let m = &rule.matcher;
        if !(passes(&m.comm, &known.comm, true) && passes(&m.exe, &known.exe, held.exe)) {
            return facts;
        }
        let facts = facts.union(m.facts_used());
        match &rule.unless {
            Some(u) => facts.union(u.facts_used()),
            None => facts,
        }
    })
}

/// The facts `policy`'s ancestor matchers look at for `process`: those of
/// every rule with an `ancestor` whose own matcher `process` passes. Its
/// ancestors must hold them before it is classified; the exec path read
/// each process only for its own rules.
pub fn ancestor_facts_needed(policy: &Policy, process: &ProcInfo) -> Facts {
    policy
        .rules
        .iter()
        .filter_map(|rule| rule.ancestor.as_ref().map(|a| (rule, a)))
        .filter(|(rule, _)| first_miss(&rule.matcher, process).is_none())
        .fold(Facts::NONE, |facts, (_, a)| facts.union(a.facts_used()))
}

/// Classifies the last process of `chain` (outermost ancestor first).
pub fn classify_chain(
    policy: &Policy,
    ananicy: Option<&AnanicyRules>,
    chain: &[ProcInfo],
) -> Decision {
    let refs: Vec<&ProcInfo> = chain.iter().collect();
    let mut decision: Option<Decision> = None;
    for (i, process) in chain.iter().enumerate() {
        decision = Some(classify_one(
            policy,
            ananicy,
            process,
            &refs[..i],
            decision.as_ref(),
        ));
    }
    decision.unwrap_or_else(Decision::default_system)
}

/// Classifies `pid` as the table stands: its own facts, its ancestors'
/// facts, and the decision its parent holds in the table. None when the
/// table does not know `pid`.
pub fn classify_in_table(
    policy: &Policy,
    ananicy: Option<&AnanicyRules>,
    table: &Table,
    pid: u32,
) -> Option<Decision> {
    let process = table.get(pid)?;
    let ancestors = table.ancestors(pid);
    let parent = ancestors
        .last()
        .and_then(|a| table.get(*a))
        .map(|p| &p.decision);
    let infos = ancestor_infos(table, &ancestors);
    Some(classify_one(policy, ananicy, &process.info, &infos, parent))
}

/// [`explain_rules`] for `pid` as the table stands (empty when the table
/// does not know it).
pub fn explain_in_table(policy: &Policy, table: &Table, pid: u32) -> Vec<RuleVerdict> {
    let Some(process) = table.get(pid) else {
        return Vec::new();
    };
    let infos = ancestor_infos(table, &table.ancestors(pid));
    explain_rules(policy, &process.info, &infos)
}

/// The facts of `ancestors` (pids, outermost first) that the table holds.
fn ancestor_infos<'t>(table: &'t Table, ancestors: &[u32]) -> Vec<&'t ProcInfo> {
    ancestors
        .iter()
        .filter_map(|a| table.get(*a).map(|p| &p.info))
        .collect()
}

/// Re-classifies every process in `table`, parents before children, and
/// stores each decision as it goes, so a child sees its parent's new
/// decision. A process put in its class by `corral run --class` (`pinned`)
/// keeps it. Returns the pids whose class changed, parents first.
///
/// The one walk for everything that classifies a whole table: the agent's
/// /proc seed and policy reload, and `corral policy test`.
pub fn classify_table(
    policy: &Policy,
    ananicy: Option<&AnanicyRules>,
    table: &mut Table,
) -> Vec<u32> {
    let mut changed = Vec::new();
    for pid in table.parents_first() {
        if table.get(pid).is_none_or(|p| p.pinned) {
            continue;
        }
        if let Some(decision) = classify_in_table(policy, ananicy, table, pid)
            && table.set_decision(pid, decision)
        {
            changed.push(pid);
        }
    }
    changed
}

/// One recorded process chain: `{"id": ..., "chain": [process, ...]}`,
/// ancestors first and the process to classify last (the input of `corral
/// classify` and `corral policy test --procs`).
#[derive(Debug, Clone, Deserialize)]
pub struct RecordedChain {
    /// Whatever the recorder used to name the chain; shown back as given.
    pub id: serde_json::Value,
    pub chain: Vec<ProcInfo>,
}

/// Why a line of recorded chains could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("{name}:{line}: could not read: {source}")]
    Read {
        name: String,
        line: usize,
        source: std::io::Error,
    },
    #[error("{name}:{line}: not a chain object ({source})")]
    NotAChain {
        name: String,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{name}:{line}: `chain` is empty; list ancestors first and the process last")]
    Empty { name: String, line: usize },
}

/// Reads recorded chains from JSON lines, one at a time, so a caller can
/// answer each before a bad line stops it. Blank lines are skipped; `name`
/// (the file, or `-`) and the line number go into every error.
pub fn recorded_chains<R: BufRead>(
    reader: R,
    name: &str,
) -> impl Iterator<Item = Result<RecordedChain, ChainError>> {
    let name = name.to_owned();
    reader.lines().enumerate().filter_map(move |(index, line)| {
        let line_number = index + 1;
        let text = match line {
            Ok(text) => text,
            Err(source) => {
                return Some(Err(ChainError::Read {
                    name: name.clone(),
                    line: line_number,
                    source,
                }));
            }
        };
        if text.trim().is_empty() {
            return None;
        }
        Some(match serde_json::from_str::<RecordedChain>(&text) {
            Err(source) => Err(ChainError::NotAChain {
                name: name.clone(),
                line: line_number,
                source,
            }),
            Ok(chain) if chain.chain.is_empty() => Err(ChainError::Empty {
                name: name.clone(),
                line: line_number,
            }),
            Ok(chain) => Ok(chain),
        })
    })
}

fn rule_matches(rule: &Rule, process: &ProcInfo, ancestors: &[&ProcInfo]) -> bool {
    rule_miss(rule, process, ancestors).is_none()
}

/// Whether every field the matcher names matches the process.
pub fn matches(m: &Matcher, p: &ProcInfo) -> bool {
    first_miss(m, p).is_none()
}

/// Why a rule does not match a process: the first of its parts that fails.
enum RuleMiss<'m, 'p> {
    Own(Miss<'m, 'p>),
    /// `ancestor`: no ancestor matches it.
    Ancestor(&'m Matcher),
    /// `unless`: the process matches it.
    Unless(&'m Matcher),
}

/// The first field of a matcher that a process fails, in the order exe,
/// comm, cwd, cgroup, argv, env, steam_app.
enum Miss<'m, 'p> {
    /// exe, comm, cwd or cgroup: no glob of the list matches the value.
    Value(&'static str, &'m [GlobMatcher], &'p str),
    /// This argv glob matches no argument.
    Argv(&'m GlobMatcher),
    /// This env key is unset or set to something else.
    Env(&'m str, &'m GlobMatcher),
    SteamApp(u64),
}

fn rule_miss<'m, 'p>(
    rule: &'m Rule,
    process: &'p ProcInfo,
    ancestors: &[&ProcInfo],
) -> Option<RuleMiss<'m, 'p>> {
    if let Some(miss) = first_miss(&rule.matcher, process) {
        return Some(RuleMiss::Own(miss));
    }
    if let Some(wanted) = &rule.ancestor
        && !ancestors.iter().rev().any(|a| matches(wanted, a))
    {
        return Some(RuleMiss::Ancestor(wanted));
    }
    if let Some(excluded) = &rule.unless
        && matches(excluded, process)
    {
        return Some(RuleMiss::Unless(excluded));
    }
    None
}

/// The one matching walk: [`matches`] and `--rules` both read it.
fn first_miss<'m, 'p>(m: &'m Matcher, p: &'p ProcInfo) -> Option<Miss<'m, 'p>> {
    // comm before exe: the exec path reads the exe only for rules whose
    // comm lets them match.
    let values = [
        ("comm", &m.comm, &p.comm),
        ("exe", &m.exe, &p.exe),
        ("cwd", &m.cwd, &p.cwd),
        ("cgroup", &m.cgroup, &p.cgroup),
    ];
    for (field, globs, value) in values {
        if !globs.is_empty() && !globs.iter().any(|g| g.is_match(value)) {
            return Some(Miss::Value(field, globs, value));
        }
    }
    if let Some(g) = m
        .argv
        .iter()
        .find(|g| !p.argv.iter().any(|a| g.is_match(a)))
    {
        return Some(Miss::Argv(g));
    }
    if let Some((key, g)) = m
        .env
        .iter()
        .find(|(key, g)| !p.env.get(key).is_some_and(|v| g.is_match(v)))
    {
        return Some(Miss::Env(key, g));
    }
    if let Some(app) = &m.steam_app
        && !app.expands_to.iter().any(|alt| matches(alt, p))
    {
        return Some(Miss::SteamApp(app.id));
    }
    None
}

/// One rule's verdict on one process, for `corral explain --rules` and
/// `corral classify --explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleVerdict {
    pub rule: String,
    pub class: String,
    /// `file:line` of the rule.
    pub source: String,
    /// The first matcher that failed, as `exe */blender: no, exe is
    /// /usr/bin/python3`; None when the rule matched.
    pub failed: Option<String>,
}

/// Every rule of `policy`, in order, against `process` (whose ancestors are
/// `ancestors`, outermost first): whether it matched, and if not, why not.
pub fn explain_rules(
    policy: &Policy,
    process: &ProcInfo,
    ancestors: &[&ProcInfo],
) -> Vec<RuleVerdict> {
    policy
        .rules
        .iter()
        .map(|rule| RuleVerdict {
            rule: rule.name.clone(),
            class: rule.class.clone(),
            source: rule.source.to_string(),
            failed: rule_miss(rule, process, ancestors)
                .map(|miss| describe_rule_miss(&miss, process, ancestors.len())),
        })
        .collect()
}

/// [`explain_rules`] for the last process of `chain` (outermost first).
pub fn explain_chain(policy: &Policy, chain: &[ProcInfo]) -> Vec<RuleVerdict> {
    let Some((process, ancestors)) = chain.split_last() else {
        return Vec::new();
    };
    let refs: Vec<&ProcInfo> = ancestors.iter().collect();
    explain_rules(policy, process, &refs)
}

fn describe_rule_miss(miss: &RuleMiss<'_, '_>, p: &ProcInfo, ancestors: usize) -> String {
    match miss {
        RuleMiss::Own(miss) => describe_miss(miss, p),
        RuleMiss::Ancestor(m) => format!(
            "ancestor {}: no, none of its {ancestors} ancestors matches",
            summary(m)
        ),
        RuleMiss::Unless(m) => format!("unless {}: yes, so the rule does not apply", summary(m)),
    }
}

fn describe_miss(miss: &Miss<'_, '_>, p: &ProcInfo) -> String {
    let shown = |value: &str| {
        if value.is_empty() {
            "empty".to_owned()
        } else {
            value.to_owned()
        }
    };
    match miss {
        Miss::Value(field, globs, value) => {
            format!(
                "{field} {}: no, {field} is {}",
                patterns(globs),
                shown(value)
            )
        }
        Miss::Argv(g) => format!(
            "argv {}: no, no argument matches (argv is {})",
            g.glob().glob(),
            shown(&p.argv.join(" "))
        ),
        Miss::Env(key, g) => match p.env.get(*key) {
            Some(value) => format!("env {key}={}: no, {key} is {value}", g.glob().glob()),
            None => format!("env {key}={}: no, {key} is unset", g.glob().glob()),
        },
        Miss::SteamApp(id) => {
            let set: Vec<String> = STEAM_APP_ENV
                .iter()
                .filter_map(|key| Some(format!("{key} is {}", p.env.get(*key)?)))
                .collect();
            let found = if set.is_empty() {
                format!("{} are unset", STEAM_APP_ENV.join(", "))
            } else {
                set.join(", ")
            };
            format!("steam_app {id}: no, {found} and no argument is AppId={id}")
        }
    }
}

/// `exe */blender, */blender-*`: a matcher's first field, for messages.
fn summary(m: &Matcher) -> String {
    let lists = [
        ("exe", &m.exe),
        ("comm", &m.comm),
        ("cwd", &m.cwd),
        ("cgroup", &m.cgroup),
        ("argv", &m.argv),
    ];
    if let Some((field, globs)) = lists.iter().find(|(_, g)| !g.is_empty()) {
        return format!("{field} {}", patterns(globs));
    }
    if let Some((key, g)) = m.env.first() {
        return format!("env {key}={}", g.glob().glob());
    }
    m.steam_app
        .as_ref()
        .map_or_else(String::new, |app| format!("steam_app {}", app.id))
}

fn patterns(globs: &[GlobMatcher]) -> String {
    globs
        .iter()
        .map(|g| g.glob().glob())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Written with inline tables, the other form a policy may take.
    fn policy() -> Policy {
        Policy::parse(
            Path::new("t.toml"),
            r#"
classes = { game = { cpus = "0" }, dev = { cpus = "1" } }
rules = [
    { name = "launcher", class = "system", comm = ["launcher"] },
    { name = "game-tree", class = "game", inherit = true, comm = ["reaper"], argv = ["SteamLaunch"] },
    { name = "editor", class = "dev", inherit = true, exe = ["*/nvim"], unless = { argv = ["--headless-probe"] } },
    { name = "dota", class = "game", steam_app = 570 },
    { name = "in-editor", class = "dev", ancestor = { exe = ["*/nvim"] }, env = { TERM = "xterm*" } },
]
"#,
        )
        .unwrap()
    }

    fn p(comm: &str, exe: &str, argv: &[&str]) -> ProcInfo {
        ProcInfo {
            comm: comm.into(),
            exe: exe.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    const EXE: Facts = Facts {
        exe: true,
        ..Facts::NONE
    };
    const ARGV: Facts = Facts {
        argv: true,
        ..Facts::NONE
    };
    const CWD: Facts = Facts {
        cwd: true,
        ..Facts::NONE
    };
    const ENV: Facts = Facts {
        env: true,
        ..Facts::NONE
    };

    /// The exec path asks twice: with no exe read, then with it.
    fn needed_in_stages(policy: &Policy, process: &ProcInfo) -> (Facts, Option<Facts>) {
        let unread = ProcInfo {
            exe: String::new(),
            ..process.clone()
        };
        let first = facts_needed(policy, &unread, Facts::NONE);
        let second = first
            .exe
            .then(|| facts_needed(policy, process, EXE).union(EXE));
        (first, second)
    }

    #[test]
    fn facts_needed_are_those_of_rules_that_can_still_match_the_exe_first() {
        let comm_only = Policy::parse(
            Path::new("t.toml"),
            "classes = { game = { cpus = \"0\" } }\nrules = [{ name = \"s\", class = \"game\", comm = [\"stormgame\"] }]\n",
        )
        .unwrap();
        // Nothing: not even the exe.
        let storm = p("stormgame", "/tmp/stormgame", &[]);
        assert_eq!(needed_in_stages(&comm_only, &storm), (Facts::NONE, None));
        // `in-editor` has no exe or comm and reads env; `dota`'s steam_app
        // expands to env and argv matchers: both, for every process. The
        // exe for `editor`, whose exe glob then fails for make.
        let policy = policy();
        assert_eq!(
            needed_in_stages(&policy, &p("make", "/usr/bin/make", &[])),
            (EXE.union(ENV).union(ARGV), Some(EXE.union(ENV).union(ARGV)))
        );
        let no_steam = Policy::parse(
            Path::new("t.toml"),
            r#"
classes = { dev = { cpus = "1" } }
rules = [
    { name = "editor", class = "dev", exe = ["*/nvim"], unless = { argv = ["--probe"] } },
    { name = "proj", class = "dev", comm = ["make"], cwd = ["*/proj"] },
    { name = "in-editor", class = "dev", ancestor = { exe = ["*/nvim"], env = { TERM = "x*" } } },
]
"#,
        )
        .unwrap();
        // The exe for `editor`; given /usr/bin/cc, nothing more. The
        // ancestor matcher's facts are the ancestors' to hold.
        assert_eq!(
            needed_in_stages(&no_steam, &p("cc", "/usr/bin/cc", &[])),
            (EXE.union(ARGV), Some(EXE))
        );
        // nvim could be `editor`: its `unless` reads argv.
        assert_eq!(
            needed_in_stages(&no_steam, &p("nvim", "/usr/bin/nvim", &[])),
            (EXE.union(ARGV), Some(EXE.union(ARGV)))
        );
        // make could be `proj` (its cwd) and, before the exe, `editor`.
        assert_eq!(
            needed_in_stages(&no_steam, &p("make", "/usr/bin/make", &[])),
            (EXE.union(ARGV).union(CWD), Some(EXE.union(CWD)))
        );
        // The exec path's question answers every rule: the partial read
        // classifies and explains as a full one does.
        for process in [
            p("cc", "/usr/bin/cc", &[]),
            p("nvim", "/usr/bin/nvim", &["nvim", "--probe"]),
            p("make", "/usr/bin/make", &["make"]),
        ] {
            let (first, second) = needed_in_stages(&no_steam, &process);
            let mut partial = process.clone();
            second.unwrap_or(first).blank(&mut partial);
            assert_eq!(
                explain_rules(&no_steam, &partial, &[]),
                explain_rules(&no_steam, &process, &[]),
                "{process:?}"
            );
        }
    }

    #[test]
    fn ancestor_facts_are_needed_for_rules_the_process_passes_on_its_own() {
        let policy = Policy::parse(
            Path::new("t.toml"),
            r#"
classes = { dev = { cpus = "1" }, render = { cpus = "0" } }
rules = [
    { name = "in-editor", class = "dev", ancestor = { exe = ["*/nvim"], env = { TERM = "x*" } } },
    { name = "blender-child", class = "render", comm = ["python3"], ancestor = { exe = ["*/blender"], argv = ["-b"] } },
]
"#,
        )
        .unwrap();
        // `in-editor` has no own matcher: everyone passes it.
        assert_eq!(
            ancestor_facts_needed(&policy, &p("cc", "/usr/bin/cc", &[])),
            EXE.union(ENV)
        );
        assert_eq!(
            ancestor_facts_needed(&policy, &p("python3", "/usr/bin/python3", &[])),
            EXE.union(ENV).union(ARGV)
        );
        let comm_only = Policy::parse(
            Path::new("t.toml"),
            "classes = { game = { cpus = \"0\" } }\nrules = [{ name = \"s\", class = \"game\", comm = [\"stormgame\"] }]\n",
        )
        .unwrap();
        assert_eq!(
            ancestor_facts_needed(&comm_only, &p("stormgame", "", &[])),
            Facts::NONE
        );
    }

    #[test]
    fn own_rule_beats_inheritance() {
        let chain = [
            p("reaper", "/s/reaper", &["reaper", "SteamLaunch"]),
            p("nvim", "/usr/bin/nvim", &["nvim"]),
        ];
        let d = classify_chain(&policy(), None, &chain);
        assert_eq!((d.class.as_str(), d.rule.as_str()), ("dev", "editor"));
        assert!(d.inherited_from.is_none());
    }

    #[test]
    fn unmatched_child_inherits_from_nearest_classified_ancestor() {
        let chain = [
            p("reaper", "/s/reaper", &["reaper", "SteamLaunch"]),
            p("sh", "/bin/sh", &["sh"]),
            p("game", "/g/game", &["game"]),
        ];
        let d = classify_chain(&policy(), None, &chain);
        assert_eq!(d.class, "game");
        assert_eq!(d.inherited_from.unwrap().depth, 0);
    }

    #[test]
    fn non_inheriting_ancestor_stops_inheritance() {
        let chain = [
            p("reaper", "/s/reaper", &["reaper", "SteamLaunch"]),
            p("launcher", "/l", &["launcher"]),
            p("child", "/c", &["child"]),
        ];
        assert_eq!(classify_chain(&policy(), None, &chain).class, "system");
    }

    /// reaper (pid 10, SteamLaunch) -> sh (11) -> game (12), and nvim (20)
    /// pinned to `game` by `corral run --class`.
    fn table() -> Table {
        let mut table = Table::default();
        for (pid, ppid, info) in [
            (10, 1, p("reaper", "/s/reaper", &["reaper", "SteamLaunch"])),
            (11, 10, p("sh", "/bin/sh", &["sh"])),
            (12, 11, p("game", "/g/game", &["game"])),
            (20, 1, p("nvim", "/usr/bin/nvim", &["nvim"])),
        ] {
            let info = ProcInfo { pid, ..info };
            table.insert(pid, crate::model::procs::Proc::new(info, ppid, 1));
        }
        table.get_mut(20).unwrap().pinned = true;
        let entered = Decision {
            class: "game".into(),
            ..Decision::default_system()
        };
        table.set_decision(20, entered);
        table
    }

    #[test]
    fn table_walk_passes_each_parents_new_decision_down_and_keeps_pinned() {
        let mut table = table();
        let changed = classify_table(&policy(), None, &mut table);
        assert_eq!(changed, [10, 11, 12]);
        let game = &table.get(12).unwrap().decision;
        assert_eq!(
            (game.class.as_str(), game.rule.as_str()),
            ("game", "game-tree")
        );
        let from = game.inherited_from.as_ref().unwrap();
        assert_eq!(
            (from.pid, from.comm.as_str(), from.depth),
            (10, "reaper", 0)
        );
        assert_eq!(table.get(20).unwrap().decision.class, "game", "pinned");
        // The same walk again changes nothing.
        assert!(classify_table(&policy(), None, &mut table).is_empty());
    }

    #[test]
    fn table_walk_agrees_with_the_chain_walk() {
        let mut table = table();
        classify_table(&policy(), None, &mut table);
        let chain: Vec<ProcInfo> = [10, 11, 12]
            .iter()
            .map(|pid| table.get(*pid).unwrap().info.clone())
            .collect();
        let from_chain = classify_chain(&policy(), None, &chain);
        let from_table = classify_in_table(&policy(), None, &table, 12).unwrap();
        assert_eq!(from_chain.class, from_table.class);
        assert_eq!(from_chain.rule, from_table.rule);
        assert_eq!(classify_in_table(&policy(), None, &table, 99), None);
    }

    #[test]
    fn recorded_chains_skip_blank_lines_and_name_the_bad_one() {
        let text = concat!(
            r#"{"id": "a", "chain": [{"comm": "sh"}]}"#,
            "\n\n",
            r#"{"id": 7, "chain": []}"#,
            "\n{not json}\n",
        );
        let read: Vec<_> = recorded_chains(text.as_bytes(), "t.jsonl").collect();
        assert_eq!(read.len(), 3);
        let first = read[0].as_ref().unwrap();
        assert_eq!(
            (first.id.as_str(), first.chain[0].comm.as_str()),
            (Some("a"), "sh")
        );
        let empty = read[1].as_ref().unwrap_err().to_string();
        assert!(empty.starts_with("t.jsonl:3: `chain` is empty"), "{empty}");
        let bad = read[2].as_ref().unwrap_err().to_string();
        assert!(bad.starts_with("t.jsonl:4: not a chain object"), "{bad}");
    }

    #[test]
    fn unless_excludes() {
        let chain = [p("nvim", "/usr/bin/nvim", &["nvim", "--headless-probe"])];
        assert_eq!(classify_chain(&policy(), None, &chain).rule, "default");
    }

    fn with_env(mut info: ProcInfo, env: &[(&str, &str)]) -> ProcInfo {
        info.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        info
    }

    #[test]
    fn steam_app_matches_any_of_the_places_steam_puts_the_id() {
        let game = p("dota2", "/g/dota2", &["dota2"]);
        for env in ["SteamAppId", "SteamGameId", "STEAM_COMPAT_APP_ID"] {
            let chain = [with_env(game.clone(), &[(env, "570")])];
            assert_eq!(
                classify_chain(&policy(), None, &chain).rule,
                "dota",
                "{env}"
            );
        }
        let reaper = p(
            "reaper",
            "/s/reaper",
            &["reaper", "SteamLaunch", "AppId=570"],
        );
        assert_eq!(classify_chain(&policy(), None, &[reaper]).rule, "game-tree");
        let other = p("r", "/s/r", &["r", "AppId=570"]);
        assert_eq!(classify_chain(&policy(), None, &[other]).rule, "dota");
        let another = [with_env(game.clone(), &[("SteamAppId", "5700")])];
        assert_eq!(classify_chain(&policy(), None, &another).rule, "default");
        assert!(policy().env_keys().contains("STEAM_COMPAT_APP_ID"));
    }

    #[test]
    fn explain_names_the_first_matcher_that_failed_for_each_rule() {
        let policy = policy();
        let editor = p("nvim", "/usr/bin/nvim", &["nvim", "--headless-probe"]);
        let shell = with_env(p("zsh", "/usr/bin/zsh", &["zsh"]), &[("SteamAppId", "440")]);
        let got: Vec<(String, Option<String>)> = explain_chain(&policy, &[editor, shell])
            .into_iter()
            .map(|v| (v.rule, v.failed))
            .collect();
        let no = |s: &str| Some(s.to_owned());
        assert_eq!(
            got,
            [
                ("launcher".into(), no("comm launcher: no, comm is zsh")),
                ("game-tree".into(), no("comm reaper: no, comm is zsh")),
                ("editor".into(), no("exe */nvim: no, exe is /usr/bin/zsh")),
                (
                    "dota".into(),
                    no("steam_app 570: no, SteamAppId is 440 and no argument is AppId=570")
                ),
                ("in-editor".into(), no("env TERM=xterm*: no, TERM is unset")),
            ]
        );
        let nvim = p("nvim", "/usr/bin/nvim", &["nvim", "--headless-probe"]);
        let verdicts = explain_chain(&policy, &[nvim]);
        assert_eq!(
            verdicts[2].failed.as_deref(),
            Some("unless argv --headless-probe: yes, so the rule does not apply")
        );
        let term = with_env(
            p("zsh", "/usr/bin/zsh", &["zsh"]),
            &[("TERM", "xterm-256color")],
        );
        let verdicts = explain_chain(&policy, &[p("bash", "/bin/bash", &["bash"]), term]);
        assert_eq!(
            verdicts[4].failed.as_deref(),
            Some("ancestor exe */nvim: no, none of its 1 ancestors matches")
        );
        assert!(explain_chain(&policy, &[]).is_empty());
    }
}
