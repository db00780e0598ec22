//! `[power]` and `[notifications]`: the desktop's power profile while the
//! protected class runs, and desktop notifications of VRAM and thermal steps.

use std::time::Duration;

use serde::Deserialize;

use super::Layer;

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct PowerSpec {
    pub(super) enabled: Option<bool>,
    pub(super) sysfs: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct NotificationsSpec {
    pub(super) desktop: Option<bool>,
    pub(super) min_interval_ms: Option<u64>,
}

pub(super) const POWER_KEYS: &[&str] = &["enabled", "sysfs"];
pub(super) const NOTIFICATIONS_KEYS: &[&str] = &["desktop", "min_interval_ms"];

/// `[power]`: hold `performance` while the protected class runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerConfig {
    pub enabled: bool,
    /// Without power-profiles-daemon, write cpufreq's EPP or governor.
    pub sysfs: bool,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig {
            enabled: true,
            sysfs: true,
        }
    }
}

impl PowerConfig {
    pub(super) fn merged(layers: &[Layer]) -> Self {
        let mut c = PowerConfig::default();
        for p in layers.iter().filter_map(|l| l.file.power.as_ref()) {
            c.enabled = p.enabled.unwrap_or(c.enabled);
            c.sysfs = p.sysfs.unwrap_or(c.sysfs);
        }
        c
    }
}

/// `[notifications]`: desktop notifications to the affected users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotificationsConfig {
    pub desktop: bool,
    /// At most one notification of a kind per user this often.
    pub min_interval: Duration,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            desktop: true,
            min_interval: Duration::from_secs(60),
        }
    }
}

impl NotificationsConfig {
    pub(super) fn merged(layers: &[Layer]) -> Self {
        let mut c = NotificationsConfig::default();
        for n in layers.iter().filter_map(|l| l.file.notifications.as_ref()) {
            c.desktop = n.desktop.unwrap_or(c.desktop);
            if let Some(ms) = n.min_interval_ms {
                c.min_interval = Duration::from_millis(ms);
            }
        }
        c
    }
}
