//! Query execution as partial results plus a merge: each shard turns its batches into a
//! [`Partial`]; partials from any number of shards (and, in a cluster, of nodes) merge
//! exactly; [`super::answer::finish`] orders, limits and shapes the records. A partial is plain
//! serde data so a remote replica can send it back.

use super::plan::{AggFn, Aggregate, CmpOp, Filter, Projection, SelectPlan};
use crate::model::batch::{Codes, DictColumn, NULL_CODE, RowBatch};
use crate::model::summary::Summary;
use crate::model::{FieldValue, Key, Num, Point};

fn num(v: &FieldValue) -> f64 {
    match v {
        FieldValue::Int(i) => *i as f64,
        FieldValue::Dec(d) => *d,
        FieldValue::Str(_) => f64::NAN,
    }
}

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Compares a stored value with a literal the way SQL users expect: numbers numerically
/// (an integer field against 2.5 works), strings by bytes, a number never equals a string.
pub(super) fn compare(stored: &FieldValue, op: CmpOp, lit: &FieldValue) -> bool {
    let ord = match (stored, lit) {
        (FieldValue::Str(a), FieldValue::Str(b)) => a.cmp(b),
        (FieldValue::Str(_), _) | (_, FieldValue::Str(_)) => return op == CmpOp::NotEq,
        (FieldValue::Int(a), FieldValue::Int(b)) => a.cmp(b),
        (a, b) => num(a).total_cmp(&num(b)),
    };
    match op {
        CmpOp::Eq => ord == Ordering::Equal,
        CmpOp::NotEq => ord != Ordering::Equal,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::LtEq => ord != Ordering::Greater,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::GtEq => ord != Ordering::Less,
    }
}

