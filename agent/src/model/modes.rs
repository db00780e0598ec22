//! Layout modes: when a game runs, the game class keeps its cores to itself
//! ("protected"); when none has run for a while, the other classes get those
//! cores back ("shared"). Pure logic: time comes in as a `Duration` since an
//! arbitrary epoch, so tests can drive a timeline and the daemon can pass
//! `Instant::now() - start`.
//!
//! Switching policy ([`ModeSwitch`]):
//! * a game starts → protected at once (a game wants its cores now);
//! * the last game exits → stay protected for `hold_down`, then shared;
//! * any two switches are at least `min_dwell` apart. A switch that would
//!   come sooner is deferred until the dwell has passed. This applies to the
//!   switch to protected too: a game that starts within `min_dwell` of the
//!   last switch (i.e. just after the hold-down ran out) waits at most
//!   `min_dwell` for its cores. That bounds how often every cgroup's
//!   `cpuset.cpus` is rewritten, whatever the processes do.
//!
//! "Wanted" mode at time `t`: protected iff a game runs or the last game
//! exited less than `hold_down` before `t`. The actual mode follows the
//! wanted mode as soon as the dwell allows. So a game that starts and exits
//! during a deferral still earns the hold-down afterwards, exactly as if it
//! had been protected.
//!
//! Length: more than half is the hysteresis timelines (tests).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use crate::model::cpus::CpuList;

/// Suggested default for [`ModeConfig::hold_down`] (a policy value).
pub const DEFAULT_HOLD_DOWN: Duration = Duration::from_secs(30);
/// Suggested default for [`ModeConfig::min_dwell`] (a policy value).
pub const DEFAULT_MIN_DWELL: Duration = Duration::from_secs(5);

/// Timing policy for [`ModeSwitch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeConfig {
    /// How long to stay protected after the last game exited.
    pub hold_down: Duration,
    /// Least time between two switches, in either direction.
    pub min_dwell: Duration,
}

impl Default for ModeConfig {
    fn default() -> Self {
        ModeConfig {
            hold_down: DEFAULT_HOLD_DOWN,
            min_dwell: DEFAULT_MIN_DWELL,
        }
    }
}

/// Which layout the classes' core sets follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// No game: every other class also gets the game's cores.
    Shared,
    /// A game runs (or ran recently): the game's cores are the game's alone.
    Protected,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Shared => "shared",
            Mode::Protected => "protected",
        })
    }
}

/// The state machine that decides the mode from how many games run.
///
/// Call [`observe`](Self::observe) on every change of the game count, and
/// again at [`next_deadline`](Self::next_deadline) when no event came before
/// it. Calling `observe` with an unchanged count is harmless (idempotent), so
/// the daemon may also call it before answering `corral status`.
#[derive(Debug, Clone)]
pub struct ModeSwitch {
    config: ModeConfig,
    mode: Mode,
    /// Games running as of the last observation.
    games: usize,
    /// Time of the last observation (never goes backwards).
    now: Duration,
    /// When this state machine was created.
    started: Duration,
    /// When the mode last changed; `None` before the first switch, so the
    /// first switch is never deferred.
    last_switch: Option<Duration>,
    /// When the game count last dropped to zero.
    last_exit: Option<Duration>,
}

impl ModeSwitch {
    /// A state machine in [`Mode::Shared`] with no game seen yet.
    pub fn new(config: ModeConfig, now: Duration) -> Self {
        ModeSwitch {
            config,
            mode: Mode::Shared,
            games: 0,
            now,
            started: now,
            last_switch: None,
            last_exit: None,
        }
    }

