//! The agent's part in the desktop: which power request the mode calls
//! for (hold `performance` while the protected class runs, release when it
//! ends and on stop), which users a VRAM or thermal step is told about
//! (rate limited), and the coexistence findings, re-checked on the sweep.
//! Decisions only: the runner carries out the [`Effect`]s.

use std::collections::BTreeSet;

use tracing::{info, warn};

use super::agent::{Agent, Effect};
use crate::{
    actuate::power::{PowerRequest, PowerStatus},
    model::{coexist, modes::Mode},
    service::desktop_notify::{Notification, RateLimit},
};

/// Power, notification and coexistence state.
pub(super) struct DesktopState {
    /// What the runner was last asked to do (None: nothing yet).
    pub(super) power_asked: Option<PowerRequest>,
    /// What the runner reported back.
    pub(super) power: PowerStatus,
    pub(super) coexist: Vec<coexist::Finding>,
    pub(super) limit: RateLimit,
    /// Effects decided deep in the loop (a ladder step), handed out by
    /// [`Agent::handle`].
    pub(super) outbox: Vec<Effect>,
    pub(super) stopping: bool,
}

impl DesktopState {
    pub(super) fn new(power_enabled: bool) -> Self {
        DesktopState {
            power_asked: None,
            power: PowerStatus {
                enabled: power_enabled,
                ..PowerStatus::default()
            },
            coexist: Vec::new(),
            limit: RateLimit::default(),
            outbox: Vec::new(),
            stopping: false,
        }
    }
}

impl Agent {
    /// The effects decided since the last event, and a power request when
    /// what the mode calls for changed: `Hold` while the protected class
    /// runs and `[power]` is on, `Release` once it ends, on stop, or when
    /// the policy turns power off.
    pub(super) fn desktop_effects(&mut self) -> Vec<Effect> {
        let mut effects = std::mem::take(&mut self.desktop.outbox);
        let power = self.policy.power;
        let want =
            if !self.desktop.stopping && power.enabled && self.modes.mode() == Mode::Protected {
                PowerRequest::Hold { sysfs: power.sysfs }
            } else {
                PowerRequest::Release
            };
        // Nothing was held before the first Hold: no Release to send.
        let asked = self.desktop.power_asked.unwrap_or(PowerRequest::Release);
        if want != asked {
            self.desktop.power_asked = Some(want);
            effects.insert(0, Effect::Power(want));
            if asked != PowerRequest::Release && want != PowerRequest::Release {
                // A reload changed how to hold: give back, then hold anew.
                effects.insert(0, Effect::Power(PowerRequest::Release));
            }
        }
        self.desktop.power.enabled = self.policy.power.enabled;
        effects
    }

    /// The runner's report of what is held.
    pub(super) fn on_power(&mut self, status: PowerStatus) {
        self.desktop.power = status;
    }

    /// Re-detects coexisting tools; logs what appeared and went away.
    /// Looks for other tuners among the processes the table knows (kept
    /// current by kernel records and sweeps: no read of every /proc/PID/comm).
    pub(super) fn check_coexistence(&mut self) {
        let names = self
            .table
            .iter()
            .map(|(pid, p)| (*pid, p.info.comm.as_str()));
        let now = coexist::detect(names, &self.sysfs_root);
        let (appeared, gone) = coexist::changes(&self.desktop.coexist, &now);
        for f in appeared {
            warn!("coexistence: {}", f.describe());
        }
        for f in gone {
            info!(tool = %f.tool, "coexistence: no longer running");
        }
        self.desktop.coexist = now;
    }

    /// Tells the owners of `classes`' processes, each at most once per
    /// `[notifications] min_interval_ms` for this `kind`.
    pub(super) fn notify_users(&mut self, classes: &[&str], kind: &str, n: Notification) {
        let config = self.policy.notifications;
        if !config.desktop {
            return;
        }
        let uids: BTreeSet<u32> = self
            .table
            .iter()
            .filter(|(_, p)| classes.contains(&p.decision.class.as_str()))
            .filter_map(|(pid, _)| self.procs.owner(*pid))
            .filter(|uid| *uid != 0)
            .collect();
        let now = self.now();
        for uid in uids {
            if self
                .desktop
                .limit
                .allow(uid, kind, now, config.min_interval)
            {
                self.desktop.outbox.push(Effect::Desktop {
                    uid,
                    notification: n.clone(),
                });
            }
        }
    }

    /// The power line of status and explain.
    pub fn power_status(&self) -> &PowerStatus {
        &self.desktop.power
    }

    pub fn coexistence(&self) -> &[coexist::Finding] {
        &self.desktop.coexist
    }
}