/// SQL LIKE with `%` (any run) and `_` (one character).
pub fn like(text: &str, pattern: &str) -> bool {
    let (t, p): (Vec<char>, Vec<char>) = (text.chars().collect(), pattern.chars().collect());
    let (mut ti, mut pi, mut star, mut mark) = (0usize, 0usize, None::<usize>, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '%' {
        pi += 1;
    }
    pi == p.len()
}

pub(super) fn matches_leaf(f: &Filter, v: Option<&FieldValue>) -> bool {
    match f {
        Filter::Cmp { op, value, .. } => v.is_some_and(|v| compare(v, *op, value)),
        Filter::Like { pattern, negated, .. } => {
            v.is_some_and(|v| matches!(v, FieldValue::Str(s) if like(s, pattern) != *negated))
        }
        Filter::In { values, negated, .. } => {
            v.is_some_and(|v| values.iter().any(|l| compare(v, CmpOp::Eq, l)) != *negated)
        }
        Filter::IsNull { negated, .. } => v.is_none() != *negated,
        _ => unreachable!("only leaves"),
    }
}

/// A filter bound to one batch: dictionary columns are pre-evaluated once per distinct value.
enum Bound<'a> {
    Const(bool),
    Timestamp(&'a Filter),
    Value(&'a Filter),
    Dict { codes: &'a Codes, per_code: Vec<bool>, null: bool },
    And(Box<Bound<'a>>, Box<Bound<'a>>),
    Or(Box<Bound<'a>>, Box<Bound<'a>>),
    Not(Box<Bound<'a>>),
}

pub(super) fn field_of(f: &Filter) -> &str {
    match f {
        Filter::Cmp { field, .. }
        | Filter::Like { field, .. }
        | Filter::In { field, .. }
        | Filter::IsNull { field, .. } => field,
        _ => "",
    }
}

fn bind<'a>(f: &'a Filter, batch: &'a RowBatch) -> Bound<'a> {
    match f {
        Filter::And(a, b) => Bound::And(Box::new(bind(a, batch)), Box::new(bind(b, batch))),
        Filter::Or(a, b) => Bound::Or(Box::new(bind(a, batch)), Box::new(bind(b, batch))),
        Filter::Not(a) => Bound::Not(Box::new(bind(a, batch))),
        leaf => match field_of(leaf) {
            "timestamp" => Bound::Timestamp(leaf),
            "value" => Bound::Value(leaf),
            name => match batch.columns.get(name) {
                None => Bound::Const(matches_leaf(leaf, None)),
                Some(DictColumn { dict, codes, .. }) => Bound::Dict {
                    codes,
                    per_code: dict.iter().map(|v| matches_leaf(leaf, Some(v))).collect(),
                    null: matches_leaf(leaf, None),
                },
            },
        },
    }
}

impl Bound<'_> {
    fn eval(&self, batch: &RowBatch, row: usize) -> bool {
        match self {
            Bound::Const(b) => *b,
            Bound::Timestamp(f) => matches_leaf(f, Some(&FieldValue::Int(batch.timestamps[row]))),
            Bound::Value(f) => matches_leaf(f, Some(&batch.values.get(row).into())),
            Bound::Dict { codes, per_code, null } => match codes.get(row) {
                NULL_CODE => *null,
                c => per_code[c as usize],
            },
            Bound::And(a, b) => a.eval(batch, row) && b.eval(batch, row),
            Bound::Or(a, b) => a.eval(batch, row) || b.eval(batch, row),
            Bound::Not(a) => !a.eval(batch, row),
        }
    }
}

/// Rows of `batch` that `filter` accepts and that fall in `[from, to)`.
pub fn matching_rows(filter: Option<&Filter>, batch: &RowBatch, from: i64, to: i64) -> Vec<usize> {
    // The common case, a block wholly inside the range and no other filter, checked first: a
    // plain count is a fifth of the work of the per-row test.
    if filter.is_none() && batch.timestamps.iter().all(|&t| t >= from && t < to) {
        return (0..batch.len()).collect();
    }
    let bound = filter.map(|f| bind(f, batch));
    (0..batch.len())
        .filter(|&r| {
            let t = batch.timestamps[r];
            t >= from && t < to && bound.as_ref().is_none_or(|b| b.eval(batch, r))
        })
        .collect()
}

/// Running state of one aggregate group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AggState {
    pub summary: Summary,
    pub distinct: BTreeSet<Key>,
}

impl AggState {
    pub fn merge(&mut self, o: AggState) {
        self.summary.merge(&o.summary);
        self.distinct.extend(o.distinct);
    }

    pub(super) fn result(&self, agg: &Aggregate) -> Option<Num> {
        let s = &self.summary;
        match agg {
            Aggregate::CountDistinct(_) => Some(Num::Int(self.distinct.len() as i64)),
            Aggregate::Value(AggFn::Count) => Some(Num::Int(s.count as i64)),
            Aggregate::Value(_) if s.count == 0 => None,
            Aggregate::Value(AggFn::Sum) => Some(s.sum()),
            Aggregate::Value(AggFn::Avg) => Some(Num::Dec(s.mean())),
            Aggregate::Value(AggFn::Min) => s.min,
            Aggregate::Value(AggFn::Max) => s.max,
            Aggregate::Value(AggFn::First) => s.first.map(|f| f.1),
            Aggregate::Value(AggFn::Last) => s.last.map(|l| l.1),
        }
    }
}

/// The states of one tuple of tag values' buckets, by bucket (lower bound; none without an
/// interval).
pub type BucketStates = Vec<(Option<i64>, AggState)>;

/// The groups of an aggregate: by the values of the GROUP BY tags (in its order), then by
/// interval bucket (lower bound). Two levels, since a segment block holds one series: a scan
/// looks a series' tags up once per block, not once per bucket, and each tuple of tag values is
/// held once for all its buckets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Groups {
    by_tags: BTreeMap<Vec<Key>, Buckets>,
    /// Groups in all (tags × bucket), counted as they are added: `shoal.query.max-records`
    /// is checked after every block.
    len: usize,
}

impl Groups {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buckets of one tuple of tag values, added when new (its key copied only then).
    fn buckets<'a>(by_tags: &'a mut BTreeMap<Vec<Key>, Buckets>, tags: &[Key]) -> &'a mut Buckets {
        if !by_tags.contains_key(tags) {
            by_tags.insert(tags.to_vec(), Buckets::default());
        }
        by_tags.get_mut(tags).expect("just added")
    }

    /// The running state of one group, added when new.
    pub fn state(&mut self, tags: &[Key], bucket: Option<i64>) -> &mut AggState {
        let (state, added) = Self::buckets(&mut self.by_tags, tags).state(bucket);
        self.len += usize::from(added);
        state
    }

    /// Adds the states of buckets of one tuple of tag values (ascending, as a block's rows
    /// give them, or in any order).
    fn add_buckets(&mut self, tags: &[Key], states: BucketStates) {
        let buckets = Self::buckets(&mut self.by_tags, tags);
        if states.windows(2).all(|w| w[0].0 < w[1].0) {
            self.len += buckets.merge(Buckets(states));
        } else {
            for (bucket, state) in states {
                let (into, added) = buckets.state(bucket);
                into.merge(state);
                self.len += usize::from(added);
            }
        }
    }

    fn merge(&mut self, other: Groups) {
        if self.is_empty() {
            *self = other;
            return;
        }
        for (tags, buckets) in other.by_tags {
            match self.by_tags.entry(tags) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    self.len += buckets.0.len();
                    v.insert(buckets);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => self.len += o.get_mut().merge(buckets),
            }
        }
    }

    /// Every tuple of tag values with its buckets in ascending order.
    pub fn into_tag_groups(self) -> impl Iterator<Item = (Vec<Key>, BucketStates)> {
        self.by_tags.into_iter().map(|(tags, buckets)| (tags, buckets.0))
    }

    fn distinct_values(&self) -> usize {
        self.by_tags.values().flat_map(|b| &b.0).map(|(_, s)| s.distinct.len()).sum()
    }
}

