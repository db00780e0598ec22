//! VRAM coordination with the real agent and a fake libnvidia-ml: a game
//! starts while ComfyUI holds too much VRAM; corral asks ComfyUI to free
//! memory (a stub HTTP server stands in for it), freezes the `ai` group when
//! the fake still reports too much, thaws it when the game ends, and never
//! leaves a group frozen when it stops. A second round shows "ask" alone
//! getting back under budget.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use corral_tests::{Agent, KillOnDrop, StatusExt as _, cgroup_of, frozen, named_copy, wait_for};
use fake_nvml::{FakeDevice, FakeProcess, FakeState};

/// A stand-in for ComfyUI's HTTP server: records each request line and
/// body, and runs `on_free` when `/free` is posted.
/// What the stub does when ComfyUI is asked to free memory.
type OnFree = Arc<Mutex<Option<Box<dyn Fn() + Send>>>>;

fn comfyui_stub(on_free: OnFree) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap_or(0);
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            record.lock().unwrap().push(format!(
                "{} {}",
                request.trim(),
                String::from_utf8_lossy(&body)
            ));
            if request.starts_with("POST /free")
                && let Some(f) = on_free.lock().unwrap().as_ref()
            {
                f();
            }
            let mut stream = stream;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, seen)
}

fn state(path: &Path, ai_pid: u32, ai_mib: u64) {
    FakeState::new()
        .device(
            FakeDevice::new("NVIDIA GeForce RTX 4070 (fake)", 12 * 1024)
                .used_mib(ai_mib + 800)
                .temperature_c(60)
                .process(FakeProcess::compute(ai_pid, Some(ai_mib))),
        )
        .write(path)
        .unwrap();
}

