//! The loop's decisions, driven without root: scripted /proc, a recording
//! placer and a hand-driven clock. Each test feeds events and checks what
//! the agent asked the placer to do.
//!
//! Length: 43 scenario tests of the loop, one per behaviour.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use corral_common::{EventKind, ProcEvent};
use tokio::sync::oneshot;

use super::*;
use crate::{
    actuate::recording::{Call, Record, RecordingPlacer, group_id},
    model::{
        modes::Mode,
        pidref::PidRef,
        policy::DefaultPolicy,
        procs::{ProcInfo, ProcRead, ScriptedProcs},
        topology::Topology,
    },
    service::{
        control::{Peer, Request, Response},
        desktop_notify::Urgency,
    },
};

const DEFAULT: &str = include_str!("../../../policies/default.toml");
const HOME: &str = "/home/u";
const APP: &str =
    "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-steam-2201.scope";

fn sysfs() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sysfs/hybrid-20"
    ))
    .to_owned()
}

struct Rig {
    agent: Agent,
    procs: ScriptedProcs,
    record: Arc<Mutex<Record>>,
    clock_ms: Arc<AtomicU64>,
    override_path: PathBuf,
}

/// An agent on the hybrid-20 fixture machine (game 0-7, dev 8-15, render
/// and ai 16-19) with the shipped default policy plus `override_text`.
fn rig(override_text: &str) -> Rig {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "corral-agent-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let override_path = dir.join("policy.toml");
    std::fs::write(&override_path, override_text).unwrap();
    let source = PolicySource {
        default: DefaultPolicy::BuiltIn("default.toml", DEFAULT),
        override_path: Some(override_path.clone()),
    };
    let policy = source.load().expect("test policy loads");
    let topology = Topology::read(&sysfs()).unwrap();
    let resolved = policy.resolve_cpus(&topology).unwrap();
    let placer = RecordingPlacer::new(&policy, &resolved, topology.online().clone());
    let record = placer.record.clone();
    let procs = ScriptedProcs::default();
    let clock_ms = Arc::new(AtomicU64::new(0));
    let agent = Agent::new(
        source,
        sysfs(),
        policy,
        Box::new(placer),
        Box::new(procs.clone()),
        None,
    )
    .with_clock(Clock::Manual(clock_ms.clone()));
    Rig {
        agent,
        procs,
        record,
        clock_ms,
        override_path,
    }
}

fn info(pid: u32, comm: &str, exe: &str, argv: &[&str]) -> ProcInfo {
    ProcInfo {
        pid,
        exe: exe.to_owned(),
        comm: comm.to_owned(),
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        cwd: HOME.to_owned(),
        cgroup: APP.to_owned(),
        env: Default::default(),
    }
}

fn event(kind: EventKind, pid: u32, ppid: u32, cgroup_id: u64) -> ProcEvent {
    ProcEvent {
        ktime_ns: monotonic_ns(),
        cgroup_id,
        start_boottime_ns: 0,
        kind: kind as u32,
        pid,
        tgid: pid,
        ppid,
        comm: [0; 16],
        filename: [0; 256],
    }
}

impl Rig {
    /// `pid` (child of `ppid`) now runs `info` in /proc.
    fn script(&self, ppid: u32, info: ProcInfo, start_ticks: u64) {
        let pid = info.pid;
        self.procs.set(
            ProcRead {
                info,
                ppid,
                start_ticks: start_ticks.max(u64::from(pid)),
            },
            1000,
        );
    }

    /// The kernel reports that `info.pid` exec'd `info`.
    fn exec(&mut self, ppid: u32, info: ProcInfo) -> Vec<Effect> {
        let pid = info.pid;
        self.script(ppid, info, 0);
        self.agent
            .handle(Event::Kernel(event(EventKind::Exec, pid, ppid, 0)));
        self.agent.handle(Event::KernelBatchDone)
    }

    /// The kernel reports `child` forked from `parent`, in cgroup `cgroup_id`.
    fn fork(&mut self, parent: u32, child: u32, cgroup_id: u64) {
        if let Ok(mut read) = self.procs.read(parent, &Default::default()) {
            read.info.pid = child;
            read.ppid = parent;
            read.start_ticks = u64::from(child);
            self.procs.set(read, 1000);
        }
        self.agent.handle(Event::Kernel(event(
            EventKind::Fork,
            child,
            parent,
            cgroup_id,
        )));
    }

    fn exit(&mut self, pid: u32) {
        self.procs.remove(pid);
        self.agent
            .handle(Event::Kernel(event(EventKind::Exit, pid, 0, 0)));
        self.agent.handle(Event::KernelBatchDone);
    }

    fn at_ms(&mut self, ms: u64) {
        self.clock_ms.store(ms, Ordering::Relaxed);
        self.agent.handle(Event::ModeTimer);
    }

    fn placed(&self, class: &str) -> Vec<u32> {
        self.record.lock().unwrap().placed(class)
    }

