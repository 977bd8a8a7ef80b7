//! Fuzzes the Confluent wire-format parser: it must never panic, and a parsed frame must
//! re-frame to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema_registry::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok((id, body)) = wire::parse(data) {
        assert_eq!(wire::frame(id, body), data);
    }
});
