//! `actuate::systemd_bus` against a fake
//! systemd manager served with zbus on a private `dbus-daemon` (and peer to
//! peer, like the manager's private socket). The fake records every call with
//! the D-Bus signature of each property, so the tests check the exact wire
//! shapes systemd parses. The real manager is exercised in the VM tier.
//!
//! Needs `dbus-daemon` (`apt-get install -y dbus-daemon`).

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader as StdBufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use corral::actuate::systemd_bus::{
    CgroupProps, Error, MANAGER_PATH, ManagerClient, Setting, UnitInfo, class_slice_name,
};
use tokio::net::UnixListener;
use zbus::{
    Connection, ObjectServer, interface,
    object_server::SignalEmitter,
    zvariant::{ObjectPath, OwnedObjectPath, OwnedValue},
};

mod support;
use support::Scratch;

// ---------------------------------------------------------------------------
// Scaffolding: a scratch directory, a private dbus-daemon.

/// A `dbus-daemon --session` listening in a scratch directory; killed on drop.
struct DbusDaemon {
    child: Child,
    address: String,
}

impl DbusDaemon {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address"])
            .arg(format!("--address=unix:path={}", dir.join("bus").display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start dbus-daemon ({e}); install it: apt-get install -y dbus-daemon")
            });
        let mut address = String::new();
        StdBufReader::new(child.stdout.take().unwrap())
            .read_line(&mut address)
            .unwrap();
        let address = address.trim().to_string();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon printed {address:?}"
        );
        DbusDaemon { child, address }
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The fake manager.

/// A property value as it came over the wire, with its signature.
#[derive(Debug, Clone, PartialEq)]
enum Wire {
    Au(Vec<u32>),
    Ay(Vec<u8>),
    S(String),
    T(u64),
    B(bool),
    Other(String),
}

fn wire(v: &OwnedValue) -> Wire {
    let signature = v.value_signature().to_string();
    let v = || v.try_clone().unwrap();
    match signature.as_str() {
        "au" => Wire::Au(Vec::<u32>::try_from(v()).unwrap()),
        "ay" => Wire::Ay(Vec::<u8>::try_from(v()).unwrap()),
        "s" => Wire::S(String::try_from(v()).unwrap()),
        "t" => Wire::T(u64::try_from(v()).unwrap()),
        "b" => Wire::B(bool::try_from(v()).unwrap()),
        other => Wire::Other(other.to_string()),
    }
}

fn wire_props(props: &[(String, OwnedValue)]) -> Vec<(String, Wire)> {
    props.iter().map(|(k, v)| (k.clone(), wire(v))).collect()
}

fn props(list: &[(&str, Wire)]) -> Vec<(String, Wire)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    GetUnitByPid(u32),
    GetUnit(String),
    StartUnit {
        name: String,
        mode: String,
    },
    StartTransientUnit {
        name: String,
        mode: String,
        props: Vec<(String, Wire)>,
        aux: usize,
    },
    SetUnitProperties {
        name: String,
        runtime: bool,
        props: Vec<(String, Wire)>,
    },
    AttachProcessesToUnit {
        unit: String,
        subcgroup: String,
        pids: Vec<u32>,
    },
}

#[derive(Debug, Clone)]
struct FakeUnit {
    load_state: String,
    active_state: String,
    slice: String,
    control_group: String,
    delegate: bool,
    /// As systemd keeps it: padded to its allocation.
    allowed_cpus: Vec<u8>,
    cpu_weight: u64,
}

impl FakeUnit {
    fn new(name: &str, slice: &str) -> Self {
        FakeUnit {
            load_state: "loaded".into(),
            active_state: "active".into(),
            slice: slice.into(),
            control_group: format!("/user.slice/user-1000.slice/user@1000.service/{slice}/{name}"),
            delegate: false,
            allowed_cpus: Vec::new(),
            cpu_weight: u64::MAX,
        }
    }

    fn apply(&mut self, props: &[(String, Wire)]) {
        for (k, v) in props {
            match (k.as_str(), v) {
                ("AllowedCPUs", Wire::Ay(mask)) => {
                    self.allowed_cpus = mask.clone();
                    if !mask.is_empty() {
                        self.allowed_cpus.resize(mask.len().next_multiple_of(8), 0);
                    }
                }
                ("CPUWeight", Wire::T(w)) => self.cpu_weight = *w,
                ("Slice", Wire::S(s)) => self.slice = s.clone(),
                ("Delegate", Wire::B(b)) => self.delegate = *b,
                _ => {}
            }
        }
    }
}