    /// The calls that move, freeze or release processes (not core sets).
    fn moves(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| !matches!(c, Call::SetCpus { .. }))
            .collect()
    }

    fn calls(&self) -> Vec<Call> {
        self.record.lock().unwrap().calls.clone()
    }

    fn class_of(&self, pid: u32) -> Option<String> {
        self.agent.table.get(pid).map(|p| p.decision.class.clone())
    }

    fn cpus(&self, class: &str) -> String {
        self.agent
            .layout()
            .group(class)
            .map(|g| g.cpus.to_string())
            .unwrap_or_default()
    }

    /// Asks as pid 4242; its process handle is one on this test process,
    /// which stays alive, so 4242 counts as not reused.
    fn ask(&mut self, request: Request, uid: Option<u32>) -> (Response, Vec<Effect>) {
        let me = PidRef::open(std::process::id()).expect("a handle on this test");
        self.ask_as(request, uid, Some(Arc::new(me)))
    }

    fn ask_as(
        &mut self,
        request: Request,
        uid: Option<u32>,
        process: Option<Arc<PidRef>>,
    ) -> (Response, Vec<Effect>) {
        let (tx, rx) = oneshot::channel();
        let effects = self.agent.handle(Event::Control((
            request,
            Peer {
                pid: Some(4242),
                uid,
                process,
            },
            tx,
        )));
        (rx.blocking_recv().expect("a reply"), effects)
    }

    /// A Steam client (2305) and its reaper (40112) running the game (40120).
    fn steam_game(&mut self) {
        self.script(
            1,
            info(
                2305,
                "steam",
                "/home/u/.local/share/Steam/ubuntu12_32/steam",
                &["steam"],
            ),
            0,
        );
        self.agent.handle(Event::Seed);
        self.start_game();
    }
}

fn nvim(pid: u32) -> ProcInfo {
    info(pid, "nvim", "/usr/bin/nvim", &["nvim", "src/main.rs"])
}

fn blender_batch(pid: u32) -> ProcInfo {
    info(
        pid,
        "blender",
        "/usr/bin/blender",
        &["blender", "-b", "scene.blend", "-a"],
    )
}

fn plain(pid: u32, comm: &str) -> ProcInfo {
    info(pid, comm, &format!("/usr/bin/{comm}"), &[comm])
}

#[test]
fn a_game_under_a_steam_reaper_is_placed_in_game_and_the_client_is_not() {
    let mut rig = rig("");
    rig.steam_game();
    assert_eq!(rig.placed("game"), vec![40112, 40120]);
    assert_eq!(rig.class_of(2305).as_deref(), Some("system"));
    assert!(rig.record.lock().unwrap().classes_of(2305).is_empty());
}

#[test]
fn the_game_inherits_the_reaper_rule_and_explain_says_so() {
    let mut rig = rig("");
    rig.steam_game();
    let p = rig.agent.table.get(40120).unwrap();
    assert_eq!(p.decision.class, "game");
    let (response, _) = rig.ask(
        Request::Explain {
            pid: 40120,
            rules: true,
        },
        Some(0),
    );
    let Response::Explain(e) = response else {
        panic!("explain answered {response:?}");
    };
    assert_eq!(e.decision.class, "game");
    assert!(
        e.ancestry
            .iter()
            .any(|a| a.pid == 40112 && a.class == "game")
    );
    // `--rules`: every rule, judged on the process's own facts.
    assert_eq!(e.rules.len(), rig.agent.policy.rules.len());
    let client = e.rules.iter().find(|r| r.rule == "steam-client").unwrap();
    assert_eq!(
        client.failed.as_deref(),
        Some("comm steam, steamwebhelper: no, comm is game.x86_64")
    );
}

#[test]
fn children_forked_between_exec_and_move_are_moved_too() {
    let mut rig = rig("");
    rig.steam_game();
    // A storm of 150 children whose fork records still carry the cgroup the
    // parent had before its move.
    for child in 50_000..50_150 {
        rig.fork(40120, child, 7);
    }
    let placed = rig.placed("game");
    for child in 50_000..50_150 {
        assert_eq!(
            placed.iter().filter(|p| **p == child).count(),
            1,
            "child {child} placed once"
        );
    }
}

#[test]
fn children_forked_after_the_move_are_adopted_without_a_second_move() {
    let mut rig = rig("");
    rig.steam_game();
    let before = rig.calls().len();
    for child in 60_000..60_050 {
        rig.fork(40120, child, group_id("game"));
    }
    assert_eq!(
        rig.calls().len(),
        before,
        "no new calls: {:?}",
        &rig.calls()[before..]
    );
    assert_eq!(
        rig.agent.table.get(60_010).unwrap().placed_class.as_deref(),
        Some("game")
    );
}

#[test]
fn a_fork_from_an_unknown_parent_is_learned_from_proc() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.script(9999, nvim(7001), 0);
    rig.agent
        .handle(Event::Kernel(event(EventKind::Fork, 7001, 9999, 0)));
    assert_eq!(rig.placed("dev"), vec![7001]);
}

