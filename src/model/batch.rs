//! `RowBatch`: the columnar, dictionary-encoded form of points. Ingest parses straight into it,
//! the WAL logs it, the memtable appends it, segments are cut from it and queries scan it: one
//! shape from the request body to the query, so the hot path never builds a point per row.

use crate::model::{FieldClass, FieldValue, Num, Point, STRING_VALUE_LEN_MAX, validate_name};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Marks a row with no value in a field column.
pub const NULL_CODE: u32 = u32::MAX;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DictColumn {
    pub class: Option<FieldClass>,
    /// Distinct values; `codes` index into it.
    pub dict: Vec<FieldValue>,
    pub codes: Codes,
}

impl DictColumn {
    pub fn get(&self, row: usize) -> Option<&FieldValue> {
        match (row < self.codes.len()).then(|| self.codes.get(row)) {
            Some(c) if c != NULL_CODE => self.dict.get(c as usize),
            _ => None,
        }
    }
}

/// The traits of a compact column (`Codes`, `Values`) of elements `$elem`: equal when their
/// elements are; built, extended and deserialized one element at a time through its own
/// `reserve` and `push`; serialized as the sequence of its elements, as the `Vec` it replaced.
macro_rules! compact_column {
    ($column:ident, $elem:ty) => {
        impl PartialEq for $column {
            fn eq(&self, other: &Self) -> bool {
                self.len() == other.len() && self.iter().eq(other.iter())
            }
        }

        impl FromIterator<$elem> for $column {
            fn from_iter<I: IntoIterator<Item = $elem>>(iter: I) -> Self {
                let mut column = $column::default();
                column.extend(iter);
                column
            }
        }

        impl Extend<$elem> for $column {
            fn extend<I: IntoIterator<Item = $elem>>(&mut self, iter: I) {
                let iter = iter.into_iter();
                self.reserve(iter.size_hint().0);
                for element in iter {
                    self.push(element);
                }
            }
        }

        impl Serialize for $column {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.iter())
            }
        }

        impl<'de> Deserialize<'de> for $column {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Elements;
                impl<'de> serde::de::Visitor<'de> for Elements {
                    type Value = $column;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a sequence")
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<$column, A::Error> {
                        let mut column = $column::default();
                        // A length from the sender is a hint, never an allocation it can choose.
                        column.reserve(seq.size_hint().unwrap_or(0).min(1 << 16));
                        while let Some(element) = seq.next_element::<$elem>()? {
                            column.push(element);
                        }
                        Ok(column)
                    }
                }
                deserializer.deserialize_seq(Elements)
            }
        }
    };
}

/// A column's codes in the fewest bytes its dictionary needs: one a row while every code is
/// below 255, two below 65,535, four beyond; the largest number of the width stands for
/// [`NULL_CODE`]. A memtable of 20,000 series held three 4-byte codes a point (host, region,
/// write time) where 2 + 1 + 1 bytes do. Widened in place when a larger code comes;
/// serialized as a sequence of `u32`, as before. (A block decoded from a segment keeps its
/// codes as `u32`s: it lives for one scan or merge step.)
#[derive(Debug, Clone)]
pub enum Codes {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Default for Codes {
    fn default() -> Self {
        Codes::U8(Vec::new())
    }
}

fn narrow_u8(code: u32) -> u8 {
    if code == NULL_CODE { u8::MAX } else { code as u8 }
}

fn narrow_u16(code: u32) -> u16 {
    if code == NULL_CODE { u16::MAX } else { code as u16 }
}

fn widen_u8(c: u8) -> u32 {
    if c == u8::MAX { NULL_CODE } else { u32::from(c) }
}

fn widen_u16(c: u16) -> u32 {
    if c == u16::MAX { NULL_CODE } else { u32::from(c) }
}

impl Codes {
    pub fn with_capacity(rows: usize) -> Self {
        Codes::U8(Vec::with_capacity(rows))
    }

