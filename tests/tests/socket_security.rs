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