#[test]
fn an_exec_record_gives_the_start_time_and_comm_of_a_process_whose_fork_was_seen() {
    let mut rig = rig("");
    rig.script(1, plain(7100, "bash"), 0);
    rig.agent.handle(Event::Seed);
    rig.fork(7100, 7101, 0);
    // The child exec's nvim; /proc would say start 7101 and parent 1.
    rig.script(1, nvim(7101), 0);
    let mut exec = event(EventKind::Exec, 7101, 0, 0);
    exec.start_boottime_ns = 123_456_789_000;
    exec.comm[..4].copy_from_slice(b"nvim");
    rig.agent.handle(Event::Kernel(exec));
    rig.agent.handle(Event::KernelBatchDone);
    let child = rig.agent.table.get(7101).unwrap();
    assert_eq!(
        child.start_ticks, 12_345,
        "ns since boot / 10^7, as stat says"
    );
    assert_eq!((child.ppid, child.info.comm.as_str()), (7100, "nvim"));
    assert_eq!(rig.placed("dev"), vec![7101]);

    // No fork record seen: the parent and start time come from /proc.
    rig.script(1, nvim(7200), 0);
    let mut exec = event(EventKind::Exec, 7200, 0, 0);
    exec.start_boottime_ns = 999_000_000_000;
    rig.agent.handle(Event::Kernel(exec));
    let unseen = rig.agent.table.get(7200).unwrap();
    assert_eq!((unseen.start_ticks, unseen.ppid), (7200, 1));
}

#[test]
fn an_exec_of_a_process_that_vanished_is_counted_not_placed() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.agent
        .handle(Event::Kernel(event(EventKind::Exec, 8123, 1, 0)));
    assert!(rig.moves().is_empty());
    assert_eq!(rig.agent.counts.vanished, 1);
    assert!(rig.agent.table.get(8123).is_none());
}

#[test]
fn a_process_that_exits_before_its_move_is_forgotten() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.record.lock().unwrap().gone.insert(7002);
    rig.exec(1, nvim(7002));
    assert!(rig.placed("dev").is_empty());
    assert!(rig.agent.table.get(7002).is_none());
    assert_eq!(rig.agent.counts.vanished, 1);
}

#[test]
fn exit_forgets_the_process_and_its_class_count() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, nvim(7003));
    assert_eq!(rig.agent.table.count("dev"), 1);
    rig.exit(7003);
    assert_eq!(rig.agent.table.count("dev"), 0);
    assert!(rig.agent.table.get(7003).is_none());
    assert_eq!(rig.agent.counts.exit, 1);
}

#[test]
fn language_servers_under_nvim_are_dev_and_blender_batch_is_render() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, nvim(7010));
    rig.exec(
        7010,
        info(
            7011,
            "rust-analyzer",
            "/home/u/.cargo/bin/rust-analyzer",
            &["rust-analyzer"],
        ),
    );
    rig.exec(1, blender_batch(7020));
    assert_eq!(rig.placed("dev"), vec![7010, 7011]);
    assert_eq!(rig.placed("render"), vec![7020]);
}

#[test]
fn an_unmatched_process_stays_where_it_is() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, plain(7030, "htop"));
    assert!(rig.moves().is_empty());
    assert_eq!(rig.class_of(7030).as_deref(), Some("system"));
}

#[test]
fn a_re_exec_in_the_same_class_is_not_moved_again() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, nvim(7040));
    rig.exec(
        1,
        info(7040, "nvim", "/usr/bin/nvim", &["nvim", "other.rs"]),
    );
    assert_eq!(rig.placed("dev"), vec![7040]);
}

#[test]
fn the_agent_itself_and_pids_1_and_2_are_never_placed() {
    let mut rig = rig("[[rules]]\nname = \"everything\"\nclass = \"dev\"\ncomm = [\"*\"]\n");
    rig.agent.handle(Event::Seed);
    rig.exec(0, plain(1, "systemd"));
    rig.exec(0, plain(2, "kthreadd"));
    rig.exec(1, plain(std::process::id(), "corral"));
    assert!(rig.placed("dev").is_empty(), "{:?}", rig.calls());
}

#[test]
fn seed_places_parents_first_and_children_inherit() {
    let mut rig = rig("");
    rig.script(1, nvim(7050), 0);
    rig.script(
        7050,
        info(
            7051,
            "rust-analyzer",
            "/x/rust-analyzer",
            &["rust-analyzer"],
        ),
        0,
    );
    rig.script(7051, plain(7052, "cargo"), 0);
    let effects = rig.agent.handle(Event::Seed);
    assert_eq!(rig.placed("dev"), vec![7050, 7051, 7052]);
    assert!(matches!(
        effects.first(),
        Some(Effect::Notify(Notice::Ready { .. }))
    ));
    assert!(effects.contains(&Effect::Notify(Notice::Watchdog)));
}

#[test]
fn seed_adopts_processes_already_in_their_group() {
    let mut rig = rig("");
    let mut placed = nvim(7060);
    placed.cgroup = "/corral/dev".to_owned();
    rig.script(1, placed, 0);
    rig.script(1, nvim(7061), 0);
    rig.agent.handle(Event::Seed);
    assert_eq!(rig.placed("dev"), vec![7061], "7060 was adopted, not moved");
    assert_eq!(
        rig.agent.table.get(7060).unwrap().placed_class.as_deref(),
        Some("dev")
    );
}

#[test]
fn a_sweep_places_processes_whose_events_were_lost() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    // Started while the ring buffer was full: no event ever came.
    rig.script(1, nvim(7070), 0);
    rig.script(1, blender_batch(7071), 0);
    rig.agent.handle(Event::SweepTick);
    assert_eq!(rig.placed("dev"), vec![7070]);
    assert_eq!(rig.placed("render"), vec![7071]);
}

