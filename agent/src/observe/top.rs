//! `corral top`: a live terminal view by class, like btop or nvtop but for
//! corral's classes: CPU, run-queue latency p50/p99 over the last interval,
//! processes, core sets, placements, VRAM and GPU actions. It only reads the
//! agent's status over the control socket. `q` or Ctrl-C quits.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    kernel::bpf::SchedStats,
    observe::{escape::escape, metrics::Histogram},
    service::control::{self, Request, Response, Status},
};

/// Puts the terminal in non-canonical, no-echo mode while alive, so single
/// key presses arrive; restores it on drop.
struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    fn enter() -> Self {
        // SAFETY: tcgetattr/tcsetattr on stdin with a zeroed termios.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::isatty(0) == 0 || libc::tcgetattr(0, &mut saved) != 0 {
                return RawTerminal { saved: None };
            }
            let mut raw = saved;
            raw.c_lflag &= !(libc::ICANON | libc::ECHO);
            raw.c_cc[libc::VMIN] = 0;
            raw.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &raw);
            RawTerminal { saved: Some(saved) }
        }
    }

    /// A key pressed since the last call, if any.
    fn key(&self) -> Option<u8> {
        self.saved?;
        let mut byte = 0u8;
        // SAFETY: reading one byte into a valid buffer; VMIN=0 never blocks.
        let n = unsafe { libc::read(0, (&mut byte as *mut u8).cast(), 1) };
        (n == 1).then_some(byte)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restoring the attributes read in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
        print!("\x1b[?25h");
        let _ = std::io::stdout().flush();
    }
}

fn status(socket: &Path) -> anyhow::Result<Status> {
    match control::request(&socket.to_path_buf(), &Request::Status)? {
        Response::Status(s) => Ok(*s),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn delta(now: &SchedStats, before: Option<&SchedStats>) -> SchedStats {
    let Some(before) = before else {
        return now.clone();
    };
    SchedStats {
        oncpu_ns: now.oncpu_ns.saturating_sub(before.oncpu_ns),
        runq_count: now.runq_count.saturating_sub(before.runq_count),
        runq_sum_ns: now.runq_sum_ns.saturating_sub(before.runq_sum_ns),
        runq_hist: now
            .runq_hist
            .iter()
            .zip(before.runq_hist.iter().chain(std::iter::repeat(&0)))
            .map(|(n, b)| n.saturating_sub(*b))
            .collect(),
    }
}

fn latency(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s.is_infinite() => ">33s".into(),
        Some(s) if s < 1e-3 => format!("{:.0}us", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{s:.1}s"),
    }
}

/// One screen, from the latest status and the one before it.
pub fn render(now: &Status, before: Option<&Status>, elapsed: Duration) -> String {
    let mut out = String::new();
    let secs = elapsed.as_secs_f64().max(1e-3);
    let previous: BTreeMap<&str, &SchedStats> = before
        .map(|b| {
            b.classes
                .iter()
                .filter_map(|c| c.sched.as_ref().map(|s| (c.class.as_str(), s)))
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&format!(
        "corral top  mode {}  ({})\n",
        escape(&now.mode),
        escape(&now.mode_why)
    ));
    out.push_str(&format!(
        "policy {}  cgroups {}{}\n",
        escape(&now.policy),
        escape(&now.cgroup_root),
        if now.cpuset_enforced {
            ""
        } else {
            "  (core sets not enforced: no cpuset controller)"
        }
    ));
    out.push_str(&format!(
        "events exec {} fork {} exit {}  dropped {}  tracked {}  agent {:.1} MiB\n\n",
        now.events.exec,
        now.events.fork,
        now.events.exit,
        now.kernel.dropped,
        now.tracked,
        now.agent_rss_bytes as f64 / 1048576.0
    ));
    out.push_str(&format!(
        "{:<8} {:>6} {:>12} {:>7} {:>9} {:>9} {:>8}  {}\n",
        "CLASS", "PROCS", "CPUS", "CPU%", "RUNQ p50", "RUNQ p99", "PLACED", "NOTE"
    ));
    for class in &now.classes {
        let (cpu, p50, p99) = match &class.sched {
            Some(sched) => {
                let d = delta(sched, previous.get(class.class.as_str()).copied());
                let hist = Histogram::from_log2_us(&d.runq_hist);
                (
                    format!("{:.1}", 100.0 * d.oncpu_ns as f64 / 1e9 / secs),
                    latency(hist.percentile(0.5)),
                    latency(hist.percentile(0.99)),
                )
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "{:<8} {:>6} {:>12} {:>7} {:>9} {:>9} {:>8}  {}\n",
            escape(&class.class),
            class.processes,
            escape(class.cpus.as_deref().unwrap_or("dynamic")),
            cpu,
            p50,
            p99,
            class.placements,
            escape(class.note.as_deref().unwrap_or(""))
        ));
    }
    if let Some(reload) = &now.last_reload
        && !reload.ok
    {
        out.push_str(&format!(
            "\nlast policy reload REFUSED: {}\n",
            escape(&reload.message)
        ));
    }
    out.push_str("\nq quits\n");
    out
}

/// Runs the view until `q`, Ctrl-C, or the agent goes away.
pub fn run(socket: &Path, interval: Duration) -> anyhow::Result<()> {
    let terminal = RawTerminal::enter();
    let mut before: Option<(Status, Instant)> = None;
    loop {
        let now = status(socket)?;
        let elapsed = before.as_ref().map_or(interval, |(_, at)| at.elapsed());
        let screen = render(&now, before.as_ref().map(|(s, _)| s), elapsed);
        print!("\x1b[?25l\x1b[H\x1b[2J{screen}");
        std::io::stdout().flush()?;
        before = Some((now, Instant::now()));
        let deadline = Instant::now() + interval;
        while Instant::now() < deadline {
            if matches!(terminal.key(), Some(b'q' | b'Q')) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
