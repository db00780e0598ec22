//! Speaking the desktop's language, against fakes on private `dbus-daemon`s:
//! a fake power-profiles-daemon on a "system bus" (holds taken, released,
//! and dropped when the holder's connection goes, as the real daemon does),
//! cpufreq sysfs in fixture trees (put back on every exit path: game end,
//! stop, a dropped carrier, `corral recover` after kill -9), a fake
//! org.freedesktop.Notifications on alice's own session bus (a bus run as
//! alice, which only alice may join) fed by the loop's VRAM ladder, and
//! coexistence fixtures (sched_ext enabled, a running `gamemoded`) in
//! `corral status`.
//!
//! Needs `dbus-daemon` (`apt-get install -y dbus-daemon`) and root (the
//! notification test joins alice's bus as alice).

mod support;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use corral::{
    actuate::{
        power::{Power, PowerEnv, PowerRequest, PowerStatus},
        recording::RecordingPlacer,
        systemd_bus,
    },
    gpu::nvml::{GpuEvent, GpuSnapshot, ProcessKind},
    model::{
        policy::{DefaultPolicy, PolicySource, PowerConfig},
        procs::{ProcInfo, ProcRead, ScriptedProcs},
        topology::Topology,
    },
    observe::views,
    service::{
        agent::{Agent, Clock, Effect, Event},
        control::{Request, Response},
        desktop_notify,
    },
};
use support::{DbusDaemon, Scratch};
use tokio::sync::mpsc;
use zbus::{interface, message::Header};

/// alice: the desktop user whose processes the ladder acts on.
const ALICE: u32 = 1000;
const DEFAULT: &str = include_str!("../../policies/default.toml");

// ---------------------------------------------------------------------------
// A fake power-profiles-daemon.

#[derive(Debug, Clone, PartialEq)]
struct HoldRecord {
    cookie: u32,
    profile: String,
    reason: String,
    application_id: String,
    /// The holder's unique bus name.
    holder: String,
}

#[derive(Debug, Default)]
struct PpdState {
    next: u32,
    active: Vec<HoldRecord>,
    released: Vec<u32>,
    /// Holds dropped because their holder left the bus.
    dropped: Vec<u32>,
}

type Ppd = Arc<Mutex<PpdState>>;

fn hold(
    state: &Ppd,
    profile: String,
    reason: String,
    app: String,
    header: &Header<'_>,
) -> zbus::fdo::Result<u32> {
    if profile != "performance" && profile != "power-saver" {
        return Err(zbus::fdo::Error::InvalidArgs(format!(
            "{profile} cannot be held"
        )));
    }
    let mut s = state.lock().unwrap();
    s.next += 1;
    let cookie = s.next;
    s.active.push(HoldRecord {
        cookie,
        profile,
        reason,
        application_id: app,
        holder: header.sender().map(|s| s.to_string()).unwrap_or_default(),
    });
    Ok(cookie)
}

fn release(state: &Ppd, cookie: u32) -> zbus::fdo::Result<()> {
    let mut s = state.lock().unwrap();
    let before = s.active.len();
    s.active.retain(|h| h.cookie != cookie);
    if s.active.len() == before {
        return Err(zbus::fdo::Error::InvalidArgs(format!("no hold {cookie}")));
    }
    s.released.push(cookie);
    Ok(())
}

/// The daemon's interface under one of its two names.
macro_rules! fake_ppd {
    ($ty:ident, $name:tt) => {
        struct $ty(Ppd);

        #[interface(name = $name)]
        impl $ty {
            fn hold_profile(
                &self,
                profile: String,
                reason: String,
                application_id: String,
                #[zbus(header)] header: Header<'_>,
            ) -> zbus::fdo::Result<u32> {
                hold(&self.0, profile, reason, application_id, &header)
            }

            fn release_profile(&self, cookie: u32) -> zbus::fdo::Result<()> {
                release(&self.0, cookie)
            }
        }
    };
}

fake_ppd!(UpowerPpd, "org.freedesktop.UPower.PowerProfiles");
fake_ppd!(HadessPpd, "net.hadess.PowerProfiles");

/// A private "system bus" with a fake power-profiles-daemon on it.
struct PpdBus {
    state: Ppd,
    _server: zbus::Connection,
    daemon: DbusDaemon,
    _scratch: Scratch,
}

