//! The agent's read models: the snapshots `corral status`, `explain`,
//! `placements` and the metrics endpoint are built from. Reads state only.

use std::collections::BTreeSet;

use super::agent::Agent;
use crate::{
    actuate::cgroup::{Group, Groups},
    kernel::bpf::{SchedStats, Tracer},
    model::{classify, modes::Mode},
    observe::metrics::{self, ClassMetrics, GpuMetrics, Histogram, Metrics},
    service::control::{self, AncestorLine, ClassStatus, Explanation, Request, Response, Status},
};

/// One class of the policy as it stands, for the read models.
struct ClassNow<'a> {
    name: &'a str,
    group: Option<&'a Group>,
    processes: usize,
    placements: u64,
    sched: Option<SchedStats>,
}

impl Agent {
    /// Each class of the policy, in policy order, with its group and counts.
    fn classes_now(&self) -> impl Iterator<Item = ClassNow<'_>> {
        self.policy.classes.values().map(|class| ClassNow {
            name: &class.name,
            group: self.placer.layout().group(&class.name),
            processes: self.table.count(&class.name),
            placements: self
                .placements_by_class
                .get(&class.name)
                .copied()
                .unwrap_or(0),
            sched: self.sched_stats(&class.name),
        })
    }

    /// Everything the agent exports, as of now.
    pub fn metrics(&self) -> Metrics {
        let vram = self
            .gpu
            .last
            .as_ref()
            .map(|s| self.vram_by_class(s))
            .unwrap_or_default();
        let classes = self
            .classes_now()
            .map(|c| {
                let mut m = ClassMetrics {
                    processes: c.processes as u64,
                    cpu_seconds: c.sched.as_ref().map_or(0.0, |s| s.oncpu_ns as f64 / 1e9),
                    runqueue_latency: c.sched.as_ref().map_or_else(
                        || Histogram::from_log2_us(&[]),
                        |s| Histogram::from_log2_us(&s.runq_hist),
                    ),
                    placements: c.placements,
                    cpus: c.group.map_or(0, |g| g.cpus.len() as u64),
                    ..Default::default()
                };
                if let Some(pressure) = c
                    .group
                    .and_then(|g| std::fs::read_to_string(g.path.join("cpu.pressure")).ok())
                {
                    m.set_cpu_pressure(&pressure);
                }
                if let Some(snapshot) = &self.gpu.last {
                    m.vram_used_bytes = Some(vram.get(c.name).copied().unwrap_or(0));
                    let total = snapshot.devices.first().map_or(0, |d| d.total_bytes);
                    m.vram_budget_bytes = self
                        .policy
                        .gpu
                        .arbiter
                        .classes
                        .iter()
                        .find(|b| b.class == c.name)
                        .and_then(|b| b.max.or(b.reserve))
                        .map(|a| a.bytes(total));
                }
                (c.name.to_owned(), m)
            })
            .collect();
        let (rss, cpu) = metrics::read_self();
        Metrics {
            classes,
            placement_latency: self.placement_latency.clone(),
            events: metrics::EventCounts {
                exec: self.counts.exec,
                fork: self.counts.fork,
                exit: self.counts.exit,
            },
            events_dropped_total: self.kernel.dropped,
            events_vanished_total: self.counts.vanished,
            move_errors_total: self.counts.move_errors,
            policy_reloads: self.reloads,
            gpus: self
                .gpu
                .last
                .as_ref()
                .map(|snapshot| {
                    snapshot
                        .devices
                        .iter()
                        .map(|d| GpuMetrics {
                            index: d.index,
                            name: d.name.clone(),
                            utilization_ratio: d.utilization_gpu.map(|u| f64::from(u) / 100.0),
                            temperature_celsius: d.temperature_c.map(f64::from),
                            power_watts: d.power_mw.map(|mw| f64::from(mw) / 1000.0),
                            memory_used_bytes: Some(d.used_bytes),
                            memory_total_bytes: Some(d.total_bytes),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            agent_resident_memory_bytes: rss,
            agent_cpu_seconds_total: cpu,
            mode: self.modes.mode(),
            power_held: self.desktop.power.method.clone(),
            coexisting: self
                .desktop
                .coexist
                .iter()
                .map(|f| f.tool.clone())
                .collect(),
        }
    }

    /// Scheduling statistics of a class, when telemetry is on.
    pub fn sched_stats(&self, class: &str) -> Option<SchedStats> {
        let tracer = self.tracer.as_ref().filter(|t| t.telemetry_on())?;
        Some(tracer.sched_stats(*self.slots.get(class)?))
    }

    /// A short line for systemd's STATUS=.
    pub(super) fn one_line_status(&self) -> String {
        let placed: u64 = self.placements_by_class.values().sum();
        format!(
            "{} processes tracked, {placed} placed, mode {}",
            self.table.len(),
            self.modes.mode()
        )
    }

    pub fn answer(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Explain { pid, rules } => match self.explain(pid, rules) {
                Some(e) => Response::Explain(Box::new(e)),
                None => Response::Error {
                    message: format!("process {pid} is not tracked (it may have exited)"),
                },
            },
            Request::Placements => Response::Placements {
                placements: self
                    .placements
                    .iter()
                    .map(|p| control::Placement {
                        pid: p.pid,
                        class: p.class.to_string(),
                        exec_ns: p.exec_ns,
                        handled_ns: p.handled_ns,
                        placed_ns: p.placed_ns,
                        joined_ns: self.placer.joined_ns(p.pid),
                    })
                    .collect(),
            },
            Request::Reload | Request::Enter { .. } => Response::Error {
                message: "handled by the loop".into(),
            },
        }
    }

    pub(super) fn status(&self) -> Status {
        let (rss, cpu) = metrics::read_self();
        let classes = self
            .classes_now()
            .map(|c| ClassStatus {
                class: c.name.to_owned(),
                processes: c.processes,
                cgroup: c.group.map(|g| g.path.display().to_string()),
                cpus: c.group.map(|g| g.cpus.to_string()),
                base_cpus: c.group.map(|g| g.base.to_string()),
                why: c.group.map(|g| g.why.clone()),
                cpu_weight: c.group.map(|g| g.cpu_weight),
                placements: c.placements,
                note: c.group.and_then(|g| g.note.clone()),
                sched: c.sched,
            })
            .collect();
        Status {
            policy: self.policy.describe_files(),
            policy_warnings: self.policy.warnings.clone(),
            last_reload: self.last_reload.clone(),
            mode: match self.modes.mode() {
                Mode::Shared => "shared",
                Mode::Protected => "protected",
            }
            .to_owned(),
            mode_why: self.modes.why_counting(self.protected_running()),
            cgroup_root: self.placer.layout().root.display().to_string(),
            backend: self.placer.backend().to_owned(),
            backend_notes: self.placer.notes(),
            protected_class: self.protected().to_owned(),
            protected_launches: self.protected_running(),
            cpuset_enforced: self.placer.layout().cpuset,
            dry_run: self.placer.layout().dry_run,
            tracked: self.table.len(),
            classes,
            events: self.counts.clone(),
            kernel: self.kernel,
            bpf_programs: self
                .tracer
                .as_ref()
                .map(Tracer::program_stats)
                .unwrap_or_default(),
            metrics_addr: self.metrics_bound.map(|a| a.to_string()),
            gpu: self.gpu_status(),
            power: self.desktop.power.clone(),
            coexistence: self.desktop.coexist.clone(),
            gamemode: self.gamemode_lines(),
            agent_rss_bytes: rss,
            agent_cpu_seconds: cpu,
        }
    }

    /// With `rules`, every rule of the policy is judged against the process
    /// as the table knows it (`corral explain --rules`).
    pub(super) fn explain(&self, pid: u32, rules: bool) -> Option<Explanation> {
        let process = self.table.get(pid)?;
        let group = self.placer.layout().group(&process.decision.class);
        let ancestry = self
            .table
            .ancestors(pid)
            .iter()
            .filter_map(|a| self.table.get(*a).map(|p| (a, p)))
            .map(|(a, p)| AncestorLine {
                pid: *a,
                comm: p.info.comm.clone(),
                class: p.decision.class.clone(),
                rule: p.decision.rule.clone(),
            })
            .collect();
        let live = self.procs.read(pid, &BTreeSet::new()).ok();
        let cgroup_now = live
            .as_ref()
            .map(|read| read.info.cgroup.clone())
            .unwrap_or_default();
        // The exec path reads the exe and argv only when a rule can use
        // them; show them anyway.
        let (exe, argv) = match live {
            Some(read) => (
                if process.facts.exe {
                    process.info.exe.clone()
                } else {
                    read.info.exe
                },
                if process.facts.argv {
                    process.info.argv.clone()
                } else {
                    read.info.argv
                },
            ),
            None => (process.info.exe.clone(), process.info.argv.clone()),
        };
        Some(Explanation {
            pid,
            comm: process.info.comm.clone(),
            exe,
            argv,
            decision: process.decision.clone(),
            group: group.map(|g| g.path.display().to_string()),
            class_cpus: group.map(|g| g.cpus.to_string()),
            cgroup_now,
            cpus_allowed: cpus_allowed(pid).unwrap_or_default(),
            ancestry,
            vram_bytes: self.gpu.last.as_ref().and_then(|s| {
                s.devices
                    .iter()
                    .flat_map(|d| &d.processes)
                    .filter(|p| p.pid == pid)
                    .filter_map(|p| p.used_bytes)
                    .reduce(|a, b| a + b)
            }),
            gpu_actions: self
                .gpu
                .actions
                .iter()
                .filter(|a| a.class == process.decision.class)
                .cloned()
                .collect(),
            backend: self.placer.backend().to_owned(),
            placement: self.placer.describe(pid),
            rules: if rules {
                classify::explain_in_table(&self.policy, &self.table, pid)
            } else {
                Vec::new()
            },
            power: (process.decision.class == self.protected())
                .then(|| self.desktop.power.describe()),
        })
    }

    /// The class layout of the placement backend.
    pub fn layout(&self) -> &Groups {
        self.placer.layout()
    }
}

/// `Cpus_allowed_list` of a process.
pub fn cpus_allowed(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
}
