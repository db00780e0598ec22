//! The text views of the `corral` command as pure functions of what they
//! show: `render_*(&T) -> String`. main.rs fetches or computes `T` and
//! prints the String; nothing here reads, writes or prints anything.
//!
//! Every string that came from a process (or from a file the user gave)
//! goes through [`escape`] here, so no view writes a raw control byte.
//!
//! Length: more than half is golden tests of the views.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    actuate::cgroup::ReleaseReport,
    model::classify::{Decision, RuleVerdict},
    model::coresets::Resolved,
    model::cpus::CpuList,
    model::policy::Policy,
    model::procs::Table,
    observe::escape::escape,
    service::control::{Explanation, ReloadStatus, Status},
};

/// Lines joined, each ending in a newline (none for no lines).
fn text(lines: Vec<String>) -> String {
    lines.into_iter().map(|l| l + "\n").collect()
}

/// `corral status`: the groups, one row per class, the mode, the GPU, a
/// refused reload and the event counters.
pub fn render_status(s: &Status) -> String {
    let mut lines = vec![
        format!("policy  {}", escape(&s.policy)),
        match s.backend.as_str() {
            "systemd" => "backend systemd: each process stays in its own manager, in its class's slice corral-<class>.slice".to_owned(),
            other => format!("backend {}", escape(other)),
        },
        format!(
            "cgroups {}  (core sets {}){}",
            escape(&s.cgroup_root),
            if s.cpuset_enforced {
                "enforced"
            } else {
                "NOT enforced: no cpuset controller"
            },
            if s.dry_run { "  DRY RUN" } else { "" }
        ),
        format!(
            "{:<8} {:>6} {:>10} {:>8} {:>7}  cgroup",
            "class", "procs", "cpus", "weight", "placed"
        ),
    ];
    for c in &s.classes {
        lines.push(format!(
            "{:<8} {:>6} {:>10} {:>8} {:>7}  {}",
            escape(&c.class),
            c.processes,
            escape(c.cpus.as_deref().unwrap_or("dynamic")),
            c.cpu_weight
                .map(|w| w.to_string())
                .unwrap_or_else(|| "-".into()),
            c.placements,
            escape(c.cgroup.as_deref().unwrap_or("(left alone)"))
        ));
        if let Some(note) = &c.note {
            lines.push(format!("{:<8} note: {}", "", escape(note)));
        }
    }
    for note in &s.backend_notes {
        lines.push(format!("note    {}", escape(note)));
    }
    lines.push(format!(
        "mode    {} ({})",
        escape(&s.mode),
        escape(&s.mode_why)
    ));
    lines.push(format!("power   {}", escape(&s.power.describe())));
    for f in &s.coexistence {
        lines.push(format!("coexist {}", escape(&f.describe())));
    }
    for line in &s.gamemode {
        lines.push(format!("GameMode: {}", escape(line)));
    }
    match (&s.gpu.on, &s.gpu.off_reason) {
        (true, _) => {
            let used: Vec<String> = s
                .gpu
                .vram_by_class
                .iter()
                .map(|(c, b)| format!("{} {} MiB", escape(c), b >> 20))
                .collect();
            lines.push(format!(
                "gpu     on; VRAM by class: {}",
                if used.is_empty() {
                    "-".into()
                } else {
                    used.join(", ")
                }
            ));
            if let Some(a) = s.gpu.actions.last() {
                lines.push(format!(
                    "        last action: {} on `{}`: {} -> {}",
                    escape(&a.kind),
                    escape(&a.class),
                    escape(&a.reason),
                    escape(&a.outcome)
                ));
            }
        }
        (false, Some(reason)) => lines.push(format!("gpu     off: {}", escape(reason))),
        (false, None) => lines.push("gpu     waiting for the first NVML poll".into()),
    }
    if let Some(reload) = s.last_reload.as_ref().filter(|r| !r.ok) {
        lines.push(format!(
            "reload  REFUSED, last good policy kept: {}",
            escape(&reload.message)
        ));
    }
    let e = &s.events;
    lines.push(format!(
        "events  exec {} fork {} exit {}  seen; dropped {} (ring buffer full), vanished {}, move errors {}, tracked {}",
        e.exec, e.fork, e.exit, s.kernel.dropped, e.vanished, e.move_errors, s.tracked
    ));
    text(lines)
}