impl PpdBus {
    /// `legacy`: under net.hadess.PowerProfiles (older daemons) instead.
    async fn start(legacy: bool) -> Self {
        let scratch = Scratch::new();
        let daemon = DbusDaemon::start(&scratch.0);
        let state = Ppd::default();
        let builder = zbus::connection::Builder::address(daemon.address.as_str()).unwrap();
        let builder = if legacy {
            builder
                .name("net.hadess.PowerProfiles")
                .unwrap()
                .serve_at("/net/hadess/PowerProfiles", HadessPpd(state.clone()))
                .unwrap()
        } else {
            builder
                .name("org.freedesktop.UPower.PowerProfiles")
                .unwrap()
                .serve_at(
                    "/org/freedesktop/UPower/PowerProfiles",
                    UpowerPpd(state.clone()),
                )
                .unwrap()
        };
        let server = builder.build().await.unwrap();
        // Like the daemon: a holder that leaves the bus loses its holds.
        let dbus = zbus::fdo::DBusProxy::new(&server).await.unwrap();
        let mut changes = dbus.receive_name_owner_changed().await.unwrap();
        let watched = state.clone();
        tokio::spawn(async move {
            use futures_core::Stream as _;
            while let Some(signal) =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut changes).poll_next(cx)).await
            {
                let Ok(args) = signal.args() else { continue };
                if args.new_owner().is_some() {
                    continue;
                }
                let gone = args.name().to_string();
                let mut s = watched.lock().unwrap();
                let (lost, kept): (Vec<_>, Vec<_>) =
                    s.active.drain(..).partition(|h| h.holder == gone);
                s.active = kept;
                s.dropped.extend(lost.iter().map(|h| h.cookie));
            }
        });
        PpdBus {
            state,
            _server: server,
            daemon,
            _scratch: scratch,
        }
    }

    fn active(&self) -> Vec<HoldRecord> {
        self.state.lock().unwrap().active.clone()
    }
}

/// Waits up to 5 s for `check`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// cpufreq fixtures

/// Four cpufreq policies with EPP `balance_power` (or governor `powersave`
/// only, without EPP), an empty /proc, where the restore record goes, and
/// a system bus with no power-profiles-daemon on it.
struct Machine {
    bus: DbusDaemon,
    scratch: Scratch,
}

impl Machine {
    fn new(epp: bool) -> Self {
        let scratch = Scratch::new();
        for p in 0..4 {
            let dir = scratch
                .0
                .join(format!("sys/devices/system/cpu/cpufreq/policy{p}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("scaling_governor"), "powersave\n").unwrap();
            std::fs::write(
                dir.join("scaling_available_governors"),
                "performance powersave\n",
            )
            .unwrap();
            if epp {
                std::fs::write(dir.join("energy_performance_preference"), "balance_power\n")
                    .unwrap();
            }
        }
        std::fs::create_dir_all(scratch.0.join("proc")).unwrap();
        let bus = DbusDaemon::start(&scratch.0);
        Machine { bus, scratch }
    }

    /// Without power-profiles-daemon.
    fn env(&self) -> PowerEnv {
        self.env_on(&self.bus.address)
    }

    fn env_on(&self, bus: &str) -> PowerEnv {
        PowerEnv {
            bus_address: Some(bus.to_owned()),
            sysfs_root: self.scratch.0.join("sys"),
            proc_root: self.scratch.0.join("proc"),
            record: self.record(),
        }
    }

    fn record(&self) -> PathBuf {
        self.scratch.0.join("run/corral/power-restore.json")
    }

    /// Every policy's EPP (or governor).
    fn values(&self, file: &str) -> Vec<String> {
        (0..4)
            .map(|p| {
                let path = self
                    .scratch
                    .0
                    .join(format!("sys/devices/system/cpu/cpufreq/policy{p}/{file}"));
                std::fs::read_to_string(path).unwrap().trim().to_owned()
            })
            .collect()
    }
}

const HOLD: PowerRequest = PowerRequest::Hold { sysfs: true };

const ON: PowerConfig = PowerConfig {
    enabled: true,
    sysfs: true,
};

// ---------------------------------------------------------------------------
// A holder in another process, for kill -9.

const CHILD_ENV: &str = "CORRAL_TEST_POWER_HOLDER";

/// Runs this test binary's `holder_child` in a child process that holds
/// through `Power` with `env` and prints `HELD <method>` once it does; off
/// the runtime's thread, which must keep serving the fake meanwhile.
async fn spawn_holder(env: &PowerEnv) -> std::process::Child {
    let env = env.clone();
    tokio::task::spawn_blocking(move || spawn_holder_now(&env))
        .await
        .unwrap()
}

fn spawn_holder_now(env: &PowerEnv) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "holder_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("HOLDER_BUS", env.bus_address.as_deref().unwrap())
        .env("HOLDER_SYSFS", &env.sysfs_root)
        .env("HOLDER_PROC", &env.proc_root)
        .env("HOLDER_RECORD", &env.record)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("HELD ") {
        line.clear();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "the holder exited");
    }
    child
}

