//! What replica repair compares: per time block of a shard, the number of points and an
//! order-independent hash of them (the wrapping sum of a hash per point). Two replicas holding
//! the same points have the same block digests whatever order the points arrived in, so repair
//! transfers only the blocks whose digests differ.

use crate::model::batch::RowBatch;
use crate::model::{FieldValue, Num};
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

/// FNV-1a over a canonical encoding of the point, then a finalizer so that sums of hashes of
/// similar points do not cancel out. Stable across processes and versions of Rust.
pub fn point_hash(batch: &RowBatch, row: usize) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.bytes(&batch.timestamps[row].to_le_bytes());
    num(&mut h, batch.values[row]);
    for (name, col) in &batch.columns {
        if let Some(v) = col.get(row) {
            h.bytes(name.as_bytes());
            h.bytes(&[0xff, col.class.map_or(0, |c| c as u8)]);
            match v {
                FieldValue::Int(i) => num(&mut h, Num::Int(*i)),
                FieldValue::Dec(d) => num(&mut h, Num::Dec(*d)),
                FieldValue::Str(s) => {
                    h.bytes(&[3]);
                    h.bytes(s.as_bytes());
                    h.bytes(&[0xff]);
                }
            }
        }
    }
    mix(h.0)
}

struct Fnv(u64);

impl Fnv {
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
    }
}
