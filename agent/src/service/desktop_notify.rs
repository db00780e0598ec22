//! Desktop notifications to the users a VRAM ladder step or a thermal
//! emergency affects: `org.freedesktop.Notifications.Notify` on each
//! user's own session bus (`/run/user/UID/bus`), connected with that
//! user's credentials (a root agent has no session bus of its own, so
//! `notify-send` from it reached no one). Rate limited per user and kind;
//! `[notifications] desktop = false` turns them off.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::Duration,
};

use tracing::{debug, info};
use zbus::zvariant::Value;

use crate::actuate::systemd_bus;

/// Where users' runtime directories are.
pub const RUNTIME_ROOT: &str = "/run/user";

/// How long one delivery may take before it is given up.
const DELIVERY_LIMIT: Duration = Duration::from_secs(5);

/// The freedesktop urgency levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Normal = 1,
    Critical = 2,
}

/// One notification for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub summary: String,
    pub body: String,
    pub urgency: Urgency,
}

/// At most one notification per (user, kind) each `min_interval`.
#[derive(Debug, Default)]
pub struct RateLimit {
    last: HashMap<(u32, String), Duration>,
}

impl RateLimit {
    /// Whether a notification of `kind` may go to `uid` at `now`; remembers
    /// it when it may.
    pub fn allow(&mut self, uid: u32, kind: &str, now: Duration, min_interval: Duration) -> bool {
        let key = (uid, kind.to_owned());
        match self.last.get(&key) {
            Some(at) if now.saturating_sub(*at) < min_interval => false,
            _ => {
                self.last.insert(key, now);
                true
            }
        }
    }
}

/// Sends `n` to `uid`'s session bus under `runtime_root` (`/run/user`);
/// returns the notification id the server gave.
pub async fn send(runtime_root: &Path, uid: u32, n: &Notification) -> anyhow::Result<u32> {
    let path = runtime_root.join(uid.to_string()).join("bus");
    let conn = systemd_bus::user_bus_connection(uid, &path).await?;
    let proxy = zbus::Proxy::new(
        &conn,
        "org.freedesktop.Notifications",
        "/org/freedesktop/Notifications",
        "org.freedesktop.Notifications",
    )
    .await?;
    let hints: BTreeMap<&str, Value<'_>> =
        BTreeMap::from([("urgency", Value::U8(n.urgency as u8))]);
    let actions: Vec<&str> = Vec::new();
    let id: u32 = proxy
        .call(
            "Notify",
            &(
                "corral",
                0u32,
                "",
                n.summary.as_str(),
                n.body.as_str(),
                actions,
                hints,
                -1i32,
            ),
        )
        .await?;
    Ok(id)
}

/// [`send`] in the background, for the runner: never blocks the loop;
/// failures (no session, no notification server) are logged only.
pub fn spawn(runtime_root: PathBuf, uid: u32, n: Notification) {
    tokio::spawn(async move {
        match tokio::time::timeout(DELIVERY_LIMIT, send(&runtime_root, uid, &n)).await {
            Ok(Ok(id)) => info!(uid, id, summary = %n.summary, "desktop notification sent"),
            Ok(Err(e)) => debug!(uid, "desktop notification not delivered: {e:#}"),
            Err(_) => debug!(uid, "desktop notification timed out"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_notification_per_user_and_kind_per_interval() {
        let mut limit = RateLimit::default();
        let s = Duration::from_secs;
        let every = s(60);
        assert!(limit.allow(1000, "vram", s(0), every));
        assert!(!limit.allow(1000, "vram", s(59), every), "too soon");
        assert!(limit.allow(1000, "thermal", s(59), every), "another kind");
        assert!(limit.allow(1001, "vram", s(59), every), "another user");
        assert!(
            limit.allow(1000, "vram", s(60), every),
            "the interval passed"
        );
        assert!(!limit.allow(1000, "vram", s(61), every));
    }
}