struct State {
    calls: Vec<Call>,
    units: HashMap<String, FakeUnit>,
    pids: HashMap<u32, String>,
    next_job: u32,
    /// What JobRemoved says; None: no JobRemoved at all.
    job_result: Option<String>,
    /// Send JobRemoved before the method's reply instead of after it.
    job_removed_before_reply: bool,
    /// GetUnitByPID for this pid answers after a while.
    slow_pid: u32,
}

type Shared = Arc<Mutex<State>>;

fn new_state() -> Shared {
    Arc::new(Mutex::new(State {
        calls: Vec::new(),
        units: HashMap::new(),
        pids: HashMap::new(),
        next_job: 1,
        job_result: Some("done".into()),
        job_removed_before_reply: false,
        slow_pid: 999,
    }))
}

fn unit_path(name: &str) -> OwnedObjectPath {
    // systemd's bus_label_escape.
    let mut p = String::from("/org/freedesktop/systemd1/unit/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(b as char);
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    OwnedObjectPath::try_from(p).unwrap()
}

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.systemd1")]
enum FakeError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
    #[zbus(name = "NoUnitForPID")]
    NoUnitForPid(String),
    UnitExists(String),
}

struct FakeManager {
    state: Shared,
}

impl FakeManager {
    /// Queue a job for `unit`; JobRemoved goes out as the state says.
    async fn job(&self, conn: &Connection, unit: &str) -> OwnedObjectPath {
        let (id, result, before) = {
            let mut s = self.state.lock().unwrap();
            s.next_job += 1;
            (s.next_job, s.job_result.clone(), s.job_removed_before_reply)
        };
        let job = OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{id}")).unwrap();
        if let Some(result) = result {
            let conn = conn.clone();
            let (unit, job) = (unit.to_string(), job.clone());
            let send = async move {
                let emitter = SignalEmitter::new(&conn, MANAGER_PATH).unwrap();
                // Another job's removal first, for the same unit and failed:
                // the client must match on the job path.
                let decoy =
                    ObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{}", id + 1000))
                        .unwrap();
                FakeManager::job_removed(&emitter, id + 1000, decoy, &unit, "failed")
                    .await
                    .unwrap();
                FakeManager::job_removed(&emitter, id, job.as_ref(), &unit, &result)
                    .await
                    .unwrap();
            };
            if before {
                send.await;
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    send.await
                });
            }
        }
        job
    }
}

async fn serve_unit(server: &ObjectServer, state: &Shared, name: &str) {
    let path = unit_path(name);
    let obj = |name: &str| UnitObject {
        state: state.clone(),
        name: name.to_string(),
    };
    server.at(&path, UnitIface(obj(name))).await.unwrap();
    if name.ends_with(".scope") {
        server.at(&path, ScopeIface(obj(name))).await.unwrap();
    } else if name.ends_with(".slice") {
        server.at(&path, SliceIface(obj(name))).await.unwrap();
    } else {
        server.at(&path, ServiceIface(obj(name))).await.unwrap();
    }
}

#[interface(name = "org.freedesktop.systemd1.Manager")]
impl FakeManager {
    #[zbus(name = "GetUnitByPID")]
    async fn get_unit_by_pid(&self, pid: u32) -> Result<OwnedObjectPath, FakeError> {
        let slow = {
            let mut s = self.state.lock().unwrap();
            s.calls.push(Call::GetUnitByPid(pid));
            s.slow_pid == pid
        };
        if slow {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let s = self.state.lock().unwrap();
        match s.pids.get(&pid) {
            Some(unit) => Ok(unit_path(unit)),
            None => Err(FakeError::NoUnitForPid(format!(
                "PID {pid} does not belong to any loaded unit."
            ))),
        }
    }

    async fn get_unit(&self, name: String) -> Result<OwnedObjectPath, FakeError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(Call::GetUnit(name.clone()));
        if s.units.contains_key(&name) {
            Ok(unit_path(&name))
        } else {
            Err(FakeError::NoSuchUnit(format!("Unit {name} not loaded.")))
        }
    }

