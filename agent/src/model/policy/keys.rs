//! Where things are in a policy text: the keys each table may hold (any
//! other is warned about, with its line and column), and byte offsets as
//! lines and columns.

use std::path::Path;

/// Keys each table may hold; anything else is warned about (a typo would
/// otherwise silently do nothing).
const TOP_KEYS: &[&str] = &[
    "classes",
    "rules",
    "modes",
    "ananicy",
    "telemetry",
    "gpu",
    "power",
    "notifications",
];
const GPU_KEYS: &[&str] = &[
    "enabled",
    "library",
    "poll_interval_ms",
    "grace_ms",
    "margin",
    "classes",
    "thermal",
];
const TELEMETRY_KEYS: &[&str] = &["enabled", "metrics_addr"];
const CLASS_KEYS: &[&str] = &["cpus", "cpu_weight", "env", "user_run", "description"];
const RULE_KEYS: &[&str] = &[
    "name",
    "class",
    "disabled",
    "inherit",
    "ignore_case",
    "exe",
    "comm",
    "argv",
    "cwd",
    "cgroup",
    "env",
    "steam_app",
    "ancestor",
    "unless",
];
const MATCHER_KEYS: &[&str] = &["exe", "comm", "argv", "cwd", "cgroup", "env", "steam_app"];

const MODES_KEYS: &[&str] = &["hold_down_ms", "min_dwell_ms", "protected_class"];
const ANANICY_KEYS: &[&str] = &["enabled", "dirs", "types"];

/// Warns about keys no part of corral reads, with their position.
pub(super) fn unknown_keys(
    path: &Path,
    text: &str,
    table: &toml::Table,
    warnings: &mut Vec<String>,
) {
    let mut warn = |key: &str, place: &str, known: &[&str]| {
        // toml's untyped table has no spans: find the key's first use.
        let offset = find_key(text, key).unwrap_or(0);
        let (line, column) = line_column(text, offset);
        warnings.push(format!(
            "{}:{line}:{column}: unknown key `{key}` in {place} is ignored (known keys: {})",
            path.display(),
            known.join(", ")
        ));
    };
    let check = |t: &toml::Table,
                 place: &str,
                 known: &[&str],
                 warn: &mut dyn FnMut(&str, &str, &[&str])| {
        for key in t.keys() {
            if !known.contains(&key.as_str()) {
                warn(key, place, known);
            }
        }
    };
    check(table, "the top level", TOP_KEYS, &mut warn);
    if let Some(classes) = table.get("classes").and_then(|v| v.as_table()) {
        for (name, class) in classes {
            if let Some(class) = class.as_table() {
                check(class, &format!("[classes.{name}]"), CLASS_KEYS, &mut warn);
            }
        }
    }
    if let Some(rules) = table.get("rules").and_then(|v| v.as_array()) {
        for rule in rules.iter().filter_map(|r| r.as_table()) {
            let name = rule.get("name").and_then(|n| n.as_str()).unwrap_or("?");
            check(rule, &format!("rule `{name}`"), RULE_KEYS, &mut warn);
            for nested in ["ancestor", "unless"] {
                if let Some(m) = rule.get(nested).and_then(|v| v.as_table()) {
                    check(
                        m,
                        &format!("rule `{name}` {nested}"),
                        MATCHER_KEYS,
                        &mut warn,
                    );
                }
            }
        }
    }
    if let Some(m) = table.get("modes").and_then(|v| v.as_table()) {
        check(m, "[modes]", MODES_KEYS, &mut warn);
    }
    if let Some(a) = table.get("ananicy").and_then(|v| v.as_table()) {
        check(a, "[ananicy]", ANANICY_KEYS, &mut warn);
    }
    if let Some(t) = table.get("telemetry").and_then(|v| v.as_table()) {
        check(t, "[telemetry]", TELEMETRY_KEYS, &mut warn);
    }
    if let Some(g) = table.get("gpu").and_then(|v| v.as_table()) {
        check(g, "[gpu]", GPU_KEYS, &mut warn);
    }
    for (key, known) in [
        ("power", super::desktop::POWER_KEYS),
        ("notifications", super::desktop::NOTIFICATIONS_KEYS),
    ] {
        if let Some(t) = table.get(key).and_then(|v| v.as_table()) {
            check(t, &format!("[{key}]"), known, &mut warn);
        }
    }
}

/// Byte offset of the first `key =` (or `key=`) at the start of a line or
/// after `{`/`,`.
pub(super) fn find_key(text: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find(key) {
        let at = from + found;
        let before = text[..at].trim_end_matches([' ', '\t']);
        let after = text[at + key.len()..].trim_start_matches([' ', '\t']);
        let starts = before.is_empty() || before.ends_with(['\n', '{', ',']);
        if starts && after.starts_with('=') {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

/// 1-based line and column of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}