#[test]
fn a_full_sweep_after_dropped_events_reclassifies_a_lost_exec() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, plain(7080, "bash"));
    // The fork was seen, the exec into nvim was dropped.
    rig.script(1, nvim(7080), 0);
    rig.agent.handle(Event::SweepTick);
    assert!(
        rig.placed("dev").is_empty(),
        "a plain sweep trusts known processes"
    );
    rig.agent.sweep(true);
    assert_eq!(rig.placed("dev"), vec![7080]);
}

#[test]
fn a_sweep_forgets_processes_gone_from_proc() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.script(0, plain(1, "systemd"), 0);
    rig.exec(1, nvim(7090));
    rig.procs.remove(7090);
    rig.agent.handle(Event::SweepTick);
    assert!(rig.agent.table.get(7090).is_none());
    assert_eq!(rig.agent.table.count("dev"), 0);
}

#[test]
fn a_reload_that_changes_a_class_moves_the_process() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, plain(7100, "htop"));
    std::fs::write(
        &rig.override_path,
        "[[rules]]\nname = \"htop-is-dev\"\nclass = \"dev\"\ncomm = [\"htop\"]\n",
    )
    .unwrap();
    rig.agent.handle(Event::Reload(ReloadCause::FileChanged));
    assert_eq!(rig.placed("dev"), vec![7100]);
    assert_eq!(rig.agent.last_reload.as_ref().map(|r| r.moves), Some(1));
}

#[test]
fn a_reload_that_stops_managing_a_process_sends_it_back_where_it_came_from() {
    let mut rig = rig("[[rules]]\nname = \"htop-is-dev\"\nclass = \"dev\"\ncomm = [\"htop\"]\n");
    rig.agent.handle(Event::Seed);
    rig.exec(1, plain(7110, "htop"));
    assert_eq!(rig.placed("dev"), vec![7110]);
    std::fs::write(&rig.override_path, "").unwrap();
    rig.agent.handle(Event::Reload(ReloadCause::Signal));
    assert!(rig.calls().contains(&Call::Unplace {
        origin: APP.to_owned(),
        pid: 7110
    }));
}

#[test]
fn the_exec_path_reads_cwd_only_for_a_rule_that_can_match_and_a_reload_that_needs_it_reads_it() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    // No shipped rule with a cwd glob can match a `worker`: its cwd is
    // not read.
    let mut worker = info(7130, "worker", "/usr/bin/worker", &["worker"]);
    worker.cwd = "/home/u/proj-x".into();
    rig.exec(1, worker.clone());
    let read = rig.agent.table.get(7130).unwrap();
    assert!(!read.facts.cwd, "{:?}", read.facts);
    assert_eq!(read.info.cwd, "");
    // The shipped env-only rules read the environment for everyone; no
    // rule a worker can pass reads its argv (the ancestor rules read their
    // ancestors', when a descendant gets that far).
    assert!(read.facts.env && !read.facts.argv, "{:?}", read.facts);
    assert!(read.info.argv.is_empty());
    // python3 could be ComfyUI (exe, argv and cwd globs): its cwd is read.
    let mut comfy = info(7131, "python3", "/usr/bin/python3", &["python3", "main.py"]);
    comfy.cwd = "/home/u/ComfyUI".into();
    rig.exec(1, comfy);
    assert_eq!(rig.class_of(7131).as_deref(), Some("ai"));
    // A reload whose rule reads cwd reads what the exec path left out.
    std::fs::write(
        &rig.override_path,
        "[[rules]]\nname = \"proj-x\"\nclass = \"dev\"\ncomm = [\"worker\"]\ncwd = [\"*/proj-x\"]\n",
    )
    .unwrap();
    rig.agent.handle(Event::Reload(ReloadCause::FileChanged));
    assert_eq!(rig.class_of(7130).as_deref(), Some("dev"));
    assert_eq!(rig.placed("dev"), vec![7130]);
    // With that rule loaded, the next worker's cwd is read at exec.
    let mut next = info(7132, "worker", "/usr/bin/worker", &["worker"]);
    next.cwd = "/home/u/proj-x".into();
    rig.exec(1, next);
    assert!(rig.agent.table.get(7132).unwrap().facts.cwd);
    assert_eq!(rig.class_of(7132).as_deref(), Some("dev"));
}

#[test]
fn an_ancestor_is_read_for_an_ancestor_rule_when_a_descendant_gets_that_far() {
    let mut rig = rig(
        "[[rules]]\nname = \"proj-x-build\"\nclass = \"render\"\ncomm = [\"xworker\"]\n\
         ancestor = { argv = [\"*proj-x*\"] }\n",
    );
    rig.agent.handle(Event::Seed);
    // No rule a `builder` passes reads argv: its exec reads none.
    rig.exec(
        1,
        info(
            7140,
            "builder",
            "/usr/bin/builder",
            &["builder", "--in", "proj-x"],
        ),
    );
    assert!(!rig.agent.table.get(7140).unwrap().facts.argv);
    // Its xworker passes `proj-x-build` on its own: the builder is read whole
    // and the ancestor matcher sees its argv.
    rig.exec(7140, plain(7141, "xworker"));
    assert_eq!(rig.class_of(7141).as_deref(), Some("render"));
    let builder = rig.agent.table.get(7140).unwrap();
    assert!(builder.facts.is_all(), "{:?}", builder.facts);
    assert_eq!(builder.info.argv, ["builder", "--in", "proj-x"]);
    // Under another builder, not: the rule's ancestor matcher decides.
    rig.exec(
        1,
        info(
            7142,
            "builder",
            "/usr/bin/builder",
            &["builder", "--in", "proj-y"],
        ),
    );
    rig.exec(7142, plain(7143, "xworker"));
    assert_eq!(rig.class_of(7143).as_deref(), Some("system"));
}

