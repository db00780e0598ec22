//! Benchmarks. `peers`: corral beside the peers kit's floor and ananicy-cpp-ng. `exec`: spawn processes that match a class at a given rate
//! and measure, per process, the time from the kernel's exec timestamp to
//! the return of the agent's cgroup write; report p50/p99/max, how many
//! were never placed, and the agent's RSS and CPU time over the run.
//!
//! Length: four benchmarks (exec, peers, overhead, reload) and the helpers they share.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::setup::repo_root;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// What corral costs a scheduler-heavy workload: `perf bench sched
    /// messaging` without corral, with exec tracing only, and with full
    /// telemetry, interleaved; BPF run time per event; agent CPU and RSS.
    Overhead {
        /// Rounds of the three variants.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// `perf bench sched messaging` groups and loops per run.
        #[arg(long, default_value_t = 10)]
        groups: u32,
        #[arg(long, default_value_t = 300)]
        loops: u32,
        /// Seconds to watch the idle agent.
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
    },
    /// Time from a policy file write to every affected process re-placed.
    Reload {
        /// Tracked processes the edit re-classifies.
        #[arg(long, default_value_t = 1000)]
        processes: u32,
    },
    /// corral beside the floor (a minimal proc-connector reactor) and
    /// ananicy-cpp-ng, on one kernel clock (exec tracepoint to cgroup
    /// attach, the peers kit's run.sh and measure.bt), one agent after
    /// another at each rate, with each agent's CPU time over the storm
    /// (every thread's schedstat), how often it went to sleep (each sleep
    /// is a wake-up paid for) and its RSS after it.
    Peers {
        /// The peers kit (run.sh, measure.bt, floor-procconn.c, ananicy.sh).
        #[arg(long, default_value = "../shared/peers")]
        peers: PathBuf,
        /// Rates (exec/s), and how many execs at each.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        rates: Vec<u32>,
        #[arg(long, value_delimiter = ',', default_value = "300,2000,5000")]
        counts: Vec<u32>,
        /// Another corral build to run beside this one, as NAME=PATH
        /// (e.g. the previous commit's target/release/corral).
        #[arg(long)]
        also: Vec<String>,
    },
    /// Exec-to-placement latency under an exec storm.
    Exec {
        /// Processes started per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Processes started in all.
        #[arg(long, default_value_t = 10000)]
        count: u32,
        /// How long each process lives, in ms.
        #[arg(long, default_value_t = 200)]
        life_ms: u32,
        /// Run the agent with scheduling telemetry off.
        #[arg(long)]
        no_telemetry: bool,
        /// Extra arguments for `corral run`, e.g. `--nice 0`.
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Reload { processes } => reload(processes),
        Bench::Overhead {
            rounds,
            groups,
            loops,
            idle_secs,
        } => overhead(rounds, groups, loops, idle_secs),
        Bench::Peers {
            peers,
            rates,
            counts,
            also,
        } => compare_with_peers(&peers, &rates, &counts, &also),
        Bench::Exec {
            rate,
            count,
            life_ms,
            no_telemetry,
            agent_args,
        } => exec(rate, count, life_ms, !no_telemetry, &agent_args),
    }
}

