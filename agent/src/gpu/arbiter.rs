//! VRAM arbitration between classes, as pure logic: observations in,
//! actions out. No I/O here; time is a [`Duration`]
//! since any epoch the caller likes, so tests run simulated timelines.
//!
//! # VRAM arbitration ([`Arbiter`])
//!
//! One class is protected (normally `game`). Each class may have a
//! [`ClassBudget`]: a `reserve` (only the protected class's matters: the VRAM
//! it must be able to claim), a `min` and `max` ([`Amount`]s, absolute or a
//! share of the card), a `priority` (1 = highest) and a `ladder` of
//! [`Step`]s to climb when it is in the way.
//!
//! [`Arbiter::decide`] takes one [`Observation`] and returns the
//! [`Action`]s to carry out, following these rules:
//!
//! 1. **Pressure** begins when the protected class runs and
//!    `free < needed`, where `needed = reserve(protected) − used(protected)`
//!    (saturating at 0): the room the protected class may still claim is not
//!    free.
//! 2. Pressure **ends** when the protected class stops, or when
//!    `free ≥ needed + margin` (hysteresis: between `needed` and
//!    `needed + margin` the previous state holds). Then every class this
//!    arbiter froze is thawed at once ([`ActionKind::Thaw`]), and every
//!    ladder starts again from its first step.
//! 3. Under pressure, the candidate is the **lowest-priority** class (largest
//!    `priority`) that is **over its `max`** (`used > max`) and still has a
//!    ladder step left; ties go to the class furthest over its max. The
//!    protected class is never a candidate, nor is a class without a `max` or
//!    within it. The candidate climbs **one** step.
//! 4. Steps are spaced: after any step (on any class) the next one waits
//!    until `grace` has passed, so `k` minutes of pressure give at most
//!    `1 + k / grace` steps. Thaws are never delayed (failing safe).
//! 5. A class that has climbed its ladder and is now within its `max` again
//!    while pressure goes on starts its ladder over; if it was frozen it is
//!    thawed at once.
//! 6. [`Step::Kill`] happens only where the class's ladder lists it. A ladder
//!    that is used up leaves the class where it is (frozen, say) until rule 2
//!    or 5 applies.
//!
//! `min` is not used to pick candidates (a class within its `max` is never
//! touched anyway); it is carried for budgets and reports, and
//! [`ArbiterConfig::validate`] checks `min ≤ max`.
//!
//! The caller must carry out a Thaw for every class still frozen when it
//! stops; [`Arbiter::release_all`] lists them.
//!
//! Length: about half of it is simulated timelines (the tests).

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// A quantity of VRAM: absolute, or a share of the card.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// Mebibytes.
    MiB(u64),
    /// Percent of the card's total memory, 0 to 100.
    Percent(f64),
}

/// Why a string is not an [`Amount`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a VRAM amount: {why}; write it as mebibytes (\"4096MiB\"), gibibytes \
     (\"4GiB\", \"1.5 GiB\") or a share of the card (\"33%\")"
)]
pub struct AmountError {
    pub text: String,
    pub why: &'static str,
}

impl Amount {
    /// The amount in bytes on a card with `total_bytes` of memory; never more
    /// than the card has.
    pub fn bytes(&self, total_bytes: u64) -> u64 {
        match *self {
            Amount::MiB(mib) => mib.saturating_mul(MIB).min(total_bytes),
            Amount::Percent(percent) => {
                // f64 loses precision above 2^53 bytes (8 PiB); cards are far smaller.
                let bytes = (total_bytes as f64 * percent.clamp(0.0, 100.0) / 100.0).round();
                (bytes as u64).min(total_bytes)
            }
        }
    }
}

impl FromStr for Amount {
    type Err = AmountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| AmountError {
            text: s.to_owned(),
            why,
        };
        let text = s.trim();
        if let Some(number) = text.strip_suffix('%') {
            let percent: f64 = number
                .trim()
                .parse()
                .map_err(|_| err("the part before % is not a number"))?;
            if !(0.0..=100.0).contains(&percent) {
                return Err(err("a share must be between 0% and 100%"));
            }
            return Ok(Amount::Percent(percent));
        }
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("it has no unit"))?;
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(err("it does not start with a number"));
        }
        let number: f64 = number.parse().map_err(|_| err("the number is malformed"))?;
        let mib = match unit.trim() {
            u if u.eq_ignore_ascii_case("MiB") => number,
            u if u.eq_ignore_ascii_case("GiB") => number * 1024.0,
            u if u.eq_ignore_ascii_case("MB") || u.eq_ignore_ascii_case("GB") => {
                return Err(err("use MiB or GiB (powers of 1024), as NVML counts"));
            }
            _ => return Err(err("the unit is not MiB, GiB or %")),
        };
        if mib.fract() != 0.0 {
            return Err(err("it is not a whole number of MiB"));
        }
        if mib > u64::MAX as f64 {
            return Err(err("it is too large"));
        }
        Ok(Amount::MiB(mib as u64))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::MiB(mib) if mib % 1024 == 0 && *mib > 0 => write!(f, "{}GiB", mib / 1024),
            Amount::MiB(mib) => write!(f, "{mib}MiB"),
            Amount::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One rung of a class's ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Tell the user (desktop notification, log).
    Notify,
    /// Ask the application to free memory (ComfyUI `POST /free`, ollama
    /// `keep_alive: 0`, ...).
    Ask,
    /// Freeze the class's cgroup (its VRAM stays allocated, its work stops).
    Freeze,
    /// Stop the class's processes. Only when the ladder lists it.
    Kill,
}

