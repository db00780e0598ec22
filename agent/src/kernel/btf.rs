//! Reads one struct member's offset from the kernel's BTF
//! (/sys/kernel/btf/vmlinux), for the fields the eBPF programs read out of
//! kernel structs without CO-RE (the Rust eBPF toolchain emits none).
//!
//! Only what that needs: the header, each type's record length (to walk
//! them) and struct members, anonymous inner structs and unions included
//! (a randomized task_struct nests its fields in one). aya-obj parses BTF
//! too, but keeps its type lookups to itself.

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};

/// The running kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One type record: where it is in the type section, its kind, name and
/// member count.
#[derive(Clone, Copy)]
struct TypeAt {
    at: usize,
    kind: u32,
    name_off: u32,
    vlen: usize,
    kind_flag: bool,
}

/// A BTF blob, walked once into an index of where each type's record
/// starts (type id i at `index[i - 1]`; 4 bytes a type, as vmlinux has
/// some 150,000).
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    index: Vec<u32>,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The common part of the type record at byte `at` of the type section.
fn type_at(types: &[u8], at: usize) -> Option<TypeAt> {
    let (name_off, info) = (u32_at(types, at)?, u32_at(types, at + 4)?);
    Some(TypeAt {
        at,
        kind: (info >> 24) & 0x1f,
        name_off,
        vlen: (info & 0xffff) as usize,
        kind_flag: info >> 31 == 1,
    })
}

