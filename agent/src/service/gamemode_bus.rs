//! GameMode's D-Bus API (`com.feralinteractive.GameMode` at
//! `/com/feralinteractive/GameMode`) on each logged-in user's session bus,
//! beside the loop: corral provides it when no gamemoded owns the name, and
//! follows gamemoded's `GameRegistered`/`GameUnregistered` signals when one
//! does (as uresourced does). Calls become [`Incoming::Call`]s for the loop,
//! which answers on a oneshot; the signals the loop decides on come back as
//! [`Signal`]s. The root agent reaches each bus with the user's credentials
//! ([`crate::actuate::systemd_bus::user_bus_connection`]).
//!
//! Method signatures follow FeralInteractive/gamemode's
//! daemon/gamemode-dbus.c. Argument order of the two-pid methods is the one
//! the clients send (lib/client_impl.c, the portal's `RegisterGameByPid`):
//! the game first, then the requester. libgamemode tries the pidfd variants
//! first and falls back to pids.
//!
//! corral never fights for the name. gamemoded asks for it without queueing
//! (sd-bus queues only with `SD_BUS_NAME_QUEUE`) and exits when it is taken,
//! so corral leaves the name alone whenever a gamemoded could take it: the
//! bus can start one (`ListActivatableNames`) and the user's manager does
//! not have `gamemoded.service` masked. Only then, or when gamemoded runs,
//! does corral follow instead of provide; it checks again every second, and
//! a client queued for the name makes it let go too.

use std::{
    collections::HashMap,
    future::poll_fn,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicI32, Ordering},
    },
    time::Duration,
};

use futures_core::Stream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use zbus::{
    Connection, fdo,
    fdo::RequestNameFlags,
    message::Header,
    names::{BusName, WellKnownName},
    object_server::SignalEmitter,
    zvariant::{ObjectPath, OwnedFd, OwnedObjectPath},
};

use crate::model::gamemode::{ERROR, Op, Provider};

/// GameMode's bus name, object path and interface.
pub const NAME: &str = "com.feralinteractive.GameMode";
pub const PATH: &str = "/com/feralinteractive/GameMode";
/// Where GameMode puts one object per game (`.../Games/PID`).
pub const GAMES_PATH: &str = "/com/feralinteractive/GameMode/Games";
/// How often a provider looks for a gamemoded waiting for the name, and the
/// supervisor at a bus it could not serve or a new user's directory.
const POLL: Duration = Duration::from_secs(1);

/// One GameMode request for the loop.
#[derive(Debug)]
pub struct Call {
    /// Whose session bus it came through.
    pub bus_uid: u32,
    /// The caller's uid as the bus daemon knows it; None when it would not say.
    pub caller_uid: Option<u32>,
    pub op: Op,
    pub game: u32,
    pub requester: u32,
    pub reply: oneshot::Sender<i32>,
    /// When the bus side received it (the registration latency starts here).
    pub received: std::time::Instant,
}

/// What the bus side tells the loop.
#[derive(Debug)]
pub enum Incoming {
    Call(Call),
    /// gamemoded registered (or unregistered) `game` on `bus_uid`'s bus.
    Followed {
        bus_uid: u32,
        game: u32,
        registered: bool,
    },
    /// Who provides GameMode on `bus_uid`'s bus now (None: the bus is gone).
    Provider {
        bus_uid: u32,
        provider: Option<Provider>,
    },
}

/// A signal the loop asks a bus to emit (corral-provided buses only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub bus_uid: u32,
    pub game: u32,
    pub registered: bool,
    /// `ClientCount` after the change.
    pub client_count: i32,
}

/// The object corral serves.
struct GameModeApi {
    bus_uid: u32,
    calls: mpsc::Sender<Incoming>,
    client_count: Arc<AtomicI32>,
}

impl GameModeApi {
    async fn ask(
        &self,
        op: Op,
        game: Option<u32>,
        requester: Option<u32>,
        header: &Header<'_>,
        conn: &Connection,
    ) -> i32 {
        let (Some(game), Some(requester)) = (game, requester) else {
            return ERROR;
        };
        let received = std::time::Instant::now();
        let caller_uid = caller_uid(conn, header).await;
        let (reply, answer) = oneshot::channel();
        let call = Call {
            bus_uid: self.bus_uid,
            caller_uid,
            op,
            game,
            requester,
            reply,
            received,
        };
        if self.calls.send(Incoming::Call(call)).await.is_err() {
            return ERROR;
        }
        answer.await.unwrap_or(ERROR)
    }
}

