//! `corral top` in a real pseudo-terminal (tmux): it draws every class with
//! live numbers from the running agent, and `q` quits it.

use std::time::Duration;

use corral_tests::{Agent, TmuxSession, busy_loops_on_cpu0, corral_bin, named_shell, wait_for};

const POLICY: &str = r#"
[classes.game]
cpus = "0"

[classes.dev]
cpus = "0"

[telemetry]
enabled = true
metrics_addr = ""

[[rules]]
name = "busy"
class = "game"
exe = ["*/cto-busy"]
"#;

#[test]
fn top_shows_classes_with_live_numbers_and_quits_on_q() {
    let agent = Agent::start("top", POLICY).unwrap();
    let busy = named_shell(&agent.dir, "cto-busy");
    let loops = busy_loops_on_cpu0(&busy, 2);
    let command = format!(
        "{} top --socket {} --interval-ms 300",
        corral_bin().display(),
        agent.socket.display()
    );
    let session = TmuxSession::start("top", (140, 30), &command);
    let screen = || session.screen();
    let drawn = wait_for(Duration::from_secs(10), || {
        let s = screen();
        // The game row has a CPU% and a run-queue p99 with a unit.
        s.lines().any(|l| {
            l.starts_with("game ")
                && (l.contains("us ")
                    || l.contains("ms ")
                    || l.contains("us  ")
                    || l.contains("ms  "))
        })
    });
    let last = screen();
    drop(loops);
    assert!(drawn, "no live game row in:\n{last}");
    assert!(last.contains("RUNQ p99"), "{last}");
    assert!(last.lines().any(|l| l.starts_with("dev ")), "{last}");
    assert!(
        last.contains("mode shared") || last.contains("mode protected"),
        "{last}"
    );

    session.send_keys("q");
    let quit = wait_for(Duration::from_secs(5), || !session.alive());
    assert!(quit, "corral top did not quit on q");
}
