use super::*;
use arrow::datatypes::{Field, Schema};

fn schema() -> SchemaRef {
    let ts = |u| DataType::Timestamp(u, Some("+00:00".into()));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("qty", DataType::Int32, true),
        Field::new("price", DataType::Decimal128(12, 2), true),
        Field::new("ratio", DataType::Float64, true),
        Field::new("small", DataType::Float32, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("ok", DataType::Boolean, true),
        Field::new("day", DataType::Date32, true),
        Field::new("at", ts(TimeUnit::Microsecond), true),
        Field::new("at_ms", ts(TimeUnit::Millisecond), true),
        Field::new(
            "inner",
            DataType::Struct(
                vec![
                    Field::new("a", DataType::Int64, true),
                    Field::new("b", DataType::Utf8, false),
                ]
                .into(),
            ),
            true,
        ),
        Field::new("req", DataType::Utf8, false),
    ]))
}

fn records(lines: &[&str]) -> Vec<Record> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| Record {
            offset: i as i64,
            timestamp_ms: None,
            key: None,
            payload: Some(bytes::Bytes::copy_from_slice(l.as_bytes())),
            headers: vec![],
        })
        .collect()
}

/// What arrow-json makes of the batch: `None` if it rejects any record.
fn reference(schema: &SchemaRef, recs: &[Record]) -> Option<RecordBatch> {
    let mut d = super::super::json::build(schema, recs.len());
    for r in recs {
        super::super::json::decode_one(&mut d, r).ok()?;
    }
    d.flush().ok()?
}

const GOOD: &[&str] = &[
    r#"{"id": 1, "qty": 2, "price": "12.34", "ratio": 0.5, "small": 1.25, "name": "plain",
        "ok": true, "day": "2026-11-21", "at": "2026-11-21T10:00:00.123456Z",
        "at_ms": "2026-11-21T10:00:00.123Z", "inner": {"a": 7, "b": "x"}, "req": "r"}"#,
    // Fields in another order, some missing, unknown fields of every kind skipped.
    r#"{"req":"r2","extra":{"deep":[1,2,{"x":"y\"z"}],"n":null},"name":"esc \" \\ \/ \b\f\n\r\t",
        "id":-9223372036854775808,"list":[],"obj":{},"t":true,"f":false,"num":-1.5e-3}"#,
    // Numbers where strings are allowed and the reverse.
    r#"{"id": "42", "qty": "-7", "price": 5, "ratio": "2.5", "small": "-0.75", "day": 20000,
        "at": 1700000000000000, "at_ms": -5, "req": "", "ok": false, "inner": null}"#,
    // Unicode: raw, escaped, and a surrogate pair; exponents; a decimal with an exponent.
    r#"{"name": "caf\u00e9 \u20ac \ud83d\ude00 raw: ü €", "ratio": 1E+2, "small": 3e-1,
        "price": -0.5, "req": "\u0041", "inner": {"b": "only b"}}"#,
    // Timestamps with offsets and without a time zone; nulls everywhere nullable.
    r#"{"at": "2026-11-21 10:00:00+02:00", "at_ms": "2026-11-21T10:00:00", "day": null,
        "id": null, "qty": null, "price": null, "ratio": null, "small": null, "name": null,
        "ok": null, "inner": {"a": null, "b": "b"}, "req": "x"}"#,
    "  \n{\"req\":\"ws\"}\t\r\n ",
    r#"{"req": "zero", "id": 0, "qty": -0, "ratio": -0.0, "price": "0.00"}"#,
    r#"{"req": "rounded", "price": "12.345", "ratio": 5e-324}"#,
    r#"{"req": "prefix", "price": "9999999999.99", "qty": 2147483647, "ratio": 1.7976931348623157e308}"#,
];

