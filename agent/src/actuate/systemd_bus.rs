//! A D-Bus client for systemd's manager (`org.freedesktop.systemd1`): place
//! processes in transient scopes and slices and set their CPU properties the
//! way systemd wants it done (STYLE.md, "Living with systemd").
//!
//! The same [`ManagerClient`] talks to the system manager (the root agent)
//! and to a user's manager (the per-user agent); `manager_ops` puts its calls
//! on a line protocol so both run the same code.
//!
//! Naming follows systemd.io DESKTOP_ENVIRONMENTS ("XDG standardization for
//! applications"): application units are `app-[<launcher>-]<ApplicationID>-<RANDOM>`.
//! When a process already sits in such a unit (`app-steam-1234.scope`,
//! `app-gnome-org.gnome.Terminal-4567.scope`, `app-org.kde.konsole@12ab.service`),
//! [`xdg_scope_name`] keeps its `app-[<launcher>-]<ApplicationID>` part, so the
//! desktop, portals and oomd still see the same application, and only puts a
//! new random part `corral<pid>` behind it (no dash in it, so the ID can still
//! be recovered by stripping prefix and random part). A process without an
//! application unit gets `app-corral-<comm>-corral<pid>.scope`: corral is the
//! launcher and the escaped `comm` the generated ID (escaping turns `-` into
//! `\x2d`, so the ID has no dash, as the document asks). Class slices are
//! `app-corral-<class>.slice` in a user manager (below `app.slice` through
//! systemd's dash hierarchy) and `corral-<class>.slice` in the system manager.
//!
//! Wire formats, as systemd's `src/core/dbus-cgroup.c` parses them:
//! `AllowedCPUs` is `ay`, a little-endian CPU bitmask (byte `i`, bit `j` is CPU
//! `8i+j`; `cpu_set_to_dbus`), an empty array meaning "unset"; `CPUWeight` is
//! `t` in 1..=10000, `u64::MAX` meaning "unset" (the default).
//!
//! Length: one client of one D-Bus interface, with its wire-format tests (about 180 lines).

use std::{
    future::poll_fn,
    path::{Path, PathBuf},
    pin::Pin,
    time::Duration,
};

use futures_core::Stream;
use serde::{Deserialize, Serialize};
use zbus::{
    Connection, DBusError as _,
    zvariant::{OwnedObjectPath, OwnedValue, Value},
};

/// systemd's bus name.
pub const SYSTEMD_SERVICE: &str = "org.freedesktop.systemd1";
/// The manager object.
pub const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
/// The manager interface.
pub const MANAGER_INTERFACE: &str = "org.freedesktop.systemd1.Manager";
/// The system manager's private socket (what `systemctl` uses as root when
/// there is no system bus).
pub const SYSTEM_PRIVATE_SOCKET: &str = "/run/systemd/private";
/// `CPUWeight` that means "not set" (systemd's `CGROUP_WEIGHT_INVALID`).
pub const CPU_WEIGHT_UNSET: u64 = u64::MAX;
/// Largest `CPUWeight` systemd accepts.
pub const CPU_WEIGHT_MAX: u64 = 10_000;
/// systemd refuses CPU numbers from here on (`CPU_SET_MAX_NCPU`).
pub const MAX_CPU: u32 = 8192;
/// Longest unit name systemd accepts (`UNIT_NAME_MAX` less the NUL).
pub const UNIT_NAME_MAX: usize = 255;
/// How long [`ManagerClient`] waits for a job unless told otherwise.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one D-Bus call may take (sd-bus's default too).
const METHOD_TIMEOUT: Duration = Duration::from_secs(25);

/// What to do with one unit property.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Setting<T> {
    /// Leave it as it is (nothing goes on the wire).
    #[default]
    Keep,
    /// Set it to this value.
    Set(T),
    /// Reset it to systemd's "not set". When read back, the property is not set.
    Unset,
}

impl<T> Setting<T> {
    pub fn is_keep(&self) -> bool {
        matches!(self, Setting::Keep)
    }
}

/// The cgroup properties corral changes on units. Read back with
/// [`ManagerClient::get_cgroup_props`], the same type says what to restore:
/// every field is then `Set` or `Unset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupProps {
    /// `AllowedCPUs=`: the CPUs, in any order. `Set(vec![])` is the same as
    /// `Unset` on the wire (an empty mask).
    #[serde(default, skip_serializing_if = "Setting::is_keep")]
    pub allowed_cpus: Setting<Vec<u32>>,
    /// `CPUWeight=`: 1..=10000 (0 is `idle` on systemd versions that have
    /// it; 252 refuses it).
    #[serde(default, skip_serializing_if = "Setting::is_keep")]
    pub cpu_weight: Setting<u64>,
}

impl CgroupProps {
    /// Nothing to change.
    pub fn is_empty(&self) -> bool {
        self.allowed_cpus.is_keep() && self.cpu_weight.is_keep()
    }