impl<'a> Btf<'a> {
    /// Parses a little-endian BTF blob.
    pub fn parse(blob: &'a [u8]) -> anyhow::Result<Self> {
        let magic = blob
            .get(0..2)
            .map(|m| u16::from_le_bytes([m[0], m[1]]))
            .ok_or_else(|| anyhow!("shorter than a BTF header"))?;
        if magic != MAGIC {
            bail!("not little-endian BTF (magic {magic:#06x})");
        }
        let word = |at| u32_at(blob, at).map(|w| w as usize);
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (word(4), word(8), word(12), word(16), word(20))
        else {
            bail!("shorter than a BTF header");
        };
        let section = |off: usize, len: usize| {
            blob.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(|| anyhow!("a section runs past the end of the BTF"))
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut index = Vec::with_capacity(types.len() / 32);
        let mut at = 0;
        while at < types.len() {
            let Some(TypeAt { kind, vlen, .. }) = type_at(types, at) else {
                bail!("a type record at byte {at} is cut short");
            };
            // Each kind's trailing data after the 12-byte common record.
            let extra = match kind {
                1 | 14 | 17 => 4,             // int, var, decl_tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func_proto
                2 | 7..=12 | 16 | 18 => 0,
                other => bail!("unknown BTF kind {other} at byte {at}"),
            };
            index.push(u32::try_from(at)?);
            at += 12 + extra;
        }
        Ok(Btf {
            types,
            strings,
            index,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    /// The byte offset of `member` in `struct name`, looking into its
    /// anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u32> {
        let outer = self
            .index
            .iter()
            .filter_map(|at| type_at(self.types, *at as usize))
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name.as_bytes())
            .ok_or_else(|| anyhow!("no struct {name}"))?;
        let bits = self
            .find_member(&outer, member.as_bytes(), 0)
            .ok_or_else(|| anyhow!("struct {name} has no member {member}"))?;
        if bits % 8 != 0 {
            bail!("{name}.{member} is a bitfield");
        }
        Ok(bits / 8)
    }

    /// The bit offset of `member` in `ty`, at most `depth` 8 anonymous
    /// levels down.
    fn find_member(&self, ty: &TypeAt, member: &[u8], depth: u32) -> Option<u32> {
        for i in 0..ty.vlen {
            let at = ty.at + 12 + 12 * i;
            let (name_off, type_id, offset) = (
                u32_at(self.types, at)?,
                u32_at(self.types, at + 4)?,
                u32_at(self.types, at + 8)?,
            );
            // With kind_flag set the top 8 bits are a bitfield's size.
            let bits = if ty.kind_flag {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            if name_off != 0 {
                if self.name(name_off) == member {
                    return Some(bits);
                }
                continue;
            }
            let inner = type_at(
                self.types,
                *self.index.get((type_id as usize).checked_sub(1)?)? as usize,
            )?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && depth < 8
                && let Some(found) = self.find_member(&inner, member, depth + 1)
            {
                return Some(bits + found);
            }
        }
        None
    }
}

/// The byte offset of `task_struct.start_boottime` (the start time
/// /proc/PID/stat reports, in ns since boot) in the running kernel.
pub fn task_start_boottime_offset(vmlinux: &Path) -> anyhow::Result<u32> {
    let blob = std::fs::read(vmlinux).with_context(|| format!("reading {}", vmlinux.display()))?;
    Btf::parse(&blob)
        .and_then(|btf| btf.member_offset("task_struct", "start_boottime"))
        .with_context(|| format!("in {}", vmlinux.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: strings, then types given as
    /// (name, info, size_or_type, trailing words).
    fn blob(strings: &[&str], types: &[(u32, u32, u32, Vec<u32>)]) -> Vec<u8> {
        let mut str_sec = vec![0u8];
        let mut offsets = vec![];
        for s in strings {
            offsets.push(str_sec.len() as u32);
            str_sec.extend_from_slice(s.as_bytes());
            str_sec.push(0);
        }
        let mut type_sec = vec![];
        for (name, info, size, extra) in types {
            let name = if *name == 0 {
                0
            } else {
                offsets[*name as usize - 1]
            };
            for w in [name, *info, *size].iter().chain(extra) {
                type_sec.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = vec![];
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24,
            0,
            type_sec.len() as u32,
            type_sec.len() as u32,
            str_sec.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend(type_sec);
        out.extend(str_sec);
        out
    }

    /// The string section offset of `strings[i]` as `blob` lays it out.
    fn off(strings: &[&str], i: usize) -> u32 {
        1 + strings[..i].iter().map(|s| s.len() as u32 + 1).sum::<u32>()
    }

    #[test]
    fn finds_a_member_directly_and_inside_an_anonymous_struct() {
        let s = ["int", "task_struct", "pid", "start_boottime", "other"];
        let info = |kind: u32, vlen: u32| kind << 24 | vlen;
        let types = vec![
            // 1: int (trailing encoding word)
            (1, info(1, 0), 4, vec![32]),
            // 2: an anonymous struct { int pid @ 0; u64 start_boottime @ 64 bits }
            (0, info(4, 2), 16, vec![off(&s, 2), 1, 0, off(&s, 3), 1, 64]),
            // 3: a func_proto with one parameter, to be skipped
            (0, info(13, 1), 1, vec![0, 1]),
            // 4: struct task_struct { int other @ 0; <anon> @ 128 bits }
            (2, info(4, 2), 64, vec![off(&s, 4), 1, 0, 0, 2, 128]),
        ];
        let bytes = blob(&s, &types);
        let btf = Btf::parse(&bytes).unwrap();
        assert_eq!(btf.member_offset("task_struct", "other").unwrap(), 0);
        assert_eq!(btf.member_offset("task_struct", "pid").unwrap(), 16);
        assert_eq!(
            btf.member_offset("task_struct", "start_boottime").unwrap(),
            24
        );
        assert!(btf.member_offset("task_struct", "nope").is_err());
        assert!(btf.member_offset("mm_struct", "pid").is_err());
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
        let mut bytes = blob(&["x"], &[(1, 31 << 24, 0, vec![])]);
        assert!(Btf::parse(&bytes).is_err(), "an unknown kind is refused");
        bytes[0] = 0;
        assert!(Btf::parse(&bytes).is_err());
    }

    /// The running kernel's task_struct has start_boottime where its BTF
    /// says; the value read there is checked against /proc in the
    /// real-kernel tests (tests/tests/kernel.rs).
    #[test]
    fn the_running_kernel_names_start_boottime() {
        let vmlinux = Path::new(VMLINUX_BTF);
        if !vmlinux.exists() {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        }
        let offset = task_start_boottime_offset(vmlinux).unwrap();
        assert!(offset > 0 && offset < 16384, "{offset}");
    }
}
