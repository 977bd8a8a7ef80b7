//! Hive-style output partitioning (`<col>=<value>/...`) computed from row values.
//!
//! Specs: a top-level column name (`country`), `day(ts)` / `hour(ts)` of a timestamp or date
//! column (written as `day=2026-11-21`, `hour=2026-11-21-13`, in UTC), and the Kafka metadata
//! column `_kafka_partition`. Field-valued partition columns are removed from the files, as Hive,
//! Spark and Delta do; readers rebuild them from the path.
//!
//! Invariant: every path segment produced here is escaped so that a data value can never escape
//! the table root or add path levels (`/`, `..`, `=`, `%`, control characters are escaped;
//! null and empty values become `__HIVE_DEFAULT_PARTITION__`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Datelike, Timelike};

use crate::{Error, Result, TopicPartition};

/// The value Hive uses for a null partition value.
pub const HIVE_NULL: &str = "__HIVE_DEFAULT_PARTITION__";

/// One `partition_by` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionSpec {
    /// The value of a column; the column is removed from the data files.
    Field(String),
    /// `day(col)`: the UTC date of a timestamp or date column, as `day=YYYY-MM-DD`.
    Day(String),
    /// `hour(col)`: the UTC hour of a timestamp column, as `hour=YYYY-MM-DD-HH`.
    Hour(String),
}

impl PartitionSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let s = spec.trim();
        let bad = |reason: &str| Error::PartitionSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let func = |name: &str| -> Option<String> {
            s.strip_prefix(name)?
                .strip_prefix('(')?
                .strip_suffix(')')
                .map(|c| c.trim().to_string())
        };
        let parsed = if let Some(col) = func("day") {
            PartitionSpec::Day(col)
        } else if let Some(col) = func("hour") {
            PartitionSpec::Hour(col)
        } else if s.contains('(') || s.contains(')') {
            return Err(bad(
                "unknown function; use a column name, day(col) or hour(col)",
            ));
        } else {
            PartitionSpec::Field(s.to_string())
        };
        let col = parsed.column();
        if col.is_empty()
            || !col
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(bad(
                "the column must be a top-level field name (letters, digits, `_`, `-`)",
            ));
        }
        Ok(parsed)
    }

    /// The source column.
    pub fn column(&self) -> &str {
        match self {
            PartitionSpec::Field(c) | PartitionSpec::Day(c) | PartitionSpec::Hour(c) => c,
        }
    }

    /// The Hive partition column name.
    pub fn name(&self) -> &str {
        match self {
            PartitionSpec::Field(c) => c,
            PartitionSpec::Day(_) => "day",
            PartitionSpec::Hour(_) => "hour",
        }
    }
}

