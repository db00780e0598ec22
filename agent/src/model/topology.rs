//! CPU topology read from sysfs: which CPUs are online and what each is
//! (core, package, SMT siblings, capacity, max frequency, L3, P/E kind).
//! Turning classes' core-set intents into CPUs is [`super::coresets`].
//!
//! # Reading
//!
//! [`Topology::read`] takes the sysfs root (normally `/sys`; tests use the
//! trees under `agent/tests/fixtures/sysfs/`) and reads, relative to it:
//!
//! - `devices/system/cpu/online`: the CPUs to consider. Required; without it
//!   the error names the path.
//! - per online CPU `N`, under `devices/system/cpu/cpuN/`:
//!   `topology/core_id`, `topology/physical_package_id`,
//!   `topology/thread_siblings_list` (SMT siblings), `cpu_capacity`,
//!   `cpufreq/cpuinfo_max_freq` (kHz), and the level-3 entry among
//!   `cache/indexK/` (`level`, `shared_cpu_list`, `size` such as "32768K").
//! - `devices/cpu_core/cpus` and `devices/cpu_atom/cpus`: Intel hybrid
//!   P-cores and E-cores.
//!
//! Everything but `online` is optional: VMs show little, and a missing file
//! only means that fact is unknown (no siblings means a CPU is its own core).
//! A file that exists but does not hold what the kernel writes is an error
//! naming the file, because then the root is probably not sysfs.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
    str::FromStr,
};

use crate::model::cpus::CpuList;

/// Why the topology cannot be read from sysfs.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "cannot read the online CPU list {path}: {source}; corral reads the CPU topology from sysfs, \
         check that it is mounted (normally at /sys)"
    )]
    Online { path: PathBuf, source: io::Error },
    #[error(
        "{path}: {reason}; that is not what the kernel writes there, check that the sysfs root is right"
    )]
    Parse { path: PathBuf, reason: String },
    #[error("{path} lists no CPUs; check that the sysfs root is right")]
    NoCpus { path: PathBuf },
}

/// What kind of core a CPU belongs to on a hybrid (P/E) machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CoreKind {
    /// Listed in `devices/cpu_core/cpus`.
    Performance,
    /// Listed in neither list: not a hybrid machine, or the kernel did not
    /// say.
    Uniform,
    /// Listed in `devices/cpu_atom/cpus`.
    Efficiency,
}

/// A last-level (L3) cache and the CPUs that share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    /// Online CPUs sharing this cache (`shared_cpu_list`).
    pub cpus: CpuList,
    /// Size in KiB, when the kernel tells.
    pub size_kib: Option<u64>,
}

/// What sysfs says about one online CPU. `None` means the file was absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    pub id: u32,
    pub core_id: Option<u32>,
    pub package: Option<u32>,
    /// Online SMT siblings, this CPU included (just this CPU when unknown).
    pub siblings: CpuList,
    /// `cpu_capacity` (1024 = the biggest core), mostly on ARM.
    pub capacity: Option<u32>,
    pub max_freq_khz: Option<u32>,
    pub l3: Option<Cache>,
    pub kind: CoreKind,
}

/// The online CPUs of one machine and what is known about each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Never empty ([`Topology::read`] refuses that).
    online: CpuList,
    /// One per online CPU, by id.
    cpus: Vec<Cpu>,
}

