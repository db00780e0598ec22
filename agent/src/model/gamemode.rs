//! GameMode registrations (`com.feralinteractive.GameMode`, what
//! `gamemoderun`, libgamemode and the desktop portal speak): who may
//! register whom, the answers GameMode's clients expect, and which
//! registrations hold. Pure; the bus side is `service/gamemode_bus.rs`, the
//! loop's use of it `service/agent_gamemode.rs`.
//!
//! Answer codes follow FeralInteractive/gamemode (daemon/gamemode-context.c):
//! register and unregister answer 0 on success, -1 on an error (unknown
//! process, already registered, not registered), -2 when the request is
//! rejected (gamemoded: a supervisor not allowed; corral: a process of
//! another user). Status answers 0 (not active), 1 (active), 2 (active and
//! this process is a game).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The request succeeded.
pub const OK: i32 = 0;
/// The request failed (unknown process, already or not registered).
pub const ERROR: i32 = -1;
/// The request was refused (another user's process).
pub const REJECTED: i32 = -2;
/// QueryStatus: no game runs.
pub const INACTIVE: i32 = 0;
/// QueryStatus: a game runs, but not this process.
pub const ACTIVE: i32 = 1;
/// QueryStatus: a game runs and this process is one.
pub const ACTIVE_AND_GAME: i32 = 2;

/// What a caller asks of GameMode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Register,
    Unregister,
    Query,
}

/// Who holds `com.feralinteractive.GameMode` on a user's bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// corral owns the name and answers the calls.
    Corral,
    /// gamemoded owns it; corral follows its signals.
    Gamemoded,
}

/// One registered game.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub game: u32,
    /// The process that asked (the game itself for `RegisterGame`).
    pub requester: u32,
    /// Whose session bus it came through.
    pub bus_uid: u32,
    /// The game's start time, so a reused pid is not taken for it.
    pub start_ticks: u64,
    pub provider: Provider,
}

impl Registration {
    /// The rule `corral explain` shows for the game and what it starts.
    pub fn rule(&self) -> String {
        match self.provider {
            Provider::Corral => format!("registered through GameMode by pid {}", self.requester),
            Provider::Gamemoded => format!(
                "registered through GameMode by pid {} (gamemoded's signal)",
                self.requester
            ),
        }
    }

    /// Where the registration came from, for explain.
    pub fn source(&self) -> String {
        format!("uid {}'s session bus", self.bus_uid)
    }
}

/// Why a registration request is refused, with the code to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: i32,
    pub message: String,
}

/// Whether the caller with uid `caller` (from the bus, None when it could
/// not be read) may register or unregister process `pid`, owned by `owner`
/// (None: no such process). Root may register anyone's; everyone else only
/// their own. gamemoded itself checks nothing here; corral runs as root, so
/// it must.
pub fn check_caller(caller: Option<u32>, pid: u32, owner: Option<u32>) -> Result<(), Refusal> {
    let Some(caller) = caller else {
        return Err(Refusal {
            code: REJECTED,
            message: "cannot tell who is asking (no credentials from the bus); refused".into(),
        });
    };
    match owner {
        None => Err(Refusal {
            code: ERROR,
            message: format!("process {pid} does not exist"),
        }),
        Some(_) if caller == 0 => Ok(()),
        Some(owner) if owner == caller => Ok(()),
        Some(owner) => Err(Refusal {
            code: REJECTED,
            message: format!(
                "process {pid} belongs to uid {owner}; uid {caller} may register only its own processes"
            ),
        }),
    }
}

/// The registrations that hold, by game pid.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    games: BTreeMap<u32, Registration>,
}

impl Registry {
    /// Adds `registration`; [`ERROR`] when its game is registered already
    /// (GameMode answers so for a known client).
    pub fn register(&mut self, registration: Registration) -> i32 {
        if self.games.contains_key(&registration.game) {
            return ERROR;
        }
        self.games.insert(registration.game, registration);
        OK
    }

    /// Ends the registration of `game` made through `bus_uid`'s bus.
    pub fn unregister(&mut self, bus_uid: u32, game: u32) -> Option<Registration> {
        if self.games.get(&game)?.bus_uid != bus_uid {
            return None;
        }
        self.games.remove(&game)
    }

