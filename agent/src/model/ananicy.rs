//! Reads ananicy-cpp rule directories (such as `/etc/ananicy.d`) so the
//! classifier can use their ~13,500 game names as a lower-priority source.
//!
//! # Format
//!
//! Every `*.rules` file under each directory (recursively) holds one JSON
//! object per line, e.g. `{ "name": "witcher3.exe", "type": "Game" }`.
//! Blank lines and lines starting with `#` are comments; text after the
//! object that starts with `#` is a comment too. Only `name` and `type` are
//! read; `nice`, `ioclass`, `latency_nice`, `cgroup`, ... are ananicy's own
//! business. `*.types` and `*.cgroups` files are not read: they tune nice
//! and io values, which corral does not apply.
//!
//! # Decisions
//!
//! - **Order.** Directories are read in the order given and, inside each,
//!   entries in byte order of their names, so numbered files (`00-default`,
//!   `99-local.rules`) come in the order their names promise. ananicy-cpp
//!   walks in whatever order the filesystem returns; we want the same answer
//!   on every machine.
//! - **Duplicates: the last rule wins**, as in ananicy-cpp, which stores each
//!   rule with `insert_or_assign`. A later directory (say the user's own)
//!   therefore overrides an earlier one. The later rule replaces the earlier
//!   one entirely, even when its type is unmapped or missing: a local rule
//!   that says `"type": "BG_CPUIO"` takes a name out of the game class.
//! - **Names vs comms.** ananicy-cpp matches `name` against the basename of
//!   `argv[0]` (it falls back to the exe, then the comm), which is why half
//!   the CachyOS names are longer than the 15 bytes the kernel keeps in
//!   `comm`. [`AnanicyRules::lookup`] compares the first 15 bytes of each
//!   name with a comm; [`AnanicyRules::lookup_argv0`] matches the whole name
//!   the way ananicy-cpp does; [`AnanicyRules::lookup_process`] tries
//!   `argv[0]` first, then the comm.
//! - **Comm collisions.** Different long names can share their first 15
//!   bytes (`Octopath_Traveler.exe` is a launcher, `Octopath_Traveler-Win64-
//!   Shipping.exe` the game; CachyOS has ~750 such prefixes). Among rules
//!   whose type is mapped: a name of at most 15 bytes owns its comm outright
//!   (it is exactly what the kernel shows); otherwise, if the names sharing a
//!   prefix map to the same class the latest one is reported, and if they
//!   map to different classes the comm is ambiguous and matches nothing
//!   (`argv[0]` still does). Rules with an unmapped type take no part, so a
//!   launcher ananicy calls `BG_CPUIO` does not hide its game.
//! - **Degrade, never stop.** A missing directory, an unreadable file or a
//!   bad line is a [`Warning`]; loading goes on. Only an unusable type
//!   mapping is an error.
//!
//! Length: a whole rule-file parser; about 290 lines are tests.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt, fs,
    hash::{BuildHasherDefault, Hash, Hasher},
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

/// Bytes of a process name the kernel keeps in `comm` (TASK_COMM_LEN - 1).
pub const COMM_LEN: usize = 15;

/// How deep directories are followed (symlinks included) before giving up;
/// a guard against symlink loops.
const MAX_DEPTH: usize = 16;

/// The ananicy type -> corral class mapping the shipped policy uses.
///
/// Only `Game` is mapped, to `game`. ananicy's other types (`BG_CPUIO`,
/// `Player-Audio`, `Doc-View`, `LowLatency_RT`, `Service`, `Heavy_CPU`, ...)
/// are nice/ionice/scheduler hints for one program each: they say "be a bit
/// nicer to this" or "give this realtime I/O", not "this belongs to the dev,
/// render or ai core set". Mapping them would move document viewers and
/// chat clients between core sets on the strength of a nice value. Users
/// who want that can map them in their own policy.
pub fn default_types() -> BTreeMap<String, String> {
    BTreeMap::from([("Game".to_owned(), "game".to_owned())])
}

/// Where a rule was read: file and 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub file: Arc<Path>,
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Which of the process's names found the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchedBy {
    /// The whole rule name equals the basename of `argv[0]`.
    Argv0,
    /// The rule name's first 15 bytes equal the comm.
    Comm,
}