impl Topology {
    /// Read the topology from the sysfs tree at `sysfs_root` (normally
    /// `/sys`). Only `devices/system/cpu/online` is required.
    pub fn read(sysfs_root: &Path) -> Result<Self, TopologyError> {
        let online_path = sysfs_root.join("devices/system/cpu/online");
        let text =
            std::fs::read_to_string(&online_path).map_err(|source| TopologyError::Online {
                path: online_path.clone(),
                source,
            })?;
        let online = parse_list(&online_path, &text)?;
        if online.is_empty() {
            return Err(TopologyError::NoCpus { path: online_path });
        }
        let online_set = members(&online);

        let p_cores =
            optional_list(&sysfs_root.join("devices/cpu_core/cpus"))?.map(|l| members(&l));
        let e_cores =
            optional_list(&sysfs_root.join("devices/cpu_atom/cpus"))?.map(|l| members(&l));

        let mut cpus = Vec::with_capacity(online_set.len());
        for &id in &online_set {
            let dir = sysfs_root.join(format!("devices/system/cpu/cpu{id}"));
            let mut siblings: BTreeSet<u32> =
                match optional_list(&dir.join("topology/thread_siblings_list"))? {
                    Some(list) => members(&list).intersection(&online_set).copied().collect(),
                    None => BTreeSet::new(),
                };
            siblings.insert(id);
            let package = optional::<i64>(&dir.join("topology/physical_package_id"))?
                .and_then(|p| u32::try_from(p).ok());
            let kind = if p_cores.as_ref().is_some_and(|p| p.contains(&id)) {
                CoreKind::Performance
            } else if e_cores.as_ref().is_some_and(|e| e.contains(&id)) {
                CoreKind::Efficiency
            } else {
                CoreKind::Uniform
            };
            cpus.push(Cpu {
                id,
                core_id: optional(&dir.join("topology/core_id"))?,
                package,
                siblings: to_list(siblings),
                capacity: optional(&dir.join("cpu_capacity"))?,
                max_freq_khz: optional(&dir.join("cpufreq/cpuinfo_max_freq"))?,
                l3: read_l3(&dir.join("cache"), &online_set)?,
                kind,
            });
        }
        Ok(Topology { online, cpus })
    }

    /// The online CPUs; never empty.
    pub fn online(&self) -> &CpuList {
        &self.online
    }

    /// Every online CPU, by id.
    pub fn cpus(&self) -> &[Cpu] {
        &self.cpus
    }

    pub fn cpu(&self, id: u32) -> Option<&Cpu> {
        self.cpus
            .binary_search_by_key(&id, |c| c.id)
            .ok()
            .map(|i| &self.cpus[i])
    }

    /// Whether the kernel reports P-cores and E-cores.
    pub fn is_hybrid(&self) -> bool {
        self.cpus.iter().any(|c| c.kind == CoreKind::Efficiency)
            && self.cpus.iter().any(|c| c.kind == CoreKind::Performance)
    }
}

/// The level-3 cache under `cache_dir` (`.../cpuN/cache`), if any.
fn read_l3(cache_dir: &Path, online: &BTreeSet<u32>) -> Result<Option<Cache>, TopologyError> {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return Ok(None);
    };
    let mut indexes: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("index"))
        .map(|e| e.path())
        .collect();
    indexes.sort();
    for index in indexes {
        if optional::<u32>(&index.join("level"))? != Some(3) {
            continue;
        }
        let cpus = match optional_list(&index.join("shared_cpu_list"))? {
            Some(list) => to_list(members(&list).intersection(online).copied()),
            None => CpuList::default(),
        };
        let size_path = index.join("size");
        let size_kib = match read_optional(&size_path) {
            Some(text) => Some(parse_size_kib(&text).ok_or_else(|| TopologyError::Parse {
                path: size_path.clone(),
                reason: format!(
                    "`{}` is not a cache size (expected e.g. \"32768K\")",
                    text.trim()
                ),
            })?),
            None => None,
        };
        return Ok(Some(Cache { cpus, size_kib }));
    }
    Ok(None)
}

/// The file's text, or `None` when it cannot be read (absent, or a sysfs
/// attribute that refuses reads on this machine).
fn read_optional(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn optional<T: FromStr>(path: &Path) -> Result<Option<T>, TopologyError> {
    let Some(text) = read_optional(path) else {
        return Ok(None);
    };
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| TopologyError::Parse {
            path: path.to_path_buf(),
            reason: format!("`{}` is not a number", text.trim()),
        })
}

fn optional_list(path: &Path) -> Result<Option<CpuList>, TopologyError> {
    read_optional(path)
        .map(|text| parse_list(path, &text))
        .transpose()
}

fn parse_list(path: &Path, text: &str) -> Result<CpuList, TopologyError> {
    CpuList::parse(text).map_err(|reason| TopologyError::Parse {
        path: path.to_path_buf(),
        reason,
    })
}

/// "32768K" → 32768; also takes M and G, and a bare number of bytes.
fn parse_size_kib(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, scale) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 1),
        (i, 'M' | 'm') => (&text[..i], 1024),
        (i, 'G' | 'g') => (&text[..i], 1024 * 1024),
        _ => return text.parse::<u64>().ok().map(|bytes| bytes / 1024),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(scale)
}