    /// The `a(sv)` entries for these properties, checked as systemd would.
    pub fn to_wire(&self) -> Result<Vec<(&'static str, Value<'static>)>, Error> {
        let mut out = Vec::new();
        match &self.allowed_cpus {
            Setting::Keep => {}
            Setting::Set(cpus) => {
                if let Some(&cpu) = cpus.iter().find(|&&c| c >= MAX_CPU) {
                    return Err(Error::InvalidCpu(cpu));
                }
                out.push(("AllowedCPUs", Value::from(cpus_to_mask(cpus))));
            }
            Setting::Unset => out.push(("AllowedCPUs", Value::from(Vec::<u8>::new()))),
        }
        match self.cpu_weight {
            Setting::Keep => {}
            Setting::Set(w) if w > CPU_WEIGHT_MAX => return Err(Error::InvalidWeight(w)),
            Setting::Set(w) => out.push(("CPUWeight", Value::U64(w))),
            Setting::Unset => out.push(("CPUWeight", Value::U64(CPU_WEIGHT_UNSET))),
        }
        Ok(out)
    }
}

/// Which unit a process is in, and what that unit allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitInfo {
    /// The unit's name (`Id`), e.g. `app-gnome-org.gnome.Terminal-4567.scope`.
    pub unit: String,
    /// Its slice (`Slice`), e.g. `app.slice`.
    pub slice: String,
    /// Its cgroup below the manager's root (`ControlGroup`).
    pub control_group: String,
    /// `Delegate=`: the unit manages its own subtree (containers, user
    /// managers). Never lift a process out of one you do not own.
    pub delegate: bool,
}

/// What failed talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach systemd's manager ({tried}); is systemd running for this user? \
         (`systemctl --user status` / `systemctl status` should answer)"
    )]
    Connect { tried: String },
    #[error("{call} for {target} failed: {name}: {message}")]
    Call {
        /// The D-Bus method, e.g. `StartTransientUnit`, `Get Slice`.
        call: String,
        /// What it was about: `unit x.scope`, `pid 42`.
        target: String,
        /// The D-Bus error name, e.g. `org.freedesktop.systemd1.NoSuchUnit`,
        /// or `transport` when no error reply came.
        name: String,
        message: String,
    },
    #[error(
        "job {job} for unit {unit} finished with result \"{result}\", not \"done\"; \
         `journalctl{user} -u {unit}` may say why"
    )]
    JobFailed {
        unit: String,
        job: String,
        result: String,
        /// " --user" for a user manager, "" for the system manager.
        user: &'static str,
    },
    #[error(
        "job {job} for unit {unit} did not finish within {timeout:?} (no JobRemoved signal \
         came); `systemctl{user} list-jobs` shows whether it is stuck"
    )]
    JobTimeout {
        unit: String,
        job: String,
        timeout: Duration,
        user: &'static str,
    },
    #[error("{call} for {target}: unexpected reply: {detail}")]
    Reply {
        call: String,
        target: String,
        detail: String,
    },
    #[error("CPUWeight {0} is out of range: systemd accepts 1..=10000")]
    InvalidWeight(u64),
    #[error("CPU {0} is out of range: systemd accepts CPUs below 8192")]
    InvalidCpu(u32),
}

impl Error {
    /// The D-Bus error name systemd answered with, if it answered one.
    pub fn dbus_name(&self) -> Option<&str> {
        match self {
            Error::Call { name, .. } if name != "transport" => Some(name),
            _ => None,
        }
    }

