//! Policy parsing, layering and validation messages (golden: the exact
//! text a user sees).

use super::*;

fn parse(text: &str) -> Result<Policy, PolicyError> {
    Policy::parse(Path::new("test.toml"), text)
}

fn error(text: &str) -> String {
    parse(text)
        .expect_err("policy should be refused")
        .to_string()
}

const BASE: &str = r#"
[classes.game]
cpus = "0-3"
cpu_weight = 1000

[classes.dev]
cpus = { share = 0.5 }

[[rules]]
name = "game-a"
class = "game"
comm = ["a"]

[[rules]]
name = "dev-b"
class = "dev"
comm = ["b"]
"#;

#[test]
fn rule_sources_name_their_line() {
    let policy = parse(BASE).unwrap();
    assert_eq!(policy.rules[0].source.line, 9);
    assert_eq!(policy.rules[1].source.line, 14);
    assert!(policy.class("system").is_some());
    assert_eq!(
        policy.classes.keys().collect::<Vec<_>>(),
        ["game", "dev", "system"]
    );
}

#[test]
fn golden_syntax_error() {
    assert_eq!(
        error("[classes.game]\ncpus = 0-7\n"),
        "test.toml:2:9: expected newline, `#`"
    );
}

#[test]
fn golden_unknown_class() {
    assert_eq!(
        error("[[rules]]\nname = \"a\"\nclass = \"gmae\"\ncomm = [\"x\"]\n"),
        "test.toml:1:1: rule `a`: unknown class `gmae`; define it under [classes] or use one of: system"
    );
}

#[test]
fn golden_bad_cpu_list() {
    assert_eq!(
        error("[classes.game]\ncpus = \"7-3\"\n"),
        "test.toml:2:8: `7-3`: range 7-3 runs backwards"
    );
}

#[test]
fn golden_weight_out_of_range() {
    assert_eq!(
        error("[classes.game]\ncpus = \"0\"\ncpu_weight = 0\n"),
        "test.toml:1:1: class `game`: cpu_weight 0 is outside 1..=10000"
    );
}

#[test]
fn golden_rule_without_matchers() {
    assert_eq!(
        error("[[rules]]\nname = \"all\"\nclass = \"system\"\n"),
        "test.toml:1:1: rule `all`: matches every process; give it at least one matcher"
    );
}

#[test]
fn golden_duplicate_rule_name() {
    let text = "[[rules]]\nname = \"a\"\nclass = \"system\"\ncomm = [\"x\"]\n\n[[rules]]\nname = \"a\"\nclass = \"system\"\ncomm = [\"y\"]\n";
    assert_eq!(
        error(text),
        "test.toml:6:1: rule `a`: a rule with this name already exists in this file; names must be unique"
    );
}

#[test]
fn golden_core_list_not_on_this_machine() {
    let policy = parse("[classes.game]\ncpus = \"0-7\"\n").unwrap();
    let topology = Topology::read(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sysfs/vm-2"
    )))
    .unwrap();
    assert_eq!(
        policy.resolve_cpus(&topology).unwrap_err().to_string(),
        "test.toml:1:1: class `game`: cpus \"0-7\" names CPUs this machine does not have; it has 2 (online: 0-1). Use CPUs that exist, or an intent such as `cpus = { share = 0.4, prefer = \"performance\" }`"
    );
}

#[test]
fn unknown_keys_warn_with_position_and_still_load() {
    let policy = parse("[classes.game]\ncpus = \"0\"\n\n[[rules]]\nname = \"a\"\nclass = \"game\"\ncom = [\"x\"]\nexe = [\"/x\"]\n").unwrap();
    assert_eq!(
        policy.warnings,
        [
            "test.toml:7:1: unknown key `com` in rule `a` is ignored (known keys: name, class, disabled, inherit, ignore_case, exe, comm, argv, cwd, cgroup, env, ancestor, unless)"
        ]
    );
}

#[test]
fn world_writable_file_is_refused() {
    let dir = std::env::temp_dir().join(format!("corral-policy-ww-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.toml");
    std::fs::write(&path, BASE).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = Policy::load(&path).unwrap_err().to_string();
    assert!(err.contains("world-writable"), "{err}");
    assert!(
        err.contains(&format!("chmod o-w {}", path.display())),
        "{err}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(Policy::load(&path).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn override_wins_key_by_key() {
    let user = r#"
[classes.game]
cpu_weight = 2000

[[rules]]
name = "dev-b"
class = "game"
comm = ["b"]

[[rules]]
name = "mine"
class = "dev"
comm = ["c"]

[[rules]]
name = "game-a"
disabled = true

[modes]
hold_down_ms = 1000
"#;
    let policy = Policy::parse_layers(&[
        (Path::new("default.toml"), BASE),
        (Path::new("user.toml"), user),
    ])
    .unwrap();
    let game = policy.class("game").unwrap();
    assert_eq!(game.cpu_weight, 2000);
    assert!(matches!(&game.cpus, Some(CoreSpec::List(l)) if l.to_string() == "0-3"));
    let names: Vec<_> = policy
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r.class.as_str()))
        .collect();
    assert_eq!(names, [("mine", "dev"), ("dev-b", "game")]);
    assert_eq!(policy.rules[1].source.file, Path::new("user.toml"));
    assert_eq!(policy.modes.hold_down, Duration::from_secs(1));
    assert_eq!(policy.modes.min_dwell, ModeConfig::default().min_dwell);
    assert_eq!(policy.describe_files(), "default.toml + user.toml");
}

#[test]
fn missing_override_is_skipped_but_missing_default_is_an_error() {
    let dir = std::env::temp_dir().join(format!("corral-policy-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let default = dir.join("default.toml");
    std::fs::write(&default, BASE).unwrap();
    let policy = Policy::load_layers(&[default.clone(), dir.join("absent.toml")]).unwrap();
    assert_eq!(policy.files, [default]);
    assert!(Policy::load_layers(&[dir.join("absent.toml")]).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ananicy_types_must_map_to_known_classes() {
    let err = error("[ananicy]\nenabled = true\ntypes = { Game = \"gaming\" }\n");
    assert!(
        err.contains("`Game` maps to unknown class `gaming`"),
        "{err}"
    );
}
