//! A reproducible workload: order-line events in Avro, used by the demo, the benchmark and the
//! integration tests.
//!
//! Every field is a pure function of the event id, so a test can recompute the expected row for
//! any (partition, offset) it produced. The Avro encoding is done with `apache-avro`, an
//! implementation independent of the arrow-avro decoder under test.

use std::collections::HashMap;

use apache_avro::types::Value;
use apache_avro::{Decimal, Schema};
use serde_json::json;

/// The order-line schema: decimal, timestamp-millis, date, enum, nullable nested record, array
/// and map fields.
pub const ORDER_SCHEMA: &str = r#"{
  "type": "record", "name": "OrderLine", "namespace": "lakesink.demo",
  "fields": [
    {"name": "id", "type": "long"},
    {"name": "order_id", "type": "string"},
    {"name": "product", "type": "string"},
    {"name": "quantity", "type": "int"},
    {"name": "cost", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "ship_date", "type": {"type": "int", "logicalType": "date"}},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID", "SHIPPED", "CANCELLED"]}},
    {"name": "address", "type": ["null", {"type": "record", "name": "Address", "fields": [
        {"name": "street", "type": "string"},
        {"name": "city", "type": "string"},
        {"name": "country", "type": "string"}
    ]}], "default": null},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "attributes", "type": {"type": "map", "values": "string"}}
  ]
}"#;

const PRODUCTS: &[&str] = &[
    "espresso beans 1kg",
    "oat milk 6x1l",
    "paper filters",
    "burr grinder",
    "travel mug",
    "descaler",
];
const CITIES: &[(&str, &str)] = &[
    ("Berlin", "DE"),
    ("Lisbon", "PT"),
    ("Oslo", "NO"),
    ("Austin", "US"),
    ("Osaka", "JP"),
];
const STATUSES: &[&str] = &["NEW", "PAID", "SHIPPED", "CANCELLED"];
/// 2026-11-01T00:00:00Z
pub const BASE_TS_MS: i64 = 1_793_491_200_000;
const DAY_MS: i64 = 86_400_000;

/// One order line, as plain values.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub id: i64,
    pub order_id: String,
    pub product: &'static str,
    pub quantity: i32,
    /// Cost in cents (decimal(12,2)).
    pub cost_cents: i64,
    pub ts_ms: i64,
    pub ship_date_days: i32,
    pub status: u32,
    pub address: Option<(String, &'static str, &'static str)>,
    pub tags: Vec<String>,
    pub attributes: Vec<(String, String)>,
}

impl Order {
    /// The order with this id; spans four days of timestamps.
    pub fn generate(id: i64) -> Order {
        let h = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let ts_ms = BASE_TS_MS + (id % 4) * DAY_MS + (h % DAY_MS as u64) as i64;
        let address = (id % 5 != 0).then(|| {
            let (city, country) = CITIES[(h >> 8) as usize % CITIES.len()];
            (format!("{} Main St", 1 + (h >> 16) % 999), city, country)
        });
        Order {
            id,
            order_id: format!("o-{}", id / 3),
            product: PRODUCTS[(h >> 24) as usize % PRODUCTS.len()],
            quantity: 1 + (id % 5) as i32,
            cost_cents: -500 + ((h >> 32) % 1_000_000) as i64,
            ts_ms,
            ship_date_days: (ts_ms / DAY_MS) as i32 + 2,
            status: (id % 4) as u32,
            address,
            tags: (0..(id % 3)).map(|i| format!("tag{i}")).collect(),
            attributes: vec![
                (
                    "channel".into(),
                    if id % 2 == 0 { "web" } else { "app" }.into(),
                ),
                ("batch".into(), (id / 1000).to_string()),
            ],
        }
    }

    pub fn to_avro_value(&self) -> Value {
        let address = match &self.address {
            None => Value::Union(0, Box::new(Value::Null)),
            Some((street, city, country)) => Value::Union(
                1,
                Box::new(Value::Record(vec![
                    ("street".into(), Value::String(street.clone())),
                    ("city".into(), Value::String((*city).into())),
                    ("country".into(), Value::String((*country).into())),
                ])),
            ),
        };
        Value::Record(vec![
            ("id".into(), Value::Long(self.id)),
            ("order_id".into(), Value::String(self.order_id.clone())),
            ("product".into(), Value::String(self.product.into())),
            ("quantity".into(), Value::Int(self.quantity)),
            (
                "cost".into(),
                Value::Decimal(Decimal::from(minimal_be_bytes(self.cost_cents))),
            ),
            ("ts".into(), Value::TimestampMillis(self.ts_ms)),
            ("ship_date".into(), Value::Date(self.ship_date_days)),
            (
                "status".into(),
                Value::Enum(self.status, STATUSES[self.status as usize].into()),
            ),
            ("address".into(), address),
            (
                "tags".into(),
                Value::Array(self.tags.iter().map(|t| Value::String(t.clone())).collect()),
            ),
            (
                "attributes".into(),
                Value::Map(
                    self.attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect::<HashMap<_, _>>(),
                ),
            ),
        ])
    }