#[test]
#[ignore = "not a test: the holder process the kill -9 tests start"]
fn holder_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // SAFETY: prctl on this process: never outlive the test that started it.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let var = |k: &str| std::env::var(k).unwrap();
    let env = PowerEnv {
        bus_address: Some(var("HOLDER_BUS")),
        sysfs_root: var("HOLDER_SYSFS").into(),
        proc_root: var("HOLDER_PROC").into(),
        record: var("HOLDER_RECORD").into(),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut power = Power::new(ON, env);
            let status = power.apply(HOLD).await;
            println!("HELD {:?}", status.method);
            tokio::time::sleep(Duration::from_secs(600)).await;
        });
}

fn kill_9(mut child: std::process::Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
}

// ---------------------------------------------------------------------------
// Power-profiles-daemon

#[tokio::test]
async fn ppd_holds_performance_while_a_game_runs_and_releases_it_when_the_game_ends() {
    let bus = PpdBus::start(false).await;
    let machine = Machine::new(true);
    let (tx, mut reports) = mpsc::channel(8);
    let power = Power::new(ON, machine.env_on(&bus.daemon.address)).spawn(tx);
    power.send(HOLD);
    let held: PowerStatus = reports.recv().await.unwrap();
    assert_eq!(held.method.as_deref(), Some("ppd"), "{held:?}");
    assert_eq!(
        held.describe(),
        "holding `performance` through power-profiles-daemon (org.freedesktop.UPower.PowerProfiles, cookie 1)"
    );
    let active = bus.active();
    assert_eq!(active.len(), 1);
    assert_eq!(
        (
            active[0].profile.as_str(),
            active[0].application_id.as_str()
        ),
        ("performance", "corral")
    );
    // A second Hold (another game) takes no second hold.
    power.send(HOLD);
    reports.recv().await.unwrap();
    assert_eq!(bus.active().len(), 1);
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["balance_power"; 4],
        "ppd, not sysfs"
    );

    power.send(PowerRequest::Release);
    let released = reports.recv().await.unwrap();
    assert_eq!(released.method, None);
    assert!(bus.active().is_empty());
    assert_eq!(bus.state.lock().unwrap().released, [1]);
    power.finish(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn the_daemon_drops_the_hold_when_the_holder_is_killed() {
    // The older name, as power-profiles-daemon before 0.20 owns it.
    let bus = PpdBus::start(true).await;
    let machine = Machine::new(true);
    let child = spawn_holder(&machine.env_on(&bus.daemon.address)).await;
    let active = bus.active();
    assert_eq!(active.len(), 1, "the child holds");
    assert_eq!(active[0].profile, "performance");
    kill_9(child);
    eventually("the fake saw the holder disconnect", || {
        bus.active().is_empty()
    })
    .await;
    assert_eq!(bus.state.lock().unwrap().dropped, [active[0].cookie]);
    assert!(
        bus.state.lock().unwrap().released.is_empty(),
        "no one released it"
    );
}

// ---------------------------------------------------------------------------
// cpufreq sysfs, without power-profiles-daemon

#[tokio::test]
async fn cpufreq_epp_is_put_back_when_the_game_ends_and_on_stop() {
    let machine = Machine::new(true);
    let (tx, mut reports) = mpsc::channel(8);
    let power = Power::new(ON, machine.env()).spawn(tx);

    // Game end.
    power.send(HOLD);
    let held = reports.recv().await.unwrap();
    assert_eq!(held.method.as_deref(), Some("sysfs"), "{held:?}");
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["performance"; 4]
    );
    assert_eq!(
        machine.values("scaling_governor"),
        ["powersave"; 4],
        "EPP only"
    );
    assert!(machine.record().exists(), "logged before writing");
    power.send(PowerRequest::Release);
    reports.recv().await.unwrap();
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["balance_power"; 4]
    );
    assert!(!machine.record().exists());

    // Stop while a game runs.
    power.send(HOLD);
    reports.recv().await.unwrap();
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["performance"; 4]
    );
    power.finish(Duration::from_secs(2)).await;
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["balance_power"; 4]
    );
    assert!(!machine.record().exists());
}

