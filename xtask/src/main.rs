//! Development commands: `cargo xtask run`, `cargo xtask test`,
//! `cargo xtask bench exec`, `cargo xtask fuzz`, `cargo xtask vm -- CMD`,
//! `cargo xtask systemd-vm`.
//! Each installs what it is missing (nightly rust-src, bpf-linker, the VM
//! tools) first.

mod bench;
mod fuzz;
mod package;
mod setup;
mod soak;
mod systemd_vm;
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
        /// Skip the systemd VM tier (a Debian guest with systemd as PID 1).
        #[arg(long)]
        no_systemd_vm: bool,
        /// Skip the fuzz targets.
        #[arg(long)]
        no_fuzz: bool,
        /// Seconds each fuzz target runs.
        #[arg(long, default_value_t = 5)]
        fuzz_seconds: u64,
    },
    /// Run the cargo-fuzz targets (policy, ananicy, ring_record,
    /// control_request) one after another; installs cargo-fuzz if missing.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Benchmarks; numbers are printed, not asserted.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
    /// A long mixed load (200,000 execs at alternating rates, 10,000 control
    /// requests from two users while a third floods) with the agent's RSS,
    /// descriptors and CPU sampled; numbers are printed, not asserted.
    Soak(soak::Soak),
    /// One user's control-socket load for `soak` (run by it).
    #[command(hide = true)]
    SoakClient(soak::SoakClient),
    /// Build the man page and the Debian package, verify the systemd unit,
    /// parse the Nix files.
    Package,
    /// Run a command inside the cgroup-v2-only VM (see shared/VM.md).
    Vm {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build the .deb, install and start it with dpkg and systemctl in a
    /// Debian 12 guest with systemd as PID 1, and run the scenarios of
    /// tests/systemd-vm/ (see shared/SYSTEMD-VM.md).
    SystemdVm {
        /// Keep the run's disk overlay (target/systemd-vm/last-run/run.qcow2).
        #[arg(long)]
        keep_image: bool,
        /// Run only this scenario (or several, comma-separated), e.g. `service`.
        #[arg(long)]
        scenario: Option<String>,
        /// Install this .deb instead of building one.
        #[arg(long)]
        deb: Option<std::path::PathBuf>,
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
        Task::Test {
            no_vm,
            no_systemd_vm,
            no_fuzz,
            fuzz_seconds,
        } => {
            setup::ebpf_toolchain()?;
            setup::clippy()?;
            // `corral top` is tested in a tmux pseudo-terminal; the overhead
            // bench uses perf; the systemd D-Bus client is tested against a fake
            // manager on a private dbus-daemon.
            setup::apt(&["tmux", "util-linux", "dbus-daemon"])?;
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
            if no_fuzz {
                println!("fuzz targets skipped (--no-fuzz)");
            } else {
                fuzz::run(&root, &all_fuzz_targets(), fuzz_seconds)?;
            }
            package::package()?;
            if no_vm {
                println!("VM tier skipped (--no-vm)");
            } else {
                vm::test_tier()?;
            }
            if no_systemd_vm {
                println!("systemd VM tier skipped (--no-systemd-vm)");
                return Ok(());
            }
            systemd_vm::test_tier()
        }
        Task::Bench { bench } => {
            setup::ebpf_toolchain()?;
            setup::tracefs()?;
            cargo(&["build", "--release", "-p", "corral"])?;
            bench::run(bench)
        }
        Task::Soak(soak) => {
            setup::ebpf_toolchain()?;
            setup::tracefs()?;
            cargo(&["build", "--release", "-p", "corral"])?;
            soak::run(soak)
        }
        Task::SoakClient(client) => soak::client(client),
        Task::Fuzz { seconds, targets } => {
            let targets = if targets.is_empty() {
                all_fuzz_targets()
            } else {
                targets
            };
            fuzz::run(&root, &targets, seconds).map(drop)
        }
        Task::Vm { command } => vm::run(&command.join(" ")),
        Task::SystemdVm {
            keep_image,
            scenario,
            deb,
        } => systemd_vm::command(&systemd_vm::Options {
            keep_image,
            scenario,
            deb,
        }),
        Task::Package => {
            setup::ebpf_toolchain()?;
            package::package()
        }
    }
}

fn all_fuzz_targets() -> Vec<String> {
    fuzz::TARGETS.iter().map(|t| (*t).to_owned()).collect()
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
