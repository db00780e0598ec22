//! Turning each class's core-set intent ("40% of the CPUs, fastest first")
//! into a concrete CPU list on the machine corral runs on, from the
//! [`Topology`] that [`super::topology`] read.
//!
//! # Assigning core sets
//!
//! A class asks for CPUs either as an explicit list ([`CoreSpec::List`],
//! `cpus = "0-7"`) or as an intent ([`CoreSpec::Intent`],
//! `cpus = { share = 0.4, prefer = "performance" }`). [`assign_core_sets`]
//! turns every class into a non-empty [`CpuList`] plus a sentence saying why,
//! or a [`CoreSetError`] naming the class that asked for something it cannot
//! have ([`check_intents`] finds the errors that do not depend on the
//! machine):
//!
//! - **Explicit lists** are used as written; a list naming a CPU that is not
//!   online here is refused, naming the CPUs that are. Lists do not take
//!   CPUs away from anyone.
//! - **Share classes** (`share` set) are served in slice order from one pool
//!   that starts as every online CPU. A class takes
//!   `max(1, round(share × online CPUs))` CPUs; with `smt = "together"` (the
//!   default) whole SMT cores are taken until that many are reached, so the
//!   count may round up by a sibling. Which CPUs are taken first:
//!   - `performance`: highest `cpu_capacity`, then highest max frequency,
//!     then P-core before other cores before E-core, then lowest number.
//!   - `efficiency`: exactly the reverse of `performance` (lowest capacity
//!     and frequency, E-cores first, and the *highest* number first among
//!     equals, which leaves the low-numbered CPUs together for the rest).
//!   - `cache`: CPUs whose L3 is largest first (a 7950X3D's V-cache CCD),
//!     one L3 domain before the next among equal sizes, then `performance`
//!     order.
//!   - no preference: lowest number first.
//!
//!   A class that finds the pool short gets what is left; one that finds it
//!   empty gets every online CPU ("too few CPUs to give X its own").
//! - **Rest classes** (no `share`, no `with`) all get what the share classes
//!   left in the pool (they share it; `prefer` and `smt` do not matter
//!   there). When nothing is left they get every online CPU.
//! - **`with = "other"`** gives the class exactly the other class's CPUs,
//!   following chains; an unknown name or a cycle is an error. `with` cannot
//!   be combined with `share`, `prefer` or `smt`.
//!
//! No class is ever given an empty set: the worst case is "all online CPUs",
//! which is what the class would have had without corral.
//! Length: the rules above and their helpers; about 310 lines are fixture tests.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use serde::{Deserialize, de};

use crate::model::{
    cpus::CpuList,
    topology::{CoreKind, Cpu, Topology, members, to_list},
};

/// Why a class's `cpus` cannot be turned into CPUs. Every variant names the
/// class that asked, so the policy can point at where that class wrote its
/// `cpus` ([`CoreSetError::class`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreSetError {
    #[error(
        "class `{class}`: cpus share = {share} is outside (0, 1]; give the fraction of the CPUs the \
         class should get, e.g. share = 0.4 for 40%, or leave share out to give it what remains"
    )]
    BadShare { class: String, share: f64 },
    #[error(
        "class `{class}`: cpus with = \"{with}\" names no class with cpus; use one of: {known}"
    )]
    UnknownWith {
        class: String,
        with: String,
        known: String,
    },
    #[error(
        "class `{class}`: cpus `with` goes round in a circle ({chain}); let one of these classes \
         choose its own CPUs"
    )]
    CyclicWith { class: String, chain: String },
    #[error(
        "class `{class}`: cpus with = \"{with}\" copies that class's CPUs, so {fields} would be \
         ignored; remove {fields} or remove with"
    )]
    WithConflict {
        class: String,
        with: String,
        fields: String,
    },
    #[error("class `{class}` has two cpus settings; keep one")]
    DuplicateClass { class: String },
    #[error(
        "class `{class}`: cpus \"{list}\" names CPUs this machine does not have; it has {count} \
         (online: {online}). Use CPUs that exist, or an intent such as \
         `cpus = {{ share = 0.4, prefer = \"performance\" }}`"
    )]
    NotOnline {
        class: String,
        list: CpuList,
        online: CpuList,
        count: usize,
    },
}