    /// Ends the registration of `game` whatever bus it came through (the
    /// process exited or its pid was reused).
    pub fn remove(&mut self, game: u32) -> Option<Registration> {
        self.games.remove(&game)
    }

    /// Ends every registration made by `provider` on `bus_uid`'s bus (the
    /// bus went away, or gamemoded handed the name over).
    pub fn remove_bus(&mut self, bus_uid: u32, provider: Provider) -> Vec<Registration> {
        let gone: Vec<u32> = self
            .games
            .values()
            .filter(|r| r.bus_uid == bus_uid && r.provider == provider)
            .map(|r| r.game)
            .collect();
        gone.into_iter()
            .filter_map(|g| self.games.remove(&g))
            .collect()
    }

    pub fn get(&self, game: u32) -> Option<&Registration> {
        self.games.get(&game)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Registration> {
        self.games.values()
    }

    /// `ClientCount` on `bus_uid`'s bus.
    pub fn client_count(&self, bus_uid: u32) -> i32 {
        self.games.values().filter(|r| r.bus_uid == bus_uid).count() as i32
    }
}

/// The QueryStatus answer. corral protects games it finds by itself too
/// (no launch option needed), so "active" is any protected game, and a
/// process in the protected class counts as a game even if it never
/// registered: MangoHud's GAMEMODE indicator then tells the truth about
/// corral.
pub fn query_status(registered: bool, in_protected_class: bool, games_running: bool) -> i32 {
    if registered || in_protected_class {
        ACTIVE_AND_GAME
    } else if games_running {
        ACTIVE
    } else {
        INACTIVE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(game: u32, bus_uid: u32) -> Registration {
        Registration {
            game,
            requester: game,
            bus_uid,
            start_ticks: 7,
            provider: Provider::Corral,
        }
    }

    #[test]
    fn only_the_owner_or_root_may_register_a_process() {
        assert_eq!(check_caller(Some(1000), 42, Some(1000)), Ok(()));
        assert_eq!(check_caller(Some(0), 42, Some(1000)), Ok(()));
        let refused = check_caller(Some(1001), 42, Some(1000)).unwrap_err();
        assert_eq!(refused.code, REJECTED);
        assert!(
            refused.message.contains("belongs to uid 1000"),
            "{refused:?}"
        );
        assert_eq!(check_caller(Some(1000), 42, None).unwrap_err().code, ERROR);
        assert_eq!(
            check_caller(None, 42, Some(1000)).unwrap_err().code,
            REJECTED
        );
    }

    #[test]
    fn a_game_registers_once_and_unregisters_only_on_its_bus() {
        let mut registry = Registry::default();
        assert_eq!(registry.register(reg(42, 1000)), OK);
        assert_eq!(registry.register(reg(42, 1000)), ERROR, "known client");
        assert_eq!(registry.client_count(1000), 1);
        assert_eq!(registry.client_count(1001), 0);
        assert!(registry.unregister(1001, 42).is_none(), "another bus");
        assert_eq!(registry.unregister(1000, 42).map(|r| r.game), Some(42));
        assert!(registry.unregister(1000, 42).is_none());
        assert_eq!(registry.client_count(1000), 0);
    }

    #[test]
    fn a_bus_going_away_ends_its_providers_registrations_only() {
        let mut registry = Registry::default();
        registry.register(reg(1, 1000));
        registry.register(Registration {
            provider: Provider::Gamemoded,
            ..reg(2, 1000)
        });
        registry.register(reg(3, 1001));
        let gone = registry.remove_bus(1000, Provider::Gamemoded);
        assert_eq!(gone.iter().map(|r| r.game).collect::<Vec<_>>(), vec![2]);
        assert_eq!(registry.iter().count(), 2);
    }

    #[test]
    fn status_codes_are_gamemodes() {
        assert_eq!(query_status(false, false, false), INACTIVE);
        assert_eq!(query_status(false, false, true), ACTIVE);
        assert_eq!(query_status(true, false, true), ACTIVE_AND_GAME);
        assert_eq!(query_status(false, true, true), ACTIVE_AND_GAME);
    }

    #[test]
    fn explain_names_the_requester_and_the_bus() {
        let r = Registration {
            requester: 41,
            ..reg(42, 1000)
        };
        assert_eq!(r.rule(), "registered through GameMode by pid 41");
        assert_eq!(r.source(), "uid 1000's session bus");
    }
}