    /// The Avro body (without framing).
    pub fn encode(&self, schema: &Schema) -> Vec<u8> {
        apache_avro::to_avro_datum(schema, self.to_avro_value()).expect("order matches its schema")
    }

    /// The row as the independent readers in the tests print it (see `tests/py/read_table.py`).
    pub fn expected_json(&self) -> serde_json::Value {
        let cost = self.cost_string();
        let mut attrs: Vec<_> = self.attributes.clone();
        attrs.sort();
        json!({
            "id": self.id,
            "order_id": self.order_id,
            "product": self.product,
            "quantity": self.quantity,
            "cost": cost,
            "ts": self.ts_ms,
            "ship_date": self.ship_date_days,
            "status": STATUSES[self.status as usize],
            "city": self.address.as_ref().map(|a| a.1),
            "tags": self.tags,
            "attributes": attrs.into_iter().map(|(k, v)| vec![k, v]).collect::<Vec<_>>(),
        })
    }
}

/// The order line as a Protobuf schema (`lakesink bench --format protobuf`): the Avro schema's
/// fields, the decimal cost as cents, the date as days; `OrderLine` is the second message of the
/// file, so records carry a non-trivial message-index path.
pub const ORDER_PROTO: &str = r#"syntax = "proto3";
package lakesink.demo;
import "google/protobuf/timestamp.proto";
enum Status { NEW = 0; PAID = 1; SHIPPED = 2; CANCELLED = 3; }
message Address { string street = 1; string city = 2; string country = 3; }
message OrderLine {
  int64 id = 1;
  string order_id = 2;
  string product = 3;
  int32 quantity = 4;
  int64 cost_cents = 5;
  google.protobuf.Timestamp ts = 6;
  int32 ship_date = 7;
  Status status = 8;
  Address address = 9;
  repeated string tags = 10;
  map<string, string> attributes = 11;
}
"#;

/// The message-index path of `OrderLine` in [`ORDER_PROTO`].
pub const ORDER_PROTO_PATH: [i32; 1] = [1];

/// The `OrderLine` descriptor of [`ORDER_PROTO`].
pub fn order_proto() -> &'static prost_reflect::MessageDescriptor {
    static DESCRIPTOR: std::sync::OnceLock<prost_reflect::MessageDescriptor> =
        std::sync::OnceLock::new();
    DESCRIPTOR.get_or_init(|| {
        let c = schema_registry::protobuf::compile(ORDER_PROTO, &[]).expect("ORDER_PROTO compiles");
        schema_registry::protobuf::message_at(&c.file, &ORDER_PROTO_PATH).expect("OrderLine")
    })
}

impl Order {
    /// The Protobuf body of [`ORDER_PROTO`]'s `OrderLine` (without framing), encoded with
    /// prost-reflect, independently of the decoder under test.
    pub fn encode_protobuf(&self) -> Vec<u8> {
        use prost::Message as _;
        use prost_reflect::{DynamicMessage, MapKey, Value as V};
        let d = order_proto();
        let mut m = DynamicMessage::new(d.clone());
        m.set_field_by_name("id", V::I64(self.id));
        m.set_field_by_name("order_id", V::String(self.order_id.clone()));
        m.set_field_by_name("product", V::String(self.product.into()));
        m.set_field_by_name("quantity", V::I32(self.quantity));
        m.set_field_by_name("cost_cents", V::I64(self.cost_cents));
        let message = |name: &str| {
            let kind = d.get_field_by_name(name).expect("field").kind();
            DynamicMessage::new(kind.as_message().expect("a message").clone())
        };
        let mut ts = message("ts");
        ts.set_field_by_name("seconds", V::I64(self.ts_ms.div_euclid(1000)));
        ts.set_field_by_name(
            "nanos",
            V::I32((self.ts_ms.rem_euclid(1000) * 1_000_000) as i32),
        );
        m.set_field_by_name("ts", V::Message(ts));
        m.set_field_by_name("ship_date", V::I32(self.ship_date_days));
        m.set_field_by_name("status", V::EnumNumber(self.status as i32));
        if let Some((street, city, country)) = &self.address {
            let mut a = message("address");
            a.set_field_by_name("street", V::String(street.clone()));
            a.set_field_by_name("city", V::String((*city).into()));
            a.set_field_by_name("country", V::String((*country).into()));
            m.set_field_by_name("address", V::Message(a));
        }
        m.set_field_by_name(
            "tags",
            V::List(self.tags.iter().map(|t| V::String(t.clone())).collect()),
        );
        m.set_field_by_name(
            "attributes",
            V::Map(
                self.attributes
                    .iter()
                    .map(|(k, v)| (MapKey::String(k.clone()), V::String(v.clone())))
                    .collect(),
            ),
        );
        m.encode_to_vec()
    }
}