    pub fn len(&self) -> usize {
        match self {
            Codes::U8(c) => c.len(),
            Codes::U16(c) => c.len(),
            Codes::U32(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn get(&self, row: usize) -> u32 {
        match self {
            Codes::U8(c) => widen_u8(c[row]),
            Codes::U16(c) => widen_u16(c[row]),
            Codes::U32(c) => c[row],
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len()).map(|row| self.get(row))
    }

    /// Widens the codes so that `code` fits.
    fn fit(&mut self, code: u32) {
        if code == NULL_CODE {
            return;
        }
        let wider = match self {
            // With the capacity reserved for the narrower codes: a memtable's column grows
            // without copying whatever its width.
            Codes::U8(c) if code >= u32::from(u8::MAX) => {
                if code < u32::from(u16::MAX) {
                    let mut wide = Vec::with_capacity(c.capacity());
                    wide.extend(c.iter().map(|&c| narrow_u16(widen_u8(c))));
                    Codes::U16(wide)
                } else {
                    let mut wide = Vec::with_capacity(c.capacity());
                    wide.extend(c.iter().map(|&c| widen_u8(c)));
                    Codes::U32(wide)
                }
            }
            Codes::U16(c) if code >= u32::from(u16::MAX) => {
                let mut wide = Vec::with_capacity(c.capacity());
                wide.extend(c.iter().map(|&c| widen_u16(c)));
                Codes::U32(wide)
            }
            _ => return,
        };
        *self = wider;
    }

    pub fn push(&mut self, code: u32) {
        self.fit(code);
        match self {
            Codes::U8(c) => c.push(narrow_u8(code)),
            Codes::U16(c) => c.push(narrow_u16(code)),
            Codes::U32(c) => c.push(code),
        }
    }

    /// Makes the codes `rows` long, adding `code` (or cutting).
    pub fn resize(&mut self, rows: usize, code: u32) {
        if rows > self.len() {
            self.fit(code);
        }
        match self {
            Codes::U8(c) => c.resize(rows, narrow_u8(code)),
            Codes::U16(c) => c.resize(rows, narrow_u16(code)),
            Codes::U32(c) => c.resize(rows, code),
        }
    }

    pub fn reserve(&mut self, rows: usize) {
        match self {
            Codes::U8(c) => c.reserve(rows),
            Codes::U16(c) => c.reserve(rows),
            Codes::U32(c) => c.reserve(rows),
        }
    }
}

compact_column!(Codes, u32);

/// The hidden column holding each row's write time: when a write coordinator accepted the
/// point, epoch ms on its clock. A DELETE removes the matching points written at or before it
/// (the last write wins), so a point written again after a delete is never taken by that
/// delete, wherever it travels later (hint, repair copy, hand-off). The name is no valid field
/// name, so no client can send it; it never shows in results, schemas or digests. Rows without
/// it (stored before write times were kept) count as written at `i64::MIN`.
pub const WRITTEN_COLUMN: &str = "~written";

/// Write times are kept to the second, rounded up: a point costs a fraction of a byte for its
/// write time where milliseconds cost one to three (each request of a load has its own). A
/// DELETE is stamped the same way and sent to the replicas only once its coordinator's clock
/// has passed its stamp, so a write accepted before the DELETE came in compares at or before
/// it and one sent after any answer to it (or after its coordinator failed) compares after it.
/// The wait is up to a second; deletes are rare.
pub const WRITE_TIME_GRAIN_MS: i64 = 1000;

/// The write time of a point accepted at `at_ms` (see [`WRITE_TIME_GRAIN_MS`]).
pub fn write_time(at_ms: i64) -> i64 {
    at_ms
        .div_euclid(WRITE_TIME_GRAIN_MS)
        .saturating_add(i64::from(at_ms.rem_euclid(WRITE_TIME_GRAIN_MS) != 0))
        .saturating_mul(WRITE_TIME_GRAIN_MS)
}

/// The values of a batch's rows in 8 bytes a row (a `Num` takes 16): a memtable holds a
/// million of them at 20,000 series, a buffered point's largest part. Each value's bits (an
/// integer's two's complement, a decimal's IEEE 754 bits), and a bit per row that says which.
/// Serialized as a sequence of `Num`, as before.
#[derive(Debug, Clone, Default)]
pub struct Values {
    bits: Vec<u64>,
    /// Bit `i % 64` of word `i / 64`: value `i` is a decimal. Bits past the last row are 0.
    decimal: Vec<u64>,
}

impl Values {
    pub fn len(&self) -> usize {
        self.bits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    pub fn get(&self, row: usize) -> Num {
        let bits = self.bits[row];
        if self.decimal[row / 64] >> (row % 64) & 1 == 1 {
            Num::Dec(f64::from_bits(bits))
        } else {
            Num::Int(bits as i64)
        }
    }

    pub fn push(&mut self, value: Num) {
        let row = self.bits.len();
        if row.is_multiple_of(64) {
            self.decimal.push(0);
        }
        self.bits.push(match value {
            Num::Int(i) => i as u64,
            Num::Dec(d) => {
                self.decimal[row / 64] |= 1 << (row % 64);
                d.to_bits()
            }
        });
    }

    pub fn with_capacity(rows: usize) -> Self {
        let mut values = Self::default();
        values.reserve(rows);
        values
    }

    pub fn reserve(&mut self, rows: usize) {
        self.bits.reserve(rows);
        self.decimal.reserve(rows.div_ceil(64));
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Num> + '_ {
        (0..self.len()).map(|row| self.get(row))
    }

    /// Appends all of `other`'s values, a word of kinds at a time.
    pub fn extend_from(&mut self, other: &Values) {
        let start = self.bits.len();
        self.bits.extend_from_slice(&other.bits);
        let shift = start % 64;
        if shift == 0 {
            self.decimal.extend_from_slice(&other.decimal);
        } else {
            for &word in &other.decimal {
                *self.decimal.last_mut().expect("a partly used word") |= word << shift;
                self.decimal.push(word >> (64 - shift));
            }
        }
        // The last shifted word may hold no row.
        self.decimal.resize(self.bits.len().div_ceil(64), 0);
    }
}

compact_column!(Values, Num);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RowBatch {
    pub timestamps: Vec<i64>,
    pub values: Values,
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

    /// The dimension and tag columns a client sent (every column but the write time).
    pub fn fields(&self) -> impl Iterator<Item = (&String, &DictColumn)> {
        self.columns.iter().filter(|(name, _)| name.as_str() != WRITTEN_COLUMN)
    }

    /// Stamps every row as accepted at `at_ms` (see [`WRITTEN_COLUMN`] and [`write_time`]).
    pub fn stamp_written(&mut self, at_ms: i64) {
        let column = DictColumn {
            class: Some(FieldClass::Dimension),
            dict: vec![FieldValue::Int(write_time(at_ms))],
            codes: std::iter::repeat_n(0, self.len()).collect(),
        };
        self.columns.insert(WRITTEN_COLUMN.to_string(), column);
    }

    /// Each row's write time (see [`WRITTEN_COLUMN`]).
    pub fn written(&self) -> Vec<i64> {
        let Some(col) = self.columns.get(WRITTEN_COLUMN) else { return vec![i64::MIN; self.len()] };
        (0..self.len())
            .map(|r| match col.get(r) {
                Some(FieldValue::Int(at)) => *at,
                _ => i64::MIN,
            })
            .collect()
    }

    /// Rebuilds one row as a point (for raw query results).
    pub fn point(&self, row: usize) -> Point {
        let mut dimensions = BTreeMap::new();
        let mut tags = BTreeMap::new();
        for (name, col) in self.fields() {
            if let Some(v) = col.get(row) {
                match col.class {
                    Some(FieldClass::Tag) => tags.insert(name.clone(), v.clone()),
                    _ => dimensions.insert(name.clone(), v.clone()),
                };
            }
        }
        Point { timestamp: self.timestamps[row], value: self.values.get(row), dimensions, tags }
    }

    pub fn from_points<'a>(points: impl IntoIterator<Item = &'a Point>) -> Result<RowBatch, String> {
        let mut b = RowBatchBuilder::default();
        for p in points {
            b.push(p)?;
        }
        Ok(b.finish())
    }

    /// The given rows, in that order, as a new batch.
    pub fn select(&self, rows: &[usize]) -> RowBatch {
        let mut out = RowBatch {
            timestamps: rows.iter().map(|&r| self.timestamps[r]).collect(),
            values: rows.iter().map(|&r| self.values.get(r)).collect(),
            columns: BTreeMap::new(),
        };
        for (name, col) in &self.columns {
            let codes: Codes = rows.iter().map(|&r| col.codes.get(r)).collect();
            if codes.iter().any(|c| c != NULL_CODE) {
                out.columns.insert(name.clone(), DictColumn { class: col.class, dict: col.dict.clone(), codes });
            }
        }
        out
    }

    /// Checks the invariants a batch from an untrusted source must keep: aligned columns,
    /// codes inside their dictionary, known classes.
    pub fn validate(&self) -> Result<(), String> {
        if self.values.len() != self.timestamps.len() {
            return Err("values and timestamps differ in length".into());
        }
        for (name, col) in &self.columns {
            if col.codes.len() != self.len() || col.class.is_none() {
                return Err(format!("column {name} is malformed"));
            }
            if col.codes.iter().any(|c| c != NULL_CODE && c as usize >= col.dict.len()) {
                return Err(format!("column {name} has a code outside its dictionary"));
            }
        }
        Ok(())
    }
}

/// One dimension or tag of a row being appended.
pub type FieldEntry<'a> = (&'a str, FieldClass, FieldRef<'a>);

/// A field value borrowed from the request being parsed.
#[derive(Debug, Clone, Copy)]
pub enum FieldRef<'a> {
    Str(&'a str),
    Int(i64),
    Dec(f64),
}

impl FieldRef<'_> {
    fn to_owned_value(self) -> FieldValue {
        match self {
            FieldRef::Str(s) => FieldValue::Str(s.to_string()),
            FieldRef::Int(i) => FieldValue::Int(i),
            FieldRef::Dec(d) => FieldValue::Dec(d),
        }
    }
}

impl<'a> From<&'a FieldValue> for FieldRef<'a> {
    fn from(v: &'a FieldValue) -> Self {
        match v {
            FieldValue::Str(s) => FieldRef::Str(s),
            FieldValue::Int(i) => FieldRef::Int(*i),
            FieldValue::Dec(d) => FieldRef::Dec(*d),
        }
    }
}

/// Dictionary lookup for one column, by value type (f64 by its bits). Lookups by `&str` do
/// not allocate, which matters on the ingest path.
#[derive(Debug)]
struct ColumnIndex {
    class: FieldClass,
    strs: FastMap<String, u32>,
    ints: FastMap<i64, u32>,
    decs: FastMap<u64, u32>,
}

impl ColumnIndex {
    fn code(&mut self, dict: &mut Vec<FieldValue>, value: FieldRef) -> u32 {
        let next = dict.len() as u32;
        let code = match value {
            FieldRef::Str(s) => match self.strs.get(s) {
                Some(&c) => return c,
                None => *self.strs.entry(s.to_string()).or_insert(next),
            },
            FieldRef::Int(i) => *self.ints.entry(i).or_insert(next),
            FieldRef::Dec(d) => *self.decs.entry(d.to_bits()).or_insert(next),
        };
        if code == next {
            dict.push(value.to_owned_value());
        }
        code
    }
}

/// Checks a dimension or tag a client sent: its name (valid, not reserved) and its value.
pub fn check_field(name: &str, class: FieldClass, value: FieldRef) -> Result<(), String> {
    validate_name(class.as_str(), name)?;
    if name == "value" || name == "timestamp" {
        return Err(format!("{class} name {name:?} is reserved"));
    }
    check_value(name, class, value)
}

/// Checks a dimension or tag value: a finite number or a string of bounded length.
fn check_value(name: &str, class: FieldClass, value: FieldRef) -> Result<(), String> {
    match value {
        FieldRef::Dec(d) if !d.is_finite() => Err(format!("{class} {name:?} value {d} is not a finite number")),
        FieldRef::Str(s) if s.len() > STRING_VALUE_LEN_MAX => {
            Err(format!("{class} {name:?} is longer than {STRING_VALUE_LEN_MAX} bytes"))
        }
        _ => Ok(()),
    }
}

/// Appends rows to a `RowBatch`, keeping one dictionary per column.
#[derive(Debug, Default)]
pub struct RowBatchBuilder {
    pub batch: RowBatch,
    index: FastMap<String, ColumnIndex>,
    /// Rows each column is allocated for when it is created.
    rows_reserved: usize,
}

impl RowBatchBuilder {
    /// An empty builder whose columns are allocated for `rows` rows from the start: a memtable
    /// that expects as many points as the last one held grows without copying them.
    pub fn with_capacity(rows: usize) -> Self {
        let mut builder = Self { rows_reserved: rows, ..Self::default() };
        builder.batch.timestamps.reserve(rows);
        builder.batch.values.reserve(rows);
        builder
    }