impl CoreSetError {
    /// The class whose `cpus` is wrong.
    pub fn class(&self) -> &str {
        match self {
            CoreSetError::BadShare { class, .. }
            | CoreSetError::UnknownWith { class, .. }
            | CoreSetError::CyclicWith { class, .. }
            | CoreSetError::WithConflict { class, .. }
            | CoreSetError::DuplicateClass { class }
            | CoreSetError::NotOnline { class, .. } => class,
        }
    }
}

/// Which CPUs a class would rather have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    /// Fastest cores first (capacity, then max frequency, then P before E).
    Performance,
    /// Slowest cores first (E-cores on a hybrid machine).
    Efficiency,
    /// The largest L3 first (a 7950X3D's V-cache CCD).
    Cache,
}

/// Whether a class takes whole SMT cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Smt {
    /// Take both (all) hardware threads of a core, so another class never
    /// runs on the sibling of one of ours.
    #[default]
    Together,
    /// Take single hardware threads.
    Any,
}

/// A class's core-set intent, as the policy writes it:
/// `cpus = { share = 0.4, prefer = "performance" }`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    /// Fraction of the online CPUs, in (0, 1]. `None`: whatever the share
    /// classes leave.
    pub share: Option<f64>,
    /// Which CPUs to take first. `None`: lowest numbers first.
    pub prefer: Option<Prefer>,
    /// `None` means [`Smt::Together`].
    pub smt: Option<Smt>,
    /// Use exactly the CPUs of this other class.
    pub with: Option<String>,
}

/// A class's `cpus` setting: a list (`"0-7"`) or an [`Intent`] table.
#[derive(Debug, Clone, PartialEq)]
pub enum CoreSpec {
    List(CpuList),
    Intent(Intent),
}

impl<'de> Deserialize<'de> for CoreSpec {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpecVisitor;

        impl<'de> de::Visitor<'de> for SpecVisitor {
            type Value = CoreSpec;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a CPU list such as \"0-7,12\" or a table such as \
                     { share = 0.4, prefer = \"performance\" }",
                )
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<CoreSpec, E> {
                let list = CpuList::parse(text).map_err(E::custom)?;
                if list.is_empty() {
                    return Err(E::custom(
                        "an empty CPU list; write the CPUs (e.g. \"0-7\") or leave cpus out",
                    ));
                }
                Ok(CoreSpec::List(list))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<CoreSpec, A::Error> {
                Intent::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(CoreSpec::Intent)
            }
        }

        deserializer.deserialize_any(SpecVisitor)
    }
}

/// One class's CPUs on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub class: String,
    /// Never empty.
    pub cpus: CpuList,
    /// Why these CPUs, for `corral policy show`.
    pub why: String,
}