/// A rule that matched, borrowed from [`AnanicyRules`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match<'a> {
    /// corral class, from the type mapping.
    pub class: &'a str,
    /// The rule's full `name`.
    pub name: &'a str,
    /// The rule's `type`.
    pub ananicy_type: &'a str,
    pub source: &'a Source,
    pub by: MatchedBy,
}

/// Something wrong in the rule directories that did not stop loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// A directory in the list does not exist.
    MissingDir { dir: PathBuf },
    /// A directory or file could not be read.
    Unreadable { path: PathBuf, error: String },
    /// Directories nested more than 16 deep (likely a symlink loop).
    TooDeep { dir: PathBuf },
    /// A line that is not a rule; it was skipped.
    Malformed { source: Source, reason: String },
    /// A rule followed by text that is not a `#` comment; the rule was
    /// loaded (ananicy-cpp ignores such text too).
    TrailingText { source: Source, text: String },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::MissingDir { dir } => write!(
                f,
                "ananicy rules directory {} does not exist; skipped (install a rule set such as \
                 CachyOS's ananicy-rules there, or remove it from the policy)",
                dir.display()
            ),
            Warning::Unreadable { path, error } => write!(
                f,
                "cannot read {}: {error}; skipped (check that the agent may read it)",
                path.display()
            ),
            Warning::TooDeep { dir } => write!(
                f,
                "{}: directories nest more than {MAX_DEPTH} deep (a symlink loop?); not read \
                 further",
                dir.display()
            ),
            Warning::Malformed { source, reason } => write!(
                f,
                "{source}: not an ananicy rule ({reason}); line skipped (fix it, or start it \
                 with '#')"
            ),
            Warning::TrailingText { source, text } => write!(
                f,
                "{source}: text {text:?} after the rule ignored; rule loaded (remove the text, \
                 or start it with '#')"
            ),
        }
    }
}

/// Why the rules could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum AnanicyError {
    #[error(
        "ananicy type mapping {ananicy_type:?} -> {class:?} has an empty side; give both the \
         ananicy type and the corral class, or remove the entry"
    )]
    EmptyMapping { ananicy_type: String, class: String },
}

/// What loading read and what it left out, for `corral status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadStats {
    /// `*.rules` files read.
    pub files: usize,
    /// Lines that parsed as a rule with a name.
    pub rules_read: usize,
    /// Rules that can match: names with a mapped type.
    pub loaded: usize,
    /// Rules replaced by a later rule of the same name.
    pub overridden: usize,
    /// Rules skipped because their type is not mapped, by type.
    pub unmapped: BTreeMap<String, usize>,
    /// Rules skipped because they have no `type`.
    pub no_type: usize,
    /// Objects without a `name` in `.rules` files (type or cgroup settings;
    /// ananicy-cpp accepts them there), skipped.
    pub no_name: usize,
    /// Lines skipped as malformed (each one also a [`Warning`]).
    pub malformed: usize,
    /// 15-byte comm prefixes shared by rules of different classes; those
    /// comms match nothing.
    pub ambiguous_comms: usize,
}

impl LoadStats {
    /// All rules skipped for an unmapped type.
    pub fn unmapped_total(&self) -> usize {
        self.unmapped.values().sum()
    }
}

/// The loaded rules, indexed by full name and by 15-byte comm prefix.
#[derive(Debug, Default)]
pub struct AnanicyRules {
    types: Vec<TypeEntry>,
    rules: Vec<Rule>,
    by_name: FxMap<Arc<str>, u32>,
    by_comm: FxMap<CommKey, u32>,
    stats: LoadStats,
}

#[derive(Debug)]
struct TypeEntry {
    ananicy_type: Box<str>,
    class: Box<str>,
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    type_idx: u32,
    source: Source,
}