/// The buckets of one tuple of tag values, ascending. A vector, not a map: buckets mostly come
/// in time order (a block's rows do), so adding one is a push, and a few hundred thousand
/// groups cost no tree nodes to build, walk and free.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Buckets(BucketStates);

impl Buckets {
    /// The state of `bucket`, and whether it was added now.
    fn state(&mut self, bucket: Option<i64>) -> (&mut AggState, bool) {
        let at = match self.0.last() {
            None => Err(0),
            Some((last, _)) if *last == bucket => Ok(self.0.len() - 1),
            Some((last, _)) if *last < bucket => Err(self.0.len()),
            Some(_) => self.0.binary_search_by(|(b, _)| b.cmp(&bucket)),
        };
        match at {
            Ok(i) => (&mut self.0[i].1, false),
            Err(i) => {
                self.0.insert(i, (bucket, AggState::default()));
                (&mut self.0[i].1, true)
            }
        }
    }

    /// Merges ascending buckets in (in one pass, whatever their order against these);
    /// returns how many were new.
    fn merge(&mut self, other: Buckets) -> usize {
        let (Some(last), Some(first)) = (self.0.last(), other.0.first()) else {
            let added = other.0.len();
            self.0.extend(other.0);
            return added;
        };
        if last.0 < first.0 {
            let added = other.0.len();
            self.0.extend(other.0);
            return added;
        }
        let mut added = 0;
        let mut merged = Vec::with_capacity(self.0.len() + other.0.len());
        let (mut ours, mut theirs) =
            (std::mem::take(&mut self.0).into_iter().peekable(), other.0.into_iter().peekable());
        loop {
            let next = match (ours.peek(), theirs.peek()) {
                (Some(a), Some(b)) if a.0 < b.0 => ours.next(),
                (Some(a), Some(b)) if a.0 == b.0 => {
                    let (bucket, mut state) = ours.next().expect("peeked");
                    state.merge(theirs.next().expect("peeked").1);
                    Some((bucket, state))
                }
                (_, Some(_)) => {
                    added += 1;
                    theirs.next()
                }
                (Some(_), None) => ours.next(),
                (None, None) => break,
            };
            merged.extend(next);
        }
        self.0 = merged;
        added
    }
}

/// What one shard (or a merge of shards) knows about a query's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Partial {
    Rows(Vec<Point>),
    Groups(Groups),
}

impl Partial {
    pub fn empty(plan: &SelectPlan) -> Self {
        match plan.projection {
            Projection::Aggregate(_) => Partial::Groups(Groups::default()),
            _ => Partial::Rows(Vec::new()),
        }
    }

    pub fn merge(&mut self, other: Partial) {
        match (self, other) {
            (Partial::Rows(a), Partial::Rows(b)) => a.extend(b),
            (Partial::Groups(a), Partial::Groups(b)) => a.merge(b),
            _ => unreachable!("partials of one plan have one shape"),
        }
    }

