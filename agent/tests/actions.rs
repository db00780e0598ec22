//! Tests for `corral::gpu::askers` and `corral::actuate::cgroup`: the HTTP asks against stub servers that
//! record what arrived, freeze/thaw/kill on a real test-only cgroup2 group,
//! and dmem detection on fixture directories.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use corral::{
    actuate::cgroup::{self as cgroupfs, DmemSupport},
    gpu::askers::{self, AskError},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

// ---------------------------------------------------------------------------
// Stub HTTP server
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Recorded {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

type Route = fn(&str, &str) -> Option<(u16, String)>;

/// Serves on 127.0.0.1:0; `route` gives (status, body) per (method, path),
/// or `None` to never answer. Records every request.
async fn stub(route: Route) -> (SocketAddr, Arc<Mutex<Vec<Recorded>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let Some(request) = read_request(&mut conn).await else {
                    return;
                };
                let answer = route(&request.method, &request.path);
                log.lock().unwrap().push(request);
                let Some((status, body)) = answer else {
                    // Hold the connection open without answering.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                };
                let reply = format!(
                    "HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (addr, seen)
}

async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<Recorded> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = conn.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(raw[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    assert_eq!(request_line.next(), Some("HTTP/1.1"));
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .map_or(0, |v| v.parse().unwrap());
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some(Recorded {
        method,
        path,
        headers,
        body,
    })
}

/// An address nothing listens on: bind, note the port, close.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------
// HTTP asks
// ---------------------------------------------------------------------------

#[tokio::test]
async fn comfyui_gets_post_free_with_unload_json() {
    let (addr, seen) = stub(|_, _| Some((200, String::new()))).await;
    askers::ask_comfyui(addr)
        .await
        .expect("ComfyUI stub answers 200");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let r = &seen[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/free"));
    assert_eq!(
        r.json(),
        serde_json::json!({"unload_models": true, "free_memory": true})
    );
    assert_eq!(r.body, askers::COMFYUI_FREE_BODY.as_bytes());
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["connection"], "close");
    assert_eq!(r.headers["host"], addr.to_string());
}

#[tokio::test]
async fn http_500_names_the_status_and_quotes_the_body() {
    let (addr, _) = stub(|_, _| Some((500, format!("model busy{}", "x".repeat(400))))).await;
    let err = askers::ask_comfyui(addr).await.unwrap_err();
    let AskError::Status { status, body, .. } = &err else {
        panic!("expected a status error, got {err:?}");
    };
    assert_eq!(*status, 500);
    assert_eq!(body.len(), 200, "only the first 200 bytes are quoted");
    assert!(body.starts_with("model busy"));
    let msg = err.to_string();
    assert!(msg.contains("HTTP 500"), "{msg}");
    assert!(msg.contains("POST /free"), "{msg}");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (addr, seen) = stub(|_, _| Some((302, String::new()))).await;
    let err = askers::ask_comfyui(addr).await.unwrap_err();
    assert!(
        matches!(err, AskError::Status { status: 302, .. }),
        "{err:?}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn closed_port_says_not_listening() {
    let addr = closed_port().await;
    let err = askers::ask_comfyui(addr).await.unwrap_err();
    assert!(matches!(err, AskError::NotListening { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("ComfyUI is not listening on {addr}")),
        "{err}"
    );

    let err = askers::ask_ollama(addr).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("ollama is not listening on {addr}")),
        "{err}"
    );
}

#[tokio::test]
async fn silent_server_times_out_after_two_seconds() {
    let (addr, _) = stub(|_, _| None).await;
    let started = Instant::now();
    let err = askers::ask_comfyui(addr).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, AskError::Timeout { .. }), "{err:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        err.to_string().contains("did not answer POST /free"),
        "{err}"
    );
}

#[tokio::test]
async fn ollama_unloads_every_loaded_model() {
    let (addr, seen) = stub(|method, path| match (method, path) {
        ("GET", "/api/ps") => Some((
            200,
            r#"{"models":[
                {"name":"llama3:8b","model":"llama3:8b","size":5137025024,"size_vram":5137025024},
                {"name":"qwen2.5-coder:7b","model":"qwen2.5-coder:7b","size_vram":4000000000}
            ]}"#
            .to_owned(),
        )),
        ("POST", "/api/generate") => Some((
            200,
            r#"{"model":"x","done":true,"done_reason":"unload"}"#.to_owned(),
        )),
        _ => Some((404, "404 page not found".to_owned())),
    })
    .await;

    let unloaded = askers::ask_ollama(addr).await.expect("ollama stub answers");
    assert_eq!(unloaded, ["llama3:8b", "qwen2.5-coder:7b"]);

    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/api/ps");
    let generates: Vec<_> = seen
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/api/generate")
        .collect();
    assert_eq!(generates.len(), 2, "{seen:?}");
    for (r, name) in generates.iter().zip(["llama3:8b", "qwen2.5-coder:7b"]) {
        assert_eq!(
            r.json(),
            serde_json::json!({"model": name, "keep_alive": 0})
        );
        assert_eq!(r.headers["content-type"], "application/json");
    }
    assert_eq!(seen.len(), 3, "nothing else was asked: {seen:?}");
}

