//! The `corral` command: parses the command line, hands each command to the
//! library (the agent, the control socket, the classifier, the cgroup
//! fail-safe) and prints the text `observe::views` renders for it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use corral::{
    actuate::cgroup,
    model::classify,
    model::cpus::CpuList,
    model::policy::{DefaultPolicy, PolicySource},
    model::procs::Table,
    observe::views,
    service::control::{self, Request, Response},
    service::daemon,
};
use serde::Serialize;

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
        /// Let exec and fork records wake the agent from BPF instead of
        /// listening on the kernel's proc connector (what a kernel without
        /// CONFIG_PROC_EVENTS gets). For tests and benchmarks.
        #[arg(long, hide = true)]
        no_proc_connector: bool,
        /// How to place processes: `systemd` (units and slices of each
        /// process's own manager), `cgroupfs` (corral's own cgroup subtree),
        /// or `auto`: systemd when it is the service manager.
        #[arg(long, value_enum, default_value_t = daemon::Backend::Auto)]
        backend: daemon::Backend,
    },
    /// Undo what a crashed agent may have left: thaw every group under the
    /// cgroup root and give every group all online CPUs. Moves nothing;
    /// the next `corral run` re-adopts what is in the groups; put back the
    /// cpufreq values the power fallback wrote. Safe to run any time (the
    /// service runs it after every stop).
    Recover {
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// The power fallback's restore record.
        #[arg(long, default_value = corral::actuate::power::RESTORE_RECORD)]
        power_record: PathBuf,
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
        /// Instead of JSON lines: each chain's class, then every rule in
        /// order against its last process, and the first matcher that failed.
        #[arg(long)]
        explain: bool,
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
        /// Also list every rule in order: whether it matched, and the first
        /// matcher that failed ("why is it not where I expected?").
        #[arg(long)]
        rules: bool,
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
        Command::Recover {
            cgroup_root,
            power_record,
        } => {
            // cpufreq first: it cannot fail half-way because of the rest.
            let power = corral::actuate::power::restore_record(&power_record);
            for line in power.as_deref().unwrap_or_default() {
                println!("{line}");
            }
            recover_systemd()?;
            recover(&cgroup_root.unwrap_or_else(cgroup::default_root))?;
            power.map(drop).context("putting back cpufreq values")
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
            backend,
            realtime,
            no_proc_connector,
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
                cgroup_root: cgroup_root.unwrap_or_else(cgroup::default_root),
                socket,
                dry_run,
                ring_bytes,
                proc_connector: !no_proc_connector,
                sweep_interval: std::time::Duration::from_millis(sweep_interval_ms.max(100)),
                backend,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(options))
        }
        Command::Classify {
            procs,
            policy,
            explain,
        } => {
            let policy = policy.source().load()?;
            let ananicy = daemon::load_ananicy(&policy);
            answer_chains(&procs, |recorded| {
                let d = classify::classify_chain(&policy, ananicy.as_ref(), &recorded.chain);
                if explain {
                    let rules = classify::explain_chain(&policy, &recorded.chain);
                    views::render_chain_explained(&recorded.id, &d, &rules)
                } else {
                    views::render_chain_json(&recorded.id, &d)
                }
            })
        }
        Command::Reload { socket } => match control::request(&socket, &Request::Reload)? {
            Response::Reloaded(r) if r.ok => {
                print!("{}", views::render_reload(&r));
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
        Command::Explain {
            pid,
            socket,
            json,
            rules,
        } => match control::request(&socket, &Request::Explain { pid, rules })? {
            Response::Explain(e) if json => print_json(&e),
            Response::Explain(e) => {
                print!("{}", views::render_explanation(&e));
                Ok(())
            }
            other => reply_error(other),
        },
        Command::Status { socket, json } => match control::request(&socket, &Request::Status)? {
            Response::Status(s) if json => print_json(&s),
            Response::Status(s) => {
                print!("{}", views::render_status(&s));
                Ok(())
            }
            other => reply_error(other),
        },
        Command::Placements { socket } => match control::request(&socket, &Request::Placements)? {
            Response::Placements { placements } => print_json(&placements),
            other => reply_error(other),
        },
    }
}

