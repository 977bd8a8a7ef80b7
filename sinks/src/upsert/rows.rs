//! A hash index of key rows kept elsewhere: a flush's keys, converted once into [`Rows`] (one
//! per batch), are found by their bytes while the index holds only their positions.
//!
//! A `HashMap<Row, _>` holds each key's 24-byte `Row` beside its value, and, sized for a flush of
//! 1M changes, takes 2M buckets: 69 MiB for a `bool`, 80 MiB for a position. This index holds
//! 8 bytes per bucket (batch and row as `u32`), so the same flush's index takes 18 MiB.
//!
//! Invariants:
//! - Each distinct key is held once; inserting an equal key replaces the position held
//!   (the last one inserted wins, as changes in offset order do).
//! - Positions are into the `Rows` the index was built over, which outlive it.

use std::hash::{BuildHasher, RandomState};

use arrow::row::{Row, Rows};
use hashbrown::HashTable;

/// Distinct keys of `rows` (one [`Rows`] per batch), by position (batch, row).
pub struct RowIndex<'r> {
    rows: &'r [Rows],
    hasher: RandomState,
    table: HashTable<(u32, u32)>,
}

impl<'r> RowIndex<'r> {
    /// Every row of `rows`, a later equal key replacing an earlier one: the index of each
    /// key's last occurrence.
    pub fn last_of_each(rows: &'r [Rows]) -> Self {
        let total = rows.iter().map(Rows::num_rows).sum();
        let mut index = Self {
            rows,
            hasher: RandomState::new(),
            table: HashTable::with_capacity(total),
        };
        for (b, batch) in rows.iter().enumerate() {
            for i in 0..batch.num_rows() {
                index.insert(b, i);
            }
        }
        index
    }

    fn row(&self, (b, i): (u32, u32)) -> Row<'r> {
        self.rows[b as usize].row(i as usize)
    }

    /// Holds row `i` of batch `b` for its key, in place of an equal key held before.
    fn insert(&mut self, b: usize, i: usize) {
        let at = (
            u32::try_from(b).expect("fewer than 2^32 batches"),
            u32::try_from(i).expect("fewer than 2^32 rows in a batch"),
        );
        let key = self.rows[b].row(i);
        let hash = self.hasher.hash_one(key.as_ref());
        let (rows, hasher) = (self.rows, &self.hasher);
        let position = move |p: &(u32, u32)| rows[p.0 as usize].row(p.1 as usize);
        match self.table.entry(
            hash,
            |p| position(p).as_ref() == key.as_ref(),
            |p| hasher.hash_one(position(p).as_ref()),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = at,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(at);
            }
        }
    }

    /// Where the key equal to `row` is held: (batch, row).
    pub fn get(&self, row: Row<'_>) -> Option<(usize, usize)> {
        let hash = self.hasher.hash_one(row.as_ref());
        self.table
            .find(hash, |&p| self.row(p).as_ref() == row.as_ref())
            .map(|&(b, i)| (b as usize, i as usize))
    }

    /// The number of distinct keys.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The positions held, one per distinct key, in no order.
    pub fn positions(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.table.iter().map(|&(b, i)| (b as usize, i as usize))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow::row::{RowConverter, SortField};

    use super::RowIndex;

    #[test]
    fn the_last_occurrence_of_each_key_is_found_by_its_bytes() {
        let converter = RowConverter::new(vec![
            SortField::new(arrow::datatypes::DataType::Int64),
            SortField::new(arrow::datatypes::DataType::Utf8),
        ])
        .unwrap();
        let batch = |ids: Vec<i64>, regions: Vec<&str>| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(regions)),
            ];
            converter.convert_columns(&columns).unwrap()
        };
        let rows = vec![
            batch(vec![1, 2, 1], vec!["eu", "eu", "us"]),
            batch(vec![2, 3, 1], vec!["eu", "eu", "us"]),
        ];
        let index = RowIndex::last_of_each(&rows);
        assert_eq!(index.len(), 4);
        let mut held: Vec<(usize, usize)> = index.positions().collect();
        held.sort_unstable();
        // (1,eu) first seen at (0,0); (2,eu) last at (1,0); (3,eu) at (1,1); (1,us) last at (1,2).
        assert_eq!(held, vec![(0, 0), (1, 0), (1, 1), (1, 2)]);
        let probe = batch(vec![1, 2, 4], vec!["us", "eu", "eu"]);
        assert_eq!(index.get(probe.row(0)), Some((1, 2)));
        assert_eq!(index.get(probe.row(1)), Some((1, 0)));
        assert_eq!(index.get(probe.row(2)), None);
    }
}
