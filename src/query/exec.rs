//! Query execution as partial results plus a merge: each shard turns its batches into a
//! [`Partial`]; partials from any number of shards (and, in a cluster, of nodes) merge
//! exactly; [`finish`] orders, limits and shapes the records. A partial is plain serde data so a
//! remote replica can send it back.

use super::plan::{AggFn, Aggregate, CmpOp, Filter, Order, Projection, SelectPlan};
use crate::model::batch::{DictColumn, NULL_CODE, RowBatch};
use crate::model::summary::Summary;
use crate::model::{FieldValue, Key, Num, Point, cmp_values};

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
    Dict { codes: &'a [u32], per_code: Vec<bool>, null: bool },
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
            Bound::Value(f) => matches_leaf(f, Some(&batch.values[row].into())),
            Bound::Dict { codes, per_code, null } => match codes[row] {
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

    fn result(&self, agg: &Aggregate) -> Option<Num> {
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

/// One group of an aggregate: its interval bucket (lower bound) and its tags' values, in the
/// order of the GROUP BY.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct GroupKey {
    pub bucket: Option<i64>,
    pub tags: Vec<Key>,
}

/// What one shard (or a merge of shards) knows about a query's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Partial {
    Rows(Vec<Point>),
    Groups(BTreeMap<GroupKey, AggState>),
}

impl Partial {
    pub fn empty(plan: &SelectPlan) -> Self {
        match plan.projection {
            Projection::Aggregate(_) => Partial::Groups(BTreeMap::new()),
            _ => Partial::Rows(Vec::new()),
        }
    }

    pub fn merge(&mut self, other: Partial) {
        match (self, other) {
            (Partial::Rows(a), Partial::Rows(b)) => a.extend(b),
            // The first partial merged into an empty one (one shard, one replica) moves whole.
            (Partial::Groups(a), Partial::Groups(b)) if a.is_empty() => *a = b,
            (Partial::Groups(a), Partial::Groups(b)) => {
                for (k, s) in b {
                    a.entry(k).or_default().merge(s);
                }
            }
            _ => unreachable!("partials of one plan have one shape"),
        }
    }

    /// Keeps a raw-row partial small: sort and cut to the limit, which is exact because the
    /// final merge sorts by the same key.
    pub fn trim(&mut self, plan: &SelectPlan) {
        if let (Partial::Rows(rows), Some(limit)) = (self, plan.limit) {
            sort_records(rows, plan.order.as_ref());
            rows.truncate(limit);
        }
    }

    /// What the partial holds, as `shoal.query.max-records` counts it: rows, or groups plus
    /// the values kept for `count(distinct …)` (a few groups can hold millions of those).
    pub fn size(&self) -> usize {
        match self {
            Partial::Rows(r) => r.len(),
            Partial::Groups(g) => g.len() + g.values().map(|s| s.distinct.len()).sum::<usize>(),
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
                None if extremes => state.summary.add(batch.timestamps[r], batch.values[r]),
                None => state.summary.add_to_sum(batch.values[r]),
                Some(field) => {
                    let v = match field {
                        "value" => Some(batch.values[r].into()),
                        "timestamp" => Some(FieldValue::Int(batch.timestamps[r])),
                        name => batch.columns.get(name).and_then(|c| c.get(r).cloned()),
                    };
                    if let Some(v) = v {
                        state.distinct.insert(Key(v));
                    }
                }
            };
            let Some(group) = &plan.group else {
                let state = groups.entry(GroupKey::default()).or_default();
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
                .map(|c| (c.dict.len() == 1 && !c.codes.contains(&NULL_CODE)).then(|| Key(c.dict[0].clone())))
                .collect();
            if let Some(tags) = constant {
                let mut per_bucket: HashMap<Option<i64>, AggState> = HashMap::new();
                let mut run: Option<(Option<i64>, AggState)> = None;
                for &r in &rows {
                    let bucket = bucket_of(r);
                    match &mut run {
                        Some((b, state)) if *b == bucket => add(state, r),
                        _ => {
                            if let Some((b, state)) = run.take() {
                                per_bucket.entry(b).or_default().merge(state);
                            }
                            let mut state = AggState::default();
                            add(&mut state, r);
                            run = Some((bucket, state));
                        }
                    }
                }
                if let Some((b, state)) = run {
                    per_bucket.entry(b).or_default().merge(state);
                }
                for (bucket, state) in per_bucket {
                    groups.entry(GroupKey { bucket, tags: tags.clone() }).or_default().merge(state);
                }
                return;
            }
            if let ([col], None) = (cols.as_slice(), group.interval) {
                // One tag, the usual case: states indexed by code (a batch's dictionary holds
                // only the values its rows use).
                let mut per_code: Vec<Option<AggState>> = vec![None; col.dict.len()];
                for &r in &rows {
                    let code = col.codes[r];
                    if code != NULL_CODE {
                        add(per_code[code as usize].get_or_insert_with(AggState::default), r);
                    }
                }
                for (code, state) in per_code.into_iter().enumerate() {
                    if let Some(state) = state {
                        let key = GroupKey { bucket: None, tags: vec![Key(col.dict[code].clone())] };
                        groups.entry(key).or_default().merge(state);
                    }
                }
                return;
            }
            let mut per_group: HashMap<(Option<i64>, Vec<u32>), AggState> = HashMap::new();
            for &r in &rows {
                let codes: Vec<u32> = cols.iter().map(|c| c.codes[r]).collect();
                if codes.contains(&NULL_CODE) {
                    continue;
                }
                add(per_group.entry((bucket_of(r), codes)).or_default(), r);
            }
            for ((bucket, codes), state) in per_group {
                let tags = codes.iter().zip(&cols).map(|(c, col)| Key(col.dict[*c as usize].clone())).collect();
                groups.entry(GroupKey { bucket, tags }).or_default().merge(state);
            }
        }
        (Partial::Groups(_), _) => unreachable!("groups only for aggregates"),
    }
}

fn sort_records(rows: &mut [Point], order: Option<&Order>) {
    let default = Order { field: "timestamp".into(), descending: false };
    let order = order.unwrap_or(&default);
    rows.sort_by(|a, b| {
        let (x, y) = (a.field(&order.field), b.field(&order.field));
        // Nulls last whatever the direction; then a full tie-break for a stable answer.
        let primary = match (&x, &y) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => return Ordering::Greater,
            (Some(_), None) => return Ordering::Less,
            (Some(x), Some(y)) => cmp_values(x, y),
        };
        let primary = if order.descending { primary.reverse() } else { primary };
        primary
            .then_with(|| a.timestamp.cmp(&b.timestamp))
            .then_with(|| a.value.total_cmp(b.value))
            .then_with(|| cmp_fields(&a.tags, &b.tags))
            .then_with(|| cmp_fields(&a.dimensions, &b.dimensions))
    });
}

