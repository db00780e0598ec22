//! The shipped default policy (`policies/default.toml`) against recorded
//! process chains (`tests/fixtures/chains.jsonl`): how Steam, Proton, Lutris,
//! gamescope, Blender, ComfyUI, ollama, Neovim and build tools really start
//! their processes, and which class each should end up in.

use std::{collections::BTreeMap, path::Path};

use corral::{model::classify::classify_chain, model::policy::Policy, model::procs::ProcInfo};

const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/default.toml");
const CHAINS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chains.jsonl");
const CLASSES: [&str; 5] = ["game", "render", "ai", "dev", "system"];

fn policy() -> Policy {
    Policy::load(Path::new(POLICY)).unwrap_or_else(|e| panic!("default policy does not load: {e}"))
}

struct Case {
    line: usize,
    id: String,
    expect: String,
    chain: Vec<ProcInfo>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(CHAINS).unwrap_or_else(|e| panic!("{CHAINS}: {e}"));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line = i + 1;
            let value: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("chains.jsonl:{line}: {e}"));
            let field = |key: &str| {
                value[key]
                    .as_str()
                    .unwrap_or_else(|| {
                        panic!("chains.jsonl:{line}: `{key}` missing or not a string")
                    })
                    .to_owned()
            };
            let chain: Vec<ProcInfo> = serde_json::from_value(value["chain"].clone())
                .unwrap_or_else(|e| panic!("chains.jsonl:{line}: bad chain: {e}"));
            assert!(!chain.is_empty(), "chains.jsonl:{line}: empty chain");
            Case {
                line,
                id: field("id"),
                expect: field("expect"),
                chain,
            }
        })
        .collect()
}

