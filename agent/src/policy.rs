//! The policy file: classes (core sets, cpu weights) and ordered rules that
//! say which processes belong to which class. Parsing and validation only;
//! matching lives in `classify`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use globset::{Glob, GlobBuilder, GlobMatcher};
use serde::Deserialize;

use crate::cpus::CpuList;

/// The class every process has when no rule claims it. Never moved.
pub const SYSTEM: &str = "system";

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    classes: BTreeMap<String, toml::Spanned<ClassSpec>>,
    #[serde(default)]
    rules: Vec<toml::Spanned<RuleSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassSpec {
    /// CPU list as on the reference machine, e.g. "0-7". Absent: the class
    /// is never moved (like `system`).
    cpus: Option<String>,
    /// cgroup v2 `cpu.weight`, 1..=10000 (default 100).
    cpu_weight: Option<u32>,
    #[allow(dead_code, reason = "documentation for readers of the policy file")]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    class: String,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// A class as resolved from the policy.
#[derive(Debug, Clone)]
pub struct Class {
    pub name: String,
    /// Requested CPUs (reference machine numbering). None: never moved.
    pub cpus: Option<CpuList>,
    pub cpu_weight: u32,
}

impl Class {
    pub fn is_managed(&self) -> bool {
        self.cpus.is_some()
    }
}

/// Where a rule was written, for `corral explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub line: usize,
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

#[derive(Debug)]
pub struct Policy {
    pub path: PathBuf,
    pub classes: BTreeMap<String, Class>,
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let invalid = |offset: usize, message: String| {
            let (line, column) = line_column(text, offset);
            PolicyError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: PolicyFile = toml::from_str(text).map_err(|err| {
            let offset = err.span().map(|s| s.start).unwrap_or(0);
            invalid(offset, err.message().to_owned())
        })?;

        let mut classes = BTreeMap::new();
        for (name, spec) in file.classes {
            let offset = spec.span().start;
            let spec = spec.into_inner();
            let cpus = match &spec.cpus {
                Some(list) => Some(CpuList::parse(list).map_err(|e| {
                    invalid(offset, format!("class `{name}`: cpus {e}"))
                })?),
                None => None,
            };
            let cpu_weight = spec.cpu_weight.unwrap_or(100);
            if !(1..=10000).contains(&cpu_weight) {
                return Err(invalid(
                    offset,
                    format!("class `{name}`: cpu_weight {cpu_weight} is outside 1..=10000"),
                ));
            }
            if name == SYSTEM && cpus.is_some() {
                return Err(invalid(
                    offset,
                    "class `system` is left alone by design; remove its `cpus`".into(),
                ));
            }
            classes.insert(name.clone(), Class { name, cpus, cpu_weight });
        }
        classes.entry(SYSTEM.to_owned()).or_insert_with(|| Class {
            name: SYSTEM.to_owned(),
            cpus: None,
            cpu_weight: 100,
        });

        let mut rules = Vec::with_capacity(file.rules.len());
        let mut names = BTreeSet::new();
        for spanned in file.rules {
            let offset = spanned.span().start;
            let spec = spanned.into_inner();
            let fail = |message: String| invalid(offset, format!("rule `{}`: {message}", spec.name));
            if !classes.contains_key(&spec.class) {
                let known: Vec<_> = classes.keys().cloned().collect();
                return Err(fail(format!(
                    "unknown class `{}`; define it under [classes] or use one of: {}",
                    spec.class,
                    known.join(", ")
                )));
            }
            if !names.insert(spec.name.clone()) {
                return Err(fail("a rule with this name already exists; names must be unique".into()));
            }
            let compile = |m: &MatcherSpec| compile_matcher(m, spec.ignore_case).map_err(&fail);
            let own = MatcherSpec {
                exe: spec.exe.clone(),
                comm: spec.comm.clone(),
                argv: spec.argv.clone(),
                cwd: spec.cwd.clone(),
                cgroup: spec.cgroup.clone(),
                env: spec.env.clone(),
            };
            let matcher = compile(&own)?;
            let ancestor = spec.ancestor.as_ref().map(compile).transpose()?;
            let unless = spec.unless.as_ref().map(compile).transpose()?;
            if matcher.is_empty() && ancestor.as_ref().is_none_or(Matcher::is_empty) {
                return Err(fail("matches every process; give it at least one matcher".into()));
            }
            rules.push(Rule {
                name: spec.name,
                class: spec.class,
                inherit: spec.inherit,
                matcher,
                ancestor,
                unless,
                source: Source {
                    file: path.to_owned(),
                    line: line_column(text, offset).0,
                },
            });
        }
        Ok(Policy {
            path: path.to_owned(),
            classes,
            rules,
        })
    }

    pub fn class(&self, name: &str) -> Option<&Class> {
        self.classes.get(name)
    }

    /// Environment variables some rule looks at: the process table keeps
    /// only these from /proc/PID/environ.
    pub fn env_keys(&self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for rule in &self.rules {
            for m in [Some(&rule.matcher), rule.ancestor.as_ref(), rule.unless.as_ref()]
                .into_iter()
                .flatten()
            {
                keys.extend(m.env.iter().map(|(k, _)| k.clone()));
            }
        }
        keys
    }
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

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn rule_sources_name_their_line() {
        let policy = parse(
            "[classes.game]\ncpus = \"0-3\"\n\n[[rules]]\nname = \"a\"\nclass = \"game\"\ncomm = [\"x\"]\n",
        )
        .unwrap();
        assert_eq!(policy.rules[0].source.line, 4);
        assert!(policy.class("system").is_some());
    }

    #[test]
    fn unknown_class_is_refused_with_position() {
        let err = parse("[[rules]]\nname = \"a\"\nclass = \"gmae\"\ncomm = [\"x\"]\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("test.toml:1:"), "{text}");
        assert!(text.contains("unknown class `gmae`"), "{text}");
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = parse("[classes.game]\ncpus = 0-7\n").unwrap_err();
        assert!(err.to_string().starts_with("test.toml:2:"), "{err}");
    }

    #[test]
    fn a_rule_without_matchers_is_refused() {
        let err = parse("[[rules]]\nname = \"all\"\nclass = \"system\"\n").unwrap_err();
        assert!(err.to_string().contains("matches every process"), "{err}");
    }

    #[test]
    fn misspelt_matcher_key_is_refused() {
        let err = parse("[[rules]]\nname = \"a\"\nclass = \"system\"\ncom = [\"x\"]\n").unwrap_err();
        assert!(err.to_string().contains("com"), "{err}");
    }
}
