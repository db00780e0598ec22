//! Decides a process's class: the policy's own rules first, then the
//! optional ananicy-cpp rules (by process name), then the class its nearest
//! classified ancestor passes down, else `system`.

use serde::{Deserialize, Serialize};

use crate::model::ananicy::AnanicyRules;
use crate::model::policy::{Matcher, Policy, Rule, SYSTEM};
use crate::model::procs::ProcInfo;

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

    #[test]
    fn unless_excludes() {
        let chain = [p("nvim", "/usr/bin/nvim", &["nvim", "--headless-probe"])];
        assert_eq!(classify_chain(&policy(), None, &chain).rule, "default");
    }
}