    fn call(call: impl Into<String>, target: impl Into<String>, e: zbus::Error) -> Self {
        let (name, message) = match &e {
            zbus::Error::MethodError(name, desc, _) => {
                (name.to_string(), desc.clone().unwrap_or_default())
            }
            zbus::Error::FDO(fdo) => (
                fdo.name().to_string(),
                fdo.description().unwrap_or_default().to_string(),
            ),
            other => ("transport".to_string(), other.to_string()),
        };
        Error::Call {
            call: call.into(),
            target: target.into(),
            name,
            message,
        }
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
trait Manager {
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::Result<OwnedObjectPath>;

    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;

    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, Value<'_>)],
    ) -> zbus::Result<()>;

    fn attach_processes_to_unit(
        &self,
        unit_name: &str,
        subcgroup: &str,
        pids: &[u32],
    ) -> zbus::Result<()>;

    fn freeze_unit(&self, name: &str) -> zbus::Result<()>;

    fn thaw_unit(&self, name: &str) -> zbus::Result<()>;

    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

/// A connection to one systemd manager.
#[derive(Clone, Debug)]
pub struct ManagerClient {
    manager: ManagerProxy<'static>,
    job_timeout: Duration,
    user: bool,
}

impl ManagerClient {
    /// The system manager: the system bus, else (as root) its private socket.
    pub async fn system() -> Result<Self, Error> {
        let mut tried = Vec::new();
        match bus_connection(zbus::connection::Builder::system()).await {
            Ok(conn) => return Self::new(conn, false).await,
            Err(e) => tried.push(format!("system bus: {e}")),
        }
        match peer_connection(Path::new(SYSTEM_PRIVATE_SOCKET)).await {
            Ok(conn) => Self::new(conn, false).await,
            Err(e) => {
                tried.push(format!("{SYSTEM_PRIVATE_SOCKET}: {e}"));
                Err(Error::Connect {
                    tried: tried.join("; "),
                })
            }
        }
    }

    /// The calling user's manager: the session bus (`DBUS_SESSION_BUS_ADDRESS`,
    /// else `unix:path=$XDG_RUNTIME_DIR/bus`) when systemd is on it, else the
    /// manager's private socket `$XDG_RUNTIME_DIR/systemd/private`, peer to
    /// peer, as `systemctl --user` does.
    pub async fn user_session() -> Result<Self, Error> {
        let bus = std::env::var("DBUS_SESSION_BUS_ADDRESS").ok();
        let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            // SAFETY: geteuid cannot fail.
            .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", unsafe { libc::geteuid() })));
        Self::user_session_at(bus.as_deref(), &runtime_dir).await
    }

    /// [`Self::user_session`] with the environment spelled out: `bus_address`
    /// is `DBUS_SESSION_BUS_ADDRESS` (None: `unix:path=<runtime_dir>/bus`).
    pub async fn user_session_at(
        bus_address: Option<&str>,
        runtime_dir: &Path,
    ) -> Result<Self, Error> {
        let address = bus_address
            .map(str::to_string)
            .unwrap_or_else(|| format!("unix:path={}", runtime_dir.join("bus").display()));
        let mut tried = Vec::new();
        match connect_bus_with_systemd(&address).await {
            Ok(conn) => return Self::new(conn, true).await,
            Err(e) => tried.push(format!("session bus {address}: {e}")),
        }
        let private = runtime_dir.join("systemd/private");
        match peer_connection(&private).await {
            Ok(conn) => Self::new(conn, true).await,
            Err(e) => {
                tried.push(format!("{}: {e}", private.display()));
                Err(Error::Connect {
                    tried: tried.join("; "),
                })
            }
        }
    }

    /// A manager on the bus at `address` (tests: a fake on a private
    /// `dbus-daemon`). Treated as a user manager in messages.
    pub async fn at_address(address: &str) -> Result<Self, Error> {
        let conn = bus_address_connection(address)
            .await
            .map_err(|e| Error::Connect {
                tried: format!("{address}: {e}"),
            })?;
        Self::new(conn, true).await
    }

    /// User `uid`'s manager, for a root caller: its session bus
    /// (`/run/user/UID/bus`), connected with `uid`'s credentials, because
    /// dbus-daemon lets only the bus's user in. (The manager's private
    /// socket takes root too, but systemd stamps its messages there with a
    /// well-known sender name that zbus cannot parse and panics on.)
    pub async fn user_bus_as(uid: u32) -> Result<Self, Error> {
        let conn = user_bus_connection(uid, Path::new(&format!("/run/user/{uid}/bus"))).await?;
        Self::new(conn, true).await
    }

    /// A manager on its private socket at `path`, peer to peer.
    pub async fn at_peer_socket(path: &Path) -> Result<Self, Error> {
        let conn = peer_connection(path).await.map_err(|e| Error::Connect {
            tried: format!("{}: {e}", path.display()),
        })?;
        Self::new(conn, true).await
    }

    async fn new(conn: Connection, user: bool) -> Result<Self, Error> {
        let manager = ManagerProxy::new(&conn).await.map_err(|e| Error::Connect {
            tried: format!("manager proxy: {e}"),
        })?;
        Ok(ManagerClient {
            manager,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            user,
        })
    }

    /// Wait at most `timeout` for each job.
    pub fn with_job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// Whether this is a user manager (for messages and slice names).
    pub fn is_user(&self) -> bool {
        self.user
    }

    fn user_flag(&self) -> &'static str {
        if self.user { " --user" } else { "" }
    }

    /// The unit `pid` is in: GetUnitByPID, then the unit's `Id`, `Slice`,
    /// `ControlGroup` and `Delegate` (missing `Delegate` counts as false).
    pub async fn unit_of_pid(&self, pid: u32) -> Result<UnitInfo, Error> {
        let target = format!("pid {pid}");
        let path = self
            .manager
            .get_unit_by_pid(pid)
            .await
            .map_err(|e| Error::call("GetUnitByPID", &target, e))?;
        let unit: String = self.property(&path, UNIT_INTERFACE, "Id", &target).await?;
        let iface = type_interface(&unit);
        let target = format!("unit {unit}");
        let slice: String = self.property(&path, iface, "Slice", &target).await?;
        let control_group: String = self.property(&path, iface, "ControlGroup", &target).await?;
        let delegate = match self.raw_property(&path, iface, "Delegate").await {
            Ok(v) => decode(v, "Delegate", &target)?,
            Err(e) if is_unknown_property(&e) => false,
            Err(e) => return Err(Error::call("Get Delegate", &target, e)),
        };
        Ok(UnitInfo {
            unit,
            slice,
            control_group,
            delegate,
        })
    }

    /// Make sure slice `name` exists and is active with `props`: a slice
    /// that is not loaded is started as a transient unit with them; a loaded
    /// one gets them as runtime properties (and is started if inactive).
    pub async fn ensure_slice(&self, name: &str, props: &CgroupProps) -> Result<(), Error> {
        let target = format!("unit {name}");
        let wire = props.to_wire()?;
        let state = match self.manager.get_unit(name).await {
            Ok(path) => Some(self.unit_state(&path, &target).await?),
            Err(e) if error_name(&e) == Some(NO_SUCH_UNIT) => None,
            Err(e) => return Err(Error::call("GetUnit", &target, e)),
        };
        // A loaded unit that never had a fragment can still become transient.
        let pristine = state
            .as_ref()
            .is_none_or(|(load, _)| load == "not-found" || load == "stub");
        if pristine {
            match self.start_transient(name, wire.clone()).await {
                Err(Error::Call { name: e, .. }) if e == UNIT_EXISTS => {} // raced: someone made it
                other => return other,
            }
        }
        self.set_properties(name, props, true).await?;
        let active = state.as_ref().is_some_and(|(_, active)| {
            matches!(active.as_str(), "active" | "activating" | "reloading")
        });
        if !active {
            let mut removed = self.job_removed_stream(name).await?;
            let job = self
                .manager
                .start_unit(name, "fail")
                .await
                .map_err(|e| Error::call("StartUnit", &target, e))?;
            self.wait_job(&mut removed, name, &job).await?;
        }
        Ok(())
    }

    /// Put `pids` into a new transient scope `name` in `slice` (with
    /// `CollectMode=inactive-or-failed`, so it goes away once empty) and
    /// wait for its start job. Answers the unit's name. systemd refuses the
    /// whole call if any of `pids` has exited by then (ESRCH), so pass the
    /// process that matters; its later children follow it.
    pub async fn start_scope(
        &self,
        name: &str,
        slice: &str,
        pids: &[u32],
        props: &CgroupProps,
    ) -> Result<String, Error> {
        let mut wire: Vec<(&'static str, Value<'static>)> = vec![
            ("PIDs", Value::from(pids.to_vec())),
            ("Slice", Value::from(slice.to_string())),
            ("CollectMode", Value::from("inactive-or-failed")),
        ];
        wire.extend(props.to_wire()?);
        self.start_transient(name, wire).await?;
        Ok(name.to_string())
    }

    async fn start_transient(
        &self,
        name: &str,
        properties: Vec<(&'static str, Value<'static>)>,
    ) -> Result<(), Error> {
        // Match JobRemoved before the call, so it cannot slip past. No
        // Subscribe() is needed: the manager sends JobRemoved to the client
        // that queued the job (bus_job_track_sender), and on its private
        // socket to every peer.
        let mut removed = self.job_removed_stream(name).await?;
        let job = self
            .manager
            .start_transient_unit(name, "fail", &properties, &[])
            .await
            .map_err(|e| Error::call("StartTransientUnit", format!("unit {name}"), e))?;
        self.wait_job(&mut removed, name, &job).await
    }

    async fn job_removed_stream(&self, unit: &str) -> Result<JobRemovedStream, Error> {
        self.manager
            .receive_job_removed()
            .await
            .map_err(|e| Error::call("AddMatch JobRemoved", format!("unit {unit}"), e))
    }

    async fn wait_job(
        &self,
        removed: &mut JobRemovedStream,
        unit: &str,
        job: &OwnedObjectPath,
    ) -> Result<(), Error> {
        let wait = async {
            while let Some(signal) = poll_fn(|cx| Pin::new(&mut *removed).poll_next(cx)).await {
                let Ok(args) = signal.args() else { continue };
                if args.job == *job {
                    return Some(args.result);
                }
            }
            None
        };
        let job_name = job.to_string();
        match tokio::time::timeout(self.job_timeout, wait).await {
            Ok(Some(result)) if result == "done" => Ok(()),
            Ok(Some(result)) => Err(Error::JobFailed {
                unit: unit.to_string(),
                job: job_name,
                result,
                user: self.user_flag(),
            }),
            Ok(None) => Err(Error::Reply {
                call: "JobRemoved".to_string(),
                target: format!("unit {unit}"),
                detail: format!("the connection closed while waiting for job {job_name}"),
            }),
            Err(_) => Err(Error::JobTimeout {
                unit: unit.to_string(),
                job: job_name,
                timeout: self.job_timeout,
                user: self.user_flag(),
            }),
        }
    }

    /// SetUnitProperties(unit, runtime, props). corral always passes
    /// `runtime = true` (nothing survives a reboot).
    pub async fn set_properties(
        &self,
        unit: &str,
        props: &CgroupProps,
        runtime: bool,
    ) -> Result<(), Error> {
        let wire = props.to_wire()?;
        if wire.is_empty() {
            return Ok(());
        }
        self.manager
            .set_unit_properties(unit, runtime, &wire)
            .await
            .map_err(|e| Error::call("SetUnitProperties", format!("unit {unit}"), e))
    }

    /// `AllowedCPUs` and `CPUWeight` of `unit` as they are now, to restore
    /// later (each `Set` or `Unset`).
    pub async fn get_cgroup_props(&self, unit: &str) -> Result<CgroupProps, Error> {
        let target = format!("unit {unit}");
        let path = self
            .manager
            .get_unit(unit)
            .await
            .map_err(|e| Error::call("GetUnit", &target, e))?;
        let iface = type_interface(unit);
        let mask: Vec<u8> = self.property(&path, iface, "AllowedCPUs", &target).await?;
        let weight: u64 = self.property(&path, iface, "CPUWeight", &target).await?;
        let cpus = mask_to_cpus(&mask);
        Ok(CgroupProps {
            allowed_cpus: if cpus.is_empty() {
                Setting::Unset
            } else {
                Setting::Set(cpus)
            },
            cpu_weight: if weight == CPU_WEIGHT_UNSET {
                Setting::Unset
            } else {
                Setting::Set(weight)
            },
        })
    }

    /// AttachProcessesToUnit(unit, subcgroup, pids): move processes into a
    /// running unit with `Delegate=yes`, below its cgroup at `subcgroup`
    /// (absolute inside the unit, `""` for the unit's own cgroup).
    pub async fn attach_processes(
        &self,
        unit: &str,
        subcgroup: &str,
        pids: &[u32],
    ) -> Result<(), Error> {
        self.manager
            .attach_processes_to_unit(unit, subcgroup, pids)
            .await
            .map_err(|e| Error::call("AttachProcessesToUnit", format!("unit {unit}"), e))
    }

    /// FreezeUnit: the cgroup freezer on `unit` and everything below it.
    pub async fn freeze_unit(&self, unit: &str) -> Result<(), Error> {
        self.manager
            .freeze_unit(unit)
            .await
            .map_err(|e| Error::call("FreezeUnit", format!("unit {unit}"), e))
    }

    /// ThawUnit: undoes [`Self::freeze_unit`].
    pub async fn thaw_unit(&self, unit: &str) -> Result<(), Error> {
        self.manager
            .thaw_unit(unit)
            .await
            .map_err(|e| Error::call("ThawUnit", format!("unit {unit}"), e))
    }

    /// KillUnit(unit, "all", signal): every process of the unit.
    pub async fn kill_unit(&self, unit: &str, signal: i32) -> Result<(), Error> {
        self.manager
            .kill_unit(unit, "all", signal)
            .await
            .map_err(|e| Error::call("KillUnit", format!("unit {unit}"), e))
    }

    async fn unit_state(
        &self,
        path: &OwnedObjectPath,
        target: &str,
    ) -> Result<(String, String), Error> {
        let load = self
            .property(path, UNIT_INTERFACE, "LoadState", target)
            .await?;
        let active = self
            .property(path, UNIT_INTERFACE, "ActiveState", target)
            .await?;
        Ok((load, active))
    }

    async fn raw_property(
        &self,
        path: &OwnedObjectPath,
        interface: &str,
        name: &str,
    ) -> zbus::Result<OwnedValue> {
        let reply = self
            .manager
            .inner()
            .connection()
            .call_method(
                Some(SYSTEMD_SERVICE),
                path.as_str(),
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &(interface, name),
            )
            .await?;
        reply.body().deserialize::<OwnedValue>()
    }

    async fn property<T>(
        &self,
        path: &OwnedObjectPath,
        interface: &str,
        name: &str,
        target: &str,
    ) -> Result<T, Error>
    where
        T: TryFrom<OwnedValue>,
        T::Error: std::fmt::Display,
    {
        let value = self
            .raw_property(path, interface, name)
            .await
            .map_err(|e| Error::call(format!("Get {name}"), target, e))?;
        decode(value, name, target)
    }
}

const UNIT_INTERFACE: &str = "org.freedesktop.systemd1.Unit";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
const UNIT_EXISTS: &str = "org.freedesktop.systemd1.UnitExists";

fn decode<T>(value: OwnedValue, name: &str, target: &str) -> Result<T, Error>
where
    T: TryFrom<OwnedValue>,
    T::Error: std::fmt::Display,
{
    let signature = value.value_signature().to_string();
    T::try_from(value).map_err(|e| Error::Reply {
        call: format!("Get {name}"),
        target: target.to_string(),
        detail: format!("{name} has signature {signature}: {e}"),
    })
}

fn error_name(e: &zbus::Error) -> Option<&str> {
    match e {
        zbus::Error::MethodError(name, _, _) => Some(name.as_str()),
        _ => None,
    }
}

fn is_unknown_property(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::MethodError(name, _, _) => {
            name.as_str() == "org.freedesktop.DBus.Error.UnknownProperty"
                || name.as_str() == "org.freedesktop.DBus.Error.UnknownInterface"
        }
        zbus::Error::FDO(e) => matches!(
            **e,
            zbus::fdo::Error::UnknownProperty(_) | zbus::fdo::Error::UnknownInterface(_)
        ),
        _ => false,
    }
}

