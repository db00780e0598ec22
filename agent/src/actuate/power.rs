//! Power while the protected class (a game) runs: a `performance` hold
//! through power-profiles-daemon's `HoldProfile` (the daemon drops the hold
//! when its holder's connection closes, so a dead agent holds nothing),
//! else `energy_performance_preference` or the governor through cpufreq's
//! sysfs files, with the old values logged in a restore record first and
//! put back on release, on stop, by `corral recover` and at the next start.
//! tuned is left alone. The loop asks for [`PowerRequest`]s; [`Power`]
//! carries them out in its own task and reports a [`PowerStatus`].

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::model::policy::PowerConfig;

/// Where the restore record of sysfs writes lives.
pub const RESTORE_RECORD: &str = "/run/corral/power-restore.json";

/// The profile held and written while a game runs.
pub const PERFORMANCE: &str = "performance";

/// power-profiles-daemon's names, newest first: (bus name and interface, object path).
pub const PPD_SERVICES: &[(&str, &str)] = &[
    (
        "org.freedesktop.UPower.PowerProfiles",
        "/org/freedesktop/UPower/PowerProfiles",
    ),
    ("net.hadess.PowerProfiles", "/net/hadess/PowerProfiles"),
];

/// What the loop asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// A game runs: hold `performance`; `sysfs`: through cpufreq files
    /// where power-profiles-daemon is not there (`[power] sysfs`).
    Hold { sysfs: bool },
    /// No game runs (or the agent stops): give it back.
    Release,
}

/// What is held now, as status, explain and metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerStatus {
    /// `[power] enabled` in the policy.
    pub enabled: bool,
    /// `ppd` or `sysfs` while something is held; None otherwise.
    pub method: Option<String>,
    /// What is held, or why nothing is, in words.
    pub detail: String,
}

