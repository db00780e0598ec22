//! The agent's GPU coordination: NVML snapshots in, arbiter and thermal
//! guard decisions out, carried out through the placer (freeze, thaw,
//! kill) and the askers; dmem limits where the kernel has them.

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
};

use tracing::{error, info, warn};

use super::{agent::Agent, daemon::monotonic_ns};
use crate::{
    actuate::cgroup::{self as cgroupfs, Groups},
    gpu::{
        arbiter::{Action, ActionKind, Arbiter, Observation},
        askers,
        nvml::{GpuEvent, GpuSnapshot},
        thermal::{self, ThermalAction, ThermalGuard},
    },
    model::{cpus::CpuList, policy::Policy},
    service::{
        control::{GpuActionRecord, GpuStatus},
        desktop_notify::{Notification, Urgency},
    },
};

/// How many GPU actions are kept for `corral status` and `explain`.
const GPU_ACTION_LOG: usize = 64;

/// VRAM coordination state: the last poll, the arbiter, the thermal guard.
pub(super) struct GpuState {
    pub(super) on: bool,
    /// Why the GPU feature is off (said once).
    pub(super) off_reason: Option<String>,
    pub(super) last: Option<GpuSnapshot>,
    pub(super) arbiter: Arbiter,
    pub(super) thermal: ThermalGuard,
    /// The thermal guard shrank the background classes' core sets.
    pub(super) cooling: Option<String>,
    pub(super) actions: VecDeque<GpuActionRecord>,
    pub(super) action_counts: BTreeMap<String, u64>,
    /// dmem limits written ("class file bytes").
    pub(super) dmem_applied: Vec<String>,
}

impl GpuState {
    pub(super) fn new(policy: &Policy) -> Self {
        GpuState {
            on: false,
            off_reason: (!policy.gpu.enabled)
                .then(|| "off in the policy ([gpu] enabled = false)".to_owned()),
            last: None,
            arbiter: Arbiter::new(policy.gpu.arbiter.clone()),
            thermal: ThermalGuard::new(policy.gpu.thermal.clone()),
            cooling: None,
            actions: VecDeque::new(),
            action_counts: BTreeMap::new(),
            dmem_applied: Vec::new(),
        }
    }
}

impl Agent {
    pub(super) fn on_gpu(&mut self, event: GpuEvent) {
        match event {
            GpuEvent::Off { reason } => {
                warn!("GPU features off: {reason}");
                self.gpu.on = false;
                self.gpu.off_reason = Some(reason);
                let now = self.now();
                let actions = self.gpu.arbiter.release_all(now, "the GPU went away");
                self.execute(actions);
            }
            GpuEvent::On => {
                info!("GPU features on");
                self.gpu.on = true;
                self.gpu.off_reason = None;
            }
            GpuEvent::Snapshot(snapshot) => {
                self.gpu.on = true;
                self.gpu.off_reason = None;
                self.arbitrate(&snapshot);
                self.thermal(&snapshot);
                self.gpu.last = Some(snapshot);
            }
        }
    }

    /// VRAM used per class on the first GPU, from its process list.
    pub(super) fn vram_by_class(&self, snapshot: &GpuSnapshot) -> BTreeMap<String, u64> {
        let mut used = BTreeMap::new();
        if let Some(device) = snapshot.devices.first() {
            for p in &device.processes {
                let Some(bytes) = p.used_bytes else { continue };
                let class = self
                    .table
                    .get(p.pid)
                    .map_or(crate::model::policy::SYSTEM, |t| t.decision.class.as_str());
                *used.entry(class.to_owned()).or_insert(0) += bytes;
            }
        }
        used
    }

    pub(super) fn arbitrate(&mut self, snapshot: &GpuSnapshot) {
        let Some(device) = snapshot.devices.first() else {
            return;
        };
        let observation = Observation {
            now: self.now(),
            total_bytes: device.total_bytes,
            free_bytes: device.free_bytes,
            used_by_class: self.vram_by_class(snapshot),
            protected_running: self.protected_active(),
        };
        let actions = self.gpu.arbiter.decide(&observation);
        self.execute(actions);
    }