    /// Appends one row, validating what a client could get wrong: the timestamp's range, names,
    /// the class of a name (dimension or tag), string lengths, finite numbers.
    pub fn push_row(
        &mut self,
        timestamp: i64,
        value: Num,
        fields: &[(&str, FieldClass, FieldRef)],
    ) -> Result<(), String> {
        super::check_timestamp(timestamp)?;
        if let Num::Dec(d) = value
            && !d.is_finite()
        {
            return Err(format!("value {d} is not a finite number"));
        }
        for &(name, class, v) in fields {
            match self.index.get(name) {
                Some(col) if col.class != class => {
                    return Err(format!("field {name:?} is sent both as a {} and as a {class}", col.class));
                }
                Some(_) => check_value(name, class, v)?,
                None => check_field(name, class, v)?,
            }
        }
        let row = self.batch.len();
        for (i, &(name, _, _)) in fields.iter().enumerate() {
            if fields[..i].iter().any(|(n, _, _)| *n == name) {
                return Err(format!("field {name:?} appears twice in one point"));
            }
        }
        self.batch.timestamps.push(timestamp);
        self.batch.values.push(value);
        for &(name, class, v) in fields {
            let (index, col) = self.column(name, class, row);
            let code = index.code(&mut col.dict, v);
            col.codes.push(code);
        }
        self.pad_nulls(row + 1);
        Ok(())
    }

