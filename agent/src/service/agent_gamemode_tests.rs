//! The loop's GameMode decisions: registration puts a process (and what
//! it starts) in `game`; unregistering, its exit, its bus changing hands
//! end that; only the owner or root may register a process.

use super::*;
use crate::{
    model::gamemode::{ACTIVE, ACTIVE_AND_GAME, ERROR, INACTIVE, OK, Op, Provider, REJECTED},
    service::gamemode_bus::{Call as BusCall, Incoming, Signal},
};

/// A game binary the policy does not know (it would stay `system`).
fn indie(pid: u32) -> ProcInfo {
    info(pid, "indie", "/home/u/games/indie/indie", &["./indie"])
}

impl Rig {
    /// A GameMode call through uid `bus_uid`'s bus from `caller_uid`.
    fn gamemode(
        &mut self,
        op: Op,
        game: u32,
        requester: u32,
        caller_uid: Option<u32>,
    ) -> (i32, Vec<Effect>) {
        let (reply, answer) = oneshot::channel();
        let effects = self.agent.handle(Event::GameMode(Incoming::Call(BusCall {
            bus_uid: 1000,
            caller_uid,
            op,
            game,
            requester,
            reply,
            received: std::time::Instant::now(),
        })));
        (answer.blocking_recv().expect("an answer"), effects)
    }

    fn indie_running(&mut self) {
        self.agent.handle(Event::Seed);
        self.exec(1, indie(7000));
        assert_eq!(
            self.class_of(7000).as_deref(),
            Some("system"),
            "no rule knows it"
        );
    }
}

/// The GameMode signals among `effects` (a game also holds `performance`).
fn bus_signals(effects: Vec<Effect>) -> Vec<Effect> {
    effects
        .into_iter()
        .filter(|e| matches!(e, Effect::GameMode(_)))
        .collect()
}

fn signal(game: u32, registered: bool, client_count: i32) -> Vec<Effect> {
    vec![Effect::GameMode(Signal {
        bus_uid: 1000,
        game,
        registered,
        client_count,
    })]
}

#[test]
fn a_registered_pid_becomes_game_and_explain_says_who_registered_it() {
    let mut rig = rig("");
    rig.indie_running();
    let (code, effects) = rig.gamemode(Op::Register, 7000, 7000, Some(1000));
    assert_eq!(code, OK);
    assert!(
        effects.contains(&Effect::Power(PowerRequest::Hold { sysfs: true })),
        "a registered game holds `performance` like any game: {effects:?}"
    );
    assert_eq!(
        bus_signals(effects),
        signal(7000, true, 1),
        "GameRegistered, ClientCount 1"
    );
    assert_eq!(rig.placed("game"), vec![7000]);
    let (response, _) = rig.ask(
        Request::Explain {
            pid: 7000,
            rules: false,
        },
        Some(1000),
    );
    let Response::Explain(e) = response else {
        panic!("explain answered {response:?}");
    };
    let text = crate::observe::views::render_explanation(&e);
    assert!(
        text.contains("rule      registered through GameMode by pid 7000 (uid 1000's session bus)"),
        "{text}"
    );
    assert_eq!(rig.agent.modes.mode(), Mode::Protected, "a game runs");
}

#[test]
fn children_of_a_registered_game_inherit_game_even_across_exec() {
    let mut rig = rig("");
    rig.indie_running();
    rig.exec(7000, plain(7001, "helper"));
    rig.gamemode(Op::Register, 7000, 7000, Some(1000));
    assert_eq!(
        rig.class_of(7001).as_deref(),
        Some("game"),
        "already running child"
    );
    rig.fork(7000, 7002, 0);
    rig.exec(7000, plain(7002, "worker"));
    assert_eq!(rig.class_of(7002).as_deref(), Some("game"), "new child");
    assert!(rig.placed("game").contains(&7002));
}

#[test]
fn unregister_puts_the_game_and_its_children_back() {
    let mut rig = rig("");
    rig.indie_running();
    rig.gamemode(Op::Register, 7000, 7000, Some(1000));
    rig.fork(7000, 7002, group_id("game"));
    let (code, effects) = rig.gamemode(Op::Unregister, 7000, 7000, Some(1000));
    assert_eq!(code, OK);
    assert_eq!(
        bus_signals(effects),
        signal(7000, false, 0),
        "GameUnregistered, ClientCount 0"
    );
    assert_eq!(rig.class_of(7000).as_deref(), Some("system"));
    assert_eq!(rig.class_of(7002).as_deref(), Some("system"));
    let unplaced: Vec<u32> = rig
        .moves()
        .into_iter()
        .filter_map(|c| match c {
            Call::Unplace { pid, .. } => Some(pid),
            _ => None,
        })
        .collect();
    assert_eq!(unplaced, vec![7000, 7002], "both back where they came from");
    let (again, _) = rig.gamemode(Op::Unregister, 7000, 7000, Some(1000));
    assert_eq!(again, ERROR, "not registered any more");
}

