//! Values a change did not carry, filled at commit from the Delta table the commit is based on
//! (step 2 of [`crate::upsert::unchanged`]): a semi-join of the table's snapshot with the keys
//! that still name columns.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::compute::{cast, interleave};
use arrow::row::{RowConverter, SortField};
use deltalake::datafusion::datasource::MemTable;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::{DeltaTable, DeltaTableError};

use crate::upsert::unchanged::{names, unchanged, without};
use crate::upsert::UpsertConfig;

/// Step 2 for Delta: fills the columns `batch` still names from the rows `table` stores for
/// those keys, and drops the unchanged column.
pub(crate) async fn fill_from_table(
    config: &UpsertConfig,
    table: &DeltaTable,
    batch: RecordBatch,
) -> Result<RecordBatch, DeltaTableError> {
    let err = |e: String| DeltaTableError::Generic(format!("unchanged values: {e}"));
    let Some(list) = unchanged(config, &batch).cloned() else {
        return Ok(without(config, batch));
    };
    let wanted: Vec<usize> = (0..batch.num_rows())
        .filter(|&i| list.is_valid(i) && !list.value(i).is_empty())
        .collect();
    if wanted.is_empty() {
        return Ok(without(config, batch));
    }
    let table_schema = table.snapshot()?.snapshot().arrow_schema();
    let mut needed: Vec<String> = Vec::new();
    for &i in &wanted {
        for n in names(&list, i) {
            if table_schema.field_with_name(&n).is_ok() && !needed.contains(&n) {
                needed.push(n);
            }
        }
    }
    if needed.is_empty() {
        return Ok(without(config, batch));
    }
    // The stored rows of the keys that need them: a semi-join of the table with those keys.
    let key_idx: Vec<usize> = config
        .keys
        .iter()
        .map(|k| batch.schema().index_of(k))
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    let probe = arrow::compute::take_record_batch(
        &batch.project(&key_idx).map_err(|e| err(e.to_string()))?,
        &arrow::array::UInt32Array::from_iter_values(wanted.iter().map(|&i| i as u32)),
    )
    .map_err(|e| err(e.to_string()))?;
    let ctx = SessionContext::new();
    ctx.register_table("t", table.table_provider().await?)?;
    ctx.register_table(
        "k",
        Arc::new(MemTable::try_new(probe.schema(), vec![vec![probe]])?),
    )?;
    let quote = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let select: Vec<String> = config
        .keys
        .iter()
        .chain(&needed)
        .map(|c| format!("t.{}", quote(c)))
        .collect();
    let on: Vec<String> = config
        .keys
        .iter()
        .map(|c| format!("t.{q} = k.{q}", q = quote(c)))
        .collect();
    let stored = ctx
        .sql(&format!(
            "SELECT {} FROM t JOIN k ON {}",
            select.join(", "),
            on.join(" AND ")
        ))
        .await?
        .collect()
        .await?;
    if stored.is_empty() {
        return Ok(without(config, batch));
    }
    let stored = arrow::compute::concat_batches(&stored[0].schema(), &stored)?;
    // Stored keys in the changes' key types, to find each change's stored row.
    let fields: Vec<SortField> = key_idx
        .iter()
        .map(|&i| SortField::new(batch.column(i).data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields)?;
    let change_keys = converter.convert_columns(
        &key_idx
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect::<Vec<_>>(),
    )?;
    let stored_keys = converter.convert_columns(
        &(0..key_idx.len())
            .map(|k| cast(stored.column(k), batch.column(key_idx[k]).data_type()))
            .collect::<Result<Vec<_>, _>>()?,
    )?;
    let by_key: HashMap<_, usize> = stored_keys
        .iter()
        .enumerate()
        .map(|(j, r)| (r, j))
        .collect();
    let schema = batch.schema();
    let mut columns = batch.columns().to_vec();
    for (n, name) in needed.iter().enumerate() {
        let Ok(c) = schema.index_of(name) else {
            continue;
        };
        let from = cast(
            stored.column(key_idx.len() + n),
            batch.column(c).data_type(),
        )?;
        let mut indices: Vec<(usize, usize)> = (0..batch.num_rows()).map(|o| (0, o)).collect();
        let mut any = false;
        for &i in &wanted {
            if !names(&list, i).contains(name) {
                continue;
            }
            if let Some(&j) = by_key.get(&change_keys.row(i)) {
                indices[i] = (1, j);
                any = true;
            }
        }
        if any {
            columns[c] = interleave(&[batch.column(c).as_ref(), from.as_ref()], &indices)?;
        }
    }
    let filled = RecordBatch::try_new(schema, columns)?;
    Ok(without(config, filled))
}