impl AnanicyRules {
    /// Reads every `*.rules` file under `dirs` (a path that is itself a
    /// `.rules` file is read too) and keeps the rules whose type `types`
    /// maps to a corral class.
    pub fn load(
        dirs: &[PathBuf],
        types: &BTreeMap<String, String>,
    ) -> Result<(AnanicyRules, Vec<Warning>), AnanicyError> {
        let (mut loader, type_entries) = Loader::new(types)?;
        for dir in dirs {
            match fs::metadata(dir) {
                Ok(meta) if meta.is_dir() => loader.walk(dir, 0),
                Ok(_) => loader.read_file(dir),
                Err(e) if e.kind() == io::ErrorKind::NotFound => loader
                    .warnings
                    .push(Warning::MissingDir { dir: dir.clone() }),
                Err(e) => loader.unreadable(dir, &e),
            }
        }
        let (rules, warnings) = loader.finish(type_entries);
        tracing::debug!(
            loaded = rules.stats.loaded,
            read = rules.stats.rules_read,
            unmapped = rules.stats.unmapped_total(),
            warnings = warnings.len(),
            "ananicy rules loaded"
        );
        Ok((rules, warnings))
    }

    /// The rules of one `.rules` file's bytes, `file` naming it in
    /// warnings: what [`AnanicyRules::load`] does with each file it finds,
    /// without the filesystem. Never panics, whatever the bytes (fuzzed:
    /// `cargo xtask fuzz`).
    pub fn parse(
        file: &Path,
        bytes: &[u8],
        types: &BTreeMap<String, String>,
    ) -> Result<(AnanicyRules, Vec<Warning>), AnanicyError> {
        let (mut loader, type_entries) = Loader::new(types)?;
        loader.read_bytes(file, bytes);
        Ok(loader.finish(type_entries))
    }

    /// The rule whose name's first 15 bytes equal `comm` (a longer `comm` is
    /// cut to 15 bytes first). O(1).
    pub fn lookup(&self, comm: &str) -> Option<Match<'_>> {
        let &idx = self.by_comm.get(&CommKey::new(comm))?;
        Some(self.matched(idx, MatchedBy::Comm))
    }

    /// The rule whose whole name equals `name`. O(1).
    pub fn lookup_name(&self, name: &str) -> Option<Match<'_>> {
        let &idx = self.by_name.get(name)?;
        Some(self.matched(idx, MatchedBy::Argv0))
    }

    /// The rule for a process whose `argv[0]` is `argv0`, matched as
    /// ananicy-cpp does: the whole name against the basename (for names
    /// ending in `.exe`, `\` separates too, so Wine's `C:\...\game.exe`
    /// works).
    pub fn lookup_argv0(&self, argv0: &str) -> Option<Match<'_>> {
        self.lookup_name(argv0_basename(argv0))
    }

    /// `argv[0]` first (exact and unambiguous), then the comm.
    pub fn lookup_process(&self, comm: &str, argv0: Option<&str>) -> Option<Match<'_>> {
        argv0
            .and_then(|a| self.lookup_argv0(a))
            .or_else(|| self.lookup(comm))
    }

    /// Rules that can match (names with a mapped type).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What loading read and skipped.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    fn matched(&self, idx: u32, by: MatchedBy) -> Match<'_> {
        let rule = &self.rules[idx as usize];
        let ty = &self.types[rule.type_idx as usize];
        Match {
            class: &ty.class,
            name: &rule.name,
            ananicy_type: &ty.ananicy_type,
            source: &rule.source,
            by,
        }
    }
}

/// The file name in `argv[0]`.
fn argv0_basename(argv0: &str) -> &str {
    let cut = if ends_with_ignore_case(argv0, ".exe") {
        argv0.rfind(['/', '\\'])
    } else {
        argv0.rfind('/')
    };
    cut.map_or(argv0, |i| &argv0[i + 1..])
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// Maps with a multiply-rotate hash (the one rustc uses, "FxHash"), about
/// three times faster than the default SipHash on these short keys. SipHash
/// guards against keys chosen to collide; here the keys come from root-owned
/// rule files, and lookups (where comms come from any user) never insert.
type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A name as the kernel's `comm` shows it, inline: the first 15 bytes, and
/// where that cuts a character, the cut bytes replaced by U+FFFD, which is
/// what a lossy UTF-8 conversion of the kernel's bytes gives. Applying it to
/// such a comm again gives the same key, so lossy and raw comms both match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CommKey {
    len: u8,
    // 14 bytes + the 3 of U+FFFD at most.
    bytes: [u8; COMM_LEN + 2],
}