/// Splits `batch` into one batch per output partition, keyed by the relative Hive directory
/// (`""` when `specs` is empty). Field partition columns are dropped from the output batches.
pub fn split(
    batch: &RecordBatch,
    specs: &[PartitionSpec],
    tp: &TopicPartition,
) -> Result<Vec<(String, RecordBatch)>> {
    if specs.is_empty() {
        return Ok(vec![(String::new(), batch.clone())]);
    }
    let mut columns = Vec::with_capacity(specs.len());
    for spec in specs {
        let value_err = |reason: String| Error::PartitionValue {
            spec: format!("{spec:?}"),
            tp: tp.clone(),
            reason,
        };
        let col = batch
            .column_by_name(spec.column())
            .ok_or_else(|| value_err(format!("no column `{}` in the data", spec.column())))?;
        columns.push(segment_values(spec, col).map_err(value_err)?);
    }
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut key = String::new();
    for row in 0..batch.num_rows() {
        key.clear();
        for (spec, values) in specs.iter().zip(&columns) {
            if !key.is_empty() {
                key.push('/');
            }
            key.push_str(&escape(spec.name()));
            key.push('=');
            match &values[row] {
                Some(v) => key.push_str(&escape(v)),
                None => key.push_str(HIVE_NULL),
            }
        }
        groups.entry(key.clone()).or_default().push(row as u32);
    }
    let dropped: Vec<&str> = specs
        .iter()
        .filter_map(|s| match s {
            PartitionSpec::Field(c) => Some(c.as_str()),
            _ => None,
        })
        .collect();
    let keep: Vec<usize> = batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| !dropped.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    let projected = batch.project(&keep).map_err(|e| Error::PartitionValue {
        spec: "partition_by".into(),
        tp: tp.clone(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(groups.len());
    if groups.len() == 1 {
        let (k, _) = groups.into_iter().next().expect("one group");
        out.push((k, projected));
        return Ok(out);
    }
    for (k, rows) in groups {
        let idx = UInt32Array::from(rows);
        let part = take_record_batch(&projected, &idx).map_err(|e| Error::PartitionValue {
            spec: k.clone(),
            tp: tp.clone(),
            reason: e.to_string(),
        })?;
        out.push((k, part));
    }
    Ok(out)
}

/// The Hive path value of each row for `spec`, computed from its source column `col` (`None` for
/// null).
pub(crate) fn segment_values(
    spec: &PartitionSpec,
    col: &ArrayRef,
) -> Result<Vec<Option<String>>, String> {
    match spec {
        PartitionSpec::Field(_) => {
            if !col.data_type().is_primitive()
                && !matches!(
                    col.data_type(),
                    DataType::Utf8
                        | DataType::LargeUtf8
                        | DataType::Utf8View
                        | DataType::Boolean
                        | DataType::Dictionary(_, _)
                )
            {
                return Err(format!(
                    "a {} column cannot partition a table; use a scalar column",
                    col.data_type()
                ));
            }
            let strings = cast(col, &DataType::Utf8).map_err(|e| e.to_string())?;
            let strings = strings.as_string::<i32>();
            Ok((0..strings.len())
                .map(|i| (!strings.is_null(i)).then(|| strings.value(i).to_string()))
                .collect())
        }
        PartitionSpec::Day(_) | PartitionSpec::Hour(_) => {
            let hourly = matches!(spec, PartitionSpec::Hour(_));
            let ms = match col.data_type() {
                DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => {
                    cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None))
                        .map_err(|e| e.to_string())?
                }
                other => {
                    return Err(format!(
                        "day()/hour() need a timestamp or date column, found {other}"
                    ))
                }
            };
            let ms = ms.as_primitive::<TimestampMillisecondType>();
            let mut out = Vec::with_capacity(ms.len());
            for i in 0..ms.len() {
                if ms.is_null(i) {
                    out.push(None);
                    continue;
                }
                let t = DateTime::from_timestamp_millis(ms.value(i))
                    .ok_or_else(|| format!("timestamp {} ms is out of range", ms.value(i)))?;
                let mut s = String::with_capacity(13);
                let _ = write!(s, "{:04}-{:02}-{:02}", t.year(), t.month(), t.day());
                if hourly {
                    let _ = write!(s, "-{:02}", t.hour());
                }
                out.push(Some(s));
            }
            Ok(out)
        }
    }
}

/// Escapes a value for use as one Hive path segment (the escaping Hive itself uses, plus `.`
/// when the whole value is `.` or `..`).
pub fn escape(value: &str) -> String {
    if value.is_empty() {
        return HIVE_NULL.to_string();
    }
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let needs = c.is_control()
            || matches!(
                c,
                '"' | '#'
                    | '%'
                    | '\''
                    | '*'
                    | '/'
                    | ':'
                    | '='
                    | '?'
                    | '\\'
                    | '\x7f'
                    | '{'
                    | '['
                    | ']'
                    | '^'
            );
        if needs {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    if out == "." || out == ".." {
        return out.replace('.', "%2E");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    #[test]
    fn parses_specs() {
        assert_eq!(
            PartitionSpec::parse("day(ts)").unwrap(),
            PartitionSpec::Day("ts".into())
        );
        assert_eq!(
            PartitionSpec::parse("country").unwrap(),
            PartitionSpec::Field("country".into())
        );
        assert!(PartitionSpec::parse("month(ts)").is_err());
        assert!(PartitionSpec::parse("a/b").is_err());
    }

    #[test]
    fn escaping_never_leaves_the_segment() {
        for v in ["..", ".", "a/b", "../../etc", "x=y", "%2F", "a\nb", "/abs"] {
            let e = escape(v);
            assert!(!e.contains('/'), "{v} -> {e}");
            assert!(e != "." && e != "..", "{v} -> {e}");
            assert!(!e.contains('='), "{v} -> {e}");
        }
        assert_eq!(escape(""), HIVE_NULL);
        assert_eq!(escape("DE"), "DE");
    }

    #[test]
    fn splits_by_day_and_field_and_drops_field_columns() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("country", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
                false,
            ),
        ]));
        let day = 86_400_000;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("DE"), None, Some("DE")])),
                Arc::new(
                    TimestampMillisecondArray::from(vec![0, day + 3_600_000, 1])
                        .with_timezone("+00:00"),
                ),
            ],
        )
        .unwrap();
        let specs = [
            PartitionSpec::parse("day(ts)").unwrap(),
            PartitionSpec::parse("country").unwrap(),
        ];
        let parts = split(&batch, &specs, &TopicPartition::new("t", 0)).unwrap();
        let keys: Vec<_> = parts
            .iter()
            .map(|(k, b)| (k.as_str(), b.num_rows()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("day=1970-01-01/country=DE", 2),
                ("day=1970-01-02/country=__HIVE_DEFAULT_PARTITION__", 1)
            ]
        );
        assert!(parts[0].1.column_by_name("country").is_none());
        assert!(parts[0].1.column_by_name("ts").is_some());
    }
}
