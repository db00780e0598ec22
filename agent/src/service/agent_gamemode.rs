//! The loop's GameMode decisions: a registered pid (through corral's own
//! `com.feralinteractive.GameMode` or gamemoded's signals) becomes the
//! protected class, `game` in the shipped policy, and what it starts
//! inherits it; unregistering, the game's exit or its bus going away ends
//! that. Who may register whom is [`gamemode::check_caller`].

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::{
    agent::{Agent, Effect},
    gamemode_bus::{Call, Incoming, Signal},
};
use crate::model::{
    classify::Decision,
    gamemode::{self, ERROR, OK, Op, Provider, Registration, Registry},
};

/// What the loop knows about GameMode.
#[derive(Debug, Default)]
pub struct GameModeState {
    pub registry: Registry,
    /// Who provides GameMode on each user's bus corral is on.
    pub providers: BTreeMap<u32, Provider>,
}

impl Agent {
    pub(super) fn on_gamemode(&mut self, incoming: Incoming) -> Vec<Effect> {
        match incoming {
            Incoming::Call(call) => self.gamemode_call(call),
            Incoming::Followed {
                bus_uid,
                game,
                registered: true,
            } => {
                let registration = Registration {
                    game,
                    requester: game,
                    bus_uid,
                    start_ticks: 0,
                    provider: Provider::Gamemoded,
                };
                if let Err(refused) =
                    gamemode::check_caller(Some(bus_uid), game, self.procs.owner(game))
                {
                    warn!(
                        "gamemoded registered pid {game}; not followed: {}",
                        refused.message
                    );
                    return Vec::new();
                }
                self.register_game(registration);
                Vec::new()
            }
            Incoming::Followed {
                bus_uid,
                game,
                registered: false,
            } => {
                if let Some(r) = self.gamemode.registry.unregister(bus_uid, game) {
                    self.end_game(&r, false);
                }
                Vec::new()
            }
            Incoming::Provider { bus_uid, provider } => {
                let before = match provider {
                    Some(p) => self.gamemode.providers.insert(bus_uid, p),
                    None => self.gamemode.providers.remove(&bus_uid),
                };
                // What the previous provider registered ends with it.
                for old in [Provider::Corral, Provider::Gamemoded] {
                    if Some(old) != provider && before == Some(old) {
                        for r in self.gamemode.registry.remove_bus(bus_uid, old) {
                            self.end_game(&r, false);
                        }
                    }
                }
                Vec::new()
            }
        }
    }

    fn gamemode_call(&mut self, call: Call) -> Vec<Effect> {
        let (bus_uid, game, requester, caller_uid) =
            (call.bus_uid, call.game, call.requester, call.caller_uid);
        let (code, effects) = match call.op {
            Op::Query => {
                let registered = self.gamemode.registry.get(game).is_some();
                let protected = self.protected().to_owned();
                let in_protected = self
                    .table
                    .get(game)
                    .is_some_and(|p| p.decision.class == protected);
                let running =
                    self.protected_active() || self.gamemode.registry.client_count(bus_uid) > 0;
                (
                    gamemode::query_status(registered, in_protected, running),
                    Vec::new(),
                )
            }
            Op::Register | Op::Unregister => {
                match gamemode::check_caller(caller_uid, game, self.procs.owner(game)) {
                    Err(refused) => {
                        warn!(op = ?call.op, uid = ?caller_uid, "GameMode: refused: {}", refused.message);
                        (refused.code, Vec::new())
                    }
                    Ok(()) if call.op == Op::Register => {
                        let code = self.register_game(Registration {
                            game,
                            requester,
                            bus_uid,
                            start_ticks: 0,
                            provider: Provider::Corral,
                        });
                        if code == OK {
                            info!(
                                game,
                                requester,
                                bus_uid,
                                latency_us = call.received.elapsed().as_micros() as u64,
                                "GameMode: registered and placed"
                            );
                        }
                        (code, self.signal(bus_uid, game, true, code))
                    }
                    Ok(()) => match self.gamemode.registry.unregister(bus_uid, game) {
                        Some(r) => {
                            self.end_game(&r, false);
                            (OK, self.signal(bus_uid, game, false, OK))
                        }
                        None => (ERROR, Vec::new()),
                    },
                }
            }
        };
        let _ = call.reply.send(code);
        effects
    }