    pub fn push(&mut self, point: &Point) -> Result<(), String> {
        let fields: Vec<FieldEntry> = point
            .dimensions
            .iter()
            .map(|(n, v)| (n.as_str(), FieldClass::Dimension, v.into()))
            .chain(point.tags.iter().map(|(n, v)| (n.as_str(), FieldClass::Tag, v.into())))
            .collect();
        self.push_row(point.timestamp, point.value, &fields)
    }

    fn column(&mut self, name: &str, class: FieldClass, rows: usize) -> (&mut ColumnIndex, &mut DictColumn) {
        if !self.index.contains_key(name) {
            let index =
                ColumnIndex { class, strs: FastMap::default(), ints: FastMap::default(), decs: FastMap::default() };
            self.index.insert(name.to_string(), index);
            let mut codes = Codes::with_capacity(self.rows_reserved.max(rows));
            codes.resize(rows, NULL_CODE);
            let col = DictColumn { class: Some(class), dict: Vec::new(), codes };
            self.batch.columns.insert(name.to_string(), col);
        }
        let index = self.index.get_mut(name).expect("inserted above");
        let col = self.batch.columns.get_mut(name).expect("inserted with its index");
        (index, col)
    }

    /// Columns a row had no value for get nulls, keeping every column `rows` long.
    fn pad_nulls(&mut self, rows: usize) {
        for col in self.batch.columns.values_mut() {
            if col.codes.len() < rows {
                col.codes.resize(rows, NULL_CODE);
            }
        }
    }