fn compare_with_peers(
    peers: &Path,
    rates: &[u32],
    counts: &[u32],
    also: &[String],
) -> anyhow::Result<()> {
    let root = repo_root();
    let kit = root.join(peers);
    let run_sh = kit.join("run.sh");
    if !run_sh.exists() {
        bail!(
            "{} not found: point --peers at the peers kit (run.sh, measure.bt, floor-procconn.c)",
            run_sh.display()
        );
    }
    if rates.len() != counts.len() {
        bail!("--rates and --counts must list as many values");
    }
    crate::setup::apt(&["bpftrace", "gcc"])?;
    let work = PathBuf::from(std::env::var("WORK").unwrap_or_else(|_| "/tmp/peers".into()));
    std::fs::create_dir_all(&work)?;
    // The policy compare.sh gives corral: one rule, by comm.
    let policy = work.join("corral.toml");
    std::fs::write(
        &policy,
        "[classes.game]\ncpus = \"0\"\n[[rules]]\nname = \"storm\"\nclass = \"game\"\ncomm = [\"stormgame\"]\n",
    )?;
    let corral_cmd = |binary: &Path| {
        format!(
            "{} run --policy {} --no-override --cgroup-root /sys/fs/cgroup/unified/peers-bench-corral --socket {}",
            binary.display(),
            policy.display(),
            work.join("corral.sock").display()
        )
    };
    let mut agents: Vec<(String, String)> = vec![
        (
            "floor".into(),
            format!(
                "nice -n -10 {} stormgame /sys/fs/cgroup/unified/peers-bench-floor",
                work.join("build/floor-procconn").display()
            ),
        ),
        (
            "corral".into(),
            corral_cmd(&root.join("target/release/corral")),
        ),
    ];
    for extra in also {
        let (name, path) = extra
            .split_once('=')
            .ok_or_else(|| anyhow!("--also takes NAME=PATH, not {extra:?}"))?;
        agents.push((name.to_owned(), corral_cmd(Path::new(path))));
    }
    let ananicy = kit.join("ananicy.sh");
    let ananicy_built = ["build", "config"].iter().all(|step| {
        Command::new("bash")
            .arg(&ananicy)
            .arg(step)
            .env("WORK", &work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if ananicy_built {
        agents.push(("ananicy".into(), format!("{} run", ananicy.display())));
    } else {
        println!(
            "ananicy-cpp-ng could not be built ({} build): left out",
            ananicy.display()
        );
    }
    let wrap = root.join("xtask/peers/cpu-wrap.sh");
    println!(
        "| agent | rate/s | execs | missed | p50 us | p99 us | max us | CPU ms | CPU us/exec | sleeps/exec | RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (rate, count) in rates.iter().zip(counts) {
        for (name, cmd) in &agents {
            let cpu_file = work.join(format!("cpu-{name}-{rate}.txt"));
            let _ = std::fs::remove_file(&cpu_file);
            let output = Command::new("bash")
                .arg(&run_sh)
                .arg(format!(
                    "{} {} 2.5 {cmd}",
                    wrap.display(),
                    cpu_file.display()
                ))
                .env("WORK", &work)
                .env("RATES", rate.to_string())
                .env("COUNT", count.to_string())
                .env("SETTLE_S", "3")
                .stderr(Stdio::null())
                .output()
                .context("running run.sh")?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let line = stdout.lines().last().unwrap_or_default();
            let field = |key: &str| -> String {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                    .unwrap_or("?")
                    .to_owned()
            };
            let cpu = std::fs::read_to_string(&cpu_file).unwrap_or_default();
            let num = |key: &str| -> Option<f64> {
                cpu.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                    .and_then(|v| v.parse().ok())
            };
            let cpu_ns = num("cpu_end_ns")
                .zip(num("cpu_start_ns"))
                .map(|(end, start)| end - start);
            let execs: f64 = field("execs").parse().unwrap_or(0.0);
            let show = |v: Option<f64>, scale: f64, digits: usize| {
                v.map_or("?".to_owned(), |v| format!("{:.*}", digits, v / scale))
            };
            println!(
                "| {name} | {rate} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                field("execs"),
                field("missed"),
                field("p50_us"),
                field("p99_us"),
                field("max_us"),
                show(cpu_ns, 1e6, 1),
                show(cpu_ns.filter(|_| execs > 0.0), execs * 1e3, 1),
                show(num("sleeps").filter(|_| execs > 0.0), execs, 2),
                show(num("rss_kib"), 1024.0, 1),
            );
        }
    }
    Ok(())
}

// xtask cannot depend on the corral crate: building corral needs the eBPF
// toolchain that xtask installs first. So these few helpers (cgroup2 mount,
// CLOCK_MONOTONIC, /proc usage) are repeated here.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let c = std::ffi::CString::new(mount)?;
        // SAFETY: statfs into a zeroed struct with a valid C string.
        let is_v2 = unsafe {
            let mut buf: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == CGROUP2_SUPER_MAGIC
        };
        if is_v2 {
            return Ok(PathBuf::from(mount));
        }
    }
    bail!("no cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

/// (utime + stime in seconds, VmRSS KiB, VmHWM KiB) of a process.
pub(crate) fn usage(pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?
        .1
        .split_whitespace()
        .collect();
    // After ")": state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((ticks as f64 / hz, kib("VmRSS:"), kib("VmHWM:")))
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) struct AgentRun {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
    cgroup_root: PathBuf,
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Ok(entries) = std::fs::read_dir(&self.cgroup_root) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup_root);
    }
}

pub(crate) fn corral(socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(repo_root().join("target/release/corral"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()?;
    if !output.status.success() {
        bail!(
            "corral {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Starts the release agent on `policy_text` in a scratch directory and
/// waits until it answers.
pub(crate) fn start_agent(
    dir: &Path,
    policy_text: &str,
    agent_args: &[String],
) -> anyhow::Result<AgentRun> {
    std::fs::create_dir_all(dir)?;
    let policy = dir.join("bench.toml");
    std::fs::write(&policy, policy_text)?;
    let socket = dir.join("control.sock");
    let cgroup_root = cgroup2_mount()?.join(format!("corral-bench-{}", std::process::id()));
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = Command::new(repo_root().join("target/release/corral"))
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--cgroup-root")
        .arg(&cgroup_root)
        .arg("--socket")
        .arg(&socket)
        .arg("--override")
        .arg(dir.join("override.toml"))
        .args(agent_args)
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()?;
    let agent = AgentRun {
        child,
        socket,
        cgroup_root,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while corral(&agent.socket, &["status", "--json"]).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the agent did not start; see {}",
                dir.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(agent)
}

fn exec(
    rate: u32,
    count: u32,
    life_ms: u32,
    telemetry: bool,
    agent_args: &[String],
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("corral-bench-{}", std::process::id()));
    let agent = start_agent(
        &dir,
        &format!(
            "[classes.game]\ncpus = \"0\"\ncpu_weight = 1000\n\n[telemetry]\nenabled = {telemetry}\nmetrics_addr = \"\"\n\n[[rules]]\nname = \"bench-game\"\nclass = \"game\"\nexe = [\"*/corral-bench-game\"]\n"
        ),
        agent_args,
    )?;
    let agent_pid = agent.child.id();
    let program = dir.join("corral-bench-game");
    std::fs::copy("/bin/sleep", &program).context("copying /bin/sleep")?;

    let (cpu_before, _, _) = usage(agent_pid)?;
    let life = format!("{:.3}", life_ms as f64 / 1000.0);
    let start = Instant::now();
    let mut running: Vec<Child> = Vec::new();
    let mut spawned: Vec<u32> = Vec::with_capacity(count as usize);
    let mut spawn_failures = 0u32;
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        match Command::new(&program)
            .arg(&life)
            .stdin(Stdio::null())
            .spawn()
        {
            Ok(child) => {
                spawned.push(child.id());
                running.push(child);
            }
            Err(_) => spawn_failures += 1,
        }
        if i % 64 == 0 {
            running.retain_mut(|c| c.try_wait().ok().flatten().is_none());
        }
    }
    let spawn_secs = start.elapsed().as_secs_f64();
    for mut c in running {
        let _ = c.wait();
    }
    let wall = start.elapsed().as_secs_f64();
    let (cpu_after, rss_kib, hwm_kib) = usage(agent_pid)?;

    let placements: Vec<serde_json::Value> =
        serde_json::from_str(&corral(&agent.socket, &["placements"])?)?;
    let status: serde_json::Value =
        serde_json::from_str(&corral(&agent.socket, &["status", "--json"])?)?;
    // pid -> (exec->placed, exec->handled, handled->placed)
    let by_pid: HashMap<u64, (u64, u64, u64)> = placements
        .iter()
        .filter_map(|p| {
            let pid = p["pid"].as_u64()?;
            let (exec, handled, placed) = (
                p["exec_ns"].as_u64()?,
                p["handled_ns"].as_u64()?,
                p["placed_ns"].as_u64()?,
            );
            Some((
                pid,
                (
                    placed.checked_sub(exec)?,
                    handled.saturating_sub(exec),
                    placed.saturating_sub(handled),
                ),
            ))
        })
        .collect();
    let matched: Vec<(u64, u64, u64)> = spawned
        .iter()
        .filter_map(|pid| by_pid.get(&(*pid as u64)).copied())
        .collect();
    let sorted = |pick: fn(&(u64, u64, u64)) -> u64| {
        let mut v: Vec<u64> = matched.iter().map(pick).collect();
        v.sort_unstable();
        v
    };
    let latencies = sorted(|m| m.0);
    let waiting = sorted(|m| m.1);
    let working = sorted(|m| m.2);
    let missed = spawned.len() - latencies.len();
    let us = |ns: u64| ns as f64 / 1000.0;
    println!(
        "bench exec: rate {rate}/s, count {count}, life {life_ms} ms, telemetry {telemetry}, agent args {agent_args:?}"
    );
    println!(
        "  spawned {} in {spawn_secs:.2} s ({:.0}/s achieved), spawn failures {spawn_failures}",
        spawned.len(),
        spawned.len() as f64 / spawn_secs
    );
    println!(
        "  exec -> cgroup write: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        us(percentile(&latencies, 50.0)),
        us(percentile(&latencies, 99.0)),
        us(latencies.last().copied().unwrap_or(0))
    );
    println!(
        "    of which waiting to be read (exec -> agent picks it up): p50 {:.0} us, p99 {:.0} us",
        us(percentile(&waiting, 50.0)),
        us(percentile(&waiting, 99.0))
    );
    println!(
        "    of which agent work (/proc read, classify, cgroup write): p50 {:.0} us, p99 {:.0} us",
        us(percentile(&working, 50.0)),
        us(percentile(&working, 99.0))
    );
    println!("  never placed: {missed}");
    println!("  kernel events dropped: {}", status["kernel"]["dropped"]);
    println!(
        "  agent: CPU {:.2} s over {wall:.2} s ({:.1}% of one core), RSS {:.1} MiB (peak {:.1} MiB)",
        cpu_after - cpu_before,
        100.0 * (cpu_after - cpu_before) / wall,
        rss_kib as f64 / 1024.0,
        hwm_kib as f64 / 1024.0
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One `perf bench sched messaging` run; its "Total time" in seconds.
fn messaging(groups: u32, loops: u32) -> anyhow::Result<f64> {
    let output = Command::new("perf")
        .args([
            "bench",
            "sched",
            "messaging",
            "-g",
            &groups.to_string(),
            "-l",
            &loops.to_string(),
        ])
        .output()
        .context("running perf bench (apt-get install linux-perf)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Total time:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no total time in perf output: {text}"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn overhead(rounds: u32, groups: u32, loops: u32, idle_secs: u64) -> anyhow::Result<()> {
    if Command::new("perf").arg("--version").output().is_err() {
        crate::setup::apt(&["linux-perf"])?;
    }
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let stats_before = std::fs::read_to_string(stats_path).unwrap_or_else(|_| "0".into());
    std::fs::write(stats_path, "1").context("enabling kernel.bpf_stats_enabled")?;
    let policy = |telemetry: bool| {
        format!(
            "[classes.game]\ncpus = \"0\"\n\n[telemetry]\nenabled = {telemetry}\nmetrics_addr = \"\"\n\n[[rules]]\nname = \"bench\"\nclass = \"game\"\nexe = [\"*/corral-bench-nothing\"]\n"
        )
    };
    let variants = ["without corral", "exec tracing only", "full telemetry"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut bpf: HashMap<String, (u64, u64)> = HashMap::new();
    let dir = std::env::temp_dir().join(format!("corral-bench-overhead-{}", std::process::id()));
    messaging(groups, loops)?; // warm-up
    for round in 0..rounds {
        for step in 0..3 {
            let variant = (step + round as usize) % 3;
            let agent = match variant {
                0 => None,
                v => Some(start_agent(
                    &dir.join(format!("{round}-{v}")),
                    &policy(v == 2),
                    &[],
                )?),
            };
            let before = agent.as_ref().map(program_stats).transpose()?;
            times[variant].push(messaging(groups, loops)?);
            if let (Some(agent), Some(before), 2) = (&agent, before, variant) {
                for (name, (count, ns)) in program_stats(agent)? {
                    let (c0, t0) = before.get(&name).copied().unwrap_or((0, 0));
                    let entry = bpf.entry(name).or_default();
                    entry.0 += count.saturating_sub(c0);
                    entry.1 += ns.saturating_sub(t0);
                }
            }
        }
    }
    let base = median(&mut times[0].clone());
    println!(
        "bench overhead: perf bench sched messaging -g {groups} -l {loops}, {rounds} interleaved rounds"
    );
    for (i, name) in variants.iter().enumerate() {
        let m = median(&mut times[i].clone());
        println!(
            "  {name:<18} median {m:.3} s  slowdown {:+.2}%  (runs: {})",
            100.0 * (m / base - 1.0),
            times[i]
                .iter()
                .map(|t| format!("{t:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!("  BPF run time per event (full telemetry runs, kernel.bpf_stats_enabled):");
    let mut names: Vec<_> = bpf.into_iter().filter(|(_, (c, _))| *c > 0).collect();
    names.sort();
    for (name, (count, ns)) in names {
        println!(
            "    {name:<20} {count:>10} runs  {:.0} ns/run",
            ns as f64 / count as f64
        );
    }

    // The idle agent, full telemetry on.
    let agent = start_agent(&dir.join("idle"), &policy(true), &[])?;
    let pid = agent.child.id();
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, _, _) = usage(pid)?;
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (cpu1, rss, _) = usage(pid)?;
    println!(
        "  idle agent: {:.3}% of one core over {idle_secs} s, RSS {:.1} MiB",
        100.0 * (cpu1 - cpu0) / idle_secs as f64,
        rss as f64 / 1024.0
    );
    drop(agent);
    let _ = std::fs::write(stats_path, stats_before.trim());
    let _ = std::fs::remove_dir_all(&dir);
    println!("  under an exec storm: see `cargo xtask bench exec --rate 1000 --count 10000`");
    Ok(())
}

/// name -> (run count, run time ns) of the agent's programs.
fn program_stats(agent: &AgentRun) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let status: serde_json::Value =
        serde_json::from_str(&corral(&agent.socket, &["status", "--json"])?)?;
    Ok(status["bpf_programs"]
        .as_array()
        .map(|programs| {
            programs
                .iter()
                .filter_map(|p| {
                    Some((
                        p["name"].as_str()?.to_owned(),
                        (p["run_count"].as_u64()?, p["run_time_ns"].as_u64()?),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// CLOCK_MONOTONIC ns, the clock the agent stamps its reloads with.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_default()
}

fn reload(processes: u32) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("corral-bench-reload-{}", std::process::id()));
    let agent = start_agent(
        &dir,
        "[classes.game]\ncpus = \"0\"\n\n[classes.dev]\ncpus = \"0\"\n\n[[rules]]\nname = \"tool\"\nclass = \"dev\"\nexe = [\"*/corral-bench-tool\"]\n",
        &[],
    )?;
    let program = dir.join("corral-bench-tool");
    std::fs::copy("/bin/sleep", &program).context("copying /bin/sleep")?;
    let mut children: Vec<Child> = (0..processes)
        .map(|_| Command::new(&program).arg("300").spawn())
        .collect::<Result<_, _>>()?;
    let mount = cgroup2_mount()?;
    let group = |class: &str| {
        format!(
            "/{}",
            agent
                .cgroup_root
                .join(class)
                .strip_prefix(&mount)
                .unwrap_or(Path::new(""))
                .display()
        )
    };
    let (dev, game) = (group("dev"), group("game"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !children.iter().all(|c| cgroup_of(c.id()) == dev) {
        if Instant::now() > deadline {
            bail!("the {processes} processes were not all placed in dev");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = monotonic_ns();
    std::fs::write(
        dir.join("override.toml"),
        "[[rules]]\nname = \"tool\"\nclass = \"game\"\nexe = [\"*/corral-bench-tool\"]\n",
    )?;
    let wrote = monotonic_ns();
    let status = loop {
        let status: serde_json::Value =
            serde_json::from_str(&corral(&agent.socket, &["status", "--json"])?)?;
        if status["last_reload"]["finished_ns"]
            .as_u64()
            .is_some_and(|t| t > before)
        {
            break status;
        }
        if monotonic_ns() - wrote > 10_000_000_000 {
            bail!("no reload within 10 s of the write");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let reload = &status["last_reload"];
    let finished = reload["finished_ns"].as_u64().unwrap_or(0);
    let misplaced = children
        .iter()
        .filter(|c| cgroup_of(c.id()) != game)
        .count();
    println!("bench reload: {processes} tracked processes re-classified by one policy edit");
    println!(
        "  file write -> all moves done: {:.1} ms (of which the reload itself: {:.1} ms; the agent waits {} ms for the editor to finish writing)",
        (finished.saturating_sub(wrote)) as f64 / 1e6,
        reload["duration_us"].as_u64().unwrap_or(0) as f64 / 1e3,
        20
    );
    println!(
        "  re-classified {}, moved {}, still in the old group afterwards: {misplaced}",
        reload["reclassified"], reload["moves"]
    );
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