/// A pid from the wire: GameMode's `i`, positive.
fn pid(raw: i32) -> Option<u32> {
    u32::try_from(raw).ok().filter(|p| *p > 0)
}

/// The pid a pidfd refers to (`Pid:` in /proc/self/fdinfo): None when the
/// process is gone (-1) or in another pid namespace (0).
pub fn pid_of_pidfd(fd: BorrowedFd<'_>) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .and_then(pid)
}

async fn caller_uid(conn: &Connection, header: &Header<'_>) -> Option<u32> {
    let sender = header.sender()?;
    let dbus = fdo::DBusProxy::new(conn).await.ok()?;
    dbus.get_connection_unix_user(BusName::Unique(sender.clone()))
        .await
        .ok()
}

/// A pid argument as it comes off the wire: a number or a pidfd.
trait WirePid {
    fn pid(&self) -> Option<u32>;
}

impl WirePid for i32 {
    fn pid(&self) -> Option<u32> {
        pid(*self)
    }
}

impl WirePid for OwnedFd {
    fn pid(&self) -> Option<u32> {
        pid_of_pidfd(self.as_fd())
    }
}

/// GameMode's nine methods differ only in their D-Bus name, the operation
/// and how the pids arrive, so one template writes them all (zbus's
/// `interface` macro needs each method spelled out). Each only turns its
/// arguments into pids for [`GameModeApi::ask`].
macro_rules! gamemode_interface {
    (
        own pid: $($own:ident => $own_op:ident),+;
        two pids: $($two:ident $two_name:tt ($ty:ty) => $two_op:ident),+;
    ) => {
        #[zbus::interface(name = "com.feralinteractive.GameMode")]
        impl GameModeApi {
            $(async fn $own(&self, pid: i32, #[zbus(header)] header: Header<'_>, #[zbus(connection)] conn: &Connection) -> i32 {
                self.ask(Op::$own_op, pid.pid(), pid.pid(), &header, conn).await
            })+

            $(#[zbus(name = $two_name)]
            async fn $two(&self, game: $ty, requester: $ty, #[zbus(header)] header: Header<'_>, #[zbus(connection)] conn: &Connection) -> i32 {
                self.ask(Op::$two_op, game.pid(), requester.pid(), &header, conn).await
            })+

            #[zbus(property)]
            async fn client_count(&self) -> i32 {
                self.client_count.load(Ordering::Relaxed)
            }

            #[zbus(signal)]
            async fn game_registered(emitter: &SignalEmitter<'_>, pid: i32, game: ObjectPath<'_>) -> zbus::Result<()>;

            #[zbus(signal)]
            async fn game_unregistered(emitter: &SignalEmitter<'_>, pid: i32, game: ObjectPath<'_>) -> zbus::Result<()>;
        }
    };
}

gamemode_interface! {
    own pid: register_game => Register, unregister_game => Unregister, query_status => Query;
    two pids:
        register_game_by_pid "RegisterGameByPID" (i32) => Register,
        unregister_game_by_pid "UnregisterGameByPID" (i32) => Unregister,
        query_status_by_pid "QueryStatusByPID" (i32) => Query,
        register_game_by_pidfd "RegisterGameByPIDFd" (OwnedFd) => Register,
        unregister_game_by_pidfd "UnregisterGameByPIDFd" (OwnedFd) => Unregister,
        query_status_by_pidfd "QueryStatusByPIDFd" (OwnedFd) => Query;
}

/// gamemoded, as corral follows it.
#[zbus::proxy(
    interface = "com.feralinteractive.GameMode",
    default_service = "com.feralinteractive.GameMode",
    default_path = "/com/feralinteractive/GameMode",
    gen_blocking = false
)]
trait Gamemoded {
    /// Never starts gamemoded: whether it runs is its user's choice.
    #[zbus(no_autostart)]
    fn list_games(&self) -> zbus::Result<Vec<(i32, OwnedObjectPath)>>;

