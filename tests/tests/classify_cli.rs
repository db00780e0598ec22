//! `corral classify --procs`: the offline interface other tools use. Runs
//! the shipped default policy over the recorded chains and checks the JSON
//! lines it prints, without an agent or root.

use std::{path::Path, process::Command};

use corral_tests::{chain_lines, corral_bin, repo_root, write_file};

/// Writes `files` (name, text) into a fresh directory for `test`.
fn scratch(test: &str, files: &[(&str, &str)]) -> Vec<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("corral-classify-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    files
        .iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            write_file(&path, text);
            path
        })
        .collect()
}

/// `corral classify --no-override --procs PROCS --policy POLICY [extra]`,
/// which must succeed; its standard output.
fn classify(procs: &Path, policy: &Path, extra: &[&str]) -> Vec<u8> {
    let output = Command::new(corral_bin())
        .args(["classify", "--no-override", "--procs"])
        .arg(procs)
        .arg("--policy")
        .arg(policy)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[test]
fn offline_classifier_prints_one_json_line_per_chain() {
    let fixture = repo_root().join("agent/tests/fixtures/chains.jsonl");
    let stdout = classify(&fixture, &repo_root().join("policies/default.toml"), &[]);
    let expected: Vec<serde_json::Value> = std::fs::read_to_string(&fixture)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got = chain_lines(&stdout);
    assert_eq!(got.len(), expected.len());
    for (want, have) in expected.iter().zip(&got) {
        assert_eq!(want["id"], have.id);
        assert_eq!(want["expect"], have.class, "chain {}: {have:?}", want["id"]);
        assert!(!have.rule.is_empty());
    }
}

#[test]
fn offline_classifier_rejects_bad_input_with_the_line_number() {
    let input = &scratch(
        "bad",
        &[(
            "bad.jsonl",
            "{\"id\": \"ok\", \"chain\": [{\"exe\": \"/bin/sh\", \"comm\": \"sh\"}]}\n{not json}\n",
        )],
    )[0];
    let output = Command::new(corral_bin())
        .args(["classify", "--procs"])
        .arg(input)
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
    const POLICY: &str = r#"classes = { game = { cpus = "0" }, render = { cpus = "0" } }
rules = [
    { name = "steam-reaper", class = "game", inherit = true, exe = ["*/reaper"], argv = ["SteamLaunch"] },
    { name = "blender", class = "render", inherit = true, exe = ["*/blender"] },
    { name = "dota2", class = "game", steam_app = 570 },
]
"#;
    const CHAINS: &str = concat!(
        r#"{"id": "reaper", "chain": [{"exe": "/s/ubuntu12_32/reaper", "comm": "reaper", "argv": ["reaper", "SteamLaunch", "AppId=440", "--"], "env": {"SteamAppId": "440"}}]}"#,
        "\n",
        r#"{"id": "blender-python", "chain": [{"exe": "/usr/bin/bash", "comm": "bash", "argv": ["bash"]}, {"exe": "/usr/bin/python3.11", "comm": "python3.11", "argv": ["/opt/blender/4.2/python/bin/python3.11", "-m", "pip"]}]}"#,
        "\n",
    );
    let files = scratch(
        "explain",
        &[("policy.toml", POLICY), ("chains.jsonl", CHAINS)],
    );
    let (policy, input) = (&files[0], &files[1]);
    let stdout = classify(input, policy, &["--explain"]);
    let p = policy.display();
    let want = format!(
        "reaper: game by steam-reaper
      1. steam-reaper -> game ({p}:3): MATCHES, decides
      2. blender -> render ({p}:4): exe */blender: no, exe is /s/ubuntu12_32/reaper
      3. dota2 -> game ({p}:5): steam_app 570: no, SteamAppId is 440 and no argument is AppId=570
blender-python: system by default
      1. steam-reaper -> game ({p}:3): exe */reaper: no, exe is /usr/bin/python3.11
      2. blender -> render ({p}:4): exe */blender: no, exe is /usr/bin/python3.11
      3. dota2 -> game ({p}:5): steam_app 570: no, SteamAppId, SteamGameId, STEAM_COMPAT_APP_ID are unset and no argument is AppId=570
"
    );
    assert_eq!(String::from_utf8_lossy(&stdout), want);
}