/// Assigns every class its core set on `topo`: each class's [`CoreSpec`]
/// becomes CPUs, in the order given. The rules are in the module
/// documentation; [`check_intents`] runs first.
pub fn assign_core_sets(
    classes: &[(String, CoreSpec)],
    topo: &Topology,
) -> Result<Vec<Resolved>, CoreSetError> {
    check_intents(classes)?;
    let online = members(topo.online());
    let total = online.len();
    let all_online = |class: &str| Resolved {
        class: class.to_string(),
        cpus: topo.online().clone(),
        why: format!(
            "too few CPUs to give {class} its own; it shares all {total} ({})",
            topo.online()
        ),
    };
    let mut out: Vec<Option<Resolved>> = vec![None; classes.len()];

    // Explicit lists: independent of everyone else, and only CPUs that
    // exist here (an empty list cannot be written: `CoreSpec` refuses it).
    for (slot, (class, spec)) in out.iter_mut().zip(classes) {
        if let CoreSpec::List(requested) = spec {
            if requested.intersect(topo.online()) != *requested {
                return Err(CoreSetError::NotOnline {
                    class: class.clone(),
                    list: requested.clone(),
                    online: topo.online().clone(),
                    count: total,
                });
            }
            *slot = Some(Resolved {
                class: class.clone(),
                cpus: requested.clone(),
                why: format!("CPUs {requested} as listed"),
            });
        }
    }

    // Share classes, in order, from one pool.
    let mut pool = online.clone();
    let mut served = Vec::new();
    for (slot, (class, spec)) in out.iter_mut().zip(classes) {
        let CoreSpec::Intent(Intent {
            share: Some(share),
            prefer,
            smt,
            with: None,
        }) = spec
        else {
            continue;
        };
        // `share` is in (0, 1] (validated), so this is in 1..=total.
        let want = ((share * total as f64).round() as usize).max(1);
        let together = smt.unwrap_or_default() == Smt::Together;
        let chosen = take(topo, &pool, *prefer, want, together);
        if chosen.is_empty() {
            *slot = Some(all_online(class));
            continue;
        }
        pool.retain(|c| !chosen.contains(c));
        served.push(class.as_str());
        let count = chosen.len();
        let amount = match count.cmp(&want) {
            std::cmp::Ordering::Equal => format!("share {share}"),
            std::cmp::Ordering::Greater => {
                format!("share {share} is {want}, rounded up to whole cores")
            }
            std::cmp::Ordering::Less => {
                format!("share {share} is {want}, only {count} were left")
            }
        };
        let order = match prefer {
            Some(Prefer::Performance) => "performance cores first",
            Some(Prefer::Efficiency) => "efficiency cores first",
            Some(Prefer::Cache) => "largest L3 cache first",
            None => "lowest-numbered CPUs first",
        };
        let mut why = format!(
            "{count} of {total} CPUs ({amount}), {order}: {}",
            describe(topo, &chosen)
        );
        if *prefer == Some(Prefer::Cache) {
            why.push_str(&describe_l3(topo, &chosen));
        }
        *slot = Some(Resolved {
            class: class.clone(),
            cpus: to_list(chosen),
            why,
        });
    }

    // Rest classes share what the share classes left.
    for (slot, (class, spec)) in out.iter_mut().zip(classes) {
        let CoreSpec::Intent(Intent {
            share: None,
            with: None,
            ..
        }) = spec
        else {
            continue;
        };
        *slot = Some(if pool.is_empty() {
            all_online(class)
        } else {
            let why = if served.is_empty() {
                format!(
                    "all {total} CPUs, no class takes a share: {}",
                    describe(topo, &pool)
                )
            } else {
                format!(
                    "the {} of {total} CPUs left after {}: {}",
                    pool.len(),
                    served.join(", "),
                    describe(topo, &pool)
                )
            };
            Resolved {
                class: class.clone(),
                cpus: to_list(pool.iter().copied()),
                why,
            }
        });
    }

    // `with` classes copy their target, following chains (`check_intents`
    // made sure every chain ends in a class resolved above).
    let index = by_name(classes);
    for start in 0..classes.len() {
        let mut chain = vec![start];
        while out[chain[chain.len() - 1]].is_none() {
            let next = with_target(classes, &index, chain[chain.len() - 1])
                .expect("every class but `with` ones was resolved above");
            chain.push(next);
        }
        let cpus = out[chain[chain.len() - 1]]
            .as_ref()
            .map(|r| r.cpus.clone())
            .unwrap_or_default();
        // Fill the chain back to front, so each names the class it copies.
        for pair in chain.windows(2).rev() {
            let (class, target) = (&classes[pair[0]].0, &classes[pair[1]].0);
            out[pair[0]] = Some(Resolved {
                class: class.clone(),
                cpus: cpus.clone(),
                why: format!("same CPUs as {target}: {cpus}"),
            });
        }
    }

    Ok(out.into_iter().flatten().collect())
}