    async fn start_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, FakeError> {
        {
            let mut s = self.state.lock().unwrap();
            s.calls.push(Call::StartUnit {
                name: name.clone(),
                mode,
            });
            let Some(unit) = s.units.get_mut(&name) else {
                return Err(FakeError::NoSuchUnit(format!("Unit {name} not found.")));
            };
            unit.active_state = "active".into();
        }
        Ok(self.job(conn, &name).await)
    }

    async fn start_transient_unit(
        &self,
        name: String,
        mode: String,
        properties: Vec<(String, OwnedValue)>,
        aux: Vec<(String, Vec<(String, OwnedValue)>)>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, FakeError> {
        let props = wire_props(&properties);
        {
            let mut s = self.state.lock().unwrap();
            s.calls.push(Call::StartTransientUnit {
                name: name.clone(),
                mode,
                props: props.clone(),
                aux: aux.len(),
            });
            if s.units.contains_key(&name) {
                return Err(FakeError::UnitExists(format!(
                    "Unit {name} was already loaded or has a fragment file."
                )));
            }
            let mut unit = FakeUnit::new(&name, "-.slice");
            unit.apply(&props);
            for (k, v) in &props {
                if let ("PIDs", Wire::Au(pids)) = (k.as_str(), v) {
                    for pid in pids {
                        s.pids.insert(*pid, name.clone());
                    }
                }
            }
            s.units.insert(name.clone(), unit);
        }
        serve_unit(server, &self.state, &name).await;
        Ok(self.job(conn, &name).await)
    }

    async fn set_unit_properties(
        &self,
        name: String,
        runtime: bool,
        properties: Vec<(String, OwnedValue)>,
    ) -> Result<(), FakeError> {
        let props = wire_props(&properties);
        let mut s = self.state.lock().unwrap();
        s.calls.push(Call::SetUnitProperties {
            name: name.clone(),
            runtime,
            props: props.clone(),
        });
        match s.units.get_mut(&name) {
            Some(unit) => {
                unit.apply(&props);
                Ok(())
            }
            None => Err(FakeError::NoSuchUnit(format!("Unit {name} not loaded."))),
        }
    }

    async fn attach_processes_to_unit(
        &self,
        unit_name: String,
        subcgroup: String,
        pids: Vec<u32>,
    ) -> zbus::fdo::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(Call::AttachProcessesToUnit {
            unit: unit_name.clone(),
            subcgroup,
            pids: pids.clone(),
        });
        // (systemd answers NoSuchUnit for a missing unit; not needed here.)
        match s.units.get(&unit_name) {
            None => Err(zbus::fdo::Error::Failed(format!(
                "Unit {unit_name} not loaded."
            ))),
            Some(u) if !u.delegate => Err(zbus::fdo::Error::InvalidArgs(
                "Process migration not available on non-delegated units.".into(),
            )),
            Some(_) => {
                for pid in pids {
                    s.pids.insert(pid, unit_name.clone());
                }
                Ok(())
            }
        }
    }