    /// Appends the rows of `batch` that `keep` selects (all when `None`), re-coding each column
    /// against this builder's dictionaries: the cost is per distinct value plus a copy per row.
    pub fn extend_from(&mut self, batch: &RowBatch, keep: Option<&[bool]>) {
        let selected = |r: usize| keep.is_none_or(|k| k[r]);
        let start = self.batch.len();
        if keep.is_none() {
            self.batch.timestamps.extend_from_slice(&batch.timestamps);
            self.batch.values.extend_from(&batch.values);
        } else {
            for r in (0..batch.len()).filter(|&r| selected(r)) {
                self.batch.timestamps.push(batch.timestamps[r]);
                self.batch.values.push(batch.values.get(r));
            }
        }
        for (name, src) in &batch.columns {
            let class = src.class.unwrap_or(FieldClass::Dimension);
            let (index, col) = self.column(name, class, start);
            let remap: Vec<u32> = src.dict.iter().map(|v| index.code(&mut col.dict, v.into())).collect();
            let recode = |c: u32| if c == NULL_CODE { NULL_CODE } else { remap[c as usize] };
            if keep.is_none() {
                col.codes.extend(src.codes.iter().map(recode));
            } else {
                col.codes.extend((0..batch.len()).filter(|&r| selected(r)).map(|r| recode(src.codes.get(r))));
            }
        }
        self.pad_nulls(self.batch.len());
    }

