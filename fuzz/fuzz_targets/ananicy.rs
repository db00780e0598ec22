//! The ananicy-cpp rule parser on any bytes as one `.rules` file: rules
//! or warnings naming file:line, never a panic, and lookups in what it
//! loaded never panic either (comm keys cut names at 15 bytes, inside a
//! character too).
#![no_main]

use std::path::Path;

use corral::model::ananicy::{AnanicyRules, default_types};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let types = default_types();
    let Ok((rules, warnings)) = AnanicyRules::parse(Path::new("fuzz.rules"), data, &types) else {
        return;
    };
    for w in &warnings {
        let _ = w.to_string();
    }
    // Look up names taken from the input itself, so loaded names are hit.
    let text = String::from_utf8_lossy(data);
    for word in text.split(['"', '\n']).take(64) {
        let _ = rules.lookup(word);
        let _ = rules.lookup_name(word);
        let _ = rules.lookup_argv0(word);
        let _ = rules.lookup_process(word, Some(word));
    }
});
