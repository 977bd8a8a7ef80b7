//! JSON records described by JSON Schemas in the registry (Confluent-framed, `schemaType`
//! JSON): each schema id is fetched once, converted to an Arrow schema, and records are decoded
//! with the JSON decoder for that schema.
//!
//! Conversion: `string` → Utf8 (`format: date-time` → timestamp µs UTC, `format: date` →
//! Date32), `integer` → Int64, `number` → Float64, `boolean` → Boolean, `object` with
//! `properties` → Struct, `array` with `items` → List; `["null", T]` → T. Every column is
//! nullable (JSON Schema's `required` is validated by the producer's serializer, not here).
//! A schema id that changes the Arrow schema commits what precedes it first (one schema per
//! file); ids that map to the same Arrow schema share files.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use schema_registry::{wire, RegistryClient};
use serde_json::Value;
use sinks::TopicPartition;

use super::{DecodeError, JsonDecoder, Record, Rejected};
use crate::config::MetadataConfig;

/// Converts a JSON Schema (object at the top) into an Arrow schema.
pub fn to_arrow(schema: &Value) -> Result<SchemaRef, String> {
    match convert(schema, "")? {
        DataType::Struct(fields) => Ok(Arc::new(Schema::new(fields))),
        other => Err(format!("the top level must be an object, found {other}")),
    }
}

fn convert(v: &Value, path: &str) -> Result<DataType, String> {
    let at = |m: &str| format!("{m} at `{}`", if path.is_empty() { "/" } else { path });
    let ty = match v.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => {
            let non_null: Vec<&str> = ts
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect();
            match non_null.as_slice() {
                [one] => one.to_string(),
                _ => return Err(at("a union of several non-null types is not supported")),
            }
        }
        None if v.get("properties").is_some() => "object".into(),
        _ => {
            return Err(at(
                "a schema without a `type` (or with $ref / oneOf) is not supported",
            ))
        }
    };
    Ok(match ty.as_str() {
        "string" => match v.get("format").and_then(Value::as_str) {
            Some("date-time") => DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            Some("date") => DataType::Date32,
            _ => DataType::Utf8,
        },
        "integer" => DataType::Int64,
        "number" => DataType::Float64,
        "boolean" => DataType::Boolean,
        "object" => {
            let props = v
                .get("properties")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    at("an object without `properties` (a free-form map) is not supported")
                })?;
            let mut fields = Vec::with_capacity(props.len());
            for (name, p) in props {
                let dt = convert(p, &format!("{path}/{name}"))?;
                fields.push(Field::new(name, dt, true));
            }
            DataType::Struct(Fields::from(fields))
        }
        "array" => {
            let items = v
                .get("items")
                .ok_or_else(|| at("an array without `items`"))?;
            DataType::List(Arc::new(Field::new(
                "item",
                convert(items, &format!("{path}[]"))?,
                true,
            )))
        }
        other => return Err(at(&format!("type `{other}` is not supported"))),
    })
}

/// Decodes Confluent-framed JSON with schemas from the registry.
pub struct RegistryJsonDecoder {
    tp: TopicPartition,
    registry: RegistryClient,
    metadata: MetadataConfig,
    batch_size: usize,
    /// Converted schemas by id (or why the id cannot be used).
    schemas: HashMap<u32, Result<SchemaRef, String>>,
    current: Option<(SchemaRef, JsonDecoder)>,
}

impl std::fmt::Debug for RegistryJsonDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryJsonDecoder")
            .field("tp", &self.tp)
            .finish()
    }
}

impl RegistryJsonDecoder {
    pub fn new(
        tp: TopicPartition,
        registry: RegistryClient,
        metadata: MetadataConfig,
        batch_size: usize,
    ) -> Self {
        Self {
            tp,
            registry,
            metadata,
            batch_size,
            schemas: HashMap::new(),
            current: None,
        }
    }

    pub fn pending_rows(&self) -> usize {
        self.current.as_ref().map_or(0, |(_, d)| d.pending_rows())
    }

    fn error(
        &self,
        rec: &Record,
        class: &'static str,
        id: Option<u32>,
        reason: String,
    ) -> DecodeError {
        DecodeError {
            tp: self.tp.clone(),
            offset: rec.offset,
            class,
            reason,
            schema_id: id,
            retryable: false,
        }
    }