/// What the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    Notify,
    Ask,
    Freeze,
    /// Undo a Freeze.
    Thaw,
    Kill,
}

impl From<Step> for ActionKind {
    fn from(step: Step) -> Self {
        match step {
            Step::Notify => ActionKind::Notify,
            Step::Ask => ActionKind::Ask,
            Step::Freeze => ActionKind::Freeze,
            Step::Kill => ActionKind::Kill,
        }
    }
}

/// One class's VRAM budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassBudget {
    pub class: String,
    /// 1 = highest; the largest number is acted on first.
    pub priority: u32,
    /// VRAM the class must be able to claim (used for the protected class).
    pub reserve: Option<Amount>,
    pub min: Option<Amount>,
    /// Over this, the class is a candidate under pressure.
    pub max: Option<Amount>,
    /// Steps climbed one at a time, e.g. `[Notify, Ask, Freeze]`.
    pub ladder: Vec<Step>,
}

/// The arbiter's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArbiterConfig {
    /// The class whose reserve is defended (normally "game").
    pub protected_class: String,
    /// Least time between two ladder steps.
    pub grace: Duration,
    /// Hysteresis: pressure ends only at `free ≥ needed + margin`.
    pub margin: Amount,
    pub classes: Vec<ClassBudget>,
}

/// A mistake in an [`ArbiterConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArbiterConfigError {
    #[error(
        "the protected class {class:?} has no VRAM budget with a reserve, so the arbiter would \
         never act; add a budget for {class:?} with `reserve = \"33%\"` (for example)"
    )]
    NoReserve { class: String },
    #[error("class {class:?} has two VRAM budgets; keep one")]
    Duplicate { class: String },
    #[error("class {class:?} has min {min} above max {max}; lower min or raise max")]
    MinAboveMax {
        class: String,
        min: String,
        max: String,
    },
    #[error(
        "class {class:?} has a VRAM max but an empty ladder, so going over it does nothing; \
         add steps such as [\"notify\", \"ask\", \"freeze\"] or drop the max"
    )]
    EmptyLadder { class: String },
}

impl ArbiterConfig {
    /// Check the settings; [`Arbiter::new`] accepts any, but a policy loader
    /// should refuse what this rejects.
    pub fn validate(&self) -> Result<(), ArbiterConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for budget in &self.classes {
            if !seen.insert(budget.class.as_str()) {
                return Err(ArbiterConfigError::Duplicate {
                    class: budget.class.clone(),
                });
            }
            if let (Some(min), Some(max)) = (budget.min, budget.max) {
                let over = match (min, max) {
                    (Amount::MiB(a), Amount::MiB(b)) => a > b,
                    (Amount::Percent(a), Amount::Percent(b)) => a > b,
                    _ => false, // depends on the card; checked nowhere
                };
                if over {
                    return Err(ArbiterConfigError::MinAboveMax {
                        class: budget.class.clone(),
                        min: min.to_string(),
                        max: max.to_string(),
                    });
                }
            }
            if budget.class != self.protected_class
                && budget.max.is_some()
                && budget.ladder.is_empty()
            {
                return Err(ArbiterConfigError::EmptyLadder {
                    class: budget.class.clone(),
                });
            }
        }
        match self.budget(&self.protected_class) {
            Some(budget) if budget.reserve.is_some() => Ok(()),
            _ => Err(ArbiterConfigError::NoReserve {
                class: self.protected_class.clone(),
            }),
        }
    }

    fn budget(&self, class: &str) -> Option<&ClassBudget> {
        self.classes.iter().find(|b| b.class == class)
    }
}

/// What the caller saw at `now`, on one card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub now: Duration,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// VRAM in use per class (classes not listed use 0).
    pub used_by_class: BTreeMap<String, u64>,
    /// Whether any process of the protected class runs.
    pub protected_running: bool,
}

/// Something the caller must do to a class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub class: String,
    pub kind: ActionKind,
    /// A sentence with the numbers, for logs and `corral explain`.
    pub reason: String,
}

