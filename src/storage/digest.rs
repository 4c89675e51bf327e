//! What replica repair compares: per time block of a shard, the number of points and an
//! order-independent hash of them (the wrapping sum of a hash per point). Two replicas holding
//! the same points have the same block digests whatever order the points arrived in, so repair
//! transfers only the blocks whose digests differ.

use crate::model::batch::{NULL_CODE, RowBatch};
use crate::model::{FieldClass, FieldValue, Num};
use serde::{Deserialize, Serialize};

/// One time block `[start, start + block_ms)` of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDigest {
    pub start: i64,
    pub count: u64,
    pub hash: u64,
}

impl BlockDigest {
    /// The whole-shard digest `GET /cluster/shards?verify=true` shows: blocks summed.
    pub fn total(blocks: &[BlockDigest]) -> (u64, u64) {
        blocks.iter().fold((0, 0), |(c, h), b| (c + b.count, h.wrapping_add(b.hash)))
    }
}

/// The hash of every row of a batch, in row order. Each distinct dimension/tag value is hashed
/// once (its column's dictionary), and the columns are walked one after the other, so a row
/// costs a hash of its timestamp and value plus one add per field. The result depends only on
/// the point, never on the batch it sits in, and is stable across processes (FNV-1a over a
/// canonical encoding of field values, splitmix finalizers).
pub fn row_hashes(batch: &RowBatch) -> Vec<u64> {
    let mut fields = vec![0u64; batch.len()];
    // Not the write time: replicas holding one point written twice agree on it.
    for (name, col) in batch.fields() {
        let dict: Vec<u64> = col.dict.iter().map(|v| field_hash(name, col.class, v)).collect();
        for (sum, code) in fields.iter_mut().zip(col.codes.iter()) {
            if code != NULL_CODE {
                *sum = sum.wrapping_add(dict[code as usize]);
            }
        }
    }
    // The timestamp and value as whole words through the splitmix finalizer: FNV's byte loop
    // was a chain of 17 dependent multiplications per row.
    batch
        .timestamps
        .iter()
        .zip(batch.values.iter())
        .zip(&fields)
        .map(|((&ts, value), &fields)| {
            let value = match value {
                Num::Int(i) => i as u64,
                Num::Dec(d) => d.to_bits() ^ DECIMAL_SALT,
            };
            mix(mix(mix(ts as u64 ^ TIMESTAMP_SALT) ^ value) ^ fields)
        })
        .collect()
}

/// One dimension's or tag's value; a row's fields hash as the sum of these.
fn field_hash(name: &str, class: Option<FieldClass>, value: &FieldValue) -> u64 {
    let mut h = Fnv::new();
    h.bytes(name.as_bytes());
    h.bytes(&[0xff, class.map_or(0, |c| c as u8)]);
    match value {
        FieldValue::Int(i) => num(&mut h, Num::Int(*i)),
        FieldValue::Dec(d) => num(&mut h, Num::Dec(*d)),
        FieldValue::Str(s) => {
            h.bytes(&[3]);
            h.bytes(s.as_bytes());
        }
    }
    mix(h.0)
}

/// The hash of each row's tags, its series: rows of one series hash alike whatever their
/// batch, and as [`series_hash`] of the series' tags does.
pub fn series_hashes(batch: &RowBatch) -> Vec<u64> {
    let mut sums = vec![0u64; batch.len()];
    for (name, col) in batch.columns.iter().filter(|(_, col)| col.class == Some(FieldClass::Tag)) {
        let dict: Vec<u64> = col.dict.iter().map(|v| field_hash(name, col.class, v)).collect();
        for (sum, code) in sums.iter_mut().zip(col.codes.iter()) {
            if code != NULL_CODE {
                *sum = sum.wrapping_add(dict[code as usize]);
            }
        }
    }
    sums
}

/// The hash of a series given its tags (see [`series_hashes`]).
pub fn series_hash(tags: &[(String, FieldValue)]) -> u64 {
    tags.iter().fold(0u64, |sum, (name, value)| sum.wrapping_add(field_hash(name, Some(FieldClass::Tag), value)))
}

/// The hash of one row; for many rows of a batch use [`row_hashes`].
pub fn point_hash(batch: &RowBatch, row: usize) -> u64 {
    row_hashes(batch)[row]
}