/// Orders two points' tags (or dimensions) by name, then value, pair by pair: the tie-break
/// of records equal in time and value (many groups share a bucket), without formatting them.
fn cmp_fields(a: &BTreeMap<String, FieldValue>, b: &BTreeMap<String, FieldValue>) -> Ordering {
    let mut b_pairs = b.iter();
    for (ka, va) in a {
        let Some((kb, vb)) = b_pairs.next() else { return Ordering::Greater };
        let order = ka.cmp(kb).then_with(|| cmp_values(va, vb));
        if order != Ordering::Equal {
            return order;
        }
    }
    if b_pairs.next().is_some() { Ordering::Less } else { Ordering::Equal }
}

/// Turns a fully merged partial into NSDb-shaped records.
pub fn finish(plan: &SelectPlan, partial: Partial) -> Vec<Point> {
    let mut records = match partial {
        Partial::Rows(rows) => rows,
        Partial::Groups(groups) => {
            let Projection::Aggregate(agg) = &plan.projection else { unreachable!("groups only for aggregates") };
            let mut out = Vec::new();
            if groups.is_empty()
                && plan.group.is_none()
                && matches!(agg, Aggregate::Value(AggFn::Count) | Aggregate::CountDistinct(_))
            {
                out.push(Point {
                    timestamp: 0,
                    value: Num::Int(0),
                    dimensions: BTreeMap::new(),
                    tags: BTreeMap::new(),
                });
            }
            for (key, state) in groups {
                let Some(value) = state.result(agg) else {
                    continue;
                };
                let mut p = Point { timestamp: 0, value, dimensions: BTreeMap::new(), tags: BTreeMap::new() };
                if let Some(group) = &plan.group {
                    if let (Some(lower), Some(w)) = (key.bucket, group.interval) {
                        let upper = lower.saturating_add(w);
                        p.timestamp = upper;
                        p.dimensions.insert("lowerBound".into(), FieldValue::Int(lower));
                        p.dimensions.insert("upperBound".into(), FieldValue::Int(upper));
                    }
                    for (tag, k) in group.tags.iter().zip(key.tags) {
                        p.tags.insert(tag.clone(), k.0);
                    }
                }
                out.push(p);
            }
            out
        }
    };
    sort_records(&mut records, plan.order.as_ref());
    if let Some(limit) = plan.limit {
        records.truncate(limit);
    }
    records
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
        let records = finish(&plan, a);
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
        assert_eq!(partial.size(), 1 + 100, "one group holding 100 distinct hosts");
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
        v.sort_by(cmp_values);
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
