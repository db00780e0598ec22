//! The VM tier: boots a cgroup-v2-only kernel under QEMU (TCG, no KVM) with
//! virtme-ng, the host's root read-only and the repository shared
//! read-write, and runs tests there that need the cgroup v2 cpuset
//! controller. Recipe: shared/VM.md.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    setup::{apt, repo_root},
    systemd_vm::print_new_lines,
};

fn venv() -> PathBuf {
    repo_root().join("target/vng-venv")
}

/// qemu, a distro kernel with BTF and cpusets, and virtme-ng in a venv.
fn ensure_tools() -> anyhow::Result<PathBuf> {
    apt(&[
        "qemu-system-x86",
        "linux-image-amd64",
        "python3-venv",
        "busybox-static",
        "kmod",
    ])?;
    let venv = venv();
    if !venv.join("bin/vng").exists() {
        let status = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()?;
        if !status.success() {
            bail!("python3 -m venv {} failed", venv.display());
        }
        let status = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "virtme-ng"])
            .status()?;
        if !status.success() {
            bail!("pip install virtme-ng failed");
        }
    }
    Ok(venv)
}

/// The newest /boot/vmlinuz-*.
fn kernel() -> anyhow::Result<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .ok_or_else(|| anyhow!("no /boot/vmlinuz-*; install linux-image-amd64"))
}

/// Runs `command` (one shell string) in the guest, as root, in the repo.
pub fn run(command: &str) -> anyhow::Result<()> {
    run_within(command, None, None)
}

/// [`run`], killing the VM (vng, QEMU and all) once `limit` has passed, and
/// printing the new lines of `follow` (a file the guest writes through the
/// share) as they come, so a hung guest shows where it stopped. A guest
/// that has not created `follow` within [`BOOT_LIMIT`] hung booting (it
/// happens under TCG): it is killed and booted once more.
fn run_within(command: &str, limit: Option<Duration>, follow: Option<&Path>) -> anyhow::Result<()> {
    let venv = ensure_tools()?;
    for boot in 1..=2 {
        match boot_and_run(&venv, command, limit, follow)? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => bail!("the VM command failed with {status}"),
            None => println!(
                "VM: boot {boot} did not reach the command within {} min; killed it",
                BOOT_LIMIT.as_secs() / 60
            ),
        }
    }
    bail!("the VM hung booting twice (see above)")
}

/// How long a boot may take to reach the command: about 1 min here.
const BOOT_LIMIT: Duration = Duration::from_secs(10 * 60);

