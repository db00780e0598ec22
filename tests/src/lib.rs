//! Helpers for corral's integration tests: start the real agent on a
//! policy the test writes, in a cgroup subtree the test owns, and clean up.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

/// The workspace's `target/<profile>` directory, where `corral` is built.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

pub fn corral_bin() -> PathBuf {
    bin_dir().join("corral")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

/// The cgroup2 mount point: /sys/fs/cgroup on unified systems, or
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn cgroup2_mount() -> PathBuf {
    corral::actuate::cgroup::cgroup2_mount()
        .expect("no cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

/// Whether this machine's cgroup2 hierarchy offers the cpuset controller.
/// Tests that need it assert it when CORRAL_REQUIRE_CPUSET=1 (the VM tier).
pub fn cpuset_available() -> bool {
    let offered =
        std::fs::read_to_string(cgroup2_mount().join("cgroup.controllers")).unwrap_or_default();
    let has = offered.split_whitespace().any(|c| c == "cpuset");
    if !has && std::env::var("CORRAL_REQUIRE_CPUSET").as_deref() == Ok("1") {
        panic!("CORRAL_REQUIRE_CPUSET=1 but the cgroup2 hierarchy has no cpuset controller");
    }
    has
}

/// A running agent with its own policy, socket and cgroup root.
pub struct Agent {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub cgroup_root: PathBuf,
    /// The base policy file.
    pub policy: PathBuf,
    /// The override file the agent watches (absent until a test writes it).
    pub override_file: PathBuf,
}

impl Agent {
    /// Starts `corral run` on `policy_text` and waits until it answers.
    pub fn start(name: &str, policy_text: &str) -> anyhow::Result<Self> {
        Self::start_with(name, policy_text, &[])
    }

    /// The scratch directory `start*` will use for `name`, so a test can
    /// put files there before the agent starts.
    pub fn dir_for(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("corral-test-{name}-{}", std::process::id()))
    }

    pub fn start_with(name: &str, policy_text: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_env(name, policy_text, extra, &[])
    }

    /// Starts the agent with extra arguments and environment variables.
    pub fn start_env(
        name: &str,
        policy_text: &str,
        extra: &[&str],
        envs: &[(&str, &Path)],
    ) -> anyhow::Result<Self> {
        let dir = Self::dir_for(name);
        std::fs::create_dir_all(&dir)?;
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, policy_text)?;
        let socket = dir.join("control.sock");
        let override_file = dir.join("override.toml");
        // A test may bring its own root (`--cgroup-root DIR` in `extra`).
        let cgroup_root = extra
            .iter()
            .position(|a| *a == "--cgroup-root")
            .and_then(|i| extra.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                cgroup2_mount().join(format!("corral-test-{name}-{}", std::process::id()))
            });
        let own_root = !extra.contains(&"--cgroup-root");
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = Command::new(corral_bin())
            .arg("run")
            .arg("--policy")
            .arg(&policy)
            .arg("--override")
            .arg(&override_file)
            .args(own_root.then_some("--cgroup-root"))
            .args(own_root.then_some(&cgroup_root))
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .envs(envs.iter().map(|(k, v)| (*k, *v)))
            .env("RUST_LOG", "corral=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", corral_bin().display()))?;
        let mut agent = Agent {
            child,
            dir,
            socket,
            cgroup_root,
            policy,
            override_file,
        };
        let deadline = Instant::now() + Duration::from_secs(30) * timeout_scale();
        loop {
            let last_error = match agent.corral(&["status", "--json"]) {
                Ok(_) => return Ok(agent),
                Err(e) => e,
            };
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent exited with {status} during start-up:\n{}",
                    agent.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not answer within {} s (last client error: {last_error}):\n{}",
                    30 * timeout_scale(),
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Runs a `corral` client command against this agent; stdout on success.
    pub fn corral(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(corral_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()?;
        if !output.status.success() {
            bail!(
                "corral {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// The status of one class from `corral status --json`.
    pub fn class_status(&self, class: &str) -> serde_json::Value {
        let status = self.status().expect("status");
        status["classes"]
            .as_array()
            .and_then(|classes| classes.iter().find(|c| c["class"] == class).cloned())
            .unwrap_or_else(|| panic!("no class {class} in {status}"))
    }

    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.corral(&["status", "--json"])?)?)
    }

    /// The group path of `class` relative to the cgroup2 mount, as
    /// /proc/PID/cgroup shows it.
    pub fn group_of(&self, class: &str) -> String {
        let path = self.cgroup_root.join(class);
        format!(
            "/{}",
            path.strip_prefix(cgroup2_mount())
                .expect("under mount")
                .display()
        )
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10) * timeout_scale();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err(anyhow!("agent did not stop within 10 s of SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_cgroup_tree(&self.cgroup_root);
    }
}

/// Kills whatever is left in a test cgroup tree and removes it.
pub fn remove_cgroup_tree(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().is_dir() {
            remove_cgroup_tree(&entry.path());
        }
    }
    let _ = std::fs::write(root.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(root).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup v2 path of a process ("" when gone).
pub fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_owned()
}

/// `Cpus_allowed_list` of a process ("" when gone).
pub fn cpus_allowed(pid: u32) -> String {
    corral::service::daemon::cpus_allowed(pid).unwrap_or_default()
}

/// How much longer waits may take here: CORRAL_TIMEOUT_SCALE, set by the
/// VM tier, whose emulated CPUs are many times slower.
pub fn timeout_scale() -> u32 {
    std::env::var("CORRAL_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Waits until `check` holds, or `timeout` (times the scale) passes. True
/// if it held.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout * timeout_scale();
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    check()
}

/// Writes `text` to `path` the way an editor saving in place does, with
/// permissions corral accepts.
pub fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write policy");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// Copies a system program under a new name, so a policy can match it by
/// exe path without matching anything else on the machine.
pub fn named_copy(dir: &Path, program: &str, name: &str) -> anyhow::Result<PathBuf> {
    let source = ["/bin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("{program} not found in /bin or /usr/bin"))?;
    let target = dir.join(name);
    std::fs::copy(&source, &target)?;
    Ok(target)
}

/// Direct children of `pid`, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Field 4 (ppid) follows the ")" that closes comm.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            kids.push(child);
        }
    }
    kids
}

/// Child processes killed and reaped when the test ends, pass or fail.
pub struct KillOnDrop(pub Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two shell busy loops pinned to CPU 0, run as `shell` (a named copy of
/// dash or sh), so they wait for each other: run-queue latency on demand.
pub fn busy_loops_on_cpu0(shell: &Path, count: usize) -> KillOnDrop {
    KillOnDrop(
        (0..count)
            .map(|_| {
                Command::new("taskset")
                    .args(["-c", "0"])
                    .arg(shell)
                    .args(["-c", "while :; do :; done"])
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("taskset (util-linux)")
            })
            .collect(),
    )
}

/// A named copy of dash (or sh), for a policy to match.
pub fn named_shell(dir: &Path, name: &str) -> PathBuf {
    named_copy(dir, "dash", name)
        .or_else(|_| named_copy(dir, "sh", name))
        .expect("no dash or sh")
}