/// The unit-type interface that carries `Slice`, `ControlGroup` and the
/// cgroup properties, from the unit name's suffix.
fn type_interface(unit: &str) -> &'static str {
    match unit.rsplit_once('.').map(|(_, t)| t) {
        Some("scope") => "org.freedesktop.systemd1.Scope",
        Some("slice") => "org.freedesktop.systemd1.Slice",
        Some("socket") => "org.freedesktop.systemd1.Socket",
        Some("mount") => "org.freedesktop.systemd1.Mount",
        Some("swap") => "org.freedesktop.systemd1.Swap",
        _ => "org.freedesktop.systemd1.Service",
    }
}

async fn bus_address_connection(address: &str) -> zbus::Result<Connection> {
    bus_connection(zbus::connection::Builder::address(address)).await
}

async fn bus_connection(
    builder: zbus::Result<zbus::connection::Builder<'_>>,
) -> zbus::Result<Connection> {
    builder?.method_timeout(METHOD_TIMEOUT).build().await
}

/// A bus connection on which systemd's manager answers.
async fn connect_bus_with_systemd(address: &str) -> zbus::Result<Connection> {
    let conn = bus_address_connection(address).await?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let name = zbus::names::BusName::from_static_str(SYSTEMD_SERVICE)?;
    if dbus.name_has_owner(name).await? {
        Ok(conn)
    } else {
        Err(zbus::Error::Failure(format!(
            "no {SYSTEMD_SERVICE} on this bus (the user manager is not connected to it)"
        )))
    }
}

