//! `RowBatch`: the columnar, dictionary-encoded form in which points are held in memory,
//! written to segments and handed to query execution. One shape for all three keeps the scan
//! path free of conversions.

use crate::model::{FieldClass, FieldValue, Num, Point};
use std::collections::{BTreeMap, HashMap};

/// Marks a row with no value in a field column.
pub const NULL_CODE: u32 = u32::MAX;

#[derive(Debug, Clone, Default)]
pub struct DictColumn {
    pub class: Option<FieldClass>,
    /// Distinct values; `codes` index into it.
    pub dict: Vec<FieldValue>,
    pub codes: Vec<u32>,
}

impl DictColumn {
    pub fn get(&self, row: usize) -> Option<&FieldValue> {
        match self.codes.get(row) {
            Some(&c) if c != NULL_CODE => self.dict.get(c as usize),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RowBatch {
    pub timestamps: Vec<i64>,
    pub values: Vec<Num>,
    /// Dimension and tag columns by name (a name is either a dimension or a tag).
    pub columns: BTreeMap<String, DictColumn>,
}

impl RowBatch {
    pub fn len(&self) -> usize {
        self.timestamps.len()
    }
    pub fn is_empty(&self) -> bool {
        self.timestamps.is_empty()
    }

    /// Rebuilds one row as a point (for raw query results and re-encoding).
    pub fn point(&self, row: usize) -> Point {
        let mut dimensions = BTreeMap::new();
        let mut tags = BTreeMap::new();
        for (name, col) in &self.columns {
            if let Some(v) = col.get(row) {
                match col.class {
                    Some(FieldClass::Tag) => tags.insert(name.clone(), v.clone()),
                    _ => dimensions.insert(name.clone(), v.clone()),
                };
            }
        }
        Point { timestamp: self.timestamps[row], value: self.values[row], dimensions, tags }
    }

    /// The rows `keep` selects, in the given order.
    pub fn select(&self, rows: &[usize]) -> RowBatch {
        let mut out = RowBatch {
            timestamps: rows.iter().map(|&r| self.timestamps[r]).collect(),
            values: rows.iter().map(|&r| self.values[r]).collect(),
            columns: BTreeMap::new(),
        };
        for (name, col) in &self.columns {
            let codes: Vec<u32> = rows.iter().map(|&r| col.codes[r]).collect();
            if codes.iter().any(|&c| c != NULL_CODE) {
                out.columns.insert(name.clone(), DictColumn { class: col.class, dict: col.dict.clone(), codes });
            }
        }
        out
    }
}

/// Hashable form of a field value for dictionary lookups (f64 by its bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DictKey {
    Int(i64),
    Dec(u64),
    Str(String),
}

impl From<&FieldValue> for DictKey {
    fn from(v: &FieldValue) -> Self {
        match v {
            FieldValue::Int(i) => DictKey::Int(*i),
            FieldValue::Dec(d) => DictKey::Dec(d.to_bits()),
            FieldValue::Str(s) => DictKey::Str(s.clone()),
        }
    }
}

/// Appends points to a `RowBatch`, keeping one dictionary per column.
#[derive(Debug, Default)]
pub struct RowBatchBuilder {
    pub batch: RowBatch,
    index: HashMap<String, HashMap<DictKey, u32>>,
}

impl RowBatchBuilder {
    pub fn push(&mut self, point: &Point) {
        let row = self.batch.len();
        self.batch.timestamps.push(point.timestamp);
        self.batch.values.push(point.value);
        for (class, fields) in [(FieldClass::Dimension, &point.dimensions), (FieldClass::Tag, &point.tags)] {
            for (name, value) in fields {
                self.push_field(row, name, class, value);
            }
        }
        // Columns this point has no value for get a null, keeping every column `row + 1` long.
        for col in self.batch.columns.values_mut() {
            if col.codes.len() == row {
                col.codes.push(NULL_CODE);
            }
        }
    }

    fn push_field(&mut self, row: usize, name: &str, class: FieldClass, value: &FieldValue) {
        let col = self.batch.columns.entry(name.to_string()).or_insert_with(|| DictColumn {
            class: Some(class),
            dict: Vec::new(),
            codes: vec![NULL_CODE; row],
        });
        let index = self.index.entry(name.to_string()).or_default();
        let key = DictKey::from(value);
        let code = match index.get(&key) {
            Some(&c) => c,
            None => {
                let c = col.dict.len() as u32;
                col.dict.push(value.clone());
                index.insert(key, c);
                c
            }
        };
        col.codes.push(code);
    }

    pub fn extend_from(&mut self, batch: &RowBatch) {
        for row in 0..batch.len() {
            self.push(&batch.point(row));
        }
    }

    pub fn finish(self) -> RowBatch {
        self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_keeps_columns_aligned_and_roundtrips_points() {
        let mut b = RowBatchBuilder::default();
        let mut p1 = Point { timestamp: 1, value: Num::Int(1), dimensions: BTreeMap::new(), tags: BTreeMap::new() };
        p1.tags.insert("region".into(), FieldValue::Str("eu".into()));
        let mut p2 = p1.clone();
        p2.timestamp = 2;
        p2.tags.clear();
        p2.dimensions.insert("cpu".into(), FieldValue::Dec(0.5));
        let mut p3 = p1.clone();
        p3.timestamp = 3;
        for p in [&p1, &p2, &p3] {
            b.push(p);
        }
        let batch = b.finish();
        assert_eq!(batch.columns["region"].codes, vec![0, NULL_CODE, 0]);
        assert_eq!(batch.columns["cpu"].codes, vec![NULL_CODE, 0, NULL_CODE]);
        assert_eq!(batch.point(0), p1);
        assert_eq!(batch.point(1), p2);
        assert_eq!(batch.point(2), p3);
        let sel = batch.select(&[2, 0]);
        assert_eq!(sel.point(0), p3);
        assert!(!sel.columns.contains_key("cpu"));
    }
}
