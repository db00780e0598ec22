//! The control socket: one JSON request per connection, one JSON answer.
//! The server side hands requests to the daemon loop; the client side is
//! what `corral status` and `corral explain` use.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::{
    gpu::arbiter::ArbiterState,
    gpu::nvml::GpuSnapshot,
    kernel::bpf::{KernelCounters, ProgramStats, SchedStats},
    model::{
        classify::{Decision, RuleVerdict},
        pidref::PidRef,
    },
};

pub const DEFAULT_SOCKET: &str = "/run/corral/control.sock";

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Re-read the policy files now.
    Reload,
    Explain {
        pid: u32,
        /// Also judge every rule against the process (`--rules`).
        #[serde(default)]
        rules: bool,
    },
    /// Every placement of a process that the kernel saw exec, with its
    /// latency (for the exec benchmark).
    Placements,
    /// Put the asking process into `class`'s group for good (it keeps the
    /// class across exec): `corral run --class`. Answers the class's
    /// environment.
    Enter {
        class: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Explain(Box<Explanation>),
    Placements {
        placements: Vec<Placement>,
    },
    Reloaded(ReloadStatus),
    Entered {
        group: String,
        env: std::collections::BTreeMap<String, String>,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub policy: String,
    /// Warnings from loading the policy in force (unknown keys, ...).
    pub policy_warnings: Vec<String>,
    /// The latest reload attempt, refused or not.
    pub last_reload: Option<ReloadStatus>,
    /// `shared` or `protected` (game cores kept for the game).
    pub mode: String,
    pub mode_why: String,
    pub cgroup_root: String,
    /// The placement backend: `systemd` or `cgroupfs`.
    #[serde(default)]
    pub backend: String,
    /// What the backend cannot do now and why (an unreachable manager...).
    #[serde(default)]
    pub backend_notes: Vec<String>,
    /// How many launches of the protected class run (roots of its process
    /// trees), and which class that is.
    #[serde(default)]
    pub protected_class: String,
    #[serde(default)]
    pub protected_launches: usize,
    pub cpuset_enforced: bool,
    pub dry_run: bool,
    pub tracked: usize,
    pub classes: Vec<ClassStatus>,
    pub events: EventCounts,
    pub kernel: KernelCounters,
    /// What each eBPF program costs (needs `sysctl kernel.bpf_stats_enabled=1`).
    pub bpf_programs: Vec<ProgramStats>,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics_addr: Option<String>,
    pub gpu: GpuStatus,
    /// The `performance` hold while the protected class runs ([power]).
    #[serde(default)]
    pub power: crate::actuate::power::PowerStatus,
    /// Other tools tuning the same knobs, and what corral does about each.
    #[serde(default)]
    pub coexistence: Vec<crate::model::coexist::Finding>,
    /// Who provides GameMode on each user's session bus corral is on.
    #[serde(default)]
    pub gamemode: Vec<String>,
    /// The agent's own resident memory and CPU time.
    pub agent_rss_bytes: u64,
    pub agent_cpu_seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventCounts {
    pub exec: u64,
    pub fork: u64,
    pub exit: u64,
    /// Processes that exited before /proc could be read.
    pub vanished: u64,
    pub move_errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassStatus {
    pub class: String,
    pub processes: usize,
    /// None for classes corral leaves alone.
    pub cgroup: Option<String>,
    /// The CPUs the group has now.
    pub cpus: Option<String>,
    /// The class's own CPUs on this machine, and how the policy got there.
    pub base_cpus: Option<String>,
    pub why: Option<String>,
    pub cpu_weight: Option<u32>,
    pub placements: u64,
    pub note: Option<String>,
    /// On-CPU time and run-queue latency, when telemetry is on.
    pub sched: Option<SchedStats>,
}

/// VRAM coordination as `corral status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuStatus {
    pub on: bool,
    /// Why GPU features are off.
    pub off_reason: Option<String>,
    pub snapshot: Option<GpuSnapshot>,
    pub vram_by_class: std::collections::BTreeMap<String, u64>,
    pub arbiter: Option<ArbiterState>,
    /// Why the thermal guard is slowing background classes, if it is.
    pub cooling: Option<String>,
    /// The latest actions, oldest first.
    pub actions: Vec<GpuActionRecord>,
    /// "class:kind" -> count.
    pub action_counts: std::collections::BTreeMap<String, u64>,
    /// Whether the kernel's dmem cgroup controller can cap VRAM here.
    pub dmem: String,
}

/// One VRAM or thermal action, with its reason and what came of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuActionRecord {
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
    pub class: String,
    pub kind: String,
    pub reason: String,
    pub outcome: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadStatus {
    pub ok: bool,
    /// What was refused and why, or the warnings of an accepted policy.
    pub message: String,
    /// CLOCK_MONOTONIC ns when the reload finished.
    pub finished_ns: u64,
    /// Time from starting to read the files to the last move.
    pub duration_us: u64,
    /// Processes whose class changed, and moves done.
    pub reclassified: usize,
    pub moves: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    pub argv: Vec<String>,
    pub decision: Decision,
    /// The class's group, when the class is managed.
    pub group: Option<String>,
    /// CPUs the policy resolves the class to on this machine.
    pub class_cpus: Option<String>,
    /// The cgroup the process is in now, from /proc.
    pub cgroup_now: String,
    /// `Cpus_allowed_list` from /proc/PID/status.
    pub cpus_allowed: String,
    /// Ancestors, outermost first, with their own classes.
    pub ancestry: Vec<AncestorLine>,
    /// VRAM the process holds, when the GPU feature is on and NVML knows.
    pub vram_bytes: Option<u64>,
    /// VRAM actions taken on the process's class.
    pub gpu_actions: Vec<GpuActionRecord>,
    /// Which backend placed it, and (systemd) its unit, slice and what
    /// fences it.
    #[serde(default)]
    pub backend: String,
    #[serde(default)]
    pub placement: Option<String>,
    /// With `--rules`: every rule, in order, and why it did not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleVerdict>,
    /// For the protected class: the power profile held for it.
    #[serde(default)]
    pub power: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AncestorLine {
    pub pid: u32,
    pub comm: String,
    pub class: String,
    pub rule: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placement {
    pub pid: u32,
    pub class: String,
    /// Kernel exec timestamp, CLOCK_MONOTONIC ns.
    pub exec_ns: u64,
    /// When the agent began handling the exec, CLOCK_MONOTONIC ns.
    pub handled_ns: u64,
    /// When the placement returned, CLOCK_MONOTONIC ns: the cgroup write
    /// (cgroupfs), or the affinity fence (systemd).
    pub placed_ns: u64,
    /// systemd backend: when the process was in its unit, CLOCK_MONOTONIC ns.
    #[serde(default)]
    pub joined_ns: Option<u64>,
}

/// A request on its way to the daemon loop, with where to send the answer.
pub type Incoming = (Request, Peer, oneshot::Sender<Response>);

/// Who is asking, from the socket's SO_PEERCRED, and a handle on that very
/// process (SO_PEERPIDFD), so a pid reused before the request is carried
/// out is never acted on.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub process: Option<Arc<PidRef>>,
}

/// What one local user may hold of the control socket. Root has its own
/// allowance, so no other user's flood can lock root out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Connections open at once, all non-root users together.
    pub total: usize,
    /// Connections open at once per non-root uid.
    pub per_uid: usize,
    /// Connections open at once for root.
    pub root: usize,
    /// Requests per second a non-root uid may make (the bucket holds two
    /// seconds' worth).
    pub per_uid_rate: f64,
    /// The time a client has to send its request line, and to read the answer.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: 64,
            per_uid: 8,
            root: 16,
            per_uid_rate: 100.0,
            deadline: Duration::from_secs(1),
        }
    }
}

