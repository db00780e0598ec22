//! CPU lists in the kernel's format ("0-3,8,10-11"): parsing, printing, the
//! online CPUs, and set operations. Which list a class gets on this machine
//! is `coresets::assign_core_sets`'s business.

use std::{collections::BTreeSet, fmt, path::Path};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuList(BTreeSet<u32>);

impl CpuList {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut cpus = BTreeSet::new();
        for part in text.trim().split(',').filter(|p| !p.trim().is_empty()) {
            let part = part.trim();
            let number = |s: &str| {
                s.trim().parse::<u32>().map_err(|_| {
                    format!("`{text}`: `{s}` is not a CPU number (expected e.g. \"0-7,12\")")
                })
            };
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (number(lo)?, number(hi)?);
                    if lo > hi {
                        return Err(format!("`{text}`: range {lo}-{hi} runs backwards"));
                    }
                    cpus.extend(lo..=hi);
                }
                None => {
                    cpus.insert(number(part)?);
                }
            }
        }
        Ok(CpuList(cpus))
    }

    /// The CPUs the kernel lists as online under `sysfs_root`
    /// (normally `/sys`).
    pub fn online(sysfs_root: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(sysfs_root.join("devices/system/cpu/online"))?;
        Self::parse(&text).map_err(std::io::Error::other)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The CPU numbers, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn intersect(&self, other: &CpuList) -> CpuList {
        CpuList(self.0.intersection(&other.0).copied().collect())
    }
}

impl FromIterator<u32> for CpuList {
    fn from_iter<I: IntoIterator<Item = u32>>(cpus: I) -> Self {
        CpuList(cpus.into_iter().collect())
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.0.iter().copied().peekable();
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end = iter.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_ranges() {
        let list = CpuList::parse("0-3, 8,10-11").unwrap();
        assert_eq!(list.len(), 7);
        assert_eq!(list.to_string(), "0-3,8,10-11");
        assert!(CpuList::parse("3-1").is_err());
        assert!(CpuList::parse("a").is_err());
    }

    #[test]
    fn iterates_and_collects() {
        let list = CpuList::parse("0-2,8").unwrap();
        assert_eq!(list.iter().collect::<Vec<_>>(), [0, 1, 2, 8]);
        assert_eq!([8, 1, 0, 2].into_iter().collect::<CpuList>(), list);
    }
}
