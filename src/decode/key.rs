//! Record keys decoded into a `_key` column: `string` (UTF-8), `json` (objects of a declared
//! `key_schema`, bare or in Kafka Connect's envelope) or `avro` (Confluent-framed, schemas from the registry's `<topic>-key`
//! subject). Upsert sinks read their key fields from `_key`.
//!
//! Invariant: keys travel with their rows as the raw `_kafka_key` metadata column (so every
//! decoder's replay, isolation and rejection keeps them aligned) and are checked one by one
//! before the value is decoded: a record whose key cannot be decoded is rejected (class `key`)
//! before it reaches the value decoder, so decoding a batch's keys cannot fail.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use schema_registry::{wire, RegistryClient};
use sinks::TopicPartition;

use super::connect_json::ConnectJsonDecoder;
use super::{AvroDecoder, DecodeError, JsonDecoder, Record};
use crate::config::MetadataConfig;

pub use crate::config::KeyFormat;

/// The column decoded keys land in.
pub const KEY_COLUMN: &str = "_key";

/// Checks and decodes one partition's keys.
pub struct KeyDecoder {
    format: KeyFormat,
    tp: TopicPartition,
    registry: RegistryClient,
    /// Parsed Avro key schemas by id, for checking single keys.
    avro_schemas: HashMap<u32, apache_avro::Schema>,
    /// Every record needs a key (upserts keyed by the message key; keys that carry their own
    /// schema): a null key is rejected, unless it is a Debezium truncate (which has none).
    required: bool,
    /// Values are JSON, so a keyless truncate can be told from a keyless row; with Avro values
    /// a null key passes, and the flush that meets it as a row fails naming the topic.
    json_values: bool,
    /// The type of the last keys decoded: a batch with no rows (what follows a TRUNCATE that
    /// ended its batch) gets an empty `_key` column of it.
    last_type: Option<DataType>,
}

impl std::fmt::Debug for KeyDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDecoder")
            .field("format", &self.format)
            .finish()
    }
}

const NO_META: MetadataConfig = MetadataConfig {
    topic: false,
    partition: false,
    offset: false,
    timestamp: false,
    key: false,
};

fn rec(offset: i64, key: &[u8]) -> Record {
    Record {
        offset,
        timestamp_ms: None,
        key: None,
        payload: Some(bytes::Bytes::copy_from_slice(key)),
        headers: Vec::new(),
    }
}

impl KeyDecoder {
    pub fn new(format: KeyFormat, tp: TopicPartition, registry: RegistryClient) -> Self {
        let required = matches!(format, KeyFormat::ConnectJson);
        Self {
            format,
            tp,
            registry,
            avro_schemas: HashMap::new(),
            required,
            json_values: true,
            last_type: None,
        }
    }

    /// Rejects records without a key (the key columns of an upsert come from it); with
    /// `json_values`, Debezium truncates (keyless by nature) are told apart and kept.
    pub fn require_keys(mut self, json_values: bool) -> Self {
        self.required = true;
        self.json_values = json_values;
        self
    }

    fn error(&self, offset: i64, reason: String, retryable: bool) -> DecodeError {
        DecodeError {
            tp: self.tp.clone(),
            offset,
            class: "key",
            reason: format!("the key cannot be decoded: {reason}"),
            schema_id: None,
            retryable,
        }
    }