    pub fn finish(self) -> RowBatch {
        self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_times_round_up_to_the_second() {
        assert_eq!(write_time(5_000), 5_000);
        assert_eq!(write_time(5_001), 6_000);
        assert_eq!(write_time(5_999), 6_000);
        assert_eq!(write_time(-1), 0);
        assert_eq!(write_time(-1_000), -1_000);
        assert_eq!(write_time(i64::MAX), i64::MAX, "saturates instead of overflowing");
        let mut b = RowBatchBuilder::default();
        b.push(&Point { timestamp: 1, value: Num::Int(1), dimensions: Default::default(), tags: Default::default() })
            .unwrap();
        let mut batch = b.finish();
        batch.stamp_written(1_234);
        assert_eq!(batch.written(), [2_000]);
    }

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
            b.push(p).unwrap();
        }
        let batch = b.finish();
        assert_eq!(batch.columns["region"].codes.iter().collect::<Vec<_>>(), [0, NULL_CODE, 0]);
        assert_eq!(batch.columns["cpu"].codes.iter().collect::<Vec<_>>(), [NULL_CODE, 0, NULL_CODE]);
        assert_eq!(batch.point(0), p1);
        assert_eq!(batch.point(1), p2);
        assert_eq!(batch.point(2), p3);
        let sel = batch.select(&[2, 0]);
        assert_eq!(sel.point(0), p3);
        assert!(!sel.columns.contains_key("cpu"));
        batch.validate().unwrap();

        // Re-coding into another builder with its own dictionaries keeps every row.
        let mut other = RowBatchBuilder::default();
        let mut p0 = p1.clone();
        p0.tags.insert("region".into(), FieldValue::Str("us".into()));
        other.push(&p0).unwrap();
        other.extend_from(&batch, Some(&[true, true, false]));
        let merged = other.finish();
        assert_eq!(merged.len(), 3);
        assert_eq!((merged.point(0), merged.point(1), merged.point(2)), (p0, p1, p2));
    }