    pub(super) fn thermal(&mut self, snapshot: &GpuSnapshot) {
        let gpu_c = snapshot
            .devices
            .iter()
            .filter_map(|d| d.temperature_c)
            .max()
            .map(f64::from);
        let cpu_c = thermal::cpu_temperature(&self.sysfs_root);
        match self.gpu.thermal.observe(self.now(), gpu_c, cpu_c) {
            Some(ThermalAction::Cool { reason }) => {
                warn!(
                    "thermal guard: {reason}; halving the core sets of {:?}",
                    self.policy.cooled_classes()
                );
                let mut affected: Vec<String> = self.policy.cooled_classes().to_vec();
                affected.push(self.protected().to_owned());
                let affected: Vec<&str> = affected.iter().map(String::as_str).collect();
                self.notify_users(
                    &affected,
                    "thermal",
                    Notification {
                        summary: "corral: thermal emergency".to_owned(),
                        body: format!(
                            "{reason}; {} get half their CPUs until it cools down",
                            self.policy.cooled_classes().join(", ")
                        ),
                        urgency: Urgency::Critical,
                    },
                );
                self.gpu.cooling = Some(reason);
                self.apply_layout();
            }
            Some(ThermalAction::Restore { reason }) => {
                info!("thermal guard: {reason}; core sets restored");
                self.gpu.cooling = None;
                self.apply_layout();
            }
            None => {}
        }
    }

