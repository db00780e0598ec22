//! The `corral` command: run the agent, ask it questions, or classify
//! process chains offline.

use std::{
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use corral::{
    classify,
    control::{self, Request, Response},
    daemon,
    policy::Policy,
    procs::ProcInfo,
};
use serde::{Deserialize, Serialize};

/// The shipped default policy, used when no policy file is installed.
const BUILT_IN_POLICY: &str = include_str!("../../policies/default.toml");
const BUILT_IN_NAME: &str = "<built-in>/policies/default.toml";
/// Where an installed policy is looked for, in order.
const POLICY_PATHS: &[&str] = &["/etc/corral/policy.toml", "/usr/share/corral/default.toml"];

#[derive(Parser)]
#[command(name = "corral", version, about = "Keeps games, renders, AI and dev work out of each other's way")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (as root): trace processes, classify and place them.
    Run {
        /// Policy file (default: /etc/corral/policy.toml, then
        /// /usr/share/corral/default.toml, then the built-in default).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Directory in the cgroup2 hierarchy that corral manages
        /// (default: `corral` at the top of the cgroup2 mount).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Classify and log what would move where, without moving anything.
        #[arg(long)]
        dry_run: bool,
        /// Ring buffer size for kernel events, in KiB (a power of two).
        #[arg(long, default_value_t = 1024)]
        ring_buffer_kib: u32,
        /// Nice value the agent runs at: placement latency depends on the
        /// agent getting a CPU quickly when a game starts. 0 to opt out.
        #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
        nice: i32,
    },
    /// Classify process chains from JSON lines without an agent or root.
    Classify {
        /// JSON lines: {"id": "...", "chain": [process, ...]}, ancestors
        /// first; `-` for standard input.
        #[arg(long)]
        procs: PathBuf,
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Why a process is in its class, its group and its CPUs.
    Explain {
        pid: u32,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Per class: processes, group, CPUs, placements; event counters.
    Status {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Every exec'd process placed so far, with its kernel exec time and
    /// placement time (JSON; used by `cargo xtask bench exec`).
    #[command(hide = true)]
    Placements {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run { policy, cgroup_root, socket, dry_run, ring_buffer_kib, nice } => {
            // SAFETY: setpriority on our own process.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
                tracing::warn!(nice, "could not set the agent's nice value: {}", std::io::Error::last_os_error());
            }
            let policy = load_policy(policy.as_deref())?;
            let ring_bytes = ring_buffer_kib
                .checked_mul(1024)
                .filter(|b| b.is_power_of_two() && *b >= 4096)
                .ok_or_else(|| anyhow!("--ring-buffer-kib must be a power of two, at least 4"))?;
            let options = daemon::Options {
                policy,
                cgroup_root: cgroup_root.unwrap_or_else(corral::place::default_root),
                socket,
                dry_run,
                ring_bytes,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(options))
        }
        Command::Classify { procs, policy } => classify_offline(&procs, policy.as_deref()),
        Command::Explain { pid, socket, json } => {
            match control::request(&socket, &Request::Explain { pid })? {
                Response::Explain(e) if json => print_json(&e),
                Response::Explain(e) => print_explanation(&e),
                other => reply_error(other),
            }
        }
        Command::Status { socket, json } => match control::request(&socket, &Request::Status)? {
            Response::Status(s) if json => print_json(&s),
            Response::Status(s) => print_status(&s),
            other => reply_error(other),
        },
        Command::Placements { socket } => match control::request(&socket, &Request::Placements)? {
            Response::Placements { placements } => print_json(&placements),
            other => reply_error(other),
        },
    }
}

fn load_policy(path: Option<&Path>) -> anyhow::Result<Policy> {
    if let Some(path) = path {
        return Ok(Policy::load(path)?);
    }
    for candidate in POLICY_PATHS {
        if Path::new(candidate).exists() {
            return Ok(Policy::load(Path::new(candidate))?);
        }
    }
    Ok(Policy::parse(Path::new(BUILT_IN_NAME), BUILT_IN_POLICY)?)
}

#[derive(Deserialize)]
struct ChainInput {
    id: serde_json::Value,
    chain: Vec<ProcInfo>,
}

#[derive(Serialize)]
struct ChainOutput<'a> {
    id: &'a serde_json::Value,
    class: &'a str,
    rule: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    /// Index in the chain of the ancestor the class came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    inherited_from: Option<usize>,
}

fn classify_offline(procs: &Path, policy: Option<&Path>) -> anyhow::Result<()> {
    let policy = load_policy(policy)?;
    let reader: Box<dyn std::io::BufRead> = if procs == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(procs).with_context(|| format!("opening {}", procs.display()))?,
        ))
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (number, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let input: ChainInput = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a chain object", procs.display(), number + 1))?;
        if input.chain.is_empty() {
            bail!("{}:{}: `chain` is empty; list ancestors first and the process last", procs.display(), number + 1);
        }
        let decision = classify::classify_chain(&policy, &input.chain);
        let output = ChainOutput {
            id: &input.id,
            class: &decision.class,
            rule: &decision.rule,
            source: decision.source.as_deref(),
            inherited_from: decision.inherited_from.as_ref().map(|a| a.depth),
        };
        writeln!(out, "{}", serde_json::to_string(&output)?)?;
    }
    Ok(())
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn reply_error(response: Response) -> anyhow::Result<()> {
    match response {
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn print_explanation(e: &control::Explanation) -> anyhow::Result<()> {
    let d = &e.decision;
    println!("pid {} ({})  {}", e.pid, e.comm, e.exe);
    println!("  argv      {}", e.argv.join(" "));
    println!("  class     {}", d.class);
    match (&d.source, &d.inherited_from) {
        (Some(source), None) => println!("  rule      {} ({source})", d.rule),
        (Some(source), Some(a)) => {
            println!("  rule      {} ({source}), inherited from pid {} ({})", d.rule, a.pid, a.comm)
        }
        (None, _) => println!("  rule      {} (no rule matched; left alone)", d.rule),
    }
    match (&e.group, &e.class_cpus) {
        (Some(group), Some(cpus)) => println!("  group     {group}  cpus {cpus}"),
        _ => println!("  group     none (class `{}` is not managed)", d.class),
    }
    println!("  cgroup    {} (now)", e.cgroup_now);
    println!("  cpus      {} (Cpus_allowed_list now)", e.cpus_allowed);
    if !e.ancestry.is_empty() {
        println!("  ancestry");
        for a in &e.ancestry {
            println!("    {:>7} {:<16} {:<8} {}", a.pid, a.comm, a.class, a.rule);
        }
    }
    Ok(())
}

fn print_status(s: &control::Status) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "policy  {}", s.policy)?;
    writeln!(
        out,
        "cgroups {}  (core sets {}){}",
        s.cgroup_root,
        if s.cpuset_enforced { "enforced" } else { "NOT enforced: no cpuset controller" },
        if s.dry_run { "  DRY RUN" } else { "" }
    )?;
    writeln!(out, "{:<8} {:>6} {:>10} {:>8} {:>7}  cgroup", "class", "procs", "cpus", "weight", "placed")?;
    for c in &s.classes {
        writeln!(
            out,
            "{:<8} {:>6} {:>10} {:>8} {:>7}  {}",
            c.class,
            c.processes,
            c.cpus.as_deref().unwrap_or("dynamic"),
            c.cpu_weight.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
            c.placements,
            c.cgroup.as_deref().unwrap_or("(left alone)")
        )?;
        if let Some(note) = &c.note {
            writeln!(out, "{:<8} note: {note}", "")?;
        }
    }
    let e = &s.events;
    writeln!(
        out,
        "events  exec {} fork {} exit {}  seen; dropped {} (ring buffer full), vanished {}, move errors {}, tracked {}",
        e.exec, e.fork, e.exit, s.kernel.dropped, e.vanished, e.move_errors, s.tracked
    )?;
    Ok(())
}
