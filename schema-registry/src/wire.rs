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

/// The longest message-index path accepted (a path deeper than any real nesting is corruption).
pub const MAX_MESSAGE_INDEXES: usize = 64;

/// Why a Protobuf body's message-index path cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the Protobuf message-index path after the schema id is malformed: {0} (not produced with Confluent's Protobuf serializer?)")]
pub struct IndexError(pub &'static str);

/// Splits a Confluent Protobuf body (what follows the 5-byte header) into its message-index path
/// and the message bytes. The path is a zigzag varint count followed by that many zigzag varint
/// indexes (top-level message, then nested ones); a count of 0 stands for `[0]`, the first
/// message of the file.
pub fn parse_message_indexes(body: &[u8]) -> Result<(Vec<i32>, &[u8]), IndexError> {
    let mut rest = body;
    let count = zigzag(&mut rest)?;
    if count == 0 {
        return Ok((vec![0], rest));
    }
    let count = usize::try_from(count)
        .ok()
        .filter(|n| *n <= MAX_MESSAGE_INDEXES)
        .ok_or(IndexError("the index count is negative or larger than 64"))?;
    let mut path = Vec::with_capacity(count);
    for _ in 0..count {
        let i = zigzag(&mut rest)?;
        path.push(i32::try_from(i).map_err(|_| IndexError("an index does not fit 32 bits"))?);
    }
    Ok((path, rest))
}

/// Writes the message-index path the way Confluent's serializers do (`[0]` as one zero byte).
pub fn message_indexes(path: &[i32]) -> Vec<u8> {
    let mut out = Vec::new();
    if path == [0] {
        out.push(0);
        return out;
    }
    put_zigzag(&mut out, path.len() as i64);
    for i in path {
        put_zigzag(&mut out, i64::from(*i));
    }
    out
}

fn zigzag(buf: &mut &[u8]) -> Result<i64, IndexError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf
            .split_first()
            .ok_or(IndexError("the body ends inside a varint"))?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
        }
    }
    Err(IndexError("a varint is longer than 10 bytes"))
}

fn put_zigzag(out: &mut Vec<u8>, v: i64) {
    let mut u = ((v << 1) ^ (v >> 63)) as u64;
    while u >= 0x80 {
        out.push((u as u8) | 0x80);
        u >>= 7;
    }
    out.push(u as u8);
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
    fn message_indexes_round_trip_and_refuse_garbage() {
        for path in [vec![0], vec![1], vec![0, 2], vec![3, 0, 1], vec![200]] {
            let mut body = message_indexes(&path);
            body.extend_from_slice(b"msg");
            assert_eq!(parse_message_indexes(&body).unwrap(), (path, &b"msg"[..]));
        }
        // Confluent writes [0] as one zero byte; [1] as count 1 (zigzag 2), index 1 (zigzag 2).
        assert_eq!(message_indexes(&[0]), vec![0]);
        assert_eq!(message_indexes(&[1]), vec![2, 2]);
        assert!(parse_message_indexes(&[]).is_err());
        assert!(parse_message_indexes(&[0x80]).is_err());
        assert!(parse_message_indexes(&[1]).is_err(), "negative count");
        assert!(parse_message_indexes(&[200, 1]).is_err(), "count over 64");
        assert!(parse_message_indexes(&[0xff; 12]).is_err());
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