#[test]
fn a_refused_reload_keeps_the_last_good_policy_and_moves_nothing() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, plain(7120, "htop"));
    std::fs::write(
        &rig.override_path,
        "[[rules]]\nname = \"x\"\nclass = \"nope\"\ncomm = [\"htop\"]\n",
    )
    .unwrap();
    let (response, _) = rig.ask(Request::Reload, Some(0));
    let Response::Reloaded(status) = response else {
        panic!("reload answered {response:?}");
    };
    assert!(!status.ok);
    assert!(
        status.message.contains("policy.toml:"),
        "{}",
        status.message
    );
    assert!(rig.moves().is_empty());
    assert_eq!(rig.agent.reloads.refused, 1);
}

#[test]
fn every_reload_trigger_sends_reloading_then_ready() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    let mut seen = Vec::new();
    seen.push(rig.agent.handle(Event::Reload(ReloadCause::FileChanged)));
    seen.push(rig.agent.handle(Event::Reload(ReloadCause::Signal)));
    seen.push(rig.ask(Request::Reload, Some(0)).1);
    for effects in seen {
        let notices: Vec<&Notice> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Notify(n) => Some(n),
                _ => None,
            })
            .collect();
        assert!(
            matches!(
                notices.as_slice(),
                [Notice::Reloading, Notice::Ready { .. }]
            ),
            "{notices:?}"
        );
    }
}

#[test]
fn a_reused_pid_is_forgotten_on_reload_not_moved() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, plain(7130, "htop"));
    // 7130 exited and another process got its pid; the exit was lost.
    rig.script(1, plain(7130, "htop"), 999_999);
    std::fs::write(
        &rig.override_path,
        "[[rules]]\nname = \"htop-is-dev\"\nclass = \"dev\"\ncomm = [\"htop\"]\n",
    )
    .unwrap();
    rig.agent.handle(Event::Reload(ReloadCause::Request));
    assert!(rig.placed("dev").is_empty(), "{:?}", rig.calls());
    assert!(rig.agent.table.get(7130).is_none());
}

#[test]
fn while_a_game_runs_the_others_leave_its_cpus_and_get_them_back_after_the_hold_down() {
    let mut rig = rig("[modes]\nhold_down_ms = 30000\nmin_dwell_ms = 5000\n");
    rig.agent.handle(Event::Seed);
    // Shared: dev may use the game's CPUs while no game runs.
    assert_eq!(rig.cpus("dev"), "0-15");
    rig.at_ms(10_000);
    rig.steam_game();
    assert_eq!(rig.agent.modes.mode(), Mode::Protected);
    assert_eq!(rig.cpus("game"), "0-7");
    assert!(!rig.cpus("dev").is_empty());
    let dev = crate::model::cpus::CpuList::parse(&rig.cpus("dev")).unwrap();
    assert!(
        dev.iter().all(|c| c >= 8),
        "dev left the game's CPUs: {dev}"
    );
    rig.exit(40120);
    rig.exit(40112);
    rig.at_ms(20_000);
    assert_eq!(
        rig.agent.modes.mode(),
        Mode::Protected,
        "hold-down not over"
    );
    rig.at_ms(40_001);
    assert_eq!(rig.agent.modes.mode(), Mode::Shared);
    assert_eq!(rig.cpus("dev"), "0-15");
}

#[test]
fn a_game_flapping_within_the_dwell_does_not_flap_the_core_sets() {
    let mut rig = rig("[modes]\nhold_down_ms = 30000\nmin_dwell_ms = 5000\n");
    rig.agent.handle(Event::Seed);
    rig.at_ms(10_000);
    let mut t = 10_000;
    for round in 0..20u32 {
        let pid = 41_000 + round;
        rig.exec(
            1,
            info(
                pid,
                "game.x86_64",
                "/g/steamapps/common/x/game.x86_64",
                &["game.x86_64"],
            ),
        );
        t += 200;
        rig.at_ms(t);
        rig.exit(pid);
        t += 200;
        rig.at_ms(t);
    }
    let switches = rig
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::SetCpus { class, .. } if class == "dev"))
        .count();
    assert_eq!(
        switches,
        2,
        "shared at start, then one switch to protected, held: {:?}",
        rig.calls()
    );
}

#[test]
fn one_game_and_its_children_count_as_one_game_launch() {
    let mut rig = rig("");
    rig.steam_game();
    for child in 52_000..52_005 {
        rig.fork(40120, child, group_id("game"));
    }
    rig.agent.handle(Event::KernelBatchDone);
    assert_eq!(rig.agent.table.count("game"), 7);
    assert_eq!(rig.agent.protected_running(), 1);
    assert!(
        rig.agent.modes.why().contains("1 game launch running"),
        "{}",
        rig.agent.modes.why()
    );
    rig.exec(
        1,
        info(43_000, "other", "/g/steamapps/common/y/other", &["other"]),
    );
    assert_eq!(rig.agent.protected_running(), 2);
    // The loop did not count again (games were running already); status
    // counts when it is asked.
    rig.agent.handle(Event::KernelBatchDone);
    assert_eq!(rig.agent.modes.games_seen(), 1);
    let status = rig.agent.status();
    assert_eq!(status.protected_launches, 2);
    assert!(
        status.mode_why.contains("2 game launches running"),
        "{}",
        status.mode_why
    );
}

