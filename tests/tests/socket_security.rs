//! The control socket as an ordinary user sees it: status works, explain
//! works for your own processes only, reload and `corral run` into classes
//! not opened to users are refused; a malformed or huge request gets an
//! error and the agent keeps answering.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    process::{Command, Output},
};

use corral_tests::{Agent, corral_bin};

const NOBODY: &str = "65534";

const POLICY: &str = r#"
[classes.game]
cpus = "0"

[classes.ai]
cpus = "0"
user_run = true

[telemetry]
metrics_addr = ""
"#;

/// Runs `corral ARGS --socket S` as uid/gid 65534.
fn as_nobody(agent: &Agent, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(corral_bin())
        .arg(args[0])
        .arg("--socket")
        .arg(&agent.socket)
        .args(&args[1..])
        .output()
        .expect("setpriv (util-linux)")
}

fn open_dir_to_everyone(agent: &Agent) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // corral_bin() must be reachable too: the target dir normally is.
}

#[test]
fn users_read_but_only_root_changes_things() {
    let agent = Agent::start("sock", POLICY).unwrap();
    open_dir_to_everyone(&agent);

    let status = as_nobody(&agent, &["status"]);
    assert!(
        status.status.success(),
        "status as nobody: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("game"));

    let reload = as_nobody(&agent, &["reload"]);
    assert!(!reload.status.success());
    assert!(
        String::from_utf8_lossy(&reload.stderr).contains("only root can reload"),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );

    // PID 1 is root's: not explained to nobody.
    let explain = as_nobody(&agent, &["explain", "1"]);
    assert!(!explain.status.success());
    assert!(String::from_utf8_lossy(&explain.stderr).contains("belongs to another user"));

    // `corral run --class game` is not open to users; `ai` is.
    let game = as_nobody(&agent, &["run", "--class", "game", "--", "true"]);
    assert!(!game.status.success());
    assert!(
        String::from_utf8_lossy(&game.stderr).contains("not open to users"),
        "{}",
        String::from_utf8_lossy(&game.stderr)
    );
    let ai = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(corral_bin())
        .args(["run", "--class", "ai", "--socket"])
        .arg(&agent.socket)
        .args(["--", "sh", "-c", "cat /proc/self/cgroup"])
        .output()
        .unwrap();
    assert!(
        ai.status.success(),
        "{}",
        String::from_utf8_lossy(&ai.stderr)
    );
    assert!(String::from_utf8_lossy(&ai.stdout).contains(&agent.group_of("ai")));

    // Root may do all of it.
    assert!(agent.corral(&["reload"]).is_ok());
    assert!(agent.corral(&["explain", "1"]).is_ok());
}

fn raw(agent: &Agent, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn malformed_and_huge_requests_get_errors_and_the_agent_keeps_going() {
    let agent = Agent::start("garbage", POLICY).unwrap();
    for request in [
        &b"{not json}\n"[..],
        b"\xff\xfe\x00\n",
        b"{\"cmd\": \"explain\"}\n",
        b"{\"cmd\": \"explain\", \"pid\": -1}\n",
        b"{\"cmd\": \"launch_missiles\"}\n",
        b"\n",
    ] {
        let answer = raw(&agent, request);
        assert!(
            answer.contains("\"reply\":\"error\""),
            "{request:?} -> {answer:?}"
        );
        assert!(answer.contains("bad request"), "{request:?} -> {answer:?}");
    }
    let huge = vec![b'x'; 1 << 20];
    let answer = raw(&agent, &huge);
    assert!(
        answer.contains("too large") || answer.contains("bad request"),
        "{answer:?}"
    );
    // Still alive and answering.
    assert!(agent.status().is_ok());
}

/// Ticks of user+system CPU the process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Not a test of its own: the hostile user of the flood test. Run by that
/// test as uid 65534 (re-executing this binary); opens `CORRAL_FLOOD_COUNT`
/// connections to `CORRAL_FLOOD_SOCKET`, sends nothing, and holds them
/// until stdin closes.
#[test]
fn flood_helper() {
    let (Ok(socket), Ok(count)) = (
        std::env::var("CORRAL_FLOOD_SOCKET"),
        std::env::var("CORRAL_FLOOD_COUNT"),
    ) else {
        return;
    };
    let count: usize = count.parse().unwrap();
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match UnixStream::connect(&socket) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    println!("FLOOD connected {} failed {failed}", held.len());
    let mut rest = String::new();
    let _ = std::io::stdin().read_to_string(&mut rest);
}

/// Regression (issue 12): 1,500 idle connections of one unprivileged user
/// exhausted the agent's descriptors at the default limit of 1024; the
/// accept loop then spun a core on EMFILE and nothing new was placed.
#[test]
fn two_thousand_idle_connections_of_nobody_delay_neither_root_nor_a_placement() {
    use std::os::unix::process::CommandExt as _;
    let policy = format!(
        "{POLICY}\n[[rules]]\nname = \"flood-game\"\nclass = \"game\"\nexe = [\"*/flood-game\"]\n"
    );
    let agent = Agent::builder("flood", &policy).start().unwrap();
    open_dir_to_everyone(&agent);
    let agent_pid = agent.pid();

    let mut flooder = Command::new(std::env::current_exe().unwrap());
    flooder
        .args(["--exact", "flood_helper", "--nocapture", "--test-threads=1"])
        .env("CORRAL_FLOOD_SOCKET", &agent.socket)
        .env("CORRAL_FLOOD_COUNT", "2000")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        flooder.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 8192,
                rlim_max: 8192,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut flooder = flooder.spawn().unwrap();
    let mut out = std::io::BufReader::new(flooder.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        use std::io::BufRead as _;
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the flooder ended early"
        );
        if line.contains("FLOOD ") {
            break;
        }
    }
    assert!(line.contains("connected 2000"), "{line}");

    // While nobody holds them: root is answered at once, a game is placed,
    // and the agent idles.
    let ticks_before = cpu_ticks(agent_pid);
    let held_from = std::time::Instant::now();
    let asked = std::time::Instant::now();
    let status = agent.status();
    let answered_in = asked.elapsed();
    assert!(status.is_ok(), "{status:?}");
    assert!(
        answered_in < std::time::Duration::from_secs(1),
        "root's status took {answered_in:?}"
    );
    let game_bin = corral_tests::named_copy(&agent.dir, "sleep", "flood-game").unwrap();
    let mut game = Command::new(&game_bin).arg("30").spawn().unwrap();
    let group = agent.group_of("game");
    assert!(
        corral_tests::wait_for(
            std::time::Duration::from_secs(5) * corral_tests::timeout_scale(),
            || { corral_tests::cgroup_of(game.id()) == group }
        ),
        "the game was not placed while the flood held: {}; explain: {:?}\n{}",
        corral_tests::cgroup_of(game.id()),
        agent.corral(&["explain", &game.id().to_string()]),
        agent.log()
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let held = held_from.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (cpu_ticks(agent_pid) - ticks_before) as f64 / hz / held;
    eprintln!(
        "flood of 2000: root status in {answered_in:?}, agent CPU {:.2}% of a core over {held:.1} s",
        cpu * 100.0
    );
    assert!(
        cpu < 0.05,
        "agent CPU {:.1}% of a core during the hold",
        cpu * 100.0
    );
    // The flood is visible for what it is.
    let log = agent.log();
    assert!(
        log.contains("uid 65534 already holds 8 connections"),
        "no refusal in the log"
    );

    drop(flooder.stdin.take());
    let _ = flooder.wait();
    let _ = game.kill();
    let _ = game.wait();
}
