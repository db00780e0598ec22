//! The runner: sets the machine up, turns every source (ring buffer,
//! timers, signals, control socket, policy files, the NVML poller) into an
//! [`Event`] for [`Agent::handle`], and carries out the [`Effect`]s it
//! returns (sd_notify, metrics rendering, leaving the loop).

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use corral_common::EventKind;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::SignalKind,
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

pub use super::agent::{Agent, Effect, Event, Notice, ReloadCause, core_sets_here, load_ananicy};
pub use super::agent_views::cpus_allowed;
use super::ticker::Ticker;
use crate::{
    actuate::{
        Placer,
        cgroup::Groups,
        power::{Power, PowerEnv},
        systemd::SystemdPlacer,
    },
    kernel::{
        bpf::{self, Tracer, Wake},
        doorbell::{self, Doorbell, Rings},
    },
    model::{policy::PolicySource, procs::LiveProcs},
    observe::metrics,
    service::{control, desktop_notify, gamemode_bus},
};

/// How long file events are collected before one reload: editors write a
/// file in several steps.
const RELOAD_SETTLE: Duration = Duration::from_millis(20);

pub struct Options {
    pub source: PolicySource,
    pub sysfs_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub socket: PathBuf,
    pub dry_run: bool,
    pub ring_bytes: u32,
    /// Listen on the proc connector for execs and forks (else the BPF
    /// records wake the loop).
    pub proc_connector: bool,
    /// How often /proc is swept for processes whose events were missed.
    pub sweep_interval: Duration,
    /// How processes are placed: through systemd, or corral's own cgroupfs
    /// subtree.
    pub backend: Backend,
}

/// The placement backend `corral run` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// systemd when it is the service manager (/run/systemd/system), else
    /// cgroupfs.
    Auto,
    /// Through systemd's managers: units, slices, runtime properties.
    Systemd,
    /// corral's own subtree of the cgroup2 hierarchy (hosts without
    /// systemd: OpenRC, runit, containers).
    Cgroupfs,
}