/// Where one class stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassState {
    /// The last ladder step taken since the ladder was last reset.
    pub step: Option<Step>,
    /// How many ladder steps were taken since the ladder was last reset.
    pub steps_taken: usize,
    /// Whether this arbiter froze the class and has not thawed it.
    pub frozen: bool,
    pub last_action: Option<ActionKind>,
    pub last_action_at: Option<Duration>,
    pub last_reason: Option<String>,
}

/// The arbiter's state, for `corral status` and `corral explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArbiterState {
    pub protected_class: String,
    pub pressure: bool,
    /// At the last observation: what the protected class may still claim.
    pub needed_bytes: u64,
    pub free_bytes: u64,
    pub total_bytes: u64,
    /// When the last ladder step was taken.
    pub last_step_at: Option<Duration>,
    /// The earliest time the next ladder step may be taken.
    pub next_step_at: Option<Duration>,
    /// Every class with a budget.
    pub classes: BTreeMap<String, ClassState>,
}

/// The VRAM arbiter; see the module docs for the rules.
#[derive(Debug, Clone)]
pub struct Arbiter {
    config: ArbiterConfig,
    pressure: bool,
    last_step_at: Option<Duration>,
    needed_bytes: u64,
    free_bytes: u64,
    total_bytes: u64,
    classes: BTreeMap<String, ClassState>,
}

impl Arbiter {
    pub fn new(config: ArbiterConfig) -> Self {
        let classes = config
            .classes
            .iter()
            .map(|b| (b.class.clone(), ClassState::default()))
            .collect();
        Self {
            config,
            pressure: false,
            last_step_at: None,
            needed_bytes: 0,
            free_bytes: 0,
            total_bytes: 0,
            classes,
        }
    }

    pub fn config(&self) -> &ArbiterConfig {
        &self.config
    }

    /// Whether the last observation was under pressure.
    pub fn pressure(&self) -> bool {
        self.pressure
    }

    /// Take a new configuration, keeping what each remaining class reached.
    /// Returns the Thaws for frozen classes that lost their budget or whose
    /// ladder no longer has a Freeze.
    pub fn reconfigure(&mut self, config: ArbiterConfig, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut classes = BTreeMap::new();
        for (class, mut state) in std::mem::take(&mut self.classes) {
            let keeps_freeze = config
                .budget(&class)
                .is_some_and(|b| b.ladder.contains(&Step::Freeze));
            if state.frozen && !keeps_freeze {
                let reason =
                    format!("the VRAM policy no longer lets corral freeze {class}; thawing it");
                actions.push(record_thaw(&class, &mut state, now, reason));
            }
            if config.budget(&class).is_some() {
                classes.insert(class, state);
            }
        }
        for budget in &config.classes {
            classes.entry(budget.class.clone()).or_default();
        }
        self.classes = classes;
        self.config = config;
        actions
    }

    /// Thaw every class this arbiter froze and reset every ladder, e.g. when
    /// the agent stops or the GPU goes away.
    pub fn release_all(&mut self, now: Duration, why: &str) -> Vec<Action> {
        self.pressure = false;
        let mut actions = Vec::new();
        for (class, state) in &mut self.classes {
            if state.frozen {
                let reason = format!("{why}; thawing {class}, which corral froze for VRAM");
                actions.push(record_thaw(class, state, now, reason));
            }
            state.step = None;
            state.steps_taken = 0;
        }
        actions
    }

