//! Times loading a CachyOS-sized ananicy rule set and looking comms up in it.
//!
//! `cargo bench -p corral --bench ananicy`. Writes 20,000 rules (17,000
//! `Game`) in ananicy's format into ~50 files under a temporary directory,
//! times `AnanicyRules::load` (target: under 200 ms) and 1,000,000 lookups
//! with a mix of hits and misses. Set `CORRAL_ANANICY_DIRS` (`:`-separated)
//! to time a real rule set as well, e.g. `/etc/ananicy.d`.

use std::{
    fmt::Write as _,
    fs,
    hint::black_box,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use corral::model::ananicy::{AnanicyRules, COMM_LEN, default_types};

const GAMES: usize = 17_000;
const OTHERS: &[(&str, usize)] = &[
    ("BG_CPUIO", 2_000),
    ("Service", 300),
    ("Doc-View", 200),
    ("LowLatency_RT", 150),
    ("Player-Audio", 100),
    ("Player-Video", 100),
    ("Chat", 100),
    ("Heavy_CPU", 50),
];
const LOOKUPS: usize = 1_000_000;
const LOAD_RUNS: usize = 7;

/// Small deterministic generator, so runs compare.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const SYLLABLES: &[&str] = &[
    "Dark", "Star", "Shadow", "Tomb", "Raider", "Witch", "Legend", "Sky", "Iron", "Dragon",
    "Quest", "Souls", "Craft", "Fall", "Rise", "Hunter", "Valley", "Forge", "Night", "Storm",
    "Dead", "Space", "Octo", "path", "Trav", "eler", "Zero", "Ring", "Elden", "Age",
];

/// A game-like process name: about half are Windows executables with long
/// Unreal-style names, like the CachyOS set.
fn game_name(rng: &mut XorShift, i: usize) -> String {
    let mut name = String::new();
    for _ in 0..1 + rng.below(3) {
        name.push_str(SYLLABLES[rng.below(SYLLABLES.len())]);
    }
    write!(name, "{i}").unwrap();
    match rng.below(4) {
        0 => name.push_str("-Win64-Shipping.exe"),
        1 => name.push_str(".exe"),
        2 => name.push_str(".x86_64"),
        _ => {}
    }
    name
}

/// Writes the rule set; returns the directory and every rule name.
fn write_rules(root: &Path) -> Vec<String> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    let mut names = Vec::new();
    // 40 game files, as CachyOS splits games by letter and source.
    for f in 0..40 {
        let sub = if f < 26 {
            "wine_proton"
        } else {
            "linux-native"
        };
        let path = root.join(format!("00-default/Games/{sub}/games_{f:02}.rules"));
        let mut text =
            String::from("# Add games in alphabetical order.\n# Get name from steam.\n\n");
        for i in (f..GAMES).step_by(40) {
            let name = game_name(&mut rng, i);
            writeln!(text, "# Game {i} https://store.steampowered.com/app/{i}/").unwrap();
            if i % 10 == 0 {
                writeln!(
                    text,
                    "{{ \"name\": \"{name}\", \"type\": \"Game\", \"nice\": -5 }}"
                )
                .unwrap();
            } else {
                writeln!(text, "{{ \"name\": \"{name}\", \"type\": \"Game\" }}").unwrap();
            }
            text.push('\n');
            names.push(name);
        }
        files.push((path, text));
    }
    // The other types, two files each, under their own folders.
    let mut n = 0;
    for &(ty, count) in OTHERS {
        for half in 0..2 {
            let path = root.join(format!(
                "00-default/{ty}/{}-{half}.rules",
                ty.to_lowercase()
            ));
            let mut text = String::new();
            for _ in 0..count / 2 {
                let name = format!("{}-tool{n}", ty.to_lowercase());
                writeln!(
                    text,
                    "{{ \"name\": \"{name}\", \"type\": \"{ty}\", \"ioclass\": \"idle\" }}"
                )
                .unwrap();
                names.push(name);
                n += 1;
            }
            files.push((path, text));
        }
    }
    for (path, text) in &files {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    println!(
        "wrote {} rules ({GAMES} Game) in {} files under {}",
        names.len(),
        files.len(),
        root.display()
    );
    names
}

/// What the kernel would show as comm for `name`.
fn comm_of(name: &str) -> String {
    String::from_utf8_lossy(&name.as_bytes()[..name.len().min(COMM_LEN)]).into_owned()
}

