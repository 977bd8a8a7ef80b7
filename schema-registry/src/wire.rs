//! The Confluent wire format: `0x00`, a 4-byte big-endian schema id, then the encoded body.
//! Pure functions, no I/O: this is the parser every record goes through, and it is fuzzed.

use crate::SchemaId;

/// The magic byte of the Confluent framing.
pub const MAGIC: u8 = 0;
/// Length of the header (magic + id).
pub const HEADER_LEN: usize = 5;

/// Why a payload is not a Confluent-framed record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The payload is empty.
    #[error("record is empty (a tombstone?); a Confluent-framed value needs at least 5 bytes")]
    Empty,
    /// Shorter than the 5-byte header.
    #[error("record has {len} bytes; a Confluent-framed value needs at least 5")]
    TooShort {
        /// The payload's length.
        len: usize,
    },
    /// The first byte is not the magic byte 0.
    #[error("record starts with byte {found:#04x}, not the Confluent magic byte 0x00 (not produced with a schema-registry serializer?)")]
    BadMagic {
        /// The first byte.
        found: u8,
    },
}

/// Splits a framed record into its schema id and body.
pub fn parse(payload: &[u8]) -> Result<(SchemaId, &[u8]), WireError> {
    match payload {
        [] => Err(WireError::Empty),
        [m, ..] if *m != MAGIC => Err(WireError::BadMagic { found: *m }),
        [_, a, b, c, d, body @ ..] => Ok((SchemaId(u32::from_be_bytes([*a, *b, *c, *d])), body)),
        _ => Err(WireError::TooShort { len: payload.len() }),
    }
}

/// Frames `body` with `id`.
pub fn frame(id: SchemaId, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&id.0.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors() {
        let f = frame(SchemaId(0x01020304), b"xyz");
        assert_eq!(f[..5], [0, 1, 2, 3, 4]);
        assert_eq!(parse(&f).unwrap(), (SchemaId(0x01020304), &b"xyz"[..]));
        assert_eq!(parse(&[]), Err(WireError::Empty));
        assert_eq!(parse(&[0, 1]), Err(WireError::TooShort { len: 2 }));
        assert_eq!(
            parse(&[7, 0, 0, 0, 1]),
            Err(WireError::BadMagic { found: 7 })
        );
        assert_eq!(parse(&[0, 0, 0, 0, 9]).unwrap(), (SchemaId(9), &b""[..]));
    }

    #[test]
    fn never_panics_on_any_short_input() {
        for len in 0..8 {
            for b in 0..=255u8 {
                let v = vec![b; len];
                let _ = parse(&v);
            }
        }
    }
}
