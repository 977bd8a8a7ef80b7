//! The Protobuf wire format, read in place: varints, tags and the raw values of one message
//! level, and `google.protobuf.Struct`/`Value`/`ListValue` rendered as JSON text.
//!
//! Invariant: every read is bounds-checked and returns `Err` on truncated or malformed input;
//! nothing here panics on any byte string (unit-tested on every short input).

use serde_json::{Map, Value};

/// One field occurrence as it sits on the wire. Spans are offsets into the level's buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Raw {
    Varint(u64),
    Fixed32(u32),
    Fixed64(u64),
    Bytes(usize, usize),
}

impl Raw {
    pub(super) fn wire_name(&self) -> &'static str {
        match self {
            Raw::Varint(_) => "varint",
            Raw::Fixed32(_) => "fixed32",
            Raw::Fixed64(_) => "fixed64",
            Raw::Bytes(..) => "length-delimited",
        }
    }
}

pub(super) fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf
            .get(*pos)
            .ok_or_else(|| format!("the message ends inside a varint at byte {pos}"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(format!("a varint longer than 10 bytes ends at byte {pos}"))
}

fn fixed<const N: usize>(buf: &[u8], pos: &mut usize) -> Result<[u8; N], String> {
    let end = pos
        .checked_add(N)
        .filter(|e| *e <= buf.len())
        .ok_or_else(|| format!("the message ends inside a {N}-byte value at byte {pos}"))?;
    let out: [u8; N] = buf[*pos..end].try_into().expect("length checked");
    *pos = end;
    Ok(out)
}

/// Reads the next field: its number and raw value. Groups (deprecated) are skipped whole and
/// come back as `None`.
pub(super) fn next_field(buf: &[u8], pos: &mut usize) -> Result<(u32, Option<Raw>), String> {
    let key = varint(buf, pos)?;
    let number =
        u32::try_from(key >> 3).map_err(|_| format!("field number {} is too large", key >> 3))?;
    if number == 0 {
        return Err(format!(
            "field number 0 at byte {pos} (not a Protobuf message?)"
        ));
    }
    let raw = match key & 7 {
        0 => Raw::Varint(varint(buf, pos)?),
        1 => Raw::Fixed64(u64::from_le_bytes(fixed::<8>(buf, pos)?)),
        2 => {
            let len = varint(buf, pos)?;
            let start = *pos;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|e| *e <= buf.len())
                .ok_or_else(|| {
                    format!("field {number}: a {len}-byte value at byte {start} runs past the message end")
                })?;
            *pos = end;
            Raw::Bytes(start, end)
        }
        5 => Raw::Fixed32(u32::from_le_bytes(fixed::<4>(buf, pos)?)),
        3 => {
            skip_group(buf, pos, number, 0)?;
            return Ok((number, None));
        }
        w => return Err(format!("field {number}: wire type {w} is not valid here")),
    };
    Ok((number, Some(raw)))
}

fn skip_group(buf: &[u8], pos: &mut usize, number: u32, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err("groups nest deeper than 64 levels".into());
    }
    loop {
        if *pos >= buf.len() {
            return Err(format!("group {number} is not closed"));
        }
        let key = varint(buf, pos)?;
        match key & 7 {
            4 if key >> 3 == u64::from(number) => return Ok(()),
            3 => skip_group(buf, pos, (key >> 3) as u32, depth + 1)?,
            0 => {
                varint(buf, pos)?;
            }
            1 => {
                fixed::<8>(buf, pos)?;
            }
            5 => {
                fixed::<4>(buf, pos)?;
            }
            2 => {
                let len = varint(buf, pos)? as usize;
                *pos = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or("a value inside a group runs past the message end")?;
            }
            w => return Err(format!("wire type {w} inside group {number}")),
        }
    }
}

/// `google.protobuf.Struct` (a JSON object) at `buf`, as JSON text.
pub(super) fn struct_json(buf: &[u8]) -> Result<String, String> {
    Ok(struct_value(buf, 0)?.to_string())
}

/// `google.protobuf.Value` as JSON text.
pub(super) fn value_json(buf: &[u8]) -> Result<String, String> {
    Ok(value(buf, 0)?.to_string())
}

/// `google.protobuf.ListValue` as JSON text.
pub(super) fn list_json(buf: &[u8]) -> Result<String, String> {
    Ok(list_value(buf, 0)?.to_string())
}

const MAX_JSON_DEPTH: usize = 100;

