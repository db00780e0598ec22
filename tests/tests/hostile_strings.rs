//! A process cannot write into root's terminal through corral: one whose
//! program file name (so its comm and exe) and argv carry escape sequences
//! and invalid UTF-8 is shown by `corral explain`, `status`, `top`, `policy
//! test` and the agent's log with those bytes escaped, never raw; `--json`
//! keeps them exactly.

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use corral_tests::{Agent, KillOnDrop, TmuxSession, cgroup_of, corral_bin, wait_for};

/// Classes `game` and `dev`; the rule puts this test's program in `class`.
fn policy(class: &str) -> String {
    format!(
        r#"
[classes.game]
cpus = "0"

[classes.dev]
cpus = "0"

[[rules]]
name = "hostile"
class = "{class}"
exe = ["*/cesc*"]
"#
    )
}

/// The program's file name, so its comm (14 bytes, under TASK_COMM_LEN):
/// set the window title, clear the screen, and a byte that is not UTF-8.
const FILE_NAME: &[u8] = b"cesc\x1b]0;P\x07\x1b[2J\xff";

/// argv[0], as `exec -a $'weird\e]0;PWNED\a\e[2J\e[31mX\xff'` sets it,
/// with a forged explain line after a newline.
const ARGV0: &[u8] = b"weird\x1b]0;PWNED\x07\x1b[2J\x1b[31mX\xff\n  class     system";

/// Every byte a terminal could act on, with its offset: C0 other than
/// newline and tab, DEL, and C1 controls (UTF-8 encoded, or a raw byte).
fn controls(bytes: &[u8]) -> Vec<(usize, u32)> {
    let mut found: Vec<(usize, u32)> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| (**b < 0x20 && !matches!(**b, b'\n' | b'\t')) || **b == 0x7f)
        .map(|(i, b)| (i, u32::from(*b)))
        .collect();
    found.extend(
        String::from_utf8_lossy(bytes)
            .char_indices()
            .filter(|(_, c)| ('\u{80}'..='\u{9f}').contains(c))
            .map(|(i, c)| (i, c as u32)),
    );
    found
}

fn assert_no_controls(what: &str, bytes: &[u8]) {
    let found = controls(bytes);
    assert!(
        found.is_empty(),
        "{what}: raw control bytes (offset, value) {found:?} in:\n{}",
        String::from_utf8_lossy(bytes)
    );
}

#[test]
fn escape_sequences_in_comm_and_argv_reach_no_terminal_raw_in_any_view_or_log() {
    let agent = Agent::builder("hostile", &policy("game"))
        .env("NO_COLOR", "1")
        .start()
        .unwrap();
    let program = agent.dir.join(OsStr::from_bytes(FILE_NAME));
    std::fs::copy("/bin/sleep", &program).unwrap();
    // `exec -a` in bash, as a hostile user would type it.
    let hostile = Command::new("bash")
        .args(["-c", "exec -a \"$0\" \"$1\" 60"])
        .arg(OsStr::from_bytes(ARGV0))
        .arg(&program)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = hostile.id();
    let _hostile = KillOnDrop(vec![hostile]);
    let group = agent.group_of("game");
    assert!(
        wait_for(Duration::from_secs(10), || cgroup_of(pid) == group),
        "not placed: in {}\n{}",
        cgroup_of(pid),
        agent.log()
    );

    // explain: every field escaped, the forged line stays inside argv.
    let text = agent.corral(&["explain", &pid.to_string()]).unwrap();
    assert_no_controls("explain", text.as_bytes());
    assert!(
        text.starts_with(&format!("pid {pid} (cesc\\e]0;P\\a\\e[2J\u{fffd})  ")),
        "{text}"
    );
    assert!(
        text.contains(
            "  argv      weird\\e]0;PWNED\\a\\e[2J\\e[31mX\u{fffd}\\n  class     system 60\n"
        ),
        "{text}"
    );
    let class_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("  class")).collect();
    assert_eq!(class_lines, ["  class     game"], "{text}");

    // --json: the exact strings (invalid UTF-8 read as U+FFFD), raw bytes
    // written as JSON escapes.
    let json = agent
        .corral(&["explain", &pid.to_string(), "--json"])
        .unwrap();
    assert_no_controls("explain --json", json.as_bytes());
    let e = agent.explanation(pid).unwrap();
    assert_eq!(
        e.argv[0].as_bytes(),
        String::from_utf8_lossy(ARGV0).as_bytes()
    );
    assert_eq!(e.comm, "cesc\x1b]0;P\x07\x1b[2J\u{fffd}");

    let status = agent.corral(&["status"]).unwrap();
    assert_no_controls("status", status.as_bytes());
    assert!(status.contains("\ngame "), "{status}");

    // policy test: under a rule for dev the process would move, so it is listed by comm
    // and cgroup.
    let as_dev = agent.dir.join("as-dev.toml");
    std::fs::write(&as_dev, policy("dev")).unwrap();
    let root = agent.cgroup_root.display().to_string();
    let out = Command::new(corral_bin())
        .args(["policy", "test", "--standalone", "--cgroup-root", &root])
        .arg(&as_dev)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_controls("policy test", &out.stdout);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(&format!("{pid:>7} cesc\\e]0;P\\a\\e[2J\u{fffd}")),
        "{listed}"
    );

    // The agent's log line for the move names the comm, escaped.
    let log = std::fs::read(agent.dir.join("agent.log")).unwrap();
    assert_no_controls("agent log", &log);
    assert!(
        String::from_utf8_lossy(&log).contains("comm=cesc\\e]0;P\\a\\e[2J\u{fffd}"),
        "{}",
        String::from_utf8_lossy(&log)
    );

    // In a real terminal (tmux): explain neither sets the title nor clears
    // the screen, and top draws.
    let bin = corral_bin().display().to_string();
    let socket = agent.socket.display().to_string();
    let explain_pane = TmuxSession::start(
        "hostile-explain",
        (200, 40),
        &format!("{bin} explain {pid} --socket {socket}; sleep 30"),
    );
    let top_pane = TmuxSession::start(
        "hostile-top",
        (200, 40),
        &format!("{bin} top --socket {socket} --interval-ms 300"),
    );
    assert!(
        wait_for(Duration::from_secs(10), || explain_pane
            .screen()
            .contains("  class     game")),
        "{}",
        explain_pane.screen()
    );
    assert!(
        wait_for(Duration::from_secs(10), || top_pane
            .screen()
            .contains("CLASS")),
        "{}",
        top_pane.screen()
    );
    let screen = explain_pane.screen();
    assert!(
        screen.starts_with(&format!("pid {pid} (cesc\\e]0;P\\a\\e[2J")),
        "the screen was cleared or the line eaten:\n{screen}"
    );
    for pane in [&explain_pane, &top_pane] {
        let title = pane.title();
        assert!(
            !title.contains("PWNED") && title.trim() != "P",
            "title set to {title:?}"
        );
    }

    // top's own output, byte for byte: only the sequences it writes itself.
    let out = Command::new("timeout")
        .args(["-s", "INT", "1.5"])
        .arg(corral_bin())
        .args(["top", "--socket", &socket, "--interval-ms", "300"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let raw = out.stdout;
    assert!(!raw.is_empty(), "top wrote nothing");
    let mut own = String::from_utf8(raw).unwrap();
    for sequence in ["\x1b[?25l", "\x1b[H", "\x1b[2J", "\x1b[?25h"] {
        own = own.replace(sequence, "");
    }
    assert_no_controls("top", own.as_bytes());
    assert!(own.contains("CLASS"), "{own}");
}
