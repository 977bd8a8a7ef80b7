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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

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
    /// Parses a `partition_by` entry: a column, `day(col)` or `hour(col)`.
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
        columns.push(col.clone());
    }
    // Group on cheap per-row codes (day/hour numbers, the value's text), then format each
    // group's Hive key once from its first row: no per-row strings.
    let codes = specs
        .iter()
        .zip(&columns)
        .map(|(spec, col)| bucket_codes(spec, col))
        .collect::<std::result::Result<Vec<_>, String>>()
        .map_err(|reason| Error::PartitionValue {
            spec: format!("{specs:?}"),
            tp: tp.clone(),
            reason,
        })?;
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for rows in group_rows(&codes, batch.num_rows()).map_err(|reason| Error::PartitionValue {
        spec: format!("{specs:?}"),
        tp: tp.clone(),
        reason,
    })? {
        let first = rows[0] as usize;
        let mut key = String::new();
        for (spec, col) in specs.iter().zip(&columns) {
            let value = segment_values(spec, &col.slice(first, 1))
                .map_err(|reason| Error::PartitionValue {
                    spec: format!("{spec:?}"),
                    tp: tp.clone(),
                    reason,
                })?
                .pop()
                .flatten();
            if !key.is_empty() {
                key.push('/');
            }
            key.push_str(&escape(spec.name()));
            key.push('=');
            match value {
                Some(v) => key.push_str(&escape(&v)),
                None => key.push_str(HIVE_NULL),
            }
        }
        merge_group(&mut groups, key, rows);
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

/// The column a Delta table stores for a `day()` / `hour()` spec, computed from its source
/// column: `day` as a `Date32`, `hour` as `YYYY-MM-DD-HH` text (UTC). Vectorised: the hour's text
/// is formatted once per run of equal hours.
pub(crate) fn derived_column(
    spec: &PartitionSpec,
    col: &ArrayRef,
) -> std::result::Result<(DataType, ArrayRef), String> {
    use arrow::array::{Date32Array, StringBuilder};
    if matches!(spec, PartitionSpec::Field(_)) {
        return Err("a field partition has no derived column".into());
    }
    segment_values(spec, &col.slice(0, 0))?;
    let ms =
        cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None)).map_err(|e| e.to_string())?;
    let ms = ms.as_primitive::<TimestampMillisecondType>();
    for v in [arrow::compute::min(ms), arrow::compute::max(ms)]
        .into_iter()
        .flatten()
    {
        if DateTime::from_timestamp_millis(v).is_none() {
            return Err(format!("timestamp {v} ms is out of range"));
        }
    }
    if matches!(spec, PartitionSpec::Day(_)) {
        let days: Date32Array =
            arrow::compute::kernels::arity::unary(ms, |v| v.div_euclid(86_400_000) as i32);
        return Ok((DataType::Date32, Arc::new(days)));
    }
    let mut out = StringBuilder::with_capacity(ms.len(), ms.len() * 13);
    let mut last: Option<(i64, String)> = None;
    for v in ms.iter() {
        let Some(v) = v else {
            out.append_null();
            continue;
        };
        let hour = v.div_euclid(3_600_000);
        if last.as_ref().map(|(h, _)| *h) != Some(hour) {
            let t = DateTime::from_timestamp_millis(v)
                .ok_or_else(|| format!("timestamp {v} ms is out of range"))?;
            let label = format!(
                "{:04}-{:02}-{:02}-{:02}",
                t.year(),
                t.month(),
                t.day(),
                t.hour()
            );
            last = Some((hour, label));
        }
        out.append_value(&last.as_ref().expect("set above").1);
    }
    Ok((DataType::Utf8, Arc::new(out.finish())))
}

/// Adds `rows` to the group `key`; two groups whose values format to the same key (say, two NaN
/// payloads) become one, rows kept in batch order.
pub(crate) fn merge_group<K: Ord>(groups: &mut BTreeMap<K, Vec<u32>>, key: K, rows: Vec<u32>) {
    match groups.entry(key) {
        std::collections::btree_map::Entry::Vacant(v) => {
            v.insert(rows);
        }
        std::collections::btree_map::Entry::Occupied(mut o) => {
            let all = o.get_mut();
            all.extend(rows);
            all.sort_unstable();
        }
    }
}

/// A column whose values are equal exactly when `spec` puts two rows in the same partition:
/// the UTC day or hour number for `day()` / `hour()`, the value's text for a field (what the
/// Hive path shows, so values that print alike group alike).
fn bucket_codes(spec: &PartitionSpec, col: &ArrayRef) -> std::result::Result<ArrayRef, String> {
    use arrow::array::Int64Array;
    let width: i64 = match spec {
        PartitionSpec::Field(_) => {
            // The type checks live in `segment_values`; run them on an empty slice.
            segment_values(spec, &col.slice(0, 0))?;
            return cast(col, &DataType::Utf8).map_err(|e| e.to_string());
        }
        PartitionSpec::Day(_) => 86_400_000,
        PartitionSpec::Hour(_) => 3_600_000,
    };
    segment_values(spec, &col.slice(0, 0))?;
    let ms =
        cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None)).map_err(|e| e.to_string())?;
    let ms = ms.as_primitive::<TimestampMillisecondType>();
    let codes: Int64Array = arrow::compute::kernels::arity::unary(ms, |v| v.div_euclid(width));
    Ok(Arc::new(codes))
}

/// The rows of `columns` (all `len` long) grouped by equal values, null equal to null, each
/// group in row order, groups in order of first appearance. One pass over the row-encoded
/// values; a run of equal rows (a batch within one day) costs one comparison per row.
pub(crate) fn group_rows(
    columns: &[ArrayRef],
    len: usize,
) -> std::result::Result<Vec<Vec<u32>>, String> {
    use arrow::row::{RowConverter, SortField};
    if len == 0 {
        return Ok(Vec::new());
    }
    if columns.is_empty() {
        return Ok(vec![(0..len as u32).collect()]);
    }
    let converter = RowConverter::new(
        columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect(),
    )
    .map_err(|e| e.to_string())?;
    let rows = converter
        .convert_columns(columns)
        .map_err(|e| e.to_string())?;
    let mut groups: Vec<Vec<u32>> = vec![Vec::new()];
    let mut index: HashMap<arrow::row::Row<'_>, usize> = HashMap::new();
    index.insert(rows.row(0), 0);
    let mut current = 0;
    groups[0].push(0);
    for i in 1..len {
        let row = rows.row(i);
        if row != rows.row(i - 1) {
            current = *index.entry(row).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
        }
        groups[current].push(i as u32);
    }
    Ok(groups)
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
mod tests;