/// `corral explain PID`: class, rule with `file:line`, group, what /proc
/// says now, VRAM, GPU actions and the ancestry the decision used.
pub fn render_explanation(e: &Explanation) -> String {
    let d = &e.decision;
    let (class, rule) = (escape(&d.class), escape(&d.rule));
    let argv: Vec<_> = e.argv.iter().map(|a| escape(a)).collect();
    let mut lines = vec![
        format!("pid {} ({})  {}", e.pid, escape(&e.comm), escape(&e.exe)),
        format!("  argv      {}", argv.join(" ")),
        format!("  class     {class}"),
        match (d.source.as_deref().map(escape), &d.inherited_from) {
            (Some(source), None) => format!("  rule      {rule} ({source})"),
            (Some(source), Some(a)) => format!(
                "  rule      {rule} ({source}), inherited from pid {} ({})",
                a.pid,
                escape(&a.comm)
            ),
            (None, _) => format!("  rule      {rule} (no rule matched; left alone)"),
        },
        match (&e.group, &e.class_cpus) {
            (Some(group), Some(cpus)) => {
                format!("  group     {}  cpus {}", escape(group), escape(cpus))
            }
            _ => format!("  group     none (class `{class}` is not managed)"),
        },
        format!("  cgroup    {} (now)", escape(&e.cgroup_now)),
        format!(
            "  cpus      {} (Cpus_allowed_list now)",
            escape(&e.cpus_allowed)
        ),
    ];
    if let Some(placement) = &e.placement {
        lines.push(format!("  unit      {}", escape(placement)));
    }
    if let Some(power) = &e.power {
        lines.push(format!("  power     {}", escape(power)));
    }
    if let Some(bytes) = e.vram_bytes {
        lines.push(format!("  vram      {} MiB", bytes >> 20));
    }
    for a in &e.gpu_actions {
        lines.push(format!(
            "  gpu       {} on `{}`: {} -> {}",
            escape(&a.kind),
            escape(&a.class),
            escape(&a.reason),
            escape(&a.outcome)
        ));
    }
    if !e.ancestry.is_empty() {
        lines.push("  ancestry".into());
        for a in &e.ancestry {
            lines.push(format!(
                "    {:>7} {:<16} {:<8} {}",
                a.pid,
                escape(&a.comm),
                escape(&a.class),
                escape(&a.rule)
            ));
        }
    }
    if !e.rules.is_empty() {
        lines.push("  rules     (in order; the first that matches decides)".into());
        lines.extend(rule_lines(&e.rules));
    }
    text(lines)
}

/// `--rules`: one line per rule, with the first matcher that failed.
fn rule_lines(rules: &[RuleVerdict]) -> Vec<String> {
    let mut decided = false;
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let verdict = match &r.failed {
                Some(why) => why.clone(),
                None if decided => "matches, but a rule above decided".to_owned(),
                None => {
                    decided = true;
                    "MATCHES, decides".to_owned()
                }
            };
            format!(
                "    {:>3}. {} -> {} ({}): {verdict}",
                i + 1,
                r.rule,
                r.class,
                r.source
            )
        })
        .collect()
}

/// `corral classify --explain`: the chain's class, then every rule against
/// its last process.
pub fn render_chain_explained(
    id: &serde_json::Value,
    decision: &Decision,
    rules: &[RuleVerdict],
) -> String {
    let from = decision
        .inherited_from
        .as_ref()
        .map(|a| format!(", inherited from {} (depth {})", a.comm, a.depth))
        .unwrap_or_default();
    let mut lines = vec![format!(
        "{}: {} by {}{from}",
        chain_id(id),
        decision.class,
        decision.rule
    )];
    lines.extend(rule_lines(rules));
    text(lines)
}

/// `corral reload` when the agent accepted the policy.
pub fn render_reload(r: &ReloadStatus) -> String {
    let mut lines = vec![format!(
        "reloaded: {} processes re-classified, {} moved, in {} us",
        r.reclassified, r.moves, r.duration_us
    )];
    // The message is warnings, one per line.
    lines.extend(r.message.lines().map(|l| escape(l).into_owned()));
    text(lines)
}

/// One class per line: its CPUs here and how the policy got there.
fn resolved_lines(resolved: &[Resolved]) -> Vec<String> {
    resolved
        .iter()
        .map(|r| format!("  {:<8} cpus {:<12} {}", r.class, r.cpus.to_string(), r.why))
        .collect()
}