#[test]
fn default_policy_classifies_recorded_chains() {
    let policy = policy();
    let cases = cases();

    assert!(
        cases.len() >= 30,
        "only {} chains in the fixture; want at least 30",
        cases.len()
    );
    let mut per_class: BTreeMap<&str, usize> = BTreeMap::new();
    for case in &cases {
        assert!(
            CLASSES.contains(&case.expect.as_str()),
            "chains.jsonl:{}: `{}` expects unknown class `{}`",
            case.line,
            case.id,
            case.expect
        );
        *per_class.entry(case.expect.as_str()).or_default() += 1;
    }
    for class in CLASSES {
        let n = per_class.get(class).copied().unwrap_or(0);
        assert!(
            n >= 2,
            "the fixture has {n} chain(s) expecting `{class}`; want at least 2"
        );
    }
    let mut ids = std::collections::BTreeSet::new();
    for case in &cases {
        assert!(
            ids.insert(case.id.as_str()),
            "chains.jsonl:{}: duplicate id `{}`",
            case.line,
            case.id
        );
    }

    let mut mismatches = Vec::new();
    for case in &cases {
        let decision = classify_chain(&policy, None, &case.chain);
        // Shown with `cargo test -- --nocapture`: which rule decided each chain.
        println!(
            "{:<40} {:<7} {}{}",
            case.id,
            decision.class,
            decision.rule,
            decision
                .inherited_from
                .as_ref()
                .map(|a| format!(" (from {})", a.comm))
                .unwrap_or_default()
        );
        if decision.class != case.expect {
            let from = decision
                .inherited_from
                .as_ref()
                .map(|a| format!(", passed down from `{}` at depth {}", a.comm, a.depth))
                .unwrap_or_default();
            mismatches.push(format!(
                "  chains.jsonl:{} `{}`: expected {}, got {} (rule `{}`{from})",
                case.line, case.id, case.expect, decision.class, decision.rule
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} chains misclassified by {POLICY}:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

/// What the shipped default resolves to on a checked-in sysfs fixture.
fn resolved_on(fixture: &str) -> BTreeMap<String, String> {
    let root = format!(
        "{}/tests/fixtures/sysfs/{fixture}",
        env!("CARGO_MANIFEST_DIR")
    );
    let topology = corral::model::topology::Topology::read(std::path::Path::new(&root)).unwrap();
    policy()
        .resolve_cpus(&topology)
        .unwrap()
        .into_iter()
        .map(|r| (r.class, r.cpus.to_string()))
        .collect()
}

#[test]
fn default_policy_class_cpus_match_the_reference_machine() {
    let policy = policy();
    let on_reference = resolved_on("hybrid-20");
    let expected = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(c, l)| (c.to_string(), l.to_string()))
            .collect()
    };
    // The seed's plan: 0-7 game, 8-15 dev, 16-19 render (ai shares render's).
    assert_eq!(
        on_reference,
        expected(&[
            ("game", "0-7"),
            ("dev", "8-15"),
            ("render", "16-19"),
            ("ai", "16-19")
        ])
    );
    // Other machines: never an empty set, SMT siblings together.
    assert_eq!(
        resolved_on("vm-2"),
        expected(&[("game", "0"), ("dev", "0-1"), ("render", "1"), ("ai", "1")])
    );
    assert_eq!(
        resolved_on("laptop-4"),
        expected(&[
            ("game", "0,2"),
            ("dev", "0-3"),
            ("render", "1,3"),
            ("ai", "1,3")
        ])
    );
    let x3d = resolved_on("x3d-7950");
    assert!(x3d.values().all(|cpus| !cpus.is_empty()), "{x3d:?}");
    // system is never moved.
    assert!(!policy.classes["system"].is_managed());

    let weights: BTreeMap<&str, u32> = CLASSES
        .iter()
        .map(|c| (*c, policy.classes[*c].cpu_weight))
        .collect();
    assert_eq!(
        weights,
        BTreeMap::from([
            ("game", 1000),
            ("dev", 200),
            ("render", 100),
            ("ai", 100),
            ("system", 100)
        ])
    );
    assert_eq!(
        policy.classes.len(),
        CLASSES.len(),
        "unexpected classes: {:?}",
        policy.classes.keys()
    );
}

/// The seed's VRAM matrix on its 12 GiB RTX 4070, from the shipped default:
/// game reserve 4 GiB (priority 1), Blender 5-8 (2), ComfyUI 2-3 (3),
/// dev 1-2 (4); and the same shares on a 24 GiB card.
#[test]
fn default_policy_vram_matrix_matches_the_reference_card() {
    let policy = policy();
    assert!(policy.gpu.enabled);
    let gib = 1u64 << 30;
    let card = 12 * gib;
    let rounded = |a: Option<corral::gpu::arbiter::Amount>, total: u64| {
        a.map(|a| (a.bytes(total) as f64 / gib as f64).round() as u64)
    };
    let budget = |class: &str| {
        policy
            .gpu
            .arbiter
            .classes
            .iter()
            .find(|b| b.class == class)
            .unwrap_or_else(|| panic!("no VRAM budget for {class}"))
            .clone()
    };
    let game = budget("game");
    assert_eq!((game.priority, rounded(game.reserve, card)), (1, Some(4)));
    for (class, priority, min, max) in [("render", 2, 5, 8), ("ai", 3, 2, 3), ("dev", 4, 1, 2)] {
        let b = budget(class);
        assert_eq!(
            (b.priority, rounded(b.min, card), rounded(b.max, card)),
            (priority, Some(min), Some(max)),
            "{class}"
        );
        assert!(
            !b.ladder.contains(&corral::gpu::arbiter::Step::Kill),
            "{class} must not be killed by default"
        );
    }
    // Scales with the card: twice the card, twice the budgets.
    assert_eq!(rounded(budget("ai").max, 24 * gib), Some(6));
    assert_eq!(policy.gpu.arbiter.protected_class, "game");
    assert_eq!(policy.protected_class(), "game");
    // Too hot: the batch classes slow down, never the game or dev.
    assert_eq!(policy.cooled_classes(), ["render", "ai"]);
}