/// One boot for [`run_within`]: the command's exit status, or None when
/// the guest never started it.
fn boot_and_run(
    venv: &Path,
    command: &str,
    limit: Option<Duration>,
    follow: Option<&Path>,
) -> anyhow::Result<Option<ExitStatus>> {
    let root = repo_root();
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(venv.join("bin/vng"))
        .env("PATH", path)
        .arg("--disable-kvm")
        .arg("--run")
        .arg(kernel()?)
        .args(["--cpus", "4", "--memory", "2G", "--rwdir"])
        .arg(&root)
        .arg("--cwd")
        .arg(&root)
        .args([
            "--append",
            "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1",
            "--",
        ])
        .arg(command)
        // Through pipes: QEMU reopens its stdout by path with O_TRUNC, which
        // would wipe a log file our caller redirected us into.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a kill past the limit reaches QEMU too.
        .process_group(0)
        .spawn()
        .context("starting vng")?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let copy_out = std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::stdout()));
    let copy_err = std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr()));
    let kill = |child: &mut std::process::Child| {
        // SAFETY: kill(2) of the group vng leads; no memory is involved.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    };
    let started = Instant::now();
    let mut printed = 0;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(follow) = follow {
            printed = print_new_lines(follow, printed);
            if !follow.exists() && started.elapsed() > BOOT_LIMIT {
                kill(&mut child);
                return Ok(None);
            }
        }
        if let Some(limit) = limit
            && started.elapsed() > limit
        {
            kill(&mut child);
            // The line the guest was writing: the test that hung.
            if let Some(follow) = follow
                && let Ok(text) = std::fs::read(follow)
            {
                let rest = text.get(printed as usize..).unwrap_or_default();
                println!("  {}", String::from_utf8_lossy(rest));
            }
            bail!(
                "the VM did not finish within {} min; killed it (the output above \
                 ends where the guest stopped)",
                limit.as_secs() / 60
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if let Some(follow) = follow {
        print_new_lines(follow, printed);
    }
    let _ = copy_out.join();
    let _ = copy_err.join();
    Ok(Some(status))
}

/// How long the test tier may take in the VM: about 5 min here under TCG.
const TEST_TIER_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Integration test files run again in the VM.
/// (test file, name filter): the tests whose results depend on cgroup v2
/// cpusets. The rest need no cpuset and run on the host; some (a ring
/// buffer overflowing under an exec storm) cannot happen at emulated speed.
const VM_TESTS: &[(&str, &str)] = &[("agent", ""), ("reload", ""), ("service", "sigterm")];

/// Builds the integration tests here and runs them in the VM, where the
/// cpuset controller exists; CORRAL_REQUIRE_CPUSET=1 makes its absence a
/// failure.
pub fn test_tier() -> anyhow::Result<()> {
    let output = Command::new("cargo")
        .args([
            "test",
            "-p",
            "corral-tests",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .output()?;
    if !output.status.success() {
        bail!(
            "building the integration tests failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The tests that place processes: those whose core sets only a cgroup
    // v2 cpuset controller can show.
    let binaries: Vec<(String, &str)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && VM_TESTS
                    .iter()
                    .any(|(name, _)| m["target"]["name"] == *name)
        })
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?;
            let filter = VM_TESTS.iter().find(|(n, _)| *n == name)?.1;
            Some((m["executable"].as_str()?.to_owned(), filter))
        })
        .collect();
    if binaries.len() != VM_TESTS.len() {
        bail!("expected test executables for {VM_TESTS:?}, found {binaries:?}");
    }
    // The guest sees target/ live through 9p: run copies, so a build on the
    // host during the (slow) VM run cannot swap a binary under a test. The
    // tests find `corral` next to their own `deps/` directory.
    let snapshot = repo_root().join("target/vm-bin");
    let _ = std::fs::remove_dir_all(&snapshot);
    std::fs::create_dir_all(snapshot.join("deps"))?;
    std::fs::copy(
        repo_root().join("target/debug/corral"),
        snapshot.join("corral"),
    )
    .context("copying target/debug/corral for the VM (build it first)")?;
    let binaries: Vec<(String, &str)> = binaries
        .iter()
        .map(|(b, filter)| {
            let name = std::path::Path::new(b).file_name().expect("file name");
            let copy = snapshot.join("deps").join(name);
            std::fs::copy(b, &copy).map(|_| (copy.display().to_string(), *filter))
        })
        .collect::<Result<_, _>>()?;
    let runs: Vec<String> = binaries
        .iter()
        .map(|(b, filter)| {
            format!("CORRAL_REQUIRE_CPUSET=1 CORRAL_TIMEOUT_SCALE=6 {b} --test-threads=1 {filter} || fail=1")
        })
        .collect();
    let log = repo_root().join("target/vm-test.log");
    let _ = std::fs::remove_file(&log);
    println!("VM tier: booting a cgroup-v2-only kernel (TCG, ~2 min) to run {VM_TESTS:?}");
    let command = format!(
        "(fail=0; mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing; \
         {runs}; echo \"exit=$fail\") > {log} 2>&1",
        runs = runs.join("; "),
        log = log.display()
    );
    println!("--- VM tier output ---");
    run_within(&command, Some(TEST_TIER_LIMIT), Some(&log))?;
    println!("--- end of VM tier ---");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if !text.contains("exit=0") {
        bail!("VM tier failed (see output above)");
    }
    Ok(())
}