    #[zbus(signal)]
    fn game_registered(&self, pid: i32, game: OwnedObjectPath) -> zbus::Result<()>;

    #[zbus(signal)]
    fn game_unregistered(&self, pid: i32, game: OwnedObjectPath) -> zbus::Result<()>;
}

/// The object path GameMode gives game `pid`.
pub fn game_path(pid: u32) -> String {
    format!("{GAMES_PATH}/{pid}")
}

async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// Logs who provides GameMode on `bus_uid`'s bus now and tells the loop.
async fn announce(calls: &mpsc::Sender<Incoming>, bus_uid: u32, provider: Provider) {
    match provider {
        Provider::Corral => info!(
            bus_uid,
            "GameMode: provided by corral on uid {bus_uid}'s bus"
        ),
        Provider::Gamemoded => info!(
            bus_uid,
            "GameMode: gamemoded holds or can take the name on uid {bus_uid}'s bus; following its signals"
        ),
    }
    let provider = Some(provider);
    let _ = calls.send(Incoming::Provider { bus_uid, provider }).await;
}

/// Why serving one bus ended.
enum Turn {
    /// Try the name again (gamemoded left, or queued for it).
    Again,
    /// The connection is gone.
    Closed,
}

/// Serves GameMode on one user's bus connection until it closes: provides
/// the API while the name is free, follows gamemoded while it holds it.
/// `signals` carries what the loop wants emitted on this bus.
pub async fn serve_bus(
    conn: Connection,
    bus_uid: u32,
    calls: mpsc::Sender<Incoming>,
    mut signals: mpsc::UnboundedReceiver<Signal>,
) {
    let client_count = Arc::new(AtomicI32::new(0));
    loop {
        let api = GameModeApi {
            bus_uid,
            calls: calls.clone(),
            client_count: client_count.clone(),
        };
        if let Err(e) = conn.object_server().at(PATH, api).await {
            warn!(bus_uid, "GameMode: cannot serve {PATH}: {e}");
            break;
        }
        let claim = if gamemoded_available(&conn).await {
            Err(zbus::Error::NameTaken)
        } else {
            conn.request_name_with_flags(NAME, RequestNameFlags::DoNotQueue.into())
                .await
        };
        let turn = match claim {
            Ok(_) => {
                announce(&calls, bus_uid, Provider::Corral).await;
                provide(&conn, &mut signals, &client_count).await
            }
            Err(zbus::Error::NameTaken) => {
                let _ = conn.object_server().remove::<GameModeApi, _>(PATH).await;
                announce(&calls, bus_uid, Provider::Gamemoded).await;
                follow(&conn, bus_uid, &calls, &mut signals).await
            }
            Err(e) => {
                warn!(bus_uid, "GameMode: cannot ask for {NAME}: {e}");
                Turn::Closed
            }
        };
        let _ = conn.object_server().remove::<GameModeApi, _>(PATH).await;
        if matches!(turn, Turn::Closed) {
            break;
        }
    }
    let _ = calls
        .send(Incoming::Provider {
            bus_uid,
            provider: None,
        })
        .await;
}

/// Emits what the loop decides until the connection closes or a gamemoded
/// queues for the name (then the name goes to it).
async fn provide(
    conn: &Connection,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
    client_count: &AtomicI32,
) -> Turn {
    let Ok(dbus) = fdo::DBusProxy::new(conn).await else {
        return Turn::Closed;
    };
    let name = WellKnownName::from_static_str_unchecked(NAME);
    let mut poll = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            signal = signals.recv() => {
                let Some(signal) = signal else { return Turn::Closed };
                client_count.store(signal.client_count, Ordering::Relaxed);
                if let Err(e) = emit(conn, &signal).await {
                    debug!("GameMode: could not emit a signal: {e}");
                }
            }
            _ = poll.tick() => {
                let queued = match dbus.list_queued_owners(name.clone()).await {
                    Ok(owners) => owners.len() > 1,
                    Err(fdo::Error::ZBus(_)) => return Turn::Closed,
                    Err(e) => {
                        debug!("GameMode: ListQueuedOwners: {e}");
                        false
                    }
                };
                if queued || gamemoded_available(conn).await {
                    info!("GameMode: a gamemoded can take the name; handing it over and following it");
                    let _ = conn.release_name(NAME).await;
                    return Turn::Again;
                }
            }
        }
    }
}