/// `corral policy check FILE` when FILE would be accepted.
pub fn render_policy_check(file: &Path, policy: &Policy, resolved: &[Resolved]) -> String {
    let mut lines = vec![format!(
        "{}: ok ({} rules)",
        file.display(),
        policy.rules.len()
    )];
    lines.extend(resolved_lines(resolved));
    text(lines)
}

/// `corral policy show`: every class of `policy` with its CPUs on this
/// machine (`online`) and weight, then the mode timings.
pub fn render_policy_show(policy: &Policy, resolved: &[Resolved], online: &CpuList) -> String {
    let mut lines = vec![format!(
        "policy {}  (this machine: {} CPUs online: {online})",
        policy.describe_files(),
        online.len()
    )];
    // A per-game class (`game-cache`) may be longer than the shipped names.
    let w = policy
        .classes
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max(8);
    for class in policy.classes.values() {
        lines.push(match resolved.iter().find(|r| r.class == class.name) {
            Some(r) => format!(
                "  {:<w$} cpus {:<12} weight {:<5} {}",
                r.class,
                r.cpus.to_string(),
                class.cpu_weight,
                r.why
            ),
            None => format!(
                "  {:<w$} cpus {:<12} left alone: the kernel schedules it",
                class.name, "dynamic"
            ),
        });
    }
    lines.push(format!(
        "  modes: game cores protected while a game runs; shared again {} ms after the last game (min {} ms between switches)",
        policy.modes.hold_down.as_millis(),
        policy.modes.min_dwell.as_millis()
    ));
    text(lines)
}

/// `corral policy test FILE` on the live table, once every process in
/// `table` holds its decision under FILE: one line per process that would
/// move (parents first), then the count. `rel_root` is corral's root
/// relative to the cgroup2 mount, as /proc/PID/cgroup shows it.
pub fn render_policy_test(table: &Table, resolved: &[Resolved], rel_root: &str) -> String {
    let mut lines = Vec::new();
    for pid in table.parents_first() {
        let Some(process) = table.get(pid) else {
            continue;
        };
        let d = &process.decision;
        let Some(r) = resolved.iter().find(|r| r.class == d.class) else {
            continue;
        };
        let target = format!("{rel_root}/{}", d.class);
        let now = &process.info.cgroup;
        if &target != now {
            lines.push(format!(
                "{pid:>7} {:<16} {} -> {} (cpus {}) by {}",
                escape(&process.info.comm),
                escape(now),
                escape(&target),
                r.cpus,
                escape(&d.rule)
            ));
        }
    }
    let moves = lines.len();
    lines.push(format!("{moves} of {} processes would move", table.len()));
    text(lines)
}

/// How a recorded chain's `id` is shown in text: a string as itself, any
/// other JSON value as JSON.
/// (JSON text never holds a raw control byte; a string id may.)
fn chain_id(id: &serde_json::Value) -> String {
    id.as_str()
        .map_or_else(|| id.to_string(), |s| escape(s).into_owned())
}

/// `corral policy test FILE --procs F`: one line for a recorded chain, with
/// the CPUs its class gets here (None: the class is left alone).
pub fn render_chain_verdict(
    id: &serde_json::Value,
    decision: &Decision,
    cpus: Option<&CpuList>,
) -> String {
    let line = match cpus {
        Some(cpus) => format!(
            "{}: {} (cpus {cpus}) by {}",
            chain_id(id),
            escape(&decision.class),
            escape(&decision.rule)
        ),
        None => format!(
            "{}: {} (left alone) by {}",
            chain_id(id),
            escape(&decision.class),
            escape(&decision.rule)
        ),
    };
    text(vec![line])
}

/// One line of `corral classify` output, in this field order. Public so
/// that readers of the output (the integration tests) parse the same type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainLine {
    pub id: serde_json::Value,
    pub class: String,
    pub rule: String,
    /// `file:line` of the rule, when one matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Index in the chain of the ancestor the class came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inherited_from: Option<usize>,
}