    fn signal(&self, bus_uid: u32, game: u32, registered: bool, code: i32) -> Vec<Effect> {
        if code != OK {
            return Vec::new();
        }
        vec![Effect::GameMode(Signal {
            bus_uid,
            game,
            registered,
            client_count: self.gamemode.registry.client_count(bus_uid),
        })]
    }

    /// Registers `registration` and puts its game, and what it runs
    /// already, in the protected class.
    fn register_game(&mut self, mut registration: Registration) -> i32 {
        let game = registration.game;
        let Ok(read) = self.procs.read(game, &self.env_keys) else {
            return ERROR;
        };
        registration.start_ticks = read.start_ticks;
        let decision =
            Decision::declared(self.protected(), registration.rule(), registration.source());
        let code = self.gamemode.registry.register(registration);
        if code != OK {
            return code;
        }
        if self.table.get(game).is_none() {
            self.table.insert(game, read.into_proc());
        }
        self.table.set_decision(game, decision);
        if let Some(p) = self.table.get_mut(game) {
            p.pinned = true;
        }
        self.place(game, None);
        for pid in self.descendants(game) {
            if self.table.get(pid).is_some_and(|p| !p.pinned) {
                self.decide(pid);
                self.place_or_release(pid);
            }
        }
        self.update_mode();
        OK
    }

    /// Ends what `registration` declared: the game (unless `gone`) and its
    /// descendants go back to what the policy says.
    fn end_game(&mut self, registration: &Registration, gone: bool) {
        let game = registration.game;
        let (rule, source) = (registration.rule(), Some(registration.source()));
        let mut pids = self.descendants(game);
        pids.insert(0, game);
        for pid in pids {
            let Some(p) = self.table.get_mut(pid) else {
                continue;
            };
            if p.pinned {
                if p.decision.rule != rule || p.decision.source != source {
                    // Pinned by something else (`corral run --class`).
                    continue;
                }
                p.pinned = false;
            }
            // An exited game is re-decided too, so its children no longer
            // inherit the registration, but is not moved.
            self.decide(pid);
            if !(gone && pid == game) {
                self.place_or_release(pid);
            }
        }
        info!(game, rule, "GameMode registration ended");
        self.update_mode();
    }

    /// `pid`'s descendants in the table, parents first.
    fn descendants(&self, pid: u32) -> Vec<u32> {
        self.table
            .parents_first()
            .into_iter()
            .filter(|p| *p != pid && self.table.ancestors(*p).contains(&pid))
            .collect()
    }

    /// Ends the registration of `pid`, which exited; returns the signal
    /// for its bus when corral provided it.
    pub(super) fn gamemode_exited(&mut self, pid: u32) -> Vec<Effect> {
        let Some(r) = self.gamemode.registry.remove(pid) else {
            return Vec::new();
        };
        self.end_game(&r, true);
        match r.provider {
            Provider::Corral => self.signal(r.bus_uid, pid, false, OK),
            Provider::Gamemoded => Vec::new(),
        }
    }

    /// Ends registrations whose game is gone or whose pid now belongs to
    /// another process (events lost, the sweep found out).
    pub(super) fn gamemode_sweep(&mut self) -> Vec<Effect> {
        let gone: Vec<u32> = self
            .gamemode
            .registry
            .iter()
            .filter(|r| self.procs.start_ticks(r.game) != Some(r.start_ticks))
            .map(|r| r.game)
            .collect();
        gone.into_iter()
            .flat_map(|pid| self.gamemode_exited(pid))
            .collect()
    }

    /// One line per bus for `corral status`.
    pub(super) fn gamemode_lines(&self) -> Vec<String> {
        self.gamemode
            .providers
            .iter()
            .map(|(uid, provider)| {
                let games = self.gamemode.registry.client_count(*uid);
                match provider {
                    Provider::Corral => {
                        format!("provided by corral on uid {uid}'s bus, {games} game(s) registered")
                    }
                    Provider::Gamemoded => format!(
                        "following gamemoded on uid {uid}'s bus, {games} game(s) registered"
                    ),
                }
            })
            .collect()
    }
}
