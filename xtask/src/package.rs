//! Packaging checks: the man page from the CLI definitions, the Debian
//! package (cargo-deb) and its contents, `systemd-analyze verify` of the
//! unit, and a parse of the Nix flake and NixOS module.

use std::process::Command;

use anyhow::{Context as _, anyhow, bail};

use crate::setup::{apt, repo_root};

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Paths the .deb must contain.
const DEB_CONTENTS: &[&str] = &[
    "./usr/bin/corral",
    "./usr/share/corral/default.toml",
    "./etc/corral/README",
    "./usr/share/man/man1/corral.1.gz",
    "./usr/lib/systemd/system/corral.service",
];

pub fn package() -> anyhow::Result<()> {
    let root = repo_root();
    crate::cargo(&["build", "--release", "-p", "corral"])?;
    let corral = root.join("target/release/corral");

    // Man page.
    let man = run(Command::new(&corral).arg("man"))?;
    if !man.contains(".TH corral") {
        bail!("`corral man` did not print a man page");
    }
    std::fs::create_dir_all(root.join("target/man/man1"))?;
    std::fs::write(root.join("target/man/man1/corral.1"), &man)?;
    println!(
        "man page: target/man/man1/corral.1 ({} lines)",
        man.lines().count()
    );

    // systemd unit, with the paths pointed at this build.
    apt(&["systemd", "man-db"])?;
    let unit = std::fs::read_to_string(root.join("packaging/corral.service"))?
        .replace("/usr/bin/corral", &corral.display().to_string());
    let dir = root.join("target/unit-check");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("corral.service"), unit)?;
    let verify = Command::new("systemd-analyze")
        // Documentation=man:corral(1) is checked with `man`.
        .env("MANPATH", root.join("target/man"))
        .arg("verify")
        .arg(dir.join("corral.service"))
        .output()?;
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
    // Without systemd as PID 1 it may mention the missing manager; anything
    // about our unit is an error.
    let ours: Vec<&str> = complaints
        .lines()
        .filter(|l| l.contains("corral.service"))
        .collect();
    if !verify.status.success() && !ours.is_empty() || !ours.is_empty() {
        bail!(
            "systemd-analyze verify found problems:\n{}",
            ours.join("\n")
        );
    }
    println!("systemd-analyze verify packaging/corral.service: ok");

    // Debian package.
    if Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
    } else {
        println!("installing cargo-deb (once)");
        crate::cargo(&["install", "cargo-deb", "--locked"])?;
    }
    let out = run(Command::new("cargo")
        .args(["deb", "-p", "corral", "--no-build", "--no-strip"])
        .current_dir(&root))?;
    let deb = out
        .lines()
        .rev()
        .find(|l| l.trim().ends_with(".deb"))
        .map(|l| l.trim().to_owned())
        .ok_or_else(|| anyhow!("cargo deb printed no .deb path: {out}"))?;
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    for path in DEB_CONTENTS {
        if !listing.lines().any(|l| l.ends_with(path)) {
            bail!("{deb} lacks {path}:\n{listing}");
        }
    }
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb))?;
    println!(
        "{deb}: {} files, contains {DEB_CONTENTS:?}",
        listing.lines().count()
    );
    if !info.contains("postinst") {
        println!("note: no maintainer scripts in the package");
    }

    // Nix: parse (no network here to evaluate nixpkgs).
    apt(&["nix-bin"])?;
    for file in ["flake.nix", "nix/package.nix", "nix/module.nix"] {
        run(Command::new("nix-instantiate")
            .arg("--parse")
            .arg(root.join(file)))
        .with_context(|| format!("{file} does not parse"))?;
    }
    println!(
        "nix: flake.nix, nix/package.nix, nix/module.nix parse (evaluation needs nixpkgs, not available offline)"
    );
    Ok(())
}