/// Who holds how many connections, and each non-root uid's request budget.
/// Pure bookkeeping: [`Admission::admit`] decides, the server acts.
#[derive(Debug, Default)]
pub struct Admission {
    limits: Limits,
    open: HashMap<u32, usize>,
    non_root_open: usize,
    /// uid -> (tokens, when last refilled).
    budget: HashMap<u32, (f64, Instant)>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turned {
    TooManyConnections { uid: u32, limit: usize },
    AllBusy { limit: usize },
    TooFast { uid: u32 },
}

impl fmt::Display for Turned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Turned::TooManyConnections { uid, limit } => write!(
                f,
                "uid {uid} already holds {limit} connections to the control socket; close some and try again"
            ),
            Turned::AllBusy { limit } => write!(
                f,
                "the control socket holds {limit} connections of other users; try again in a second"
            ),
            Turned::TooFast { uid } => write!(
                f,
                "uid {uid} sends requests faster than the agent answers them; wait a second"
            ),
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            ..Admission::default()
        }
    }

    /// Whether a new connection of `uid` may be served now; if so it is
    /// counted until [`Admission::release`].
    pub fn admit(&mut self, uid: u32, now: Instant) -> Result<(), Turned> {
        let open = self.open.get(&uid).copied().unwrap_or(0);
        if uid == 0 {
            if open >= self.limits.root {
                return Err(Turned::TooManyConnections {
                    uid,
                    limit: self.limits.root,
                });
            }
        } else {
            if open >= self.limits.per_uid {
                return Err(Turned::TooManyConnections {
                    uid,
                    limit: self.limits.per_uid,
                });
            }
            if self.non_root_open >= self.limits.total {
                return Err(Turned::AllBusy {
                    limit: self.limits.total,
                });
            }
            let rate = self.limits.per_uid_rate;
            let (tokens, last) = self.budget.entry(uid).or_insert((2.0 * rate, now));
            *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate)
                .min(2.0 * rate);
            *last = now;
            if *tokens < 1.0 {
                return Err(Turned::TooFast { uid });
            }
            *tokens -= 1.0;
            self.non_root_open += 1;
        }
        *self.open.entry(uid).or_default() += 1;
        Ok(())
    }

    /// A connection of `uid` that [`Admission::admit`] let in is closed.
    pub fn release(&mut self, uid: u32) {
        if let Some(open) = self.open.get_mut(&uid) {
            *open -= 1;
            if *open == 0 {
                self.open.remove(&uid);
            }
            if uid != 0 {
                self.non_root_open -= 1;
            }
        }
    }

    /// Connections open now, all users together.
    pub fn open(&self) -> usize {
        self.open.values().sum()
    }
}