#[test]
fn game_start_asks_then_freezes_ai_thaws_after_and_on_stop() {
    let dir = Agent::dir_for("gpu");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let library = fake_nvml::install_as_libnvidia(&dir);
    let state_file = dir.join("nvml.json");
    state(&state_file, 1, 0);
    let on_free: OnFree = Arc::new(Mutex::new(None));
    let (port, requests) = comfyui_stub(on_free.clone());

    let policy = format!(
        r#"
[classes.game]
cpus = "0"
[classes.ai]
cpus = "0"
env = {{ PYTORCH_CUDA_ALLOC_CONF = "expandable_segments:True" }}

[gpu]
enabled = true
library = "{library}"
poll_interval_ms = 100
grace_ms = 400

[gpu.classes.game]
priority = 1
reserve = "33%"

[gpu.classes.ai]
priority = 3
max = "25%"
ladder = ["notify", "ask", "freeze"]

[[rules]]
name = "comfy"
class = "ai"
inherit = true
exe = ["*/cgp-comfy"]

[[rules]]
name = "game"
class = "game"
exe = ["*/cgp-game"]
"#,
        library = library.display()
    );
    let mut agent = Agent::builder("gpu", &policy)
        .env("FAKE_NVML_STATE", &state_file)
        .start()
        .unwrap();
    let comfy_bin = named_copy(&agent.dir, "dash", "cgp-comfy")
        .or_else(|_| named_copy(&agent.dir, "sh", "cgp-comfy"))
        .unwrap();
    let game_bin = named_copy(&agent.dir, "sleep", "cgp-game").unwrap();
    let mut children = KillOnDrop(Vec::new());
    // Looks like `python main.py --port N` in a ComfyUI checkout.
    children.0.push(
        Command::new(&comfy_bin)
            .args(["-c", "sleep 120", "main.py", "--port", &port.to_string()])
            .spawn()
            .unwrap(),
    );
    let ai_pid = children.0[0].id();
    let ai_group: PathBuf = agent.cgroup_root.join("ai");
    assert!(
        wait_for(Duration::from_secs(5), || cgroup_of(ai_pid)
            == agent.group_of("ai")),
        "{}",
        agent.log()
    );
    state(&state_file, ai_pid, 9 * 1024);
    assert!(
        wait_for(Duration::from_secs(5), || agent
            .status()
            .unwrap()
            .vram_of("ai")
            == Some(9u64 * 1024 * 1024 * 1024)),
        "{:?}",
        agent.status().unwrap().gpu
    );
    // No game: ComfyUI may use what it likes.
    std::thread::sleep(Duration::from_millis(500));
    assert!(requests.lock().unwrap().is_empty());
    assert!(!frozen(&ai_group));

    // Round 1: the game starts, ComfyUI ignores the request, so ai freezes.
    let started = Instant::now();
    let started_ns = corral::service::daemon::monotonic_ns();
    children
        .0
        .push(Command::new(&game_bin).arg("120").spawn().unwrap());
    assert!(
        wait_for(Duration::from_secs(10), || frozen(&ai_group)),
        "ai never froze: {:?}",
        agent.status().unwrap().gpu
    );
    let to_freeze = started.elapsed();
    let seen = requests.lock().unwrap().clone();
    assert!(
        seen.iter().any(|r| r.starts_with("POST /free HTTP/1.1")
            && r.contains("\"unload_models\": true")
            && r.contains("\"free_memory\": true")),
        "{seen:?}"
    );
    let status = agent.status().unwrap();
    let kinds: Vec<&str> = status.gpu.actions.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(&kinds[..3], ["notify", "ask", "freeze"], "{status:?}");
    assert!(status.gpu.actions.iter().all(|a| a.class == "ai"));
    let first_action_ns = status.gpu.actions[0].at_ns;
    let human = agent.corral(&["status"]).unwrap();
    assert!(
        human.contains("gpu     on; VRAM by class:") && human.contains("ai 9216 MiB"),
        "{human}"
    );
    let explain_text = agent.corral(&["explain", &ai_pid.to_string()]).unwrap();
    assert!(
        explain_text.contains("vram      9216 MiB")
            && explain_text.contains("gpu       freeze on `ai`"),
        "{explain_text}"
    );
    let explain = agent.explanation(ai_pid).unwrap();
    assert!(
        explain.gpu_actions.iter().any(|a| a.kind == "freeze"),
        "{explain:?}"
    );

    // The game ends: ai thaws at once.
    if let Some(mut g) = children.0.pop() {
        let _ = g.kill();
        let _ = g.wait();
    }
    assert!(
        wait_for(Duration::from_secs(5), || !frozen(&ai_group)),
        "ai stayed frozen after the game"
    );

    // Round 2: ComfyUI frees its memory when asked; no freeze is needed.
    let state_copy = state_file.clone();
    *on_free.lock().unwrap() = Some(Box::new(move || state(&state_copy, ai_pid, 1024)));
    std::thread::sleep(Duration::from_millis(1000));
    let started2 = Instant::now();
    children
        .0
        .push(Command::new(&game_bin).arg("120").spawn().unwrap());
    assert!(wait_for(Duration::from_secs(10), || {
        agent.status().unwrap().vram_of("ai") == Some(1024u64 * 1024 * 1024)
    }));
    let under_budget = started2.elapsed();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        !frozen(&ai_group),
        "ai froze although ComfyUI gave its memory back"
    );
    let arbiter = agent.status().unwrap().gpu.arbiter;
    assert_eq!(arbiter.map(|a| a.pressure), Some(false));

    // Round 3: frozen again (ComfyUI ignores us), then the agent stops: the
    // group must not stay frozen.
    *on_free.lock().unwrap() = None;
    if let Some(mut g) = children.0.pop() {
        let _ = g.kill();
        let _ = g.wait();
    }
    state(&state_file, ai_pid, 9 * 1024);
    std::thread::sleep(Duration::from_millis(1000));
    children
        .0
        .push(Command::new(&game_bin).arg("120").spawn().unwrap());
    assert!(wait_for(Duration::from_secs(10), || frozen(&ai_group)));
    let stopped = agent.stop().unwrap();
    assert!(stopped.success());
    assert!(!frozen(&ai_group), "the agent stopped and left ai frozen");

    let mut out = std::io::stderr();
    let _ = writeln!(
        out,
        "gpu scenario (poll 100 ms, grace 400 ms): game start -> first action {:.0} ms; -> freeze {:.0} ms; game start -> back under budget by asking {:.0} ms",
        first_action_ns.saturating_sub(started_ns) as f64 / 1e6,
        to_freeze.as_secs_f64() * 1e3,
        under_budget.as_secs_f64() * 1e3
    );
}

#[test]
fn corral_run_class_starts_a_program_in_the_class_with_its_environment() {
    let policy = r#"
[classes.ai]
cpus = "0"
env = { CORRAL_TEST_MARK = "from-policy" }
"#;
    let agent = Agent::start("runclass", policy).unwrap();
    let out = agent.dir.join("out");
    let status = Command::new(corral_tests::corral_bin())
        .args(["run", "--class", "ai", "--socket"])
        .arg(&agent.socket)
        .args(["--", "sh", "-c"])
        .arg(format!(
            "cat /proc/self/cgroup > {0}; echo \"$CORRAL_TEST_MARK\" >> {0}",
            out.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains(&format!("0::{}", agent.group_of("ai"))),
        "{text}"
    );
    assert!(text.contains("from-policy"), "{text}");
    // An unmanaged class is refused with the classes that exist.
    let refused = Command::new(corral_tests::corral_bin())
        .args(["run", "--class", "nope", "--socket"])
        .arg(&agent.socket)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("takes one of: ai"));
}