fn struct_value(buf: &[u8], depth: usize) -> Result<Value, String> {
    if depth > MAX_JSON_DEPTH {
        return Err("google.protobuf.Struct nests deeper than 100 levels".into());
    }
    let mut map = Map::new();
    let mut pos = 0;
    while pos < buf.len() {
        if let (1, Some(Raw::Bytes(s, e))) = next_field(buf, &mut pos)? {
            // map<string, Value> entry: key = 1, value = 2
            let entry = &buf[s..e];
            let (mut key, mut val) = (String::new(), Value::Null);
            let mut p = 0;
            while p < entry.len() {
                match next_field(entry, &mut p)? {
                    (1, Some(Raw::Bytes(s, e))) => key = utf8(&entry[s..e])?.to_string(),
                    (2, Some(Raw::Bytes(s, e))) => val = value(&entry[s..e], depth + 1)?,
                    _ => {}
                }
            }
            map.insert(key, val);
        }
    }
    Ok(Value::Object(map))
}

fn list_value(buf: &[u8], depth: usize) -> Result<Value, String> {
    if depth > MAX_JSON_DEPTH {
        return Err("google.protobuf.ListValue nests deeper than 100 levels".into());
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        if let (1, Some(Raw::Bytes(s, e))) = next_field(buf, &mut pos)? {
            out.push(value(&buf[s..e], depth + 1)?);
        }
    }
    Ok(Value::Array(out))
}

fn value(buf: &[u8], depth: usize) -> Result<Value, String> {
    let mut out = Value::Null;
    let mut pos = 0;
    while pos < buf.len() {
        out = match next_field(buf, &mut pos)? {
            (1, _) => Value::Null,
            (2, Some(Raw::Fixed64(b))) => serde_json::Number::from_f64(f64::from_bits(b))
                .map(Value::Number)
                .unwrap_or(Value::Null),
            (3, Some(Raw::Bytes(s, e))) => Value::String(utf8(&buf[s..e])?.to_string()),
            (4, Some(Raw::Varint(v))) => Value::Bool(v != 0),
            (5, Some(Raw::Bytes(s, e))) => struct_value(&buf[s..e], depth + 1)?,
            (6, Some(Raw::Bytes(s, e))) => list_value(&buf[s..e], depth + 1)?,
            _ => out,
        };
    }
    Ok(out)
}

pub(super) fn utf8(b: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(|e| format!("a string field is not UTF-8: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_every_wire_type_and_truncations() {
        // 1: varint 150, 2: "hi", 3: fixed32, 4: fixed64, 5: group { 1: 1 }
        let buf = [
            0x08, 0x96, 0x01, 0x12, 2, b'h', b'i', 0x1d, 1, 0, 0, 0, 0x21, 2, 0, 0, 0, 0, 0, 0, 0,
            0x2b, 0x08, 0x01, 0x2c,
        ];
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < buf.len() {
            got.push(next_field(&buf, &mut pos).unwrap());
        }
        assert_eq!(
            got,
            vec![
                (1, Some(Raw::Varint(150))),
                (2, Some(Raw::Bytes(5, 7))),
                (3, Some(Raw::Fixed32(1))),
                (4, Some(Raw::Fixed64(2))),
                (5, None),
            ]
        );
        for len in 0..buf.len() {
            let mut pos = 0;
            let mut r = Ok((0, None));
            while pos < len && r.is_ok() {
                r = next_field(&buf[..len], &mut pos);
            }
        }
        assert!(next_field(&[0x12, 5, 1], &mut 0).is_err());
        assert!(next_field(&[0x00], &mut 0).is_err(), "field 0");
        assert!(next_field(&[0x0f], &mut 0).is_err(), "wire type 7");
    }

    #[test]
    fn never_panics_on_short_inputs() {
        for a in 0..=255u8 {
            for b in [0u8, 1, 0x80, 0xff, 0x0a] {
                let buf = [a, b, a];
                let mut pos = 0;
                let _ = next_field(&buf, &mut pos);
                let _ = struct_json(&buf);
                let _ = value_json(&buf);
            }
        }
    }

    #[test]
    fn struct_values_render_as_json() {
        // Value{string_value: "x"} = 0x1a 1 'x'; entry{key:"k", value:...}
        let value = [0x1a, 1, b'x'];
        let mut entry = vec![0x0a, 1, b'k', 0x12, value.len() as u8];
        entry.extend_from_slice(&value);
        let mut st = vec![0x0a, entry.len() as u8];
        st.extend_from_slice(&entry);
        assert_eq!(struct_json(&st).unwrap(), r#"{"k":"x"}"#);
        let num = [0x11, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f]; // 1.5
        assert_eq!(value_json(&num).unwrap(), "1.5");
        assert_eq!(value_json(&[0x20, 1]).unwrap(), "true");
        assert_eq!(list_json(&[0x0a, 2, 0x20, 0]).unwrap(), "[false]");
    }
}
