//! Installs what the build and tests need on a fresh machine: nightly with
//! rust-src for the eBPF side, bpf-linker built against rustc's own LLVM,
//! tracefs. Each step is skipped when already done.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repo")
        .to_owned()
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// clippy for the stable toolchain, which `cargo xtask test` runs.
pub fn clippy() -> anyhow::Result<()> {
    if Command::new("cargo")
        .args(["clippy", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    status(Command::new("rustup").args(["component", "add", "clippy"]))
}

/// nightly + rust-src + bpf-linker.
pub fn ebpf_toolchain() -> anyhow::Result<()> {
    let toolchains = run(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = run(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    println!("installing bpf-linker against nightly rustc's LLVM (about 80 s, once)");
    let sysroot = run(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .ok_or_else(|| {
            anyhow!(
                "no libLLVM-*.so in {}; reinstall the nightly toolchain",
                lib.display()
            )
        })?;
    let llvm_major = llvm
        .trim_start_matches("libLLVM-")
        .split(['-', '.'])
        .next()
        .unwrap_or_default()
        .to_owned();
    let link_name = llvm.trim_start_matches("lib").trim_end_matches(".so");
    let rustflags = format!(
        "-L {lib} -l dylib={link_name} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib.display()
    );
    status(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{llvm_major},no-llvm-linking"))
            .env("RUSTFLAGS", rustflags),
    )
}

/// cargo-fuzz, for `cargo xtask fuzz` (the targets build on nightly, which
/// [`ebpf_toolchain`] installs).
pub fn cargo_fuzz() -> anyhow::Result<()> {
    ebpf_toolchain()?;
    if Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    println!("installing cargo-fuzz (a few minutes, once)");
    status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Mounts tracefs at /sys/kernel/tracing if it is not there.
pub fn tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    status(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

/// Installs Debian packages that are missing.
pub fn apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {}", missing.join(" "));
    status(Command::new("apt-get").arg("update").arg("-q"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