#[test]
fn a_protected_class_other_than_game_drives_the_mode() {
    let mut rig = rig(
        "[modes]\nprotected_class = \"render\"\nhold_down_ms = 1000\nmin_dwell_ms = 0\n\
         [gpu.classes.render]\npriority = 2\nreserve = \"40%\"\n",
    );
    rig.agent.handle(Event::Seed);
    rig.at_ms(1_000);
    rig.steam_game();
    assert_eq!(
        rig.agent.modes.mode(),
        Mode::Shared,
        "a game is not protected here"
    );
    rig.exec(1, blender_batch(7140));
    assert_eq!(rig.agent.modes.mode(), Mode::Protected);
    let game = crate::model::cpus::CpuList::parse(&rig.cpus("game")).unwrap();
    assert!(
        game.iter().all(|c| !(16..=19).contains(&c)),
        "game left render's CPUs: {game}"
    );
}

#[test]
fn corral_run_class_pins_the_class_across_exec() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.script(1, plain(4242, "sh"), 0);
    let (response, _) = rig.ask(
        Request::Enter {
            class: "ai".to_owned(),
        },
        Some(1000),
    );
    assert!(matches!(response, Response::Entered { .. }), "{response:?}");
    rig.exec(1, plain(4242, "python3"));
    assert_eq!(rig.class_of(4242).as_deref(), Some("ai"));
    assert_eq!(rig.placed("ai"), vec![4242]);
}

/// Regression (issue 12): `corral run --class` moved the SO_PEERCRED pid;
/// had the asker exited and its pid been reused, the newcomer was moved.
#[test]
fn corral_run_class_never_moves_a_pid_whose_asker_is_gone() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    // Pid 4242 is alive (a newcomer), but the process that asked is gone.
    rig.script(1, plain(4242, "sh"), 0);
    let mut asker = std::process::Command::new("true").spawn().unwrap();
    let handle = PidRef::open(asker.id()).unwrap();
    asker.wait().unwrap();
    let (response, _) = rig.ask_as(
        Request::Enter {
            class: "ai".to_owned(),
        },
        Some(1000),
        Some(Arc::new(handle)),
    );
    let Response::Error { message } = response else {
        panic!("entered: {response:?}");
    };
    assert!(
        message.contains("exited before it could be moved"),
        "{message}"
    );
    assert!(rig.moves().is_empty(), "moved: {:?}", rig.moves());
    // Without any handle (the kernel could not give one): refused as well.
    let (response, _) = rig.ask_as(
        Request::Enter {
            class: "ai".to_owned(),
        },
        Some(1000),
        None,
    );
    assert!(matches!(response, Response::Error { .. }), "{response:?}");
    assert!(rig.moves().is_empty());
}

#[test]
fn users_may_not_enter_classes_closed_to_them() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.script(1, plain(4242, "sh"), 0);
    let (response, _) = rig.ask(
        Request::Enter {
            class: "game".to_owned(),
        },
        Some(1000),
    );
    let Response::Error { message } = response else {
        panic!("entered: {response:?}");
    };
    assert!(message.contains("user_run = true"), "{message}");
    assert!(rig.moves().is_empty());
}

#[test]
fn a_peer_without_credentials_is_refused_everything() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    for request in [
        Request::Status,
        Request::Reload,
        Request::Explain {
            pid: 1,
            rules: false,
        },
        Request::Enter {
            class: "dev".to_owned(),
        },
    ] {
        let (response, effects) = rig.ask(request, None);
        assert!(matches!(response, Response::Error { .. }), "{response:?}");
        assert!(effects.is_empty());
    }
    assert!(rig.moves().is_empty());
}

#[test]
fn explain_of_another_users_process_is_for_root_only() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, nvim(7150));
    let (as_other, _) = rig.ask(
        Request::Explain {
            pid: 7150,
            rules: false,
        },
        Some(1001),
    );
    assert!(matches!(as_other, Response::Error { .. }), "{as_other:?}");
    let (as_owner, _) = rig.ask(
        Request::Explain {
            pid: 7150,
            rules: false,
        },
        Some(1000),
    );
    assert!(matches!(as_owner, Response::Explain(_)), "{as_owner:?}");
}

#[test]
fn status_counts_processes_per_class_from_the_table() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    rig.exec(1, nvim(7160));
    rig.exec(1, nvim(7161));
    rig.exec(1, blender_batch(7162));
    rig.exit(7161);
    let (response, _) = rig.ask(Request::Status, Some(1000));
    let Response::Status(status) = response else {
        panic!("{response:?}");
    };
    let count = |c: &str| {
        status
            .classes
            .iter()
            .find(|s| s.class == c)
            .unwrap()
            .processes
    };
    assert_eq!((count("dev"), count("render"), count("game")), (1, 1, 0));
}

