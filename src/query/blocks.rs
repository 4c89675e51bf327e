//! A select over a shard's segments reads as little as their index allows: the tag postings
//! find the series a filter selects, a block's time range and value range settle the filter for
//! all its points at once, and an aggregate takes the summary of a block that lies wholly inside
//! its time range and bucket instead of decoding it. Whatever is not settled that way is decoded
//! and filtered point by point, so answers are the same either way.

use super::exec::{self, Partial, compare, field_of, matches_leaf};
use super::plan::{AggFn, Aggregate, CmpOp, Filter, Projection, SelectPlan};
use crate::model::batch::RowBatch;
use crate::model::{FieldValue, Key};
use crate::storage::segment::{BlockMeta, Segment};
use crate::storage::shard::{BlockUse, BlockVisitor};

/// What a filter says about all the points of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    All,
    None,
    /// Some may match: only the points can tell.
    Some,
}

impl Verdict {
    fn of(all: bool) -> Self {
        if all { Verdict::All } else { Verdict::None }
    }
    fn not(self) -> Self {
        match self {
            Verdict::All => Verdict::None,
            Verdict::None => Verdict::All,
            Verdict::Some => Verdict::Some,
        }
    }
}

fn verdict(f: &Filter, seg: &Segment, meta: &BlockMeta) -> Verdict {
    match f {
        Filter::And(a, b) => match (verdict(a, seg, meta), verdict(b, seg, meta)) {
            (Verdict::None, _) | (_, Verdict::None) => Verdict::None,
            (Verdict::All, Verdict::All) => Verdict::All,
            _ => Verdict::Some,
        },
        Filter::Or(a, b) => match (verdict(a, seg, meta), verdict(b, seg, meta)) {
            (Verdict::All, _) | (_, Verdict::All) => Verdict::All,
            (Verdict::None, Verdict::None) => Verdict::None,
            _ => Verdict::Some,
        },
        Filter::Not(a) => verdict(a, seg, meta).not(),
        leaf => match field_of(leaf) {
            "timestamp" => over_range(leaf, &FieldValue::Int(meta.min_ts), &FieldValue::Int(meta.max_ts)),
            "value" => match meta.summary().and_then(|s| s.min.zip(s.max)) {
                Some((lo, hi)) => over_range(leaf, &lo.into(), &hi.into()),
                None => Verdict::Some,
            },
            name => {
                let Some(series) = seg.series(meta.series) else { return Verdict::Some };
                match series.iter().find(|(tag, _)| tag == name) {
                    Some((_, value)) => Verdict::of(matches_leaf(leaf, Some(value))),
                    // A tag of other series: none of this one's points has it.
                    None if seg.has_tag(name) => Verdict::of(matches_leaf(leaf, None)),
                    // Perhaps a dimension, which varies point by point.
                    None => Verdict::Some,
                }
            }
        },
    }
}

/// What a comparison says about points whose field lies in `[lo, hi]` (numbers).
fn over_range(leaf: &Filter, lo: &FieldValue, hi: &FieldValue) -> Verdict {
    let Filter::Cmp { op, value, .. } = leaf else {
        return match leaf {
            // Timestamps and values are never null.
            Filter::IsNull { negated, .. } => Verdict::of(*negated),
            _ => Verdict::Some,
        };
    };
    let holds = |v: &FieldValue, op: CmpOp| compare(v, op, value);
    match op {
        CmpOp::Lt | CmpOp::LtEq if holds(hi, *op) => Verdict::All,
        CmpOp::Lt | CmpOp::LtEq if !holds(lo, *op) => Verdict::None,
        CmpOp::Gt | CmpOp::GtEq if holds(lo, *op) => Verdict::All,
        CmpOp::Gt | CmpOp::GtEq if !holds(hi, *op) => Verdict::None,
        CmpOp::Eq | CmpOp::NotEq => {
            let equal = if !holds(lo, CmpOp::LtEq) || !holds(hi, CmpOp::GtEq) {
                Verdict::None
            } else if holds(lo, CmpOp::Eq) && holds(hi, CmpOp::Eq) {
                Verdict::All
            } else {
                Verdict::Some
            };
            if *op == CmpOp::Eq { equal } else { equal.not() }
        }
        _ => Verdict::Some,
    }
}