    /// Fetches and converts the record's schema once; `true` when it changes the table schema.
    pub async fn prepare(&mut self, rec: &Record) -> Result<bool, DecodeError> {
        let Some(Ok((id, _))) = rec.payload.as_deref().map(wire::parse) else {
            return Ok(false);
        };
        if !self.schemas.contains_key(&id.0) {
            let converted = match self.registry.schema(id).await {
                Ok(s) if s.schema_type != "JSON" => {
                    Err(format!("schema id {id} is {}, not JSON", s.schema_type))
                }
                Ok(s) => serde_json::from_str::<Value>(&s.schema)
                    .map_err(|e| format!("schema id {id} is not JSON: {e}"))
                    .and_then(|v| to_arrow(&v).map_err(|e| format!("schema id {id}: {e}"))),
                Err(e) if e.is_retryable() => {
                    return Err(DecodeError {
                        tp: self.tp.clone(),
                        offset: rec.offset,
                        class: "registry",
                        reason: format!("cannot resolve schema id {id}: {e}"),
                        schema_id: Some(id.0),
                        retryable: true,
                    })
                }
                Err(e) => Err(format!("cannot resolve schema id {id}: {e}")),
            };
            self.schemas.insert(id.0, converted);
        }
        Ok(match (&self.schemas[&id.0], &self.current) {
            (Ok(new), Some((cur, _))) => new != cur,
            _ => false,
        })
    }

    pub async fn push(
        &mut self,
        rec: Record,
        out: &mut Vec<RecordBatch>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), Box<Rejected>> {
        let reject = |this: &Self, rec: Record, class, id, reason| {
            let error = this.error(&rec, class, id, reason);
            Err(Box::new(Rejected { error, record: rec }))
        };
        let id = match rec.payload.as_deref().map(wire::parse) {
            Some(Ok((id, _))) => id.0,
            Some(Err(e)) => return reject(self, rec, "wire-format", None, e.to_string()),
            None => {
                return reject(
                    self,
                    rec,
                    "wire-format",
                    None,
                    "the record has no value".into(),
                )
            }
        };
        if !self.schemas.contains_key(&id) {
            if let Err(e) = self.prepare(&rec).await {
                return Err(Box::new(Rejected {
                    error: e,
                    record: rec,
                }));
            }
        }
        let schema = match &self.schemas[&id] {
            Ok(s) => s.clone(),
            Err(e) => return reject(self, rec, "unknown-schema", Some(id), e.clone()),
        };
        // A decoder per schema id, so rejections name the id their record carries.
        if self
            .current
            .as_ref()
            .is_none_or(|(cur, d)| *cur != schema || d.schema_id() != Some(id))
        {
            if let Some((_, mut old)) = self.current.take() {
                old.finish(out, rejected);
            }
            let d = JsonDecoder::new(
                self.tp.clone(),
                schema.clone(),
                false,
                false,
                self.metadata,
                self.batch_size,
            )
            .with_schema_id(id);
            self.current = Some((schema, d));
        }
        let (_, d) = self
            .current
            .as_mut()
            .expect("a decoder for the current schema");
        d.push(rec, out, rejected);
        Ok(())
    }

    pub fn finish(&mut self, out: &mut Vec<RecordBatch>, rejected: &mut Vec<Rejected>) {
        if let Some((_, d)) = self.current.as_mut() {
            d.finish(out, rejected);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_json_schema_types() {
        let s = to_arrow(&json!({"type": "object", "properties": {
            "id": {"type": "integer"},
            "price": {"type": "number"},
            "at": {"type": "string", "format": "date-time"},
            "day": {"type": ["null", "string"], "format": "date"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}}
        }}))
        .unwrap();
        let names: Vec<_> = s
            .fields()
            .iter()
            .map(|f| format!("{}:{}", f.name(), f.data_type()))
            .collect();
        assert_eq!(names[0], "id:Int64");
        assert_eq!(names[1], "price:Float64");
        assert!(names[2].starts_with("at:Timestamp(µs"), "{names:?}");
        assert_eq!(names[3], "day:Date32");
        assert!(names[4].starts_with("tags:List("), "{names:?}");
        assert!(names[5].starts_with("address:Struct("), "{names:?}");
        assert!(to_arrow(&json!({"oneOf": []})).is_err());
    }
}