    /// Checks that `key` (of a record whose value is `value`) decodes. A null key is valid (a
    /// null `_key`) unless keys are required.
    pub async fn check(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        offset: i64,
    ) -> Result<(), DecodeError> {
        let Some(key) = key else {
            let truncate = || value.is_some_and(is_debezium_truncate);
            return match self.required {
                false => Ok(()),
                true if !self.json_values || truncate() => Ok(()),
                true => Err(self.error(
                    offset,
                    format!(
                        "the record has no key, and the table's key columns come from it (an \
                         upsert without `key`, or keys that carry their schema); name them with \
                         `key = [..]` or `[sink.tables.\"{}\"]` `key`",
                        self.tp.topic
                    ),
                    false,
                )),
            };
        };
        match &self.format {
            KeyFormat::String => std::str::from_utf8(key)
                .map(|_| ())
                .map_err(|e| self.error(offset, format!("not UTF-8: {e}"), false)),
            KeyFormat::Json(schema) => {
                let mut d = JsonDecoder::new(
                    self.tp.clone(),
                    schema.clone(),
                    false,
                    in_connect_envelope(key),
                    NO_META,
                    1,
                );
                let (mut out, mut rejected) = (Vec::new(), Vec::new());
                d.push(rec(offset, key), &mut out, &mut rejected);
                d.finish(&mut out, &mut rejected);
                match rejected.pop() {
                    Some(r) => Err(self.error(offset, r.error.reason, false)),
                    None => Ok(()),
                }
            }
            KeyFormat::ConnectJson => {
                let mut d = ConnectJsonDecoder::new(self.tp.clone(), NO_META, 1);
                let (mut out, mut rejected) = (Vec::new(), Vec::new());
                if let Err(r) = d.push(rec(offset, key), &mut out, &mut rejected) {
                    return Err(self.error(offset, r.error.reason, false));
                }
                let _ = d.finish(&mut out, &mut rejected);
                match (rejected.pop(), out.first().map(|b| b.schema())) {
                    (Some(r), _) => Err(self.error(offset, r.error.reason, false)),
                    (None, Some(s)) if s.fields().is_empty() => {
                        Err(self.error(offset, "the key's schema has no fields".into(), false))
                    }
                    _ => Ok(()),
                }
            }
            KeyFormat::Avro => {
                let (id, mut body) =
                    wire::parse(key).map_err(|e| self.error(offset, e.to_string(), false))?;
                if !self.avro_schemas.contains_key(&id.0) {
                    let s = self.registry.schema(id).await.map_err(|e| {
                        self.error(offset, format!("schema id {id}: {e}"), e.is_retryable())
                    })?;
                    let parsed = apache_avro::Schema::parse_str(&s.schema)
                        .map_err(|e| self.error(offset, format!("schema id {id}: {e}"), false))?;
                    self.avro_schemas.insert(id.0, parsed);
                }
                let schema = &self.avro_schemas[&id.0];
                let value = apache_avro::from_avro_datum(schema, &mut body, None)
                    .map_err(|e| self.error(offset, format!("schema id {id}: {e}"), false))?;
                if !body.is_empty() {
                    return Err(self.error(
                        offset,
                        format!("{} bytes after the key", body.len()),
                        false,
                    ));
                }
                drop(value);
                Ok(())
            }
        }
    }

    /// Decodes a batch's checked keys into the `_key` column.
    pub async fn decode(&mut self, keys: &BinaryArray) -> Result<ArrayRef, String> {
        if keys.is_empty() {
            // Before any key of the partition (its first record a keyless TRUNCATE): a key of
            // no fields, which names no key column (the flush has no row to key).
            return Ok(match &self.last_type {
                Some(t) => arrow::array::new_empty_array(t),
                None => Arc::new(arrow::array::StructArray::new_empty_fields(0, None)),
            });
        }
        let decoded = self.decode_keys(keys).await?;
        self.last_type = Some(decoded.data_type().clone());
        Ok(decoded)
    }

    async fn decode_keys(&mut self, keys: &BinaryArray) -> Result<ArrayRef, String> {
        match &self.format {
            KeyFormat::String => {
                arrow::compute::cast(keys, &DataType::Utf8).map_err(|e| e.to_string())
            }
            KeyFormat::Json(schema) => {
                // Kafka Connect's JsonConverter wraps each key in its envelope (Debezium's
                // default); the key is its payload. A batch's keys are all wrapped or none.
                let mut present = keys.iter().flatten();
                let envelope = present.next().is_some_and(in_connect_envelope);
                if present.any(|k| in_connect_envelope(k) != envelope) {
                    return Err(
                        "the keys mix Kafka Connect envelopes and plain JSON objects".into(),
                    );
                }
                let mut d = JsonDecoder::new(
                    self.tp.clone(),
                    schema.clone(),
                    false,
                    envelope,
                    NO_META,
                    keys.len().max(1),
                );
                let (mut out, mut rejected) = (Vec::new(), Vec::new());
                for (i, k) in keys.iter().enumerate() {
                    d.push(rec(i as i64, k.unwrap_or(b"{}")), &mut out, &mut rejected);
                }
                d.finish(&mut out, &mut rejected);
                if let Some(r) = rejected.first() {
                    return Err(r.error.reason.clone());
                }
                with_nulls(struct_of(schema, &out)?, keys)
            }
            KeyFormat::ConnectJson => {
                // Every key was checked present (a null one cannot say its schema).
                let mut d = ConnectJsonDecoder::new(self.tp.clone(), NO_META, keys.len().max(1));
                let (mut out, mut rejected) = (Vec::new(), Vec::new());
                for (i, k) in keys.iter().enumerate() {
                    let k = k.ok_or("a record without a key")?;
                    d.push(rec(i as i64, k), &mut out, &mut rejected)
                        .map_err(|r| r.error.reason)?;
                }
                d.finish(&mut out, &mut rejected).map_err(|e| e.reason)?;
                if let Some(r) = rejected.first() {
                    return Err(r.error.reason.clone());
                }
                let schema = out.first().map(|b| b.schema()).ok_or("no keys")?;
                struct_of(&schema, &out)
            }
            KeyFormat::Avro => {
                let mut d = AvroDecoder::new(
                    self.tp.clone(),
                    self.registry.clone(),
                    NO_META,
                    keys.len().max(1),
                );
                let mut out = Vec::new();
                let mut placeholder = None;
                for (i, k) in keys.iter().enumerate() {
                    let k = match k {
                        Some(k) => {
                            placeholder.get_or_insert_with(|| k.to_vec());
                            k.to_vec()
                        }
                        // Null keys decode as any valid key, then are masked null.
                        None => match &placeholder {
                            Some(p) => p.clone(),
                            None => keys
                                .iter()
                                .flatten()
                                .next()
                                .map(<[u8]>::to_vec)
                                .unwrap_or_default(),
                        },
                    };
                    d.prepare(&rec(i as i64, &k)).await.map_err(|e| e.reason)?;
                    d.push(rec(i as i64, &k), &mut out)
                        .await
                        .map_err(|r| r.error.reason)?;
                }
                d.finish(&mut out).map_err(|e| e.reason)?;
                let schema = out.first().map(|b| b.schema()).ok_or("no keys")?;
                with_nulls(struct_of(&schema, &out)?, keys)
            }
        }
    }
}