#[test]
fn well_formed_batches_decode_as_arrow_json_decodes_them() {
    let schema = schema();
    let mut plan = Plan::new(&schema).expect("every type in the schema is supported");
    let recs = records(GOOD);
    let want = reference(&schema, &recs).expect("arrow-json accepts the good records");
    let got = plan
        .decode(&recs)
        .expect("the single-pass decoder accepts them too");
    assert_eq!(got, want);
    for (i, rec) in recs.iter().enumerate() {
        let one = std::slice::from_ref(rec);
        assert_eq!(plan.decode(one), reference(&schema, one), "record {i}");
    }
}

#[test]
fn anything_questionable_is_left_to_arrow_json() {
    let schema = schema();
    let mut plan = Plan::new(&schema).unwrap();
    let odd = [
        // Not one JSON object.
        "",
        "   ",
        "null",
        "[1]",
        r#""s""#,
        r#"{"req":"a"}{"req":"b"}"#,
        r#"{"req":"a"} x"#,
        // Malformed.
        r#"{"req":"a""#,
        r#"{"req":"a",}"#,
        r#"{"req" "a"}"#,
        r#"{"req":"a" "id":1}"#,
        r#"{"req":"a","id":01}"#,
        r#"{"req":"a","id":1.}"#,
        r#"{"req":"a","id":-}"#,
        r#"{"req":"a","ratio":.5}"#,
        r#"{"req":"a","x":[1,]}"#,
        r#"{"req":"a","x":tru}"#,
        "{\"req\":\"a\tb\"}",
        r#"{"req":"\x"}"#,
        r#"{"req":"\u12"}"#,
        r#"{"req":"\ud83d"}"#,
        r#"{"req":"\ude00\ud83d"}"#,
        r#"{"req":"\ud83d\u0041"}"#,
        // Valid JSON that does not fit, or that arrow-json reads its own way.
        r#"{"id":1}"#,
        r#"{"req":null}"#,
        r#"{"req":1}"#,
        r#"{"req":"a","req":"b"}"#,
        r#"{"req":"a","id":1.5}"#,
        r#"{"req":"a","id":1e3}"#,
        r#"{"req":"a","id":9223372036854775808}"#,
        r#"{"req":"a","qty":2147483648}"#,
        r#"{"req":"a","id":"x"}"#,
        r#"{"req":"a","id":true}"#,
        r#"{"req":"a","ok":"true"}"#,
        r#"{"req":"a","ok":1}"#,
        r#"{"req":"a","name":5}"#,
        r#"{"req":"a","price":"1e99"}"#,
        r#"{"req":"a","ratio":1e999}"#,
        r#"{"req":"a","at":"yesterday"}"#,
        r#"{"req":"a","at":1.5}"#,
        r#"{"req":"a","day":"2026-13-01"}"#,
        r#"{"req":"a","inner":{"a":1}}"#,
        r#"{"req":"a","inner":[]}"#,
        r#"{"req":"a","inner":5}"#,
        r#"{"req":"a","\u0069d":1}"#,
    ];
    let good = records(&GOOD[..1]);
    let mut taken = 0;
    for (i, line) in odd.iter().enumerate() {
        let mut batch = good.clone();
        batch.extend(records(&[line]));
        let want = reference(&schema, &batch);
        if let Some(got) = plan.decode(&batch) {
            taken += 1;
            assert_eq!(Some(got), want, "case {i}: {line}");
        }
    }
    // Every case above is rejected by arrow-json or decoded in a way left to it.
    assert_eq!(taken, 0);
}

