//! The control socket's request parser on any bytes (what any local user
//! can send): a request or an error message, never a panic; a request it
//! accepts survives a round trip through the wire format.
#![no_main]

use corral::service::control::{Request, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_request(data) else {
        return;
    };
    let line = serde_json::to_string(&request).expect("a request serializes");
    let again: Request = parse_request(line.as_bytes()).expect("a serialized request parses");
    assert_eq!(format!("{again:?}"), format!("{request:?}"));
});