/// Whether a gamemoded could take the name on `conn`'s bus: the bus can
/// start it, and the user's manager (when one is on the bus) does not have
/// it masked.
async fn gamemoded_available(conn: &Connection) -> bool {
    let Ok(dbus) = fdo::DBusProxy::new(conn).await else {
        return false;
    };
    let activatable = dbus
        .list_activatable_names()
        .await
        .is_ok_and(|names| names.iter().any(|n| n.as_str() == NAME));
    if !activatable {
        return false;
    }
    let state = conn
        .call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "GetUnitFileState",
            &("gamemoded.service",),
        )
        .await
        .and_then(|reply| reply.body().deserialize::<String>());
    match state {
        Ok(state) => !state.starts_with("masked"),
        // No systemd on this bus: the bus daemon starts gamemoded itself.
        Err(_) => true,
    }
}

async fn emit(conn: &Connection, signal: &Signal) -> zbus::Result<()> {
    let iface = conn
        .object_server()
        .interface::<_, GameModeApi>(PATH)
        .await?;
    let emitter = iface.signal_emitter();
    let path = game_path(signal.game);
    let path = ObjectPath::try_from(path.as_str())?;
    let pid = signal.game as i32;
    if signal.registered {
        GameModeApi::game_registered(emitter, pid, path).await?;
    } else {
        GameModeApi::game_unregistered(emitter, pid, path).await?;
    }
    iface.get().await.client_count_changed(emitter).await
}

/// Turns gamemoded's signals into events until it leaves the name (then
/// corral may provide it) or the connection closes.
async fn follow(
    conn: &Connection,
    bus_uid: u32,
    calls: &mpsc::Sender<Incoming>,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
) -> Turn {
    let (Ok(dbus), Ok(gamemoded)) = (
        fdo::DBusProxy::new(conn).await,
        GamemodedProxy::new(conn).await,
    ) else {
        return Turn::Closed;
    };
    let (Ok(mut owner), Ok(mut registered), Ok(mut unregistered)) = (
        dbus.receive_name_owner_changed_with_args(&[(0, NAME)])
            .await,
        gamemoded.receive_game_registered().await,
        gamemoded.receive_game_unregistered().await,
    ) else {
        return Turn::Closed;
    };
    // Games gamemoded had before corral came.
    if let Ok(games) = gamemoded.list_games().await {
        for (game, _) in games {
            if let Some(game) = pid(game) {
                let _ = calls
                    .send(Incoming::Followed {
                        bus_uid,
                        game,
                        registered: true,
                    })
                    .await;
            }
        }
    }
    let mut poll = tokio::time::interval(POLL);
    loop {
        let event = tokio::select! {
            // Nobody holds the name and no gamemoded can take it any more
            // (masked, uninstalled): corral may provide it.
            _ = poll.tick() => {
                let name = BusName::WellKnown(WellKnownName::from_static_str_unchecked(NAME));
                if !dbus.name_has_owner(name).await.unwrap_or(true)
                    && !gamemoded_available(conn).await
                {
                    return Turn::Again;
                }
                continue;
            }
            s = next(&mut registered) => s.and_then(|s| s.args().ok().map(|a| (a.pid, true))),
            s = next(&mut unregistered) => s.and_then(|s| s.args().ok().map(|a| (a.pid, false))),
            changed = next(&mut owner) => {
                let Some(changed) = changed else { return Turn::Closed };
                if changed.args().is_ok_and(|a| a.new_owner().is_none()) {
                    info!(bus_uid, "GameMode: gamemoded left uid {bus_uid}'s bus");
                    let _ = calls
                        .send(Incoming::Provider { bus_uid, provider: None })
                        .await;
                    return Turn::Again;
                }
                continue;
            }
            // Nothing to emit while gamemoded provides; drop what comes.
            s = signals.recv() => {
                if s.is_none() { return Turn::Closed }
                continue;
            }
        };
        let Some((game, registered)) = event else {
            return Turn::Closed;
        };
        if let Some(game) = pid(game) {
            let _ = calls
                .send(Incoming::Followed {
                    bus_uid,
                    game,
                    registered,
                })
                .await;
        }
    }
}

