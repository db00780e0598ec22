//! `corral classify --procs`: the offline interface other tools use. Runs
//! the shipped default policy over the recorded chains and checks the JSON
//! lines it prints, without an agent or root.

use std::process::Command;

use corral_tests::{chain_lines, corral_bin, repo_root};

#[test]
fn offline_classifier_prints_one_json_line_per_chain() {
    let fixture = repo_root().join("agent/tests/fixtures/chains.jsonl");
    let output = Command::new(corral_bin())
        .args(["classify", "--procs"])
        .arg(&fixture)
        .arg("--policy")
        .arg(repo_root().join("policies/default.toml"))
        .arg("--no-override")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected: Vec<serde_json::Value> = std::fs::read_to_string(&fixture)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got = chain_lines(&output.stdout);
    assert_eq!(got.len(), expected.len());
    for (want, have) in expected.iter().zip(&got) {
        assert_eq!(want["id"], have.id);
        assert_eq!(want["expect"], have.class, "chain {}: {have:?}", want["id"]);
        assert!(!have.rule.is_empty());
    }
}

#[test]
fn offline_classifier_rejects_bad_input_with_the_line_number() {
    let dir = std::env::temp_dir().join(format!("corral-classify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"ok\", \"chain\": [{\"exe\": \"/bin/sh\", \"comm\": \"sh\"}]}\n{not json}\n",
    )
    .unwrap();
    let output = Command::new(corral_bin())
        .args(["classify", "--procs"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.jsonl:2"), "{stderr}");
    // The good line before it was still answered.
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"id\":\"ok\""));
}

/// `corral classify --explain`: every rule, in order, with the first matcher
/// that failed; golden on a chain a rule matches and on a near miss (the
/// Blender rule, against Blender's own Python started by hand).
#[test]
fn classify_explain_lists_each_rule_and_the_first_matcher_that_failed() {
    let dir = std::env::temp_dir().join(format!("corral-classify-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        r#"[classes.game]
cpus = "0"
[classes.render]
cpus = "0"

[[rules]]
name = "steam-reaper"
class = "game"
inherit = true
exe = ["*/reaper"]
argv = ["SteamLaunch"]

[[rules]]
name = "blender"
class = "render"
inherit = true
exe = ["*/blender"]

[[rules]]
name = "dota2"
class = "game"
steam_app = 570
"#,
    )
    .unwrap();
    let input = dir.join("chains.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"id": "reaper", "chain": [{"exe": "/s/ubuntu12_32/reaper", "comm": "reaper", "argv": ["reaper", "SteamLaunch", "AppId=440", "--"], "env": {"SteamAppId": "440"}}]}"#,
            "\n",
            r#"{"id": "blender-python", "chain": [{"exe": "/usr/bin/bash", "comm": "bash", "argv": ["bash"]}, {"exe": "/usr/bin/python3.11", "comm": "python3.11", "argv": ["/opt/blender/4.2/python/bin/python3.11", "-m", "pip"]}]}"#,
            "\n",
        ),
    )
    .unwrap();
    let output = Command::new(corral_bin())
        .args(["classify", "--explain", "--no-override", "--procs"])
        .arg(&input)
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let p = policy.display();
    let want = format!(
        "reaper: game by steam-reaper
      1. steam-reaper -> game ({p}:6): MATCHES, decides
      2. blender -> render ({p}:13): exe */blender: no, exe is /s/ubuntu12_32/reaper
      3. dota2 -> game ({p}:19): steam_app 570: no, SteamAppId is 440 and no argument is AppId=570
blender-python: system by default
      1. steam-reaper -> game ({p}:6): exe */reaper: no, exe is /usr/bin/python3.11
      2. blender -> render ({p}:13): exe */blender: no, exe is /usr/bin/python3.11
      3. dota2 -> game ({p}:19): steam_app 570: no, SteamAppId, SteamGameId, STEAM_COMPAT_APP_ID are unset and no argument is AppId=570
"
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), want);
}
