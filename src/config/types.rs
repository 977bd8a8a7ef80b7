//! Column types as a config declares them (`schema`, `key_schema`): `long`, `decimal(10,2)`, ...

use arrow::datatypes::{DataType, TimeUnit};

/// Parses a declared column type: `boolean`, `int`, `long`, `float`, `double`, `string`,
/// `date`, `timestamp` (µs, UTC), `timestamp_ms` (ms, UTC), `decimal(p,s)`.
pub fn parse_type(t: &str) -> Result<DataType, String> {
    let t = t.trim().to_ascii_lowercase();
    Ok(match t.as_str() {
        "boolean" | "bool" => DataType::Boolean,
        "int" | "integer" => DataType::Int32,
        "long" | "bigint" => DataType::Int64,
        "float" => DataType::Float32,
        "double" => DataType::Float64,
        "string" => DataType::Utf8,
        "date" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
        "timestamp_ms" => DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
        d if d.starts_with("decimal(") && d.ends_with(')') => {
            let inner = &d["decimal(".len()..d.len() - 1];
            let (p, s) = inner
                .split_once(',')
                .ok_or_else(|| format!("`{t}`: write decimal(precision, scale)"))?;
            let p: u8 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{t}`: bad precision"))?;
            let s: i8 = s.trim().parse().map_err(|_| format!("`{t}`: bad scale"))?;
            if p == 0 || p > 76 || s < 0 || s as u8 > p {
                return Err(format!(
                    "`{t}`: precision must be 1..=76 and 0 <= scale <= precision"
                ));
            }
            if p <= 38 {
                DataType::Decimal128(p, s)
            } else {
                DataType::Decimal256(p, s)
            }
        }
        other => {
            return Err(format!(
                "unknown type `{other}`; use boolean, int, long, float, double, string, date, \
                 timestamp, timestamp_ms or decimal(p,s)"
            ))
        }
    })
}
