//! `cargo xtask soak`: a long mixed load on the release agent. Execs of a
//! matching program at alternating rates, while three users talk to the
//! control socket: root and one ordinary user ask for status at a steady
//! pace, and a hostile one holds idle connections and floods requests. The
//! agent's RSS, descriptors and CPU are sampled every second; the report
//! says whether they stayed flat, how many execs were never placed, and how
//! long the well-behaved users waited.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::bench::{percentile, start_agent, usage};

#[derive(clap::Args)]
pub struct Soak {
    /// Execs in all.
    #[arg(long, default_value_t = 200_000)]
    execs: u32,
    /// Exec rates to alternate between, per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,100,1000,10")]
    rates: Vec<u32>,
    /// Seconds each rate lasts before the next.
    #[arg(long, default_value_t = 10)]
    block_secs: u32,
    /// Control requests the two well-behaved users make in all.
    #[arg(long, default_value_t = 10_000)]
    requests: u32,
    /// Leave the hostile user's threads beside everyone else's instead of
    /// in a CPU group of their own (what a systemd user slice gives them).
    #[arg(long)]
    no_user_slice: bool,
}

/// One user's control-socket load, run in a child process as that user.
#[derive(clap::Args)]
pub struct SoakClient {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    uid: u32,
    /// `steady`: one status request every `interval_ms`, `count` in all;
    /// `hostile`: hold `idle` connections and flood requests until stdin
    /// closes.
    #[arg(long)]
    mode: String,
    #[arg(long, default_value_t = 0)]
    count: u32,
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    #[arg(long, default_value_t = 2000)]
    idle: u32,
}

const STATUS: &[u8] = b"{\"cmd\":\"status\"}\n";

/// One request; its round trip and whether the agent answered it (rather
/// than turning it away).
fn ask(socket: &Path) -> std::io::Result<(Duration, bool)> {
    let started = Instant::now();
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(STATUS)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok((started.elapsed(), line.starts_with("{\"reply\":\"status\"")))
}

pub fn client(args: SoakClient) -> anyhow::Result<()> {
    drop_to(args.uid)?;
    match args.mode.as_str() {
        "steady" => {
            let mut took_us = Vec::with_capacity(args.count as usize);
            let mut refused = 0;
            let mut failed = 0;
            let start = Instant::now();
            for i in 0..args.count {
                let due = start + Duration::from_millis(i as u64 * args.interval_ms);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                match ask(&args.socket) {
                    Ok((took, true)) => took_us.push(took.as_micros() as u64),
                    Ok((_, false)) => refused += 1,
                    Err(_) => failed += 1,
                }
            }
            took_us.sort_unstable();
            let over = took_us.iter().filter(|us| **us > 100_000).count();
            println!(
                "SOAK uid={} answered={} refused={refused} failed={failed} p50_us={} p99_us={} max_us={} over_100ms={over}",
                args.uid,
                took_us.len(),
                percentile(&took_us, 50.0),
                percentile(&took_us, 99.0),
                took_us.last().copied().unwrap_or(0),
            );
        }
        "hostile" => {
            let mut held = Vec::new();
            for _ in 0..args.idle {
                if let Ok(s) = UnixStream::connect(&args.socket) {
                    held.push(s);
                }
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (answered, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (stop, answered, refused) =
                        (stop.clone(), answered.clone(), refused.clone());
                    let socket = args.socket.clone();
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            match ask(&socket) {
                                Ok((_, true)) => answered.fetch_add(1, Ordering::Relaxed),
                                _ => refused.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    })
                })
                .collect();
            let mut rest = String::new();
            let _ = std::io::stdin().read_line(&mut rest);
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                let _ = t.join();
            }
            println!(
                "SOAK uid={} hostile held={} answered={} refused_or_failed={}",
                args.uid,
                held.len(),
                answered.load(Ordering::Relaxed),
                refused.load(Ordering::Relaxed)
            );
        }
        other => bail!("unknown soak client mode {other:?}"),
    }
    Ok(())
}