impl PowerStatus {
    /// One line for status and explain.
    pub fn describe(&self) -> String {
        match (&self.method, self.enabled) {
            (_, false) => "off in the policy ([power] enabled = false)".to_owned(),
            (Some(_), true) => format!("holding {}", self.detail),
            (None, true) if self.detail.is_empty() => {
                "idle: `performance` is held while the protected class runs".to_owned()
            }
            (None, true) => self.detail.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("restore record {path}: {message}")]
    Record { path: PathBuf, message: String },
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> PowerError + '_ {
    move |source| PowerError::File {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// power-profiles-daemon

/// A `performance` hold taken through power-profiles-daemon; the hold lives
/// as long as `conn`.
pub struct PpdHold {
    conn: zbus::Connection,
    service: &'static str,
    path: &'static str,
    pub cookie: u32,
}

impl PpdHold {
    /// The first power-profiles-daemon name that has an owner on `conn`.
    pub async fn service_on(conn: &zbus::Connection) -> Result<Option<usize>, PowerError> {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        for (i, (name, _)) in PPD_SERVICES.iter().enumerate() {
            let name = zbus::names::BusName::try_from(*name).map_err(zbus::Error::from)?;
            if dbus.name_has_owner(name).await.map_err(zbus::Error::from)? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// `HoldProfile("performance", reason, "corral")` on the daemon
    /// `PPD_SERVICES[index]` names.
    pub async fn take(
        conn: zbus::Connection,
        index: usize,
        reason: &str,
    ) -> Result<Self, PowerError> {
        let (service, path) = PPD_SERVICES[index];
        let proxy = zbus::Proxy::new(&conn, service, path, service).await?;
        let cookie: u32 = proxy
            .call("HoldProfile", &(PERFORMANCE, reason, "corral"))
            .await?;
        Ok(PpdHold {
            conn,
            service,
            path,
            cookie,
        })
    }

    /// `ReleaseProfile(cookie)`.
    pub async fn release(self) -> Result<(), PowerError> {
        let proxy = zbus::Proxy::new(&self.conn, self.service, self.path, self.service).await?;
        proxy
            .call::<_, _, ()>("ReleaseProfile", &(self.cookie,))
            .await?;
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!(
            "`performance` through power-profiles-daemon ({}, cookie {})",
            self.service, self.cookie
        )
    }
}

// ---------------------------------------------------------------------------
// cpufreq sysfs

/// One file and the value it had before corral wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub path: PathBuf,
    pub value: String,
}

/// What corral wrote and must put back; absolute paths, so `corral
/// recover` needs nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRecord {
    pub files: Vec<Saved>,
}

/// The cpufreq files to write for `performance`: each policy's
/// `energy_performance_preference` where the driver has one (intel_pstate,
/// amd-pstate in active mode), else its `scaling_governor` when the
/// governor is offered. `sysfs_root` is `/sys` or a fixture tree.
pub fn cpufreq_targets(sysfs_root: &Path) -> Vec<PathBuf> {
    let dir = sysfs_root.join("devices/system/cpu/cpufreq");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut policies: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("policy"))
        .map(|e| e.path())
        .collect();
    policies.sort();
    policies
        .into_iter()
        .filter_map(|p| {
            let epp = p.join("energy_performance_preference");
            if epp.exists() {
                return Some(epp);
            }
            let offered = std::fs::read_to_string(p.join("scaling_available_governors"))
                .map(|g| g.split_whitespace().any(|g| g == PERFORMANCE))
                .unwrap_or(true);
            let governor = p.join("scaling_governor");
            (governor.exists() && offered).then_some(governor)
        })
        .collect()
}

/// Writes `performance` into `targets`, logging each old value in the
/// record at `record` first (a crash between the two leaves a record that
/// restores values that were never changed, which is harmless). Files that
/// already say `performance` are left out. A failed write puts back what
/// was written. Returns what was changed.
pub fn write_performance(targets: &[PathBuf], record: &Path) -> Result<RestoreRecord, PowerError> {
    let mut saved = RestoreRecord::default();
    for path in targets {
        let value = std::fs::read_to_string(path).map_err(file_error(path))?;
        let value = value.trim().to_owned();
        if value != PERFORMANCE {
            saved.files.push(Saved {
                path: path.clone(),
                value,
            });
        }
    }
    if saved.files.is_empty() {
        return Ok(saved);
    }
    write_record(record, &saved)?;
    for (done, s) in saved.files.iter().enumerate() {
        if let Err(source) = std::fs::write(&s.path, PERFORMANCE) {
            let partial = RestoreRecord {
                files: saved.files[..done].to_vec(),
            };
            put_back(&partial);
            let _ = std::fs::remove_file(record);
            return Err(PowerError::File {
                path: s.path.clone(),
                source,
            });
        }
    }
    Ok(saved)
}

fn write_record(path: &Path, record: &RestoreRecord) -> Result<(), PowerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(file_error(dir))?;
    }
    let text = serde_json::to_vec_pretty(record).map_err(|e| PowerError::Record {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(file_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(file_error(path))
}

/// Writes every saved value back; returns one line per file, failures
/// included.
fn put_back(record: &RestoreRecord) -> Vec<String> {
    record
        .files
        .iter()
        .map(|s| match std::fs::write(&s.path, &s.value) {
            Ok(()) => format!("restored {} = {}", s.path.display(), s.value),
            Err(e) => format!("could not restore {} = {}: {e}", s.path.display(), s.value),
        })
        .collect()
}

/// Puts back every value the record at `path` lists and removes it (stop,
/// `corral recover`, the next start after a crash). No record: nothing to
/// do, an empty list.
pub fn restore_record(path: &Path) -> Result<Vec<String>, PowerError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_error(path)(e)),
    };
    let record: RestoreRecord = serde_json::from_slice(&text).map_err(|e| PowerError::Record {
        path: path.to_owned(),
        message: format!("{e}; fix or remove it"),
    })?;
    let lines = put_back(&record);
    std::fs::remove_file(path).map_err(file_error(path))?;
    Ok(lines)
}