/// The errors that do not depend on the machine: a share outside (0, 1],
/// `with` naming no class, mixed with `share`/`prefer`/`smt`, or going round
/// in a circle, and a class listed twice. The policy runs this when it
/// loads, so `corral policy check` catches them on any machine.
pub fn check_intents(classes: &[(String, CoreSpec)]) -> Result<(), CoreSetError> {
    let mut seen = BTreeSet::new();
    for (class, _) in classes {
        if !seen.insert(class.as_str()) {
            return Err(CoreSetError::DuplicateClass {
                class: class.clone(),
            });
        }
    }
    for (class, spec) in classes {
        let CoreSpec::Intent(intent) = spec else {
            continue;
        };
        if let Some(with) = &intent.with {
            let fields: Vec<&str> = [
                ("share", intent.share.is_some()),
                ("prefer", intent.prefer.is_some()),
                ("smt", intent.smt.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
            if !fields.is_empty() {
                return Err(CoreSetError::WithConflict {
                    class: class.clone(),
                    with: with.clone(),
                    fields: fields.join(", "),
                });
            }
            if !seen.contains(with.as_str()) {
                let known: Vec<&str> = seen.iter().copied().filter(|name| name != class).collect();
                return Err(CoreSetError::UnknownWith {
                    class: class.clone(),
                    with: with.clone(),
                    known: if known.is_empty() {
                        "(none)".into()
                    } else {
                        known.join(", ")
                    },
                });
            }
        }
        if let Some(share) = intent.share
            && !(share > 0.0 && share <= 1.0)
        {
            return Err(CoreSetError::BadShare {
                class: class.clone(),
                share,
            });
        }
    }
    let index = by_name(classes);
    for start in 0..classes.len() {
        let mut chain = vec![start];
        while let Some(next) = with_target(classes, &index, chain[chain.len() - 1]) {
            if let Some(at) = chain.iter().position(|&i| i == next) {
                let names: Vec<&str> = chain[at..]
                    .iter()
                    .chain([&next])
                    .map(|&i| classes[i].0.as_str())
                    .collect();
                return Err(CoreSetError::CyclicWith {
                    class: classes[next].0.clone(),
                    chain: names.join(" → "),
                });
            }
            chain.push(next);
        }
    }
    Ok(())
}

/// Each class's position in `classes`.
fn by_name(classes: &[(String, CoreSpec)]) -> BTreeMap<&str, usize> {
    classes
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.as_str(), i))
        .collect()
}

/// The position of the class that class `i` copies with `with`, if it does
/// (and names a class that is there).
fn with_target(
    classes: &[(String, CoreSpec)],
    index: &BTreeMap<&str, usize>,
    i: usize,
) -> Option<usize> {
    match &classes[i].1 {
        CoreSpec::Intent(Intent {
            with: Some(with), ..
        }) => index.get(with.as_str()).copied(),
        _ => None,
    }
}

/// Up to `want` CPUs from `pool` in `prefer` order; with `together`, whole
/// cores (the part of each core still in the pool) until `want` is reached.
fn take(
    topo: &Topology,
    pool: &BTreeSet<u32>,
    prefer: Option<Prefer>,
    want: usize,
    together: bool,
) -> BTreeSet<u32> {
    let mut chosen = BTreeSet::new();
    for id in ranked(topo, prefer)
        .into_iter()
        .filter(|c| pool.contains(c))
    {
        if chosen.len() >= want {
            break;
        }
        if chosen.contains(&id) {
            continue;
        }
        if together {
            let core = topo
                .cpu(id)
                .map(|c| members(&c.siblings))
                .unwrap_or_default();
            chosen.extend(core.intersection(pool).copied());
        }
        chosen.insert(id);
    }
    chosen
}

/// Every online CPU, the preferred first.
fn ranked(topo: &Topology, prefer: Option<Prefer>) -> Vec<u32> {
    let performance = |c: &Cpu| {
        let kind = match c.kind {
            CoreKind::Performance => 0,
            CoreKind::Uniform => 1,
            CoreKind::Efficiency => 2,
        };
        (
            Reverse(c.capacity.unwrap_or(0)),
            Reverse(c.max_freq_khz.unwrap_or(0)),
            kind,
            c.id,
        )
    };
    let mut cpus: Vec<&Cpu> = topo.cpus().iter().collect();
    match prefer {
        None => cpus.sort_by_key(|c| c.id),
        Some(Prefer::Performance) => cpus.sort_by_key(|c| performance(c)),
        Some(Prefer::Efficiency) => cpus.sort_by_key(|c| Reverse(performance(c))),
        Some(Prefer::Cache) => cpus.sort_by_key(|c| {
            let l3 = c.l3.as_ref();
            let size = l3.and_then(|l| l.size_kib).unwrap_or(0);
            // Keep one L3 domain together before the next of the same size.
            let domain = l3
                .and_then(|l| members(&l.cpus).first().copied())
                .unwrap_or(c.id);
            (Reverse(size), domain, performance(c))
        }),
    }
    cpus.into_iter().map(|c| c.id).collect()
}

