//! corral's GameMode API (`service::gamemode_bus`) on a private
//! `dbus-daemon`, driven by the real loop (`Agent`, with scripted /proc and
//! a recording placer): the methods, pidfd variants, ClientCount, the
//! signals and the uid check as GameMode's clients see them, and a fake
//! gamemoded owning the name, whose signals corral follows. The real
//! libgamemode and gamemoded are exercised in the systemd VM tier.
//!
//! Needs root (clients connect as uids 1000 and 65534, like users on their
//! session bus; dbus-daemon lets in only uids it can look up, so uid 1000
//! must exist) and `dbus-daemon` (`apt-get install -y dbus-daemon`).

use std::{
    future::Future,
    io::{BufRead as _, BufReader},
    os::fd::{AsFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    pin::pin,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use corral::{
    actuate::{
        recording::{Record, RecordingPlacer},
        systemd_bus::user_bus_connection,
    },
    model::{
        policy::{DefaultPolicy, PolicySource},
        procs::{ProcInfo, ProcRead, ScriptedProcs},
        topology::Topology,
    },
    observe::views::render_explanation,
    service::{
        control::{Peer, Request, Response},
        daemon::{Agent, Effect, Event},
        gamemode_bus::{self, Incoming, Signal},
    },
};
use tokio::sync::{mpsc, oneshot};
use zbus::{
    Connection,
    fdo::DBusProxy,
    interface,
    names::BusName,
    object_server::SignalEmitter,
    zvariant::{Fd, ObjectPath, OwnedObjectPath},
};

const DEFAULT: &str = include_str!("../../policies/default.toml");
const USER: u32 = 1000;
/// Another user (`nobody`: dbus-daemon lets in only uids it can look up).
const OTHER: u32 = 65534;

mod support;
use support::Scratch;

// ---------------------------------------------------------------------------
// Scaffolding: a scratch directory, a dbus-daemon every uid may use, a game.

/// A session-type `dbus-daemon` that lets every uid in (as a user's bus
/// lets its user in); killed on drop.
struct DbusDaemon {
    child: Child,
    socket: PathBuf,
}

/// The file the stand-in gamemoded of [`DbusDaemon::start_with`] creates
/// when the bus activates it.
fn activated_mark(dir: &Path) -> PathBuf {
    dir.join("gamemoded-activated")
}

impl DbusDaemon {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, false)
    }

    /// With `gamemoded_installed`, the bus can start a (stand-in) gamemoded,
    /// as the gamemode package's D-Bus service file makes it.
    fn start_with(dir: &Path, gamemoded_installed: bool) -> Self {
        let socket = dir.join("bus");
        let config = dir.join("bus.conf");
        let services = dir.join("services");
        std::fs::create_dir_all(&services).unwrap();
        if gamemoded_installed {
            // The stand-in leaves a mark when the bus starts it, and exits.
            std::fs::write(
                services.join("com.feralinteractive.GameMode.service"),
                format!(
                    "[D-BUS Service]\nName=com.feralinteractive.GameMode\nExec=/usr/bin/touch {}\n",
                    activated_mark(dir).display()
                ),
            )
            .unwrap();
        }
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <servicedir>{}</servicedir>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"#,
                socket.display(),
                services.display()
            ),
        )
        .unwrap();
        // The socket must be reachable by the other uids.
        let mut perms = std::fs::metadata(dir).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(dir, perms).unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start dbus-daemon ({e}); install it: apt-get install -y dbus-daemon")
            });
        let mut address = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut address)
            .unwrap();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon printed {address:?}"
        );
        // Anyone may connect; the bus daemon checks the policy above.
        let mut perms = std::fs::metadata(&socket).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o777);
        std::fs::set_permissions(&socket, perms).unwrap();
        DbusDaemon { child, socket }
    }

    /// A connection as `uid`, the way corral reaches a user's bus.
    async fn connect_as(&self, uid: u32) -> Connection {
        user_bus_connection(uid, &self.socket)
            .await
            .unwrap_or_else(|e| panic!("connecting as uid {uid}: {e} (the test needs root)"))
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real process to register (`sleep`), killed on drop.
struct Game(Child);

impl Game {
    fn start() -> Self {
        Game(Command::new("sleep").arg("600").spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Game {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pidfd(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(
        raw >= 0,
        "pidfd_open {pid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

// ---------------------------------------------------------------------------
// The loop: a real Agent on the hybrid-20 fixture, fed what the bus sends.

struct Loop {
    agent: Agent,
    procs: ScriptedProcs,
    record: Arc<Mutex<Record>>,
    incoming: mpsc::Receiver<Incoming>,
    calls: mpsc::Sender<Incoming>,
    signals: mpsc::UnboundedSender<Signal>,
    signals_rx: Option<mpsc::UnboundedReceiver<Signal>>,
    emitted: Vec<Signal>,
}

impl Loop {
    fn new() -> Self {
        let source = PolicySource {
            default: DefaultPolicy::BuiltIn("default.toml", DEFAULT),
            override_path: None,
        };
        let policy = source.load().expect("the shipped policy loads");
        let sysfs = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sysfs/hybrid-20"
        ));
        let topology = Topology::read(sysfs).unwrap();
        let resolved = policy.resolve_cpus(&topology).unwrap();
        let placer = RecordingPlacer::new(&policy, &resolved, topology.online().clone());
        let record = placer.record.clone();
        let procs = ScriptedProcs::default();
        let agent = Agent::new(
            source,
            sysfs.to_owned(),
            policy,
            Box::new(placer),
            Box::new(procs.clone()),
            None,
        );
        let (calls, incoming) = mpsc::channel(16);
        let (signals, signals_rx) = mpsc::unbounded_channel();
        Loop {
            agent,
            procs,
            record,
            incoming,
            calls,
            signals,
            signals_rx: Some(signals_rx),
            emitted: Vec::new(),
        }
    }

    /// `pid` runs an unknown game binary, owned by `uid`.
    fn script(&self, pid: u32, uid: u32) {
        self.procs.set(
            ProcRead {
                info: ProcInfo {
                    pid,
                    exe: "/home/u/games/indie/indie".into(),
                    comm: "indie".into(),
                    argv: vec!["./indie".into()],
                    cwd: "/home/u".into(),
                    cgroup:
                        "/user.slice/user-1000.slice/user@1000.service/app.slice/app-indie-1.scope"
                            .into(),
                    env: Default::default(),
                },
                ppid: 1,
                start_ticks: u64::from(pid),
            },
            uid,
        );
    }

    /// Starts serving GameMode on `conn` (uid 1000's bus).
    fn serve(&mut self, conn: Connection) -> tokio::task::JoinHandle<()> {
        let rx = self.signals_rx.take().expect("one bus per loop");
        tokio::spawn(gamemode_bus::serve_bus(conn, USER, self.calls.clone(), rx))
    }

    fn handle(&mut self, event: Event) {
        for effect in self.agent.handle(event) {
            if let Effect::GameMode(signal) = effect {
                self.emitted.push(signal.clone());
                let _ = self.signals.send(signal);
            }
        }
    }

    /// Runs the loop until `client` is done, as the daemon's runner does.
    async fn drive<T>(&mut self, client: impl Future<Output = T>) -> T {
        let mut client = pin!(tokio::time::timeout(Duration::from_secs(20), client));
        loop {
            tokio::select! {
                out = &mut client => return out.expect("the client finished within 20 s"),
                Some(incoming) = self.incoming.recv() => self.handle(Event::GameMode(incoming)),
            }
        }
    }

    fn placed(&self, class: &str) -> Vec<u32> {
        self.record.lock().unwrap().placed(class)
    }

    fn explain(&mut self, pid: u32) -> String {
        let (tx, rx) = oneshot::channel();
        self.agent.handle(Event::Control((
            Request::Explain { pid, rules: false },
            Peer {
                pid: None,
                uid: Some(0),
                process: None,
            },
            tx,
        )));
        match rx.blocking_recv_or_try() {
            Response::Explain(e) => render_explanation(&e),
            other => panic!("explain answered {other:?}"),
        }
    }

    fn status_lines(&mut self) -> Vec<String> {
        let (tx, rx) = oneshot::channel();
        self.agent.handle(Event::Control((
            Request::Status,
            Peer {
                pid: None,
                uid: Some(0),
                process: None,
            },
            tx,
        )));
        match rx.blocking_recv_or_try() {
            Response::Status(s) => s.gamemode,
            other => panic!("status answered {other:?}"),
        }
    }
}

/// The loop answers at once; read the answer without blocking the runtime.
trait TryAnswer<T> {
    fn blocking_recv_or_try(self) -> T;
}

impl<T> TryAnswer<T> for oneshot::Receiver<T> {
    fn blocking_recv_or_try(mut self) -> T {
        self.try_recv().expect("the loop answered at once")
    }
}

// ---------------------------------------------------------------------------
// GameMode's clients: what libgamemode, MangoHud and the portal call.

#[zbus::proxy(
    interface = "com.feralinteractive.GameMode",
    default_service = "com.feralinteractive.GameMode",
    default_path = "/com/feralinteractive/GameMode",
    gen_blocking = false
)]
trait GameMode {
    fn register_game(&self, pid: i32) -> zbus::Result<i32>;
    fn unregister_game(&self, pid: i32) -> zbus::Result<i32>;
    fn query_status(&self, pid: i32) -> zbus::Result<i32>;
    #[zbus(name = "RegisterGameByPID")]
    fn register_game_by_pid(&self, game: i32, requester: i32) -> zbus::Result<i32>;
    #[zbus(name = "UnregisterGameByPID")]
    fn unregister_game_by_pid(&self, game: i32, requester: i32) -> zbus::Result<i32>;
    #[zbus(name = "QueryStatusByPID")]
    fn query_status_by_pid(&self, game: i32, requester: i32) -> zbus::Result<i32>;
    #[zbus(name = "RegisterGameByPIDFd")]
    fn register_game_by_pidfd(&self, game: Fd<'_>, requester: Fd<'_>) -> zbus::Result<i32>;
    #[zbus(name = "UnregisterGameByPIDFd")]
    fn unregister_game_by_pidfd(&self, game: Fd<'_>, requester: Fd<'_>) -> zbus::Result<i32>;
    #[zbus(name = "QueryStatusByPIDFd")]
    fn query_status_by_pidfd(&self, game: Fd<'_>, requester: Fd<'_>) -> zbus::Result<i32>;
    #[zbus(property)]
    fn client_count(&self) -> zbus::Result<i32>;
    #[zbus(signal)]
    fn game_registered(&self, pid: i32, game: OwnedObjectPath) -> zbus::Result<()>;
    #[zbus(signal)]
    fn game_unregistered(&self, pid: i32, game: OwnedObjectPath) -> zbus::Result<()>;
}

async fn client(conn: &Connection) -> GameModeProxy<'static> {
    GameModeProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

async fn next<S: futures_core::Stream + Unpin>(stream: &mut S) -> S::Item {
    let item = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx)),
    )
    .await
    .expect("a signal within 5 s");
    item.expect("the signal stream goes on")
}

