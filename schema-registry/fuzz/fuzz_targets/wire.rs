//! Fuzzes the Confluent wire-format parser: it must never panic, a parsed frame must re-frame
//! to the same bytes, and a Protobuf message-index path must re-encode to a prefix that parses
//! to the same path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema_registry::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok((id, body)) = wire::parse(data) {
        assert_eq!(wire::frame(id, body), data);
        if let Ok((path, rest)) = wire::parse_message_indexes(body) {
            let again = wire::message_indexes(&path);
            assert_eq!(wire::parse_message_indexes(&again).unwrap().0, path);
            assert!(rest.len() <= body.len());
        }
    }
});