/// The GameMode side of the daemon: one [`serve_bus`] per logged-in user,
/// found as `/run/user/UID/bus` sockets, each connected as that user.
pub struct Buses {
    senders: std::sync::Mutex<HashMap<u32, mpsc::UnboundedSender<Signal>>>,
    /// Told when a bus's server ends, so the supervisor looks again.
    ended: Arc<tokio::sync::Notify>,
}

/// How long a new runtime directory is looked at every [`POLL`], besides
/// its inotify watch: logind mounts a tmpfs over `/run/user/UID` right
/// after creating it, and a watch taken before the mount sees nothing
/// inside it.
const YOUNG_DIR: Duration = Duration::from_secs(10);

/// One user's runtime directory, as the supervisor last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RuntimeDir {
    /// Its `bus` socket is there.
    bus: bool,
    /// A server runs on that bus.
    served: bool,
    /// Since the supervisor first saw the directory.
    age: Duration,
}

/// Whether the supervisor looks again in a [`POLL`] rather than only when
/// inotify or an ending server wakes it: a bus nobody serves (its
/// connection failed or closed: tried again each second), or a directory
/// too young for its watch to be trusted ([`YOUNG_DIR`]). Otherwise it
/// sleeps: logins, logouts and new bus sockets are inotify events.
fn look_again_soon(dirs: &[RuntimeDir], young_dir: Duration) -> bool {
    dirs.iter()
        .any(|d| (d.bus && !d.served) || (!d.bus && d.age < young_dir))
}

impl Buses {
    /// Starts watching `runtime_root` (`/run/user`) for session buses:
    /// inotify on it and on each user's directory in it, and a look every
    /// [`POLL`] only while [`look_again_soon`] says so (or, without
    /// inotify, always).
    pub fn spawn(runtime_root: PathBuf, calls: mpsc::Sender<Incoming>) -> Arc<Buses> {
        Self::spawn_watching(runtime_root, calls, YOUNG_DIR)
    }

    /// [`Buses::spawn`], with new directories looked at every second for
    /// `young_dir` (tests shorten it).
    pub fn spawn_watching(
        runtime_root: PathBuf,
        calls: mpsc::Sender<Incoming>,
        young_dir: Duration,
    ) -> Arc<Buses> {
        let buses = Arc::new(Buses {
            senders: std::sync::Mutex::new(HashMap::new()),
            ended: Arc::new(tokio::sync::Notify::new()),
        });
        let watcher = buses.clone();
        tokio::spawn(async move { watcher.supervise(&runtime_root, &calls, young_dir).await });
        buses
    }