#[tokio::test]
async fn the_governor_is_written_without_epp_and_put_back_when_the_carrier_is_dropped() {
    let machine = Machine::new(false);
    let mut power = Power::new(ON, machine.env());
    assert_eq!(power.apply(HOLD).await.method.as_deref(), Some("sysfs"));
    assert_eq!(machine.values("scaling_governor"), ["performance"; 4]);
    // The loop left with an error: the carrier goes without a Release.
    drop(power);
    assert_eq!(machine.values("scaling_governor"), ["powersave"; 4]);
    assert!(!machine.record().exists());
}

#[tokio::test]
async fn corral_recover_puts_back_what_a_killed_agent_wrote() {
    let machine = Machine::new(true);
    let child = spawn_holder(&machine.env()).await;
    kill_9(child);
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["performance"; 4],
        "a killed agent cannot put anything back"
    );
    assert!(machine.record().exists());
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("recover")
        .arg("--power-record")
        .arg(machine.record())
        .arg("--cgroup-root")
        .arg(machine.scratch.0.join("no-cgroups"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["balance_power"; 4]
    );
    assert!(!machine.record().exists());
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("restored "))
            .count(),
        4,
        "{stdout}"
    );
}

#[tokio::test]
async fn a_crashed_agents_leftovers_are_put_back_at_the_next_start() {
    let machine = Machine::new(true);
    kill_9(spawn_holder(&machine.env()).await);
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["performance"; 4]
    );
    let _power = Power::new(ON, machine.env());
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["balance_power"; 4]
    );
}

#[test]
fn a_target_that_cannot_be_read_changes_nothing_and_leaves_no_record() {
    use corral::actuate::power::{cpufreq_targets, write_performance};
    let machine = Machine::new(false);
    let mut targets = cpufreq_targets(&machine.scratch.0.join("sys"));
    assert_eq!(targets.len(), 4);
    // A directory where a file should be: reading it fails.
    let bad = machine
        .scratch
        .0
        .join("sys/devices/system/cpu/cpufreq/policy9/scaling_governor");
    std::fs::create_dir_all(&bad).unwrap();
    targets.push(bad);
    assert!(write_performance(&targets, &machine.record()).is_err());
    assert_eq!(machine.values("scaling_governor"), ["powersave"; 4]);
    assert!(!machine.record().exists());
}

#[tokio::test]
async fn with_the_sysfs_fallback_off_nothing_is_written_without_power_profiles_daemon() {
    let machine = Machine::new(true);
    let mut power = Power::new(ON, machine.env());
    let status = power.apply(PowerRequest::Hold { sysfs: false }).await;
    assert_eq!(status.method, None);
    assert!(
        status
            .describe()
            .contains("no power-profiles-daemon on the system bus; the sysfs fallback is off"),
        "{}",
        status.describe()
    );
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["balance_power"; 4]
    );
}

#[tokio::test]
async fn while_tuned_runs_no_cpufreq_file_is_written_and_status_says_so() {
    let machine = Machine::new(true);
    let tuned = machine.scratch.0.join("proc/777");
    std::fs::create_dir_all(&tuned).unwrap();
    std::fs::write(tuned.join("comm"), "tuned\n").unwrap();
    let mut power = Power::new(ON, machine.env());
    let status = power.apply(HOLD).await;
    assert_eq!(status.method, None);
    assert!(
        status
            .describe()
            .contains("tuned runs, and corral leaves its power settings alone"),
        "{}",
        status.describe()
    );
    assert_eq!(
        machine.values("energy_performance_preference"),
        ["balance_power"; 4]
    );
    assert!(!machine.record().exists());
}

// ---------------------------------------------------------------------------
// The loop, driven as the daemon drives it, with scripted /proc.

fn sysfs_fixture() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sysfs/hybrid-20"
    ))
    .to_owned()
}