/// Whether two rows (of any two batches) are the same point: same timestamp, value (an
/// integer is not a decimal) and the same dimension and tag values.
pub fn same_point(a: &RowBatch, ra: usize, b: &RowBatch, rb: usize) -> bool {
    if a.timestamps[ra] != b.timestamps[rb] || !same_num(a.values.get(ra), b.values.get(rb)) {
        return false;
    }
    fn fields(batch: &RowBatch, row: usize) -> impl Iterator<Item = (&String, Option<FieldClass>, &FieldValue)> {
        batch.fields().filter_map(move |(name, col)| col.get(row).map(|v| (name, col.class, v)))
    }
    let mut fa = fields(a, ra);
    let mut fb = fields(b, rb);
    loop {
        match (fa.next(), fb.next()) {
            (None, None) => return true,
            (Some((na, ca, va)), Some((nb, cb, vb))) => {
                let same_value = match (va, vb) {
                    (FieldValue::Int(x), FieldValue::Int(y)) => x == y,
                    (FieldValue::Dec(x), FieldValue::Dec(y)) => x.to_bits() == y.to_bits(),
                    (FieldValue::Str(x), FieldValue::Str(y)) => x == y,
                    _ => false,
                };
                if na != nb || ca != cb || !same_value {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

fn same_num(a: Num, b: Num) -> bool {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => x == y,
        (Num::Dec(x), Num::Dec(y)) => x.to_bits() == y.to_bits(),
        _ => false,
    }
}

/// Keep a timestamp of 0 from hashing as 0, and an integer from hashing as the decimal with
/// the same bits (`1i` and `1.0` are different points).
const TIMESTAMP_SALT: u64 = 0x9e37_79b9_7f4a_7c15;
const DECIMAL_SALT: u64 = 0xd6e8_feb8_6659_fd93;

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn num(h: &mut Fnv, n: Num) {
    match n {
        Num::Int(i) => {
            h.bytes(&[1]);
            h.bytes(&i.to_le_bytes());
        }
        Num::Dec(d) => {
            h.bytes(&[2]);
            h.bytes(&d.to_bits().to_le_bytes());
        }
    }
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Point;

    fn point(ts: i64, v: i64, region: &str) -> Point {
        let mut p =
            Point { timestamp: ts, value: Num::Int(v), dimensions: Default::default(), tags: Default::default() };
        p.tags.insert("region".into(), FieldValue::Str(region.into()));
        p
    }

    #[test]
    fn hash_depends_on_every_part_of_a_point_and_not_on_the_batch() {
        let a = RowBatch::from_points(&[point(1, 1, "eu"), point(2, 5, "us")]).unwrap();
        let b = RowBatch::from_points(&[point(2, 5, "us")]).unwrap();
        assert_eq!(point_hash(&a, 1), point_hash(&b, 0), "dictionary codes must not matter");
        let variants = [point(1, 1, "eu"), point(2, 1, "eu"), point(1, 2, "eu"), point(1, 1, "us")];
        let hashes: std::collections::BTreeSet<u64> =
            variants.iter().map(|p| point_hash(&RowBatch::from_points([p]).unwrap(), 0)).collect();
        assert_eq!(hashes.len(), variants.len());
        let mut dec = point(1, 1, "eu");
        dec.value = Num::Dec(1.0);
        assert_ne!(point_hash(&RowBatch::from_points([&dec]).unwrap(), 0), point_hash(&a, 0), "1i is not 1.0");
        let c = RowBatch::from_points(&[point(2, 5, "us"), point(1, 1, "eu"), dec.clone()]).unwrap();
        assert!(same_point(&a, 0, &c, 1) && same_point(&a, 1, &b, 0));
        assert!(!same_point(&a, 0, &c, 2) && !same_point(&a, 0, &c, 0));
    }

    #[test]
    fn a_rows_series_hash_is_its_tags_hash() {
        let batch = RowBatch::from_points(&[point(1, 1, "eu"), point(2, 5, "us"), point(3, 7, "eu")]).unwrap();
        let rows = series_hashes(&batch);
        assert_eq!(rows[0], rows[2]);
        assert_ne!(rows[0], rows[1]);
        assert_eq!(rows[1], series_hash(&[("region".into(), FieldValue::Str("us".into()))]));
        assert_eq!(series_hash(&[]), 0, "no tags");
    }
}
