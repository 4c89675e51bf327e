//! A select's answer: [`finish`] turns a fully merged partial into ordered, limited records, and
//! [`Records::to_json`] writes them as the HTTP answer (`{"records": [...]}`). The records of an
//! aggregate stay as groups all the way to the JSON, each tuple of tag values held once for
//! all its buckets: building an NSDb point (two maps of owned names) per record, sorting those
//! and dropping them took most of the time of an answer with 180,000 groups.

use super::exec::{Groups, Partial};
use super::plan::{AggFn, Aggregate, Order, Projection, SelectPlan};
use crate::model::{FieldValue, Key, Num, Point, cmp_values};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// The records of an answer, in order and within its limit.
pub enum Records {
    Points(Vec<Point>),
    Groups(GroupRecords),
}

/// An aggregate's records before they become points.
pub struct GroupRecords {
    /// The GROUP BY tags, in its order.
    names: Vec<String>,
    /// Positions in `names` in name order, as a point's tag map holds them (the last one of a
    /// name given twice, as a map insert keeps).
    by_name: Vec<usize>,
    interval: Option<i64>,
    /// Each distinct tuple of tag values once, in the order of `names`.
    tags: Vec<Vec<Key>>,
    rows: Vec<GroupRow>,
}

#[derive(Clone, Copy)]
struct GroupRow {
    /// The bucket's upper bound with an interval, else 0 (as NSDb answers).
    timestamp: i64,
    value: Num,
    bucket: Option<i64>,
    tags: usize,
}

