//! The ring-buffer record decoder on any bytes: a record of at least
//! `size_of::<ProcEvent>()` bytes decodes to exactly those bytes, a shorter
//! one to nothing, and no length or alignment reads out of bounds (the
//! decoder's one `unsafe` read; run under AddressSanitizer).
#![no_main]

use corral::kernel::bpf;
use corral_common::{EventKind, ProcEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let size = size_of::<ProcEvent>();
    // Also an odd offset: ring buffer records are only 8-byte aligned.
    for bytes in [data, data.get(1..).unwrap_or_default()] {
        match bpf::decode(bytes) {
            None => assert!(bytes.len() < size, "a full record did not decode"),
            Some(event) => {
                assert!(bytes.len() >= size, "a short record decoded");
                // SAFETY: ProcEvent is plain old data; reading its bytes.
                let raw = unsafe {
                    std::slice::from_raw_parts((&event as *const ProcEvent).cast::<u8>(), size)
                };
                assert_eq!(raw, &bytes[..size], "the record changed in decoding");
                let _ = EventKind::from_u32(event.kind);
            }
        }
    }
});