// ---------------------------------------------------------------------------
// The carrier

/// Where [`Power`] looks: the bus power-profiles-daemon is on, the sysfs
/// and /proc roots and the restore record. Tests point all four at
/// fixtures.
#[derive(Debug, Clone)]
pub struct PowerEnv {
    /// None: the system bus.
    pub bus_address: Option<String>,
    pub sysfs_root: PathBuf,
    pub proc_root: PathBuf,
    pub record: PathBuf,
}

impl PowerEnv {
    pub fn system() -> Self {
        PowerEnv {
            bus_address: None,
            sysfs_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            record: PathBuf::from(RESTORE_RECORD),
        }
    }
}

enum Held {
    Nothing,
    Ppd(PpdHold),
    Sysfs(usize),
}

/// Carries out [`PowerRequest`]s. Dropped while sysfs values are written
/// (the loop left with an error), it puts them back.
pub struct Power {
    config: PowerConfig,
    env: PowerEnv,
    held: Held,
}

impl Power {
    /// Puts back what a crashed agent left in the restore record first.
    /// `config.enabled` is reported in each status (the loop decides).
    pub fn new(config: PowerConfig, env: PowerEnv) -> Self {
        match restore_record(&env.record) {
            Ok(lines) if lines.is_empty() => {}
            Ok(lines) => info!(?lines, "power: put back what a crashed agent left"),
            Err(e) => warn!("power: {e}"),
        }
        Power {
            config,
            env,
            held: Held::Nothing,
        }
    }

    fn status(&self, detail: String) -> PowerStatus {
        let method = match &self.held {
            Held::Nothing => None,
            Held::Ppd(_) => Some("ppd".to_owned()),
            Held::Sysfs(_) => Some("sysfs".to_owned()),
        };
        PowerStatus {
            enabled: self.config.enabled,
            method,
            detail,
        }
    }

    /// Carries out one request; says what is held afterwards.
    pub async fn apply(&mut self, request: PowerRequest) -> PowerStatus {
        match request {
            PowerRequest::Hold { sysfs } => self.hold(sysfs).await,
            PowerRequest::Release => self.release().await,
        }
    }

    async fn hold(&mut self, sysfs: bool) -> PowerStatus {
        match &self.held {
            Held::Ppd(h) => return self.status(h.describe()),
            Held::Sysfs(n) => return self.status(sysfs_detail(*n)),
            Held::Nothing => {}
        }
        let mut tried = Vec::new();
        match self.connect().await {
            Ok(conn) => match PpdHold::service_on(&conn).await {
                Ok(Some(index)) => {
                    match PpdHold::take(conn, index, "a game runs (corral)").await {
                        Ok(hold) => {
                            info!("power: holding {}", hold.describe());
                            let detail = hold.describe();
                            self.held = Held::Ppd(hold);
                            return self.status(detail);
                        }
                        // The daemon is there and said no (no performance
                        // profile here): writing sysfs behind it would fight it.
                        Err(e) => {
                            warn!("power: power-profiles-daemon refused the hold: {e}");
                            return self.status(format!(
                                "nothing held: power-profiles-daemon refused `performance`: {e}"
                            ));
                        }
                    }
                }
                Ok(None) => tried.push("no power-profiles-daemon on the system bus".to_owned()),
                Err(e) => tried.push(format!("power-profiles-daemon: {e}")),
            },
            Err(e) => tried.push(format!("system bus: {e}")),
        }
        if crate::model::coexist::running(&self.env.proc_root, "tuned").is_some() {
            return self.status(format!(
                "nothing held: {}; tuned runs, and corral leaves its power settings alone",
                tried.join("; ")
            ));
        }
        if !sysfs {
            return self.status(format!(
                "nothing held: {}; the sysfs fallback is off ([power] sysfs = false)",
                tried.join("; ")
            ));
        }
        let targets = cpufreq_targets(&self.env.sysfs_root);
        if targets.is_empty() {
            return self.status(format!(
                "nothing held: {}; no cpufreq policy offers `performance`",
                tried.join("; ")
            ));
        }
        match write_performance(&targets, &self.env.record) {
            Ok(saved) => {
                info!(
                    files = saved.files.len(),
                    "power: wrote `performance` to cpufreq"
                );
                self.held = Held::Sysfs(targets.len());
                self.status(sysfs_detail(targets.len()))
            }
            Err(e) => {
                warn!("power: {e}");
                self.status(format!("nothing held: {}; {e}", tried.join("; ")))
            }
        }
    }