    /// Carries out arbiter actions; each is logged with its reason and
    /// counted. Asking applications happens in the background.
    pub(super) fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            if action.class == self.protected() {
                error!(
                    "refusing a GPU action on the protected class `{}`: {:?}",
                    action.class, action.kind
                );
                continue;
            }
            let managed = self.placer.layout().group(&action.class).is_some();
            // The ladder steps the class's users should hear of.
            let told = match action.kind {
                ActionKind::Notify => Some("VRAM needed by a game"),
                ActionKind::Freeze => Some("paused to free VRAM for a game"),
                ActionKind::Kill => Some("stopped to free VRAM for a game"),
                ActionKind::Ask | ActionKind::Thaw => None,
            };
            if let Some(what) = told {
                let kind = format!("vram-{:?}", action.kind).to_lowercase();
                self.notify_users(
                    &[action.class.as_str()],
                    &kind,
                    Notification {
                        summary: format!("corral: `{}` {what}", action.class),
                        body: action.reason.clone(),
                        urgency: Urgency::Normal,
                    },
                );
            }
            let outcome = match (action.kind, managed) {
                (ActionKind::Notify, _) if self.policy.notifications.desktop => {
                    "notified".to_owned()
                }
                (ActionKind::Notify, _) => {
                    "logged (desktop notifications off in the policy)".to_owned()
                }
                (ActionKind::Ask, _) => self.ask(&action.class),
                (ActionKind::Freeze, true) => match self.placer.set_frozen(&action.class, true) {
                    Ok(()) => "frozen".to_owned(),
                    Err(e) => format!("freeze failed: {e}"),
                },
                (ActionKind::Thaw, true) => match self.placer.set_frozen(&action.class, false) {
                    Ok(()) => "thawed".to_owned(),
                    Err(e) => format!("thaw failed: {e}"),
                },
                (ActionKind::Kill, true) => match self.placer.kill(&action.class) {
                    Ok(n) => format!("killed {n} processes"),
                    Err(e) => format!("kill failed: {e}"),
                },
                (_, false) => "class has no group; nothing to do".to_owned(),
            };
            warn!(class = %action.class, kind = ?action.kind, "{} -> {outcome}", action.reason);
            let kind = format!("{:?}", action.kind).to_lowercase();
            *self
                .gpu
                .action_counts
                .entry(format!("{}:{kind}", action.class))
                .or_default() += 1;
            if self.gpu.actions.len() == GPU_ACTION_LOG {
                self.gpu.actions.pop_front();
            }
            self.gpu.actions.push_back(GpuActionRecord {
                at_ns: monotonic_ns(),
                class: action.class,
                kind,
                reason: action.reason,
                outcome,
            });
        }
    }

    /// Asks the class's applications that can give VRAM back (ComfyUI,
    /// ollama) to do so, in the background. Returns what was asked.
    pub(super) fn ask(&self, class: &str) -> String {
        let mut asked: Vec<askers::AskTarget> = Vec::new();
        for (pid, p) in self.table.iter().filter(|(_, p)| p.decision.class == class) {
            // The askers look at argv, cwd and the environment, which the
            // exec path reads only when a rule can use them.
            let fresh;
            let info = if p.facts.is_all() {
                &p.info
            } else {
                match self.procs.read(*pid, &self.env_keys) {
                    Ok(read) => {
                        fresh = read.info;
                        &fresh
                    }
                    Err(_) => continue,
                }
            };
            let Some(target) = askers::asker_for(info) else {
                continue;
            };
            if asked.contains(&target) {
                continue;
            }
            asked.push(target);
            tokio::spawn(async move {
                match target.ask().await {
                    Ok(done) => info!("{done}"),
                    Err(e) => warn!("{e}"),
                }
            });
        }
        if asked.is_empty() {
            "nothing in the class knows how to give VRAM back (ComfyUI, ollama)".to_owned()
        } else {
            format!(
                "asked {}",
                asked
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    /// The GPU part of `corral status`.
    pub(super) fn gpu_status(&self) -> GpuStatus {
        GpuStatus {
            on: self.gpu.on,
            off_reason: self.gpu.off_reason.clone(),
            snapshot: self.gpu.last.clone(),
            vram_by_class: self
                .gpu
                .last
                .as_ref()
                .map(|s| self.vram_by_class(s))
                .unwrap_or_default(),
            arbiter: Some(self.gpu.arbiter.state()),
            cooling: self.gpu.cooling.clone(),
            actions: self.gpu.actions.iter().cloned().collect(),
            action_counts: self.gpu.action_counts.clone(),
            dmem: match cgroupfs::dmem_support(&place_mount(self.placer.layout())) {
                cgroupfs::DmemSupport::Absent { reason } => format!("absent: {reason}"),
                cgroupfs::DmemSupport::Present { regions } => {
                    format!("present: {regions:?}; set: {:?}", self.gpu.dmem_applied)
                }
            },
        }
    }

    /// Where the kernel has the dmem cgroup controller and the driver a
    /// VRAM region: `dmem.low` for the game's reserve and `dmem.max` for the
    /// other classes' budgets, on the first region. Absent: said in status.
    pub fn apply_dmem(&mut self) {
        // dmem files live in corral's own groups; under systemd there are
        // none to write (systemd has no dmem properties yet).
        if !self.policy.gpu.enabled
            || self.placer.layout().dry_run
            || self.placer.backend() != "cgroupfs"
        {
            return;
        }
        let cgroupfs::DmemSupport::Present { regions } =
            cgroupfs::dmem_support(&place_mount(self.placer.layout()))
        else {
            return;
        };
        let Some((region, capacity)) = regions.first().cloned() else {
            return;
        };
        let mut applied = Vec::new();
        for budget in &self.policy.gpu.arbiter.classes {
            let Some(group) = self.placer.layout().group(&budget.class) else {
                continue;
            };
            let (file, amount) = if budget.class == self.policy.gpu.arbiter.protected_class {
                ("dmem.low", budget.reserve)
            } else {
                ("dmem.max", budget.max)
            };
            let Some(amount) = amount else { continue };
            let bytes = amount.bytes(capacity);
            match cgroupfs::set_dmem(&group.path, file, &region, bytes) {
                Ok(()) => applied.push(format!("{} {file} {bytes}", budget.class)),
                Err(e) => warn!(class = %budget.class, "could not set {file}: {e}"),
            }
        }
        if !applied.is_empty() {
            info!(region, ?applied, "dmem limits set");
        }
        self.gpu.dmem_applied = applied;
    }
}

/// The first half of a CPU list (at least one CPU): what the thermal guard
/// leaves the background classes.
pub(super) fn halve(cpus: &CpuList) -> CpuList {
    let all: Vec<u32> = cpus.iter().collect();
    let keep = all.len().div_ceil(2).max(1).min(all.len());
    all[..keep].iter().copied().collect()
}

fn place_mount(groups: &Groups) -> PathBuf {
    crate::actuate::cgroup::cgroup2_mount_of(&groups.root)
}
