//! Escaping of strings that came from a process (comm, argv, exe, cwd, env
//! values, cgroup paths, unit names) before they reach a terminal or a log
//! line, so that no process can write escape sequences into root's
//! terminal. `--json` output is not escaped here: serde_json already writes
//! every control character as `\uNNNN`, so it stays exact.
//!
//! The escapes, C-style like `systemd-escape` and `ps`, and unambiguous
//! (a backslash is itself escaped, so the escaped text names exactly one
//! original):
//! - `\\` for a backslash;
//! - `\e` (ESC), `\a`, `\b`, `\t`, `\n`, `\v`, `\f`, `\r`;
//! - `\xNN` for the other C0 controls, DEL, and each byte that is not
//!   valid UTF-8;
//! - `\u{NN}` for the C1 controls (U+0080..U+009F, which some terminals
//!   obey like ESC sequences: U+009B is CSI) and for the Unicode controls
//!   that reorder or break the displayed line (bidi overrides and
//!   isolates, U+2028/U+2029). They are written `\u{..}`, not `\xNN`,
//!   because `\x9b` already means the invalid byte 0x9b.
//!
//! Everything else, printable Unicode included, is kept as it is.
//!
//! Where the bytes are lost: /proc strings are read into `String`s
//! lossily (model/procs.rs), so an invalid byte in a comm or argv reaches
//! the views as U+FFFD, which is printable and harmless and is shown as
//! `�`; classification and `--json` see the same U+FFFD. The `\xNN` form
//! for invalid bytes applies where the raw bytes are at hand
//! ([`escape_bytes`]).

use std::{borrow::Cow, fmt};

/// The escape of one character, or None when it is shown as itself.
fn escape_of(c: char) -> Option<Escape> {
    Some(match c {
        '\\' => Escape::Text("\\\\"),
        '\x1b' => Escape::Text("\\e"),
        '\x07' => Escape::Text("\\a"),
        '\x08' => Escape::Text("\\b"),
        '\t' => Escape::Text("\\t"),
        '\n' => Escape::Text("\\n"),
        '\x0b' => Escape::Text("\\v"),
        '\x0c' => Escape::Text("\\f"),
        '\r' => Escape::Text("\\r"),
        '\0'..='\x1f' | '\x7f' => Escape::Byte(c as u8),
        '\u{80}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}' => Escape::Unicode(c),
        _ => return None,
    })
}

enum Escape {
    Text(&'static str),
    Byte(u8),
    Unicode(char),
}

/// Writes `raw` to `out` escaped.
fn write_escaped(out: &mut impl fmt::Write, raw: &[u8]) -> fmt::Result {
    for chunk in raw.utf8_chunks() {
        let valid = chunk.valid();
        let mut kept = 0;
        for (at, c) in valid.char_indices() {
            let Some(escape) = escape_of(c) else {
                continue;
            };
            out.write_str(&valid[kept..at])?;
            kept = at + c.len_utf8();
            match escape {
                Escape::Text(text) => out.write_str(text)?,
                Escape::Byte(b) => write!(out, "\\x{b:02x}")?,
                Escape::Unicode(c) => write!(out, "\\u{{{:x}}}", c as u32)?,
            }
        }
        out.write_str(&valid[kept..])?;
        for b in chunk.invalid() {
            write!(out, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// `raw` escaped for a terminal; invalid UTF-8 bytes become `\xNN`.
pub fn escape_bytes(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    write_escaped(&mut out, raw).expect("writing to a String cannot fail");
    out
}

/// `s` escaped for a terminal; borrowed when nothing needed escaping (the
/// common case). A `Cow<str>`, so `{:<16}` pads it like any string.
pub fn escape(s: &str) -> Cow<'_, str> {
    if s.chars().any(|c| escape_of(c).is_some()) {
        Cow::Owned(escape_bytes(s.as_bytes()))
    } else {
        Cow::Borrowed(s)
    }
}

/// A process string (or an error or message that may quote one) in a log
/// line, escaped where it is formatted: `debug!(comm = %esc(&p.comm),
/// "moved")`, `warn!("{}: {}", esc(&unit), esc(&e))`. Ignores width and
/// fill (log fields are not padded); views use [`escape`].
#[derive(Debug, Clone, Copy)]
pub struct Escaped<T>(pub T);

/// [`Escaped`] of anything shown with `{}`.
pub fn esc<T: fmt::Display>(value: T) -> Escaped<T> {
    Escaped(value)
}

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Escapes each piece `T` writes on its way to `f`.
        struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                write_escaped(self.0, s.as_bytes())
            }
        }
        use fmt::Write as _;
        write!(Escaping(f), "{}", self.0)
    }
}

/// `value` as pretty JSON (`--json`) or as one compact line (`corral
/// classify`). serde_json escapes the C0 controls but writes C1 controls
/// and bidi overrides raw, which is valid JSON but reaches the terminal:
/// here those are written `\uNNNN` too, so the text stays exact (it parses
/// back to the same strings) and holds nothing a terminal acts on.
pub fn to_json(value: &impl serde::Serialize, pretty: bool) -> serde_json::Result<String> {
    let mut out = Vec::new();
    if pretty {
        let formatter = TerminalSafe(serde_json::ser::PrettyFormatter::new());
        value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out, formatter,
        ))?;
    } else {
        let formatter = TerminalSafe(serde_json::ser::CompactFormatter);
        value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out, formatter,
        ))?;
    }
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