fn proc_read(pid: u32, ppid: u32, comm: &str, exe: &str, argv: &[&str]) -> ProcRead {
    ProcRead {
        info: ProcInfo {
            pid,
            exe: exe.to_owned(),
            comm: comm.to_owned(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            cwd: "/home/alice".to_owned(),
            cgroup: "/user.slice/user-1000.slice/session-2.scope".to_owned(),
            env: Default::default(),
        },
        ppid,
        start_ticks: u64::from(pid),
    }
}

/// The loop as the daemon runs it, with scripted /proc and a hand-driven
/// clock.
struct Loop {
    agent: Agent,
    procs: ScriptedProcs,
    clock_ms: Arc<AtomicU64>,
}

/// An agent on the default policy (and a rule that makes `game.x86_64` a
/// game, with a 1 s hold-down) over `sysfs`, with alice's game (pid 500)
/// and ollama runner (pid 600) in scripted /proc.
fn agent_on(sysfs: &Path, scratch: &Scratch) -> Loop {
    let override_path = scratch.0.join("policy.toml");
    std::fs::write(
        &override_path,
        "[modes]\nhold_down_ms = 1000\nmin_dwell_ms = 0\n\n[[rules]]\nname = \"test-game\"\nclass = \"game\"\ncomm = [\"game.x86_64\"]\n",
    )
    .unwrap();
    let source = PolicySource {
        default: DefaultPolicy::BuiltIn("default.toml", DEFAULT),
        override_path: Some(override_path),
    };
    let policy = source.load().unwrap();
    let topology = Topology::read(sysfs).unwrap();
    let resolved = policy.resolve_cpus(&topology).unwrap();
    let placer = RecordingPlacer::new(&policy, &resolved, topology.online().clone());
    let procs = ScriptedProcs::default();
    procs.set(
        proc_read(
            500,
            1,
            "game.x86_64",
            "/games/game.x86_64",
            &["game.x86_64"],
        ),
        ALICE,
    );
    procs.set(
        proc_read(
            600,
            1,
            "ollama",
            "/usr/local/bin/ollama",
            &["ollama", "runner", "--model", "m"],
        ),
        ALICE,
    );
    let clock_ms = Arc::new(AtomicU64::new(0));
    let agent = Agent::new(
        source,
        sysfs.to_owned(),
        policy,
        Box::new(placer),
        Box::new(procs.clone()),
        None,
    )
    .with_clock(Clock::Manual(clock_ms.clone()));
    Loop {
        agent,
        procs,
        clock_ms,
    }
}

fn status_text(agent: &Agent) -> String {
    match agent.answer(Request::Status) {
        Response::Status(status) => views::render_status(&status),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_loop_holds_through_the_daemon_while_its_game_runs_and_releases_after_it_ends() {
    let bus = PpdBus::start(false).await;
    let machine = Machine::new(true);
    let scratch = Scratch::new();
    let (tx, mut reports) = mpsc::channel(8);
    let power = Power::new(ON, machine.env_on(&bus.daemon.address)).spawn(tx);
    let mut l = agent_on(&sysfs_fixture(), &scratch);
    // What the runner does with the loop's effects and the carrier's reports.
    let mut run = async |l: &mut Loop, event: Event| {
        let mut asked = 0;
        for effect in l.agent.handle(event) {
            if let Effect::Power(request) = effect {
                power.send(request);
                asked += 1;
            }
        }
        for _ in 0..asked {
            let report = reports.recv().await.unwrap();
            l.agent.handle(Event::Power(report));
        }
        asked
    };
    assert_eq!(run(&mut l, Event::Seed).await, 1, "the game runs at start");
    assert_eq!(bus.active().len(), 1);
    assert!(
        status_text(&l.agent).contains("\npower   holding `performance` through power-profiles-daemon (org.freedesktop.UPower.PowerProfiles, cookie 1)\n"),
        "{}",
        status_text(&l.agent)
    );
    // The game exits; the sweep notices, the hold-down passes.
    l.procs.remove(500);
    run(&mut l, Event::SweepTick).await;
    l.clock_ms.store(100, Ordering::Relaxed);
    assert_eq!(run(&mut l, Event::ModeTimer).await, 0, "hold-down");
    assert_eq!(bus.active().len(), 1);
    l.clock_ms.store(1_200, Ordering::Relaxed);
    assert_eq!(run(&mut l, Event::ModeTimer).await, 1);
    assert!(bus.active().is_empty());
    assert_eq!(bus.state.lock().unwrap().released, [1]);
    assert!(status_text(&l.agent).contains("\npower   idle:"));
}

// ---------------------------------------------------------------------------
// Desktop notifications

/// A fake notification server: what it was sent, and by which uid.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    app_name: String,
    summary: String,
    body: String,
    urgency: Option<u8>,
    sender_uid: u32,
}

struct FakeNotifications(Arc<Mutex<Vec<Sent>>>);

#[interface(name = "org.freedesktop.Notifications")]
impl FakeNotifications {
    #[allow(clippy::too_many_arguments, reason = "the D-Bus method's signature")]
    async fn notify(
        &self,
        app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        hints: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        _expire_timeout: i32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> u32 {
        let dbus = zbus::fdo::DBusProxy::new(conn).await.unwrap();
        let sender = header.sender().unwrap().to_owned();
        let sender_uid = dbus
            .get_connection_unix_user(zbus::names::BusName::Unique(sender))
            .await
            .unwrap();
        let urgency = hints.get("urgency").and_then(|v| u8::try_from(v).ok());
        let mut sent = self.0.lock().unwrap();
        sent.push(Sent {
            app_name,
            summary,
            body,
            urgency,
            sender_uid,
        });
        sent.len() as u32
    }
}

#[tokio::test]
async fn a_vram_ladder_step_reaches_the_notification_server_on_alices_session_bus() {
    let scratch = Scratch::new();
    let runtime_root = scratch.0.join("run/user");
    let alice_dir = runtime_root.join(ALICE.to_string());
    std::fs::create_dir_all(&alice_dir).unwrap();
    // Her session bus, run as her: root could not join it as root.
    let _bus = DbusDaemon::start_at(&alice_dir.join("bus"), Some(ALICE));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let server = systemd_bus::user_bus_connection(ALICE, &alice_dir.join("bus"))
        .await
        .unwrap();
    server
        .object_server()
        .at(
            "/org/freedesktop/Notifications",
            FakeNotifications(sent.clone()),
        )
        .await
        .unwrap();
    server
        .request_name("org.freedesktop.Notifications")
        .await
        .unwrap();

    let mut agent = agent_on(&sysfs_fixture(), &scratch).agent;
    agent.handle(Event::Seed);
    // The game may still claim 7 of its 8 GiB reserve with 2 GiB free; the
    // ai class holds 12 GiB over its 6 GiB max: the ladder's first step.
    let effects = agent.handle(Event::Gpu(GpuEvent::Snapshot(GpuSnapshot::one_gpu(
        24,
        2,
        60,
        &[
            (500, 1, ProcessKind::Graphics),
            (600, 12, ProcessKind::Compute),
        ],
    ))));
    let mut delivered = 0;
    for effect in effects {
        // What the runner does with it, but awaited.
        if let Effect::Desktop { uid, notification } = effect {
            desktop_notify::send(&runtime_root, uid, &notification)
                .await
                .unwrap();
            delivered += 1;
        }
    }
    assert_eq!(delivered, 1);
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].app_name, "corral");
    assert_eq!(sent[0].summary, "corral: `ai` VRAM needed by a game");
    assert!(sent[0].body.contains("(step 1 of 3)"), "{}", sent[0].body);
    assert_eq!(sent[0].urgency, Some(1));
    assert_eq!(sent[0].sender_uid, ALICE, "corral joined her bus as her");
}

// ---------------------------------------------------------------------------
// Coexistence

/// Copies a fixture tree (topology) so a test can add to it.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn sched_ext_enabled_and_a_running_gamemoded_show_in_status_with_what_corral_does() {
    let scratch = Scratch::new();
    let sysfs = scratch.0.join("sys");
    copy_tree(&sysfs_fixture(), &sysfs);
    std::fs::create_dir_all(sysfs.join("kernel/sched_ext/root")).unwrap();
    std::fs::write(sysfs.join("kernel/sched_ext/state"), "enabled\n").unwrap();
    std::fs::write(sysfs.join("kernel/sched_ext/root/ops"), "lavd_1.0.12\n").unwrap();
    // A gamemoded among the processes the agent knows.
    let Loop {
        mut agent, procs, ..
    } = agent_on(&sysfs, &scratch);
    let gamemoded = 812;
    procs.set(
        proc_read(
            gamemoded,
            1,
            "gamemoded",
            "/usr/bin/gamemoded",
            &["gamemoded"],
        ),
        ALICE,
    );
    agent.handle(Event::Seed);
    let text = status_text(&agent);
    assert!(
        text.contains("\ncoexist sched_ext (lavd_1.0.12): overlaps cpu.weight; the current sched_ext schedulers ignore cpu.weight, so class weights have no effect"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "\ncoexist gamemoded (pid {gamemoded}): overlaps renice, affinity, governor; gamemode's nice and ioprio values stay (corral never renices)",
        )),
        "{text}"
    );
    procs.remove(gamemoded);
    // Gone at the next sweep.
    agent.handle(Event::SweepTick);
    assert!(!status_text(&agent).contains("coexist gamemoded"));
}