/// The series of `seg` that the filter's top-level tag equalities allow, from the postings;
/// `None` when it has none the index answers.
fn candidates(f: &Filter, seg: &Segment) -> Option<Vec<u32>> {
    match f {
        Filter::And(a, b) => match (candidates(a, seg), candidates(b, seg)) {
            (Some(x), Some(y)) => Some(x.into_iter().filter(|id| y.binary_search(id).is_ok()).collect()),
            (x, y) => x.or(y),
        },
        Filter::Cmp { field, op: CmpOp::Eq, value: value @ FieldValue::Str(_) } => {
            seg.series_with(field, value).map(<[u32]>::to_vec)
        }
        Filter::In { field, values, negated: false } if values.iter().all(|v| matches!(v, FieldValue::Str(_))) => {
            let mut ids = Vec::new();
            for value in values {
                ids.extend_from_slice(seg.series_with(field, value)?);
            }
            ids.sort_unstable();
            ids.dedup();
            Some(ids)
        }
        _ => None,
    }
}

/// The group all points of a block fall in.
struct Group {
    tags: Vec<Key>,
    bucket: Option<i64>,
}

/// Runs one select over one shard's points into a partial.
pub struct SelectVisitor<'a> {
    plan: &'a SelectPlan,
    /// The plan's filter less the time bounds that `range` already applies.
    residual: Option<Filter>,
    range: (i64, i64),
    max: usize,
    pub partial: Partial,
    pub too_large: bool,
}

impl<'a> SelectVisitor<'a> {
    pub fn new(plan: &'a SelectPlan, range: (i64, i64), max: usize) -> Self {
        // The range applies the filter's time bounds (whatever the caller passed), so they
        // are not checked again per row.
        let bounds = plan.filter.as_ref().map_or((i64::MIN, i64::MAX), Filter::time_range);
        let range = (range.0.max(bounds.0), range.1.min(bounds.1));
        let residual = plan.filter.as_ref().and_then(Filter::without_time_bounds);
        Self { plan, residual, range, max, partial: Partial::empty(plan), too_large: false }
    }

    /// The group that all points of block `meta` fall in, when its summary can stand for
    /// them: every point passes the filter and lies in the range and in one bucket.
    /// `Some(None)`: the points belong to no group (the series lacks a grouping tag).
    fn summary_group(&self, seg: &Segment, meta: &BlockMeta) -> Option<Option<Group>> {
        let (from, to) = self.range;
        if meta.min_ts < from || meta.max_ts >= to {
            return None;
        }
        if let Some(f) = &self.plan.filter
            && verdict(f, seg, meta) != Verdict::All
        {
            return None;
        }
        let Some(group) = &self.plan.group else { return Some(Some(Group { tags: Vec::new(), bucket: None })) };
        let bucket = match group.interval {
            Some(w) if meta.min_ts.div_euclid(w) != meta.max_ts.div_euclid(w) => return None,
            Some(w) => Some(meta.min_ts.div_euclid(w) * w),
            None => None,
        };
        let series = seg.series(meta.series)?;
        let mut tags = Vec::with_capacity(group.tags.len());
        for name in &group.tags {
            match series.iter().find(|(tag, _)| tag == name) {
                Some((_, value)) => tags.push(Key(value.clone())),
                None if seg.has_tag(name) => return Some(None),
                None => return None,
            }
        }
        Some(Some(Group { tags, bucket }))
    }
}