async fn owner_of_gamemode(conn: &Connection) -> Option<String> {
    let dbus = DBusProxy::new(conn).await.unwrap();
    dbus.get_name_owner(BusName::try_from(gamemode_bus::NAME).unwrap())
        .await
        .ok()
        .map(|o| o.to_string())
}

/// Waits until `check` holds, driving the loop meanwhile.
async fn until(lp: &mut Loop, what: &str, mut check: impl FnMut(&mut Loop) -> bool) {
    for _ in 0..100 {
        if check(lp) {
            return;
        }
        lp.drive(tokio::time::sleep(Duration::from_millis(50)))
            .await;
    }
    panic!("timed out waiting for {what}");
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "current_thread")]
async fn corral_provides_gamemode_registers_by_pidfd_and_pid_emits_signals_and_counts_clients() {
    let scratch = Scratch::new();
    let bus = DbusDaemon::start(&scratch.0);
    let mut lp = Loop::new();
    let game = Game::start();
    let (gpid, me) = (game.pid(), std::process::id());
    lp.script(gpid, USER);
    lp.script(me, USER);
    let server = lp.serve(bus.connect_as(USER).await);
    let user = bus.connect_as(USER).await;
    until(&mut lp, "corral to own the name", |lp| {
        lp.status_lines() == vec!["provided by corral on uid 1000's bus, 0 game(s) registered"]
    })
    .await;

    // What libgamemode does first: the pidfd variants.
    let gm = client(&user).await;
    let mut registered = gm.receive_game_registered().await.unwrap();
    let mut unregistered = gm.receive_game_unregistered().await.unwrap();
    let (code, status, count, signal) = lp
        .drive(async {
            let before = gm.query_status(gpid as i32).await.unwrap();
            assert_eq!(before, 0, "nothing registered yet");
            let (g, r) = (pidfd(gpid), pidfd(me));
            let code = gm
                .register_game_by_pidfd(g.as_fd().into(), r.as_fd().into())
                .await
                .unwrap();
            let signal = next(&mut registered).await;
            let status = gm
                .query_status_by_pidfd(pidfd(gpid).as_fd().into(), pidfd(me).as_fd().into())
                .await
                .unwrap();
            let count = gm.client_count().await.unwrap();
            (code, status, count, signal)
        })
        .await;
    assert_eq!(code, 0, "RegisterGameByPIDFd answers 0");
    assert_eq!(
        status, 2,
        "QueryStatusByPIDFd: active, and this is the game"
    );
    assert_eq!(count, 1, "ClientCount");
    let args = signal.args().unwrap();
    assert_eq!(args.pid, gpid as i32);
    assert_eq!(
        args.game.as_str(),
        format!("/com/feralinteractive/GameMode/Games/{gpid}")
    );
    assert_eq!(
        lp.placed("game"),
        vec![gpid],
        "the registered pid is placed in game"
    );
    let text = lp.explain(gpid);
    assert!(
        text.contains(&format!(
            "rule      registered through GameMode by pid {me} (uid 1000's session bus)"
        )),
        "{text}"
    );

    // Another process of the user asks about itself: active, not a game.
    let other_status = lp
        .drive(gm.query_status_by_pid(me as i32, me as i32))
        .await
        .unwrap();
    assert_eq!(other_status, 1);

    // Another user may neither register nor end it.
    let stranger = client(&bus.connect_as(OTHER).await).await;
    let (register, unregister) = lp
        .drive(async {
            (
                stranger.register_game(me as i32).await.unwrap(),
                stranger.unregister_game(gpid as i32).await.unwrap(),
            )
        })
        .await;
    assert_eq!(
        (register, unregister),
        (-2, -2),
        "another user's pids are refused"
    );

    // Unregister by pid, the fallback libgamemode uses without pidfds.
    let (code, again, signal, count) = lp
        .drive(async {
            let code = gm
                .unregister_game_by_pid(gpid as i32, me as i32)
                .await
                .unwrap();
            let signal = next(&mut unregistered).await;
            let again = gm.unregister_game(gpid as i32).await.unwrap();
            (code, again, signal, gm.client_count().await.unwrap())
        })
        .await;
    assert_eq!(code, 0);
    assert_eq!(again, -1, "not registered any more");
    assert_eq!(signal.args().unwrap().pid, gpid as i32);
    assert_eq!(count, 0);

    // Register again, then the game exits: the sweep ends the registration
    // and the bus hears GameUnregistered.
    let code = lp.drive(gm.register_game(gpid as i32)).await.unwrap();
    assert_eq!(code, 0, "RegisterGame");
    lp.drive(next(&mut registered)).await;
    lp.procs.remove(gpid);
    drop(game);
    lp.handle(Event::SweepTick);
    let (signal, count, status) = lp
        .drive(async {
            (
                next(&mut unregistered).await,
                gm.client_count().await.unwrap(),
                gm.query_status(gpid as i32).await.unwrap(),
            )
        })
        .await;
    assert_eq!(signal.args().unwrap().pid, gpid as i32);
    assert_eq!((count, status), (0, 0));
    server.abort();
}

