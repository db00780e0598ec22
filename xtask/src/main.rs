//! Development commands: `cargo xtask run`, `cargo xtask test`,
//! `cargo xtask bench exec`, `cargo xtask vm -- CMD`. Each installs what it
//! is missing (nightly rust-src, bpf-linker, the VM tools) first.

mod bench;
mod package;
mod setup;
mod vm;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build, load and run the agent (as root) on the shipped default policy.
    Run {
        /// Extra arguments for `corral run`, e.g. `-- --dry-run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, integration on this kernel, and the cgroup v2
    /// cpuset tier inside a throwaway VM.
    Test {
        /// Skip the VM tier.
        #[arg(long)]
        no_vm: bool,
    },
    /// Benchmarks; numbers are printed, not asserted.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
    /// Build the man page and the Debian package, verify the systemd unit,
    /// parse the Nix files.
    Package,
    /// Run a command inside the cgroup-v2-only VM (see shared/VM.md).
    Vm {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = setup::repo_root();
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Task::Run { args } => {
            setup::ebpf_toolchain()?;
            setup::tracefs()?;
            cargo(&["build", "--release", "-p", "corral"])?;
            let status = Command::new(root.join("target/release/corral"))
                .arg("run")
                .arg("--policy")
                .arg(root.join("policies/default.toml"))
                .args(&args)
                .status()?;
            if !status.success() {
                bail!("corral exited with {status}");
            }
            Ok(())
        }
        Task::Test { no_vm } => {
            setup::ebpf_toolchain()?;
            setup::clippy()?;
            // `corral top` is tested in a tmux pseudo-terminal; the overhead
            // bench uses perf.
            setup::apt(&["tmux", "util-linux"])?;
            setup::tracefs()?;
            cargo(&["build", "-p", "corral"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                "corral-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            // One at a time: the agent tests share the machine's process tree.
            cargo(&["test", "--workspace", "--", "--test-threads=1"])?;
            package::package()?;
            if no_vm {
                println!("VM tier skipped (--no-vm)");
                return Ok(());
            }
            vm::test_tier()
        }
        Task::Bench { bench } => {
            setup::ebpf_toolchain()?;
            setup::tracefs()?;
            cargo(&["build", "--release", "-p", "corral"])?;
            bench::run(bench)
        }
        Task::Vm { command } => vm::run(&command.join(" ")),
        Task::Package => {
            setup::ebpf_toolchain()?;
            package::package()
        }
    }
}

/// Runs cargo with `args` in the workspace root, failing on a bad exit.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {args:?}"))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}
