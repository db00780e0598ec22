//! The shipped default policy (`policies/default.toml`) against recorded
//! process chains (`tests/fixtures/chains.jsonl`): how Steam (native, Flatpak,
//! snap, the Steam Linux Runtime), Proton, Lutris, Heroic, umu-launcher,
//! Bottles, itch, Minecraft launchers, emulators, gamescope, Blender, ComfyUI,
//! ollama, Neovim and build tools really start their processes, and which
//! class each should end up in; and a per-game override layered on it.

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
        cases.len() >= 170,
        "only {} chains in the fixture; want at least 170",
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
    let mut deciding = std::collections::BTreeSet::new();
    for case in &cases {
        let decision = classify_chain(&policy, None, &case.chain);
        deciding.insert(decision.rule.clone());
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
    // Every shipped rule is the one that decides some recorded chain: a rule
    // no chain needs is either dead or untested.
    let untested: Vec<&str> = policy
        .rules
        .iter()
        .map(|r| r.name.as_str())
        .filter(|name| !deciding.contains(*name))
        .collect();
    assert!(
        untested.is_empty(),
        "rules that decide no chain in chains.jsonl: {untested:?}"
    );
}

/// The per-game override of the shipped default's comments and README: one
/// Steam game (Dota 2, AppId 570) in a class of its own on the V-cache CCD.
const GAME_CACHE_OVERRIDE: &str = r#"
[classes.game-cache]
cpus = { share = 0.25, prefer = "cache" }
cpu_weight = 1000

[[rules]]
name = "dota2"
class = "game-cache"
inherit = true
steam_app = 570
"#;

fn layered() -> Policy {
    let default = std::fs::read_to_string(POLICY).unwrap();
    Policy::parse_layers(&[
        (Path::new(POLICY), default.as_str()),
        (Path::new("/etc/corral/policy.toml"), GAME_CACHE_OVERRIDE),
    ])
    .unwrap_or_else(|e| panic!("override refused: {e}"))
}

fn cpus_of(policy: &Policy, fixture: &str) -> BTreeMap<String, corral::model::cpus::CpuList> {
    let root = format!(
        "{}/tests/fixtures/sysfs/{fixture}",
        env!("CARGO_MANIFEST_DIR")
    );
    let topology = corral::model::topology::Topology::read(Path::new(&root)).unwrap();
    policy
        .resolve_cpus(&topology)
        .unwrap()
        .into_iter()
        .map(|r| (r.class, r.cpus))
        .collect()
}

#[test]
fn per_game_class_takes_the_vcache_ccd_and_leaves_the_rest_alone() {
    let policy = layered();
    // The override's rule goes first; every shipped rule is still there.
    assert_eq!(policy.rules[0].name, "dota2");
    assert_eq!(policy.rules.len(), self::policy().rules.len() + 1);
    assert_eq!(policy.classes["game-cache"].cpu_weight, 1000);

    // The 7950X3D: CCD0 (0-7,16-23) has the 96 MiB L3, CCD1 the clocks.
    let x3d = cpus_of(&policy, "x3d-7950");
    let vcache = corral::model::cpus::CpuList::parse("0-7,16-23").unwrap();
    let frequency = corral::model::cpus::CpuList::parse("8-15,24-31").unwrap();
    assert_eq!(x3d["game-cache"].to_string(), "0-3,16-19", "{x3d:?}");
    assert_eq!(x3d["game-cache"].intersect(&vcache), x3d["game-cache"]);
    assert_eq!(x3d["game"].intersect(&frequency), x3d["game"], "{x3d:?}");
    // The shipped classes get what they got without the override, but for
    // `dev`, which takes what is left.
    let before = resolved_on("x3d-7950");
    for class in ["game", "render", "ai"] {
        assert_eq!(x3d[class].to_string(), before[class], "{class}");
    }
    assert!(x3d["dev"].intersect(&x3d["game-cache"]).is_empty());

    // The reference hybrid desktop has one L3: the class still gets cores
    // of its own, the fastest left, and the shipped ones keep theirs.
    let hybrid = cpus_of(&policy, "hybrid-20");
    assert_eq!(hybrid["game"].to_string(), "0-7");
    assert_eq!(hybrid["render"].to_string(), "16-19");
    assert_eq!(hybrid["game-cache"].to_string(), "8-12", "{hybrid:?}");

    // Dota 2 goes to its class, everything below the reaper with it; other
    // Steam games stay `game`.
    let reaper = |app: &str| ProcInfo {
        comm: "reaper".into(),
        exe: "/home/u/.local/share/Steam/ubuntu12_32/reaper".into(),
        argv: ["reaper", "SteamLaunch", &format!("AppId={app}"), "--"]
            .map(String::from)
            .to_vec(),
        env: [("SteamAppId".to_owned(), app.to_owned())].into(),
        ..Default::default()
    };
    // Steam's env reaches the game itself too, so its own rule is dota2.
    let game = |app: &str, exe: &str| ProcInfo {
        comm: "game".into(),
        exe: exe.into(),
        env: [("SteamAppId".to_owned(), app.to_owned())].into(),
        ..Default::default()
    };
    let dota = [
        reaper("570"),
        game(
            "570",
            "/home/u/.local/share/Steam/steamapps/common/dota 2 beta/game/bin/linuxsteamrt64/dota2",
        ),
    ];
    let d = classify_chain(&policy, None, &dota);
    assert_eq!((d.class.as_str(), d.rule.as_str()), ("game-cache", "dota2"));
    let other = [
        reaper("730"),
        game(
            "730",
            "/home/u/.local/share/Steam/steamapps/common/cs2/game/bin/linuxsteamrt64/cs2",
        ),
    ];
    assert_eq!(classify_chain(&policy, None, &other).class, "game");
    // And the shipped default alone has no such class.
    assert!(!self::policy().classes.contains_key("game-cache"));
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