/// A connection to the bus at `path` (a user's session bus,
/// `/run/user/UID/bus`), made with `uid`'s credentials by a root caller,
/// because dbus-daemon lets only the bus's user in. Shared by the manager
/// client, corral's GameMode provider and desktop notifications.
pub async fn user_bus_connection(uid: u32, path: &Path) -> Result<Connection, Error> {
    let connect_error = |e: std::io::Error| Error::Connect {
        tried: format!("{} as uid {uid}: {e}", path.display()),
    };
    let stream = connect_as(uid, path).map_err(connect_error)?;
    stream.set_nonblocking(true).map_err(connect_error)?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(connect_error)?;
    zbus::connection::Builder::unix_stream(stream)
        .user_id(uid)
        .method_timeout(METHOD_TIMEOUT)
        .build()
        .await
        .map_err(|e| Error::Connect {
            tried: format!("{} as uid {uid}: {e}", path.display()),
        })
}

/// Connects to the Unix socket at `path` with this thread's effective uid
/// switched to `uid` for the `connect()` alone, so the peer's SO_PEERCRED
/// says `uid`. The raw syscall changes only the calling thread (glibc's
/// seteuid would change every thread of the agent); the uid is switched
/// back before returning, whatever happened. Needs CAP_SETUID.
fn connect_as(uid: u32, path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    // SAFETY: setresuid on this thread only; -1 keeps real and saved uid 0.
    let switch =
        |to: u32| unsafe { libc::syscall(libc::SYS_setresuid, -1i64, i64::from(to), -1i64) };
    if switch(uid) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let result = std::os::unix::net::UnixStream::connect(path);
    if switch(0) != 0 {
        // Cannot happen with saved uid 0; never go on as another user.
        panic!(
            "could not switch back to uid 0 after connecting to {}",
            path.display()
        );
    }
    result
}