#[test]
fn the_games_exit_ends_the_registration_and_its_children_go_back() {
    let mut rig = rig("");
    rig.indie_running();
    rig.gamemode(Op::Register, 7000, 7000, Some(1000));
    rig.fork(7000, 7002, group_id("game"));
    rig.procs.remove(7000);
    let effects = rig
        .agent
        .handle(Event::Kernel(event(EventKind::Exit, 7000, 0, 0)));
    assert_eq!(bus_signals(effects), signal(7000, false, 0));
    assert_eq!(rig.class_of(7002).as_deref(), Some("system"));
    assert!(rig.agent.gamemode.registry.get(7000).is_none());
    let (status, _) = rig.gamemode(Op::Query, 7002, 7002, Some(1000));
    assert_eq!(status, INACTIVE);
}

#[test]
fn another_users_pid_is_refused_and_root_may_register_it() {
    let mut rig = rig("");
    rig.indie_running();
    let (code, effects) = rig.gamemode(Op::Register, 7000, 7000, Some(1001));
    assert_eq!(code, REJECTED);
    assert!(effects.is_empty(), "refused: nothing changes");
    assert_eq!(rig.class_of(7000).as_deref(), Some("system"));
    assert!(rig.placed("game").is_empty());
    let (code, _) = rig.gamemode(Op::Register, 7000, 4242, Some(0));
    assert_eq!(code, OK, "root may");
    assert_eq!(rig.class_of(7000).as_deref(), Some("game"));
    let (code, _) = rig.gamemode(Op::Unregister, 7000, 7000, Some(1001));
    assert_eq!(code, REJECTED, "nor may another user end it");
    let (code, _) = rig.gamemode(Op::Register, 9999, 9999, Some(1000));
    assert_eq!(code, ERROR, "no such process");
    let (code, _) = rig.gamemode(Op::Register, 7000, 7000, Some(1000));
    assert_eq!(code, ERROR, "registered already");
}

#[test]
fn query_status_is_two_for_a_game_one_for_others_while_one_runs_zero_after() {
    let mut rig = rig("");
    rig.indie_running();
    rig.exec(1, nvim(7100));
    assert_eq!(rig.gamemode(Op::Query, 7100, 7100, Some(1000)).0, INACTIVE);
    rig.gamemode(Op::Register, 7000, 7000, Some(1000));
    assert_eq!(
        rig.gamemode(Op::Query, 7000, 7000, Some(1000)).0,
        ACTIVE_AND_GAME
    );
    assert_eq!(rig.gamemode(Op::Query, 7100, 7100, Some(1000)).0, ACTIVE);
    rig.gamemode(Op::Unregister, 7000, 7000, Some(1000));
    assert_eq!(rig.gamemode(Op::Query, 7100, 7100, Some(1000)).0, INACTIVE);
}

#[test]
fn a_game_corral_found_by_itself_answers_two_without_registering() {
    let mut rig = rig("");
    rig.steam_game();
    assert_eq!(
        rig.gamemode(Op::Query, 40120, 40120, Some(1000)).0,
        ACTIVE_AND_GAME
    );
    assert_eq!(rig.gamemode(Op::Query, 2305, 2305, Some(1000)).0, ACTIVE);
}

#[test]
fn gamemoded_signals_are_followed_and_end_when_it_leaves() {
    let mut rig = rig("");
    rig.indie_running();
    rig.agent.handle(Event::GameMode(Incoming::Provider {
        bus_uid: 1000,
        provider: Some(Provider::Gamemoded),
    }));
    let effects = rig.agent.handle(Event::GameMode(Incoming::Followed {
        bus_uid: 1000,
        game: 7000,
        registered: true,
    }));
    assert!(
        bus_signals(effects).is_empty(),
        "gamemoded emits its own signals"
    );
    assert_eq!(rig.class_of(7000).as_deref(), Some("game"));
    assert_eq!(
        rig.agent.status().gamemode,
        vec!["following gamemoded on uid 1000's bus, 1 game(s) registered"]
    );
    rig.agent.handle(Event::GameMode(Incoming::Followed {
        bus_uid: 1000,
        game: 7000,
        registered: false,
    }));
    assert_eq!(rig.class_of(7000).as_deref(), Some("system"));
    // Registered again, then gamemoded goes away: the registration goes too.
    rig.agent.handle(Event::GameMode(Incoming::Followed {
        bus_uid: 1000,
        game: 7000,
        registered: true,
    }));
    rig.agent.handle(Event::GameMode(Incoming::Provider {
        bus_uid: 1000,
        provider: Some(Provider::Corral),
    }));
    assert_eq!(rig.class_of(7000).as_deref(), Some("system"));
    assert_eq!(
        rig.agent.status().gamemode,
        vec!["provided by corral on uid 1000's bus, 0 game(s) registered"]
    );
}

#[test]
fn gamemoded_registering_another_users_pid_is_not_followed() {
    let mut rig = rig("");
    rig.indie_running();
    rig.agent.handle(Event::GameMode(Incoming::Followed {
        bus_uid: 1001,
        game: 7000,
        registered: true,
    }));
    assert_eq!(rig.class_of(7000).as_deref(), Some("system"));
}

#[test]
fn a_registered_game_whose_exit_was_missed_ends_at_the_sweep() {
    let mut rig = rig("");
    rig.indie_running();
    rig.gamemode(Op::Register, 7000, 7000, Some(1000));
    rig.procs.remove(7000);
    let effects = rig.agent.handle(Event::SweepTick);
    assert_eq!(bus_signals(effects), signal(7000, false, 0));
    assert!(rig.agent.gamemode.registry.get(7000).is_none());
}