    async fn release(&mut self) -> PowerStatus {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Nothing => {}
            Held::Ppd(hold) => {
                let cookie = hold.cookie;
                match hold.release().await {
                    Ok(()) => info!(cookie, "power: released the power-profiles-daemon hold"),
                    // Dropping the connection drops the hold anyway.
                    Err(e) => warn!(
                        cookie,
                        "power: ReleaseProfile failed ({e}); hold dropped with the connection"
                    ),
                }
            }
            Held::Sysfs(_) => match restore_record(&self.env.record) {
                Ok(lines) => info!(?lines, "power: cpufreq put back"),
                Err(e) => warn!("power: {e}"),
            },
        }
        self.status(String::new())
    }

    async fn connect(&self) -> zbus::Result<zbus::Connection> {
        let builder = match &self.env.bus_address {
            Some(address) => zbus::connection::Builder::address(address.as_str())?,
            None => zbus::connection::Builder::system()?,
        };
        builder.method_timeout(Duration::from_secs(5)).build().await
    }

    /// Runs in its own task: requests in, a status out after each. Returns
    /// the handle the runner keeps.
    pub fn spawn(mut self, reports: mpsc::Sender<PowerStatus>) -> PowerHandle {
        let (tx, mut rx) = mpsc::channel::<(PowerRequest, Option<oneshot::Sender<()>>)>(8);
        let task = tokio::spawn(async move {
            while let Some((request, done)) = rx.recv().await {
                let status = self.apply(request).await;
                let _ = reports.send(status).await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            self.release().await;
        });
        PowerHandle { tx, task }
    }
}

impl Drop for Power {
    fn drop(&mut self) {
        if matches!(self.held, Held::Sysfs(_)) {
            let _ = restore_record(&self.env.record);
        }
    }
}

fn sysfs_detail(policies: usize) -> String {
    format!(
        "`performance` in cpufreq sysfs ({policies} policies; old values in the restore record)"
    )
}

/// The runner's side of a spawned [`Power`].
pub struct PowerHandle {
    tx: mpsc::Sender<(PowerRequest, Option<oneshot::Sender<()>>)>,
    task: tokio::task::JoinHandle<()>,
}

impl PowerHandle {
    /// Queues a request (never blocks the loop; a full queue is logged).
    pub fn send(&self, request: PowerRequest) {
        if let Err(e) = self.tx.try_send((request, None)) {
            warn!("power: request {request:?} dropped: {e}");
        }
    }

    /// On stop: releases whatever is held and waits for it, at most `limit`.
    pub async fn finish(self, limit: Duration) {
        let (done, wait) = oneshot::channel();
        if self
            .tx
            .send((PowerRequest::Release, Some(done)))
            .await
            .is_ok()
            && tokio::time::timeout(limit, wait).await.is_err()
        {
            warn!("power: release did not finish within {limit:?}");
        }
        drop(self.tx);
        let _ = tokio::time::timeout(limit, self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_say_what_is_held_or_why_not() {
        let mut s = PowerStatus {
            enabled: true,
            method: None,
            detail: String::new(),
        };
        assert!(s.describe().starts_with("idle"), "{}", s.describe());
        s.method = Some("ppd".into());
        s.detail = "`performance` through power-profiles-daemon (x, cookie 1)".into();
        assert!(s.describe().starts_with("holding `performance`"));
        s.enabled = false;
        assert!(s.describe().contains("[power] enabled = false"));
    }
}
