//! `corral policy check/test/show` and the ananicy-cpp rule source, through
//! the real binary; no agent or root needed.

use std::{path::Path, process::Command};

use corral_tests::{chain_lines, corral_bin, repo_root, write_file};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("corral-policy-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn corral(args: &[&str], extra: &[&Path]) -> std::process::Output {
    Command::new(corral_bin())
        .args(args)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn policy_check_accepts_the_shipped_default_and_refuses_a_bad_override() {
    let default = repo_root().join("policies/default.toml");
    let ok = corral(&["policy", "check", "--standalone"], &[&default]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains(": ok ("), "{stdout}");

    let dir = scratch("check");
    let bad = dir.join("policy.toml");
    write_file(
        &bad,
        "[classes.game]\ncpus = \"0\"\n\n[[rules]]\nname = \"x\"\nclass = \"gaem\"\ncomm = [\"x\"]\n",
    );
    let refused = corral(&["policy", "check"], &[&bad]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:4:1: rule `x`: unknown class `gaem`",
            bad.display()
        )),
        "{stderr}"
    );

    // A core list this machine does not have is refused, naming what exists.
    write_file(&bad, "[classes.game]\ncpus = \"0-4095\"\n");
    let refused = corral(&["policy", "check", "--standalone"], &[&bad]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("names CPUs this machine does not have"),
        "{stderr}"
    );

    // Unknown keys warn but pass.
    write_file(&bad, "[classes.game]\ncpus = \"0\"\ncpu_wieght = 5\n");
    let warned = corral(&["policy", "check", "--standalone"], &[&bad]);
    assert!(warned.status.success());
    assert!(String::from_utf8_lossy(&warned.stderr).contains("3:1: unknown key `cpu_wieght`"));
}

#[test]
fn policy_show_resolves_the_default_on_the_reference_fixture() {
    let fixture = repo_root().join("agent/tests/fixtures/sysfs/hybrid-20");
    let default = repo_root().join("policies/default.toml");
    let out = corral(
        &["policy", "show", "--no-override", "--policy"],
        &[&default, Path::new("--sysfs-root"), &fixture],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for (class, cpus) in [
        ("game", "0-7"),
        ("dev", "8-15"),
        ("render", "16-19"),
        ("ai", "16-19"),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(class))
            .unwrap_or_default();
        assert!(
            line.contains(&format!("cpus {cpus} ")),
            "{class}: {line}\n{text}"
        );
    }
}

/// The per-game override documented in the shipped default and README.
#[test]
fn policy_show_prints_a_per_game_class_from_the_override() {
    let dir = scratch("per-game");
    let over = dir.join("policy.toml");
    write_file(
        &over,
        "[classes.game-cache]\ncpus = { share = 0.25, prefer = \"cache\" }\ncpu_weight = 1000\n\n[[rules]]\nname = \"dota2\"\nclass = \"game-cache\"\ninherit = true\nsteam_app = 570\n",
    );
    let default = repo_root().join("policies/default.toml");
    let fixture = repo_root().join("agent/tests/fixtures/sysfs/x3d-7950");
    let out = corral(
        &["policy", "show", "--policy"],
        &[
            &default,
            Path::new("--override"),
            &over,
            Path::new("--sysfs-root"),
            &fixture,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |class: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{class} ")))
            .unwrap_or_default()
            .to_owned()
    };
    let cache = line("game-cache");
    assert!(cache.contains("cpus 0-3,16-19 "), "{cache}\n{text}");
    assert!(text.contains("largest L3 cache first"), "{text}");
    assert!(line("game").contains("cpus 8-14,24-30 "), "{text}");
    // One column for the class names, however long.
    assert!(line("system").starts_with("  system     cpus "), "{text}");
    assert!(text.contains(&over.display().to_string()), "{text}");
}

#[test]
fn policy_test_on_recorded_chains_says_what_would_move_where() {
    let dir = scratch("test");
    let chains = dir.join("chains.jsonl");
    std::fs::write(
        &chains,
        concat!(
            r#"{"id": "editor", "chain": [{"exe": "/usr/bin/nvim", "comm": "nvim", "argv": ["nvim"]}]}"#, "\n",
            r#"{"id": "shell", "chain": [{"exe": "/usr/bin/bash", "comm": "bash", "argv": ["bash"]}]}"#, "\n",
        ),
    )
    .unwrap();
    let over = dir.join("policy.toml");
    write_file(
        &over,
        "[[rules]]\nname = \"shell-is-dev\"\nclass = \"dev\"\ncomm = [\"bash\"]\n",
    );
    let out = corral(&["policy", "test"], &[&over, Path::new("--procs"), &chains]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("editor: dev (cpus "), "{text}");
    assert!(
        text.contains("shell: dev (cpus ") && text.contains("by shell-is-dev"),
        "{text}"
    );
}

#[test]
fn ananicy_rules_classify_what_the_policy_does_not_know() {
    let dir = scratch("ananicy");
    let rules = repo_root().join("agent/tests/fixtures/ananicy/etc");
    let policy = dir.join("policy.toml");
    write_file(
        &policy,
        &format!(
            "[classes.game]\ncpus = \"0\"\n\n[ananicy]\nenabled = true\ndirs = [\"{}\"]\ntypes = {{ Game = \"game\" }}\n\n[[rules]]\nname = \"shell\"\nclass = \"system\"\ncomm = [\"bash\"]\n",
            rules.display()
        ),
    );
    let chains = dir.join("chains.jsonl");
    std::fs::write(
        &chains,
        concat!(
            r#"{"id": "native", "chain": [{"exe": "/home/u/games/DD/DungeonDefenders-x86", "comm": "DungeonDefender", "argv": ["./DungeonDefenders-x86"]}]}"#, "\n",
            r#"{"id": "unknown", "chain": [{"exe": "/usr/bin/foo", "comm": "foo", "argv": ["foo"]}]}"#, "\n",
        ),
    )
    .unwrap();
    let out = corral(
        &["classify", "--no-override", "--procs"],
        &[&chains, Path::new("--policy"), &policy],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = chain_lines(&out.stdout);
    assert_eq!(lines[0].class, "game", "{:?}", lines[0]);
    assert!(
        lines[0].rule.starts_with("ananicy:DungeonDefenders-x86"),
        "{:?}",
        lines[0]
    );
    assert!(
        lines[0]
            .source
            .as_deref()
            .is_some_and(|s| s.contains(".rules:")),
        "{:?}",
        lines[0]
    );
    assert_eq!(lines[1].class, "system");
}