/// Becomes `uid` (and its gid, no groups), with room for many descriptors.
fn drop_to(uid: u32) -> anyhow::Result<()> {
    // SAFETY: plain syscalls on this single-threaded process, before any
    // thread is started.
    unsafe {
        let limit = libc::rlimit {
            rlim_cur: 8192,
            rlim_max: 8192,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        if uid != 0
            && (libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0)
        {
            bail!("becoming uid {uid}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn spawn_client(socket: &Path, uid: u32, mode: &str, extra: &[String]) -> anyhow::Result<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .arg("soak-client")
        .arg("--socket")
        .arg(socket)
        .args(["--uid", &uid.to_string(), "--mode", mode])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()?)
}

fn report(child: Child) -> anyhow::Result<String> {
    let output = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("SOAK"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// What systemd gives each logged-in user: a slice with an equal CPU
/// weight, so one user's busy threads together weigh as one user. The
/// hostile client gets such a group under the cgroup v1 cpu controller
/// where the host has one (this machine kind is a v1/v2 hybrid); the group
/// is removed on drop, once the client has exited.
struct UserSlice(PathBuf);

impl UserSlice {
    fn for_process(pid: u32) -> Result<Self, String> {
        let controller = Path::new("/sys/fs/cgroup/cpu");
        if !controller.join("cgroup.procs").exists() {
            return Err(format!(
                "no cgroup v1 cpu controller at {}",
                controller.display()
            ));
        }
        let dir = controller.join(format!("corral-soak-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let slice = Self(dir);
        std::fs::write(slice.0.join("cgroup.procs"), pid.to_string())
            .map_err(|e| format!("moving pid {pid} into {}: {e}", slice.0.display()))?;
        Ok(slice)
    }
}

impl Drop for UserSlice {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub fn run(soak: Soak) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("corral-soak-{}", std::process::id()));
    let agent = start_agent(
        &dir,
        "[classes.game]\ncpus = \"0\"\ncpu_weight = 1000\n\n[telemetry]\nmetrics_addr = \"\"\n\n[[rules]]\nname = \"soak-game\"\nclass = \"game\"\nexe = [\"*/corral-soak-game\"]\n",
        &[],
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let agent_pid = agent.child.id();
    let program = dir.join("corral-soak-game");
    // Each lives 500 ms (up to 500 at once at 1000/s): one still unplaced
    // when it exits is a placement the agent missed, not one it could not
    // make.
    std::fs::copy("/bin/sleep", &program).context("copying /bin/sleep")?;

    // Two well-behaved users split the requests over the whole run; the
    // run's length is set by the exec blocks.
    let blocks: Vec<u32> = soak.rates.clone();
    let per_cycle: u64 = blocks
        .iter()
        .map(|r| *r as u64 * soak.block_secs as u64)
        .sum();
    let cycles = (soak.execs as u64).div_ceil(per_cycle.max(1));
    let run_secs = cycles * blocks.len() as u64 * soak.block_secs as u64;
    let each = soak.requests / 2;
    let interval_ms = (run_secs * 1000 / each.max(1) as u64).max(1);
    let steady = |uid: u32| {
        spawn_client(
            &agent.socket,
            uid,
            "steady",
            &[
                "--count".into(),
                each.to_string(),
                "--interval-ms".into(),
                interval_ms.to_string(),
            ],
        )
    };
    let root = steady(0)?;
    let user = steady(1000)?;
    let hostile = spawn_client(
        &agent.socket,
        65534,
        "hostile",
        &["--idle".into(), "2000".into()],
    )?;
    let slice = if soak.no_user_slice {
        println!("soak: the hostile user shares the CPU with everyone (--no-user-slice)");
        None
    } else {
        match UserSlice::for_process(hostile.id()) {
            Ok(slice) => {
                println!(
                    "soak: the hostile user's threads run in {} (one user's CPU weight, as its systemd user slice would give)",
                    slice.0.display()
                );
                Some(slice)
            }
            Err(e) => {
                println!("soak: the hostile user shares the CPU with everyone ({e})");
                None
            }
        }
    };
    println!(
        "soak: {} execs at {:?}/s in {} s blocks ({run_secs} s), {} status requests from uid 0 and 1000 every {interval_ms} ms, uid 65534 holding 2000 idle connections and flooding",
        soak.execs,
        blocks,
        soak.block_secs,
        each * 2
    );

    let (cpu_start, _, _) = usage(agent_pid)?;
    let start = Instant::now();
    let mut samples: Vec<(f64, u64, usize, f64)> = Vec::new();
    let mut next_sample = start;
    let mut spawned = 0u32;
    let mut spawn_failures = 0u32;
    let mut running: Vec<Child> = Vec::new();
    'outer: for _ in 0..cycles {
        for &rate in &blocks {
            let block_start = Instant::now();
            let n = rate * soak.block_secs;
            for i in 0..n {
                if spawned >= soak.execs {
                    break 'outer;
                }
                let due = block_start + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                match Command::new(&program)
                    .arg("0.5")
                    .stdin(Stdio::null())
                    .spawn()
                {
                    Ok(child) => {
                        spawned += 1;
                        running.push(child);
                    }
                    Err(_) => spawn_failures += 1,
                }
                if running.len() > 1024 {
                    running.retain_mut(|c| c.try_wait().ok().flatten().is_none());
                }
                if Instant::now() >= next_sample {
                    let (cpu, rss, _) = usage(agent_pid)?;
                    samples.push((
                        start.elapsed().as_secs_f64(),
                        rss,
                        descriptors(agent_pid),
                        cpu - cpu_start,
                    ));
                    next_sample += Duration::from_secs(1);
                }
            }
        }
    }
    for mut c in running {
        let _ = c.wait();
    }
    let wall = start.elapsed().as_secs_f64();
    let (cpu_end, rss_end, hwm) = usage(agent_pid)?;
    let root = report(root)?;
    let user = report(user)?;
    let mut hostile = hostile;
    drop(hostile.stdin.take());
    let hostile = report(hostile)?;
    drop(slice);

    std::thread::sleep(Duration::from_millis(500));
    let status: serde_json::Value =
        serde_json::from_str(&crate::bench::corral(&agent.socket, &["status", "--json"])?)?;
    let placed = status["classes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["class"] == "game"))
        .and_then(|c| c["placements"].as_u64())
        .unwrap_or(0);
    println!(
        "  execs: {spawned} spawned ({spawn_failures} spawn failures) in {wall:.0} s; placed {placed}, never placed {}",
        (spawned as u64).saturating_sub(placed)
    );
    println!(
        "  kernel events dropped: {}, vanished before read: {}",
        status["kernel"]["dropped"], status["events"]["vanished"]
    );
    println!("  {root}\n  {user}\n  {hostile}");
    println!(
        "  agent CPU {:.1} s over {wall:.0} s ({:.1}% of a core); RSS now {:.1} MiB, peak {:.1} MiB",
        cpu_end - cpu_start,
        100.0 * (cpu_end - cpu_start) / wall,
        rss_end as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("  curve (every 10 s): t s, RSS MiB, descriptors, CPU s so far");
    for (t, rss, fds, cpu) in samples.iter().step_by(10) {
        println!("    {t:6.0} {:6.1} {fds:5} {cpu:7.1}", *rss as f64 / 1024.0);
    }
    let steady_part = &samples[samples.len() / 4..];
    if let (Some(min), Some(max)) = (
        steady_part.iter().map(|s| s.1).min(),
        steady_part.iter().map(|s| s.1).max(),
    ) {
        println!(
            "  after the first quarter: RSS {:.1}..{:.1} MiB, descriptors {}..{}",
            min as f64 / 1024.0,
            max as f64 / 1024.0,
            steady_part.iter().map(|s| s.2).min().unwrap_or(0),
            steady_part.iter().map(|s| s.2).max().unwrap_or(0)
        );
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