    /// Keeps a raw-row partial small: sort and cut to the limit, which is exact because the
    /// final merge sorts by the same key.
    pub fn trim(&mut self, plan: &SelectPlan) {
        if let (Partial::Rows(rows), Some(limit)) = (self, plan.limit) {
            super::answer::sort_points(rows, plan.order.as_ref());
            rows.truncate(limit);
        }
    }

    /// What the partial holds, as `shoal.query.max-records` counts it: rows, or groups plus,
    /// for `count(distinct …)`, the values kept (a few groups can hold millions of those;
    /// counting them walks every group, so only that aggregate does).
    pub fn size(&self, plan: &SelectPlan) -> usize {
        match (self, &plan.projection) {
            (Partial::Rows(r), _) => r.len(),
            (Partial::Groups(g), Projection::Aggregate(Aggregate::CountDistinct(_))) => g.len() + g.distinct_values(),
            (Partial::Groups(g), _) => g.len(),
        }
    }
}

/// Adds the rows of `batch` in `[from, to)` that pass `filter` (the plan's, or what is left of
/// it within the range: [`Filter::without_time_bounds`]) to `partial`.
pub fn scan_batch(
    plan: &SelectPlan,
    filter: Option<&Filter>,
    batch: &RowBatch,
    from: i64,
    to: i64,
    partial: &mut Partial,
) {
    let rows = matching_rows(filter, batch, from, to);
    if rows.is_empty() {
        return;
    }
    match (partial, &plan.projection) {
        (Partial::Rows(out), projection) => {
            for r in rows {
                let mut p = batch.point(r);
                if let Projection::Fields(fields) = projection {
                    p.dimensions.retain(|k, _| fields.contains(k));
                    p.tags.retain(|k, _| fields.contains(k));
                }
                out.push(p);
            }
        }
        (Partial::Groups(groups), Projection::Aggregate(agg)) => {
            let distinct_col = match agg {
                Aggregate::CountDistinct(f) => Some(f.as_str()),
                _ => None,
            };
            let extremes = matches!(agg, Aggregate::Value(AggFn::Min | AggFn::Max | AggFn::First | AggFn::Last));
            let add = |state: &mut AggState, r: usize| match distinct_col {
                None if extremes => state.summary.add(batch.timestamps[r], batch.values.get(r)),
                None => state.summary.add_to_sum(batch.values.get(r)),
                Some(field) => {
                    let v = match field {
                        "value" => Some(batch.values.get(r).into()),
                        "timestamp" => Some(FieldValue::Int(batch.timestamps[r])),
                        name => batch.columns.get(name).and_then(|c| c.get(r).cloned()),
                    };
                    if let Some(v) = v {
                        state.distinct.insert(Key(v));
                    }
                }
            };
            let Some(group) = &plan.group else {
                let state = groups.state(&[], None);
                rows.iter().for_each(|&r| add(state, r));
                return;
            };
            // Points without one of the tags belong to no group (as in NSDb).
            let Some(cols) = group.tags.iter().map(|t| batch.columns.get(t)).collect::<Option<Vec<_>>>() else {
                return;
            };
            let bucket_of = |r: usize| group.interval.map(|w| batch.timestamps[r].div_euclid(w) * w);
            // Tags with one value in every row (a segment block holds one series): the rows
            // group by bucket alone, counted in runs, since a block's rows are in time order.
            let constant: Option<Vec<Key>> = cols
                .iter()
                .map(|c| {
                    (c.dict.len() == 1 && !c.codes.iter().any(|code| code == NULL_CODE)).then(|| Key(c.dict[0].clone()))
                })
                .collect();
            if let Some(tags) = constant {
                // The rows are in time order, so a bucket's bounds are worked out once per run.
                let mut runs: BucketStates = Vec::new();
                let mut span = (i64::MAX, i64::MIN);
                for &r in &rows {
                    let t = batch.timestamps[r];
                    if !(span.0 <= t && t < span.1) {
                        let bucket = bucket_of(r);
                        span = match (bucket, group.interval) {
                            (Some(lower), Some(w)) => (lower, lower.saturating_add(w)),
                            _ => (i64::MIN, i64::MAX),
                        };
                        if runs.last().is_none_or(|run| run.0 != bucket) {
                            runs.push((bucket, AggState::default()));
                        }
                    }
                    add(&mut runs.last_mut().expect("a run was started").1, r);
                }
                groups.add_buckets(&tags, runs);
                return;
            }
            if let ([col], None) = (cols.as_slice(), group.interval) {
                // One tag, the usual case: states indexed by code (a batch's dictionary holds
                // only the values its rows use).
                let mut per_code: Vec<Option<AggState>> = vec![None; col.dict.len()];
                for &r in &rows {
                    let code = col.codes.get(r);
                    if code != NULL_CODE {
                        add(per_code[code as usize].get_or_insert_with(AggState::default), r);
                    }
                }
                for (code, state) in per_code.into_iter().enumerate() {
                    if let Some(state) = state {
                        groups.state(&[Key(col.dict[code].clone())], None).merge(state);
                    }
                }
                return;
            }
            let mut per_group: HashMap<(Option<i64>, Vec<u32>), AggState> = HashMap::new();
            for &r in &rows {
                let codes: Vec<u32> = cols.iter().map(|c| c.codes.get(r)).collect();
                if codes.contains(&NULL_CODE) {
                    continue;
                }
                add(per_group.entry((bucket_of(r), codes)).or_default(), r);
            }
            // Each tuple of tags once, with its buckets in order.
            let mut per_group: Vec<_> = per_group.into_iter().collect();
            per_group.sort_unstable_by(|((b1, c1), _), ((b2, c2), _)| c1.cmp(c2).then(b1.cmp(b2)));
            let mut per_group = per_group.into_iter().peekable();
            while let Some(((bucket, codes), state)) = per_group.next() {
                let mut states = vec![(bucket, state)];
                while let Some(((bucket, _), state)) = per_group.next_if(|((_, next), _)| *next == codes) {
                    states.push((bucket, state));
                }
                let tags: Vec<Key> =
                    codes.iter().zip(&cols).map(|(c, col)| Key(col.dict[*c as usize].clone())).collect();
                groups.add_buckets(&tags, states);
            }
        }
        (Partial::Groups(_), _) => unreachable!("groups only for aggregates"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GROUP BY several tags and an interval: one record per combination present, each with
    /// its tags and bounds; points lacking a tag belong to no group.
    #[test]
    fn groups_by_several_tags_and_an_interval() {
        let mut lines = String::new();
        for i in 0..120i64 {
            let (region, host) = (["eu", "us"][(i % 2) as usize], ["a", "b", "c"][(i % 3) as usize]);
            lines.push_str(&format!("m,region={region},host={host} value={i}i {}\n", i * 1000));
        }
        lines.push_str("m,region=eu value=1000i 5000\n");
        let batch =
            crate::ingest::parse_line_protocol(&lines, "d", "n", crate::ingest::Precision::Ms, 0, 1000).unwrap();
        let rows = &batch.metrics[0].1;
        let sql = "SELECT count(*) FROM m GROUP BY region, host, INTERVAL 60000";
        let plan = match crate::query::plan::parse(sql, 0).unwrap() {
            crate::query::plan::Statement::Select(p) => p,
            _ => unreachable!(),
        };
        let (left, right) =
            (rows.select(&(0..60).collect::<Vec<_>>()), rows.select(&(60..rows.len()).collect::<Vec<_>>()));
        let (mut a, mut b) = (Partial::empty(&plan), Partial::empty(&plan));
        scan_batch(&plan, plan.filter.as_ref(), &left, i64::MIN, i64::MAX, &mut a);
        scan_batch(&plan, plan.filter.as_ref(), &right, i64::MIN, i64::MAX, &mut b);
        a.merge(b);
        let records = crate::query::answer::finish(&plan, a).into_points();
        // 2 regions × 3 hosts × 2 minutes; 120 points over 12 groups, 10 each.
        assert_eq!(records.len(), 12);
        assert!(records.iter().all(|r| r.value == Num::Int(10)), "{records:?}");
        let first = &records[0];
        assert_eq!(first.tags["region"], FieldValue::Str("eu".into()));
        assert_eq!(first.tags["host"], FieldValue::Str("a".into()));
        assert_eq!((first.dimensions["lowerBound"].clone(), first.timestamp), (FieldValue::Int(0), 60_000));
    }

    #[test]
    fn distinct_values_count_toward_the_size_of_a_partial() {
        let lines: String = (0..100).map(|i| format!("m,host=h{i} value={i}i {i}\n")).collect();
        let batch =
            crate::ingest::parse_line_protocol(&lines, "d", "n", crate::ingest::Precision::Ms, 0, 1000).unwrap();
        let rows = &batch.metrics[0].1;
        let plan = match crate::query::plan::parse("SELECT count(distinct host) FROM m", 0).unwrap() {
            crate::query::plan::Statement::Select(p) => p,
            _ => unreachable!(),
        };
        let mut partial = Partial::empty(&plan);
        scan_batch(&plan, plan.filter.as_ref(), rows, i64::MIN, i64::MAX, &mut partial);
        assert_eq!(partial.size(&plan), 1 + 100, "one group holding 100 distinct hosts");
    }

    proptest::proptest! {
        /// Groups built from buckets in any order and any split (blocks, parts, shards) hold
        /// what one map of (tags, bucket) → state holds, in order, and count them right.
        #[test]
        fn groups_equal_a_map_whatever_the_order(
            adds in proptest::collection::vec((0u8..3, proptest::option::of(-5i64..5), -100i64..100, 0usize..4), 0..60),
        ) {
            let mut expected: BTreeMap<(Vec<Key>, Option<i64>), AggState> = BTreeMap::new();
            let mut parts = [Groups::default(), Groups::default(), Groups::default(), Groups::default()];
            let mut run: Option<(Vec<Key>, BucketStates)> = None;
            for &(tag, bucket, v, part) in &adds {
                let tags = vec![Key(FieldValue::Str(format!("t{tag}")))];
                expected.entry((tags.clone(), bucket)).or_default().summary.add_to_sum(Num::Int(v));
                let mut state = AggState::default();
                state.summary.add_to_sum(Num::Int(v));
                // Part 0 adds runs of one tuple (ascending or not, as a block's rows or a
                // memtable's), the others one state at a time.
                if part != 0 {
                    parts[part].state(&tags, bucket).merge(state);
                    continue;
                }
                match &mut run {
                    Some((t, states)) if *t == tags => states.push((bucket, state)),
                    _ => {
                        if let Some((t, states)) = run.take() {
                            parts[0].add_buckets(&t, states);
                        }
                        run = Some((tags, vec![(bucket, state)]));
                    }
                }
            }
            if let Some((t, states)) = run {
                parts[0].add_buckets(&t, states);
            }
            let mut total = Groups::default();
            for part in parts {
                total.merge(part);
            }
            proptest::prop_assert_eq!(total.len(), expected.len());
            let got: Vec<_> = total
                .into_tag_groups()
                .flat_map(|(tags, buckets)| buckets.into_iter().map(move |(b, s)| ((tags.clone(), b), s)))
                .collect();
            proptest::prop_assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn like_patterns() {
        assert!(like("server-1", "server%"));
        assert!(like("server-1", "%-_"));
        assert!(!like("server-1", "%-__"));
        assert!(like("", "%"));
        assert!(!like("abc", "a_"));
    }

    #[test]
    fn value_order_is_total() {
        let mut v = vec![FieldValue::Str("a".into()), FieldValue::Dec(1.5), FieldValue::Int(2), FieldValue::Int(1)];
        v.sort_by(crate::model::cmp_values);
        assert_eq!(v, vec![FieldValue::Int(1), FieldValue::Dec(1.5), FieldValue::Int(2), FieldValue::Str("a".into())]);
    }

    #[test]
    fn agg_merge_equals_single_pass() {
        let vals = [(5, Num::Int(3)), (1, Num::Dec(2.5)), (9, Num::Int(-4)), (1, Num::Int(7))];
        let mut whole = AggState::default();
        vals.iter().for_each(|&(t, v)| whole.summary.add(t, v));
        let (mut a, mut b) = (AggState::default(), AggState::default());
        vals[..2].iter().for_each(|&(t, v)| a.summary.add(t, v));
        vals[2..].iter().for_each(|&(t, v)| b.summary.add(t, v));
        b.merge(a);
        assert_eq!(b, whole);
        assert_eq!(whole.summary.first, Some((1, Num::Dec(2.5))));
        assert_eq!(whole.result(&Aggregate::Value(AggFn::Sum)), Some(Num::Dec(8.5)));
        assert_eq!(whole.result(&Aggregate::Value(AggFn::Min)), Some(Num::Int(-4)));
    }
}
