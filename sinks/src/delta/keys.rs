//! The changes' keys for an upsert (see `rewrite` and `mor`): as rows of one converter (a hash
//! set of them finds the rows of a file that hold a changed key), and per key column the sorted
//! distinct values, which rule files and row groups out by their min/max statistics.

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::row::{Row, RowConverter, Rows, SortField};
use delta_kernel::expressions::{Scalar, StructData};
use deltalake::datafusion::common::ScalarValue;
use deltalake::kernel::LogicalFileView;
use deltalake::DeltaTableError;

use crate::upsert::UpsertConfig;

/// The changes' keys, as rows of one [`RowConverter`].
pub(super) struct Keys {
    pub(super) columns: Vec<String>,
    pub(super) types: Vec<DataType>,
    pub(super) converter: RowConverter,
    pub(super) rows: Vec<Rows>,
    /// Per key column: a converter of that column alone, and its distinct values, sorted.
    pub(super) per_column: Vec<(RowConverter, Rows, Vec<usize>)>,
}

impl Keys {
    pub(super) fn new(
        config: &UpsertConfig,
        batches: &[RecordBatch],
    ) -> Result<Self, DeltaTableError> {
        let schema = batches[0].schema();
        let mut types = Vec::with_capacity(config.keys.len());
        for k in &config.keys {
            types.push(schema.field_with_name(k)?.data_type().clone());
        }
        let fields = types.iter().map(|t| SortField::new(t.clone())).collect();
        let converter = RowConverter::new(fields)?;
        let mut rows = Vec::with_capacity(batches.len());
        for b in batches {
            rows.push(converter.convert_columns(&key_columns(b, &config.keys, &types)?)?);
        }
        let mut per_column = Vec::with_capacity(types.len());
        for (k, t) in config.keys.iter().zip(&types) {
            let one = RowConverter::new(vec![SortField::new(t.clone())])?;
            let mut values = one.empty_rows(0, 0);
            for b in batches {
                let c = key_columns(b, std::slice::from_ref(k), std::slice::from_ref(t))?;
                one.append(&mut values, &c)?;
            }
            let mut order: Vec<usize> = (0..values.num_rows()).collect();
            order.sort_unstable_by(|&a, &b| values.row(a).cmp(&values.row(b)));
            order.dedup_by(|a, b| values.row(*a) == values.row(*b));
            per_column.push((one, values, order));
        }
        Ok(Self {
            columns: config.keys.clone(),
            types,
            converter,
            rows,
            per_column,
        })
    }

    /// `batch`'s keys, as rows comparable with the changes'.
    pub(super) fn rows_of(&self, batch: &RecordBatch) -> Result<Rows, DeltaTableError> {
        let columns = key_columns(batch, &self.columns, &self.types)?;
        Ok(self.converter.convert_columns(&columns)?)
    }

    /// Whether some change's value of key column `c` lies in `[min, max]`.
    pub(super) fn admits(&self, c: usize, min: Row<'_>, max: Row<'_>) -> bool {
        let (_, values, order) = &self.per_column[c];
        let first = order.partition_point(|&i| values.row(i) < min);
        first < order.len() && values.row(order[first]) <= max
    }

    /// Per row of `mins` / `maxes` (bounds of key column `c`, one row per file or row group):
    /// whether some change's value lies within them. `None` when the bounds cannot be compared;
    /// a row without bounds admits.
    pub(super) fn admitted_by(
        &self,
        c: usize,
        mins: &ArrayRef,
        maxes: &ArrayRef,
    ) -> Option<Vec<bool>> {
        let t = &self.types[c];
        let (mins, maxes) = (cast(mins, t).ok()?, cast(maxes, t).ok()?);
        let one = &self.per_column[c].0;
        let lo = one.convert_columns(std::slice::from_ref(&mins)).ok()?;
        let hi = one.convert_columns(std::slice::from_ref(&maxes)).ok()?;
        Some(
            (0..mins.len())
                .map(|g| {
                    mins.is_null(g) || maxes.is_null(g) || self.admits(c, lo.row(g), hi.row(g))
                })
                .collect(),
        )
    }

    /// Whether the file's statistics in the log admit a change of every key column: a file they
    /// rule out is not even opened.
    pub(super) fn admitted_by_log_stats(&self, file: &LogicalFileView) -> bool {
        let (Some(Scalar::Struct(mins)), Some(Scalar::Struct(maxes))) =
            (file.min_values(), file.max_values())
        else {
            return true;
        };
        let bound = |data: &StructData, column: &str| -> Option<ArrayRef> {
            let (_, v) = data
                .fields()
                .iter()
                .zip(data.values())
                .find(|(f, _)| f.name() == column)?;
            (!v.is_null()).then(|| v.to_array(1).ok()).flatten()
        };
        self.columns.iter().enumerate().all(|(c, column)| {
            match (bound(&mins, column), bound(&maxes, column)) {
                (Some(lo), Some(hi)) => {
                    self.admitted_by(c, &lo, &hi).is_none_or(|admits| admits[0])
                }
                _ => true,
            }
        })
    }

    /// The smallest and the largest change of key column `c`.
    pub(super) fn range(&self, c: usize) -> Option<(ScalarValue, ScalarValue)> {
        let (one, values, order) = &self.per_column[c];
        let (first, last) = (order.first()?, order.last()?);
        let arrays = one
            .convert_rows([values.row(*first), values.row(*last)])
            .ok()?;
        let min = ScalarValue::try_from_array(&arrays[0], 0).ok()?;
        let max = ScalarValue::try_from_array(&arrays[0], 1).ok()?;
        Some((min, max))
    }
}

/// The key columns of `batch`, cast to the changes' key types.
fn key_columns(
    batch: &RecordBatch,
    keys: &[String],
    types: &[DataType],
) -> Result<Vec<ArrayRef>, DeltaTableError> {
    keys.iter()
        .zip(types)
        .map(|(k, t)| {
            let c = batch.column_by_name(k).ok_or_else(|| {
                DeltaTableError::Generic(format!("key column `{k}` is missing from a data file"))
            })?;
            Ok(if c.data_type() == t {
                c.clone()
            } else {
                cast(c, t)?
            })
        })
        .collect()
}