    async fn supervise(
        &self,
        runtime_root: &std::path::Path,
        calls: &mpsc::Sender<Incoming>,
        young_dir: Duration,
    ) {
        use inotify::{Inotify, WatchMask};
        let mut stream = Inotify::init()
            .and_then(|inotify| {
                inotify.watches().add(
                    runtime_root,
                    WatchMask::CREATE
                        | WatchMask::DELETE
                        | WatchMask::MOVED_TO
                        | WatchMask::ONLYDIR,
                )?;
                inotify.into_event_stream(vec![0u8; 4096])
            })
            .map_err(|e| {
                debug!(
                    "GameMode: cannot watch {} ({e}); looking every second",
                    runtime_root.display()
                );
            })
            .ok();
        let mut first_seen: HashMap<u32, tokio::time::Instant> = HashMap::new();
        loop {
            let now = tokio::time::Instant::now();
            let found = runtime_dirs(runtime_root);
            first_seen.retain(|uid, _| found.iter().any(|(u, _)| u == uid));
            let mut dirs = Vec::with_capacity(found.len());
            for (uid, bus) in found {
                if let Some(stream) = &stream {
                    // The same directory again is the same watch; a tmpfs
                    // mounted over it since is a new one.
                    let _ = stream.watches().add(
                        runtime_root.join(uid.to_string()),
                        WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::ONLYDIR,
                    );
                }
                if bus {
                    self.ensure(uid, runtime_root, calls);
                }
                dirs.push(RuntimeDir {
                    bus,
                    served: self.served(uid),
                    age: now - *first_seen.entry(uid).or_insert(now),
                });
            }
            let soon = stream.is_none() || look_again_soon(&dirs, young_dir);
            tokio::select! {
                event = async {
                    match &mut stream {
                        Some(s) => super::inotify_events::next_event(s).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let ended = event.is_none()
                        || !super::inotify_events::skip_queued(stream.as_mut().expect("a stream gave the event")).await;
                    if ended {
                        debug!("GameMode: the watch on {} ended; looking every second", runtime_root.display());
                        stream = None;
                    }
                }
                // A server ended: its bus is tried again in a second
                // (a bus that refuses is tried once a second, no faster).
                _ = self.ended.notified() => tokio::time::sleep(POLL).await,
                _ = tokio::time::sleep(POLL), if soon => {}
            }
        }
    }

    /// Whether a server runs on `uid`'s bus.
    fn served(&self, uid: u32) -> bool {
        self.senders
            .lock()
            .is_ok_and(|senders| serving(&senders, uid))
    }

    fn ensure(&self, uid: u32, runtime_root: &std::path::Path, calls: &mpsc::Sender<Incoming>) {
        let Ok(mut senders) = self.senders.lock() else {
            return;
        };
        if serving(&senders, uid) {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        senders.insert(uid, tx);
        let path = runtime_root.join(uid.to_string()).join("bus");
        let calls = calls.clone();
        let ended = self.ended.clone();
        tokio::spawn(async move {
            match crate::actuate::systemd_bus::user_bus_connection(uid, &path).await {
                Ok(conn) => serve_bus(conn, uid, calls, rx).await,
                Err(e) => {
                    drop(rx);
                    debug!("GameMode: {e}");
                }
            }
            // The receiver is gone: the sender reads closed.
            ended.notify_one();
        });
    }

    /// Hands a signal to its bus (dropped when that bus is gone).
    pub fn deliver(&self, signal: Signal) {
        if let Ok(senders) = self.senders.lock()
            && let Some(tx) = senders.get(&signal.bus_uid)
        {
            let _ = tx.send(signal);
        }
    }
}

/// Whether `senders` holds a live server for `uid`'s bus (its task keeps
/// the receiving end until it ends).
fn serving(senders: &HashMap<u32, mpsc::UnboundedSender<Signal>>, uid: u32) -> bool {
    senders.get(&uid).is_some_and(|s| !s.is_closed())
}

/// The users' directories under `runtime_root` (`/run/user/UID`), each
/// with whether its `bus` socket is there.
fn runtime_dirs(runtime_root: &std::path::Path) -> Vec<(u32, bool)> {
    let Ok(dir) = std::fs::read_dir(runtime_root) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .map(|uid| {
            let bus = runtime_root.join(uid.to_string()).join("bus").exists();
            (uid, bus)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_names_its_process_and_a_plain_fd_names_none() {
        // SAFETY: pidfd_open on our own pid; the fd is owned below.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) } as i32;
        assert!(raw >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        assert_eq!(pid_of_pidfd(fd.as_fd()), Some(std::process::id()));
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(pid_of_pidfd(std::os::fd::AsFd::as_fd(&file)), None);
    }

    #[test]
    fn the_supervisor_looks_every_second_only_at_an_unserved_bus_or_a_young_directory() {
        let young = Duration::from_secs(10);
        let dir = |bus, served, age_s| RuntimeDir {
            bus,
            served,
            age: Duration::from_secs(age_s),
        };
        // Nothing to look at, or every bus served: inotify alone.
        assert!(!look_again_soon(&[], young));
        assert!(!look_again_soon(
            &[dir(true, true, 0), dir(true, true, 99)],
            young
        ));
        // An old directory without a bus: its watch tells when one comes.
        assert!(!look_again_soon(&[dir(false, false, 10)], young));
        // A new one may get a tmpfs over it that its watch cannot see.
        assert!(look_again_soon(
            &[dir(false, false, 9), dir(true, true, 0)],
            young
        ));
        // A bus whose connection failed or closed is tried again.
        assert!(look_again_soon(&[dir(true, false, 99)], young));
    }

    #[test]
    fn wire_pids_must_be_positive() {
        assert_eq!(pid(42), Some(42));
        assert_eq!(pid(0), None);
        assert_eq!(pid(-1), None);
        assert_eq!(game_path(42), "/com/feralinteractive/GameMode/Games/42");
    }
}
