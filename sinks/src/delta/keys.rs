//! The changes' keys for an upsert (see `rewrite` and `mor`): as rows of one converter (a hash
//! set of them finds the rows of a file that hold a changed key), and per key column the sorted
//! distinct values, which rule files and row groups out by their min/max statistics; with one
//! integer key column, a set of the keys that tests a file's rows before they are converted;
//! and the changes by key ([`ChangeIndex`]), each with whether it deletes.

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use arrow::row::{Row, RowConverter, Rows, SortField};
use delta_kernel::expressions::{Scalar, StructData};
use deltalake::datafusion::common::ScalarValue;
use deltalake::kernel::LogicalFileView;
use deltalake::DeltaTableError;

use crate::upsert::rows::RowIndex;
use crate::upsert::UpsertConfig;

/// The changes' keys, as rows of one [`RowConverter`].
pub(super) struct Keys {
    pub(super) columns: Vec<String>,
    pub(super) types: Vec<DataType>,
    pub(super) converter: RowConverter,
    pub(super) rows: Vec<Rows>,
    /// Per key column: a converter of that column alone, and its distinct values, sorted.
    pub(super) per_column: Vec<(RowConverter, Rows, Vec<usize>)>,
    /// With one integer key column: the changes' keys as integers, tested before any row of a
    /// file is converted (most rows read hold no changed key).
    ints: Option<std::collections::HashSet<i64, IntHash>>,
}

/// A hasher for integer keys: one multiplication (Fibonacci hashing), no per-key seed work.
#[derive(Default, Clone, Copy)]
pub(super) struct IntHash;

/// [`IntHash`]'s state.
pub(super) struct IntHasher(u64);

impl std::hash::BuildHasher for IntHash {
    type Hasher = IntHasher;
    fn build_hasher(&self) -> IntHasher {
        IntHasher(0)
    }
}

impl std::hash::Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_i64(&mut self, v: i64) {
        self.0 = (v as u64 ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
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
        let ints = match types.as_slice() {
            // Integers that fit an i64 (a u64 beyond it would cast to null and never match).
            [t] if t.is_signed_integer()
                || matches!(t, DataType::UInt8 | DataType::UInt16 | DataType::UInt32) =>
            {
                let mut set = std::collections::HashSet::with_hasher(IntHash);
                for b in batches {
                    let c = key_columns(b, &config.keys, &types)?;
                    let c = cast(&c[0], &DataType::Int64)?;
                    set.extend(c.as_primitive::<Int64Type>().iter().flatten());
                }
                Some(set)
            }
            _ => None,
        };
        Ok(Self {
            columns: config.keys.clone(),
            types,
            converter,
            rows,
            per_column,
            ints,
        })
    }

    /// `batch`'s keys, as rows comparable with the changes'.
    pub(super) fn rows_of(&self, batch: &RecordBatch) -> Result<Rows, DeltaTableError> {
        let columns = key_columns(batch, &self.columns, &self.types)?;
        Ok(self.converter.convert_columns(&columns)?)
    }

    /// With one integer key column, the rows of `batch` whose key is a change's (their indexes,
    /// ascending); `None` otherwise (every row must be converted and looked up).
    pub(super) fn candidates(
        &self,
        batch: &RecordBatch,
    ) -> Result<Option<Vec<u32>>, DeltaTableError> {
        let Some(ints) = &self.ints else {
            return Ok(None);
        };
        let c = key_columns(batch, &self.columns, &self.types)?;
        let c = cast(&c[0], &DataType::Int64)?;
        let values = c.as_primitive::<Int64Type>();
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            if v.is_some_and(|v| ints.contains(&v)) {
                out.push(i as u32);
            }
        }
        Ok(Some(out))
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

/// The changes by key: which change a key of the table has, and whether it deletes it.
pub(super) struct ChangeIndex<'k> {
    index: RowIndex<'k>,
    /// Per batch, the rows that delete (`None`: a batch without a delete column).
    deleted: Vec<Option<BooleanArray>>,
}

impl<'k> ChangeIndex<'k> {
    pub(super) fn new(config: &UpsertConfig, batches: &[RecordBatch], keys: &'k Keys) -> Self {
        let deleted = batches
            .iter()
            .map(|b| {
                config
                    .delete_column
                    .as_ref()
                    .and_then(|c| b.column_by_name(c))
                    .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
                    .map(|d| {
                        // A null delete flag upserts, as in the MERGE (`_deleted = true` deletes).
                        BooleanArray::from_iter(d.iter().map(|v| Some(v == Some(true))))
                    })
            })
            .collect();
        Self {
            index: RowIndex::last_of_each(&keys.rows),
            deleted,
        }
    }

    /// Whether the change of the key `row` deletes it; `None`: the key is not among the changes.
    pub(super) fn get(&self, row: Row<'_>) -> Option<bool> {
        let (b, i) = self.index.get(row)?;
        Some(self.deleted[b].as_ref().is_some_and(|d| d.value(i)))
    }

    /// The number of changed keys.
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether some change deletes its key.
    pub(super) fn any_deletes(&self) -> bool {
        self.index
            .positions()
            .any(|(b, i)| self.deleted[b].as_ref().is_some_and(|d| d.value(i)))
    }

    /// Per batch of the changes, the rows that delete (`None`: the batch has no delete column).
    pub(super) fn deleted(&self) -> &[Option<BooleanArray>] {
        &self.deleted
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int32Array, Int64Array, RecordBatch, StringArray, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn config(keys: &[&str]) -> UpsertConfig {
        UpsertConfig {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            keys_from: None,
            delete_column: None,
            unchanged_column: None,
        }
    }

    fn one(name: &str, t: DataType, column: ArrayRef) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(name, t, true)])),
            vec![column],
        )
        .unwrap()
    }

    #[test]
    fn integer_keys_are_tested_before_rows_are_converted() {
        let changes = one(
            "id",
            DataType::Int64,
            Arc::new(Int64Array::from(vec![3, 7, 1 << 40])),
        );
        let keys = Keys::new(&config(&["id"]), &[changes]).unwrap();
        // A file written when the column was an int: cast, and its nulls never match.
        let file = one(
            "id",
            DataType::Int32,
            Arc::new(Int32Array::from(vec![
                Some(1),
                Some(7),
                None,
                Some(3),
                Some(7),
            ])),
        );
        assert_eq!(keys.candidates(&file).unwrap(), Some(vec![1, 3, 4]));
    }

    #[test]
    fn keys_an_i64_cannot_hold_and_compound_keys_go_row_by_row() {
        let big = one(
            "id",
            DataType::UInt64,
            Arc::new(UInt64Array::from(vec![u64::MAX])),
        );
        let keys = Keys::new(&config(&["id"]), std::slice::from_ref(&big)).unwrap();
        assert_eq!(keys.candidates(&big).unwrap(), None);
        let two = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("region", DataType::Utf8, false),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1])),
                Arc::new(StringArray::from(vec!["eu"])),
            ],
        )
        .unwrap();
        let keys = Keys::new(&config(&["id", "region"]), std::slice::from_ref(&two)).unwrap();
        assert_eq!(keys.candidates(&two).unwrap(), None);
    }
}