impl Backend {
    /// The backend this host gets.
    pub fn resolve(self) -> Backend {
        match self {
            Backend::Auto if crate::actuate::systemd::systemd_booted() => Backend::Systemd,
            Backend::Auto => Backend::Cgroupfs,
            chosen => chosen,
        }
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Watches the directories of the policy files; sends `Event::Reload`-worthy
/// notifications on `tx` when one of the files is written, moved in or
/// removed.
fn watch_policy(files: Vec<PathBuf>, tx: mpsc::Sender<()>) -> anyhow::Result<()> {
    use super::inotify_events::next_event;
    use inotify::{Inotify, WatchMask};
    let inotify = Inotify::init().context("inotify")?;
    let mut dirs = BTreeSet::new();
    for file in &files {
        if let Some(dir) = file.parent().filter(|d| d.is_dir()) {
            dirs.insert(dir.to_owned());
        } else {
            info!(file = %file.display(), "its directory does not exist yet: create it, then `corral reload`");
        }
    }
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM;
    for dir in &dirs {
        inotify
            .watches()
            .add(dir, mask)
            .with_context(|| format!("watching {}", dir.display()))?;
    }
    let names: BTreeSet<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(Into::into))
        .collect();
    let mut stream = inotify.into_event_stream(vec![0u8; 4096])?;
    tokio::spawn(async move {
        while let Some(name) = next_event(&mut stream).await {
            if name.as_ref().is_some_and(|n| names.contains(n)) && tx.send(()).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Runs the agent until SIGINT or SIGTERM: turns every source into an
/// [`Event`], lets [`Agent::handle`] decide, and carries out the effects.
pub async fn run(options: Options) -> anyhow::Result<()> {
    raise_descriptor_limit();
    let policy = options.source.load()?;
    for w in &policy.warnings {
        warn!("{w}");
    }
    let (resolved, online) = core_sets_here(&policy, &options.sysfs_root)?;
    let placer: Box<dyn Placer> = match options.backend.resolve() {
        Backend::Systemd if !options.dry_run => {
            info!("systemd is the service manager: placing through its units and slices");
            let log = PathBuf::from(crate::actuate::systemd::RESTORE_LOG);
            if let Some(dir) = log.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            Box::new(SystemdPlacer::start(&policy, &resolved, online, log)?)
        }
        _ => {
            let groups = Groups::setup(
                &options.cgroup_root,
                &policy,
                &resolved,
                online,
                options.dry_run,
            )?;
            // A crashed agent may have left a group frozen: never keep it
            // so. (Core sets were just written by setup; widening here
            // would undo them behind the layout's back.)
            if !options.dry_run {
                match crate::actuate::cgroup::thaw_all_under(&options.cgroup_root) {
                    Ok(0) => {}
                    Ok(n) => info!(groups = n, "thawed groups a crashed agent left frozen"),
                    Err(e) => warn!("could not thaw every group: {e}"),
                }
            }
            Box::new(groups)
        }
    };
    // Execs and forks ring the proc connector right after their records
    // are written; without it, the records wake the loop themselves (at a
    // higher cost to the process that execs, see `kernel::doorbell`).
    let doorbell = match options.proc_connector.then(Doorbell::open) {
        None => None,
        Some(Ok(doorbell)) => Some(doorbell),
        Some(Err(e)) => {
            info!("no proc connector ({e}): exec and fork records wake the agent from BPF");
            None
        }
    };
    let woken_by = if doorbell.is_some() {
        Wake::Doorbell
    } else {
        Wake::Ring
    };
    // Attach before seeding, so nothing started in between is missed.
    let (tracer, events) = Tracer::load(options.ring_bytes, woken_by)?;
    let watched = options.source.watched_files();
    let gpu_config = policy.gpu.clone();
    let metrics_addr = policy.telemetry.metrics_addr;
    // Puts back cpufreq values a crashed agent left, then waits for requests.
    let (power_tx, mut power_rx) = mpsc::channel(8);
    let power_env = PowerEnv {
        sysfs_root: options.sysfs_root.clone(),
        ..PowerEnv::system()
    };
    let power = Power::new(policy.power, power_env).spawn(power_tx);
    let dry_run = options.dry_run;
    let mut agent = Agent::new(
        options.source,
        options.sysfs_root,
        policy,
        placer,
        Box::new(LiveProcs::new(crate::actuate::cgroup::cgroup2_mount())),
        Some(tracer),
    );
    let (gpu_tx, mut gpu_rx) = mpsc::channel(8);
    let _poller = gpu_config.enabled.then(|| {
        crate::gpu::nvml::spawn_poller(gpu_config.library.clone(), gpu_config.poll_interval, gpu_tx)
    });
    let (control_tx, mut control_rx) = mpsc::channel(64);
    let server = control::serve(&options.socket, control_tx, control::Limits::default())?;
    // GameMode on every logged-in user's session bus (none: nothing to do).
    let (gamemode_tx, mut gamemode_rx) = mpsc::channel(64);
    let buses = gamemode_bus::Buses::spawn(PathBuf::from("/run/user"), gamemode_tx);
    let (file_tx, mut file_rx) = mpsc::channel(16);
    if let Err(e) = watch_policy(watched, file_tx) {
        warn!("policy files are not watched ({e:#}); reload with SIGHUP or `corral reload`");
    }
    // SAFETY: the ring buffer owns its fd and outlives the registration
    // (both live until this function returns).
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let doorbell = doorbell
        // SAFETY: the doorbell owns its socket and outlives the
        // registration (both live until this function returns).
        .map(|doorbell| unsafe { AsyncFd::register(doorbell) })
        .transpose()
        .context("polling the proc connector")?;
    // Each scrape asks the loop for the page, and the loop renders it from
    // its own state (scrapes never touch it): nothing is rendered, and no
    // group's pressure is read, while nobody scrapes.
    let (scrape_tx, mut scrape_rx) = mpsc::channel::<oneshot::Sender<String>>(8);
    let metrics_server = match metrics_addr {
        Some(addr) => {
            let ask = move || {
                let scrapes = scrape_tx.clone();
                async move {
                    let (reply, page) = oneshot::channel();
                    scrapes.send(reply).await.ok()?;
                    page.await.ok()
                }
            };
            match metrics::serve(addr, ask).await {
                Ok((bound, handle)) => {
                    info!(%bound, "metrics at http://{bound}/metrics");
                    agent.metrics_bound = Some(bound);
                    Some(handle)
                }
                Err(e) => {
                    warn!("metrics endpoint off: {e:#}");
                    None
                }
            }
        }
        None => None,
    };
    let notifier = crate::service::notify::Notifier::from_env();
    let carry_out = |effects: Vec<Effect>| -> bool {
        let mut go_on = true;
        for effect in effects {
            match effect {
                Effect::Notify(Notice::Ready { status }) => notifier.ready(&status),
                Effect::Notify(Notice::Reloading) => notifier.reloading(),
                Effect::Notify(Notice::Watchdog) => notifier.watchdog(),
                Effect::Notify(Notice::Stopping) => notifier.stopping(),
                Effect::Power(request) if dry_run => {
                    info!(?request, "dry run: the power profile is left as it is");
                }
                Effect::Power(request) => power.send(request),
                Effect::Desktop { uid, notification } => desktop_notify::spawn(
                    PathBuf::from(desktop_notify::RUNTIME_ROOT),
                    uid,
                    notification,
                ),
                Effect::GameMode(signal) => buses.deliver(signal),
                Effect::Exit => go_on = false,
            }
        }
        go_on
    };
    let effects = agent.handle(Event::Seed);
    carry_out(effects);
    // Loading the programs parsed the kernel's BTF (megabytes) and the seed
    // read all of /proc: hand the freed heap back before the long run.
    give_back_free_heap();
    // The slow ticks are timerfds: one wake-up a period (see `ticker`).
    let mut counters = Ticker::every(Duration::from_secs(1)).context("a timerfd")?;
    let mut sweeps = Ticker::every(options.sweep_interval).context("a timerfd")?;
    // Fed from the loop itself, so a stuck loop stops feeding it.
    let mut watchdog =
        tokio::time::interval(notifier.watchdog_every.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    info!(
        socket = %options.socket.display(),
        root = %agent.layout().root.display(),
        dry_run = options.dry_run,
        "corral is running"
    );
    // One timer for the mode's next deadline, moved only when it changes
    // (a new sleep per pass would re-enter the timer wheel every record).
    let mode_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(mode_timer);
    let mut armed_for: Option<Instant> = None;
    loop {
        let deadline = agent.mode_deadline();
        if deadline != armed_for {
            if let Some(at) = deadline {
                mode_timer.as_mut().reset(at.into());
            }
            armed_for = deadline;
        }
        // Polled in this order, so a pass that kernel records woke polls
        // only the ring. Nothing waits behind it for long: a drained ring
        // is not ready again until the runtime next polls the kernel, so
        // the pass after a drain polls every other source (each of them is
        // cancel-safe).
        let effects = tokio::select! {
            biased;
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let effects = drain(guard.get_inner_mut(), &mut agent);
                guard.clear_ready();
                effects
            }
            rung = rung(doorbell.as_ref()) => {
                let rings = rung.context("reading the proc connector")?;
                drain_rung(events.get_mut(), &mut agent, rings.forks)
            }
            _ = sigterm.recv() => agent.handle(Event::Stop),
            _ = sigint.recv() => agent.handle(Event::Stop),
            Some(event) = gpu_rx.recv() => agent.handle(Event::Gpu(event)),
            Some(status) = power_rx.recv() => agent.handle(Event::Power(status)),
            Some(incoming) = control_rx.recv() => agent.handle(Event::Control(incoming)),
            Some(reply) = scrape_rx.recv() => {
                let _ = reply.send(agent.metrics().render());
                Vec::new()
            }
            Some(incoming) = gamemode_rx.recv() => agent.handle(Event::GameMode(incoming)),
            Some(()) = file_rx.recv() => {
                // Let the editor finish, then reload once for the burst.
                tokio::time::sleep(RELOAD_SETTLE).await;
                while file_rx.try_recv().is_ok() {}
                agent.handle(Event::Reload(ReloadCause::FileChanged))
            }
            _ = sighup.recv() => agent.handle(Event::Reload(ReloadCause::Signal)),
            _ = &mut mode_timer, if armed_for.is_some() => {
                armed_for = None;
                agent.handle(Event::ModeTimer)
            }
            _ = watchdog.tick() => agent.handle(Event::WatchdogTick),
            ticked = sweeps.tick() => {
                ticked.context("the sweep timer")?;
                // What an exec storm's processes took is free once they are
                // gone: memory stays flat after one.
                give_back_free_heap();
                agent.handle(Event::SweepTick)
            }
            ticked = counters.tick() => {
                ticked.context("the counters timer")?;
                // Exit records do not wake the loop: they are read here
                // when no exec or fork came to read them first.
                let mut effects = drain(events.get_mut(), &mut agent);
                effects.extend(agent.handle(Event::CountersTick));
                effects
            }
        };
        if !carry_out(effects) {
            break;
        }
    }
    // The Release the Stop asked for, carried out before leaving.
    power.finish(Duration::from_secs(3)).await;
    server.abort();
    if let Some(handle) = metrics_server {
        handle.abort();
    }
    let _ = std::fs::remove_file(&options.socket);
    Ok(())
}

/// Waits for the doorbell to ring and takes its messages (never, without
/// one). Readiness is cleared only after a read that emptied the socket:
/// a message that comes later is a new edge for the runtime's epoll.
async fn rung(doorbell: Option<&AsyncFd<Doorbell>>) -> std::io::Result<Rings> {
    let Some(doorbell) = doorbell else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = doorbell.readable().await?;
        match guard.get_inner().take() {
            Ok(rings) => {
                // A short batch emptied the socket; a full one may have
                // left some, read on the next pass.
                if rings.messages < doorbell::BATCH {
                    guard.clear_ready();
                }
                return Ok(rings);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// How long a drain waits for the fork records the doorbell announced: the
/// forking task writes each a few microseconds after ringing. A record
/// later than this is read at the next ring or the once-a-second drain.
const FORK_RECORD_WAIT: Duration = Duration::from_micros(200);

/// [`drain`] after the doorbell rang `forks` process forks: a child forked
/// while its parent was being moved must be read and moved too, so the
/// drain waits (briefly) until it has read as many fork records.
fn drain_rung(ring: &mut RingBuf<MapData>, agent: &mut Agent, forks: usize) -> Vec<Effect> {
    let mut drained = drain_counting(ring, agent);
    let started = Instant::now();
    while drained.forks < forks && started.elapsed() < FORK_RECORD_WAIT {
        std::hint::spin_loop();
        let more = drain_counting(ring, agent);
        drained.forks += more.forks;
        drained.effects.extend(more.effects);
    }
    drained.effects
}

struct Drained {
    effects: Vec<Effect>,
    forks: usize,
}

/// Hands every record in the ring buffer to the loop and collects their
/// effects: an exit can end a GameMode registration (its signal) or queue a
/// notice. Moves made while handling a record are followed by the records
/// written meanwhile (a child forked between an exec and its move), since
/// the ring is read until it is empty.
fn drain(ring: &mut RingBuf<MapData>, agent: &mut Agent) -> Vec<Effect> {
    drain_counting(ring, agent).effects
}

fn drain_counting(ring: &mut RingBuf<MapData>, agent: &mut Agent) -> Drained {
    let mut effects = Vec::new();
    let (mut any, mut forks) = (false, 0);
    while let Some(item) = ring.next() {
        any = true;
        if let Some(event) = bpf::decode(&item) {
            drop(item);
            forks += usize::from(event.kind == EventKind::Fork as u32);
            effects.extend(agent.handle(Event::Kernel(event)));
        }
    }
    if any {
        effects.extend(agent.handle(Event::KernelBatchDone));
    }
    Drained { effects, forks }
}

/// Descriptors the agent wants: the control socket takes at most
/// [`control::Limits`]' connections (96 by default), the rest is for /proc,
/// cgroup files and manager connections.
const WANTED_DESCRIPTORS: libc::rlim_t = 65536;

/// Raises the soft descriptor limit towards the hard one (systemd's default
/// soft limit is 1024; the unit sets LimitNOFILE too, for runs outside it).
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let wanted = WANTED_DESCRIPTORS.min(limit.rlim_max);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                warn!(
                    "could not raise the descriptor limit to {wanted}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Returns the allocator's free memory to the kernel (glibc keeps it
/// otherwise, and the agent's RSS would stay at its highest).
fn give_back_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