/// gamemoded as far as corral sees it: the name, ListGames and the signals.
struct FakeGamemoded {
    games: Vec<i32>,
}

#[interface(name = "com.feralinteractive.GameMode")]
impl FakeGamemoded {
    fn list_games(&self) -> Vec<(i32, OwnedObjectPath)> {
        self.games
            .iter()
            .map(|g| {
                let path = gamemode_bus::game_path(*g as u32);
                (*g, ObjectPath::try_from(path).unwrap().into())
            })
            .collect()
    }

    #[zbus(signal)]
    async fn game_registered(
        emitter: &SignalEmitter<'_>,
        pid: i32,
        game: ObjectPath<'_>,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn game_unregistered(
        emitter: &SignalEmitter<'_>,
        pid: i32,
        game: ObjectPath<'_>,
    ) -> zbus::Result<()>;
}

async fn fake_gamemoded(bus: &DbusDaemon, games: Vec<i32>, queue: bool) -> Connection {
    let conn = bus.connect_as(USER).await;
    conn.object_server()
        .at(gamemode_bus::PATH, FakeGamemoded { games })
        .await
        .unwrap();
    // gamemoded asks with no flags (sd_bus_request_name(bus, name, 0)): it
    // queues when the name is taken. 4 is DBUS_NAME_FLAG_DO_NOT_QUEUE.
    let flags: u32 = if queue { 0 } else { 4 };
    let reply = conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "RequestName",
            &(gamemode_bus::NAME, flags),
        )
        .await
        .unwrap();
    let code: u32 = reply.body().deserialize().unwrap();
    // 1: primary owner, 2: in the queue.
    assert_eq!(
        code,
        if queue { 2 } else { 1 },
        "RequestName answered {code}"
    );
    conn
}