/// Random edits of well-formed records: whatever the single-pass decoder accepts, arrow-json
/// accepts too and decodes to the same values.
#[test]
fn mutated_records_never_decode_differently() {
    use rand::{Rng, SeedableRng};
    let schema = schema();
    let mut plan = Plan::new(&schema).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261123);
    let alphabet = b"{}[],:\"\\/0123456789-+.eEnulltruefalse \t\nabu";
    let (mut accepted, mut total) = (0, 0);
    for _ in 0..20_000 {
        let mut line = GOOD[rng.random_range(0..GOOD.len())].as_bytes().to_vec();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..line.len());
            match rng.random_range(0..3) {
                0 => {
                    line.remove(at);
                }
                1 => line.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                _ => line[at] = alphabet[rng.random_range(0..alphabet.len())],
            }
        }
        let rec = Record {
            offset: 0,
            timestamp_ms: None,
            key: None,
            payload: Some(bytes::Bytes::from(line.clone())),
            headers: vec![],
        };
        let one = std::slice::from_ref(&rec);
        total += 1;
        if let Some(got) = plan.decode(one) {
            accepted += 1;
            assert_eq!(
                Some(got),
                reference(&schema, one),
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
    }
    // Edits inside strings and whitespace keep many records valid: the comparison is real.
    assert!(accepted > total / 20, "{accepted} of {total} accepted");
}

/// A string column reserves what the previous batch needed (an eighth more), not a guess
/// that doubles and copies its way up: capacity is what the memory budget counts.
#[test]
fn string_buffers_are_sized_from_the_previous_batch() {
    let schema = schema();
    let mut plan = Plan::new(&schema).unwrap();
    let name = "n".repeat(40);
    let lines: Vec<String> = (0..1024)
        .map(|i| format!(r#"{{"req":"r{i}","name":"{name}"}}"#))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let recs = records(&lines);
    let values = |b: &RecordBatch| {
        let a = b.column_by_name("name").unwrap();
        let s = a
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        (s.values().len(), s.values().capacity())
    };
    // The first batch guesses 16 bytes a row and grows by doubling: 64 KiB for 40 KiB.
    let (len, first) = values(&plan.decode(&recs).unwrap());
    assert_eq!(len, 40 * 1024);
    assert!(first >= 64 << 10, "{first}");
    let (len, next) = values(&plan.decode(&recs).unwrap());
    assert_eq!(len, 40 * 1024);
    assert!(
        next >= len && next <= len * 9 / 8 + 1024 + 64,
        "{next} for {len}"
    );
    assert_eq!(plan.decode(&recs[..1]).unwrap().num_rows(), 1);
}

/// The word-at-a-time scan stops exactly where the byte-at-a-time one would, whatever the
/// byte and its position in the word, next to multi-byte UTF-8.
#[test]
fn string_scan_stops_at_the_first_special_byte() {
    let mut specials: Vec<u8> = (0..0x20).collect();
    specials.extend([b'"', b'\\']);
    for fill in ["a", "é", "€", "\u{7f}"] {
        for at in 0..20 {
            for &c in &specials {
                let mut text = fill.repeat(at).into_bytes();
                let stop = text.len();
                text.push(c);
                text.extend_from_slice("z\"".repeat(9).as_bytes());
                let s = String::from_utf8(text.clone()).unwrap();
                let mut cur = Cur {
                    s: &s,
                    b: &text,
                    i: 0,
                };
                cur.plain();
                assert_eq!(cur.i, stop, "{fill:?} x {at}, then {c:#x}");
            }
        }
        let s = fill.repeat(13);
        let mut cur = Cur {
            s: &s,
            b: s.as_bytes(),
            i: 0,
        };
        cur.plain();
        assert_eq!(cur.i, s.len(), "no special byte: to the end");
    }
    assert!(same(b"order_identifier", b"order_identifier"));
    assert!(!same(b"order_identifies", b"order_identifier"));
    assert!(!same(b"order_id", b"order_ix"));
    assert!(!same(b"id", b"idx"));
}

#[test]
fn schemas_with_other_types_always_use_arrow_json() {
    let list = Arc::new(Schema::new(vec![Field::new(
        "l",
        DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
        true,
    )]));
    assert!(Plan::new(&list).is_none());
    let naive = Arc::new(Schema::new(vec![Field::new(
        "t",
        DataType::Timestamp(TimeUnit::Microsecond, None),
        true,
    )]));
    assert!(Plan::new(&naive).is_none());
}