/// 4,096 comms: 30% rule names (games and others), 70% ordinary processes.
fn comm_mix(names: &[String]) -> Vec<(String, String)> {
    const MISSES: &[&str] = &[
        "bash",
        "zsh",
        "systemd",
        "systemd-journal",
        "kworker/3:1H",
        "ksoftirqd/7",
        "Xwayland",
        "kwin_wayland",
        "plasmashell",
        "firefox",
        "Isolated Web Co",
        "Web Content",
        "chrome",
        "rustc",
        "cargo",
        "cc1plus",
        "ld.lld",
        "python3",
        "node",
        "code",
        "Xorg",
        "dbus-daemon",
        "wine64-preload",
        "steamwebhelper",
        "pressure-vessel",
        "kthreadd",
        "rcu_preempt",
    ];
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    (0..4096)
        .map(|i| {
            if rng.below(10) < 3 {
                let name = &names[rng.below(names.len())];
                (comm_of(name), format!("C:\\Games\\{name}"))
            } else {
                let base = MISSES[rng.below(MISSES.len())];
                let name = if i % 2 == 0 {
                    base.to_owned()
                } else {
                    format!("{base}{i}")
                };
                (comm_of(&name), format!("/usr/bin/{name}"))
            }
        })
        .collect()
}

fn time_load(label: &str, dirs: &[PathBuf]) -> AnanicyRules {
    let mut times = Vec::with_capacity(LOAD_RUNS);
    let mut last = None;
    for _ in 0..LOAD_RUNS {
        let start = Instant::now();
        let loaded = AnanicyRules::load(dirs, &default_types()).expect("load");
        times.push(start.elapsed());
        last = Some(loaded);
    }
    let (rules, warnings) = last.unwrap();
    let first = times[0];
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{label}: load {:.1} ms first, {:.1} ms median, {:.1} ms min of {LOAD_RUNS} (target < 200 ms: {})",
        ms(first),
        ms(times[LOAD_RUNS / 2]),
        ms(times[0]),
        if times[LOAD_RUNS / 2] < Duration::from_millis(200) {
            "ok"
        } else {
            "MISSED"
        },
    );
    let s = rules.stats();
    println!(
        "{label}: {} rules usable of {} read in {} files; skipped {} unmapped, {} without type, \
         {} overridden, {} malformed; {} ambiguous comms; {} warnings",
        rules.len(),
        s.rules_read,
        s.files,
        s.unmapped_total(),
        s.no_type,
        s.overridden,
        s.malformed,
        s.ambiguous_comms,
        warnings.len(),
    );
    rules
}

fn time_lookups(label: &str, rules: &AnanicyRules, mix: &[(String, String)]) {
    let mask = mix.len() - 1;
    assert!(mix.len().is_power_of_two());

    let start = Instant::now();
    let mut hits = 0usize;
    for i in 0..LOOKUPS {
        let (comm, _) = &mix[i & mask];
        hits += usize::from(black_box(rules.lookup(black_box(comm))).is_some());
    }
    let comm_ns = start.elapsed().as_nanos() as f64 / LOOKUPS as f64;

    let start = Instant::now();
    let mut hits_process = 0usize;
    for i in 0..LOOKUPS {
        let (comm, argv0) = &mix[i & mask];
        let m = rules.lookup_process(black_box(comm), Some(black_box(argv0)));
        hits_process += usize::from(black_box(m).is_some());
    }
    let process_ns = start.elapsed().as_nanos() as f64 / LOOKUPS as f64;

    println!(
        "{label}: lookup(comm) {comm_ns:.1} ns/lookup ({:.1}% hits); \
         lookup_process(comm, argv0) {process_ns:.1} ns/lookup ({:.1}% hits); {LOOKUPS} each",
        hits as f64 * 100.0 / LOOKUPS as f64,
        hits_process as f64 * 100.0 / LOOKUPS as f64,
    );
}

fn main() {
    let root = std::env::temp_dir().join(format!("corral-ananicy-bench-{}", std::process::id()));
    let names = write_rules(&root);
    let rules = time_load("synthetic", std::slice::from_ref(&root));
    time_lookups("synthetic", &rules, &comm_mix(&names));
    fs::remove_dir_all(&root).expect("remove the bench's temporary rules");

    if let Ok(dirs) = std::env::var("CORRAL_ANANICY_DIRS") {
        let dirs: Vec<PathBuf> = dirs.split(':').map(PathBuf::from).collect();
        let rules = time_load("CORRAL_ANANICY_DIRS", &dirs);
        // Hits here are only games: the default mapping has nothing else.
        let mut real_names = Vec::new();
        for dir in &dirs {
            collect_names(dir, &mut real_names);
        }
        if !real_names.is_empty() {
            time_lookups("CORRAL_ANANICY_DIRS", &rules, &comm_mix(&real_names));
        }
    }
}

/// Rule names in a real set, for its lookup mix (a rough scan, not the
/// loader).
fn collect_names(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_names(&path, out);
        } else if path.extension().is_some_and(|e| e == "rules") {
            let text = fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                if let Some(rest) = line.split("\"name\"").nth(1)
                    && let Some(name) = rest.split('"').nth(1)
                {
                    out.push(name.to_owned());
                }
            }
        }
    }
}