impl BlockVisitor for SelectVisitor<'_> {
    fn series(&mut self, seg: &Segment) -> Option<Vec<u32>> {
        self.plan.filter.as_ref().and_then(|f| candidates(f, seg))
    }

    fn block(&mut self, seg: &Segment, meta: &BlockMeta) -> BlockUse {
        if self.too_large || self.plan.filter.as_ref().is_some_and(|f| verdict(f, seg, meta) == Verdict::None) {
            return BlockUse::Skip;
        }
        let Projection::Aggregate(Aggregate::Value(agg)) = &self.plan.projection else { return BlockUse::Decode };
        let (Some(summary), Some(key)) = (meta.summary(), self.summary_group(seg, meta)) else {
            return BlockUse::Decode;
        };
        let (Some(key), Partial::Groups(groups)) = (key, &mut self.partial) else { return BlockUse::Skip };
        let state = groups.state(&key.tags, key.bucket);
        if matches!(agg, AggFn::Min | AggFn::Max | AggFn::First | AggFn::Last) {
            state.summary.merge(&summary);
        } else {
            // What the points would have added: count and sums only.
            state.summary.merge_sums(&summary);
        }
        self.too_large = self.partial.size(self.plan) > self.max;
        BlockUse::Skip
    }

    fn rows(&mut self, batch: &RowBatch) {
        if self.too_large {
            return;
        }
        exec::scan_batch(self.plan, self.residual.as_ref(), batch, self.range.0, self.range.1, &mut self.partial);
        self.partial.trim(self.plan);
        self.too_large = self.partial.size(self.plan) > self.max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::batch::RowBatch;
    use crate::model::{MetricKey, Num, Point};
    use crate::query::plan::{self, Statement};
    use crate::storage::{Storage, StorageConfig, TombstoneRule};
    use std::sync::Arc;

    const HOUR: i64 = 3_600_000;

    /// 12 series (3 regions × 4 hosts, a few points without a host) with a `core` dimension,
    /// over 30 hours, in two days' shards; integers and decimals that are multiples of 1/8, so
    /// sums are exact in any order.
    fn points(seed: u64, n: usize) -> Vec<Point> {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        (0..n)
            .map(|i| {
                let mut p = Point {
                    timestamp: (next() % (30 * HOUR as u64)) as i64,
                    value: if i % 2 == 0 {
                        Num::Int(next() as i64 % 100)
                    } else {
                        Num::Dec((next() % 800) as f64 / 8.0)
                    },
                    dimensions: Default::default(),
                    tags: Default::default(),
                };
                p.tags.insert("region".into(), FieldValue::Str(["eu", "us", "ap"][i % 3].into()));
                if i % 17 != 0 {
                    p.tags.insert("host".into(), FieldValue::Str(format!("h{}", next() % 4)));
                }
                p.dimensions.insert("core".into(), FieldValue::Int(next() as i64 % 4));
                p
            })
            .collect()
    }

    /// Counts the blocks a visitor decodes.
    struct Counting<'a, 'b>(&'a mut SelectVisitor<'b>, usize);
    impl BlockVisitor for Counting<'_, '_> {
        fn series(&mut self, seg: &Segment) -> Option<Vec<u32>> {
            self.0.series(seg)
        }
        fn block(&mut self, seg: &Segment, meta: &BlockMeta) -> BlockUse {
            let used = self.0.block(seg, meta);
            self.1 += usize::from(used == BlockUse::Decode);
            used
        }
        fn rows(&mut self, batch: &RowBatch) {
            self.0.rows(batch)
        }
    }

    #[tokio::test]
    async fn index_and_summaries_give_the_answers_of_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig {
            shard_interval_ms: 24 * HOUR,
            memtable_points_max: 1_000_000,
            memtable_budget_points: 4_000_000,
            flush_interval: std::time::Duration::from_secs(3600),
            segments_max: 3,
            tombstone_grace_ms: 1000,
            wal_file_bytes: crate::storage::wal::WAL_FILE_BYTES,
            wal_salvage: false,
        };
        let keep_all: TombstoneRule = Arc::new(|_| Box::new(|b: &RowBatch| vec![true; b.len()]));
        let storage = Storage::open(dir.path(), cfg, Arc::new(Metrics::default()), keep_all).await.unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        // Two flushed rounds (segments) and one left in the memtable.
        for round in 0..3u64 {
            storage.write(&key, RowBatch::from_points(&points(round, 4000)).unwrap()).await.unwrap();
            if round < 2 {
                storage.flush_all().await.unwrap();
            }
        }
        let queries = [
            "SELECT count(*) FROM m",
            "SELECT sum(value) FROM m GROUP BY region",
            "SELECT avg(value) FROM m GROUP BY host",
            "SELECT max(value) FROM m WHERE host = 'h1'",
            "SELECT min(value) FROM m WHERE host = 'h1' OR region = 'eu'",
            "SELECT first(value) FROM m WHERE region IN ('eu', 'ap') GROUP BY host",
            "SELECT last(value) FROM m WHERE host != 'h2' GROUP BY region, host",
            "SELECT avg(value) FROM m GROUP BY INTERVAL 1h",
            "SELECT sum(value) FROM m GROUP BY region, INTERVAL 2h",
            "SELECT count(*) FROM m GROUP BY host, INTERVAL 1m",
            "SELECT count(*) FROM m WHERE timestamp >= 7200000 AND timestamp < 50000000 GROUP BY host",
            "SELECT max(value) FROM m WHERE value < 50 GROUP BY region",
            "SELECT count(*) FROM m WHERE value >= 0 AND core = 2",
            "SELECT count(*) FROM m WHERE host IS NULL",
            "SELECT count(distinct core) FROM m GROUP BY region",
            "SELECT * FROM m WHERE host = 'h3' AND timestamp < 3600000 ORDER BY timestamp LIMIT 20",
            "SELECT value FROM m WHERE region = 'us' AND value > 90 ORDER BY value DESC LIMIT 7",
        ];
        for sql in queries {
            let Statement::Select(plan) = plan::parse(sql, 0).unwrap() else { unreachable!() };
            let range = crate::query::time_range(plan.filter.as_ref(), None, None);
            let indexed = crate::query::partial_of_shards(
                storage.shards_of(&key, range.0, range.1).into_iter().map(|s| s.snapshot()),
                &plan,
                range,
                1 << 30,
            )
            .unwrap();
            let mut full = Partial::empty(&plan);
            for shard in storage.shards_of(&key, range.0, range.1) {
                shard
                    .scan(range.0, range.1, None, &mut |b| {
                        exec::scan_batch(&plan, plan.filter.as_ref(), b, range.0, range.1, &mut full)
                    })
                    .unwrap();
            }
            // Split over 3 parts, as a scan over several cores does (the caller splits only
            // large scans, so this fixture would not be split there).
            let mut split = Partial::empty(&plan);
            for shard in storage.shards_of(&key, range.0, range.1) {
                let snapshot = shard.snapshot();
                for part in 0..3 {
                    let mut visitor = SelectVisitor::new(&plan, range, 1 << 30);
                    snapshot.visit_part(range.0, range.1, None, &mut visitor, part, 3).unwrap();
                    split.merge(visitor.partial);
                    split.trim(&plan);
                }
            }
            let finish = |partial| crate::query::answer::finish(&plan, partial).into_points();
            let full = finish(full);
            assert_eq!(finish(split), full, "{sql} split in parts");
            assert_eq!(finish(indexed), full, "{sql}");
        }
        // How many segment blocks a select decodes over all the metric's shards.
        let decoded = |sql: &str| {
            let Statement::Select(plan) = plan::parse(sql, 0).unwrap() else { unreachable!() };
            let mut decoded = 0;
            for shard in storage.shards_of(&key, i64::MIN, i64::MAX) {
                let mut visitor = SelectVisitor::new(&plan, (i64::MIN, i64::MAX), 1 << 30);
                let mut counting = Counting(&mut visitor, 0);
                shard.visit(i64::MIN, i64::MAX, None, &mut counting).unwrap();
                decoded += counting.1;
            }
            decoded
        };
        // Whole-range aggregates by tag read summaries only; the one-host filter reads nothing
        // but its series'.
        for sql in [
            "SELECT avg(value) FROM m GROUP BY region",
            "SELECT max(value) FROM m WHERE host = 'h1'",
            "SELECT count(*) FROM m GROUP BY INTERVAL 1h",
        ] {
            assert_eq!(decoded(sql), 0, "{sql}");
        }
        let visited = decoded("SELECT count(*) FROM m WHERE host = 'h1' AND core = 1");
        // h1 is in 3 series (one per region), over 2 segments and 30 hour-windows at most.
        assert!(visited > 0 && visited <= 3 * 2 * 30, "{visited} blocks decoded for one host");
    }
}