#[tokio::test]
async fn ollama_with_nothing_loaded_unloads_nothing() {
    let (addr, seen) = stub(|_, _| Some((200, r#"{"models":[]}"#.to_owned()))).await;
    assert!(askers::ask_ollama(addr).await.unwrap().is_empty());
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn ollama_bad_json_is_reported() {
    let (addr, _) = stub(|_, _| Some((200, "<html>not ollama</html>".to_owned()))).await;
    let err = askers::ask_ollama(addr).await.unwrap_err();
    assert!(matches!(err, AskError::BadJson { .. }), "{err:?}");
    assert!(err.to_string().contains("GET /api/ps"), "{err}");
}

#[tokio::test]
async fn ollama_all_unloads_failing_is_an_error() {
    let (addr, _) = stub(|method, _| match method {
        "GET" => Some((200, r#"{"models":[{"name":"a"}]}"#.to_owned())),
        _ => Some((500, r#"{"error":"boom"}"#.to_owned())),
    })
    .await;
    let err = askers::ask_ollama(addr).await.unwrap_err();
    assert!(
        matches!(err, AskError::Status { status: 500, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("boom"), "{err}");
}

// ---------------------------------------------------------------------------
// Temp directories and test-only cgroups
// ---------------------------------------------------------------------------

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("corral-actions-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A test-only group tree `<mount>/corral-actions-test-<pid>-<tag>` and the
/// processes spawned into it. Drop kills the processes, thaws and removes
/// the groups deepest first, then the root. Nothing is moved back.
struct TestCgroup {
    root: PathBuf,
    children: Vec<Child>,
}

impl TestCgroup {
    /// `None` (with the reason printed) when this machine has no cgroup2
    /// mount we may write to.
    fn new(tag: &str) -> Option<Self> {
        let Some(mount) = corral::actuate::cgroup::cgroup2_mount() else {
            eprintln!(
                "skipping: neither /sys/fs/cgroup nor /sys/fs/cgroup/unified is a cgroup2 mount"
            );
            return None;
        };
        let root = mount.join(format!("corral-actions-test-{}-{tag}", std::process::id()));
        if let Err(e) = fs::create_dir(&root) {
            eprintln!(
                "skipping: cannot create {}: {e} (needs root)",
                root.display()
            );
            return None;
        }
        Some(Self {
            root,
            children: Vec::new(),
        })
    }

    fn group(&self, rel: &str) -> PathBuf {
        let path = self.root.join(rel);
        fs::create_dir_all(&path).unwrap();
        path
    }

    /// Spawn `program args` and move it into `group`; returns its pid.
    fn spawn_into(&mut self, group: &Path, program: &str, args: &[&str]) -> u32 {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        fs::write(group.join("cgroup.procs"), pid.to_string()).unwrap();
        pid
    }

    fn child(&mut self, pid: u32) -> &mut Child {
        self.children.iter_mut().find(|c| c.id() == pid).unwrap()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = cgroupfs::thaw_all_under(&self.root);
        // Deepest groups first.
        let mut groups = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        pending.push(e.path());
                    }
                }
            }
            groups.push(dir);
        }
        for group in groups.iter().rev() {
            let _ = fs::write(group.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(2);
            while fs::remove_dir(group).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// utime + stime of `pid`, in clock ticks, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn freeze_and_thaw_a_real_group() {
    let Some(mut cg) = TestCgroup::new("freeze") else {
        return;
    };
    let g = cg.group("g");
    // A busy loop: frozen, its CPU time must stop advancing.
    let pid = cg.spawn_into(&g, "sh", &["-c", "while :; do :; done"]);

    assert!(!cgroupfs::is_frozen(&g).unwrap());
    cgroupfs::set_frozen(&g, true).unwrap();
    assert!(
        cgroupfs::wait_frozen(&g, true, WAIT).unwrap(),
        "group never froze"
    );
    assert!(cgroupfs::is_frozen(&g).unwrap());
    assert_eq!(
        fs::read_to_string(g.join("cgroup.freeze")).unwrap().trim(),
        "1"
    );

    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cpu_ticks(pid),
        before,
        "a frozen busy loop still got CPU time"
    );
    let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = state[state.rfind(')').unwrap() + 2..]
        .chars()
        .next()
        .unwrap();
    assert_ne!(state, 'R', "a frozen task is not runnable");

    cgroupfs::set_frozen(&g, false).unwrap();
    assert!(
        cgroupfs::wait_frozen(&g, false, WAIT).unwrap(),
        "group never thawed"
    );
    assert!(!cgroupfs::is_frozen(&g).unwrap());
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        cpu_ticks(pid) > before,
        "the thawed busy loop got no CPU time"
    );
}

#[test]
fn thaw_all_under_thaws_nested_frozen_groups() {
    let Some(mut cg) = TestCgroup::new("thaw") else {
        return;
    };
    let leaf = cg.group("a/b");
    let sibling = cg.group("c");
    cg.spawn_into(&leaf, "sleep", &["30"]);
    cg.spawn_into(&sibling, "sleep", &["30"]);

    cgroupfs::set_frozen(&leaf, true).unwrap();
    assert!(cgroupfs::wait_frozen(&leaf, true, WAIT).unwrap());
    assert!(!cgroupfs::is_frozen(&sibling).unwrap());

    assert_eq!(
        cgroupfs::thaw_all_under(&cg.root).unwrap(),
        1,
        "only a/b was frozen"
    );
    assert!(cgroupfs::wait_frozen(&leaf, false, WAIT).unwrap());

    // A group frozen by its parent: thawing the parent thaws both.
    let parent = cg.root.join("a");
    cgroupfs::set_frozen(&parent, true).unwrap();
    assert!(cgroupfs::wait_frozen(&leaf, true, WAIT).unwrap());
    assert!(cgroupfs::thaw_all_under(&cg.root).unwrap() >= 1);
    assert!(cgroupfs::wait_frozen(&parent, false, WAIT).unwrap());
    assert!(cgroupfs::wait_frozen(&leaf, false, WAIT).unwrap());

    // Nothing frozen: nothing written.
    assert_eq!(cgroupfs::thaw_all_under(&cg.root).unwrap(), 0);
}

#[test]
fn kill_group_kills_a_real_group() {
    let Some(mut cg) = TestCgroup::new("kill") else {
        return;
    };
    let g = cg.group("g");
    let pid = cg.spawn_into(&g, "sleep", &["30"]);
    // Frozen or not, the kill gets through.
    cgroupfs::set_frozen(&g, true).unwrap();
    assert!(cgroupfs::wait_frozen(&g, true, WAIT).unwrap());

    assert_eq!(cgroupfs::kill_group(&g).unwrap(), 1);
    let status = cg.child(pid).wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let deadline = Instant::now() + WAIT;
    while !fs::read_to_string(g.join("cgroup.procs"))
        .unwrap()
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "group still has processes");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        cgroupfs::kill_group(&g).unwrap(),
        0,
        "an empty group lists nobody"
    );
}

#[test]
fn kill_group_without_cgroup_kill_signals_each_pid() {
    // A fake group directory: no cgroup.kill, so each listed pid gets SIGKILL.
    let dir = TempDir::new("kill-fallback");
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    // A stale pid (ESRCH) is not an error.
    let stale = i32::MAX - 1;
    fs::write(
        dir.0.join("cgroup.procs"),
        format!("{}\n{stale}\n", child.id()),
    )
    .unwrap();

    let listed = cgroupfs::kill_group(&dir.0);
    let status = child.wait().unwrap();
    assert_eq!(listed.unwrap(), 2);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}

#[test]
fn cgroup_errors_name_the_file() {
    let dir = TempDir::new("errors");
    let missing = dir.0.join("no-such-group");
    let err = cgroupfs::set_frozen(&missing, true).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(
        err.to_string().contains("no-such-group/cgroup.freeze"),
        "{err}"
    );
    assert!(
        cgroupfs::is_frozen(&missing)
            .unwrap_err()
            .to_string()
            .contains("cgroup.events")
    );
    assert_eq!(cgroupfs::thaw_all_under(&missing).unwrap(), 0);
}

#[test]
fn thaw_all_under_on_fixture_tree() {
    // Plain files stand in for cgroupfs: frozen ones get "0" written.
    let dir = TempDir::new("thaw-fixture");
    let make = |rel: &str, freeze: &str, frozen: &str| {
        let g = dir.0.join(rel);
        fs::create_dir_all(&g).unwrap();
        fs::write(g.join("cgroup.freeze"), freeze).unwrap();
        fs::write(
            g.join("cgroup.events"),
            format!("populated 1\nfrozen {frozen}\n"),
        )
        .unwrap();
        g
    };
    let frozen = make("game/a", "1\n", "1");
    let freezing = make("ai", "1\n", "0"); // freeze requested, not complete yet
    let thawed = make("dev", "0\n", "0");
    assert_eq!(cgroupfs::thaw_all_under(&dir.0).unwrap(), 2);
    for g in [&frozen, &freezing, &thawed] {
        assert_eq!(
            fs::read_to_string(g.join("cgroup.freeze")).unwrap().trim(),
            "0"
        );
    }
}

// ---------------------------------------------------------------------------
// dmem
// ---------------------------------------------------------------------------

#[test]
fn dmem_present_with_regions() {
    let dir = TempDir::new("dmem-present");
    fs::write(
        dir.0.join("cgroup.controllers"),
        "cpuset cpu io memory dmem pids\n",
    )
    .unwrap();
    fs::write(
        dir.0.join("dmem.capacity"),
        "drm/0000:01:00.0/vram0 12884901888\ndrm/0000:01:00.0/stolen 0\n",
    )
    .unwrap();
    assert_eq!(
        cgroupfs::dmem_support(&dir.0),
        DmemSupport::Present {
            regions: vec![
                ("drm/0000:01:00.0/vram0".to_owned(), 12_884_901_888),
                ("drm/0000:01:00.0/stolen".to_owned(), 0),
            ]
        }
    );
}

#[test]
fn dmem_absent_reasons() {
    let absent = |dir: &Path| match cgroupfs::dmem_support(dir) {
        DmemSupport::Absent { reason } => reason,
        other => panic!("expected Absent, got {other:?}"),
    };

    let no_dir = TempDir::new("dmem-none");
    let reason = absent(&no_dir.0);
    assert!(reason.contains("cgroup.controllers"), "{reason}");

    let no_controller = TempDir::new("dmem-no-controller");
    fs::write(
        no_controller.0.join("cgroup.controllers"),
        "cpu memory pids\n",
    )
    .unwrap();
    let reason = absent(&no_controller.0);
    assert!(reason.contains("does not list dmem"), "{reason}");

    // "dmem" must be a whole word.
    fs::write(no_controller.0.join("cgroup.controllers"), "dmemx\n").unwrap();
    assert!(absent(&no_controller.0).contains("does not list dmem"));

    let no_regions = TempDir::new("dmem-no-regions");
    fs::write(no_regions.0.join("cgroup.controllers"), "dmem\n").unwrap();
    fs::write(no_regions.0.join("dmem.capacity"), "").unwrap();
    let reason = absent(&no_regions.0);
    assert!(reason.contains("no regions"), "{reason}");

    fs::write(no_regions.0.join("dmem.capacity"), "drm/x twelve\n").unwrap();
    let reason = absent(&no_regions.0);
    assert!(reason.contains("line 1"), "{reason}");
}

#[test]
fn set_dmem_writes_region_and_bytes() {
    let dir = TempDir::new("dmem-set");
    fs::write(dir.0.join("dmem.max"), "").unwrap();
    fs::write(dir.0.join("dmem.low"), "").unwrap();
    cgroupfs::set_dmem(&dir.0, "dmem.max", "drm/0000:01:00.0/vram0", 4 << 30).unwrap();
    assert_eq!(
        fs::read_to_string(dir.0.join("dmem.max")).unwrap(),
        "drm/0000:01:00.0/vram0 4294967296"
    );
    cgroupfs::set_dmem(&dir.0, "dmem.low", "drm/0000:01:00.0/vram0", u64::MAX).unwrap();
    assert_eq!(
        fs::read_to_string(dir.0.join("dmem.low")).unwrap(),
        "drm/0000:01:00.0/vram0 max"
    );
    let err = cgroupfs::set_dmem(&dir.0, "memory.max", "drm/x", 1).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    // Never creates a control file the kernel does not have.
    assert!(cgroupfs::set_dmem(&dir.0, "dmem.min", "drm/x", 1).is_err());
    assert!(!dir.0.join("dmem.min").exists());
}

#[test]
fn real_mount_dmem_detection_does_not_panic() {
    if let Some(mount) = corral::actuate::cgroup::cgroup2_mount() {
        let support = cgroupfs::dmem_support(&mount);
        eprintln!("{}: {support:?}", mount.display());
    }
}

// ---------------------------------------------------------------------------
// Notifications
// ---------------------------------------------------------------------------

#[test]
fn a_notification_for_a_user_without_a_session_bus_fails_at_once_naming_the_bus() {
    use corral::service::desktop_notify::{Notification, Urgency, send};
    let n = Notification {
        summary: "corral test".into(),
        body: "VRAM freed for a game".into(),
        urgency: Urgency::Normal,
    };
    let runtime = std::env::temp_dir().join(format!("corral-no-runtime-{}", std::process::id()));
    let started = Instant::now();
    let err = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(send(&runtime, 4242, &n))
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        format!("{err:#}").contains("4242/bus as uid 4242"),
        "{err:#}"
    );
}