/// Whether a JSON value is a Debezium truncate (`op: "t"`, bare or in Connect's envelope).
fn is_debezium_truncate(value: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(super::json::body(value)) else {
        return false;
    };
    let op = v
        .get("payload")
        .filter(|p| p.is_object())
        .unwrap_or(&v)
        .get("op");
    op.and_then(|o| o.as_str()) == Some("t")
}

/// Whether a JSON key is Kafka Connect's `{"schema": ..., "payload": ...}` (schema first, as
/// JsonConverter writes it).
fn in_connect_envelope(key: &[u8]) -> bool {
    let start = key
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    key[start..].starts_with(b"{\"schema\":")
}

fn struct_of(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<ArrayRef, String> {
    let all = concat_batches(schema, batches).map_err(|e| {
        format!("keys changed schema within one batch ({e}); flush more often or keep key schemas compatible")
    })?;
    Ok(Arc::new(arrow::array::StructArray::from(all)))
}

fn with_nulls(col: ArrayRef, keys: &BinaryArray) -> Result<ArrayRef, String> {
    if keys.null_count() == 0 {
        return Ok(col);
    }
    let s = col.as_struct();
    let arr = arrow::array::StructArray::try_new(
        s.fields().clone(),
        s.columns().to_vec(),
        keys.nulls().cloned(),
    )
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(arr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Int64Type, Schema};

    #[tokio::test]
    async fn connect_enveloped_json_keys_decode_their_payload() {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)]));
        let registry =
            RegistryClient::new(schema_registry::RegistryConfig::new("http://127.0.0.1:1"))
                .unwrap();
        let mut d = KeyDecoder::new(
            KeyFormat::Json(schema),
            TopicPartition::new("pg.shop.t", 0),
            registry,
        );
        // As Debezium writes them with JsonConverter (schemas.enable=true).
        let wrapped = br#"{"schema":{"type":"struct","fields":[{"type":"int64","optional":false,"field":"id"}],"optional":false,"name":"pg.shop.t.Key"},"payload":{"id":7}}"#;
        d.check(Some(wrapped), None, 0).await.unwrap();
        let keys = BinaryArray::from(vec![Some(&wrapped[..]), None, Some(&wrapped[..])]);
        let col = d.decode(&keys).await.unwrap();
        let ids = col
            .as_struct()
            .column(0)
            .as_primitive::<Int64Type>()
            .clone();
        assert_eq!(ids.iter().collect::<Vec<_>>(), [Some(7), None, Some(7)]);
        assert!(col.is_null(1), "a null key stays null");
        let bare = BinaryArray::from(vec![Some(&br#"{"id": 8}"#[..])]);
        let col = d.decode(&bare).await.unwrap();
        assert_eq!(
            col.as_struct()
                .column(0)
                .as_primitive::<Int64Type>()
                .value(0),
            8
        );
        let mixed = BinaryArray::from(vec![Some(&wrapped[..]), Some(&br#"{"id": 8}"#[..])]);
        assert!(d.decode(&mixed).await.unwrap_err().contains("mix"));
    }

    #[tokio::test]
    async fn keys_that_carry_their_schema_decode_without_one_declared() {
        let registry =
            RegistryClient::new(schema_registry::RegistryConfig::new("http://127.0.0.1:1"))
                .unwrap();
        let tp = TopicPartition::new("pg.shop.order_lines", 0);
        let mut d = KeyDecoder::new(KeyFormat::ConnectJson, tp.clone(), registry.clone());
        // A composite primary key, as Debezium writes it with JsonConverter.
        let key = |o: i64, l: i32| {
            format!(
                r#"{{"schema":{{"type":"struct","fields":[{{"type":"int64","optional":false,"field":"order_id"}},{{"type":"int32","optional":false,"field":"line_no"}}],"optional":false,"name":"k"}},"payload":{{"order_id":{o},"line_no":{l}}}}}"#
            )
        };
        let (a, b) = (key(7, 1), key(7, 2));
        d.check(Some(a.as_bytes()), None, 0).await.unwrap();
        let col = d
            .decode(&BinaryArray::from(vec![a.as_bytes(), b.as_bytes()]))
            .await
            .unwrap();
        let s = col.as_struct();
        assert_eq!(s.column_names(), ["order_id", "line_no"]);
        assert_eq!(
            s.column(1)
                .as_primitive::<arrow::datatypes::Int32Type>()
                .value(1),
            2
        );
        // A key without its schema cannot name the columns, nor can a missing key.
        let e = d
            .check(Some(br#"{"order_id": 7}"#), None, 3)
            .await
            .unwrap_err();
        assert_eq!((e.class, e.offset), ("key", 3));
        let row = br#"{"schema":{},"payload":{"op":"c","after":{"op":"t"}}}"#;
        let e = d.check(None, Some(row), 4).await.unwrap_err();
        assert!(e.reason.contains("has no key"), "{}", e.reason);
        assert!(e.reason.contains("pg.shop.order_lines"), "{}", e.reason);
        // A truncate has no key by nature.
        let truncate = br#"{"schema":{},"payload":{"op":"t","after":null}}"#;
        d.check(None, Some(truncate), 5).await.unwrap();
        // Avro keys may be null unless an upsert takes its key columns from them.
        let mut avro = KeyDecoder::new(KeyFormat::Avro, tp.clone(), registry.clone());
        avro.check(None, None, 5).await.unwrap();
        let mut keyed = KeyDecoder::new(KeyFormat::Avro, tp.clone(), registry.clone());
        keyed = keyed.require_keys(true);
        assert!(keyed.check(None, Some(row), 5).await.is_err());
        // Avro values cannot be told apart here: the flush checks them.
        let mut avro = KeyDecoder::new(KeyFormat::Avro, tp, registry).require_keys(false);
        avro.check(None, Some(b"\0\0\0\0\x01\x02"), 5)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn no_keys_after_a_truncate_decode_as_the_partition_s_key_type() {
        let registry =
            RegistryClient::new(schema_registry::RegistryConfig::new("http://127.0.0.1:1"))
                .unwrap();
        let tp = TopicPartition::new("pg.shop.order_lines", 0);
        let mut d = KeyDecoder::new(KeyFormat::ConnectJson, tp, registry);
        let key = br#"{"schema":{"type":"struct","fields":[{"type":"int64","optional":false,"field":"order_id"}],"optional":false,"name":"k"},"payload":{"order_id":7}}"#;
        let some = d.decode(&BinaryArray::from(vec![&key[..]])).await.unwrap();
        // A TRUNCATE last in a batch leaves no row after it: the batch still needs `_key`.
        let none = d
            .decode(&BinaryArray::from(Vec::<&[u8]>::new()))
            .await
            .unwrap();
        assert_eq!(none.len(), 0);
        assert_eq!(none.data_type(), some.data_type());
    }

    #[tokio::test]
    async fn no_keys_before_any_key_decode_as_a_key_of_no_fields() {
        let registry =
            RegistryClient::new(schema_registry::RegistryConfig::new("http://127.0.0.1:1"))
                .unwrap();
        let tp = TopicPartition::new("pg.shop.order_lines", 0);
        for format in [KeyFormat::ConnectJson, KeyFormat::Avro] {
            let mut d = KeyDecoder::new(format, tp.clone(), registry.clone());
            // A worker whose first record is a TRUNCATE (keyless): no key type is known yet.
            let none = d
                .decode(&BinaryArray::from(Vec::<&[u8]>::new()))
                .await
                .unwrap();
            assert_eq!(none.len(), 0);
            assert!(
                matches!(none.data_type(), DataType::Struct(f) if f.is_empty()),
                "{:?}",
                none.data_type()
            );
        }
    }
}
