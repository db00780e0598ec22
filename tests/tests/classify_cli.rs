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