    #[zbus(signal)]
    async fn job_removed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        job: ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

struct UnitObject {
    state: Shared,
    name: String,
}

impl UnitObject {
    fn unit(&self) -> FakeUnit {
        self.state.lock().unwrap().units[&self.name].clone()
    }
}

struct UnitIface(UnitObject);
struct ScopeIface(UnitObject);
struct SliceIface(UnitObject);
/// No `Delegate` property here, to show a missing one counts as false.
struct ServiceIface(UnitObject);

#[interface(name = "org.freedesktop.systemd1.Unit")]
impl UnitIface {
    #[zbus(property, name = "Id")]
    fn id(&self) -> String {
        self.0.name.clone()
    }
    #[zbus(property, name = "LoadState")]
    fn load_state(&self) -> String {
        self.0.unit().load_state
    }
    #[zbus(property, name = "ActiveState")]
    fn active_state(&self) -> String {
        self.0.unit().active_state
    }
}

#[interface(name = "org.freedesktop.systemd1.Scope")]
impl ScopeIface {
    #[zbus(property, name = "Slice")]
    fn slice(&self) -> String {
        self.0.unit().slice
    }
    #[zbus(property, name = "ControlGroup")]
    fn control_group(&self) -> String {
        self.0.unit().control_group
    }
    #[zbus(property, name = "Delegate")]
    fn delegate(&self) -> bool {
        self.0.unit().delegate
    }
    #[zbus(property, name = "AllowedCPUs")]
    fn allowed_cpus(&self) -> Vec<u8> {
        self.0.unit().allowed_cpus
    }
    #[zbus(property, name = "CPUWeight")]
    fn cpu_weight(&self) -> u64 {
        self.0.unit().cpu_weight
    }
}

#[interface(name = "org.freedesktop.systemd1.Slice")]
impl SliceIface {
    #[zbus(property, name = "Slice")]
    fn slice(&self) -> String {
        self.0.unit().slice
    }
    #[zbus(property, name = "ControlGroup")]
    fn control_group(&self) -> String {
        self.0.unit().control_group
    }
    #[zbus(property, name = "AllowedCPUs")]
    fn allowed_cpus(&self) -> Vec<u8> {
        self.0.unit().allowed_cpus
    }
    #[zbus(property, name = "CPUWeight")]
    fn cpu_weight(&self) -> u64 {
        self.0.unit().cpu_weight
    }
}

#[interface(name = "org.freedesktop.systemd1.Service")]
impl ServiceIface {
    #[zbus(property, name = "Slice")]
    fn slice(&self) -> String {
        self.0.unit().slice
    }
    #[zbus(property, name = "ControlGroup")]
    fn control_group(&self) -> String {
        self.0.unit().control_group
    }
}

const TERMINAL: &str = "app-gnome-org.gnome.Terminal-4567.scope";
const TOOLBOX: &str = "toolbox.service";
const CONTAINER: &str = "libpod-abc.scope";

/// The units a desktop session would have: a terminal's app scope (pids
/// 4242 and 999), a service (pid 5151) and a delegated container scope (pid
/// 6000).
async fn seed(server: &ObjectServer, state: &Shared) {
    {
        let mut s = state.lock().unwrap();
        s.units
            .insert(TERMINAL.into(), FakeUnit::new(TERMINAL, "app.slice"));
        s.units
            .insert(TOOLBOX.into(), FakeUnit::new(TOOLBOX, "app.slice"));
        let mut container = FakeUnit::new(CONTAINER, "machine.slice");
        container.delegate = true;
        s.units.insert(CONTAINER.into(), container);
        s.pids.insert(4242, TERMINAL.into());
        s.pids.insert(5151, TOOLBOX.into());
        s.pids.insert(6000, CONTAINER.into());
        s.pids.insert(999, TERMINAL.into()); // slow_pid
    }
    for unit in [TERMINAL, TOOLBOX, CONTAINER] {
        serve_unit(server, state, unit).await;
    }
}

/// A private bus with the fake manager on it, and a client for it.
struct Bus {
    // Dropped in this order: connections, then the daemon, then its directory.
    client: ManagerClient,
    _server: Connection,
    state: Shared,
    _daemon: DbusDaemon,
    /// Kept for its drop: the directory goes when the bus does.
    _scratch: Scratch,
}

impl Bus {
    async fn start() -> Self {
        let scratch = Scratch::new("corral-bus");
        let daemon = DbusDaemon::start(&scratch.0);
        let state = new_state();
        let server = zbus::connection::Builder::address(daemon.address.as_str())
            .unwrap()
            .name("org.freedesktop.systemd1")
            .unwrap()
            .serve_at(
                MANAGER_PATH,
                FakeManager {
                    state: state.clone(),
                },
            )
            .unwrap()
            .build()
            .await
            .unwrap();
        seed(server.object_server(), &state).await;
        let client = ManagerClient::at_address(&daemon.address)
            .await
            .unwrap()
            .with_job_timeout(Duration::from_secs(5));
        Bus {
            client,
            _server: server,
            state,
            _daemon: daemon,
            _scratch: scratch,
        }
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state.lock().unwrap().calls)
    }

    /// The calls that change something (what systemd would act on).
    fn changes(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| !matches!(c, Call::GetUnit(_) | Call::GetUnitByPid(_)))
            .collect()
    }
}