impl Records {
    pub fn len(&self) -> usize {
        match self {
            Records::Points(p) => p.len(),
            Records::Groups(g) => g.rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records as NSDb points (what the InfluxQL and Prometheus layers build on).
    pub fn into_points(self) -> Vec<Point> {
        let g = match self {
            Records::Points(points) => return points,
            Records::Groups(g) => g,
        };
        g.rows
            .iter()
            .map(|row| {
                let mut p = Point {
                    timestamp: row.timestamp,
                    value: row.value,
                    dimensions: BTreeMap::new(),
                    tags: BTreeMap::new(),
                };
                if let Some((lower, upper)) = g.bounds(row) {
                    p.dimensions.insert("lowerBound".into(), FieldValue::Int(lower));
                    p.dimensions.insert("upperBound".into(), FieldValue::Int(upper));
                }
                for &i in &g.by_name {
                    p.tags.insert(g.names[i].clone(), g.tags[row.tags][i].0.clone());
                }
                p
            })
            .collect()
    }
}

impl GroupRecords {
    /// A record's `lowerBound` and `upperBound` dimensions, with an interval.
    fn bounds(&self, row: &GroupRow) -> Option<(i64, i64)> {
        self.interval.and(row.bucket).map(|lower| (lower, row.timestamp))
    }
}

/// Turns a fully merged partial into NSDb-shaped records.
pub fn finish(plan: &SelectPlan, partial: Partial) -> Records {
    match partial {
        Partial::Rows(mut rows) => {
            sort_points(&mut rows, plan.order.as_ref());
            if let Some(limit) = plan.limit {
                rows.truncate(limit);
            }
            Records::Points(rows)
        }
        Partial::Groups(groups) => Records::Groups(finish_groups(plan, groups)),
    }
}

fn finish_groups(plan: &SelectPlan, groups: Groups) -> GroupRecords {
    let Projection::Aggregate(agg) = &plan.projection else { unreachable!("groups only for aggregates") };
    let names = plan.group.as_ref().map(|g| g.tags.clone()).unwrap_or_default();
    let mut by_name: Vec<usize> = (0..names.len()).collect();
    by_name.sort_by(|a, b| names[*a].cmp(&names[*b]).then(b.cmp(a)));
    by_name.dedup_by_key(|i| names[*i].clone());
    let interval = plan.group.as_ref().and_then(|g| g.interval);
    let mut out =
        GroupRecords { names, by_name, interval, tags: Vec::new(), rows: Vec::with_capacity(groups.len() + 1) };
    if groups.is_empty()
        && plan.group.is_none()
        && matches!(agg, Aggregate::Value(AggFn::Count) | Aggregate::CountDistinct(_))
    {
        out.tags.push(Vec::new());
        out.rows.push(GroupRow { timestamp: 0, value: Num::Int(0), bucket: None, tags: 0 });
    }
    for (tags, buckets) in groups.into_tag_groups() {
        let index = out.tags.len();
        for (bucket, state) in buckets {
            let Some(value) = state.result(agg) else { continue };
            let timestamp = match (bucket, interval) {
                (Some(lower), Some(w)) => lower.saturating_add(w),
                _ => 0,
            };
            out.rows.push(GroupRow { timestamp, value, bucket, tags: index });
        }
        out.tags.push(tags);
    }
    let order = OrderBy::of(plan.order.as_ref(), &out);
    let mut rows = std::mem::take(&mut out.rows);
    let g = &out;
    // The order `sort_points` gives the same records as points.
    rows.sort_unstable_by(|a, b| {
        order
            .compare(g, a, b)
            .then_with(|| a.timestamp.cmp(&b.timestamp))
            .then_with(|| a.value.total_cmp(b.value))
            .then_with(|| {
                let (ta, tb) = (&g.tags[a.tags], &g.tags[b.tags]);
                // (The empty tuple of a count over nothing has no tags at all.)
                let pairs = g.by_name.iter().map(|&i| ta.get(i).cmp(&tb.get(i)));
                pairs.fold(Ordering::Equal, Ordering::then)
            })
            .then_with(|| a.bucket.cmp(&b.bucket))
    });
    if let Some(limit) = plan.limit {
        rows.truncate(limit);
    }
    out.rows = rows;
    out
}

/// The field an ORDER BY names, as a group record holds it (a point's tags first, then its
/// dimensions, as `Point::field` looks it up).
enum OrderBy {
    Timestamp { descending: bool },
    Value { descending: bool },
    Tag { index: usize, descending: bool },
    Lower { descending: bool },
    Upper { descending: bool },
    Missing,
}

impl OrderBy {
    fn of(order: Option<&Order>, g: &GroupRecords) -> Self {
        let Some(order) = order else { return OrderBy::Timestamp { descending: false } };
        let descending = order.descending;
        match order.field.as_str() {
            "value" => OrderBy::Value { descending },
            "timestamp" => OrderBy::Timestamp { descending },
            name => match g.by_name.iter().find(|&&i| g.names[i] == name) {
                Some(&index) => OrderBy::Tag { index, descending },
                None if g.interval.is_some() && name == "lowerBound" => OrderBy::Lower { descending },
                None if g.interval.is_some() && name == "upperBound" => OrderBy::Upper { descending },
                None => OrderBy::Missing,
            },
        }
    }

    /// The records' order by the field, nulls last whatever the direction.
    fn compare(&self, g: &GroupRecords, a: &GroupRow, b: &GroupRow) -> Ordering {
        fn nulls_last<T: Ord>(x: Option<T>, y: Option<T>, descending: bool) -> Ordering {
            match (x, y) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) if descending => y.cmp(&x),
                (Some(x), Some(y)) => x.cmp(&y),
            }
        }
        match *self {
            OrderBy::Timestamp { descending } => nulls_last(Some(a.timestamp), Some(b.timestamp), descending),
            OrderBy::Value { descending } => {
                let order = a.value.total_cmp(b.value);
                if descending { order.reverse() } else { order }
            }
            OrderBy::Tag { index, descending } => {
                nulls_last(g.tags[a.tags].get(index), g.tags[b.tags].get(index), descending)
            }
            OrderBy::Lower { descending } => nulls_last(g.bounds(a).map(|b| b.0), g.bounds(b).map(|b| b.0), descending),
            OrderBy::Upper { descending } => nulls_last(g.bounds(a).map(|b| b.1), g.bounds(b).map(|b| b.1), descending),
            OrderBy::Missing => Ordering::Equal,
        }
    }
}