impl CommKey {
    fn new(name: &str) -> CommKey {
        let mut key = CommKey {
            len: 0,
            bytes: [0; COMM_LEN + 2],
        };
        let mut cut = name.len().min(COMM_LEN);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        key.bytes[..cut].copy_from_slice(&name.as_bytes()[..cut]);
        let mut len = cut;
        if cut < COMM_LEN && cut < name.len() {
            key.bytes[cut..cut + 3].copy_from_slice("\u{FFFD}".as_bytes());
            len += 3;
        }
        key.len = len as u8;
        key
    }

    fn is_whole(name: &str) -> bool {
        name.len() <= COMM_LEN
    }
}

impl Hash for CommKey {
    // Three words instead of a length prefix and 17 single bytes.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let b = &self.bytes;
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        state.write_u64(word(0));
        state.write_u64(word(8));
        state.write_u64(u64::from(b[16]) | u64::from(self.len) << 8);
    }
}

/// The fields of a rule line corral reads; the others are ignored.
#[derive(Deserialize)]
struct RawRule<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    ty: Option<Cow<'a, str>>,
}

enum PendingType {
    Mapped(u32),
    Unmapped(Box<str>),
    Missing,
}

struct Pending {
    ty: PendingType,
    source: Source,
    /// Load order of the rule that last set this name.
    seq: usize,
}

struct Loader<'t> {
    type_index: HashMap<&'t str, u32>,
    pending: FxMap<Box<str>, Pending>,
    seq: usize,
    warnings: Vec<Warning>,
    stats: LoadStats,
}

impl<'t> Loader<'t> {
    /// A loader for rules whose types `types` maps to classes, and the
    /// types in index order.
    fn new(types: &'t BTreeMap<String, String>) -> Result<(Self, Vec<TypeEntry>), AnanicyError> {
        let mut type_entries = Vec::with_capacity(types.len());
        for (ananicy_type, class) in types {
            if ananicy_type.is_empty() || class.is_empty() {
                return Err(AnanicyError::EmptyMapping {
                    ananicy_type: ananicy_type.clone(),
                    class: class.clone(),
                });
            }
            type_entries.push(TypeEntry {
                ananicy_type: ananicy_type.as_str().into(),
                class: class.as_str().into(),
            });
        }
        let loader = Loader {
            type_index: types
                .keys()
                .zip(0u32..)
                .map(|(t, i)| (t.as_str(), i))
                .collect(),
            pending: FxMap::default(),
            seq: 0,
            warnings: Vec::new(),
            stats: LoadStats::default(),
        };
        Ok((loader, type_entries))
    }

    fn unreadable(&mut self, path: &Path, error: &io::Error) {
        self.warnings.push(Warning::Unreadable {
            path: path.to_owned(),
            error: error.to_string(),
        });
    }