/// Answers each recorded chain in `procs` (`-`: standard input) with the
/// text `answer` gives it, as it is read, so every line before a bad one
/// is answered. The one reader for `classify` and `policy test --procs`.
fn answer_chains(
    procs: &Path,
    mut answer: impl FnMut(&classify::RecordedChain) -> String,
) -> anyhow::Result<()> {
    let reader: Box<dyn std::io::BufRead> = if procs == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(procs).with_context(|| format!("opening {}", procs.display()))?,
        ))
    };
    let mut out = std::io::stdout().lock();
    for chain in classify::recorded_chains(reader, &procs.display().to_string()) {
        out.write_all(answer(&chain?).as_bytes())?;
    }
    Ok(())
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", corral::observe::escape::to_json(value, true)?);
    Ok(())
}

fn reply_error(response: Response) -> anyhow::Result<()> {
    match response {
        // The agent's message may quote what a process or a client sent.
        Response::Error { message } => bail!("{}", corral::observe::escape::escape(&message)),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
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
                    let resolved = daemon::core_sets_here(&policy, &sysfs_root)?.0;
                    Ok((policy, resolved))
                });
            match checked {
                Ok((policy, resolved)) => {
                    for w in &policy.warnings {
                        eprintln!("warning: {w}");
                    }
                    print!("{}", views::render_policy_check(&file, &policy, &resolved));
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
            let (resolved, online) = daemon::core_sets_here(&policy, &sysfs_root)?;
            print!("{}", views::render_policy_show(&policy, &resolved, &online));
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
            let (resolved, _) = daemon::core_sets_here(&policy, &sysfs_root)?;
            let ananicy = daemon::load_ananicy(&policy);
            if let Some(procs) = procs {
                return answer_chains(&procs, |recorded| {
                    let d = classify::classify_chain(&policy, ananicy.as_ref(), &recorded.chain);
                    let cpus = resolved
                        .iter()
                        .find(|r| r.class == d.class)
                        .map(|r| &r.cpus);
                    views::render_chain_verdict(&recorded.id, &d, cpus)
                });
            }
            let root = cgroup_root.unwrap_or_else(cgroup::default_root);
            let mount = cgroup::cgroup2_mount_of(&root);
            let rel_root = format!("/{}", root.strip_prefix(&mount).unwrap_or(&root).display());
            let mut table = Table::snapshot(&policy.env_keys());
            classify::classify_table(&policy, ananicy.as_ref(), &mut table);
            print!(
                "{}",
                views::render_policy_test(&table, &resolved, &rel_root)
            );
            Ok(())
        }
    }
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

/// `corral recover`, systemd backend: put back every runtime property and
/// lift every affinity fence the restore log lists (a crashed agent could
/// not), then clear the log.
fn recover_systemd() -> anyhow::Result<()> {
    use corral::actuate::systemd::{RESTORE_LOG, RestoreLog, restore};
    let path = Path::new(RESTORE_LOG);
    let log = RestoreLog::read(path);
    if log == RestoreLog::default() {
        return Ok(());
    }
    let online: Vec<u32> = CpuList::online(Path::new("/sys"))
        .context("reading the online CPUs")?
        .iter()
        .collect();
    let done = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(restore(&log, &online));
    for line in &done {
        println!("{line}");
    }
    std::fs::write(path, b"{}").with_context(|| format!("clearing {}", path.display()))?;
    println!("restored {} systemd properties and fences", done.len());
    Ok(())
}

/// `corral recover`: thaw and widen every group under `root`.
fn recover(root: &Path) -> anyhow::Result<()> {
    if !root.exists() {
        print!("{}", views::render_nothing_to_recover(root));
        return Ok(());
    }
    let online = CpuList::online(Path::new("/sys")).context("reading the online CPUs")?;
    let report = cgroup::release_all(root, &online);
    print!("{}", views::render_recovery(root, &report, &online));
    if !report.errors.is_empty() {
        let errors: Vec<String> = report.errors.iter().map(|e| format!("  {e}")).collect();
        bail!(
            "could not release everything under {} (the rest was done):\n{}",
            root.display(),
            errors.join("\n")
        );
    }
    Ok(())
}