    /// Take one observation; return what to do now.
    pub fn decide(&mut self, obs: &Observation) -> Vec<Action> {
        let total = obs.total_bytes;
        let used = |class: &str| obs.used_by_class.get(class).copied().unwrap_or(0);
        let protected = self.config.protected_class.clone();
        let reserve = self
            .config
            .budget(&protected)
            .and_then(|b| b.reserve)
            .map_or(0, |r| r.bytes(total));
        let protected_used = used(&protected);
        let needed = reserve.saturating_sub(protected_used);
        let margin = self.config.margin.bytes(total);
        self.needed_bytes = needed;
        self.free_bytes = obs.free_bytes;
        self.total_bytes = total;

        let was = self.pressure;
        self.pressure = obs.protected_running
            && if was {
                obs.free_bytes < needed.saturating_add(margin)
            } else {
                obs.free_bytes < needed
            };

        if !self.pressure {
            let why = if !obs.protected_running {
                format!("{protected} stopped, so its VRAM reserve is no longer defended")
            } else {
                format!(
                    "VRAM pressure is over: {} free, {protected} may still claim {} (+ margin {})",
                    gib(obs.free_bytes),
                    gib(needed),
                    gib(margin)
                )
            };
            return self.release_all(obs.now, &why);
        }

        let mut actions = Vec::new();

        // Rule 5: classes back within budget start over (and thaw).
        for budget in &self.config.classes {
            let Some(state) = self.classes.get_mut(&budget.class) else {
                continue;
            };
            if state.steps_taken == 0 && !state.frozen {
                continue;
            }
            let class_used = used(&budget.class);
            let max = budget.max.map(|m| m.bytes(total));
            if max.is_some_and(|max| class_used > max) {
                continue;
            }
            if state.frozen {
                let reason = format!(
                    "{} now uses {}, within its max of {}; thawing it while {protected}'s VRAM \
                     is still short",
                    budget.class,
                    gib(class_used),
                    max.map_or_else(|| "none".to_owned(), gib)
                );
                actions.push(record_thaw(&budget.class, state, obs.now, reason));
            }
            state.step = None;
            state.steps_taken = 0;
        }

        // Rules 3, 4, 6: one step for the lowest-priority class over its max.
        let due = self
            .last_step_at
            .is_none_or(|at| obs.now.saturating_sub(at) >= self.config.grace);
        if due {
            let candidate = self
                .config
                .classes
                .iter()
                .filter(|b| b.class != protected)
                .filter_map(|b| {
                    let max = b.max?.bytes(total);
                    let over = used(&b.class).checked_sub(max).filter(|&o| o > 0)?;
                    let taken = self.classes.get(&b.class).map_or(0, |s| s.steps_taken);
                    let step = *b.ladder.get(taken)?;
                    Some((b, max, over, taken, step))
                })
                .max_by_key(|(b, _, over, _, _)| (b.priority, *over));
            if let Some((budget, max, _, taken, step)) = candidate {
                let class_used = used(&budget.class);
                let reason = format!(
                    "{protected} may still claim {} of its {} reserve ({}) but only {} of {} \
                     is free; {} uses {}, over its max of {} ({}): {} (step {} of {})",
                    gib(needed),
                    gib(reserve),
                    self.config
                        .budget(&protected)
                        .and_then(|b| b.reserve)
                        .map_or_else(String::new, |r| r.to_string()),
                    gib(obs.free_bytes),
                    gib(total),
                    budget.class,
                    gib(class_used),
                    gib(max),
                    budget.max.map_or_else(String::new, |m| m.to_string()),
                    step_name(step),
                    taken + 1,
                    budget.ladder.len()
                );
                let state = self.classes.entry(budget.class.clone()).or_default();
                state.step = Some(step);
                state.steps_taken = taken + 1;
                if step == Step::Freeze {
                    state.frozen = true;
                }
                state.last_action = Some(step.into());
                state.last_action_at = Some(obs.now);
                state.last_reason = Some(reason.clone());
                self.last_step_at = Some(obs.now);
                actions.push(Action {
                    class: budget.class.clone(),
                    kind: step.into(),
                    reason,
                });
            }
        }
        actions
    }

    /// Where the arbiter stands.
    pub fn state(&self) -> ArbiterState {
        ArbiterState {
            protected_class: self.config.protected_class.clone(),
            pressure: self.pressure,
            needed_bytes: self.needed_bytes,
            free_bytes: self.free_bytes,
            total_bytes: self.total_bytes,
            last_step_at: self.last_step_at,
            next_step_at: self.last_step_at.map(|at| at + self.config.grace),
            classes: self.classes.clone(),
        }
    }
}

fn record_thaw(class: &str, state: &mut ClassState, now: Duration, reason: String) -> Action {
    state.frozen = false;
    state.step = None;
    state.steps_taken = 0;
    state.last_action = Some(ActionKind::Thaw);
    state.last_action_at = Some(now);
    state.last_reason = Some(reason.clone());
    Action {
        class: class.to_owned(),
        kind: ActionKind::Thaw,
        reason,
    }
}

fn step_name(step: Step) -> &'static str {
    match step {
        Step::Notify => "notify",
        Step::Ask => "ask to free memory",
        Step::Freeze => "freeze",
        Step::Kill => "kill",
    }
}

