//! Decides a process's class: the policy's own rules first, then the
//! optional ananicy-cpp rules (by process name), then the class its nearest
//! classified ancestor passes down, else `system`. One step
//! ([`classify_one`]) and the two walks over it: a process table, parents
//! first ([`classify_table`]), and a recorded chain ([`classify_chain`],
//! read by [`recorded_chains`]).

use std::io::BufRead;

use serde::{Deserialize, Serialize};

use crate::model::ananicy::AnanicyRules;
use crate::model::policy::{Matcher, Policy, Rule, SYSTEM};
use crate::model::procs::{ProcInfo, Table};

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
    let infos: Vec<&ProcInfo> = ancestors
        .iter()
        .filter_map(|a| table.get(*a).map(|p| &p.info))
        .collect();
    let parent = ancestors
        .last()
        .and_then(|a| table.get(*a))
        .map(|p| &p.decision);
    Some(classify_one(policy, ananicy, &process.info, &infos, parent))
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
    if !matches(&rule.matcher, process) {
        return false;
    }
    if let Some(wanted) = &rule.ancestor
        && !ancestors.iter().rev().any(|a| matches(wanted, a))
    {
        return false;
    }
    if let Some(excluded) = &rule.unless
        && matches(excluded, process)
    {
        return false;
    }
    true
}

/// Whether every field the matcher names matches the process.
pub fn matches(m: &Matcher, p: &ProcInfo) -> bool {
    let any = |globs: &[globset::GlobMatcher], value: &str| {
        globs.is_empty() || globs.iter().any(|g| g.is_match(value))
    };
    any(&m.exe, &p.exe)
        && any(&m.comm, &p.comm)
        && any(&m.cwd, &p.cwd)
        && any(&m.cgroup, &p.cgroup)
        && m.argv.iter().all(|g| p.argv.iter().any(|a| g.is_match(a)))
        && m.env
            .iter()
            .all(|(key, g)| p.env.get(key).is_some_and(|v| g.is_match(v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy() -> Policy {
        Policy::parse(
            Path::new("t.toml"),
            r#"
[classes.game]
cpus = "0"
[classes.dev]
cpus = "1"

[[rules]]
name = "launcher"
class = "system"
comm = ["launcher"]

[[rules]]
name = "game-tree"
class = "game"
inherit = true
comm = ["reaper"]
argv = ["SteamLaunch"]

[[rules]]
name = "editor"
class = "dev"
inherit = true
exe = ["*/nvim"]
unless = { argv = ["--headless-probe"] }
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
}