/// The fake manager peer to peer on `socket`, as systemd serves
/// `$XDG_RUNTIME_DIR/systemd/private`.
async fn serve_peer(socket: &Path, state: Shared) {
    let listener = UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let conn = zbus::connection::Builder::unix_stream(stream)
                .server(zbus::Guid::generate())
                .unwrap()
                .p2p()
                .serve_at(
                    MANAGER_PATH,
                    FakeManager {
                        state: state.clone(),
                    },
                )
                .unwrap()
                .build()
                .await
                .unwrap();
            seed(conn.object_server(), &state).await;
            conns.push(conn);
        }
    });
}

fn cpu_props(cpus: &[u32], weight: u64) -> CgroupProps {
    CgroupProps {
        allowed_cpus: Setting::Set(cpus.to_vec()),
        cpu_weight: Setting::Set(weight),
    }
}

// ---------------------------------------------------------------------------
// The client.

#[tokio::test]
async fn unit_of_pid_reads_id_slice_control_group_and_delegate() {
    let bus = Bus::start().await;
    assert_eq!(
        bus.client.unit_of_pid(4242).await.unwrap(),
        UnitInfo {
            unit: TERMINAL.into(),
            slice: "app.slice".into(),
            control_group: format!(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/{TERMINAL}"
            ),
            delegate: false,
        }
    );
    // The service's interface has no Delegate property: false.
    let toolbox = bus.client.unit_of_pid(5151).await.unwrap();
    assert_eq!((toolbox.unit.as_str(), toolbox.delegate), (TOOLBOX, false));
    let container = bus.client.unit_of_pid(6000).await.unwrap();
    assert_eq!(
        (container.unit.as_str(), container.delegate),
        (CONTAINER, true)
    );
    assert_eq!(
        bus.calls(),
        vec![
            Call::GetUnitByPid(4242),
            Call::GetUnitByPid(5151),
            Call::GetUnitByPid(6000)
        ]
    );

    let err = bus.client.unit_of_pid(77).await.unwrap_err();
    assert_eq!(
        err.dbus_name(),
        Some("org.freedesktop.systemd1.NoUnitForPID")
    );
    let text = err.to_string();
    assert!(text.contains("GetUnitByPID for pid 77 failed"), "{text}");
    assert!(
        text.contains("does not belong to any loaded unit"),
        "{text}"
    );
}

#[tokio::test]
async fn start_scope_sends_pids_au_slice_s_and_cpu_props_then_waits_for_its_own_job() {
    let bus = Bus::start().await;
    let name = "app-gnome-org.gnome.Terminal-corral4242.scope";
    let unit = bus
        .client
        .start_scope(
            name,
            &class_slice_name("game"),
            &[4242, 4243],
            &cpu_props(&[2, 3, 9], 500),
        )
        .await
        .unwrap();
    assert_eq!(unit, name);
    assert_eq!(
        bus.changes(),
        vec![Call::StartTransientUnit {
            name: name.into(),
            mode: "fail".into(),
            props: props(&[
                ("PIDs", Wire::Au(vec![4242, 4243])),
                ("Slice", Wire::S("corral-game.slice".into())),
                ("CollectMode", Wire::S("inactive-or-failed".into())),
                ("AllowedCPUs", Wire::Ay(vec![0b0000_1100, 0b0000_0010])),
                ("CPUWeight", Wire::T(500)),
            ]),
            aux: 0,
        }]
    );
    // The decoy JobRemoved (another job, "failed") was not taken for ours.
    assert_eq!(bus.client.unit_of_pid(4243).await.unwrap().unit, name);
}