/// A peer-to-peer connection to a manager's private socket.
async fn peer_connection(path: &Path) -> zbus::Result<Connection> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| zbus::Error::InputOutput(e.into()))?;
    zbus::connection::Builder::unix_stream(stream)
        .p2p()
        .method_timeout(METHOD_TIMEOUT)
        .build()
        .await
}

/// `AllowedCPUs` as systemd puts it on the wire: byte `i`, bit `j` is CPU
/// `8i+j`; as short as the highest CPU needs; empty for no CPUs.
pub fn cpus_to_mask(cpus: &[u32]) -> Vec<u8> {
    let Some(&max) = cpus.iter().max() else {
        return Vec::new();
    };
    let mut mask = vec![0u8; max as usize / 8 + 1];
    for &cpu in cpus {
        mask[cpu as usize / 8] |= 1 << (cpu % 8);
    }
    mask
}

/// The CPUs in a wire mask, ascending (trailing zero bytes, as systemd
/// sends them, are fine).
pub fn mask_to_cpus(mask: &[u8]) -> Vec<u32> {
    let mut cpus = Vec::new();
    for (i, &byte) in mask.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                cpus.push(i as u32 * 8 + bit);
            }
        }
    }
    cpus
}

/// systemd's unit-name escaping of an arbitrary string (`systemd-escape`
/// without `--path`): `/` becomes `-`, a leading `.` and every byte outside
/// `[A-Za-z0-9:_.]` become `\xNN` (so `-` is `\x2d`).
pub fn escape_unit_name_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.') => {
                out.push(b as char)
            }
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// The `app-[<launcher>-]<ApplicationID>` part of an application unit's
/// name, if `unit` is one (module docs).
fn app_prefix(unit: &str) -> Option<&str> {
    let stem = unit
        .strip_suffix(".scope")
        .or_else(|| unit.strip_suffix(".service"))?;
    let rest = stem.strip_prefix("app-")?;
    if rest.is_empty() {
        return None;
    }
    if let Some((prefix, _random)) = stem.split_once('@') {
        // app-<id>@<random>.service (KDE, xdg-autostart).
        return (prefix.len() > "app-".len()).then_some(prefix);
    }
    match rest.rsplit_once('-') {
        // app-<launcher>-<id>-<random>, app-<id>-<random>
        Some((_, _random)) => stem.rsplit_once('-').map(|(prefix, _)| prefix),
        // app-<id> with no random part
        None => Some(stem),
    }
}