/// `corral classify`: the JSON line for one recorded chain.
pub fn render_chain_json(id: &serde_json::Value, decision: &Decision) -> String {
    let line = ChainLine {
        id: id.clone(),
        class: decision.class.clone(),
        rule: decision.rule.clone(),
        source: decision.source.clone(),
        inherited_from: decision.inherited_from.as_ref().map(|a| a.depth),
    };
    // Strings, numbers and a JSON value that was itself parsed: nothing in
    // it can fail to serialize.
    let json =
        crate::observe::escape::to_json(&line, false).expect("a chain line always serializes");
    text(vec![json])
}

/// `corral recover` under `root`, which gave groups every CPU in `online`
/// (what failed is the command's error, on stderr).
pub fn render_recovery(root: &Path, report: &ReleaseReport, online: &CpuList) -> String {
    let lines = vec![format!(
        "{}: thawed {} groups, gave {} groups all CPUs ({online})",
        root.display(),
        report.thawed,
        report.widened,
    )];
    text(lines)
}

/// `corral recover` when `root` does not exist.
pub fn render_nothing_to_recover(root: &Path) -> String {
    text(vec![format!(
        "{}: nothing to recover (no such cgroup)",
        root.display()
    )])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        kernel::bpf::KernelCounters,
        model::classify::Ancestor,
        model::procs::{Proc, ProcInfo},
        observe::escape::has_terminal_control,
        service::control::{AncestorLine, ClassStatus, EventCounts, GpuActionRecord, GpuStatus},
    };

    fn class(name: &str, cpus: Option<&str>, weight: Option<u32>, placed: u64) -> ClassStatus {
        ClassStatus {
            class: name.into(),
            processes: 3,
            cgroup: cpus.map(|_| format!("/corral/{name}")),
            cpus: cpus.map(str::to_owned),
            base_cpus: cpus.map(str::to_owned),
            why: None,
            cpu_weight: weight,
            placements: placed,
            note: None,
            sched: None,
        }
    }

    fn action(kind: &str) -> GpuActionRecord {
        GpuActionRecord {
            at_ns: 1,
            class: "ai".into(),
            kind: kind.into(),
            reason: "game needs 4096 MiB".into(),
            outcome: "done".into(),
        }
    }

    fn status() -> Status {
        let mut dev = class("dev", Some("8-15"), Some(200), 7);
        dev.note = Some("cpus 16-31 do not exist here".into());
        Status {
            policy: "/etc/corral/policy.toml".into(),
            policy_warnings: vec![],
            last_reload: None,
            mode: "protected".into(),
            mode_why: "game pid 4242 running".into(),
            cgroup_root: "/sys/fs/cgroup/corral".into(),
            backend: "cgroupfs".into(),
            backend_notes: vec![],
            protected_class: "game".into(),
            protected_launches: 1,
            cpuset_enforced: true,
            dry_run: false,
            tracked: 812,
            classes: vec![
                class("game", Some("0-7"), Some(1000), 12),
                dev,
                class("system", None, None, 0),
            ],
            events: EventCounts {
                exec: 10,
                fork: 20,
                exit: 5,
                vanished: 1,
                move_errors: 0,
            },
            kernel: KernelCounters {
                dropped: 2,
                ..Default::default()
            },
            bpf_programs: vec![],
            metrics_addr: None,
            gpu: GpuStatus {
                on: false,
                off_reason: Some("no NVIDIA driver".into()),
                snapshot: None,
                vram_by_class: BTreeMap::new(),
                arbiter: None,
                cooling: None,
                actions: vec![],
                action_counts: BTreeMap::new(),
                dmem: "absent".into(),
            },
            power: crate::actuate::power::PowerStatus {
                enabled: true,
                method: Some("ppd".into()),
                detail: "`performance` through power-profiles-daemon (org.freedesktop.UPower.PowerProfiles, cookie 7)".into(),
            },
            coexistence: vec![],
            gamemode: vec![],
            agent_rss_bytes: 0,
            agent_cpu_seconds: 0.0,
        }
    }

    #[test]
    fn status_says_who_provides_gamemode_on_each_bus() {
        let mut s = status();
        s.gamemode = vec![
            "provided by corral on uid 1000's bus, 1 game(s) registered".into(),
            "following gamemoded on uid 1001's bus, 0 game(s) registered".into(),
        ];
        let text = render_status(&s);
        assert!(
            text.contains(
                "\nGameMode: provided by corral on uid 1000's bus, 1 game(s) registered\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\nGameMode: following gamemoded on uid 1001's bus"),
            "{text}"
        );
    }

    #[test]
    fn status_under_systemd_names_the_backend_and_what_it_cannot_do() {
        let mut s = status();
        s.backend = "systemd".into();
        s.backend_notes =
            vec!["user 1000's manager unreachable (no socket): affinity fence only".into()];
        let text = render_status(&s);
        assert!(
            text.contains("backend systemd: each process stays in its own manager"),
            "{text}"
        );
        assert!(
            text.contains("note    user 1000's manager unreachable"),
            "{text}"
        );
    }

    #[test]
    fn status_shows_a_row_per_class_the_mode_and_the_counters() {
        let text = render_status(&status());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "policy  /etc/corral/policy.toml",
                "backend cgroupfs",
                "cgroups /sys/fs/cgroup/corral  (core sets enforced)",
                "class     procs       cpus   weight  placed  cgroup",
                "game          3        0-7     1000      12  /corral/game",
                "dev           3       8-15      200       7  /corral/dev",
                "         note: cpus 16-31 do not exist here",
                "system        3    dynamic        -       0  (left alone)",
                "mode    protected (game pid 4242 running)",
                "power   holding `performance` through power-profiles-daemon (org.freedesktop.UPower.PowerProfiles, cookie 7)",
                "gpu     off: no NVIDIA driver",
                "events  exec 10 fork 20 exit 5  seen; dropped 2 (ring buffer full), vanished 1, move errors 0, tracked 812",
            ]
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn status_shows_each_coexisting_tool_with_what_overlaps_and_who_wins() {
        let mut s = status();
        s.coexistence = vec![crate::model::coexist::Finding {
            tool: "sched_ext (lavd_1.0)".into(),
            pid: None,
            overlaps: vec!["cpu.weight".into()],
            outcome: "weights have no effect; core sets stay".into(),
        }];
        s.power.enabled = false;
        let text = render_status(&s);
        assert!(
            text.contains("\npower   off in the policy ([power] enabled = false)\ncoexist sched_ext (lavd_1.0): overlaps cpu.weight; weights have no effect; core sets stay\n"),
            "{text}"
        );
    }

    #[test]
    fn status_without_cpusets_in_a_dry_run_says_both() {
        let mut s = status();
        s.cpuset_enforced = false;
        s.dry_run = true;
        assert!(render_status(&s).contains(
            "cgroups /sys/fs/cgroup/corral  (core sets NOT enforced: no cpuset controller)  DRY RUN\n"
        ));
    }

    #[test]
    fn status_gpu_lines_show_vram_by_class_the_last_action_or_the_wait() {
        let mut s = status();
        s.gpu.on = true;
        s.gpu.off_reason = None;
        let text = render_status(&s);
        assert!(text.contains("\ngpu     on; VRAM by class: -\n"), "{text}");
        assert!(!text.contains("last action"), "{text}");

        s.gpu.vram_by_class = BTreeMap::from([("ai".into(), 9 << 30), ("game".into(), 1 << 29)]);
        s.gpu.actions = vec![action("ask"), action("freeze")];
        let text = render_status(&s);
        assert!(
            text.contains(
                "\ngpu     on; VRAM by class: ai 9216 MiB, game 512 MiB\n        last action: freeze on `ai`: game needs 4096 MiB -> done\n"
            ),
            "{text}"
        );

        s.gpu.on = false;
        assert!(
            render_status(&s).contains("\ngpu     waiting for the first NVML poll\n"),
            "the agent has not polled yet"
        );
    }

    #[test]
    fn status_names_a_refused_reload_and_not_an_accepted_one() {
        let mut s = status();
        let mut reload = ReloadStatus {
            ok: true,
            message: "warning".into(),
            finished_ns: 0,
            duration_us: 0,
            reclassified: 0,
            moves: 0,
        };
        s.last_reload = Some(reload.clone());
        assert!(!render_status(&s).contains("reload"));
        reload.ok = false;
        reload.message = "override.toml:1:1: unknown class `devv`".into();
        s.last_reload = Some(reload);
        assert!(render_status(&s).contains(
            "\nreload  REFUSED, last good policy kept: override.toml:1:1: unknown class `devv`\n"
        ));
    }

    fn explanation() -> Explanation {
        Explanation {
            pid: 4242,
            comm: "Cyberpunk2077.e".into(),
            exe: "/g/wine64-preloader".into(),
            argv: vec!["wine64".into(), "game.exe".into()],
            decision: Decision {
                class: "game".into(),
                rule: "steam-reaper".into(),
                source: Some("/usr/share/corral/default.toml:358".into()),
                inherited_from: Some(Ancestor {
                    pid: 4100,
                    comm: "reaper".into(),
                    depth: 1,
                }),
                passes_down: true,
            },
            group: Some("/sys/fs/cgroup/corral/game".into()),
            class_cpus: Some("0-7".into()),
            cgroup_now: "/corral/game".into(),
            cpus_allowed: "0-7".into(),
            backend: "cgroupfs".into(),
            placement: None,
            rules: Vec::new(),
            ancestry: vec![
                AncestorLine {
                    pid: 1,
                    comm: "systemd".into(),
                    class: "system".into(),
                    rule: "default".into(),
                },
                AncestorLine {
                    pid: 4100,
                    comm: "reaper".into(),
                    class: "game".into(),
                    rule: "steam-reaper".into(),
                },
            ],
            vram_bytes: None,
            gpu_actions: vec![],
            power: None,
        }
    }

    #[test]
    fn explain_names_the_rule_with_file_line_the_ancestor_and_the_ancestry() {
        let text = render_explanation(&explanation());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "pid 4242 (Cyberpunk2077.e)  /g/wine64-preloader",
                "  argv      wine64 game.exe",
                "  class     game",
                "  rule      steam-reaper (/usr/share/corral/default.toml:358), inherited from pid 4100 (reaper)",
                "  group     /sys/fs/cgroup/corral/game  cpus 0-7",
                "  cgroup    /corral/game (now)",
                "  cpus      0-7 (Cpus_allowed_list now)",
                "  ancestry",
                "          1 systemd          system   default",
                "       4100 reaper           game     steam-reaper",
            ]
        );
    }

    #[test]
    fn explain_with_rules_lists_them_in_order_and_marks_the_one_that_decides() {
        let mut e = explanation();
        let verdict = |rule: &str, failed: Option<&str>| RuleVerdict {
            rule: rule.into(),
            class: "game".into(),
            source: format!("p.toml:{}", rule.len()),
            failed: failed.map(str::to_owned),
        };
        e.rules = vec![
            verdict("a", Some("exe */a: no, exe is /b")),
            verdict("bb", None),
            verdict("ccc", None),
        ];
        let text = render_explanation(&e);
        let rules = text.split("  rules ").nth(1).unwrap();
        assert_eq!(
            rules,
            "    (in order; the first that matches decides)
      1. a -> game (p.toml:1): exe */a: no, exe is /b
      2. bb -> game (p.toml:2): MATCHES, decides
      3. ccc -> game (p.toml:3): matches, but a rule above decided
"
        );
        assert!(!render_explanation(&explanation()).contains("  rules "));
    }

    #[test]
    fn explain_of_an_own_rule_an_unmatched_process_and_gpu_use() {
        let mut e = explanation();
        e.decision.inherited_from = None;
        e.vram_bytes = Some(9 << 30);
        e.gpu_actions = vec![action("freeze")];
        e.ancestry.clear();
        e.power = Some("holding `performance` in cpufreq sysfs (4 policies)".into());
        let text = render_explanation(&e);
        assert!(
            text.contains("\n  rule      steam-reaper (/usr/share/corral/default.toml:358)\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "  power     holding `performance` in cpufreq sysfs (4 policies)\n  vram      9216 MiB\n  gpu       freeze on `ai`: game needs 4096 MiB -> done\n"
            ),
            "{text}"
        );
        e.power = None;

        e.decision = Decision::default_system();
        e.group = None;
        e.class_cpus = None;
        let text = render_explanation(&e);
        assert!(
            text.contains("\n  rule      default (no rule matched; left alone)\n"),
            "{text}"
        );
        assert!(
            text.contains("\n  group     none (class `system` is not managed)\n"),
            "{text}"
        );
    }

    /// What `exec -a` and a hostile cgroup or unit name can put in a
    /// process string.
    const HOSTILE: &str = "weird\x1b]0;PWNED\x07\x1b[2J\x1b[31mX\u{9b}\r\nclass     game\u{fffd}";

    #[test]
    fn explain_escapes_every_process_string_so_no_control_byte_reaches_the_terminal() {
        let mut e = explanation();
        e.comm = HOSTILE.into();
        e.exe = HOSTILE.into();
        e.argv = vec![HOSTILE.into(), "C:\\x.exe".into()];
        e.cgroup_now = HOSTILE.into();
        e.placement = Some(HOSTILE.into());
        e.ancestry[1].comm = HOSTILE.into();
        if let Some(a) = e.decision.inherited_from.as_mut() {
            a.comm = HOSTILE.into();
        }
        let mut gpu = action("freeze");
        gpu.reason = HOSTILE.into();
        e.gpu_actions = vec![gpu];
        let text = render_explanation(&e);
        assert!(!has_terminal_control(&text), "{text:?}");
        // Forged lines stay on the line of the field that carried them.
        assert_eq!(text.lines().count(), 12, "{text}");
        assert!(
            text.starts_with(
                "pid 4242 (weird\\e]0;PWNED\\a\\e[2J\\e[31mX\\u{9b}\\r\\nclass     game\u{fffd})  weird\\e"
            ),
            "{text}"
        );
        assert!(text.contains("\n  argv      weird\\e]0;"), "{text}");
        assert!(text.contains(" C:\\\\x.exe\n"), "{text}");
    }

    #[test]
    fn status_and_top_escape_notes_reasons_and_messages() {
        let mut s = status();
        s.mode_why = HOSTILE.into();
        s.backend_notes = vec![HOSTILE.into()];
        s.classes[1].note = Some(HOSTILE.into());
        s.classes[0].cgroup = Some(HOSTILE.into());
        s.last_reload = Some(ReloadStatus {
            ok: false,
            message: HOSTILE.into(),
            finished_ns: 0,
            duration_us: 0,
            reclassified: 0,
            moves: 0,
        });
        let text = render_status(&s);
        assert!(!has_terminal_control(&text), "{text:?}");
        assert_eq!(text.lines().count(), 14, "{text}");
        let screen = crate::observe::top::render(&s, None, std::time::Duration::from_secs(1));
        assert!(!has_terminal_control(&screen), "{screen:?}");
        assert!(
            screen.contains("corral top  mode protected  (weird\\e]0;"),
            "{screen}"
        );
        s.gpu.on = true;
        s.gpu.actions = vec![GpuActionRecord {
            reason: HOSTILE.into(),
            ..action("freeze")
        }];
        let text = render_status(&s);
        assert!(!has_terminal_control(&text), "{text:?}");
    }

    #[test]
    fn policy_test_and_chain_verdicts_escape_comm_cgroup_and_ids() {
        let mut table = Table::default();
        let mut p = Proc::new(
            ProcInfo {
                pid: 10,
                comm: HOSTILE.into(),
                cgroup: HOSTILE.into(),
                ..Default::default()
            },
            1,
            1,
        );
        p.decision.class = "game".into();
        table.insert(10, p);
        let text = render_policy_test(&table, &resolved(), "/corral");
        assert!(!has_terminal_control(&text), "{text:?}");
        assert_eq!(text.lines().count(), 2, "{text}");
        let text = render_chain_verdict(&HOSTILE.into(), &Decision::default_system(), None);
        assert!(!has_terminal_control(&text), "{text:?}");
        assert_eq!(text.lines().count(), 1, "{text}");
    }

    #[test]
    fn json_of_a_hostile_explanation_has_no_control_byte_and_round_trips_exactly() {
        let mut e = explanation();
        e.comm = HOSTILE.into();
        e.argv = vec![HOSTILE.into()];
        let json = crate::observe::escape::to_json(&e, true).unwrap();
        assert!(!has_terminal_control(&json), "{json}");
        let back: Explanation = serde_json::from_str(&json).unwrap();
        assert_eq!(back.comm, HOSTILE);
        assert_eq!(back.argv, [HOSTILE]);
    }

    #[test]
    fn reload_shows_counts_and_any_warnings() {
        let mut r = ReloadStatus {
            ok: true,
            message: String::new(),
            finished_ns: 0,
            duration_us: 812,
            reclassified: 3,
            moves: 2,
        };
        assert_eq!(
            render_reload(&r),
            "reloaded: 3 processes re-classified, 2 moved, in 812 us\n"
        );
        r.message = "t.toml:3:1: unknown key `x`".into();
        assert!(render_reload(&r).ends_with("in 812 us\nt.toml:3:1: unknown key `x`\n"));
    }

    fn policy() -> Policy {
        Policy::parse(
            Path::new("t.toml"),
            "[classes.game]\ncpus = \"0-1\"\ncpu_weight = 1000\n[classes.dev]\ncpus = \"2\"\n\n[[rules]]\nname = \"editor\"\nclass = \"dev\"\ncomm = [\"nvim\"]\n",
        )
        .unwrap()
    }

    fn resolved() -> Vec<Resolved> {
        vec![Resolved {
            class: "game".into(),
            cpus: CpuList::parse("0-1").unwrap(),
            why: "cpus \"0-1\"".into(),
        }]
    }

    #[test]
    fn policy_check_and_show_list_each_class_with_its_cpus() {
        let policy = policy();
        assert_eq!(
            render_policy_check(Path::new("/etc/corral/policy.toml"), &policy, &resolved()),
            "/etc/corral/policy.toml: ok (1 rules)\n  game     cpus 0-1          cpus \"0-1\"\n"
        );
        let online = CpuList::parse("0-3").unwrap();
        let text = render_policy_show(&policy, &resolved(), &online);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "policy t.toml  (this machine: 4 CPUs online: 0-3)"
        );
        assert_eq!(
            lines[1],
            "  game     cpus 0-1          weight 1000  cpus \"0-1\""
        );
        let dev = lines.iter().find(|l| l.starts_with("  dev ")).unwrap();
        assert_eq!(
            *dev,
            "  dev      cpus dynamic      left alone: the kernel schedules it"
        );
        assert!(
            lines
                .last()
                .unwrap()
                .starts_with("  modes: game cores protected")
        );
    }

    #[test]
    fn policy_test_lists_only_what_would_move_then_the_count() {
        let mut table = Table::default();
        let info = |pid: u32, comm: &str, cgroup: &str| ProcInfo {
            pid,
            comm: comm.into(),
            cgroup: cgroup.into(),
            ..Default::default()
        };
        let mut game = Proc::new(info(10, "game", "/user.slice/app.scope"), 1, 1);
        game.decision = Decision {
            class: "game".into(),
            rule: "steam".into(),
            source: None,
            inherited_from: None,
            passes_down: false,
        };
        let mut placed = game.clone();
        placed.info = info(11, "game2", "/corral/game");
        table.insert(1, Proc::new(info(1, "systemd", "/init.scope"), 0, 1));
        table.insert(10, game);
        table.insert(11, placed);
        assert_eq!(
            render_policy_test(&table, &resolved(), "/corral"),
            "     10 game             /user.slice/app.scope -> /corral/game (cpus 0-1) by steam\n1 of 3 processes would move\n"
        );
    }

    #[test]
    fn chain_lines_show_string_ids_bare_and_other_ids_as_json() {
        let mut d = Decision::default_system();
        assert_eq!(
            render_chain_verdict(&"shell".into(), &d, None),
            "shell: system (left alone) by default\n"
        );
        d.class = "dev".into();
        d.rule = "shell-is-dev".into();
        let cpus = CpuList::parse("2").unwrap();
        assert_eq!(
            render_chain_verdict(&7.into(), &d, Some(&cpus)),
            "7: dev (cpus 2) by shell-is-dev\n"
        );
        assert_eq!(
            render_chain_json(&"x".into(), &d),
            "{\"id\":\"x\",\"class\":\"dev\",\"rule\":\"shell-is-dev\"}\n"
        );
        d.source = Some("t.toml:3".into());
        d.inherited_from = Some(Ancestor {
            pid: 0,
            comm: "bash".into(),
            depth: 0,
        });
        assert_eq!(
            render_chain_json(&"x".into(), &d),
            "{\"id\":\"x\",\"class\":\"dev\",\"rule\":\"shell-is-dev\",\"source\":\"t.toml:3\",\"inherited_from\":0}\n"
        );
    }

    #[test]
    fn recovery_counts_thawed_and_widened_groups() {
        let report = ReleaseReport {
            thawed: 1,
            widened: 4,
            errors: vec![],
        };
        let online = CpuList::parse("0-7").unwrap();
        let root = Path::new("/sys/fs/cgroup/corral");
        assert_eq!(
            render_recovery(root, &report, &online),
            "/sys/fs/cgroup/corral: thawed 1 groups, gave 4 groups all CPUs (0-7)\n"
        );
    }
}
