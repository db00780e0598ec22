//! Regression test for the watchdog bug seen on a systemd machine: the loop
//! ticked every WatchdogSec/2 but skipped ticks that came a little early, so
//! pings drifted to the full limit apart and systemd killed the agent. Over
//! 30 s the largest gap between two WATCHDOG=1 must stay under half the
//! limit plus slack, while the agent is busy with execs.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use corral_tests::{Agent, timeout_scale};

#[test]
fn watchdog_pings_never_drift_past_half_the_limit_over_30_s() {
    let dir = Agent::dir_for("watchdog");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let limit = Duration::from_secs(2);
    let mut agent = Agent::builder(
        "watchdog",
        "[classes.game]\ncpus = \"0\"\n\n[telemetry]\nmetrics_addr = \"\"\n",
    )
    .env("NOTIFY_SOCKET", &socket_path)
    .env("WATCHDOG_USEC", limit.as_micros().to_string())
    .start()
    .unwrap();
    let mut pings = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let mut last_spawn = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        // Some load on the loop: a short-lived exec every 50 ms.
        if last_spawn.elapsed() > Duration::from_millis(50) {
            let _ = Command::new("/bin/true").status();
            last_spawn = Instant::now();
        }
        if let Ok(n) = socket.recv(&mut buf)
            && buf[..n].starts_with(b"WATCHDOG=1")
        {
            pings.push(Instant::now());
        }
    }
    agent.stop().unwrap();
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let largest = gaps.iter().max().copied().unwrap_or(Duration::MAX);
    let slack = Duration::from_millis(250) * timeout_scale();
    println!(
        "{} pings over 30 s; largest gap {largest:?}; limit {limit:?}",
        pings.len()
    );
    assert!(pings.len() >= 40, "too few pings: {}", pings.len());
    assert!(
        largest < limit / 2 + slack,
        "largest watchdog gap {largest:?} against WatchdogSec={limit:?}: gaps {gaps:?}"
    );
}