#[tokio::test]
async fn job_removed_before_the_reply_is_not_missed() {
    let bus = Bus::start().await;
    bus.state.lock().unwrap().job_removed_before_reply = true;
    bus.client
        .start_scope("a-corral1.scope", "b.slice", &[1], &CgroupProps::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn start_scope_times_out_with_a_clear_error_when_job_removed_never_comes() {
    let bus = Bus::start().await;
    bus.state.lock().unwrap().job_result = None;
    let client = bus
        .client
        .clone()
        .with_job_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = client
        .start_scope(
            "stuck-corral1.scope",
            "b.slice",
            &[1],
            &CgroupProps::default(),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(err, Error::JobTimeout { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("unit stuck-corral1.scope did not finish within 300ms"),
        "{text}"
    );
    assert!(text.contains("no JobRemoved signal"), "{text}");
    assert!(text.contains("systemctl --user list-jobs"), "{text}");
}

#[tokio::test]
async fn failed_job_names_unit_and_result() {
    let bus = Bus::start().await;
    bus.state.lock().unwrap().job_result = Some("dependency".into());
    let err = bus
        .client
        .start_scope("x-corral1.scope", "b.slice", &[1], &CgroupProps::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("unit x-corral1.scope finished with result \"dependency\""),
        "{text}"
    );
    assert!(
        text.contains("journalctl --user -u x-corral1.scope"),
        "{text}"
    );
}

#[tokio::test]
async fn start_scope_refused_by_the_manager_says_call_unit_and_dbus_error() {
    let bus = Bus::start().await;
    let err = bus
        .client
        .start_scope(TERMINAL, "app.slice", &[1], &CgroupProps::default())
        .await
        .unwrap_err();
    assert_eq!(err.dbus_name(), Some("org.freedesktop.systemd1.UnitExists"));
    assert!(
        err.to_string().starts_with(&format!(
            "StartTransientUnit for unit {TERMINAL} failed: org.freedesktop.systemd1.UnitExists: "
        )),
        "{err}"
    );
}

#[tokio::test]
async fn ensure_slice_starts_a_missing_slice_transient_and_updates_a_loaded_one_at_runtime() {
    let bus = Bus::start().await;
    let slice = class_slice_name("render");
    let wanted = cpu_props(&[0, 1, 2, 3], 80);
    let on_wire = || {
        props(&[
            ("AllowedCPUs", Wire::Ay(vec![0x0f])),
            ("CPUWeight", Wire::T(80)),
        ])
    };

    bus.client.ensure_slice(&slice, &wanted).await.unwrap();
    assert_eq!(
        bus.changes(),
        vec![Call::StartTransientUnit {
            name: slice.clone(),
            mode: "fail".into(),
            props: on_wire(),
            aux: 0,
        }]
    );

    // Loaded and active now: runtime properties only.
    bus.client.ensure_slice(&slice, &wanted).await.unwrap();
    assert_eq!(
        bus.changes(),
        vec![Call::SetUnitProperties {
            name: slice.clone(),
            runtime: true,
            props: on_wire(),
        }]
    );

    // Loaded but stopped: properties, then started.
    bus.state
        .lock()
        .unwrap()
        .units
        .get_mut(&slice)
        .unwrap()
        .active_state = "inactive".into();
    bus.client.ensure_slice(&slice, &wanted).await.unwrap();
    assert_eq!(
        bus.changes(),
        vec![
            Call::SetUnitProperties {
                name: slice.clone(),
                runtime: true,
                props: on_wire(),
            },
            Call::StartUnit {
                name: slice.clone(),
                mode: "fail".into(),
            },
        ]
    );
}

#[tokio::test]
async fn set_properties_is_runtime_and_what_get_cgroup_props_read_restores_it() {
    let bus = Bus::start().await;
    let before = bus.client.get_cgroup_props(TERMINAL).await.unwrap();
    assert_eq!(
        before,
        CgroupProps {
            allowed_cpus: Setting::Unset,
            cpu_weight: Setting::Unset,
        }
    );

    bus.client
        .set_properties(TERMINAL, &cpu_props(&[1, 9], 200), true)
        .await
        .unwrap();
    // Only the weight: AllowedCPUs stays.
    bus.client
        .set_properties(
            TERMINAL,
            &CgroupProps {
                cpu_weight: Setting::Set(300),
                ..Default::default()
            },
            true,
        )
        .await
        .unwrap();
    // The fake pads the mask to 8 bytes, as systemd does.
    assert_eq!(
        bus.client.get_cgroup_props(TERMINAL).await.unwrap(),
        cpu_props(&[1, 9], 300)
    );

    bus.client
        .set_properties(TERMINAL, &before, true)
        .await
        .unwrap();
    assert_eq!(bus.client.get_cgroup_props(TERMINAL).await.unwrap(), before);
    assert_eq!(
        bus.changes(),
        vec![
            Call::SetUnitProperties {
                name: TERMINAL.into(),
                runtime: true,
                props: props(&[
                    ("AllowedCPUs", Wire::Ay(vec![0b10, 0b10])),
                    ("CPUWeight", Wire::T(200)),
                ]),
            },
            Call::SetUnitProperties {
                name: TERMINAL.into(),
                runtime: true,
                props: props(&[("CPUWeight", Wire::T(300))]),
            },
            Call::SetUnitProperties {
                name: TERMINAL.into(),
                runtime: true,
                props: props(&[
                    ("AllowedCPUs", Wire::Ay(vec![])),
                    ("CPUWeight", Wire::T(u64::MAX)),
                ]),
            },
        ]
    );

    // Nothing to change: no call at all.
    bus.client
        .set_properties(TERMINAL, &CgroupProps::default(), true)
        .await
        .unwrap();
    assert_eq!(bus.changes(), vec![]);
}

#[tokio::test]
async fn attach_processes_sends_unit_subcgroup_and_pids_and_passes_refusals_through() {
    let bus = Bus::start().await;
    bus.client
        .attach_processes(CONTAINER, "/payload", &[7001, 7002])
        .await
        .unwrap();
    let err = bus
        .client
        .attach_processes(TERMINAL, "", &[7003])
        .await
        .unwrap_err();
    assert_eq!(
        err.dbus_name(),
        Some("org.freedesktop.DBus.Error.InvalidArgs")
    );
    assert!(err.to_string().contains("non-delegated"), "{err}");
    assert_eq!(
        bus.changes(),
        vec![
            Call::AttachProcessesToUnit {
                unit: CONTAINER.into(),
                subcgroup: "/payload".into(),
                pids: vec![7001, 7002],
            },
            Call::AttachProcessesToUnit {
                unit: TERMINAL.into(),
                subcgroup: "".into(),
                pids: vec![7003],
            },
        ]
    );
}

#[tokio::test]
async fn invalid_props_are_refused_before_any_call() {
    let bus = Bus::start().await;
    let err = bus
        .client
        .set_properties(TERMINAL, &cpu_props(&[0], 0xffff), true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1..=10000"), "{err}");
    assert_eq!(bus.calls(), vec![]);
}

// ---------------------------------------------------------------------------
#[tokio::test]
async fn user_session_without_a_session_bus_uses_the_managers_private_socket_peer_to_peer() {
    let scratch = Scratch::new("corral-bus");
    std::fs::create_dir(scratch.0.join("systemd")).unwrap();
    let state = new_state();
    serve_peer(&scratch.0.join("systemd/private"), state.clone()).await;

    // No bus socket at <runtime dir>/bus.
    let client = ManagerClient::user_session_at(None, &scratch.0)
        .await
        .unwrap();
    assert_eq!(client.unit_of_pid(4242).await.unwrap().unit, TERMINAL);
    // Jobs finish peer to peer too (JobRemoved has no sender there).
    client
        .start_scope(
            "p2p-corral1.scope",
            "app-corral-dev.slice",
            &[11],
            &CgroupProps::default(),
        )
        .await
        .unwrap();
    assert!(
        state
            .lock()
            .unwrap()
            .pids
            .get(&11)
            .is_some_and(|u| u == "p2p-corral1.scope")
    );
}

#[tokio::test]
async fn user_session_skips_a_session_bus_that_systemd_is_not_on() {
    let scratch = Scratch::new("corral-bus");
    let daemon = DbusDaemon::start(&scratch.0);
    std::fs::create_dir(scratch.0.join("systemd")).unwrap();
    let state = new_state();
    serve_peer(&scratch.0.join("systemd/private"), state.clone()).await;
    let client = ManagerClient::user_session_at(Some(&daemon.address), &scratch.0)
        .await
        .unwrap();
    assert_eq!(client.unit_of_pid(5151).await.unwrap().unit, TOOLBOX);
    assert_eq!(state.lock().unwrap().calls, vec![Call::GetUnitByPid(5151)]);
}

#[tokio::test]
async fn user_session_with_no_manager_anywhere_says_what_it_tried() {
    let scratch = Scratch::new("corral-bus");
    let err = ManagerClient::user_session_at(None, &scratch.0)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("{}/bus", scratch.0.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}/systemd/private", scratch.0.display())),
        "{text}"
    );
    assert!(text.contains("systemctl --user status"), "{text}");
}

// ---------------------------------------------------------------------------
// The per-user agent.