/// The CPU numbers in `list`.
pub(crate) fn members(list: &CpuList) -> BTreeSet<u32> {
    list.iter().collect()
}

pub(crate) fn to_list(cpus: impl IntoIterator<Item = u32>) -> CpuList {
    cpus.into_iter().collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn list(text: &str) -> CpuList {
        CpuList::parse(text).unwrap()
    }

    /// A fixture tree under agent/tests/fixtures/sysfs.
    pub(crate) fn fixture(name: &str) -> Topology {
        let root =
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sysfs")).join(name);
        Topology::read(&root).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn reads_hybrid_topology() {
        let topo = fixture("hybrid-20");
        assert_eq!(topo.online().to_string(), "0-19");
        assert!(topo.is_hybrid());
        let p = topo.cpu(3).unwrap();
        assert_eq!(p.kind, CoreKind::Performance);
        assert_eq!(p.siblings.to_string(), "2-3");
        assert_eq!(p.core_id, Some(4));
        assert_eq!(p.package, Some(0));
        assert_eq!(p.capacity, Some(1024));
        assert_eq!(p.max_freq_khz, Some(5_100_000));
        assert_eq!(
            p.l3,
            Some(Cache {
                cpus: list("0-19"),
                size_kib: Some(24576)
            })
        );
        let e = topo.cpu(17).unwrap();
        assert_eq!(e.kind, CoreKind::Efficiency);
        assert_eq!(e.siblings.to_string(), "17");
        assert_eq!(e.max_freq_khz, Some(3_900_000));
    }

    #[test]
    fn reads_x3d_topology() {
        let topo = fixture("x3d-7950");
        assert!(!topo.is_hybrid());
        let vcache = topo.cpu(17).unwrap();
        assert_eq!(vcache.siblings.to_string(), "1,17");
        assert_eq!(vcache.l3.as_ref().unwrap().size_kib, Some(98304));
        assert_eq!(vcache.l3.as_ref().unwrap().cpus.to_string(), "0-7,16-23");
        assert_eq!(vcache.capacity, None);
        assert_eq!(
            topo.cpu(9).unwrap().l3.as_ref().unwrap().size_kib,
            Some(32768)
        );
    }

    #[test]
    fn reads_a_vm_with_only_the_online_file() {
        let topo = fixture("vm-2");
        assert_eq!(topo.cpus().len(), 2);
        let cpu = topo.cpu(1).unwrap();
        assert_eq!(cpu.siblings.to_string(), "1");
        assert_eq!(
            (cpu.core_id, cpu.capacity, cpu.max_freq_khz),
            (None, None, None)
        );
        assert_eq!((cpu.l3.as_ref(), cpu.kind), (None, CoreKind::Uniform));
    }

    #[test]
    fn missing_online_file_names_the_path() {
        let root = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sysfs/no-such-machine"
        ));
        let err = Topology::read(root).unwrap_err().to_string();
        assert!(
            err.contains("no-such-machine/devices/system/cpu/online"),
            "{err}"
        );
        assert!(err.contains("check that it is mounted"), "{err}");
    }

    #[test]
    fn malformed_sysfs_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("corral-topology-{}", std::process::id()));
        let cpu0 = dir.join("devices/system/cpu/cpu0/topology");
        std::fs::create_dir_all(&cpu0).unwrap();
        std::fs::write(dir.join("devices/system/cpu/online"), "0\n").unwrap();
        std::fs::write(cpu0.join("core_id"), "zero\n").unwrap();
        let err = Topology::read(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("cpu0/topology/core_id: `zero` is not a number"),
            "{err}"
        );
    }

    #[test]
    fn cache_sizes_parse() {
        assert_eq!(parse_size_kib("32768K\n"), Some(32768));
        assert_eq!(parse_size_kib("96M"), Some(98304));
        assert_eq!(parse_size_kib("1G"), Some(1024 * 1024));
        assert_eq!(parse_size_kib("2048"), Some(2));
        assert_eq!(parse_size_kib("K"), None);
        assert_eq!(parse_size_kib(""), None);
    }
}