/// "P-cores 0-7 + E-cores 16-19" on a hybrid machine, else "CPUs 0-3".
fn describe(topo: &Topology, cpus: &BTreeSet<u32>) -> String {
    if !topo.is_hybrid() {
        return format!("CPUs {}", to_list(cpus.iter().copied()));
    }
    let of_kind = |kind: CoreKind| {
        to_list(
            cpus.iter()
                .copied()
                .filter(|&id| topo.cpu(id).map(|c| c.kind) == Some(kind)),
        )
    };
    [
        ("P-cores", of_kind(CoreKind::Performance)),
        ("other CPUs", of_kind(CoreKind::Uniform)),
        ("E-cores", of_kind(CoreKind::Efficiency)),
    ]
    .into_iter()
    .filter(|(_, list)| !list.is_empty())
    .map(|(name, list)| format!("{name} {list}"))
    .collect::<Vec<_>>()
    .join(" + ")
}

/// " (L3 96 MiB)" naming the L3 sizes the CPUs sit under, or "".
fn describe_l3(topo: &Topology, cpus: &BTreeSet<u32>) -> String {
    let sizes: BTreeSet<Reverse<u64>> = cpus
        .iter()
        .filter_map(|&id| topo.cpu(id)?.l3.as_ref()?.size_kib)
        .map(Reverse)
        .collect();
    if sizes.is_empty() {
        return String::new();
    }
    let sizes: Vec<String> = sizes
        .into_iter()
        .map(|Reverse(kib)| {
            if kib % 1024 == 0 {
                format!("{} MiB", kib / 1024)
            } else {
                format!("{kib} KiB")
            }
        })
        .collect();
    format!(" (L3 {})", sizes.join(" + "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::topology::tests::fixture;

    fn intent(share: Option<f64>, prefer: Option<Prefer>, with: Option<&str>) -> CoreSpec {
        CoreSpec::Intent(Intent {
            share,
            prefer,
            smt: None,
            with: with.map(str::to_string),
        })
    }

    /// corral's default: game 0.4 performance, render 0.2 efficiency, dev
    /// the rest, ai with render.
    fn defaults(game: CoreSpec) -> Vec<(String, CoreSpec)> {
        vec![
            ("game".into(), game),
            (
                "render".into(),
                intent(Some(0.2), Some(Prefer::Efficiency), None),
            ),
            ("dev".into(), intent(None, None, None)),
            ("ai".into(), intent(None, None, Some("render"))),
        ]
    }

    fn default_game() -> CoreSpec {
        intent(Some(0.4), Some(Prefer::Performance), None)
    }

    /// "class=cpus" for each class, in order.
    fn summary(resolved: &[Resolved]) -> Vec<String> {
        resolved
            .iter()
            .map(|r| format!("{}={}", r.class, r.cpus))
            .collect()
    }

    fn list(text: &str) -> CpuList {
        CpuList::parse(text).unwrap()
    }

    #[test]
    fn hybrid_defaults() {
        let topo = fixture("hybrid-20");
        let resolved = assign_core_sets(&defaults(default_game()), &topo).unwrap();
        assert_eq!(
            summary(&resolved),
            ["game=0-7", "render=16-19", "dev=8-15", "ai=16-19"]
        );
        assert_eq!(
            resolved[0].why,
            "8 of 20 CPUs (share 0.4), performance cores first: P-cores 0-7"
        );
        assert_eq!(
            resolved[1].why,
            "4 of 20 CPUs (share 0.2), efficiency cores first: E-cores 16-19"
        );
        assert_eq!(
            resolved[2].why,
            "the 8 of 20 CPUs left after game, render: P-cores 8-11 + E-cores 12-15"
        );
        assert_eq!(resolved[3].why, "same CPUs as render: 16-19");
    }

    #[test]
    fn x3d_game_gets_the_vcache_ccd() {
        let topo = fixture("x3d-7950");
        let game = intent(Some(0.25), Some(Prefer::Cache), None);
        let resolved = assign_core_sets(&defaults(game), &topo).unwrap();
        // render: 6 of 32, slowest CCD (the V-cache one), highest numbers
        // first; dev: everything else.
        assert_eq!(
            summary(&resolved),
            [
                "game=0-3,16-19",
                "render=5-7,21-23",
                "dev=4,8-15,20,24-31",
                "ai=5-7,21-23"
            ]
        );
        assert_eq!(
            resolved[0].why,
            "8 of 32 CPUs (share 0.25), largest L3 cache first: CPUs 0-3,16-19 (L3 96 MiB)"
        );
        // With `performance`, the higher-clocked CCD wins instead; 0.4 of
        // 32 is 13, rounded up to 7 whole cores.
        let resolved = assign_core_sets(&defaults(default_game()), &topo).unwrap();
        assert_eq!(resolved[0].cpus.to_string(), "8-14,24-30");
    }

    #[test]
    fn laptop_keeps_smt_pairs_together() {
        let topo = fixture("laptop-4");
        let resolved = assign_core_sets(&defaults(default_game()), &topo).unwrap();
        // game wants round(1.6) = 2: core 0 (CPUs 0,2). render wants 1 and
        // gets the whole other core (1,3). Nothing is left for dev.
        assert_eq!(
            summary(&resolved),
            ["game=0,2", "render=1,3", "dev=0-3", "ai=1,3"]
        );
        assert_eq!(
            resolved[1].why,
            "2 of 4 CPUs (share 0.2 is 1, rounded up to whole cores), efficiency cores first: CPUs 1,3"
        );
        assert_eq!(
            resolved[2].why,
            "too few CPUs to give dev its own; it shares all 4 (0-3)"
        );

        // smt = "any" takes single threads.
        let mut classes = defaults(default_game());
        classes[1].1 = CoreSpec::Intent(Intent {
            share: Some(0.2),
            prefer: Some(Prefer::Efficiency),
            smt: Some(Smt::Any),
            with: None,
        });
        let resolved = assign_core_sets(&classes, &topo).unwrap();
        assert_eq!(
            summary(&resolved),
            ["game=0,2", "render=3", "dev=1", "ai=3"]
        );
    }

    #[test]
    fn vm_gives_every_class_something() {
        let topo = fixture("vm-2");
        let resolved = assign_core_sets(&defaults(default_game()), &topo).unwrap();
        assert_eq!(
            summary(&resolved),
            ["game=0", "render=1", "dev=0-1", "ai=1"]
        );
        assert!(resolved.iter().all(|r| !r.cpus.is_empty()));
    }

    #[test]
    fn share_class_finding_the_pool_empty_shares_all() {
        let topo = fixture("vm-2");
        let classes = vec![
            ("a".to_string(), intent(Some(1.0), None, None)),
            ("b".to_string(), intent(Some(0.1), None, None)),
        ];
        let resolved = assign_core_sets(&classes, &topo).unwrap();
        assert_eq!(summary(&resolved), ["a=0-1", "b=0-1"]);
        assert_eq!(
            resolved[1].why,
            "too few CPUs to give b its own; it shares all 2 (0-1)"
        );
    }

    #[test]
    fn explicit_list_on_the_machine_is_used_as_listed() {
        let topo = fixture("laptop-4");
        let classes = vec![
            ("game".to_string(), CoreSpec::List(list("2-3"))),
            ("dev".to_string(), intent(None, None, None)),
        ];
        let resolved = assign_core_sets(&classes, &topo).unwrap();
        // Lists do not take from the pool: dev still gets everything.
        assert_eq!(summary(&resolved), ["game=2-3", "dev=0-3"]);
        assert_eq!(resolved[0].why, "CPUs 2-3 as listed");
    }

    #[test]
    fn explicit_list_partly_or_fully_off_machine_is_refused_naming_what_exists() {
        let topo = fixture("vm-2");
        for requested in ["1-7", "16-19"] {
            let classes = vec![("render".to_string(), CoreSpec::List(list(requested)))];
            let err = assign_core_sets(&classes, &topo).unwrap_err();
            assert_eq!(err.class(), "render");
            assert!(
                matches!(&err, CoreSetError::NotOnline { online, count: 2, .. } if online.to_string() == "0-1"),
                "{err}"
            );
            assert!(err.to_string().contains("it has 2 (online: 0-1)"), "{err}");
        }
    }

    #[test]
    fn with_unknown_class_is_an_error() {
        let topo = fixture("vm-2");
        let classes = vec![
            ("game".to_string(), default_game()),
            ("ai".to_string(), intent(None, None, Some("rendr"))),
        ];
        let err = assign_core_sets(&classes, &topo).unwrap_err().to_string();
        assert_eq!(
            err,
            "class `ai`: cpus with = \"rendr\" names no class with cpus; use one of: game"
        );
    }

    #[test]
    fn with_follows_chains_and_rejects_cycles() {
        let topo = fixture("hybrid-20");
        let classes = vec![
            ("a".to_string(), intent(None, None, Some("b"))),
            ("b".to_string(), intent(None, None, Some("c"))),
            ("c".to_string(), CoreSpec::List(list("4-5"))),
        ];
        let resolved = assign_core_sets(&classes, &topo).unwrap();
        assert_eq!(summary(&resolved), ["a=4-5", "b=4-5", "c=4-5"]);
        assert_eq!(resolved[0].why, "same CPUs as b: 4-5");

        let classes = vec![
            ("x".to_string(), default_game()),
            ("a".to_string(), intent(None, None, Some("b"))),
            ("b".to_string(), intent(None, None, Some("a"))),
        ];
        let err = assign_core_sets(&classes, &topo).unwrap_err();
        assert_eq!(err.class(), "a");
        assert!(err.to_string().contains("(a → b → a)"), "{err}");
        // Found without a machine too, when the policy loads.
        assert_eq!(check_intents(&classes), Err(err));
        let classes = vec![("a".to_string(), intent(None, None, Some("a")))];
        assert!(matches!(
            check_intents(&classes),
            Err(CoreSetError::CyclicWith { chain, .. }) if chain == "a → a"
        ));
    }

    #[test]
    fn bad_settings_are_errors() {
        let topo = fixture("vm-2");
        for share in [0.0, -0.5, 1.5, f64::NAN] {
            let classes = vec![("game".to_string(), intent(Some(share), None, None))];
            let err = assign_core_sets(&classes, &topo).unwrap_err();
            assert!(
                matches!(err, CoreSetError::BadShare { .. }),
                "{share}: {err}"
            );
        }
        let classes = vec![
            ("render".to_string(), intent(None, None, None)),
            ("ai".to_string(), intent(Some(0.5), None, Some("render"))),
        ];
        let err = assign_core_sets(&classes, &topo).unwrap_err().to_string();
        assert!(err.contains("so share would be ignored"), "{err}");
        let classes = vec![
            ("dev".to_string(), intent(None, None, None)),
            ("dev".to_string(), intent(None, None, None)),
        ];
        assert!(matches!(
            assign_core_sets(&classes, &topo),
            Err(CoreSetError::DuplicateClass { .. })
        ));
    }

    #[test]
    fn rest_classes_share_the_rest() {
        let topo = fixture("hybrid-20");
        let classes = vec![
            ("dev".to_string(), intent(None, None, None)),
            ("game".to_string(), default_game()),
            (
                "build".to_string(),
                intent(None, Some(Prefer::Performance), None),
            ),
        ];
        let resolved = assign_core_sets(&classes, &topo).unwrap();
        assert_eq!(summary(&resolved), ["dev=8-19", "game=0-7", "build=8-19"]);
        let alone = vec![("dev".to_string(), intent(None, None, None))];
        let resolved = assign_core_sets(&alone, &topo).unwrap();
        assert_eq!(resolved[0].cpus.to_string(), "0-19");
        assert_eq!(
            resolved[0].why,
            "all 20 CPUs, no class takes a share: P-cores 0-11 + E-cores 12-19"
        );
    }

    #[test]
    fn deserializes_from_the_policy_file() {
        #[derive(Deserialize)]
        struct Class {
            cpus: CoreSpec,
        }
        let parse = |text: &str| toml::from_str::<Class>(text).map(|c| c.cpus);
        assert_eq!(
            parse("cpus = { share = 0.4, prefer = \"performance\" }").unwrap(),
            intent(Some(0.4), Some(Prefer::Performance), None)
        );
        assert_eq!(
            parse("cpus = { with = \"render\", smt = \"any\" }").unwrap(),
            CoreSpec::Intent(Intent {
                smt: Some(Smt::Any),
                with: Some("render".into()),
                ..Intent::default()
            })
        );
        assert_eq!(parse("cpus = {}").unwrap(), intent(None, None, None));
        assert_eq!(
            parse("cpus = \"0-3,8\"").unwrap(),
            CoreSpec::List(list("0-3,8"))
        );
        let err = parse("cpus = { share = 0.4, prefered = \"cache\" }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `prefered`"), "{err}");
        let err = parse("cpus = { prefer = \"fast\" }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `fast`"), "{err}");
        let err = parse("cpus = \"0-x\"").unwrap_err().to_string();
        assert!(err.contains("is not a CPU number"), "{err}");
        assert!(
            parse("cpus = \"\"")
                .unwrap_err()
                .to_string()
                .contains("an empty CPU list")
        );
        assert!(parse("cpus = 4").is_err());
    }
}