/// How long to wait before accepting again after `error`: running out of
/// descriptors or memory clears only when connections close, so retrying at
/// once would spin a core.
pub fn accept_backoff(error: &std::io::Error, streak: u32) -> Duration {
    let exhausted = matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    let base = if exhausted { 50 } else { 5 };
    Duration::from_millis((base << streak.min(5)).min(1000))
}

/// Binds the socket (replacing a stale one) and forwards requests to `tx`.
pub fn serve(
    path: &Path,
    tx: mpsc::Sender<Incoming>,
    limits: Limits,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    // Every local user may connect; what each may ask is checked per
    // request against SO_PEERCRED.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("opening {} to local users", path.display()))?;
    let admission = Arc::new(Mutex::new(Admission::new(limits)));
    Ok(tokio::spawn(async move {
        let mut streak = 0;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    streak = 0;
                    stream
                }
                Err(e) => {
                    let wait = accept_backoff(&e, streak);
                    if streak == 0 {
                        warn!("control socket: accept failed ({e}); retrying in {wait:?}");
                    }
                    streak += 1;
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            // A peer whose credentials cannot be read gets nothing.
            let Ok(cred) = stream.peer_cred() else {
                continue;
            };
            let uid = cred.uid();
            if let Err(turned) = admission
                .lock()
                .expect("admission lock")
                .admit(uid, Instant::now())
            {
                debug!("control socket: {turned}");
                // Best effort, never waiting: the answer fits the socket
                // buffer of a fresh connection.
                let text = serde_json::to_string(&Response::Error {
                    message: turned.to_string(),
                })
                .unwrap_or_default();
                let _ = stream.try_write(format!("{text}\n").as_bytes());
                continue;
            }
            let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
            let process = pid.and_then(|pid| {
                use std::os::fd::AsFd as _;
                PidRef::of_socket_peer(stream.as_fd(), pid)
                    .ok()
                    .map(Arc::new)
            });
            let peer = Peer {
                pid,
                uid: Some(uid),
                process,
            };
            let tx = tx.clone();
            let admission = Arc::clone(&admission);
            tokio::spawn(async move {
                if let Err(e) = answer(stream, peer, tx, limits.deadline).await {
                    debug!(uid, "control connection: {e:#}");
                }
                admission.lock().expect("admission lock").release(uid);
            });
        }
    }))
}

async fn answer(
    stream: UnixStream,
    peer: Peer,
    tx: mpsc::Sender<Incoming>,
    deadline: Duration,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    tokio::time::timeout(deadline, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| anyhow!("no request line within {deadline:?}"))??;
    let response = match parse_request(&line) {
        Ok(request) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            tx.send((request, peer, reply_tx))
                .await
                .map_err(|_| anyhow!("agent is stopping"))?;
            reply_rx.await?
        }
        Err(message) => Response::Error { message },
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    tokio::time::timeout(deadline, write.write_all(text.as_bytes()))
        .await
        .map_err(|_| anyhow!("the client did not read its answer within {deadline:?}"))??;
    Ok(())
}

