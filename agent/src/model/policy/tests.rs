//! Policy parsing, layering and validation messages (golden: the exact
//! text a user sees).

use super::*;
use crate::gpu::arbiter::{Amount, Step};

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
        "test.toml:2:8: class `game`: cpus \"0-7\" names CPUs this machine does not have; it has 2 (online: 0-1). Use CPUs that exist, or an intent such as `cpus = { share = 0.4, prefer = \"performance\" }`"
    );
}

#[test]
fn unknown_keys_warn_with_position_and_still_load() {
    let policy = parse("[classes.game]\ncpus = \"0\"\n\n[[rules]]\nname = \"a\"\nclass = \"game\"\ncom = [\"x\"]\nexe = [\"/x\"]\n").unwrap();
    assert_eq!(
        policy.warnings,
        [
            "test.toml:7:1: unknown key `com` in rule `a` is ignored (known keys: name, class, disabled, inherit, ignore_case, exe, comm, argv, cwd, cgroup, env, steam_app, ancestor, unless)"
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

fn vm_2() -> Topology {
    Topology::read(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sysfs/vm-2"
    )))
    .unwrap()
}

/// Regression: a bad `share` (or any other core-set error) in the user's
/// override was reported at the shipped file's line 0. It must name the
/// override, and the line and column of the `cpus` that asked.
#[test]
fn core_set_error_in_the_override_points_at_the_override_cpus() {
    let shipped =
        "[classes.render]\ncpus = { share = 0.2 }\n\n[classes.ai]\ncpus = { with = \"render\" }\n";
    let load = |user: &str| {
        Policy::parse_layers(&[
            (Path::new("/usr/share/corral/default.toml"), shipped),
            (Path::new("/etc/corral/policy.toml"), user),
        ])
        .expect_err("the override should be refused")
        .to_string()
    };
    assert_eq!(
        load("# mine\n[classes.render]\ncpus = { share = 1.7 }\n"),
        "/etc/corral/policy.toml:3:8: class `render`: cpus share = 1.7 is outside (0, 1]; give the fraction of the CPUs the class should get, e.g. share = 0.4 for 40%, or leave share out to give it what remains"
    );
    assert_eq!(
        load("[classes.ai]\ncpu_weight = 50\ncpus = { with = \"render\", share = 0.5 }\n"),
        "/etc/corral/policy.toml:3:8: class `ai`: cpus with = \"render\" copies that class's CPUs, so share would be ignored; remove share or remove with"
    );
    assert_eq!(
        load("[classes.render]\ncpus = { with = \"ai\" }\n"),
        "/etc/corral/policy.toml:2:8: class `render`: cpus `with` goes round in a circle (render → ai → render); let one of these classes choose its own CPUs"
    );
    assert_eq!(
        load("[classes.ai]\ncpus = { with = \"rendr\" }\n"),
        "/etc/corral/policy.toml:2:8: class `ai`: cpus with = \"rendr\" names no class with cpus; use one of: render"
    );
}

#[test]
fn core_set_error_points_at_the_layer_that_wrote_cpus() {
    // The override changes only the weight; the list that does not fit
    // this machine is the shipped file's.
    let policy = Policy::parse_layers(&[
        (
            Path::new("default.toml"),
            "[classes.game]\ncpu_weight = 10\ncpus = \"0-7\"\n",
        ),
        (Path::new("user.toml"), "[classes.game]\ncpu_weight = 20\n"),
    ])
    .unwrap();
    let game = policy.class("game").unwrap();
    assert_eq!(
        (game.source.file.as_path(), game.source.line),
        (Path::new("user.toml"), 1)
    );
    let err = policy.resolve_cpus(&vm_2()).unwrap_err().to_string();
    assert!(
        err.starts_with("default.toml:3:8: class `game`: cpus \"0-7\""),
        "{err}"
    );
    // Written again in the override: the override is the place to fix.
    let policy = Policy::parse_layers(&[
        (Path::new("default.toml"), "[classes.game]\ncpus = \"0\"\n"),
        (Path::new("user.toml"), "\n[classes.game]\ncpus = \"0-7\"\n"),
    ])
    .unwrap();
    let err = policy.resolve_cpus(&vm_2()).unwrap_err().to_string();
    assert!(err.starts_with("user.toml:3:8: class `game`"), "{err}");
}

#[test]
fn protected_class_comes_from_the_policy() {
    let policy = parse(BASE).unwrap();
    assert_eq!(policy.protected_class(), "game");
    assert_eq!(policy.gpu.arbiter.protected_class, "game");
    let policy = parse(&format!("{BASE}\n[modes]\nprotected_class = \"dev\"\n")).unwrap();
    assert_eq!(policy.protected_class(), "dev");
    assert_eq!(policy.gpu.arbiter.protected_class, "dev");
    assert_eq!(
        error(&format!("{BASE}\n[modes]\nprotected_class = \"gmae\"\n")),
        "test.toml:20:19: [modes] protected_class: `gmae` is not a class corral places; use one of: game, dev"
    );
    assert!(
        error(&format!("{BASE}\n[modes]\nprotected_class = \"system\"\n"))
            .contains("`system` is not a class corral places")
    );
}

#[test]
fn thermal_classes_default_to_render_and_ai_and_must_have_cpus() {
    let with_batch = format!(
        "{BASE}\n[classes.ai]\ncpus = {{ with = \"render\" }}\n\n[classes.render]\ncpus = \"1\"\n"
    );
    assert_eq!(
        parse(&with_batch).unwrap().cooled_classes(),
        ["render", "ai"]
    );
    // The default names only the classes this policy has.
    let policy = parse(BASE).unwrap();
    assert!(policy.cooled_classes().is_empty());
    let policy = parse(&format!("{BASE}\n[gpu.thermal]\nclasses = [\"dev\"]\n")).unwrap();
    assert_eq!(policy.cooled_classes(), ["dev"]);
    assert_eq!(
        error(&format!(
            "{BASE}\n[gpu.thermal]\nclasses = [\"dev\", \"rendr\"]\n"
        )),
        "test.toml:20:11: [gpu.thermal] classes: `rendr` is not a class with cpus, so the thermal guard has no cores of it to halve; use some of: game, dev"
    );
    assert!(
        error(&format!("{BASE}\n[gpu.thermal]\nclasses = [\"system\"]\n"))
            .contains("`system` is not a class with cpus")
    );
    // An empty list turns the halving off.
    let policy = parse(&format!("{BASE}\n[gpu.thermal]\nclasses = []\n")).unwrap();
    assert!(policy.cooled_classes().is_empty());
}

/// Regression: the process table kept only the environment rules look at,
/// so ollama's `OLLAMA_HOST` was dropped and the asker always asked the
/// default port.
#[test]
fn env_keys_keep_what_the_askers_read() {
    let policy = parse(BASE).unwrap();
    assert!(policy.env_keys().contains("OLLAMA_HOST"));
}

#[test]
fn gpu_class_budgets_merge_key_by_key() {
    let shipped = format!(
        "{BASE}\n[gpu]\nenabled = true\n\n[gpu.classes.game]\npriority = 1\nreserve = \"33%\"\n\n[gpu.classes.dev]\npriority = 4\nmax = \"17%\"\nladder = [\"notify\", \"freeze\"]\n"
    );
    let policy = Policy::parse_layers(&[
        (Path::new("default.toml"), &shipped),
        (Path::new("user.toml"), "[gpu.classes.dev]\nmax = \"25%\"\n"),
    ])
    .unwrap();
    let dev = policy
        .gpu
        .arbiter
        .classes
        .iter()
        .find(|b| b.class == "dev")
        .unwrap();
    assert_eq!(dev.priority, 4);
    assert_eq!(dev.max, Some(Amount::Percent(25.0)));
    assert_eq!(dev.ladder, [Step::Notify, Step::Freeze]);
    // A class's first budget needs its priority.
    let err = Policy::parse_layers(&[
        (Path::new("default.toml"), &shipped),
        (
            Path::new("user.toml"),
            "\n[gpu.classes.game2]\nmax = \"5%\"\n",
        ),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("user.toml:2:1: [gpu.classes.game2]: missing `priority`"),
        "{err}"
    );
}

#[test]
fn steam_app_expands_to_the_env_and_argv_matchers() {
    let policy = parse(
        "[classes.game-cache]\ncpus = \"0\"\n\n[[rules]]\nname = \"dota2\"\nclass = \"game-cache\"\nsteam_app = 570\nunless = { steam_app = 571 }\n",
    )
    .unwrap();
    let rule = &policy.rules[0];
    let app = rule.matcher.steam_app.as_ref().unwrap();
    assert_eq!(app.id, 570);
    let expanded: Vec<String> = app
        .expands_to
        .iter()
        .flat_map(|m| {
            m.env
                .iter()
                .map(|(k, g)| format!("env {k}={}", g.glob().glob()))
                .chain(m.argv.iter().map(|g| format!("argv {}", g.glob().glob())))
        })
        .collect();
    assert_eq!(
        expanded,
        [
            "env SteamAppId=570",
            "env SteamGameId=570",
            "env STEAM_COMPAT_APP_ID=570",
            "argv AppId=570"
        ]
    );
    assert_eq!(
        rule.unless.as_ref().unwrap().steam_app.as_ref().unwrap().id,
        571
    );
    // A steam_app alone is a matcher; the table keeps the env it reads.
    assert!(!rule.matcher.is_empty());
    assert!(policy.env_keys().contains("SteamGameId"));
}

#[test]
fn golden_steam_app_that_is_not_a_number() {
    let err = error("[[rules]]\nname = \"dota2\"\nclass = \"system\"\nsteam_app = \"dota\"\n");
    assert!(err.starts_with("test.toml:1:1: "), "{err}");
    assert!(err.contains("invalid type: string \"dota\""), "{err}");
}

#[test]
fn power_and_desktop_notifications_are_on_by_default_and_an_override_turns_them_off() {
    let policy = parse(BASE).unwrap();
    assert_eq!(
        policy.power,
        PowerConfig {
            enabled: true,
            sysfs: true
        }
    );
    assert!(policy.notifications.desktop);
    assert_eq!(policy.notifications.min_interval, Duration::from_secs(60));
    let policy = Policy::parse_layers(&[
        (Path::new("default.toml"), BASE),
        (
            Path::new("user.toml"),
            "[power]\nsysfs = false\n\n[notifications]\ndesktop = false\nmin_interval_ms = 5000\nloud = true\n",
        ),
    ])
    .unwrap();
    assert!(policy.power.enabled, "key by key: only sysfs changed");
    assert!(!policy.power.sysfs);
    assert!(!policy.notifications.desktop);
    assert_eq!(
        policy.notifications.min_interval,
        Duration::from_millis(5000)
    );
    assert!(
        policy
            .warnings
            .iter()
            .any(|w| w.starts_with("user.toml:7:1: unknown key `loud` in [notifications]")),
        "{:?}",
        policy.warnings
    );
    let err = Policy::parse_layers(&[
        (Path::new("default.toml"), BASE),
        (Path::new("user.toml"), "[power]\nenabled = \"yes\"\n"),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("user.toml:2:"), "{err}");
}
