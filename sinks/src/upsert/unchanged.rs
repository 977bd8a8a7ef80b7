//! Values a change does not carry: an upsert row may name, in its `unchanged_column` (a list of
//! column names), columns whose value the source did not send and that must keep what the key
//! already has. PostgreSQL sends no value for a TOASTed column an UPDATE left alone, and
//! Debezium marks it unavailable; writing the marker, or null, would corrupt the row.
//!
//! Two steps fill them, in order:
//! 1. [`coalesce`], when a flush's changes are reduced to the last one per key: an unchanged
//!    column takes the value of the latest earlier change of the key in the flush that carried
//!    one (an insert followed by an update in one flush), and leaves the list.
//! 2. At commit, against the table the commit is based on: the sink reads the stored rows of
//!    the keys still naming columns (Delta: `delta::unchanged`), or its MERGE keeps the target's
//!    value (Databend, in SQL). A key the table does not hold keeps null in those columns.
//!
//! Invariant: the unchanged column never reaches a table; every upsert path drops it.

use std::collections::HashMap;

use super::UpsertConfig;
use arrow::array::{
    Array, ArrayRef, AsArray, GenericListArray, ListBuilder, RecordBatch, StringBuilder,
};
use arrow::compute::{cast, interleave};
use arrow::datatypes::Field;

/// The names in row `i` of an unchanged list (empty when null).
pub(crate) fn names(list: &GenericListArray<i32>, i: usize) -> Vec<String> {
    if list.is_null(i) {
        return Vec::new();
    }
    let v = list.value(i);
    v.as_string::<i32>()
        .iter()
        .flatten()
        .map(String::from)
        .collect()
}

pub(crate) fn unchanged<'a>(
    config: &UpsertConfig,
    b: &'a RecordBatch,
) -> Option<&'a GenericListArray<i32>> {
    let c = b.column_by_name(config.unchanged_column.as_ref()?)?;
    c.as_list_opt::<i32>()
}

/// Whether any row of `batches` names an unchanged column.
pub(crate) fn any(config: &UpsertConfig, batches: &[RecordBatch]) -> bool {
    batches.iter().any(|b| {
        unchanged(config, b)
            .is_some_and(|l| (0..l.len()).any(|i| l.is_valid(i) && !l.value(i).is_empty()))
    })
}

/// Step 1: `rows` are the kept changes `keep` (batch, row) of `batches`, `history` every
/// change of each kept key in offset order (as (batch, row)); fills what an earlier change of
/// the flush carried.
pub(crate) fn coalesce(
    config: &UpsertConfig,
    rows: RecordBatch,
    batches: &[RecordBatch],
    keep: &[(usize, usize)],
    history: &HashMap<(usize, usize), Vec<(usize, usize)>>,
) -> Result<RecordBatch, String> {
    let Some(list) = unchanged(config, &rows) else {
        return Ok(rows);
    };
    let deleted = |b: usize, i: usize| {
        config
            .delete_column
            .as_ref()
            .and_then(|c| batches[b].column_by_name(c))
            .and_then(|c| c.as_boolean_opt().map(|d| d.is_valid(i) && d.value(i)))
            .unwrap_or(false)
    };
    // Per output column, the rows it takes from an earlier change: (output row, batch, row).
    let mut taken: HashMap<String, Vec<(usize, usize, usize)>> = HashMap::new();
    let mut left: Vec<Vec<String>> = Vec::with_capacity(rows.num_rows());
    for (o, at) in keep.iter().enumerate() {
        let mut still = Vec::new();
        for name in names(list, o) {
            let earlier = history.get(at).into_iter().flatten().rev();
            let mut source = None;
            for &(b, i) in earlier.filter(|p| **p < *at) {
                if deleted(b, i) {
                    break; // a delete's image carries no values; nothing before it counts
                }
                let l = unchanged(config, &batches[b]);
                if !l.is_some_and(|l| names(l, i).contains(&name)) {
                    source = Some((b, i));
                    break;
                }
            }
            match source {
                Some((b, i)) => taken.entry(name).or_default().push((o, b, i)),
                None => still.push(name),
            }
        }
        left.push(still);
    }
    if taken.is_empty() {
        return Ok(rows);
    }
    let schema = rows.schema();
    let mut columns = rows.columns().to_vec();
    for (name, from) in taken {
        let Ok(c) = schema.index_of(&name) else {
            continue;
        };
        let mut sources: Vec<&dyn Array> = vec![rows.column(c).as_ref()];
        sources.extend(batches.iter().map(|b| b.column(c).as_ref()));
        let mut indices: Vec<(usize, usize)> = (0..rows.num_rows()).map(|o| (0, o)).collect();
        for (o, b, i) in from {
            indices[o] = (b + 1, i);
        }
        columns[c] = interleave(&sources, &indices).map_err(|e| e.to_string())?;
    }
    let l = schema
        .index_of(config.unchanged_column.as_deref().expect("checked"))
        .map_err(|e| e.to_string())?;
    columns[l] = lists(&left, schema.field(l))?;
    RecordBatch::try_new(schema, columns).map_err(|e| e.to_string())
}

fn lists(values: &[Vec<String>], field: &Field) -> Result<ArrayRef, String> {
    let mut b = ListBuilder::new(StringBuilder::new());
    for v in values {
        if v.is_empty() {
            b.append_null();
        } else {
            for n in v {
                b.values().append_value(n);
            }
            b.append(true);
        }
    }
    cast(&b.finish(), field.data_type()).map_err(|e| e.to_string())
}

/// `batch` without the unchanged column.
pub(crate) fn without(config: &UpsertConfig, batch: RecordBatch) -> RecordBatch {
    let Some(i) = config
        .unchanged_column
        .as_ref()
        .and_then(|c| batch.schema().index_of(c).ok())
    else {
        return batch;
    };
    let mut batch = batch;
    batch.remove_column(i);
    batch
}
