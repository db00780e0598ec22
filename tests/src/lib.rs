//! Helpers for corral's integration tests: start the real agent on a
//! policy the test writes, in a cgroup subtree the test owns, and clean up.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
pub use corral::service::control::{ClassStatus, Explanation, Status};

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

/// How to start an agent: [`Agent::builder`], then `.start()`. The one
/// start-up path of every integration test.
pub struct AgentBuilder {
    name: String,
    policy_text: String,
    args: Vec<String>,
    envs: Vec<(String, std::ffi::OsString)>,
    cgroup_root: Option<PathBuf>,
}

impl AgentBuilder {
    /// Extra `corral run` arguments (`--dry-run`, `--ring-buffer-kib 4`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// An environment variable for the agent.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.envs.push((key.to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Run on this cgroup root (one an earlier agent left) instead of a
    /// fresh one named after the test.
    pub fn cgroup_root(mut self, root: &Path) -> Self {
        self.cgroup_root = Some(root.to_owned());
        self
    }

    /// Writes the policy, starts `corral run` and waits until it answers
    /// `corral status`.
    pub fn start(self) -> anyhow::Result<Agent> {
        let dir = Agent::dir_for(&self.name);
        std::fs::create_dir_all(&dir)?;
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, &self.policy_text)?;
        let socket = dir.join("control.sock");
        let override_file = dir.join("override.toml");
        let cgroup_root = self.cgroup_root.unwrap_or_else(|| {
            cgroup2_mount().join(format!("corral-test-{}-{}", self.name, std::process::id()))
        });
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = Command::new(corral_bin())
            .arg("run")
            .arg("--policy")
            .arg(&policy)
            .arg("--override")
            .arg(&override_file)
            .arg("--cgroup-root")
            .arg(&cgroup_root)
            .arg("--socket")
            .arg(&socket)
            .args(&self.args)
            .envs(self.envs)
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
}

impl Agent {
    /// An agent for test `name` (which names its scratch directory and
    /// cgroup root) on `policy_text`; `.start()` runs it.
    pub fn builder(name: &str, policy_text: &str) -> AgentBuilder {
        AgentBuilder {
            name: name.to_owned(),
            policy_text: policy_text.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            cgroup_root: None,
        }
    }

    /// `Agent::builder(name, policy_text).start()`.
    pub fn start(name: &str, policy_text: &str) -> anyhow::Result<Self> {
        Self::builder(name, policy_text).start()
    }

    /// The scratch directory the agent for `name` uses, so a test can put
    /// files there before the agent starts.
    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir_for(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("corral-test-{name}-{}", std::process::id()))
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

    /// `corral status --json`, read back as the agent's own type.
    pub fn status(&self) -> anyhow::Result<Status> {
        let text = self.corral(&["status", "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("not a Status: {text}"))
    }

    /// The status of one class (panics, showing the status, if none).
    pub fn class_status(&self, class: &str) -> ClassStatus {
        self.status().expect("status").class(class).clone()
    }

    /// `corral explain PID --json`, read back as the agent's own type.
    pub fn explanation(&self, pid: u32) -> anyhow::Result<Explanation> {
        let text = self.corral(&["explain", &pid.to_string(), "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("not an Explanation: {text}"))
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
        self.signal(libc::SIGTERM);
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

/// Typed look-ups on the agent's status, for assertions.
pub trait StatusExt {
    /// One class's row; panics, showing every class, when there is none.
    fn class(&self, name: &str) -> &ClassStatus;
    /// The latest reload attempt was accepted (None: no reload yet).
    fn last_reload_ok(&self) -> Option<bool>;
    /// VRAM the GPU poll attributes to `class`, in bytes.
    fn vram_of(&self, class: &str) -> Option<u64>;
}

impl StatusExt for Status {
    fn class(&self, name: &str) -> &ClassStatus {
        self.classes
            .iter()
            .find(|c| c.class == name)
            .unwrap_or_else(|| panic!("no class {name} in {:?}", self.classes))
    }

    fn last_reload_ok(&self) -> Option<bool> {
        self.last_reload.as_ref().map(|r| r.ok)
    }

    fn vram_of(&self, class: &str) -> Option<u64> {
        self.gpu.vram_by_class.get(class).copied()
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

/// Whether the group is frozen, as its `cgroup.events` says.
pub fn frozen(group: &Path) -> bool {
    corral::actuate::cgroup::is_frozen(group).unwrap_or(false)
}

/// The online CPUs as the kernel lists them (`/sys/devices/system/cpu/online`).
pub fn online_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .expect("reading /sys/devices/system/cpu/online")
        .trim()
        .to_owned()
}

/// The JSON lines `corral classify` printed, as the type it prints.
pub fn chain_lines(stdout: &[u8]) -> Vec<corral::observe::views::ChainLine> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
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

/// Runs tmux with `args`; its stdout.
fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux (apt-get install tmux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A detached tmux session running `command` in a `width` x `height`
/// pseudo-terminal (where the `top` and escaping tests draw); killed on
/// drop.
pub struct TmuxSession(pub String);

impl TmuxSession {
    pub fn start(name: &str, (width, height): (u16, u16), command: &str) -> Self {
        let session = format!("corral-{name}-{}", std::process::id());
        let (width, height) = (width.to_string(), height.to_string());
        tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            &width,
            "-y",
            &height,
            command,
        ]);
        TmuxSession(session)
    }

    /// The pane's text as it shows now.
    pub fn screen(&self) -> String {
        tmux(&["capture-pane", "-p", "-t", &self.0])
    }

    /// The pane's title: what a program's `\e]0;...\a` sets.
    pub fn title(&self) -> String {
        tmux(&["display-message", "-p", "-t", &self.0, "#{pane_title}"])
    }

    pub fn send_keys(&self, keys: &str) {
        tmux(&["send-keys", "-t", &self.0, keys]);
    }

    /// Whether the session still runs (its command has not exited).
    pub fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.0])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for TmuxSession {
    fn drop(&mut self) {
        if self.alive() {
            tmux(&["kill-session", "-t", &self.0]);
        }
    }
}