/// Bytes for a sentence: "9.0 GiB", or "512 MiB" under 1 GiB.
fn gib(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD_12G: u64 = 12 * GIB;

    fn budget(
        class: &str,
        priority: u32,
        reserve: Option<&str>,
        min: Option<&str>,
        max: Option<&str>,
        ladder: &[Step],
    ) -> ClassBudget {
        ClassBudget {
            class: class.to_owned(),
            priority,
            reserve: reserve.map(|s| s.parse().unwrap()),
            min: min.map(|s| s.parse().unwrap()),
            max: max.map(|s| s.parse().unwrap()),
            ladder: ladder.to_vec(),
        }
    }

    const GRACE: Duration = Duration::from_secs(30);

    /// The seed's 12 GiB card.
    fn seed_config() -> ArbiterConfig {
        use Step::*;
        ArbiterConfig {
            protected_class: "game".to_owned(),
            grace: GRACE,
            margin: "5%".parse().unwrap(),
            classes: vec![
                budget("game", 1, Some("33%"), None, None, &[]),
                budget(
                    "render",
                    2,
                    None,
                    Some("42%"),
                    Some("67%"),
                    &[Notify, Ask, Freeze],
                ),
                budget(
                    "ai",
                    3,
                    None,
                    Some("17%"),
                    Some("25%"),
                    &[Notify, Ask, Freeze],
                ),
                budget("dev", 4, None, None, Some("17%"), &[Notify, Freeze]),
            ],
        }
    }

    fn obs(now_s: f64, game: Option<u64>, used: &[(&str, u64)]) -> Observation {
        let used_by_class: BTreeMap<String, u64> = used
            .iter()
            .map(|&(c, b)| (c.to_owned(), b))
            .chain(game.map(|g| ("game".to_owned(), g)))
            .collect();
        let in_use: u64 = used_by_class.values().sum();
        Observation {
            now: Duration::from_secs_f64(now_s),
            total_bytes: CARD_12G,
            free_bytes: CARD_12G.saturating_sub(in_use),
            used_by_class,
            protected_running: game.is_some(),
        }
    }

    fn kinds(actions: &[Action]) -> Vec<(&str, ActionKind)> {
        actions.iter().map(|a| (a.class.as_str(), a.kind)).collect()
    }

    #[test]
    fn seed_config_validates() {
        seed_config().validate().unwrap();
    }

    #[test]
    fn comfyui_holding_9_gib_when_a_game_starts() {
        use ActionKind::*;
        let mut arbiter = Arbiter::new(seed_config());
        let ai = 9 * GIB;
        let render = 2 * GIB; // within its 67% max
        // Before the game: nothing, however full the card.
        assert!(
            arbiter
                .decide(&obs(0.0, None, &[("ai", ai), ("render", render)]))
                .is_empty()
        );

        // t0: the game starts with 200 MiB; 1 GiB free, it may claim ~3.8 GiB.
        let t0 = 10.0;
        let game = 200 * MIB;
        let at = |t: f64| obs(t, Some(game), &[("ai", ai), ("render", render)]);
        let first = arbiter.decide(&at(t0));
        assert_eq!(kinds(&first), [("ai", Notify)]);
        assert!(first[0].reason.contains("9.0 GiB"), "{}", first[0].reason);
        assert!(first[0].reason.contains("3.0 GiB"), "{}", first[0].reason);
        assert!(arbiter.state().pressure);

        // Within the grace: nothing.
        for t in [t0 + 1.0, t0 + 15.0, t0 + 29.9] {
            assert!(arbiter.decide(&at(t)).is_empty(), "at {t}");
        }
        assert_eq!(kinds(&arbiter.decide(&at(t0 + 30.0))), [("ai", Ask)]);
        assert!(arbiter.decide(&at(t0 + 45.0)).is_empty());
        assert_eq!(kinds(&arbiter.decide(&at(t0 + 60.0))), [("ai", Freeze)]);
        let state = arbiter.state();
        assert!(state.classes["ai"].frozen);
        assert_eq!(state.classes["ai"].step, Some(Step::Freeze));
        assert!(!state.classes["render"].frozen);

        // The ladder is used up (no Kill listed): nothing more, for a long time.
        for i in 1..=100 {
            assert!(
                arbiter
                    .decide(&at(t0 + 60.0 + f64::from(i) * 10.0))
                    .is_empty()
            );
        }

        // The game ends: thaw at once, ladders reset.
        let end = arbiter.decide(&obs(2000.0, None, &[("ai", ai), ("render", render)]));
        assert_eq!(kinds(&end), [("ai", Thaw)]);
        assert!(end[0].reason.contains("game stopped"), "{}", end[0].reason);
        let state = arbiter.state();
        assert!(!state.pressure);
        assert_eq!(state.classes["ai"].steps_taken, 0);
        assert!(!state.classes["ai"].frozen);
        assert_eq!(state.classes["ai"].last_action, Some(Thaw));
    }

    #[test]
    fn asking_works_ends_pressure_and_resets() {
        use ActionKind::*;
        let mut arbiter = Arbiter::new(seed_config());
        let game = 200 * MIB;
        assert_eq!(
            kinds(&arbiter.decide(&obs(0.0, Some(game), &[("ai", 9 * GIB)]))),
            [("ai", Notify)]
        );
        assert_eq!(
            kinds(&arbiter.decide(&obs(30.0, Some(game), &[("ai", 9 * GIB)]))),
            [("ai", Ask)]
        );
        // ComfyUI frees down to 2 GiB: 9.8 GiB free, well over needed + margin.
        assert!(
            arbiter
                .decide(&obs(31.0, Some(game), &[("ai", 2 * GIB)]))
                .is_empty()
        );
        assert!(!arbiter.pressure());
        assert_eq!(arbiter.state().classes["ai"].steps_taken, 0);
        // It loads the model again: the ladder starts over, after the grace.
        assert!(
            arbiter
                .decide(&obs(40.0, Some(game), &[("ai", 9 * GIB)]))
                .is_empty()
        );
        assert_eq!(
            kinds(&arbiter.decide(&obs(60.0, Some(game), &[("ai", 9 * GIB)]))),
            [("ai", Notify)]
        );
    }

    #[test]
    fn within_budget_classes_and_the_game_are_never_touched() {
        let mut arbiter = Arbiter::new(seed_config());
        // render at 8 GiB (its max is 67% = 8.04 GiB), game at 3 GiB: card nearly full.
        let mut all = Vec::new();
        for t in 0..600 {
            let o = obs(
                f64::from(t),
                Some(3 * GIB),
                &[("render", 8 * GIB), ("ai", 512 * MIB)],
            );
            all.extend(arbiter.decide(&o));
        }
        assert!(arbiter.pressure());
        assert!(all.is_empty(), "{all:?}");

        // The game over a max of its own (a policy mistake): still never a
        // candidate, though everyone else is frozen in time.
        let mut config = seed_config();
        config.classes[0].max = Some(Amount::Percent(10.0));
        config.classes[0].ladder = vec![Step::Notify, Step::Freeze, Step::Kill];
        let mut arbiter = Arbiter::new(config);
        let mut all = Vec::new();
        for t in 0..600 {
            let o = obs(f64::from(t), Some(2 * GIB), &[("ai", 9 * GIB)]);
            all.extend(arbiter.decide(&o));
        }
        assert!(all.iter().all(|a| a.class == "ai"), "{all:?}");
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn lowest_priority_over_budget_goes_first() {
        use ActionKind::*;
        let mut arbiter = Arbiter::new(seed_config());
        let used = [("ai", 5 * GIB), ("dev", 3 * GIB), ("render", 3 * GIB)];
        let mut log = Vec::new();
        for t in (0..=300).step_by(5) {
            for a in arbiter.decide(&obs(f64::from(t), Some(100 * MIB), &used)) {
                log.push((t, a.class, a.kind));
            }
        }
        let log: Vec<(i32, &str, ActionKind)> =
            log.iter().map(|(t, c, k)| (*t, c.as_str(), *k)).collect();
        assert_eq!(
            log,
            [
                (0, "dev", Notify),
                (30, "dev", Freeze),
                (60, "ai", Notify),
                (90, "ai", Ask),
                (120, "ai", Freeze),
            ]
        );
        let thaws = arbiter.decide(&obs(301.0, None, &used));
        assert_eq!(kinds(&thaws), [("ai", Thaw), ("dev", Thaw)]);
    }

    #[test]
    fn kill_only_when_listed() {
        use ActionKind::*;
        let mut config = seed_config();
        config.classes[2].ladder = vec![Step::Freeze, Step::Kill];
        let mut arbiter = Arbiter::new(config);
        let at = |t: f64| obs(t, Some(0), &[("ai", 10 * GIB)]);
        assert_eq!(kinds(&arbiter.decide(&at(0.0))), [("ai", Freeze)]);
        assert_eq!(kinds(&arbiter.decide(&at(30.0))), [("ai", Kill)]);
        assert!(arbiter.decide(&at(60.0)).is_empty());
        // The kill freed the memory while the game runs: thawed (the cgroup
        // may hold survivors) and reset.
        let after = arbiter.decide(&obs(61.0, Some(0), &[("ai", 0)]));
        assert_eq!(kinds(&after), [("ai", Thaw)]);

        // Without Kill in the ladder there is never one, however long it lasts.
        let mut arbiter = Arbiter::new(seed_config());
        for t in 0..3600 {
            let acts = arbiter.decide(&obs(f64::from(t), Some(0), &[("ai", 10 * GIB)]));
            assert!(acts.iter().all(|a| a.kind != Kill));
        }
    }

    #[test]
    fn class_back_under_max_is_thawed_while_pressure_continues() {
        use ActionKind::*;
        let mut config = seed_config();
        config.classes[2].ladder = vec![Step::Freeze];
        let mut arbiter = Arbiter::new(config);
        // ai and dev both over; dev (prio 4) first.
        let used = |ai, dev| [("ai", ai), ("dev", dev), ("render", 6 * GIB)];
        assert_eq!(
            kinds(&arbiter.decide(&obs(0.0, Some(0), &used(4 * GIB, 3 * GIB)))),
            [("dev", Notify)]
        );
        assert_eq!(
            kinds(&arbiter.decide(&obs(30.0, Some(0), &used(4 * GIB, 3 * GIB)))),
            [("dev", Freeze)]
        );
        assert_eq!(
            kinds(&arbiter.decide(&obs(60.0, Some(0), &used(4 * GIB, 3 * GIB)))),
            [("ai", Freeze)]
        );
        // dev's build finishes and drops to 1 GiB, still short for the game.
        let acts = arbiter.decide(&obs(61.0, Some(0), &used(4 * GIB, GIB)));
        assert_eq!(kinds(&acts), [("dev", Thaw)]);
        assert!(
            acts[0].reason.contains("within its max"),
            "{}",
            acts[0].reason
        );
        assert!(arbiter.pressure());
        assert!(arbiter.state().classes["ai"].frozen);
    }

    /// Free VRAM hovering ±1% around the pressure threshold for 10 minutes:
    /// actions stay bounded and nothing flaps faster than the grace.
    #[test]
    fn oscillation_around_the_threshold_is_bounded() {
        use ActionKind::*;
        let config = seed_config();
        let reserve = Amount::Percent(33.0).bytes(CARD_12G);
        let game = 500 * MIB;
        let needed = reserve - game;
        let one_percent = CARD_12G / 100;
        for ai_max_margin in [false, true] {
            // Second round: ai hovers around its own max too.
            let mut arbiter = Arbiter::new(config.clone());
            let mut log: Vec<(Duration, String, ActionKind)> = Vec::new();
            let ai_max = Amount::Percent(25.0).bytes(CARD_12G);
            for tick in 0..600u32 {
                // Triangle wave, period 20 s, ±1% of the card.
                let phase = f64::from(tick % 20) / 20.0;
                let wave = if phase < 0.5 {
                    phase * 4.0 - 1.0
                } else {
                    3.0 - phase * 4.0
                };
                let free = (needed as f64 + wave * one_percent as f64) as u64;
                let ai = if ai_max_margin {
                    (ai_max as f64 + wave * one_percent as f64) as u64
                } else {
                    6 * GIB
                };
                let mut o = obs(f64::from(tick), Some(game), &[("ai", ai)]);
                o.free_bytes = free;
                for a in arbiter.decide(&o) {
                    assert_ne!(a.class, "game");
                    log.push((o.now, a.class, a.kind));
                }
            }
            let elapsed = Duration::from_secs(600);
            let bound = 1 + (elapsed.as_secs() / GRACE.as_secs()) as usize;
            let steps = log.iter().filter(|(_, _, k)| *k != Thaw).count();
            assert!(steps <= bound, "{steps} steps > {bound}: {log:?}");
            assert!(log.len() <= 2 * bound, "{log:?}");
            // Freeze/Thaw of one class never closer than the grace.
            for class in ["ai", "dev", "render"] {
                let times: Vec<Duration> = log
                    .iter()
                    .filter(|(_, c, k)| c == class && matches!(k, Freeze | Thaw))
                    .map(|(t, _, _)| *t)
                    .collect();
                for pair in times.windows(3) {
                    assert!(pair[2] - pair[0] >= GRACE, "{class} flaps: {log:?}");
                }
                let freezes: Vec<Duration> = log
                    .iter()
                    .filter(|(_, c, k)| c == class && *k == Freeze)
                    .map(|(t, _, _)| *t)
                    .collect();
                for pair in freezes.windows(2) {
                    assert!(
                        pair[1] - pair[0] >= GRACE,
                        "{class} refrozen early: {log:?}"
                    );
                }
            }
            if !ai_max_margin {
                // The margin keeps pressure on once it began: one ladder, no thaw.
                assert_eq!(
                    log.iter()
                        .map(|(_, c, k)| (c.as_str(), *k))
                        .collect::<Vec<_>>(),
                    [("ai", Notify), ("ai", Ask), ("ai", Freeze)]
                );
            }
        }
    }

    #[test]
    fn pressure_needs_margin_to_end() {
        let mut arbiter = Arbiter::new(seed_config());
        let total = CARD_12G;
        let needed = Amount::Percent(33.0).bytes(total);
        let margin = Amount::Percent(5.0).bytes(total);
        let at = |t: f64, free: u64| {
            let mut o = obs(t, Some(0), &[("ai", 6 * GIB)]);
            o.free_bytes = free;
            o
        };
        assert_eq!(arbiter.decide(&at(0.0, needed - 1)).len(), 1);
        assert!(arbiter.decide(&at(1.0, needed)).is_empty());
        assert!(arbiter.pressure(), "inside the margin the pressure holds");
        assert!(arbiter.decide(&at(2.0, needed + margin - 1)).is_empty());
        assert!(arbiter.pressure());
        arbiter.decide(&at(3.0, needed + margin));
        assert!(!arbiter.pressure());
        // And back: pressure again only under `needed`.
        assert!(arbiter.decide(&at(40.0, needed)).is_empty());
        assert!(!arbiter.pressure());
    }

    #[test]
    fn reconfigure_and_release_all_thaw() {
        use ActionKind::*;
        let mut config = seed_config();
        config.classes[2].ladder = vec![Step::Freeze];
        let mut arbiter = Arbiter::new(config);
        assert_eq!(
            kinds(&arbiter.decide(&obs(0.0, Some(0), &[("ai", 9 * GIB)]))),
            [("ai", Freeze)]
        );
        // A new policy without Freeze for ai thaws it.
        let thawed = arbiter.reconfigure(seed_config(), Duration::from_secs(5));
        assert!(thawed.is_empty(), "seed ladder still has freeze");
        let mut no_freeze = seed_config();
        no_freeze.classes[2].ladder = vec![Step::Notify];
        assert_eq!(
            kinds(&arbiter.reconfigure(no_freeze, Duration::from_secs(6))),
            [("ai", Thaw)]
        );

        let mut config = seed_config();
        config.classes[2].ladder = vec![Step::Freeze];
        let mut arbiter = Arbiter::new(config);
        arbiter.decide(&obs(0.0, Some(0), &[("ai", 9 * GIB)]));
        let acts = arbiter.release_all(Duration::from_secs(1), "corral is stopping");
        assert_eq!(kinds(&acts), [("ai", Thaw)]);
        assert!(acts[0].reason.starts_with("corral is stopping"));
        assert!(
            arbiter
                .release_all(Duration::from_secs(2), "again")
                .is_empty()
        );
    }

    #[test]
    fn state_serializes_for_status() {
        let mut arbiter = Arbiter::new(seed_config());
        arbiter.decide(&obs(0.0, Some(0), &[("ai", 9 * GIB)]));
        let json = serde_json::to_value(arbiter.state()).unwrap();
        assert_eq!(json["pressure"], true);
        assert_eq!(json["classes"]["ai"]["step"], "notify");
        assert_eq!(json["classes"]["ai"]["last_action"], "notify");
        assert_eq!(json["classes"]["render"]["steps_taken"], 0);
    }

    #[test]
    fn validate_names_the_problem() {
        let mut config = seed_config();
        config.classes[0].reserve = None;
        let e = config.validate().unwrap_err();
        assert!(e.to_string().contains("reserve"), "{e}");
        let mut config = seed_config();
        config.classes[1].min = Some(Amount::Percent(80.0));
        assert!(matches!(
            config.validate(),
            Err(ArbiterConfigError::MinAboveMax { .. })
        ));
        let mut config = seed_config();
        config.classes[3].ladder.clear();
        assert!(matches!(
            config.validate(),
            Err(ArbiterConfigError::EmptyLadder { .. })
        ));
        let mut config = seed_config();
        config.classes.push(config.classes[1].clone());
        assert!(matches!(
            config.validate(),
            Err(ArbiterConfigError::Duplicate { .. })
        ));
    }

    #[test]
    fn amount_parsing() {
        let ok = [
            ("4096MiB", Amount::MiB(4096)),
            ("4GiB", Amount::MiB(4096)),
            ("512 MiB", Amount::MiB(512)),
            (" 1.5 GiB ", Amount::MiB(1536)),
            ("2gib", Amount::MiB(2048)),
            ("33%", Amount::Percent(33.0)),
            ("33.3 %", Amount::Percent(33.3)),
            ("0%", Amount::Percent(0.0)),
            ("100%", Amount::Percent(100.0)),
        ];
        for (text, want) in ok {
            assert_eq!(text.parse::<Amount>().unwrap(), want, "{text}");
        }
        for bad in [
            "", "4096", "4 GB", "12 TiB", "abc%", "101%", "-5%", "MiB", "1.5MiB", "4..0GiB",
        ] {
            let e = bad.parse::<Amount>().unwrap_err();
            assert!(e.to_string().contains("4096MiB"), "{bad}: {e}");
        }
        assert!("4 GB".parse::<Amount>().unwrap_err().why.contains("1024"));
    }

    #[test]
    fn amount_scaling_on_8_16_24_gib_cards() {
        for (card_gib, third, four_gib) in [
            (8u64, 2_834_678_415u64, 4 * GIB),
            (16, 5_669_356_831, 4 * GIB),
            (24, 8_504_035_246, 4 * GIB),
        ] {
            let total = card_gib * GIB;
            assert_eq!(Amount::Percent(33.0).bytes(total), third, "{card_gib} GiB");
            assert_eq!(Amount::MiB(4096).bytes(total), four_gib);
            assert_eq!(Amount::Percent(100.0).bytes(total), total);
            assert_eq!(Amount::Percent(0.0).bytes(total), 0);
            // Never more than the card.
            assert_eq!(Amount::MiB(32 * 1024).bytes(total), total.min(32 * GIB));
        }
        assert_eq!(Amount::Percent(25.0).bytes(CARD_12G), 3 * GIB);
    }

    #[test]
    fn amount_serde_round_trip() {
        #[derive(Debug, Deserialize, Serialize)]
        struct Wrap {
            a: Amount,
            b: Amount,
        }
        let w: Wrap = toml::from_str("a = \"4GiB\"\nb = \"33.3%\"").unwrap();
        assert_eq!((w.a, w.b), (Amount::MiB(4096), Amount::Percent(33.3)));
        let text = toml::to_string(&w).unwrap();
        assert_eq!(text, "a = \"4GiB\"\nb = \"33.3%\"\n");
        let e = toml::from_str::<Wrap>("a = \"4 gigs\"\nb = \"1%\"").unwrap_err();
        assert!(e.to_string().contains("not a VRAM amount"), "{e}");
    }
}