/// Orders raw points by the ORDER BY field (timestamp by default), nulls last, then by
/// timestamp, value, tags and dimensions, so that an answer is the same on every run.
pub(super) fn sort_points(rows: &mut [Point], order: Option<&Order>) {
    let default = Order { field: "timestamp".into(), descending: false };
    let order = order.unwrap_or(&default);
    rows.sort_by(|a, b| {
        let (x, y) = (a.field(&order.field), b.field(&order.field));
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

impl Records {
    /// The HTTP answer to a select: `{"records": [...]}`, plus `"partial"` naming the shards no
    /// replica answered for when the caller accepts a partial answer. Group records are written
    /// by hand, each tuple of tag values rendered once: serializing them field by field took a
    /// quarter of the time of an answer with 180,000 groups.
    pub fn to_json(&self, partial: &[String]) -> Vec<u8> {
        use serde_json::ser::{CompactFormatter, Formatter};
        let mut out = Vec::new();
        out.push(b'{');
        if !partial.is_empty() {
            out.extend_from_slice(b"\"partial\":");
            serde_json::to_writer(&mut out, partial).expect("writes to memory");
            out.push(b',');
        }
        out.extend_from_slice(b"\"records\":[");
        match self {
            Records::Points(points) => {
                for (i, p) in points.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut out, &PointJson(p)).expect("writes to memory");
                }
            }
            Records::Groups(g) => {
                let tags: Vec<Vec<u8>> = g
                    .tags
                    .iter()
                    .map(|values| serde_json::to_vec(&TagsJson(g, values)).expect("writes to memory"))
                    .collect();
                // Sized up front: growing a buffer of tens of MB copies it and faults its pages in again.
                let tags_bytes: usize = g.rows.iter().map(|row| tags[row.tags].len()).sum();
                out.reserve(g.rows.len() * RECORD_BYTES_MAX + tags_bytes);
                let f = &mut CompactFormatter;
                for (i, row) in g.rows.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(b"{\"dimensions\":{");
                    if let Some((lower, upper)) = g.bounds(row) {
                        out.extend_from_slice(b"\"lowerBound\":");
                        f.write_i64(&mut out, lower).expect("writes to memory");
                        out.extend_from_slice(b",\"upperBound\":");
                        f.write_i64(&mut out, upper).expect("writes to memory");
                    }
                    out.extend_from_slice(b"},\"tags\":");
                    out.extend_from_slice(&tags[row.tags]);
                    out.extend_from_slice(b",\"timestamp\":");
                    f.write_i64(&mut out, row.timestamp).expect("writes to memory");
                    out.extend_from_slice(b",\"value\":");
                    match row.value {
                        Num::Int(v) => f.write_i64(&mut out, v),
                        Num::Dec(v) if v.is_finite() => f.write_f64(&mut out, v),
                        Num::Dec(_) => f.write_null(&mut out),
                    }
                    .expect("writes to memory");
                    out.push(b'}');
                }
            }
        }
        out.extend_from_slice(b"]}");
        out
    }
}

struct ValueJson<'a>(&'a FieldValue);

impl serde::Serialize for ValueJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            FieldValue::Int(i) => serializer.serialize_i64(*i),
            FieldValue::Dec(d) if d.is_finite() => serializer.serialize_f64(*d),
            FieldValue::Dec(_) => serializer.serialize_none(),
            FieldValue::Str(s) => serializer.serialize_str(s),
        }
    }
}

/// A record's fields in NSDb's order: dimensions, tags, timestamp, value.
fn record_json<S: serde::Serializer>(
    serializer: S,
    dimensions: &impl serde::Serialize,
    tags: &impl serde::Serialize,
    timestamp: i64,
    value: Num,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(4))?;
    map.serialize_entry("dimensions", dimensions)?;
    map.serialize_entry("tags", tags)?;
    map.serialize_entry("timestamp", &timestamp)?;
    map.serialize_entry("value", &ValueJson(&value.into()))?;
    map.end()
}