    /// Records that `games_running` games run at `now`, and returns the new
    /// mode exactly when the layout changes. A `now` earlier than a previous
    /// observation is treated as that previous time (clocks must not make
    /// the hold-down or the dwell run backwards).
    pub fn observe(&mut self, now: Duration, games_running: usize) -> Option<Mode> {
        let now = now.max(self.now);
        self.now = now;
        if self.games > 0 && games_running == 0 {
            self.last_exit = Some(now);
        }
        self.games = games_running;
        let wanted = self.wanted(now);
        if wanted != self.mode && now >= self.dwell_end() {
            self.mode = wanted;
            self.last_switch = Some(now);
            Some(wanted)
        } else {
            None
        }
    }

    /// When `observe` must be called again even if the game count does not
    /// change (hold-down expiry, or the end of a deferral); `None` when the
    /// mode cannot change without an event. After an `observe(now, ..)` the
    /// deadline is always later than `now`.
    pub fn next_deadline(&self) -> Option<Duration> {
        let dwell_end = self.dwell_end();
        let deadline = match (self.mode, self.games > 0) {
            (Mode::Protected, true) => None,
            // Protection wanted but deferred by the dwell.
            (Mode::Shared, true) => Some(dwell_end),
            (Mode::Protected, false) => {
                let shared_at = self.hold_down_end().unwrap_or(self.now);
                Some(shared_at.max(dwell_end))
            }
            // A game ran during a deferral: protection is still wanted until
            // its hold-down ends, and comes when the dwell ends if that is
            // sooner.
            (Mode::Shared, false) => match self.hold_down_end() {
                Some(end) if dwell_end < end => Some(dwell_end),
                _ => None,
            },
        };
        deadline.filter(|&d| d != Duration::MAX)
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The timing policy in force.
    pub fn config(&self) -> ModeConfig {
        self.config
    }

    /// One line for `corral status` saying why the mode is what it is, as of
    /// the last observation.
    pub fn why(&self) -> String {
        self.why_counting(self.games)
    }

    /// How many games the last observation saw (the loop keeps the count
    /// it has while games run; see `why_counting`).
    pub fn games_seen(&self) -> usize {
        self.games
    }

    /// [`Self::why`] with `games_running` counted now: the loop counts
    /// launches when games may start or stop, not on every event, so a view
    /// brings its own count. A count that disagrees with the last
    /// observation on whether any game runs is not used.
    pub fn why_counting(&self, games_running: usize) -> String {
        let games_now = if (games_running > 0) == (self.games > 0) {
            games_running
        } else {
            self.games
        };
        let now = self.now;
        let hold = secs(self.config.hold_down);
        let dwell = secs(self.config.min_dwell);
        let until = |t: Duration| secs(t.saturating_sub(now));
        let ago = |t: Duration| secs(now.saturating_sub(t));
        match (self.mode, games_now) {
            (Mode::Protected, 0) => {
                let mut line = match self.last_exit {
                    Some(exit) => format!(
                        "protected: last game exited {} ago, hold-down {hold}",
                        ago(exit)
                    ),
                    None => "protected: no game running".to_string(),
                };
                if let Some(deadline) = self.next_deadline() {
                    line.push_str(&format!("; shared in {}", until(deadline)));
                }
                line
            }
            (Mode::Protected, n) => format!("protected: {} running", games(n)),
            (Mode::Shared, 0) => match (self.last_exit, self.next_deadline()) {
                (Some(exit), Some(deadline)) => format!(
                    "shared: last game exited {} ago (hold-down {hold}); protected in {}, deferred by min dwell {dwell}",
                    ago(exit),
                    until(deadline)
                ),
                (Some(exit), None) => {
                    format!(
                        "shared: no game for {} (hold-down {hold} passed)",
                        ago(exit)
                    )
                }
                (None, _) => {
                    format!("shared: no game since start {} ago", ago(self.started))
                }
            },
            (Mode::Shared, n) => format!(
                "shared: {} running; protected in {}, deferred by min dwell {dwell}",
                games(n),
                until(self.dwell_end())
            ),
        }
    }

    fn wanted(&self, now: Duration) -> Mode {
        if self.games > 0 {
            return Mode::Protected;
        }
        match self.hold_down_end() {
            Some(end) if now < end => Mode::Protected,
            _ => Mode::Shared,
        }
    }

    /// Earliest time the next switch may happen.
    fn dwell_end(&self) -> Duration {
        self.last_switch
            .map_or(Duration::ZERO, |at| later(at, self.config.min_dwell))
    }

    fn hold_down_end(&self) -> Option<Duration> {
        self.last_exit
            .map(|exit| later(exit, self.config.hold_down))
    }
}

/// `at + by`, or `Duration::MAX` ("never") when that overflows.
fn later(at: Duration, by: Duration) -> Duration {
    at.checked_add(by).unwrap_or(Duration::MAX)
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Games are counted by launch: the roots of the protected class's process
/// trees, however many processes each launch forks.
fn games(n: usize) -> String {
    if n == 1 {
        "1 game launch".to_string()
    } else {
        format!("{n} game launches")
    }
}

/// Each class's effective core set in `mode`, with a note where the rule had
/// to bend.
///
/// * protected: `game_class` keeps its set; every other class loses the
///   game's cores. A class that would be left with none keeps its own set
///   unchanged (sharing cores with the game), and the note says so.
/// * shared: `game_class` keeps its set; every other class gets its own set
///   plus the game's.
///
/// Without `game_class` in `base` there is nothing to protect: every class
/// keeps its base set in both modes. Base sets are expected to be non-empty
/// (as `coresets::assign_core_sets` returns them); then no class is ever empty.
pub fn layout(
    mode: Mode,
    base: &BTreeMap<String, CpuList>,
    game_class: &str,
) -> BTreeMap<String, (CpuList, Option<String>)> {
    let Some(game) = base.get(game_class) else {
        return base
            .iter()
            .map(|(class, set)| (class.clone(), (set.clone(), None)))
            .collect();
    };
    let game_cpus = members(game);
    base.iter()
        .map(|(class, set)| {
            let effective = if class == game_class {
                (set.clone(), None)
            } else {
                let own = members(set);
                match mode {
                    Mode::Shared => (from_members(own.union(&game_cpus)), None),
                    Mode::Protected => {
                        let rest = from_members(own.difference(&game_cpus));
                        if rest.is_empty() && !set.is_empty() {
                            let note = format!(
                                "all of its CPUs {set} belong to game class `{game_class}` ({game}); \
                                 keeping {set} (shared with the game) rather than an empty set"
                            );
                            (set.clone(), Some(note))
                        } else {
                            (rest, None)
                        }
                    }
                }
            };
            (class.clone(), effective)
        })
        .collect()
}

/// The CPUs of `list`.
fn members(list: &CpuList) -> BTreeSet<u32> {
    list.iter().collect()
}

fn from_members<'a>(cpus: impl Iterator<Item = &'a u32>) -> CpuList {
    cpus.copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn config(hold_secs: u64, dwell_secs: u64) -> ModeConfig {
        ModeConfig {
            hold_down: s(hold_secs),
            min_dwell: s(dwell_secs),
        }
    }

    #[test]
    fn defaults_are_the_suggested_policy() {
        assert_eq!(ModeConfig::default(), config(30, 5));
    }

    #[test]
    fn game_protects_at_once_and_hold_down_delays_shared() {
        let mut sw = ModeSwitch::new(config(30, 5), s(0));
        assert_eq!(sw.mode(), Mode::Shared);
        assert_eq!(sw.next_deadline(), None);
        assert!(sw.why().contains("no game since start"), "{}", sw.why());

        assert_eq!(sw.observe(s(0), 1), Some(Mode::Protected));
        assert_eq!(sw.next_deadline(), None);
        assert_eq!(sw.why(), "protected: 1 game launch running");

        assert_eq!(sw.observe(s(10), 0), None);
        assert_eq!(sw.mode(), Mode::Protected);
        assert_eq!(sw.next_deadline(), Some(s(40)));

        assert_eq!(sw.observe(s(22), 0), None);
        assert_eq!(
            sw.why(),
            "protected: last game exited 12 s ago, hold-down 30 s; shared in 18 s"
        );
        assert_eq!(sw.observe(s(40) - ms(1), 0), None);
        assert_eq!(sw.mode(), Mode::Protected);

        let deadline = sw.next_deadline().unwrap();
        assert_eq!(deadline, s(40));
        assert_eq!(sw.observe(deadline, 0), Some(Mode::Shared));
        assert_eq!(sw.next_deadline(), None);
        sw.observe(s(55), 0);
        assert_eq!(sw.why(), "shared: no game for 45 s (hold-down 30 s passed)");
        // Idempotent: repeating the same observation changes nothing.
        assert_eq!(sw.observe(s(55), 0), None);
    }

    #[test]
    fn game_during_hold_down_cancels_the_pending_switch() {
        let mut sw = ModeSwitch::new(config(30, 5), s(0));
        assert_eq!(sw.observe(s(0), 1), Some(Mode::Protected));
        assert_eq!(sw.observe(s(10), 0), None);
        assert_eq!(sw.next_deadline(), Some(s(40)));

        assert_eq!(sw.observe(s(20), 2), None);
        assert_eq!(sw.next_deadline(), None);
        assert_eq!(sw.why(), "protected: 2 game launches running");
        assert_eq!(sw.why_counting(3), "protected: 3 game launches running");
        // A count that says no game runs, against the last observation,
        // is not used.
        assert_eq!(sw.why_counting(0), "protected: 2 game launches running");
        // The old deadline passes without effect.
        assert_eq!(sw.observe(s(40), 2), None);
        assert_eq!(sw.mode(), Mode::Protected);

        // The hold-down restarts from the new last exit.
        assert_eq!(sw.observe(s(45), 0), None);
        assert_eq!(sw.next_deadline(), Some(s(75)));
        assert_eq!(sw.observe(s(74), 0), None);
        assert_eq!(sw.observe(s(75), 0), Some(Mode::Shared));
    }

    #[test]
    fn min_dwell_defers_protection_right_after_going_shared() {
        // Zero hold-down so the shared switch comes right after an exit.
        let mut sw = ModeSwitch::new(config(0, 5), s(0));
        assert_eq!(sw.observe(s(0), 1), Some(Mode::Protected));
        // Exit at 2 s: shared wanted now, but the dwell runs until 5 s.
        assert_eq!(sw.observe(s(2), 0), None);
        assert_eq!(sw.next_deadline(), Some(s(5)));
        assert_eq!(sw.observe(s(5), 0), Some(Mode::Shared));

        // A game at 6 s waits until 10 s for its cores.
        assert_eq!(sw.observe(s(6), 1), None);
        assert_eq!(sw.mode(), Mode::Shared);
        assert_eq!(sw.next_deadline(), Some(s(10)));
        assert_eq!(
            sw.why(),
            "shared: 1 game launch running; protected in 4 s, deferred by min dwell 5 s"
        );
        assert_eq!(sw.observe(s(10), 1), Some(Mode::Protected));
    }

    #[test]
    fn game_that_ran_during_a_deferral_still_earns_its_hold_down() {
        let mut sw = ModeSwitch::new(config(30, 5), s(0));
        assert_eq!(sw.observe(s(0), 1), Some(Mode::Protected));
        assert_eq!(sw.observe(ms(500), 0), None);
        assert_eq!(sw.observe(ms(30_500), 0), Some(Mode::Shared));
        // A short game inside the dwell after going shared.
        assert_eq!(sw.observe(s(31), 1), None);
        assert_eq!(sw.observe(s(32), 0), None);
        assert_eq!(sw.next_deadline(), Some(ms(35_500)));
        assert!(sw.why().contains("protected in 3.5 s"), "{}", sw.why());
        assert_eq!(sw.observe(ms(35_500), 0), Some(Mode::Protected));
        assert_eq!(sw.next_deadline(), Some(s(62)));
        assert_eq!(sw.observe(s(62), 0), Some(Mode::Shared));

        // When the hold-down ends before the dwell, protection is dropped.
        let mut sw = ModeSwitch::new(config(1, 5), s(0));
        assert_eq!(sw.observe(s(0), 1), Some(Mode::Protected));
        assert_eq!(sw.observe(s(5), 0), None);
        assert_eq!(sw.observe(s(6), 0), Some(Mode::Shared));
        assert_eq!(sw.observe(s(7), 1), None);
        assert_eq!(sw.observe(s(8), 0), None);
        assert_eq!(sw.next_deadline(), None);
        assert_eq!(sw.observe(s(11), 0), None);
        assert_eq!(sw.mode(), Mode::Shared);
    }

    #[test]
    fn time_going_backwards_is_ignored() {
        let mut sw = ModeSwitch::new(config(30, 5), s(100));
        assert_eq!(sw.observe(s(100), 1), Some(Mode::Protected));
        assert_eq!(sw.observe(s(110), 0), None);
        // An earlier timestamp counts as 110 s, not as a fresh exit at 50 s.
        assert_eq!(sw.observe(s(50), 0), None);
        assert_eq!(sw.next_deadline(), Some(s(140)));
    }

    /// Independent record of a timeline, to check `ModeSwitch` against.
    struct Tracker {
        cfg: ModeConfig,
        sw: ModeSwitch,
        switches: Vec<(Duration, Mode)>,
        games: usize,
        last_exit: Option<Duration>,
        /// Observations where the mode lagged the wanted one (dwell).
        deferred: usize,
    }

    impl Tracker {
        fn step(&mut self, now: Duration, games: usize) {
            let cfg = self.cfg;
            if self.games > 0 && games == 0 {
                self.last_exit = Some(now);
            }
            self.games = games;
            let switched = self.sw.observe(now, games);
            if let Some(mode) = switched {
                if let Some(&(prev, prev_mode)) = self.switches.last() {
                    assert_ne!(prev_mode, mode);
                    assert!(
                        now >= prev + cfg.min_dwell,
                        "switches at {prev:?} and {now:?} closer than {:?}",
                        cfg.min_dwell
                    );
                }
                self.switches.push((now, mode));
            }
            let within_hold = self.last_exit.is_some_and(|e| now < e + cfg.hold_down);
            let wanted = if games > 0 || within_hold {
                Mode::Protected
            } else {
                Mode::Shared
            };
            let dwell_over = self
                .switches
                .last()
                .is_none_or(|&(at, _)| now >= at + cfg.min_dwell);
            // The only disagreement allowed is a deferral by the dwell.
            if self.sw.mode() != wanted {
                self.deferred += 1;
                assert!(
                    !dwell_over,
                    "at {now:?}: {} but {wanted} wanted ({})",
                    self.sw.mode(),
                    self.sw.why()
                );
            }
            // Shared is never entered while a game runs or within hold-down.
            if switched == Some(Mode::Shared) {
                assert!(games == 0 && !within_hold, "went shared at {now:?}");
            }
            if let Some(deadline) = self.sw.next_deadline() {
                assert!(deadline > now, "deadline {deadline:?} not after {now:?}");
            }
            assert!(!self.sw.why().is_empty());
        }
    }

    /// Feeds `events` (time, games running) in order, calling `observe` at
    /// every deadline in between, then runs the deadlines out, checking the
    /// switching invariants throughout. Returns the switches.
    fn drive(cfg: ModeConfig, events: &[(Duration, usize)]) -> (Vec<(Duration, Mode)>, usize) {
        let mut t = Tracker {
            cfg,
            sw: ModeSwitch::new(cfg, Duration::ZERO),
            switches: Vec::new(),
            games: 0,
            last_exit: None,
            deferred: 0,
        };
        for &(at, count) in events {
            while let Some(deadline) = t.sw.next_deadline().filter(|&d| d <= at) {
                t.step(deadline, t.games);
            }
            t.step(at, count);
        }
        while let Some(deadline) = t.sw.next_deadline() {
            t.step(deadline, t.games);
        }
        let end = events.last().map_or(Duration::ZERO, |e| e.0);
        let last = t.switches.last().map_or(Duration::ZERO, |s| s.0);
        let elapsed = end.max(last);
        if !cfg.min_dwell.is_zero() {
            let bound = 1 + (elapsed.as_nanos() / cfg.min_dwell.as_nanos()) as usize;
            assert!(
                t.switches.len() <= bound,
                "{} switches in {elapsed:?}",
                t.switches.len()
            );
        }
        // Once the events stop, it settles in the wanted mode.
        let settled = if t.games > 0 {
            Mode::Protected
        } else {
            Mode::Shared
        };
        assert_eq!(t.sw.mode(), settled);
        (t.switches, t.deferred)
    }

    #[test]
    fn flapping_every_200ms_switches_twice() {
        let events: Vec<_> = (0..600u64)
            .map(|i| (ms(i * 200), usize::from(i % 2 == 0)))
            .collect();
        let (switches, _) = drive(config(30, 5), &events);
        // Last exit at 119.8 s (i = 599 is odd: count 0).
        assert_eq!(
            switches,
            vec![(s(0), Mode::Protected), (ms(149_800), Mode::Shared)]
        );

        // With no hold-down only the dwell bounds it.
        let (switches, deferred) = drive(config(0, 5), &events);
        assert!(switches.len() > 2 && deferred > 0);
        for pair in switches.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= s(5));
        }
    }

    /// Numerical Recipes LCG; deterministic, no crate needed.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_timelines_keep_the_invariants() {
        let configs = [
            config(30, 5),
            config(0, 5),
            config(2, 5),
            config(30, 0),
            config(0, 0),
            config(3, 1),
        ];
        let (mut switches_seen, mut deferrals_seen) = (0, 0);
        for seed in 1..=20u64 {
            let mut rng = Lcg(seed);
            let mut now = Duration::ZERO;
            let mut events = Vec::new();
            for _ in 0..2_000 {
                // Mostly short gaps (flapping), sometimes long quiet spells.
                let gap = match rng.below(10) {
                    0 => ms(rng.below(90_000)),
                    1..=3 => ms(rng.below(8_000)),
                    _ => ms(rng.below(400)),
                };
                now += gap;
                let games = match rng.below(3) {
                    0 => 0,
                    _ => rng.below(3) as usize,
                };
                events.push((now, games));
            }
            for cfg in configs {
                let (switches, deferred) = drive(cfg, &events);
                assert!(!switches.is_empty(), "seed {seed}, {cfg:?}");
                switches_seen += switches.len();
                deferrals_seen += deferred;
            }
        }
        // The timelines do exercise switching and deferral.
        assert!(
            switches_seen > 1_000 && deferrals_seen > 100,
            "{switches_seen} {deferrals_seen}"
        );
    }

    fn base(pairs: &[(&str, &str)]) -> BTreeMap<String, CpuList> {
        pairs
            .iter()
            .map(|(class, cpus)| (class.to_string(), CpuList::parse(cpus).unwrap()))
            .collect()
    }

    fn sets(layout: &BTreeMap<String, (CpuList, Option<String>)>) -> BTreeMap<&str, String> {
        layout
            .iter()
            .map(|(class, (set, _))| (class.as_str(), set.to_string()))
            .collect()
    }

    #[test]
    fn reference_layout() {
        let base = base(&[
            ("game", "0-7"),
            ("dev", "8-15"),
            ("render", "16-19"),
            ("ai", "16-19"),
        ]);
        let protected = layout(Mode::Protected, &base, "game");
        let expected: BTreeMap<&str, String> = base
            .iter()
            .map(|(c, s)| (c.as_str(), s.to_string()))
            .collect();
        assert_eq!(sets(&protected), expected);
        assert!(protected.values().all(|(_, note)| note.is_none()));

        let shared = layout(Mode::Shared, &base, "game");
        let got = sets(&shared);
        assert_eq!(got["game"], "0-7");
        assert_eq!(got["dev"], "0-15");
        assert_eq!(got["render"], "0-7,16-19");
        assert_eq!(got["ai"], "0-7,16-19");
        assert!(shared.values().all(|(_, note)| note.is_none()));
    }

    #[test]
    fn protected_takes_only_the_overlap() {
        let base = base(&[("game", "0-7"), ("dev", "4-11")]);
        let protected = layout(Mode::Protected, &base, "game");
        let got = sets(&protected);
        assert_eq!(got["dev"], "8-11");
        assert_eq!(got["game"], "0-7");
    }

    #[test]
    fn protected_never_leaves_a_class_empty() {
        let base = base(&[("game", "0-1"), ("dev", "0-1")]);
        let protected = layout(Mode::Protected, &base, "game");
        let (dev, note) = &protected["dev"];
        assert_eq!(dev.to_string(), "0-1");
        let note = note.as_deref().expect("skipping protection must be noted");
        assert!(note.contains("0-1") && note.contains("`game`"), "{note}");
        assert_eq!(protected["game"], (CpuList::parse("0-1").unwrap(), None));
    }

    #[test]
    fn without_a_game_class_nothing_changes() {
        let base = base(&[("dev", "0-3"), ("render", "4-7")]);
        for mode in [Mode::Shared, Mode::Protected] {
            let got = layout(mode, &base, "game");
            assert_eq!(got.len(), 2);
            for (class, (set, note)) in &got {
                assert_eq!(set, &base[class]);
                assert!(note.is_none());
            }
        }
    }

    #[test]
    fn no_class_is_ever_empty() {
        let cases = [
            base(&[
                ("game", "0-7"),
                ("dev", "8-15"),
                ("render", "16-19"),
                ("ai", "16-19"),
            ]),
            base(&[
                ("game", "0-1"),
                ("dev", "0-1"),
                ("render", "0"),
                ("ai", "1"),
            ]),
            base(&[
                ("game", "0-3"),
                ("dev", "0-5"),
                ("render", "2-3"),
                ("ai", "0,7"),
            ]),
            base(&[("game", "0"), ("dev", "0")]),
            base(&[("game", "0-63"), ("dev", "0-127"), ("ai", "32-40")]),
            base(&[("game", "5"), ("dev", "0-4,6-7")]),
        ];
        for base in &cases {
            let game = members(&base["game"]);
            for mode in [Mode::Shared, Mode::Protected] {
                let result = layout(mode, base, "game");
                assert_eq!(result.len(), base.len());
                for (class, (set, note)) in &result {
                    assert!(!set.is_empty(), "{class} empty in {mode} for {base:?}");
                    let own = members(&base[class]);
                    let got = members(set);
                    if class == "game" {
                        assert_eq!(set, &base[class]);
                        continue;
                    }
                    match mode {
                        Mode::Shared => {
                            assert!(own.is_subset(&got) && game.is_subset(&got));
                            assert!(note.is_none());
                        }
                        // Either disjoint from the game, or unchanged with a note.
                        Mode::Protected => match note {
                            None => assert!(got.is_disjoint(&game) && got.is_subset(&own)),
                            Some(_) => assert!(own.is_subset(&game) && got == own),
                        },
                    }
                }
            }
        }
    }

    #[test]
    fn members_round_trips() {
        for text in ["", "0", "0-3,8,10-11", "1,3,5-6"] {
            let list = CpuList::parse(text).unwrap();
            assert_eq!(from_members(members(&list).iter()), list);
        }
    }
}