/// A JSON formatter that writes the characters [`escape_of`] would escape
/// (and JSON does not already) as `\uNNNN`; otherwise the inner one.
struct TerminalSafe<F>(F);

impl<F: serde_json::ser::Formatter> serde_json::ser::Formatter for TerminalSafe<F> {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut kept = 0;
        for (at, c) in fragment.char_indices() {
            // Backslash, quote and C0 never reach a fragment: serde_json
            // escapes them itself.
            if matches!(escape_of(c), Some(Escape::Unicode(_))) {
                w.write_all(&fragment.as_bytes()[kept..at])?;
                write!(w, "\\u{:04x}", c as u32)?;
                kept = at + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[kept..])
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }

    fn end_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_key(w)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// Whether `text` holds a byte a terminal could act on: a C0 control other
/// than newline and tab, DEL, or a C1 control. What the tests of every view
/// assert is absent.
pub fn has_terminal_control(text: &str) -> bool {
    text.chars()
        .any(|c| matches!(c, '\0'..='\x08' | '\x0b'..='\x1f' | '\x7f' | '\u{80}'..='\u{9f}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_become_c_style_escapes() {
        assert_eq!(
            escape("weird\x1b]0;PWNED\x07\x1b[2J\x1b[31mX"),
            "weird\\e]0;PWNED\\a\\e[2J\\e[31mX"
        );
        assert_eq!(escape("a\tb\nc\rd\x08\x0b\x0c"), "a\\tb\\nc\\rd\\b\\v\\f");
    }

    #[test]
    fn other_c0_and_del_become_hex_and_c1_unicode_escapes() {
        assert_eq!(escape("\0\x01\x0e\x1f\x7f"), "\\x00\\x01\\x0e\\x1f\\x7f");
        assert_eq!(escape("\u{9b}31m\u{85}"), "\\u{9b}31m\\u{85}");
    }

    #[test]
    fn bidi_overrides_and_line_separators_are_escaped() {
        assert_eq!(
            escape("evil\u{202e}txt.exe\u{2066}\u{2028}"),
            "evil\\u{202e}txt.exe\\u{2066}\\u{2028}"
        );
    }

    #[test]
    fn a_backslash_is_escaped_so_the_output_is_unambiguous() {
        assert_eq!(escape("C:\\games\\x.exe"), "C:\\\\games\\\\x.exe");
        // The text `\e` and the byte ESC escape differently.
        assert_ne!(escape("\\e"), escape("\x1b"));
    }

    #[test]
    fn invalid_utf8_bytes_become_hex_and_valid_text_around_them_stays() {
        assert_eq!(
            escape_bytes(b"X\xff\xc3(\xe2\x82"),
            "X\\xff\\xc3(\\xe2\\x82"
        );
        assert_eq!(escape_bytes("é\x1b".as_bytes()), "é\\e");
    }

    #[test]
    fn printable_unicode_is_kept_and_borrowed() {
        for s in [
            "Cyberpunk2077.e",
            "日本語 ゲーム",
            "naïve 🎮",
            "\u{fffd}",
            "",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s}");
        }
    }

    #[test]
    fn escaped_output_never_holds_a_terminal_control() {
        let every_byte: Vec<u8> = (0..=255).collect();
        let out = escape_bytes(&every_byte);
        assert!(!has_terminal_control(&out), "{out}");
        assert!(!out.contains('\n') && !out.contains('\t'));
        let every_c1: String = ('\u{80}'..='\u{9f}').collect();
        assert!(!has_terminal_control(&escape(&every_c1)));
    }

    #[test]
    fn json_escapes_c1_and_bidi_too_and_parses_back_exactly() {
        let hostile = vec![
            "weird\x1b]0;PWNED\x07\u{9b}2J\u{202e}\u{fffd}\\ \"é".to_owned(),
            String::new(),
        ];
        for pretty in [false, true] {
            let json = to_json(&hostile, pretty).unwrap();
            assert!(!has_terminal_control(&json), "{json}");
            assert!(!json.contains('\u{202e}'), "{json}");
            assert!(
                json.contains("\\u009b") && json.contains("\\u202e"),
                "{json}"
            );
            let back: Vec<String> = serde_json::from_str(&json).unwrap();
            assert_eq!(back, hostile);
        }
        assert_eq!(
            to_json(&hostile, false).unwrap(),
            serde_json::to_string(&hostile)
                .unwrap()
                .replace('\u{9b}', "\\u009b")
                .replace('\u{202e}', "\\u202e")
        );
        assert_eq!(
            to_json(&serde_json::json!({"a": [1, "b"]}), true).unwrap(),
            "{\n  \"a\": [\n    1,\n    \"b\"\n  ]\n}"
        );
    }

    #[test]
    fn log_wrapper_formats_like_escape_whatever_it_wraps() {
        let s = "x\x1b[2J\\\n";
        assert_eq!(format!("{}", esc(s)), escape(s));
        assert_eq!(format!("{}", esc(&s.to_owned())), escape(s));
        let e = std::io::Error::other(format!("unit {s} not found"));
        assert_eq!(esc(&e).to_string(), "unit x\\e[2J\\\\\\n not found");
    }
}