    fn walk(&mut self, dir: &Path, depth: usize) {
        if depth > MAX_DEPTH {
            self.warnings.push(Warning::TooDeep {
                dir: dir.to_owned(),
            });
            return;
        }
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => return self.unreadable(dir, &e),
        };
        let mut names = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => names.push(entry.file_name()),
                Err(e) => self.unreadable(dir, &e),
            }
        }
        names.sort_unstable();
        for name in names {
            let path = dir.join(&name);
            // Follows symlinks: /etc/ananicy.d often links to /usr/share.
            match fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => self.walk(&path, depth + 1),
                Ok(meta) if meta.is_file() && path.extension() == Some("rules".as_ref()) => {
                    self.read_file(&path)
                }
                Ok(_) => {}
                Err(e) => self.unreadable(&path, &e),
            }
        }
    }

    fn read_file(&mut self, path: &Path) {
        match fs::read(path) {
            Ok(bytes) => self.read_bytes(path, &bytes),
            Err(e) => self.unreadable(path, &e),
        }
    }

    /// One file's rules, one JSON object a line.
    fn read_bytes(&mut self, path: &Path, bytes: &[u8]) {
        self.stats.files += 1;
        let file: Arc<Path> = Arc::from(path);
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let source = || Source {
                file: Arc::clone(&file),
                line: i + 1,
            };
            let Ok(line) = std::str::from_utf8(line) else {
                self.malformed(source(), "not valid UTF-8".to_owned());
                continue;
            };
            let line = line.trim_start_matches('\u{feff}').trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.read_line(line, source);
        }
    }

    fn malformed(&mut self, source: Source, reason: String) {
        self.stats.malformed += 1;
        self.warnings.push(Warning::Malformed { source, reason });
    }

    fn read_line(&mut self, line: &str, source: impl Fn() -> Source) {
        let mut stream = serde_json::Deserializer::from_str(line).into_iter::<RawRule>();
        let raw = match stream.next() {
            Some(Ok(raw)) => raw,
            Some(Err(e)) => return self.malformed(source(), e.to_string()),
            None => return,
        };
        let rest = line[stream.byte_offset()..].trim_start();
        if !rest.is_empty() && !rest.starts_with('#') {
            self.warnings.push(Warning::TrailingText {
                source: source(),
                text: rest.to_owned(),
            });
        }
        let Some(name) = raw.name else {
            self.stats.no_name += 1;
            return;
        };
        if name.is_empty() {
            return self.malformed(source(), "empty \"name\"".to_owned());
        }
        self.stats.rules_read += 1;
        let ty = match raw.ty {
            None => PendingType::Missing,
            Some(ty) => match self.type_index.get(ty.as_ref()) {
                Some(&idx) => PendingType::Mapped(idx),
                None => PendingType::Unmapped(ty.into()),
            },
        };
        let pending = Pending {
            ty,
            source: source(),
            seq: self.seq,
        };
        self.seq += 1;
        // Last wins; see the module docs.
        if let Some(slot) = self.pending.get_mut(name.as_ref()) {
            *slot = pending;
            self.stats.overridden += 1;
        } else {
            self.pending.insert(name.into(), pending);
        }
    }

    fn finish(self, types: Vec<TypeEntry>) -> (AnanicyRules, Vec<Warning>) {
        let Loader {
            pending,
            warnings,
            mut stats,
            ..
        } = self;
        let mut pending: Vec<_> = pending.into_iter().collect();
        pending.sort_unstable_by_key(|(_, p)| p.seq);

        let mut rules = Vec::with_capacity(pending.len());
        let mut by_name = FxMap::with_capacity_and_hasher(pending.len(), Default::default());
        for (name, p) in pending {
            match p.ty {
                PendingType::Mapped(type_idx) => {
                    let name: Arc<str> = name.into();
                    let idx = u32::try_from(rules.len()).expect("fewer than 2^32 rules");
                    by_name.insert(Arc::clone(&name), idx);
                    rules.push(Rule {
                        name,
                        type_idx,
                        source: p.source,
                    });
                }
                PendingType::Unmapped(ty) => *stats.unmapped.entry(ty.into()).or_default() += 1,
                PendingType::Missing => stats.no_type += 1,
            }
        }

        #[derive(Clone, Copy)]
        enum Slot {
            /// A name of at most 15 bytes: the comm itself.
            Whole(u32),
            Cut(u32),
            Ambiguous,
        }
        let mut slots: FxMap<CommKey, Slot> =
            FxMap::with_capacity_and_hasher(rules.len(), Default::default());
        let class_of = |idx: u32| &types[rules[idx as usize].type_idx as usize].class;
        for (idx, rule) in (0u32..).zip(&rules) {
            let key = CommKey::new(&rule.name);
            let whole = CommKey::is_whole(&rule.name);
            let slot = slots.entry(key).or_insert(Slot::Cut(idx));
            *slot = match *slot {
                // Two whole names with one key are one name: deduplicated.
                _ if whole => Slot::Whole(idx),
                Slot::Whole(w) => Slot::Whole(w),
                Slot::Cut(c) if class_of(c) == class_of(idx) => Slot::Cut(idx),
                Slot::Cut(_) | Slot::Ambiguous => Slot::Ambiguous,
            };
        }
        let mut by_comm = FxMap::with_capacity_and_hasher(slots.len(), Default::default());
        for (key, slot) in slots {
            match slot {
                Slot::Whole(idx) | Slot::Cut(idx) => {
                    by_comm.insert(key, idx);
                }
                Slot::Ambiguous => stats.ambiguous_comms += 1,
            }
        }

        stats.loaded = rules.len();
        let rules = AnanicyRules {
            types,
            rules,
            by_name,
            by_comm,
            stats,
        };
        (rules, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ananicy")
    }

    fn load_with(types: &BTreeMap<String, String>) -> (AnanicyRules, Vec<Warning>) {
        let dirs = [fixtures().join("etc"), fixtures().join("local")];
        AnanicyRules::load(&dirs, types).expect("fixtures load")
    }

    fn load_default() -> (AnanicyRules, Vec<Warning>) {
        load_with(&default_types())
    }

    fn types(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|&(t, c)| (t.to_owned(), c.to_owned()))
            .collect()
    }

    fn ends_with(source: &Source, tail: &str, line: usize) -> bool {
        source.file.ends_with(tail) && source.line == line
    }

    #[test]
    fn loads_nested_dirs_and_looks_up() {
        let (rules, _) = load_default();
        let m = rules.lookup("DungeonDefender").expect("native game");
        assert_eq!(m.class, "game");
        assert_eq!(m.name, "DungeonDefenders-x86");
        assert_eq!(m.ananicy_type, "Game");
        assert_eq!(m.by, MatchedBy::Comm);
        assert!(ends_with(
            m.source,
            "etc/00-default/Games/linux-native/linux-native_d.rules",
            2
        ));
        // Three directory levels down in the second dir.
        assert_eq!(rules.lookup("glxgears").unwrap().class, "game");
        // Indented line with a trailing comment.
        assert_eq!(
            rules.lookup("Subnautica.exe").unwrap().name,
            "Subnautica.exe"
        );
        assert!(rules.lookup("bash").is_none());
        assert!(rules.lookup("").is_none());
        // Exact match only: no prefixes, no case folding.
        assert!(rules.lookup("glxgear").is_none());
        assert!(rules.lookup("GLXGEARS").is_none());
    }

    #[test]
    fn counts_what_it_read_and_skipped() {
        let (rules, _) = load_default();
        let s = rules.stats();
        // etc: 5 files minus .types/.cgroups; local: 2 minus the .bak.
        assert_eq!(s.files, 6);
        assert_eq!(
            (
                s.rules_read,
                s.overridden,
                s.no_type,
                s.no_name,
                s.malformed
            ),
            (16, 2, 1, 1, 2)
        );
        let unmapped = BTreeMap::from([("BG_CPUIO".to_owned(), 2), ("Player-Video".to_owned(), 2)]);
        assert_eq!(s.unmapped, unmapped);
        assert_eq!(s.unmapped_total(), 4);
        // 16 read - 2 overridden - 1 without type - 4 unmapped.
        assert_eq!(s.loaded, 9);
        assert_eq!(rules.len(), 9);
        assert!(!rules.is_empty());
        assert_eq!(s.ambiguous_comms, 0);
    }

    #[test]
    fn parse_reads_one_files_bytes_like_load_reads_the_file() {
        let text = b"{ \"name\": \"vkcube\", \"type\": \"Game\" }\n# c\n\xff\n{ \"name\": \"vlc\", \"type\": \"Player-Video\" }\n";
        let file = Path::new("mem.rules");
        let (rules, warnings) = AnanicyRules::parse(file, text, &default_types()).unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules.lookup("vkcube").map(|m| m.class), Some("game"));
        let s = rules.stats();
        assert_eq!((s.files, s.rules_read, s.malformed), (1, 2, 1));
        assert!(
            matches!(&warnings[..], [Warning::Malformed { source, .. }] if ends_with(source, "mem.rules", 3)),
            "{warnings:?}"
        );
    }

    #[test]
    fn long_names_match_the_truncated_comm() {
        let (rules, _) = load_default();
        let m = rules.lookup("ShadowOfTheTomb").expect("15-byte comm");
        assert_eq!(m.name, "ShadowOfTheTombRaider");
        assert!(ends_with(m.source, "wine_proton_s.rules", 5));
        // A longer name given as comm is cut the same way.
        assert_eq!(
            rules.lookup("ShadowOfTheTombRaider").unwrap().name,
            "ShadowOfTheTombRaider"
        );
        assert_eq!(
            rules.lookup("ShadowOfTheTombXYZ").unwrap().name,
            "ShadowOfTheTombRaider"
        );
        assert!(rules.lookup("ShadowOfTheTom").is_none());
        // The whole name matches argv[0], not a truncated one.
        assert!(rules.lookup_argv0("/games/ShadowOfTheTombRaider").is_some());
        assert!(rules.lookup_argv0("/games/ShadowOfTheTomb").is_none());
    }

    #[test]
    fn non_ascii_name_cut_inside_a_character() {
        let (rules, _) = load_default();
        let name = "Ünïcödé_Spïel";
        // Byte 15 falls inside 'ï': the kernel keeps half of it.
        let kernel = &name.as_bytes()[..COMM_LEN];
        let lossy = String::from_utf8_lossy(kernel);
        assert!(lossy.ends_with('\u{FFFD}'));
        assert_eq!(rules.lookup(&lossy).unwrap().name, name);
        assert_eq!(rules.lookup(name).unwrap().name, name);
        assert!(rules.lookup("Ünïcödé_Sp").is_none());
    }

    #[test]
    fn comm_key_is_stable_under_lossy_conversion() {
        for name in [
            "ab",
            "exactly15bytes!",
            "Ünïcödé_Spïel",
            "a😀😀😀😀x",
            "ééééééééé",
        ] {
            let key = CommKey::new(name);
            let kernel = &name.as_bytes()[..name.len().min(COMM_LEN)];
            let lossy = String::from_utf8_lossy(kernel);
            assert_eq!(CommKey::new(&lossy), key, "{name}");
            assert!(usize::from(key.len) <= key.bytes.len());
        }
    }

    #[test]
    fn malformed_lines_warn_with_file_and_line_and_loading_goes_on() {
        let (rules, warnings) = load_default();
        let malformed: Vec<_> = warnings
            .iter()
            .filter_map(|w| match w {
                Warning::Malformed { source, .. } => Some(source),
                _ => None,
            })
            .collect();
        assert_eq!(malformed.len(), 2, "{warnings:#?}");
        assert!(ends_with(malformed[0], "linux-native_d.rules", 8));
        assert!(ends_with(malformed[1], "linux-native_d.rules", 9));
        let text = warnings
            .iter()
            .find(|w| matches!(w, Warning::Malformed { .. }))
            .unwrap()
            .to_string();
        assert!(text.contains("linux-native_d.rules:8"), "{text}");
        assert!(text.contains("start it with '#'"), "{text}");
        // Neither stopped the rest of the file or the later files.
        assert!(rules.lookup("dota2").is_none());
        assert!(rules.lookup("glxgears").is_some());
        // ananicy-cpp ignores text after the object; so do we, with a word.
        assert!(warnings.iter().any(|w| matches!(
            w,
            Warning::TrailingText { source, text }
                if ends_with(source, "linux-native_d.rules", 5) && text == "+"
        )));
        assert!(rules.lookup_name("Dungeon Drafters.x86_64").is_some());
        // Nothing else: .types, .cgroups and .bak files are not read.
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
    }

    #[test]
    fn missing_dir_is_a_warning() {
        let missing = fixtures().join("no-such-dir");
        let dirs = [missing.clone(), fixtures().join("etc")];
        let (rules, warnings) = AnanicyRules::load(&dirs, &default_types()).unwrap();
        assert!(warnings.contains(&Warning::MissingDir {
            dir: missing.clone()
        }));
        assert!(warnings[0].to_string().contains("no-such-dir"));
        assert!(rules.lookup("witcher3.exe").is_some());

        let (rules, warnings) = AnanicyRules::load(&[missing], &default_types()).unwrap();
        assert!(rules.is_empty());
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn unmapped_types_are_skipped_and_mapped_ones_kept() {
        let (rules, _) = load_default();
        assert!(rules.lookup("mpv").is_none());
        assert!(rules.lookup("pipewire").is_none(), "no type at all");
        assert!(
            rules.lookup("Heavy_CPU").is_none(),
            "a type definition, not a rule"
        );

        let (rules, _) = load_with(&types(&[("Game", "game"), ("Player-Video", "render")]));
        let m = rules.lookup("mpv").unwrap();
        assert_eq!((m.class, m.ananicy_type), ("render", "Player-Video"));
        assert_eq!(
            rules.stats().unmapped,
            BTreeMap::from([("BG_CPUIO".to_owned(), 2)])
        );
    }

    #[test]
    fn later_duplicates_override_earlier_ones() {
        let (rules, _) = load_default();
        // local/ is read after etc/.
        let m = rules.lookup("witcher3.exe").unwrap();
        assert!(ends_with(m.source, "local/99-overrides.rules", 2));
        // An override to an unmapped type takes the name out.
        assert!(rules.lookup("StardewValley").is_none());

        // The other way round, etc/ wins.
        let dirs = [fixtures().join("local"), fixtures().join("etc")];
        let (rules, _) = AnanicyRules::load(&dirs, &default_types()).unwrap();
        let m = rules.lookup("witcher3.exe").unwrap();
        assert!(ends_with(m.source, "wine_proton_o.rules", 7));
        assert_eq!(rules.lookup("StardewValley").unwrap().class, "game");
    }

    #[test]
    fn shared_comm_prefix() {
        // By default only the game is mapped: the comm finds it.
        let (rules, _) = load_default();
        let m = rules.lookup("Octopath_Travel").unwrap();
        assert_eq!(m.name, "Octopath_Traveler-Win64-Shipping.exe");

        // Launcher and game in different classes: the comm cannot tell them
        // apart, argv[0] can.
        let (rules, _) = load_with(&types(&[("Game", "game"), ("BG_CPUIO", "system")]));
        assert_eq!(rules.stats().ambiguous_comms, 1);
        assert!(rules.lookup("Octopath_Travel").is_none());
        let launcher = rules
            .lookup_argv0(r"Z:\games\Octopath\Octopath_Traveler.exe")
            .unwrap();
        assert_eq!((launcher.class, launcher.by), ("system", MatchedBy::Argv0));
        let game = rules
            .lookup_process(
                "Octopath_Travel",
                Some(r"C:\Octopath_Traveler-Win64-Shipping.exe"),
            )
            .unwrap();
        assert_eq!(game.class, "game");
    }

    #[test]
    fn argv0_basename_like_ananicy() {
        assert_eq!(argv0_basename("/usr/bin/glxgears"), "glxgears");
        assert_eq!(argv0_basename("glxgears"), "glxgears");
        assert_eq!(argv0_basename(r"C:\Games\witcher3.exe"), "witcher3.exe");
        assert_eq!(argv0_basename(r"Z:\a/b\c.EXE"), "c.EXE");
        // Backslashes only separate in Windows names.
        assert_eq!(argv0_basename(r"/opt/odd\name"), r"odd\name");
        assert_eq!(argv0_basename("/usr/bin/"), "");
    }

    #[test]
    fn lookup_process_prefers_argv0_then_comm() {
        let (rules, _) = load_default();
        let m = rules
            .lookup_process("witcher3.exe", Some("/usr/bin/wine64"))
            .unwrap();
        assert_eq!(m.by, MatchedBy::Comm);
        let m = rules
            .lookup_process("wine64-preload", Some(r"C:\w3\witcher3.exe"))
            .unwrap();
        assert_eq!((m.name, m.by), ("witcher3.exe", MatchedBy::Argv0));
        assert!(rules.lookup_process("bash", Some("/bin/bash")).is_none());
    }

    #[test]
    fn a_rules_file_can_be_named_directly() {
        let file = fixtures().join("local/99-overrides.rules");
        let (rules, warnings) = AnanicyRules::load(&[file], &default_types()).unwrap();
        assert!(warnings.is_empty(), "{warnings:#?}");
        assert_eq!(rules.len(), 1);
    }

    #[test]
    fn empty_mapping_is_an_error() {
        let err = AnanicyRules::load(&[], &types(&[("Game", "")])).unwrap_err();
        assert!(err.to_string().contains("\"Game\""), "{err}");
        assert!(AnanicyRules::load(&[], &types(&[("", "game")])).is_err());
    }

    #[test]
    fn default_types_map_only_games() {
        assert_eq!(default_types(), types(&[("Game", "game")]));
    }
}
