//! The `corral` command: run the agent, ask it questions, or classify
//! process chains offline.

use std::{
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use corral::{
    model::classify,
    model::policy::{DefaultPolicy, Policy, PolicySource},
    model::procs::{ProcInfo, Table},
    service::control::{self, Request, Response},
    service::daemon,
};
use serde::{Deserialize, Serialize};

/// The shipped default policy, used when none is installed.
const BUILT_IN_POLICY: &str = include_str!("../../policies/default.toml");
const BUILT_IN_NAME: &str = "<built-in>/policies/default.toml";
/// Where packages install the shipped default.
const INSTALLED_DEFAULT: &str = "/usr/share/corral/default.toml";
/// The user's override; wins key by key.
const USER_OVERRIDE: &str = "/etc/corral/policy.toml";

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "Keeps games, renders, AI and dev work out of each other's way"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (as root): trace processes, classify and place them.
    /// With `--class CLASS -- CMD...`: start CMD directly in a class's
    /// group, with the class's environment from the policy.
    Run {
        /// Start a program in this class instead of running the agent.
        #[arg(long)]
        class: Option<String>,
        /// The program and its arguments, after `--`.
        #[arg(last = true)]
        program: Vec<String>,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Root of sysfs, where the CPU topology is read.
        #[arg(long, default_value = "/sys", hide = true)]
        sysfs_root: PathBuf,
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
        /// Run the agent's event loop at real-time priority (SCHED_FIFO 1),
        /// so a placement never waits behind a busy CPU. Opt-in: the kernel's
        /// RT throttling still leaves other work 5% should the agent spin.
        #[arg(long)]
        realtime: bool,
        /// How often /proc is swept for processes whose events were missed
        /// (also right after the kernel reports dropped events).
        #[arg(long, default_value_t = 10_000)]
        sweep_interval_ms: u64,
    },
    /// Undo what a crashed agent may have left: thaw every group under the
    /// cgroup root and give every group all online CPUs. Moves nothing;
    /// the next `corral run` re-adopts what is in the groups. Safe to run
    /// any time (the service runs it after every stop).
    Recover {
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
    },
    /// Print the manual page (roff) generated from these definitions.
    #[command(hide = true)]
    Man,
    /// Classify process chains from JSON lines without an agent or root.
    Classify {
        /// JSON lines: {"id": "...", "chain": [process, ...]}, ancestors
        /// first; `-` for standard input.
        #[arg(long)]
        procs: PathBuf,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Ask the running agent to re-read its policy now (also: SIGHUP; the
    /// agent also reloads by itself when the files change).
    Reload {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Check, try out or show a policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
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
    /// A live view by class: CPU, run-queue latency, core sets, placements.
    Top {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Every exec'd process placed so far, with its kernel exec time and
    /// placement time (JSON; used by `cargo xtask bench exec`).
    #[command(hide = true)]
    Placements {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

/// Which policy files to use.
#[derive(clap::Args)]
struct PolicyArgs {
    /// The base policy (default: /usr/share/corral/default.toml if
    /// installed, else the built-in copy of policies/default.toml).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The user's override, which wins key by key; a missing file is fine.
    #[arg(long, default_value = USER_OVERRIDE)]
    r#override: PathBuf,
    /// Use only --policy, without the override.
    #[arg(long)]
    no_override: bool,
}

impl PolicyArgs {
    fn source(&self) -> PolicySource {
        let default = match &self.policy {
            Some(path) => DefaultPolicy::File(path.clone()),
            None if Path::new(INSTALLED_DEFAULT).exists() => {
                DefaultPolicy::File(INSTALLED_DEFAULT.into())
            }
            None => DefaultPolicy::BuiltIn(BUILT_IN_NAME, BUILT_IN_POLICY),
        };
        PolicySource {
            default,
            override_path: (!self.no_override).then(|| self.r#override.clone()),
        }
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate FILE as an override of the shipped default (or alone with
    /// --standalone) and resolve its core sets on this machine. Exit 0 if
    /// it would be accepted, 1 if not.
    Check {
        file: PathBuf,
        #[arg(long)]
        standalone: bool,
        #[arg(long, default_value = "/sys", hide = true)]
        sysfs_root: PathBuf,
    },
    /// What would move where under FILE (as an override of the shipped
    /// default, or alone with --standalone): on the live process table, or
    /// on recorded chains with --procs.
    Test {
        file: PathBuf,
        #[arg(long)]
        standalone: bool,
        #[arg(long)]
        procs: Option<PathBuf>,
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        #[arg(long, default_value = "/sys", hide = true)]
        sysfs_root: PathBuf,
    },
    /// What each class resolves to on this machine, and why.
    Show {
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long, default_value = "/sys")]
        sysfs_root: PathBuf,
    },
}

/// The policy a `policy check/test FILE` is about.
fn candidate(file: &Path, standalone: bool) -> PolicySource {
    let base = PolicyArgs {
        policy: None,
        r#override: file.to_owned(),
        no_override: false,
    }
    .source();
    if standalone {
        PolicySource {
            default: DefaultPolicy::File(file.to_owned()),
            override_path: None,
        }
    } else {
        base
    }
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
        Command::Run {
            class: Some(class),
            program,
            socket,
            ..
        } => run_in_class(&class, &program, &socket),
        Command::Recover { cgroup_root } => {
            recover(&cgroup_root.unwrap_or_else(corral::actuate::cgroup::default_root))
        }
        Command::Man => {
            use clap::CommandFactory as _;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Run {
            class: None,
            policy,
            sysfs_root,
            cgroup_root,
            socket,
            dry_run,
            ring_buffer_kib,
            nice,
            sweep_interval_ms,
            realtime,
            ..
        } => {
            if realtime {
                let param = libc::sched_param { sched_priority: 1 };
                // SAFETY: sched_setscheduler on our own thread with a valid param.
                if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                    tracing::warn!(
                        "could not switch to SCHED_FIFO: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
            // SAFETY: setpriority on our own process.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
                tracing::warn!(
                    nice,
                    "could not set the agent's nice value: {}",
                    std::io::Error::last_os_error()
                );
            }
            let ring_bytes = ring_buffer_kib
                .checked_mul(1024)
                .filter(|b| b.is_power_of_two() && *b >= 4096)
                .ok_or_else(|| anyhow!("--ring-buffer-kib must be a power of two, at least 4"))?;
            let options = daemon::Options {
                source: policy.source(),
                sysfs_root,
                cgroup_root: cgroup_root.unwrap_or_else(corral::actuate::cgroup::default_root),
                socket,
                dry_run,
                ring_bytes,
                sweep_interval: std::time::Duration::from_millis(sweep_interval_ms.max(100)),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(options))
        }
        Command::Classify { procs, policy } => classify_offline(&procs, &policy.source().load()?),
        Command::Reload { socket } => match control::request(&socket, &Request::Reload)? {
            Response::Reloaded(r) if r.ok => {
                println!(
                    "reloaded: {} processes re-classified, {} moved, in {} us",
                    r.reclassified, r.moves, r.duration_us
                );
                if !r.message.is_empty() {
                    println!("{}", r.message);
                }
                Ok(())
            }
            Response::Reloaded(r) => bail!(
                "reload refused, the agent keeps its last good policy:\n{}",
                r.message
            ),
            other => reply_error(other),
        },
        Command::Policy { command } => policy_command(command),
        Command::Top {
            socket,
            interval_ms,
        } => corral::observe::top::run(
            &socket,
            std::time::Duration::from_millis(interval_ms.max(100)),
        ),
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

fn classify_offline(procs: &Path, policy: &Policy) -> anyhow::Result<()> {
    let ananicy = daemon::load_ananicy(policy);
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
            bail!(
                "{}:{}: `chain` is empty; list ancestors first and the process last",
                procs.display(),
                number + 1
            );
        }
        let decision = classify::classify_chain(policy, ananicy.as_ref(), &input.chain);
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
            println!(
                "  rule      {} ({source}), inherited from pid {} ({})",
                d.rule, a.pid, a.comm
            )
        }
        (None, _) => println!("  rule      {} (no rule matched; left alone)", d.rule),
    }
    match (&e.group, &e.class_cpus) {
        (Some(group), Some(cpus)) => println!("  group     {group}  cpus {cpus}"),
        _ => println!("  group     none (class `{}` is not managed)", d.class),
    }
    println!("  cgroup    {} (now)", e.cgroup_now);
    println!("  cpus      {} (Cpus_allowed_list now)", e.cpus_allowed);
    if let Some(bytes) = e.vram_bytes {
        println!("  vram      {} MiB", bytes >> 20);
    }
    for a in &e.gpu_actions {
        println!(
            "  gpu       {} on `{}`: {} -> {}",
            a.kind, a.class, a.reason, a.outcome
        );
    }
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
        if s.cpuset_enforced {
            "enforced"
        } else {
            "NOT enforced: no cpuset controller"
        },
        if s.dry_run { "  DRY RUN" } else { "" }
    )?;
    writeln!(
        out,
        "{:<8} {:>6} {:>10} {:>8} {:>7}  cgroup",
        "class", "procs", "cpus", "weight", "placed"
    )?;
    for c in &s.classes {
        writeln!(
            out,
            "{:<8} {:>6} {:>10} {:>8} {:>7}  {}",
            c.class,
            c.processes,
            c.cpus.as_deref().unwrap_or("dynamic"),
            c.cpu_weight
                .map(|w| w.to_string())
                .unwrap_or_else(|| "-".into()),
            c.placements,
            c.cgroup.as_deref().unwrap_or("(left alone)")
        )?;
        if let Some(note) = &c.note {
            writeln!(out, "{:<8} note: {note}", "")?;
        }
    }
    writeln!(out, "mode    {} ({})", s.mode, s.mode_why)?;
    match (&s.gpu.on, &s.gpu.off_reason) {
        (true, _) => {
            let used: Vec<String> = s
                .gpu
                .vram_by_class
                .iter()
                .map(|(c, b)| format!("{c} {} MiB", b >> 20))
                .collect();
            writeln!(
                out,
                "gpu     on; VRAM by class: {}",
                if used.is_empty() {
                    "-".into()
                } else {
                    used.join(", ")
                }
            )?;
            if let Some(a) = s.gpu.actions.last() {
                writeln!(
                    out,
                    "        last action: {} on `{}`: {} -> {}",
                    a.kind, a.class, a.reason, a.outcome
                )?;
            }
        }
        (false, Some(reason)) => writeln!(out, "gpu     off: {reason}")?,
        (false, None) => writeln!(out, "gpu     waiting for the first NVML poll")?,
    }
    if let Some(reload) = s.last_reload.as_ref().filter(|r| !r.ok) {
        writeln!(
            out,
            "reload  REFUSED, last good policy kept: {}",
            reload.message
        )?;
    }
    let e = &s.events;
    writeln!(
        out,
        "events  exec {} fork {} exit {}  seen; dropped {} (ring buffer full), vanished {}, move errors {}, tracked {}",
        e.exec, e.fork, e.exit, s.kernel.dropped, e.vanished, e.move_errors, s.tracked
    )?;
    Ok(())
}

fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check {
            file,
            standalone,
            sysfs_root,
        } => {
            let source = candidate(&file, standalone);
            let checked = source
                .load()
                .map_err(anyhow::Error::from)
                .and_then(|policy| {
                    let resolved = daemon::resolve(&policy, &sysfs_root)?.0;
                    Ok((policy, resolved))
                });
            match checked {
                Ok((policy, resolved)) => {
                    for w in &policy.warnings {
                        eprintln!("warning: {w}");
                    }
                    println!("{}: ok ({} rules)", file.display(), policy.rules.len());
                    for r in resolved {
                        println!("  {:<8} cpus {:<12} {}", r.class, r.cpus.to_string(), r.why);
                    }
                    Ok(())
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::exit(1);
                }
            }
        }
        PolicyCommand::Show { policy, sysfs_root } => {
            let policy = policy.source().load()?;
            let (resolved, online) = daemon::resolve(&policy, &sysfs_root)?;
            println!(
                "policy {}  (this machine: {} CPUs online: {online})",
                policy.describe_files(),
                online.len()
            );
            for class in policy.classes.values() {
                match resolved.iter().find(|r| r.class == class.name) {
                    Some(r) => println!(
                        "  {:<8} cpus {:<12} weight {:<5} {}",
                        r.class,
                        r.cpus.to_string(),
                        class.cpu_weight,
                        r.why
                    ),
                    None => println!(
                        "  {:<8} cpus {:<12} left alone: the kernel schedules it",
                        class.name, "dynamic"
                    ),
                }
            }
            println!(
                "  modes: game cores protected while a game runs; shared again {} ms after the last game (min {} ms between switches)",
                policy.modes.hold_down.as_millis(),
                policy.modes.min_dwell.as_millis()
            );
            Ok(())
        }
        PolicyCommand::Test {
            file,
            standalone,
            procs,
            cgroup_root,
            sysfs_root,
        } => {
            let policy = candidate(&file, standalone).load()?;
            let (resolved, _) = daemon::resolve(&policy, &sysfs_root)?;
            let ananicy = daemon::load_ananicy(&policy);
            let cpus_of = |class: &str| {
                resolved
                    .iter()
                    .find(|r| r.class == class)
                    .map(|r| r.cpus.to_string())
            };
            if let Some(procs) = procs {
                return policy_test_chains(&procs, &policy, ananicy.as_ref(), &cpus_of);
            }
            let root = cgroup_root.unwrap_or_else(corral::actuate::cgroup::default_root);
            let mount = corral::actuate::cgroup::cgroup2_mount_of(&root);
            let rel_root = format!("/{}", root.strip_prefix(&mount).unwrap_or(&root).display());
            let table = Table::snapshot(&policy.env_keys());
            let mut decisions: std::collections::HashMap<u32, classify::Decision> =
                Default::default();
            let mut moves = 0;
            for pid in table.parents_first() {
                let Some(process) = table.get(pid) else {
                    continue;
                };
                let ancestors = table.ancestors(pid);
                let infos: Vec<&ProcInfo> = ancestors
                    .iter()
                    .filter_map(|a| table.get(*a).map(|p| &p.info))
                    .collect();
                let parent = ancestors.last().and_then(|a| decisions.get(a));
                let d = classify::classify_one(
                    &policy,
                    ananicy.as_ref(),
                    &process.info,
                    &infos,
                    parent,
                );
                let target = cpus_of(&d.class).map(|_| format!("{rel_root}/{}", d.class));
                let now = &process.info.cgroup;
                if let Some(target) = &target
                    && target != now
                {
                    moves += 1;
                    println!(
                        "{pid:>7} {:<16} {now} -> {target} (cpus {}) by {}",
                        process.info.comm,
                        cpus_of(&d.class).unwrap_or_default(),
                        d.rule
                    );
                }
                decisions.insert(pid, d);
            }
            println!("{moves} of {} processes would move", table.len());
            Ok(())
        }
    }
}

fn policy_test_chains(
    procs: &Path,
    policy: &Policy,
    ananicy: Option<&corral::model::ananicy::AnanicyRules>,
    cpus_of: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(procs).with_context(|| format!("reading {}", procs.display()))?;
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let input: ChainInput = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a chain object", procs.display(), number + 1))?;
        let d = classify::classify_chain(policy, ananicy, &input.chain);
        let id = input
            .id
            .as_str()
            .map_or_else(|| input.id.to_string(), str::to_owned);
        match cpus_of(&d.class) {
            Some(cpus) => println!("{id}: {} (cpus {cpus}) by {}", d.class, d.rule),
            None => println!("{id}: {} (left alone) by {}", d.class, d.rule),
        }
    }
    Ok(())
}

/// `corral run --class CLASS -- CMD...`: the agent moves this process into
/// the class's group, then it becomes CMD, so CMD never runs outside it.
fn run_in_class(class: &str, program: &[String], socket: &PathBuf) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let Some((cmd, args)) = program.split_first() else {
        bail!("nothing to run: `corral run --class {class} -- PROGRAM [ARGS...]`");
    };
    match control::request(
        socket,
        &Request::Enter {
            class: class.to_owned(),
        },
    )? {
        Response::Entered { env, .. } => {
            let err = std::process::Command::new(cmd).args(args).envs(&env).exec();
            bail!("could not run {cmd}: {err}")
        }
        other => reply_error(other),
    }
}

/// `corral recover`: thaw and widen every group under `root`.
fn recover(root: &Path) -> anyhow::Result<()> {
    if !root.exists() {
        println!("{}: nothing to recover (no such cgroup)", root.display());
        return Ok(());
    }
    let thawed = corral::actuate::cgroup::thaw_all_under(root)
        .with_context(|| format!("thawing the groups under {}", root.display()))?;
    let online = corral::model::cpus::CpuList::online(Path::new("/sys"))?;
    let mut widened = 0;
    for entry in std::fs::read_dir(root)?
        .flatten()
        .filter(|e| e.path().is_dir())
    {
        let cpus = entry.path().join("cpuset.cpus");
        if cpus.exists() {
            std::fs::write(&cpus, online.to_string())
                .with_context(|| format!("writing {}", cpus.display()))?;
            widened += 1;
        }
    }
    println!(
        "{}: thawed {thawed} groups, gave {widened} groups all CPUs ({online})",
        root.display()
    );
    Ok(())
}