/// The declared schema of [`Order::json_line`] as a `schema = { ... }` TOML inline table (the
/// JSON decoder's config).
pub const ORDER_JSON_SCHEMA: &str = r#"{ id = "long", order_id = "string", product = "string", quantity = "int", cost = "decimal(12,2)", ts = "timestamp", ship_date = "date", status = "string", street = "string", city = "string", country = "string", channel = "string" }"#;

impl Order {
    /// The order as a flat JSON order line (~190 bytes, the shape kafka-delta-ingest's
    /// benchmarks use): decimal as a string, RFC 3339 timestamp, ISO date.
    pub fn json_line(&self) -> String {
        let ts = chrono::DateTime::from_timestamp_millis(self.ts_ms).expect("valid ts");
        let ship = chrono::NaiveDate::from_num_days_from_ce_opt(self.ship_date_days + 719_163)
            .expect("valid date");
        let (street, city, country) = match &self.address {
            Some((s, c, k)) => (json!(s), json!(c), json!(k)),
            None => (json!(null), json!(null), json!(null)),
        };
        json!({
            "id": self.id,
            "order_id": self.order_id,
            "product": self.product,
            "quantity": self.quantity,
            "cost": self.cost_string(),
            "ts": ts.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            "ship_date": ship.format("%Y-%m-%d").to_string(),
            "status": STATUSES[self.status as usize],
            "street": street,
            "city": city,
            "country": country,
            "channel": self.attributes[0].1,
        })
        .to_string()
    }

    fn cost_string(&self) -> String {
        format!(
            "{}{}.{:02}",
            if self.cost_cents < 0 { "-" } else { "" },
            self.cost_cents.abs() / 100,
            self.cost_cents.abs() % 100
        )
    }
}

/// Two's-complement big-endian bytes of `v`, minimal length (Avro decimal on `bytes`).
fn minimal_be_bytes(v: i64) -> Vec<u8> {
    let b = v.to_be_bytes();
    let mut i = 0;
    while i < 7 && ((b[i] == 0 && b[i + 1] & 0x80 == 0) || (b[i] == 0xff && b[i + 1] & 0x80 != 0)) {
        i += 1;
    }
    b[i..].to_vec()
}

/// Parses [`ORDER_SCHEMA`].
pub fn order_schema() -> Schema {
    Schema::parse_str(ORDER_SCHEMA).expect("valid order schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_order_lines() {
        let o = Order::generate(12_345);
        let line = o.json_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], 12_345);
        assert_eq!(v["cost"], o.expected_json()["cost"]);
        let ts = chrono::DateTime::parse_from_rfc3339(v["ts"].as_str().unwrap()).unwrap();
        assert_eq!(ts.timestamp_millis(), o.ts_ms);
        let ship = chrono::NaiveDate::parse_from_str(v["ship_date"].as_str().unwrap(), "%Y-%m-%d")
            .unwrap();
        assert_eq!(
            (ship - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days(),
            o.ship_date_days as i64
        );
        assert!(
            (150..=230).contains(&line.len()),
            "{} bytes: {line}",
            line.len()
        );
    }

    #[test]
    fn decimal_bytes_are_minimal_twos_complement() {
        assert_eq!(minimal_be_bytes(0), vec![0]);
        assert_eq!(minimal_be_bytes(127), vec![127]);
        assert_eq!(minimal_be_bytes(128), vec![0, 128]);
        assert_eq!(minimal_be_bytes(-1), vec![0xff]);
        assert_eq!(minimal_be_bytes(-129), vec![0xff, 0x7f]);
    }

    #[test]
    fn orders_encode_and_are_deterministic() {
        let s = order_schema();
        assert_eq!(Order::generate(42), Order::generate(42));
        assert!(!Order::generate(42).encode(&s).is_empty());
        assert!(Order::generate(5).address.is_none());
    }
}