async fn emit(conn: &Connection, pid: u32, registered: bool) {
    let iface = conn
        .object_server()
        .interface::<_, FakeGamemoded>(gamemode_bus::PATH)
        .await
        .unwrap();
    let path = gamemode_bus::game_path(pid);
    let path = ObjectPath::try_from(path.as_str()).unwrap();
    if registered {
        FakeGamemoded::game_registered(iface.signal_emitter(), pid as i32, path).await
    } else {
        FakeGamemoded::game_unregistered(iface.signal_emitter(), pid as i32, path).await
    }
    .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn with_gamemoded_on_the_bus_corral_follows_its_signals_and_takes_the_name_only_when_it_leaves()
 {
    let scratch = Scratch::new();
    let bus = DbusDaemon::start(&scratch.0);
    let mut lp = Loop::new();
    let (early, late) = (Game::start(), Game::start());
    lp.script(early.pid(), USER);
    lp.script(late.pid(), USER);
    let gamemoded = fake_gamemoded(&bus, vec![early.pid() as i32], false).await;
    let gamemoded_name = gamemoded.unique_name().unwrap().to_string();
    let corral = bus.connect_as(USER).await;
    let corral_name = corral.unique_name().unwrap().to_string();
    let server = lp.serve(corral);
    let watcher = bus.connect_as(USER).await;

    until(&mut lp, "corral to follow gamemoded", |lp| {
        lp.status_lines() == vec!["following gamemoded on uid 1000's bus, 1 game(s) registered"]
    })
    .await;
    assert_eq!(
        lp.placed("game"),
        vec![early.pid()],
        "the game gamemoded had (ListGames)"
    );
    assert_eq!(
        lp.drive(owner_of_gamemode(&watcher)).await.as_deref(),
        Some(gamemoded_name.as_str()),
        "corral does not take the name"
    );

    lp.drive(emit(&gamemoded, late.pid(), true)).await;
    until(&mut lp, "the followed registration", |lp| {
        lp.placed("game").contains(&late.pid())
    })
    .await;
    let text = lp.explain(late.pid());
    assert!(
        text.contains("registered through GameMode by pid"),
        "{text}"
    );
    assert!(text.contains("gamemoded's signal"), "{text}");

    lp.drive(emit(&gamemoded, late.pid(), false)).await;
    until(&mut lp, "the followed unregistration", |lp| {
        !lp.explain(late.pid()).contains("GameMode")
    })
    .await;

    // gamemoded stops: corral provides the name.
    drop(gamemoded);
    until(&mut lp, "corral to provide after gamemoded left", |lp| {
        lp.status_lines() == vec!["provided by corral on uid 1000's bus, 0 game(s) registered"]
    })
    .await;
    assert!(
        !lp.explain(early.pid()).contains("GameMode"),
        "what gamemoded registered ended with it"
    );
    assert_eq!(
        lp.drive(owner_of_gamemode(&watcher)).await.as_deref(),
        Some(corral_name.as_str())
    );

    // A gamemoded started now queues for the name: corral hands it over.
    let gamemoded = fake_gamemoded(&bus, vec![], true).await;
    let gamemoded_name = gamemoded.unique_name().unwrap().to_string();
    until(
        &mut lp,
        "corral to hand the name to a queued gamemoded",
        |lp| {
            lp.status_lines() == vec!["following gamemoded on uid 1000's bus, 0 game(s) registered"]
        },
    )
    .await;
    assert_eq!(
        lp.drive(owner_of_gamemode(&watcher)).await.as_deref(),
        Some(gamemoded_name.as_str())
    );
    assert!(
        lp.emitted.is_empty(),
        "corral emitted nothing while following"
    );
    server.abort();
}

/// The next provider `calls` announces for a bus.
async fn announced(incoming: &mut mpsc::Receiver<Incoming>) -> (u32, bool) {
    let wait = async {
        loop {
            match incoming.recv().await.expect("the supervisor is running") {
                Incoming::Provider { bus_uid, provider } => return (bus_uid, provider.is_some()),
                _ => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("a provider was announced within 10 s")
}

#[tokio::test(flavor = "current_thread")]
async fn the_supervisor_finds_a_bus_that_appears_after_its_directory_and_one_that_comes_back() {
    let scratch = Scratch::new();
    let runtime = scratch.0.join("run-user");
    std::fs::create_dir_all(&runtime).unwrap();
    let (calls, mut incoming) = mpsc::channel(16);
    let _buses =
        gamemode_bus::Buses::spawn_watching(runtime.clone(), calls, Duration::from_millis(200));
    // A login: the directory first, its bus well after the directory
    // stopped being looked at every second. Only inotify can tell.
    let dir = runtime.join(USER.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let bus = DbusDaemon::start(&dir);
    assert_eq!(announced(&mut incoming).await, (USER, true));
    // The bus goes (its server says so) and comes back at the same path.
    drop(bus);
    assert_eq!(announced(&mut incoming).await, (USER, false));
    let _bus = DbusDaemon::start(&dir);
    assert_eq!(announced(&mut incoming).await, (USER, true));
}

#[tokio::test(flavor = "current_thread")]
async fn with_gamemoded_installed_but_not_running_corral_leaves_it_the_name_and_follows_it() {
    // gamemoded exits when the name is taken (sd-bus never queues), so
    // owning it would keep an installed gamemoded from ever starting.
    let scratch = Scratch::new();
    let bus = DbusDaemon::start_with(&scratch.0, true);
    let mut lp = Loop::new();
    let game = Game::start();
    lp.script(game.pid(), USER);
    let server = lp.serve(bus.connect_as(USER).await);
    let watcher = bus.connect_as(USER).await;
    until(&mut lp, "corral to follow the installed gamemoded", |lp| {
        lp.status_lines() == vec!["following gamemoded on uid 1000's bus, 0 game(s) registered"]
    })
    .await;
    assert_eq!(
        lp.drive(owner_of_gamemode(&watcher)).await,
        None,
        "corral left the name free"
    );
    // Following sends nothing that would start gamemoded: whether it runs
    // is the user's manager's business (auto-start would also make the
    // bus start it for corral's own ListGames).
    lp.drive(tokio::time::sleep(Duration::from_millis(1500)))
        .await;
    assert!(
        !activated_mark(&scratch.0).exists(),
        "corral's calls made the bus start gamemoded"
    );
    // gamemoded starts (as activation would start it) and gets the name.
    let gamemoded = fake_gamemoded(&bus, vec![], false).await;
    lp.drive(tokio::time::sleep(Duration::from_millis(200)))
        .await;
    lp.drive(emit(&gamemoded, game.pid(), true)).await;
    until(&mut lp, "the followed registration", |lp| {
        lp.placed("game").contains(&game.pid())
    })
    .await;
    server.abort();
}