/// The name of the scope corral starts for process `pid` (`comm` is its
/// `/proc/PID/comm`), given the unit it is in now (module docs).
pub fn xdg_scope_name(current_unit: Option<&str>, comm: &str, pid: u32) -> String {
    let random = format!("corral{pid}");
    if let Some(prefix) = current_unit.and_then(app_prefix) {
        let name = format!("{prefix}-{random}.scope");
        if name.len() <= UNIT_NAME_MAX {
            return name;
        }
    }
    let comm = if comm.is_empty() { "unknown" } else { comm };
    format!("app-corral-{}-{random}.scope", escape_unit_name_part(comm))
}

/// The slice for `class`, in every manager: `corral-<class>.slice`, a
/// child of `corral.slice` at the manager's root. Not below `app.slice`:
/// dynamic modes narrow `app.slice` for everyone else, and a class slice
/// below it would be narrowed with it.
pub fn class_slice_name(class: &str) -> String {
    format!("corral-{}.slice", escape_unit_name_part(class))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bit_j_of_byte_i_is_cpu_8i_plus_j() {
        assert_eq!(cpus_to_mask(&[]), Vec::<u8>::new());
        assert_eq!(cpus_to_mask(&[0]), vec![0x01]);
        assert_eq!(cpus_to_mask(&[0, 1, 2, 3]), vec![0x0f]);
        assert_eq!(cpus_to_mask(&[7, 8]), vec![0x80, 0x01]);
        assert_eq!(cpus_to_mask(&[9, 3, 9]), vec![0x08, 0x02]);
        assert_eq!(cpus_to_mask(&[16]), vec![0, 0, 1]);
    }

    #[test]
    fn mask_decodes_ascending_and_ignores_trailing_zero_bytes() {
        assert_eq!(mask_to_cpus(&[]), Vec::<u32>::new());
        assert_eq!(mask_to_cpus(&[0x80, 0x01]), vec![7, 8]);
        // systemd sends its whole allocation (8 bytes and more).
        assert_eq!(mask_to_cpus(&[0x0f, 0, 0, 0, 0, 0, 0, 0]), vec![0, 1, 2, 3]);
        for cpus in [vec![0u32], vec![1, 5, 63, 64, 255], (0..40).collect()] {
            assert_eq!(mask_to_cpus(&cpus_to_mask(&cpus)), cpus);
        }
    }

    #[test]
    fn props_on_the_wire() {
        let props = CgroupProps {
            allowed_cpus: Setting::Set(vec![2, 3]),
            cpu_weight: Setting::Set(500),
        };
        let wire = props.to_wire().unwrap();
        assert_eq!(wire.len(), 2);
        assert_eq!(wire[0].0, "AllowedCPUs");
        assert_eq!(wire[0].1.value_signature().to_string(), "ay");
        assert_eq!(wire[0].1, Value::from(vec![0x0cu8]));
        assert_eq!(wire[1], ("CPUWeight", Value::U64(500)));

        let reset = CgroupProps {
            allowed_cpus: Setting::Unset,
            cpu_weight: Setting::Unset,
        };
        let wire = reset.to_wire().unwrap();
        assert_eq!(wire[0].1, Value::from(Vec::<u8>::new()));
        assert_eq!(wire[1].1, Value::U64(u64::MAX));

        assert!(CgroupProps::default().to_wire().unwrap().is_empty());
        let too_heavy = CgroupProps {
            cpu_weight: Setting::Set(10_001),
            ..Default::default()
        };
        assert!(matches!(
            too_heavy.to_wire(),
            Err(Error::InvalidWeight(10_001))
        ));
        let no_such_cpu = CgroupProps {
            allowed_cpus: Setting::Set(vec![1, 9000]),
            ..Default::default()
        };
        assert!(matches!(
            no_such_cpu.to_wire(),
            Err(Error::InvalidCpu(9000))
        ));
    }

    #[test]
    fn props_json_says_keep_set_unset() {
        let props = CgroupProps {
            allowed_cpus: Setting::Set(vec![0, 1]),
            cpu_weight: Setting::Unset,
        };
        let json = serde_json::to_string(&props).unwrap();
        assert_eq!(
            json,
            r#"{"allowed_cpus":{"set":[0,1]},"cpu_weight":"unset"}"#
        );
        assert_eq!(serde_json::from_str::<CgroupProps>(&json).unwrap(), props);
        assert_eq!(
            serde_json::to_string(&CgroupProps::default()).unwrap(),
            "{}"
        );
        assert_eq!(
            serde_json::from_str::<CgroupProps>("{}").unwrap(),
            CgroupProps::default()
        );
    }

    #[test]
    fn escaping_matches_systemd_escape() {
        // Expected values from `systemd-escape`.
        assert_eq!(escape_unit_name_part("bash"), "bash");
        assert_eq!(escape_unit_name_part("Web Content"), "Web\\x20Content");
        assert_eq!(escape_unit_name_part("kworker/0:1"), "kworker-0:1");
        assert_eq!(escape_unit_name_part("firefox-esr"), "firefox\\x2desr");
        assert_eq!(escape_unit_name_part(".hidden.x"), "\\x2ehidden.x");
        assert_eq!(escape_unit_name_part("a_b.c:d"), "a_b.c:d");
        assert_eq!(escape_unit_name_part("back\\slash"), "back\\x5cslash");
        assert_eq!(escape_unit_name_part("é"), "\\xc3\\xa9");
        assert_eq!(escape_unit_name_part("@x"), "\\x40x");
    }

    #[test]
    fn scope_keeps_the_launcher_and_application_id() {
        assert_eq!(
            xdg_scope_name(Some("app-steam-1234.scope"), "reaper", 77),
            "app-steam-corral77.scope"
        );
        assert_eq!(
            xdg_scope_name(Some("app-gnome-org.gnome.Terminal-4567.scope"), "bash", 8),
            "app-gnome-org.gnome.Terminal-corral8.scope"
        );
        assert_eq!(
            xdg_scope_name(Some("app-org.kde.konsole@12ab.service"), "zsh", 9),
            "app-org.kde.konsole-corral9.scope"
        );
        assert_eq!(
            xdg_scope_name(
                Some("app-flatpak-com.valvesoftware.Steam-31337.scope"),
                "steam",
                10
            ),
            "app-flatpak-com.valvesoftware.Steam-corral10.scope"
        );
        // Our own scope again: same application, new random part.
        assert_eq!(
            xdg_scope_name(Some("app-corral-blender-corral5.scope"), "blender", 6),
            "app-corral-blender-corral6.scope"
        );
        // No random part to replace.
        assert_eq!(
            xdg_scope_name(Some("app-firefox.service"), "firefox", 3),
            "app-firefox-corral3.scope"
        );
    }

    #[test]
    fn scope_outside_an_application_unit_is_corral_launched() {
        for unit in [
            None,
            Some("session-2.scope"),
            Some("user@1000.service"),
            Some("app.slice"),
            Some("app-.scope"),
            Some("app-@1.service"),
            Some("run-u12.service"),
        ] {
            assert_eq!(
                xdg_scope_name(unit, "Web Content", 4242),
                "app-corral-Web\\x20Content-corral4242.scope",
                "{unit:?}"
            );
        }
        assert_eq!(
            xdg_scope_name(None, "firefox-esr", 1),
            "app-corral-firefox\\x2desr-corral1.scope"
        );
        assert_eq!(
            xdg_scope_name(None, "", 1),
            "app-corral-unknown-corral1.scope"
        );
        let long = format!("app-{}-12.scope", "x".repeat(250));
        assert_eq!(
            xdg_scope_name(Some(&long), "cc1", 2),
            "app-corral-cc1-corral2.scope"
        );
    }

    #[test]
    fn class_slices() {
        assert_eq!(class_slice_name("game"), "corral-game.slice");
        // A dash would make a level of the slice tree: escaped.
        assert_eq!(class_slice_name("low-prio"), "corral-low\\x2dprio.slice");
    }

    #[test]
    fn unit_type_interfaces() {
        assert_eq!(type_interface("a.scope"), "org.freedesktop.systemd1.Scope");
        assert_eq!(type_interface("a.slice"), "org.freedesktop.systemd1.Slice");
        assert_eq!(
            type_interface("user@1000.service"),
            "org.freedesktop.systemd1.Service"
        );
    }
}