#[test]
fn stop_releases_everything_and_says_stopping() {
    let mut rig = rig("");
    rig.agent.handle(Event::Seed);
    let effects = rig.agent.handle(Event::Stop);
    assert_eq!(rig.moves(), vec![Call::ReleaseAll]);
    assert_eq!(
        effects,
        vec![Effect::Notify(Notice::Stopping), Effect::Exit]
    );
}

#[test]
fn every_watchdog_tick_pings() {
    let mut rig = rig("");
    for _ in 0..3 {
        assert_eq!(
            rig.agent.handle(Event::WatchdogTick),
            vec![Effect::Notify(Notice::Watchdog)]
        );
    }
}

// ---------------------------------------------------------------------------
// Power, desktop notifications, coexistence (agent_desktop.rs)

fn power_requests(effects: &[Effect]) -> Vec<PowerRequest> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Power(r) => Some(*r),
            _ => None,
        })
        .collect()
}

impl Rig {
    /// The Steam reaper (40112) starts the game (40120); every effect.
    fn start_game(&mut self) -> Vec<Effect> {
        let mut effects = self.exec(
            2305,
            info(
                40112,
                "reaper",
                "/home/u/.local/share/Steam/ubuntu12_32/reaper",
                &["reaper", "SteamLaunch", "AppId=570", "--", "game.x86_64"],
            ),
        );
        effects.extend(self.exec(
            40112,
            info(
                40120,
                "game.x86_64",
                "/home/u/.local/share/Steam/steamapps/common/dota/game.x86_64",
                &["game.x86_64"],
            ),
        ));
        effects
    }

    fn end_game(&mut self) {
        self.exit(40120);
        self.exit(40112);
    }

    fn seeded(&mut self) -> Vec<Effect> {
        self.agent.handle(Event::Seed)
    }

    /// A GPU poll: 24 GiB, `free` GiB free, the game and an ollama runner
    /// (pid 7700, `ai`) holding what they hold, at `temp` °C.
    fn gpu_poll(&mut self, free_gib: u64, ai_gib: u64, temp: u32) -> Vec<Effect> {
        use crate::gpu::nvml::{GpuSnapshot, ProcessKind};
        let snapshot = GpuSnapshot::one_gpu(
            24,
            free_gib,
            temp,
            &[
                (40120, 1, ProcessKind::Graphics),
                (7700, ai_gib, ProcessKind::Compute),
            ],
        );
        self.agent.handle(Event::Gpu(GpuEvent::Snapshot(snapshot)))
    }

    fn ollama(&mut self) {
        self.exec(
            1,
            info(
                7700,
                "ollama",
                "/usr/local/bin/ollama",
                &["ollama", "runner", "--model", "x"],
            ),
        );
        assert_eq!(self.class_of(7700).as_deref(), Some("ai"));
    }
}

/// The one notification in `effects`, which goes to uid 1000 (who owns
/// every scripted process).
fn only_notice(effects: &[Effect]) -> crate::service::desktop_notify::Notification {
    let sent = desktop(effects);
    assert_eq!(sent.len(), 1, "{effects:?}");
    assert_eq!(sent[0].0, 1000, "the owner of the processes");
    sent[0].1.clone()
}

/// A game and an ollama runner (ai), both alice's (uid 1000).
fn game_and_ollama(override_text: &str) -> Rig {
    let mut rig = rig(override_text);
    rig.steam_game();
    rig.ollama();
    rig
}