/// Parses one request line. Never panics, whatever the bytes.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request too large: more than {MAX_REQUEST} bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|e| format!("bad request: not UTF-8 ({e})"))?;
    serde_json::from_str::<Request>(text.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Sends one request to the agent at `socket` and waits for the answer.
pub fn request(socket: &PathBuf, request: &Request) -> anyhow::Result<Response> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the corral agent at {}: is it running? (start it with `corral run` or `systemctl start corral`)",
            socket.display()
        )
    })?;
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line)
        .with_context(|| format!("unreadable answer from the agent: {line:?}"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever arrives on the socket, parsing returns instead of
        /// panicking.
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_request(&bytes);
        }

        /// JSON-shaped noise around the real commands.
        #[test]
        fn json_like_requests_never_panic(cmd in "[a-z_]{0,12}", pid in any::<i64>(), class in "\\PC{0,20}") {
            let text = format!("{{\"cmd\": \"{cmd}\", \"pid\": {pid}, \"class\": {class:?}}}\n");
            let _ = parse_request(text.as_bytes());
        }

        #[test]
        fn valid_requests_round_trip(pid in any::<u32>()) {
            let text = serde_json::to_string(&Request::Explain { pid, rules: true }).unwrap();
            let parsed = matches!(parse_request(text.as_bytes()), Ok(Request::Explain { pid: p, rules: true }) if p == pid);
            prop_assert!(parsed, "{} did not round-trip", text);
        }
    }

    fn limits() -> Limits {
        Limits {
            total: 4,
            per_uid: 2,
            root: 3,
            per_uid_rate: 10.0,
            deadline: Duration::from_secs(1),
        }
    }

    #[test]
    fn one_user_holds_at_most_its_share_and_never_locks_out_root() {
        let mut admission = Admission::new(limits());
        let now = Instant::now();
        assert_eq!(admission.admit(65534, now), Ok(()));
        assert_eq!(admission.admit(65534, now), Ok(()));
        assert_eq!(
            admission.admit(65534, now),
            Err(Turned::TooManyConnections {
                uid: 65534,
                limit: 2
            })
        );
        assert_eq!(admission.admit(1000, now), Ok(()));
        assert_eq!(admission.admit(1001, now), Ok(()));
        assert_eq!(
            admission.admit(1002, now),
            Err(Turned::AllBusy { limit: 4 })
        );
        // Root has its own allowance.
        for _ in 0..3 {
            assert_eq!(admission.admit(0, now), Ok(()));
        }
        assert!(admission.admit(0, now).is_err());
        assert_eq!(admission.open(), 7);
        admission.release(65534);
        assert_eq!(admission.admit(1002, now), Ok(()));
        admission.release(0);
        assert_eq!(admission.admit(0, now), Ok(()));
    }

    #[test]
    fn a_user_faster_than_its_rate_is_turned_away_until_the_bucket_refills() {
        let mut admission = Admission::new(limits());
        let start = Instant::now();
        // The bucket holds two seconds' worth: 20 requests.
        for _ in 0..20 {
            assert_eq!(admission.admit(1000, start), Ok(()));
            admission.release(1000);
        }
        assert_eq!(
            admission.admit(1000, start),
            Err(Turned::TooFast { uid: 1000 })
        );
        // Another user is not affected, nor is root.
        assert_eq!(admission.admit(1001, start), Ok(()));
        assert_eq!(admission.admit(0, start), Ok(()));
        // A tenth of a second later, one more.
        let later = start + Duration::from_millis(100);
        assert_eq!(admission.admit(1000, later), Ok(()));
        assert!(admission.admit(1000, later).is_err());
    }

    #[test]
    fn accept_backs_off_when_descriptors_run_out() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(accept_backoff(&emfile, 0), Duration::from_millis(50));
        assert_eq!(accept_backoff(&emfile, 3), Duration::from_millis(400));
        assert_eq!(accept_backoff(&emfile, 30), Duration::from_secs(1));
        let other = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(accept_backoff(&other, 0), Duration::from_millis(5));
    }

    #[test]
    fn oversized_requests_are_refused() {
        let huge = vec![b'{'; MAX_REQUEST + 1];
        assert!(parse_request(&huge).unwrap_err().contains("too large"));
    }
}