struct PointJson<'a>(&'a Point);

impl serde::Serialize for PointJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Fields<'a>(&'a BTreeMap<String, FieldValue>);
        impl serde::Serialize for Fields<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_map(self.0.iter().map(|(k, v)| (k, ValueJson(v))))
            }
        }
        let p = self.0;
        record_json(serializer, &Fields(&p.dimensions), &Fields(&p.tags), p.timestamp, p.value)
    }
}

/// The most a group record takes besides its tags: the field names, two bounds, a timestamp
/// and a value (at most 20 bytes each) and the punctuation.
const RECORD_BYTES_MAX: usize = 160;

/// A tuple of tag values as a point's tag map: by name.
struct TagsJson<'a>(&'a GroupRecords, &'a [Key]);

impl serde::Serialize for TagsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (g, values) = (self.0, self.1);
        let present = g.by_name.iter().filter(|&&i| i < values.len());
        serializer.collect_map(present.map(|&i| (&g.names[i], ValueJson(&values[i].0))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::exec::{Partial, scan_batch};
    use crate::query::plan::{Statement, parse};

    /// Group records answer exactly what the same groups as NSDb points would: the same order
    /// for every ORDER BY and the same JSON bytes.
    #[test]
    fn group_records_answer_as_points_would() {
        let mut lines = String::new();
        for i in 0..300i64 {
            let (region, host) = (["eu", "us", "ap"][(i % 3) as usize], format!("h{}", i % 7));
            // Ties in value across groups, so the tie-breaks decide.
            lines.push_str(&format!("m,region={region},host={host} value={}i {}\n", i % 4, i * 997));
        }
        lines.push_str("m,region=eu value=5i 1000\n");
        let batch =
            crate::ingest::parse_line_protocol(&lines, "d", "n", crate::ingest::Precision::Ms, 0, 1000).unwrap();
        let rows = &batch.metrics[0].1;
        for sql in [
            "SELECT count(*) FROM m",
            "SELECT count(*) FROM m WHERE value > 100",
            "SELECT sum(value) FROM m GROUP BY region",
            "SELECT max(value) FROM m GROUP BY host, region, INTERVAL 30000",
            "SELECT min(value) FROM m GROUP BY region, region ORDER BY region DESC",
            "SELECT count(*) FROM m GROUP BY region, host, INTERVAL 60000 ORDER BY value DESC LIMIT 9",
            "SELECT avg(value) FROM m GROUP BY host, INTERVAL 60000 ORDER BY host",
            "SELECT avg(value) FROM m GROUP BY host, INTERVAL 60000 ORDER BY lowerBound DESC",
            "SELECT last(value) FROM m GROUP BY INTERVAL 45000 ORDER BY upperBound",
            "SELECT first(value) FROM m GROUP BY region ORDER BY nothing DESC",
        ] {
            let Statement::Select(plan) = parse(sql, 0).unwrap() else { unreachable!() };
            let mut partial = Partial::empty(&plan);
            scan_batch(&plan, plan.filter.as_ref(), rows, i64::MIN, i64::MAX, &mut partial);
            let groups = finish(&plan, partial.clone());
            assert!(matches!(groups, Records::Groups(_)) && !groups.is_empty(), "{sql}");
            // The same groups as points, ordered and cut to the limit as raw rows are.
            let unlimited = SelectPlan { limit: None, ..plan.clone() };
            let mut points = finish(&unlimited, partial).into_points();
            sort_points(&mut points, plan.order.as_ref());
            points.truncate(plan.limit.unwrap_or(usize::MAX));
            let as_points = Records::Points(points);
            let json = |r: &Records| String::from_utf8(r.to_json(&["s".into()])).unwrap();
            assert_eq!(json(&groups), json(&as_points), "{sql}");
        }
    }
}
