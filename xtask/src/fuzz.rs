//! `cargo xtask fuzz`: runs each cargo-fuzz (libFuzzer) target of `fuzz/`
//! for a bounded time, one after another, and prints how many inputs each
//! ran. `cargo xtask test` runs it for a few seconds a target.
//!
//! Corpora: `fuzz/seeds/TARGET` (committed: the shipped policy, the ananicy
//! fixtures, encoded ring records, request lines) and `fuzz/corpus/TARGET`
//! (ignored; what libFuzzer found interesting, kept between runs). A crash
//! leaves its input in `fuzz/artifacts/TARGET/` and fails the run: turn it
//! into a named regression test beside the parser, then fix the parser.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Every target, in the order they run.
pub const TARGETS: &[&str] = &["policy", "ananicy", "ring_record", "control_request"];

/// What one target's run did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub target: String,
    pub seconds: u64,
    pub execs: u64,
    pub execs_per_sec: u64,
}

/// Builds the targets once, then runs each of `targets` for `seconds`.
pub fn run(root: &Path, targets: &[String], seconds: u64) -> anyhow::Result<Vec<Outcome>> {
    for target in targets {
        if !TARGETS.contains(&target.as_str()) {
            bail!(
                "no fuzz target `{target}`; there are: {}",
                TARGETS.join(", ")
            );
        }
    }
    crate::setup::cargo_fuzz()?;
    // Debug assertions on: an arithmetic overflow in a parser is a crash.
    let status = Command::new("cargo")
        .args(["+nightly", "fuzz", "build", "--debug-assertions"])
        .current_dir(root)
        .status()
        .context("running cargo +nightly fuzz build")?;
    if !status.success() {
        bail!("cargo +nightly fuzz build failed with {status}");
    }
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_one(root, target, seconds)?);
    }
    for o in &outcomes {
        println!(
            "fuzz {:<16} {:>4} s {:>10} execs {:>8} execs/s  no crash",
            o.target, o.seconds, o.execs, o.execs_per_sec
        );
    }
    Ok(outcomes)
}

fn run_one(root: &Path, target: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let corpus = root.join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let seeds = root.join("fuzz/seeds").join(target);
    let mut child = Command::new("cargo")
        .args(["+nightly", "fuzz", "run", "--debug-assertions", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .current_dir(root)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let mut outcome = Outcome {
        target: target.to_owned(),
        seconds,
        ..Default::default()
    };
    let stderr = child.stderr.take().expect("stderr is piped");
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        let stat = |name: &str| {
            line.strip_prefix(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(n) = stat("stat::number_of_executed_units:") {
            outcome.execs = n;
        }
        if let Some(n) = stat("stat::average_exec_per_sec:") {
            outcome.execs_per_sec = n;
        }
        // libFuzzer's progress lines are many; keep what says something.
        if !line.starts_with('#') || line.contains("DONE") {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "fuzz target `{target}` crashed ({status}); the input is in fuzz/artifacts/{target}/: \
             add it as a named regression test beside the parser, then fix the parser"
        );
    }
    Ok(outcome)
}
