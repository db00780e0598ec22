//! The control socket: one JSON request per connection, one JSON answer.
//! The server side hands requests to the daemon loop; the client side is
//! what `corral status` and `corral explain` use.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::debug;

use crate::{
    gpu::arbiter::ArbiterState,
    gpu::nvml::GpuSnapshot,
    kernel::bpf::{KernelCounters, ProgramStats, SchedStats},
    model::classify::Decision,
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

/// Who is asking, from the socket's SO_PEERCRED.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
}

/// Binds the socket (replacing a stale one) and forwards requests to `tx`.
pub fn serve(
    path: &Path,
    tx: mpsc::Sender<Incoming>,
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
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, tx).await {
                    debug!("control connection: {e:#}");
                }
            });
        }
    }))
}

async fn answer(stream: UnixStream, tx: mpsc::Sender<Incoming>) -> anyhow::Result<()> {
    let peer = stream
        .peer_cred()
        .map(|c| Peer {
            pid: c.pid().and_then(|p| u32::try_from(p).ok()),
            uid: Some(c.uid()),
        })
        .unwrap_or_default();
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    reader.read_until(b'\n', &mut line).await?;
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
    write.write_all(text.as_bytes()).await?;
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
            let text = serde_json::to_string(&Request::Explain { pid }).unwrap();
            let parsed = matches!(parse_request(text.as_bytes()), Ok(Request::Explain { pid: p }) if p == pid);
            prop_assert!(parsed, "{} did not round-trip", text);
        }
    }

    #[test]
    fn oversized_requests_are_refused() {
        let huge = vec![b'{'; MAX_REQUEST + 1];
        assert!(parse_request(&huge).unwrap_err().contains("too large"));
    }
}
