//! Other tools that tune the same knobs: a loaded sched_ext scheduler, and
//! gamemoded, ananicy-cpp, system76-scheduler, falcond or tuned running.
//! Detection takes the processes' names (the agent's process table, which
//! kernel records keep current) and a /sys root (fixtures in tests) and says, for each finding, which actions overlap and which side wins.
//! corral itself never changes a nice value, so a nice value set by hand
//! or by one of these tools always stays.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One tool found, what it overlaps with and what corral does about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// `sched_ext` or the daemon's name.
    pub tool: String,
    /// The process, for daemons.
    pub pid: Option<u32>,
    /// The actions both sides take: `cpu.weight`, `renice`, `affinity`,
    /// `cgroup moves`, `governor`.
    pub overlaps: Vec<String>,
    /// Which side wins and what corral does about it.
    pub outcome: String,
}

impl Finding {
    /// One line for status and logs.
    pub fn describe(&self) -> String {
        let who = match self.pid {
            Some(pid) => format!("{} (pid {pid})", self.tool),
            None => self.tool.clone(),
        };
        format!(
            "{who}: overlaps {}; {}",
            self.overlaps.join(", "),
            self.outcome
        )
    }
}

/// A daemon corral knows, by its process name.
struct Daemon {
    name: &'static str,
    overlaps: &'static [&'static str],
    outcome: &'static str,
}

const DAEMONS: &[Daemon] = &[
    Daemon {
        name: "gamemoded",
        overlaps: &["renice", "affinity", "governor"],
        outcome: "gamemode's nice and ioprio values stay (corral never renices); its core pinning works inside the class's core set, which wins; both ask for `performance` (corral through a power-profiles-daemon hold, which stacks with gamemode's)",
    },
    Daemon {
        name: "ananicy-cpp",
        overlaps: &["renice", "cgroup moves"],
        outcome: "ananicy-cpp's nice, ioprio and scheduling policy stay (corral never renices); both move processes between cgroups and the last move wins: drop `cgroup` from its types, or let corral read its rules ([ananicy] enabled = true) and stop ananicy-cpp",
    },
    Daemon {
        name: "system76-scheduler",
        overlaps: &["renice"],
        outcome: "its nice and ioprio values and foreground boost stay (corral never renices); corral's core sets and weights apply on top",
    },
    Daemon {
        name: "falcond",
        overlaps: &["governor", "affinity", "sched_ext"],
        outcome: "both ask power-profiles-daemon for `performance` (holds stack); the class's core set wins over its pinning; a sched_ext scheduler it loads makes class weights moot",
    },
    Daemon {
        name: "tuned",
        overlaps: &["governor"],
        outcome: "tuned wins: corral writes no cpufreq file while it runs and only holds through power-profiles-daemon's API where one answers (tuned-ppd)",
    },
];

/// What the current sched_ext schedulers do to corral's knobs.
const SCHED_EXT_OUTCOME: &str = "the current sched_ext schedulers ignore cpu.weight, so class weights have no effect while it is loaded; core sets (cpuset, AllowedCPUs, affinity) still hold and corral keeps them";

/// Everything found under `proc_root` and `sys_root`, sched_ext first.
pub fn detect<'a>(
    names: impl IntoIterator<Item = (u32, &'a str)>,
    sys_root: &Path,
) -> Vec<Finding> {
    let mut found = Vec::new();
    let state = std::fs::read_to_string(sys_root.join("kernel/sched_ext/state"));
    if state.is_ok_and(|s| s.trim() == "enabled") {
        let ops = std::fs::read_to_string(sys_root.join("kernel/sched_ext/root/ops"))
            .map(|o| o.trim().to_owned())
            .unwrap_or_default();
        found.push(Finding {
            tool: if ops.is_empty() {
                "sched_ext".to_owned()
            } else {
                format!("sched_ext ({ops})")
            },
            pid: None,
            overlaps: vec!["cpu.weight".to_owned()],
            outcome: SCHED_EXT_OUTCOME.to_owned(),
        });
    }
    let names: Vec<(u32, &str)> = names.into_iter().collect();
    for daemon in DAEMONS {
        if let Some(pid) = find(names.iter().copied(), daemon.name) {
            found.push(Finding {
                tool: daemon.name.to_owned(),
                pid: Some(pid),
                overlaps: daemon.overlaps.iter().map(|o| (*o).to_owned()).collect(),
                outcome: daemon.outcome.to_owned(),
            });
        }
    }
    found
}