    #[test]
    fn push_row_rejects_what_a_client_gets_wrong() {
        let mut b = RowBatchBuilder::default();
        b.push_row(1, Num::Int(1), &[("region", FieldClass::Tag, FieldRef::Str("eu"))]).unwrap();
        let cases: Vec<(Vec<FieldEntry>, &str)> = vec![
            (vec![("region", FieldClass::Dimension, FieldRef::Str("eu"))], "both as a tag and as a dimension"),
            (vec![("9x", FieldClass::Tag, FieldRef::Int(1))], "name"),
            (vec![("value", FieldClass::Tag, FieldRef::Int(1))], "reserved"),
            (vec![("d", FieldClass::Dimension, FieldRef::Dec(f64::NAN))], "finite"),
            (vec![("a", FieldClass::Tag, FieldRef::Int(1)), ("a", FieldClass::Tag, FieldRef::Int(2))], "twice"),
        ];
        for (fields, needle) in cases {
            let err = b.push_row(2, Num::Int(1), &fields).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        assert_eq!(b.finish().len(), 1, "rejected rows leave no trace");
    }

    use proptest::prelude::Strategy as _;

    proptest::proptest! {
        /// Values appended one by one, a batch at a time (at any offset in a word of kinds) or
        /// read back from the wire are the very `Num`s given, and go on the wire as a `Vec<Num>`
        /// does (WAL records and requests written before stay readable).
        #[test]
        fn values_hold_each_kind_and_travel_as_nums(
            first in proptest::collection::vec(proptest::prop_oneof![
                proptest::num::i64::ANY.prop_map(Num::Int),
                proptest::num::f64::NORMAL.prop_map(Num::Dec),
            ], 0..200),
            second in proptest::collection::vec(proptest::prop_oneof![
                proptest::num::i64::ANY.prop_map(Num::Int),
                (-1e9f64..1e9).prop_map(Num::Dec),
            ], 0..200),
        ) {
            let mut values: Values = first.iter().copied().collect();
            values.extend_from(&second.iter().copied().collect());
            let all: Vec<Num> = first.iter().chain(&second).copied().collect();
            let bits = |v: &[Num]| v.iter().map(|n| match n {
                Num::Int(i) => (0, *i as u64),
                Num::Dec(d) => (1, d.to_bits()),
            }).collect::<Vec<_>>();
            proptest::prop_assert_eq!(values.len(), all.len());
            proptest::prop_assert_eq!(bits(&values.iter().collect::<Vec<_>>()), bits(&all));
            let wire = postcard::to_stdvec(&values).unwrap();
            proptest::prop_assert_eq!(&wire, &postcard::to_stdvec(&all).unwrap());
            let back: Values = postcard::from_bytes(&wire).unwrap();
            proptest::prop_assert_eq!(bits(&back.iter().collect::<Vec<_>>()), bits(&all));
        }
    }

    proptest::proptest! {
        /// Codes pushed, resized and widened (past 255, past 65,535) read back as the `u32`s
        /// given, nulls included, and go on the wire as a `Vec<u32>` does.
        #[test]
        fn codes_widen_as_needed_and_travel_as_u32s(
            steps in proptest::collection::vec((0u8..4, 0u32..70_000, 0usize..40), 0..60),
        ) {
            let mut codes = Codes::default();
            let mut model: Vec<u32> = Vec::new();
            for (op, code, rows) in steps {
                let code = match op { 0 => NULL_CODE, 1 => code % 300, _ => code };
                if op == 3 {
                    codes.resize(model.len() + rows, code);
                    model.resize(model.len() + rows, code);
                } else {
                    codes.push(code);
                    model.push(code);
                }
            }
            proptest::prop_assert_eq!(codes.iter().collect::<Vec<_>>(), model.clone());
            let wire = postcard::to_stdvec(&codes).unwrap();
            proptest::prop_assert_eq!(&wire, &postcard::to_stdvec(&model).unwrap());
            let back: Codes = postcard::from_bytes(&wire).unwrap();
            proptest::prop_assert_eq!(back.iter().collect::<Vec<_>>(), model.clone());
            let widest = model.iter().filter(|&&c| c != NULL_CODE).max().copied().unwrap_or(0);
            let width = match &codes { Codes::U8(_) => 1, Codes::U16(_) => 2, Codes::U32(_) => 4 };
            proptest::prop_assert_eq!(width, if widest < 255 { 1 } else if widest < 65_535 { 2 } else { 4 });
        }
    }
}