fn desktop(effects: &[Effect]) -> Vec<(u32, &crate::service::desktop_notify::Notification)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Desktop { uid, notification } => Some((*uid, notification)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_game_holds_performance_and_the_last_game_ending_releases_it_after_the_hold_down() {
    let mut rig = rig("[modes]\nhold_down_ms = 30000\nmin_dwell_ms = 5000\n");
    rig.script(1, plain(2305, "steam"), 0);
    assert!(
        power_requests(&rig.seeded()).is_empty(),
        "no game, nothing to release"
    );
    rig.at_ms(10_000);
    assert_eq!(
        power_requests(&rig.start_game()),
        [PowerRequest::Hold { sysfs: true }]
    );
    // The runner's report shows in status and in explain of the game.
    let held = PowerStatus {
        enabled: true,
        method: Some("ppd".into()),
        detail: "`performance` through power-profiles-daemon (net.hadess.PowerProfiles, cookie 3)"
            .into(),
    };
    assert_eq!(rig.agent.handle(Event::Power(held.clone())), []);
    assert_eq!(rig.agent.status().power, held);
    assert_eq!(rig.agent.metrics().power_held.as_deref(), Some("ppd"));
    assert_eq!(
        rig.agent.explain(40120, false).unwrap().power.as_deref(),
        Some(
            "holding `performance` through power-profiles-daemon (net.hadess.PowerProfiles, cookie 3)"
        )
    );
    assert_eq!(
        rig.agent.explain(2305, false).unwrap().power,
        None,
        "not the game"
    );
    rig.end_game();
    rig.clock_ms.store(20_000, Ordering::Relaxed);
    assert!(
        power_requests(&rig.agent.handle(Event::ModeTimer)).is_empty(),
        "hold-down"
    );
    rig.clock_ms.store(40_001, Ordering::Relaxed);
    assert_eq!(
        power_requests(&rig.agent.handle(Event::ModeTimer)),
        [PowerRequest::Release]
    );
    assert!(
        power_requests(&rig.agent.handle(Event::SweepTick)).is_empty(),
        "asked once"
    );
}

#[test]
fn stopping_while_a_game_runs_releases_the_hold_before_leaving() {
    let mut rig = rig("");
    rig.steam_game();
    assert_eq!(
        rig.agent.desktop.power_asked,
        Some(PowerRequest::Hold { sysfs: true })
    );
    assert_eq!(
        rig.agent.handle(Event::Stop),
        [
            Effect::Power(PowerRequest::Release),
            Effect::Notify(Notice::Stopping),
            Effect::Exit
        ]
    );
}

#[test]
fn power_off_in_the_policy_holds_nothing_and_turning_it_off_releases_the_hold() {
    let mut off = rig("[power]\nenabled = false\n");
    off.script(1, plain(2305, "steam"), 0);
    off.seeded();
    assert!(power_requests(&off.start_game()).is_empty());
    assert_eq!(off.agent.modes.mode(), Mode::Protected);
    assert!(
        off.agent
            .status()
            .power
            .describe()
            .contains("[power] enabled = false"),
        "{:?}",
        off.agent.status().power
    );

    let mut rig = rig("");
    rig.steam_game();
    std::fs::write(&rig.override_path, "[power]\nenabled = false\n").unwrap();
    let effects = rig.agent.handle(Event::Reload(ReloadCause::Request));
    assert_eq!(power_requests(&effects), [PowerRequest::Release]);
}

#[test]
fn a_vram_ladder_notify_step_tells_the_owner_of_the_class_once_per_interval() {
    let mut rig = game_and_ollama("[notifications]\nmin_interval_ms = 60000\n");
    // The game may still claim 7 GiB of its 8 GiB reserve, 2 GiB are free,
    // ai holds 12 GiB over its 6 GiB max: the ladder's first step.
    let notice = only_notice(&rig.gpu_poll(2, 12, 60));
    assert_eq!(notice.summary, "corral: `ai` VRAM needed by a game");
    assert!(notice.body.contains("ai uses 12.0 GiB"), "{}", notice.body);
    assert_eq!(notice.urgency, Urgency::Normal);
    // Reset the ladder (pressure over), then the same step again within the
    // interval: rate limited.
    rig.gpu_poll(20, 1, 60);
    rig.clock_ms.store(30_000, Ordering::Relaxed);
    assert!(desktop(&rig.gpu_poll(2, 12, 60)).is_empty());
    assert_eq!(
        rig.agent.gpu.actions.back().map(|a| a.kind.as_str()),
        Some("notify"),
        "the step itself was still taken"
    );
}

#[test]
fn desktop_notifications_off_in_the_policy_sends_none() {
    let mut rig = game_and_ollama("[notifications]\ndesktop = false\n");
    assert!(desktop(&rig.gpu_poll(2, 12, 60)).is_empty());
}

#[test]
fn a_thermal_emergency_is_critical_and_goes_to_the_game_s_and_the_cooled_classes_users() {
    let mut rig = game_and_ollama("");
    // One user owns both the game and the cooled class: one notification.
    let notice = only_notice(&rig.gpu_poll(20, 1, 95));
    assert_eq!(notice.summary, "corral: thermal emergency");
    assert_eq!(notice.urgency, Urgency::Critical);
}

#[test]
fn coexisting_tools_are_found_at_start_and_on_the_sweep() {
    let mut rig = rig("");
    rig.script(
        1,
        info(812, "gamemoded", "/usr/bin/gamemoded", &["gamemoded"]),
        0,
    );
    rig.seeded();
    let tools = |rig: &Rig| -> Vec<(String, Option<u32>)> {
        let found = rig.agent.status().coexistence;
        found.into_iter().map(|f| (f.tool, f.pid)).collect()
    };
    assert_eq!(tools(&rig), [("gamemoded".to_owned(), Some(812))]);
    assert_eq!(rig.agent.metrics().coexisting, ["gamemoded"]);
    rig.exec(
        1,
        info(950, "tuned", "/usr/bin/python3", &["/usr/sbin/tuned"]),
    );
    // Not before the sweep: detection is on the slow timer.
    assert_eq!(tools(&rig).len(), 1);
    rig.agent.handle(Event::SweepTick);
    assert_eq!(
        tools(&rig),
        [
            ("gamemoded".to_owned(), Some(812)),
            ("tuned".to_owned(), Some(950))
        ]
    );
    rig.exit(812);
    rig.exit(950);
    rig.agent.handle(Event::SweepTick);
    assert!(tools(&rig).is_empty());
}

#[test]
fn a_reload_that_changes_how_to_hold_releases_and_holds_anew() {
    let mut rig = rig("");
    rig.steam_game();
    std::fs::write(&rig.override_path, "[power]\nsysfs = false\n").unwrap();
    let effects = rig.agent.handle(Event::Reload(ReloadCause::Request));
    assert_eq!(
        power_requests(&effects),
        [PowerRequest::Release, PowerRequest::Hold { sysfs: false }]
    );
    assert!(power_requests(&rig.agent.handle(Event::SweepTick)).is_empty());
}
#[path = "agent_gamemode_tests.rs"]
mod gamemode;