/// The pid of a process called `name` under `proc_root`, if one runs.
pub fn running(proc_root: &Path, name: &str) -> Option<u32> {
    let names = process_names(proc_root);
    find(names.iter().map(|(pid, comm)| (*pid, comm.as_str())), name)
}

/// (pid, comm) of every process under `proc_root`: one small read each (a
/// script's comm is its file name: `tuned`).
fn process_names(proc_root: &Path) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((pid, comm.trim().to_owned()))
        })
        .collect()
}

/// The lowest pid called `name`. The kernel cuts comm to 15 bytes
/// (`system76-schedu`).
fn find<'a>(names: impl Iterator<Item = (u32, &'a str)>, name: &str) -> Option<u32> {
    let short = &name[..name.len().min(15)];
    names
        .filter(|(_, comm)| *comm == short)
        .map(|(pid, _)| pid)
        .min()
}

/// What changed between two detections, for the log: (appeared, gone).
pub fn changes<'a>(
    before: &'a [Finding],
    now: &'a [Finding],
) -> (Vec<&'a Finding>, Vec<&'a Finding>) {
    let same = |a: &Finding, b: &Finding| a.tool == b.tool && a.pid == b.pid;
    (
        now.iter()
            .filter(|n| !before.iter().any(|b| same(b, n)))
            .collect(),
        before
            .iter()
            .filter(|b| !now.iter().any(|n| same(b, n)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn scratch() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "corral-coexist-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proc")).unwrap();
        std::fs::create_dir_all(dir.join("sys")).unwrap();
        dir
    }

    fn process(root: &Path, pid: u32, comm: &str) {
        let dir = root.join(format!("proc/{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
    }

    #[test]
    fn a_loaded_sched_ext_scheduler_says_weights_have_no_effect_and_core_sets_stay() {
        let dir = scratch();
        let sched_ext = dir.join("sys/kernel/sched_ext");
        std::fs::create_dir_all(sched_ext.join("root")).unwrap();
        std::fs::write(sched_ext.join("state"), "disabled\n").unwrap();
        assert!(detect([], &dir.join("sys")).is_empty());
        std::fs::write(sched_ext.join("state"), "enabled\n").unwrap();
        std::fs::write(sched_ext.join("root/ops"), "lavd_1.0\n").unwrap();
        let found = detect([(1, "systemd")], &dir.join("sys"));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].tool, "sched_ext (lavd_1.0)");
        assert_eq!(found[0].overlaps, ["cpu.weight"]);
        assert!(found[0].outcome.contains("class weights have no effect"));
        assert!(found[0].outcome.contains("core sets"));
    }

    #[test]
    fn daemons_are_found_by_comm_even_cut_to_15_bytes() {
        let dir = scratch();
        process(&dir, 1, "systemd");
        process(&dir, 812, "gamemoded");
        process(&dir, 900, "system76-schedu");
        process(&dir, 950, "tuned");
        // Not a prefix match: `gamemoded-helper` is not gamemoded.
        process(&dir, 990, "gamemoded-helpe");
        let names = [
            (1, "systemd"),
            (950, "tuned"),
            (990, "gamemoded-helpe"),
            (900, "system76-schedu"),
            (812, "gamemoded"),
            (1200, "gamemoded"),
        ];
        let found = detect(names, &dir.join("sys"));
        let tools: Vec<(&str, Option<u32>)> =
            found.iter().map(|f| (f.tool.as_str(), f.pid)).collect();
        assert_eq!(
            tools,
            [
                ("gamemoded", Some(812)),
                ("system76-scheduler", Some(900)),
                ("tuned", Some(950))
            ]
        );
        let gamemode = found[0].describe();
        assert!(gamemode.starts_with("gamemoded (pid 812): overlaps renice, affinity, governor; "));
        assert!(gamemode.contains("corral never renices"), "{gamemode}");
        assert_eq!(running(&dir.join("proc"), "tuned"), Some(950));
        assert_eq!(running(&dir.join("proc"), "falcond"), None);
    }

    #[test]
    fn changes_name_what_appeared_and_what_went_away() {
        let f = |tool: &str, pid| Finding {
            tool: tool.into(),
            pid,
            overlaps: vec![],
            outcome: String::new(),
        };
        let before = [f("gamemoded", Some(1)), f("tuned", Some(2))];
        let now = [f("gamemoded", Some(1)), f("falcond", Some(3))];
        let (new, gone) = changes(&before, &now);
        assert_eq!(new, [&now[1]]);
        assert_eq!(gone, [&before[1]]);
    }
}
