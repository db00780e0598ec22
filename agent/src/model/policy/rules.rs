//! The rules of the policy: rule and matcher keys as written, compiled
//! into globs once ([`Rule`], [`Matcher`]), and what `steam_app = N`
//! stands for. Matching itself lives in `classify`.

use std::collections::BTreeMap;

use globset::{Glob, GlobBuilder, GlobMatcher};
use indexmap::IndexMap;
use serde::Deserialize;

use super::{Class, PolicyError, Source, invalid_source};
use crate::model::procs::Facts;

/// The environment variables Steam sets to a game's AppId on everything it
/// launches (umu-launcher sets them too); `steam_app = N` matches a process
/// where any of them is N, or whose argv holds `AppId=N` (the reaper's
/// `SteamLaunch AppId=N`).
pub const STEAM_APP_ENV: &[&str] = &["SteamAppId", "SteamGameId", "STEAM_COMPAT_APP_ID"];

#[derive(Debug, Clone, Deserialize)]
pub(super) struct RuleSpec {
    pub(super) name: String,
    class: Option<String>,
    /// In an override: drop the shipped rule of this name.
    #[serde(default)]
    pub(super) disabled: bool,
    #[serde(default)]
    inherit: bool,
    #[serde(default)]
    ignore_case: bool,
    /// The rule's own matchers: the same keys as `ancestor` and `unless`.
    #[serde(flatten)]
    matcher: MatcherSpec,
    ancestor: Option<MatcherSpec>,
    unless: Option<MatcherSpec>,
}

/// The matcher keys, at a rule's top level and in `ancestor`/`unless`.
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
    /// A Steam AppId: the short form of the env/argv matchers Steam's
    /// launch sets (see [`STEAM_APP_ENV`]).
    steam_app: Option<u64>,
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
    /// `steam_app = N`, with what it expands to.
    pub steam_app: Option<SteamApp>,
}

/// `steam_app = N` expanded: the process matches when any one of
/// `expands_to` does (env `SteamAppId`, `SteamGameId` or
/// `STEAM_COMPAT_APP_ID` = N, or an argument `AppId=N`).
#[derive(Debug)]
pub struct SteamApp {
    pub id: u64,
    pub expands_to: Vec<Matcher>,
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

pub(super) fn build_rule(
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
    let compile = |m: &MatcherSpec| compile_matcher(m, spec.ignore_case).map_err(&fail);
    let matcher = compile(&spec.matcher)?;
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
            && self.steam_app.is_none()
    }

    /// The optional facts (exe, argv, cwd, environment) this matcher reads.
    pub fn facts_used(&self) -> Facts {
        let own = Facts {
            exe: !self.exe.is_empty(),
            argv: !self.argv.is_empty(),
            cwd: !self.cwd.is_empty(),
            env: !self.env.is_empty(),
        };
        self.steam_app
            .iter()
            .flat_map(|app| &app.expands_to)
            .fold(own, |facts, m| facts.union(m.facts_used()))
    }

    /// The environment variables this matcher reads.
    pub fn env_keys(&self) -> impl Iterator<Item = &str> {
        let expanded = self.steam_app.iter().flat_map(|app| &app.expands_to);
        self.env
            .iter()
            .chain(expanded.flat_map(|m| &m.env))
            .map(|(key, _)| key.as_str())
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
        steam_app: spec.steam_app.map(steam_app).transpose()?,
    })
}

/// What `steam_app = id` stands for: one matcher per place Steam puts the
/// id, any one of which is enough.
fn steam_app(id: u64) -> Result<SteamApp, String> {
    let exact = |field: &str, value: String| glob(field, &value, false);
    let mut expands_to = STEAM_APP_ENV
        .iter()
        .map(|key| {
            Ok(Matcher {
                env: vec![((*key).to_owned(), exact("env", id.to_string())?)],
                ..Matcher::default()
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    expands_to.push(Matcher {
        argv: vec![exact("argv", format!("AppId={id}"))?],
        ..Matcher::default()
    });
    Ok(SteamApp { id, expands_to })
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
