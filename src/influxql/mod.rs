//! InfluxDB 1.x's query API (`GET|POST /query?q=…&db=…`): InfluxQL statements answered in
//! InfluxDB's JSON shape (`results` / `statement_id` / `series` with `name`, `tags`, `columns`,
//! `values`), so that Influx clients, the `influx` CLI and Grafana's InfluxDB datasource work.
//!
//! Mapping: a database is a db, a retention policy a namespace (`shoal.write.default-namespace`
//! when none is named), a measurement's field `value` is the metric of the measurement's name and
//! any other field `f` the metric the catalog records as its origin (see
//! [`crate::ingest::Batch::origins`]). A SELECT reads the raw points of each field it names
//! through the cluster's read path (every shard, exact) and aggregates, groups and fills at the
//! coordinator, within `shoal.query.max-records`.

pub mod parse;

use crate::model::{FieldClass, FieldType, FieldValue, MetricKey, Num, Point};
use crate::node::{Node, NodeError};
use crate::query::plan;
use parse::{Cond, Expr, Fill, Func, KeyMatch, Select, Source, Statement};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// How times are written in answers: RFC3339 strings, or integers in a unit (`epoch=`).
#[derive(Debug, Clone, Copy)]
pub enum Epoch {
    Rfc3339,
    /// Nanoseconds per unit.
    Unit(i128),
}

impl Epoch {
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        Ok(match s {
            None | Some("") => Epoch::Rfc3339,
            Some("ns" | "n") => Epoch::Unit(1),
            Some("u" | "µ" | "us") => Epoch::Unit(1_000),
            Some("ms") => Epoch::Unit(1_000_000),
            Some("s") => Epoch::Unit(1_000_000_000),
            Some("m") => Epoch::Unit(60_000_000_000),
            Some("h") => Epoch::Unit(3_600_000_000_000),
            Some(other) => return Err(format!("epoch {other:?} is not one of ns, u, ms, s, m, h")),
        })
    }

    fn time(self, ms: i64) -> Value {
        match self {
            Epoch::Unit(per) => json!((i128::from(ms) * 1_000_000 / per) as i64),
            Epoch::Rfc3339 => json!(rfc3339(ms)),
        }
    }
}

/// InfluxDB's RFC3339 with trailing zeros of the fraction dropped.
pub fn rfc3339(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => {
            let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
            let frac = ms.rem_euclid(1000);
            if frac == 0 {
                format!("{base}Z")
            } else {
                format!("{base}.{}Z", format!("{frac:03}").trim_end_matches('0'))
            }
        }
        None => ms.to_string(),
    }
}

/// Where a request's statements run: the `db` and `rp` parameters, `now()`, the time format.
pub struct Context<'a> {
    pub db: Option<&'a str>,
    pub rp: Option<&'a str>,
    pub epoch: Epoch,
    pub now_ms: i64,
}

/// Runs every statement; each answers in its own result (an error in one is that result's
/// `error`, as InfluxDB does).
pub async fn run(node: &Node, statements: Vec<Statement>, ctx: &Context<'_>) -> Value {
    let mut results = Vec::new();
    for (id, statement) in statements.into_iter().enumerate() {
        let mut result = match execute(node, statement, ctx).await {
            Ok(series) if series.is_empty() => json!({}),
            Ok(series) => json!({ "series": series }),
            Err(e) => json!({ "error": e }),
        };
        result["statement_id"] = json!(id);
        results.push(result);
    }
    json!({ "results": results })
}

/// The permission a statement needs on its db.
pub fn needs_admin(statement: &Statement) -> bool {
    matches!(statement, Statement::CreateDatabase(_))
}

/// The db a statement reads (its `ON`/`FROM` db, else the request's).
pub fn statement_db<'a>(statement: &'a Statement, ctx: &'a Context<'_>) -> Option<&'a str> {
    let named = match statement {
        Statement::Select(s) => s.from.db.as_deref(),
        Statement::ShowMeasurements { db }
        | Statement::ShowRetentionPolicies { db }
        | Statement::ShowTagKeys { db, .. }
        | Statement::ShowTagValues { db, .. }
        | Statement::ShowFieldKeys { db, .. }
        | Statement::ShowSeries { db, .. } => db.as_deref(),
        Statement::CreateDatabase(db) => Some(db.as_str()),
        Statement::ShowDatabases => None,
    };
    named.or(ctx.db)
}

async fn execute(node: &Node, statement: Statement, ctx: &Context<'_>) -> Result<Vec<Value>, String> {
    let db = || statement_db(&statement, ctx).ok_or_else(|| "database name required".to_string());
    match &statement {
        Statement::ShowDatabases => {
            let dbs: BTreeSet<String> = node.catalog.metrics().into_iter().map(|k| k.db).collect();
            let values: Vec<Value> = dbs.into_iter().map(|d| json!([d])).collect();
            Ok(vec![json!({ "name": "databases", "columns": ["name"], "values": values })])
        }
        Statement::CreateDatabase(name) => {
            // Databases exist as soon as something is written to them.
            crate::model::validate_name("db", name)?;
            Ok(Vec::new())
        }
        Statement::ShowRetentionPolicies { .. } => {
            let db = db()?;
            let mut namespaces: BTreeSet<String> =
                node.catalog.metrics().into_iter().filter(|k| k.db == db).map(|k| k.namespace).collect();
            namespaces.insert(node.cfg.default_namespace.clone());
            let values: Vec<Value> = namespaces
                .into_iter()
                .map(|ns| {
                    let default = ns == node.cfg.default_namespace;
                    json!([ns, "0s", "168h0m0s", node.cfg.replication_factor, default])
                })
                .collect();
            Ok(vec![json!({
                "columns": ["name", "duration", "shardGroupDuration", "replicaN", "default"],
                "values": values,
            })])
        }
        Statement::ShowMeasurements { .. } => {
            let db = db()?;
            let ns = namespace(node, ctx.rp, None);
            let names: BTreeSet<String> = measurements(node, db, ns).into_keys().collect();
            if names.is_empty() {
                return Ok(Vec::new());
            }
            let values: Vec<Value> = names.into_iter().map(|m| json!([m])).collect();
            Ok(vec![json!({ "name": "measurements", "columns": ["name"], "values": values })])
        }
        Statement::ShowFieldKeys { from, .. } => {
            let db = db()?;
            let ns = namespace(node, ctx.rp, from.as_ref());
            let mut series = Vec::new();
            for (m, fields) in measurements(node, db, ns) {
                if from.as_ref().is_some_and(|f| f.measurement != m) {
                    continue;
                }
                let values: Vec<Value> = fields
                    .iter()
                    .map(|(field, key)| {
                        let ty = match node.catalog.field(key, "value") {
                            Some((_, FieldType::Int)) => "integer",
                            _ => "float",
                        };
                        json!([field, ty])
                    })
                    .collect();
                series.push(json!({ "name": m, "columns": ["fieldKey", "fieldType"], "values": values }));
            }
            Ok(series)
        }
        Statement::ShowTagKeys { from, .. } => {
            let db = db()?;
            let ns = namespace(node, ctx.rp, from.as_ref());
            let mut series = Vec::new();
            for (m, fields) in measurements(node, db, ns) {
                if from.as_ref().is_some_and(|f| f.measurement != m) {
                    continue;
                }
                let keys = tag_keys(node, fields.values());
                if !keys.is_empty() {
                    let values: Vec<Value> = keys.into_iter().map(|k| json!([k])).collect();
                    series.push(json!({ "name": m, "columns": ["tagKey"], "values": values }));
                }
            }
            Ok(series)
        }
        Statement::ShowTagValues { from, keys, condition, .. } => {
            let db = db()?;
            let ns = namespace(node, ctx.rp, from.as_ref());
            let mut series = Vec::new();
            for (m, fields) in measurements(node, db, ns) {
                if from.as_ref().is_some_and(|f| f.measurement != m) {
                    continue;
                }
                let wanted: Vec<String> = tag_keys(node, fields.values())
                    .into_iter()
                    .filter(|k| match keys {
                        KeyMatch::Eq(want) => k == want,
                        KeyMatch::In(list) => list.contains(k),
                        KeyMatch::Regex(re) => re.is_match(k),
                    })
                    .collect();
                let mut pairs: BTreeSet<(String, String)> = BTreeSet::new();
                for key in fields.values() {
                    let range = condition.as_ref().map_or((i64::MIN, i64::MAX), Cond::time_range);
                    let points = raw_points(node, key, range).await.map_err(|e| e.to_string())?;
                    for p in points.iter().filter(|p| condition.as_ref().is_none_or(|c| c.matches(&tag_of(p)))) {
                        for k in &wanted {
                            if let Some(v) = tag_of(p)(k) {
                                pairs.insert((k.clone(), v));
                            }
                        }
                    }
                }
                if !pairs.is_empty() {
                    let values: Vec<Value> = pairs.into_iter().map(|(k, v)| json!([k, v])).collect();
                    series.push(json!({ "name": m, "columns": ["key", "value"], "values": values }));
                }
            }
            Ok(series)
        }
        Statement::ShowSeries { from, condition, .. } => {
            let db = db()?;
            let ns = namespace(node, ctx.rp, from.as_ref());
            let mut keys: BTreeSet<String> = BTreeSet::new();
            for (m, fields) in measurements(node, db, ns) {
                if from.as_ref().is_some_and(|f| f.measurement != m) {
                    continue;
                }
                for key in fields.values() {
                    let range = condition.as_ref().map_or((i64::MIN, i64::MAX), Cond::time_range);
                    for p in raw_points(node, key, range).await.map_err(|e| e.to_string())? {
                        if condition.as_ref().is_none_or(|c| c.matches(&tag_of(&p))) {
                            let tags = point_tags(&p);
                            let mut series_key = m.clone();
                            for (k, v) in tags {
                                series_key.push_str(&format!(",{k}={v}"));
                            }
                            keys.insert(series_key);
                        }
                    }
                }
            }
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let values: Vec<Value> = keys.into_iter().map(|k| json!([k])).collect();
            Ok(vec![json!({ "columns": ["key"], "values": values })])
        }
        Statement::Select(select) => {
            let db = db()?;
            run_select(node, db, select, ctx).await
        }
    }
}

/// The namespace a statement reads: its source's rp, the request's `rp`, or the default.
fn namespace<'a>(node: &'a Node, rp: Option<&'a str>, from: Option<&'a Source>) -> &'a str {
    from.and_then(|f| f.rp.as_deref()).or(rp).filter(|s| !s.is_empty()).unwrap_or(&node.cfg.default_namespace)
}

/// The measurements of a db's namespace, each with its fields and the metric of each field.
fn measurements(node: &Node, db: &str, ns: &str) -> BTreeMap<String, BTreeMap<String, MetricKey>> {
    let origins = node.catalog.origins();
    let mut out: BTreeMap<String, BTreeMap<String, MetricKey>> = BTreeMap::new();
    for key in node.catalog.metrics() {
        if key.db != db || key.namespace != ns {
            continue;
        }
        let (m, f) = origins.get(&key).cloned().unwrap_or_else(|| (key.metric.clone(), "value".to_string()));
        out.entry(m).or_default().insert(f, key);
    }
    out
}

/// The tag (and dimension) names of the metrics of a measurement.
fn tag_keys<'a>(node: &Node, keys: impl Iterator<Item = &'a MetricKey>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for key in keys {
        if let Some(schema) = node.catalog.schema(key) {
            out.extend(
                schema.fields.iter().filter(|(_, (class, _))| *class != FieldClass::Value).map(|(n, _)| n.clone()),
            );
        }
    }
    out
}

fn text(v: &FieldValue) -> String {
    match v {
        FieldValue::Str(s) => s.clone(),
        FieldValue::Int(i) => i.to_string(),
        FieldValue::Dec(d) => d.to_string(),
    }
}

/// A point's tags and dimensions as text, by name.
fn point_tags(p: &Point) -> BTreeMap<String, String> {
    p.tags.iter().chain(&p.dimensions).map(|(k, v)| (k.clone(), text(v))).collect()
}

fn tag_of(p: &Point) -> impl Fn(&str) -> Option<String> + '_ {
    move |k: &str| p.tags.get(k).or_else(|| p.dimensions.get(k)).map(text)
}

async fn raw_points(node: &Node, key: &MetricKey, range: (i64, i64)) -> Result<Vec<Point>, NodeError> {
    let plan = plan::SelectPlan {
        metric: key.metric.clone(),
        projection: plan::Projection::All,
        filter: None,
        group: None,
        order: None,
        limit: None,
    };
    node.select(key, &plan, range).await
}

fn num_f64(v: Num) -> f64 {
    match v {
        Num::Int(i) => i as f64,
        Num::Dec(d) => d,
    }
}

fn num_json(v: Num) -> Value {
    match v {
        Num::Int(i) => json!(i),
        Num::Dec(d) => json!(d),
    }
}

/// One aggregate over the values of a group, with the time of the point a selector picked.
fn aggregate(func: Func, arg: Option<f64>, values: &mut [(i64, Num)]) -> Option<(Value, Option<i64>)> {
    if values.is_empty() {
        return match func {
            Func::Count => Some((json!(0), None)),
            _ => None,
        };
    }
    let n = values.len();
    let all_int = values.iter().all(|(_, v)| matches!(v, Num::Int(_)));
    let by_value = |a: &(i64, Num), b: &(i64, Num)| num_f64(a.1).total_cmp(&num_f64(b.1)).then(a.0.cmp(&b.0));
    Some(match func {
        Func::Count => (json!(n), None),
        Func::Sum => {
            if all_int {
                let s: i128 = values.iter().map(|(_, v)| if let Num::Int(i) = v { i128::from(*i) } else { 0 }).sum();
                (i64::try_from(s).map_or(json!(s as f64), |s| json!(s)), None)
            } else {
                (json!(values.iter().map(|(_, v)| num_f64(*v)).sum::<f64>()), None)
            }
        }
        Func::Mean => (json!(values.iter().map(|(_, v)| num_f64(*v)).sum::<f64>() / n as f64), None),
        Func::Median => {
            values.sort_by(by_value);
            let mid = n / 2;
            let m = if n % 2 == 1 {
                num_f64(values[mid].1)
            } else {
                (num_f64(values[mid - 1].1) + num_f64(values[mid].1)) / 2.0
            };
            (json!(m), None)
        }
        // Selectors: the point that comes first in their order, ties broken so the answer does
        // not depend on the order points arrived in.
        Func::Min | Func::Max | Func::First | Func::Last => {
            let v = |p: &(i64, Num)| num_f64(p.1);
            let t = |p: &(i64, Num)| p.0;
            let order = |a: &(i64, Num), b: &(i64, Num)| match func {
                Func::Min => v(a).total_cmp(&v(b)).then(t(a).cmp(&t(b))),
                Func::Max => v(b).total_cmp(&v(a)).then(t(a).cmp(&t(b))),
                Func::First => t(a).cmp(&t(b)).then(v(a).total_cmp(&v(b))),
                _ => t(b).cmp(&t(a)).then(v(a).total_cmp(&v(b))),
            };
            let p = values.iter().min_by(|a, b| order(a, b)).expect("not empty");
            (num_json(p.1), Some(p.0))
        }
        Func::Spread => {
            let min = values.iter().map(|(_, v)| num_f64(*v)).fold(f64::INFINITY, f64::min);
            let max = values.iter().map(|(_, v)| num_f64(*v)).fold(f64::NEG_INFINITY, f64::max);
            if all_int { (json!((max - min) as i64), None) } else { (json!(max - min), None) }
        }
        Func::Stddev => {
            if n < 2 {
                return None;
            }
            let mean = values.iter().map(|(_, v)| num_f64(*v)).sum::<f64>() / n as f64;
            let var = values.iter().map(|(_, v)| (num_f64(*v) - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (json!(var.sqrt()), None)
        }
        Func::Percentile => {
            values.sort_by(by_value);
            let p = arg.unwrap_or(50.0);
            let i = (n as f64 * p / 100.0 + 0.5).floor() as i64 - 1;
            if i < 0 || i as usize >= n {
                return None;
            }
            let picked = values[i as usize];
            (num_json(picked.1), Some(picked.0))
        }
    })
}

/// A column of a SELECT, resolved: which field it reads and how.
struct Column {
    name: String,
    field: String,
    func: Option<(Func, Option<f64>)>,
}

async fn run_select(node: &Node, db: &str, s: &Select, ctx: &Context<'_>) -> Result<Vec<Value>, String> {
    let ns = namespace(node, ctx.rp, Some(&s.from));
    let fields = measurements(node, db, ns).remove(&s.from.measurement).unwrap_or_default();
    // Columns, with InfluxDB's names: the alias, else the function's or field's name, made
    // unique with `_1`, `_2`.
    let mut columns: Vec<Column> = Vec::new();
    for p in &s.fields {
        match &p.expr {
            Expr::Wildcard => {
                for f in fields.keys() {
                    columns.push(Column { name: f.clone(), field: f.clone(), func: None });
                }
            }
            Expr::Field(f) => {
                columns.push(Column { name: p.alias.clone().unwrap_or(f.clone()), field: f.clone(), func: None })
            }
            Expr::Call { func, field, arg } => {
                if field == "*" {
                    return Err(format!("{}(*) is not supported; name a field", func.name()));
                }
                columns.push(Column {
                    name: p.alias.clone().unwrap_or(func.name().to_string()),
                    field: field.clone(),
                    func: Some((*func, *arg)),
                })
            }
        }
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for c in &mut columns {
        let n = seen.entry(c.name.clone()).or_default();
        if *n > 0 {
            c.name = format!("{}_{}", c.name, n);
        }
        *n += 1;
    }
    let aggregated = columns.iter().any(|c| c.func.is_some());
    if aggregated && columns.iter().any(|c| c.func.is_none()) {
        return Err("mixing aggregate and non-aggregate queries is not supported".into());
    }
    if !aggregated && s.group.time.is_some() {
        return Err("GROUP BY requires at least one aggregate function".into());
    }
    let (from, to) = s.condition.as_ref().map_or((i64::MIN, i64::MAX), Cond::time_range);
    // A SELECT without an upper time bound reads up to now (as InfluxDB does for GROUP BY time).
    let to = if to == i64::MAX && s.group.time.is_some() { ctx.now_ms.saturating_add(1) } else { to };
    if s.group.time.is_some() && from == i64::MIN {
        return Err("aggregate functions with GROUP BY time require a WHERE time clause with a lower bound".into());
    }
    if let Some((interval, offset)) = s.group.time {
        let buckets = bucket_count(from, to, interval, offset);
        if buckets > node.cfg.query_records_max {
            return Err(format!(
                "the query spans {buckets} time buckets; at most {} are answered (shoal.query.max-records): narrow the time range or widen the interval",
                node.cfg.query_records_max
            ));
        }
    }
    // Read each field's points once, keep those the tag conditions pass.
    let mut points: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for c in &columns {
        if points.contains_key(&c.field) {
            continue;
        }
        let pts = match fields.get(&c.field) {
            Some(key) => raw_points(node, key, (from, to)).await.map_err(|e| e.to_string())?,
            None => Vec::new(),
        };
        let pts = pts.into_iter().filter(|p| s.condition.as_ref().is_none_or(|c| c.matches(&tag_of(p)))).collect();
        points.insert(c.field.clone(), pts);
    }
    // Series: by the GROUP BY tags.
    let tag_names: Vec<String> = if s.group.all_tags {
        let mut all: BTreeSet<String> = BTreeSet::new();
        for pts in points.values() {
            for p in pts {
                all.extend(point_tags(p).into_keys());
            }
        }
        all.into_iter().collect()
    } else {
        s.group.tags.clone()
    };
    let series_of = |p: &Point| -> Vec<String> {
        let tags = tag_of(p);
        tag_names.iter().map(|t| tags(t).unwrap_or_default()).collect()
    };
    let mut by_series: BTreeMap<Vec<String>, BTreeMap<String, Vec<&Point>>> = BTreeMap::new();
    for (field, pts) in &points {
        for p in pts {
            by_series.entry(series_of(p)).or_default().entry(field.clone()).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let series_count = by_series.len();
    for (values_of_tags, by_field) in by_series.into_iter().skip(s.soffset).take(s.slimit.unwrap_or(series_count)) {
        // `SELECT *` without GROUP BY tags lists the tags as columns too.
        let wildcard = s.fields.iter().any(|p| p.expr == Expr::Wildcard);
        let tag_columns: Vec<String> =
            if wildcard && !aggregated && tag_names.is_empty() { all_tags_of(&by_field) } else { Vec::new() };
        let mut rows: Vec<(i64, Vec<Value>)> = if aggregated {
            aggregate_rows(s, &columns, &by_field, from, to)
        } else {
            raw_rows(&columns, &by_field, &tag_columns)
        };
        if s.descending {
            rows.reverse();
        }
        let rows: Vec<(i64, Vec<Value>)> =
            rows.into_iter().skip(s.offset).take(s.limit.unwrap_or(usize::MAX)).collect();
        if rows.is_empty() {
            continue;
        }
        let mut names: Vec<String> = vec!["time".into()];
        names.extend(columns.iter().map(|c| c.name.clone()));
        names.extend(tag_columns.iter().cloned());
        // `SELECT *` orders fields and tags together by name, as InfluxDB does.
        let mut order: Vec<usize> = (1..names.len()).collect();
        if wildcard {
            order.sort_by(|a, b| names[*a].cmp(&names[*b]));
        }
        let names: Vec<String> =
            std::iter::once(names[0].clone()).chain(order.iter().map(|i| names[*i].clone())).collect();
        let values: Vec<Value> = rows
            .into_iter()
            .map(|(t, vals)| {
                let mut row = vec![ctx.epoch.time(t)];
                row.extend(order.iter().map(|i| vals[i - 1].clone()));
                Value::Array(row)
            })
            .collect();
        let mut series = json!({ "name": s.from.measurement, "columns": names, "values": values });
        if !tag_names.is_empty() {
            let tags: serde_json::Map<String, Value> =
                tag_names.iter().cloned().zip(values_of_tags.into_iter().map(Value::String)).collect();
            series["tags"] = Value::Object(tags);
        }
        out.push(series);
    }
    Ok(out)
}

/// The tag names of the points of a series, sorted.
fn all_tags_of(by_field: &BTreeMap<String, Vec<&Point>>) -> Vec<String> {
    let mut names = BTreeSet::new();
    for pts in by_field.values() {
        for p in pts {
            names.extend(point_tags(p).into_keys());
        }
    }
    names.into_iter().collect()
}

/// Rows of a raw SELECT: one per time and tag set, the fields side by side (`null` where a
/// field has no point), then the values of `tag_columns`.
fn raw_rows(
    columns: &[Column],
    by_field: &BTreeMap<String, Vec<&Point>>,
    tag_columns: &[String],
) -> Vec<(i64, Vec<Value>)> {
    let mut rows: BTreeMap<(i64, BTreeMap<String, String>), Vec<Value>> = BTreeMap::new();
    for (i, c) in columns.iter().enumerate() {
        for p in by_field.get(&c.field).into_iter().flatten() {
            let row = rows.entry((p.timestamp, point_tags(p))).or_insert_with(|| vec![Value::Null; columns.len()]);
            row[i] = num_json(p.value);
        }
    }
    rows.into_iter()
        .map(|((t, tags), mut vals)| {
            vals.extend(tag_columns.iter().map(|c| tags.get(c).map_or(Value::Null, |v| json!(v))));
            (t, vals)
        })
        .collect()
}

/// How many GROUP BY time buckets `[from, to)` spans.
fn bucket_count(from: i64, to: i64, interval: i64, offset: i64) -> usize {
    let bucket = |t: i64| (t - offset).div_euclid(interval) * interval + offset;
    let (first, last) = (bucket(from), bucket(to.saturating_sub(1)));
    (((i128::from(last) - i128::from(first)) / i128::from(interval)) + 1).clamp(0, usize::MAX as i128) as usize
}

/// Rows of an aggregate SELECT: one per time bucket (or one in all), filled as asked.
fn aggregate_rows(
    s: &Select,
    columns: &[Column],
    by_field: &BTreeMap<String, Vec<&Point>>,
    from: i64,
    to: i64,
) -> Vec<(i64, Vec<Value>)> {
    let Some((interval, offset)) = s.group.time else {
        // One row for the whole range; a selector alone gives its point's time.
        let lone_selector = columns.len() == 1 && columns[0].func.is_some_and(|(f, _)| f.is_selector());
        let mut time = if from == i64::MIN { 0 } else { from };
        let mut row = Vec::new();
        for c in columns {
            let (func, arg) = c.func.expect("aggregated");
            let mut values: Vec<(i64, Num)> =
                by_field.get(&c.field).into_iter().flatten().map(|p| (p.timestamp, p.value)).collect();
            match aggregate(func, arg, &mut values) {
                Some((v, t)) => {
                    if lone_selector && let Some(t) = t {
                        time = t;
                    }
                    row.push(v);
                }
                None => row.push(Value::Null),
            }
        }
        return vec![(time, row)];
    };
    let bucket = |t: i64| (t - offset).div_euclid(interval) * interval + offset;
    let first = bucket(from);
    let mut grouped: Vec<BTreeMap<i64, Vec<(i64, Num)>>> = vec![BTreeMap::new(); columns.len()];
    for (i, c) in columns.iter().enumerate() {
        for p in by_field.get(&c.field).into_iter().flatten() {
            grouped[i].entry(bucket(p.timestamp)).or_default().push((p.timestamp, p.value));
        }
    }
    let mut rows: Vec<(i64, Vec<Value>)> = Vec::new();
    let buckets = bucket_count(from, to, interval, offset);
    for b in 0..buckets {
        let start = first + b as i64 * interval;
        let mut row = Vec::with_capacity(columns.len());
        let mut any = false;
        for (i, c) in columns.iter().enumerate() {
            let (func, arg) = c.func.expect("aggregated");
            let mut values = grouped[i].remove(&start).unwrap_or_default();
            any |= !values.is_empty();
            // count() of an empty bucket is 0, as in InfluxDB; the others are null.
            row.push(aggregate(func, arg, &mut values).map_or(Value::Null, |(v, _)| v));
        }
        if !any && s.fill == Fill::None {
            continue;
        }
        rows.push((start, row));
    }
    // Fill the empty cells.
    for i in 0..columns.len() {
        match s.fill {
            Fill::Null | Fill::None => {}
            Fill::Value(v) => {
                let is_count = columns[i].func.is_some_and(|(f, _)| f == Func::Count);
                for (_, row) in rows.iter_mut() {
                    if row[i].is_null() {
                        row[i] =
                            if v.fract() == 0.0 && (is_count || v.abs() < 9e15) { json!(v as i64) } else { json!(v) };
                    }
                }
            }
            Fill::Previous => {
                let mut prev = Value::Null;
                for (_, row) in rows.iter_mut() {
                    if row[i].is_null() {
                        row[i] = prev.clone();
                    } else {
                        prev = row[i].clone();
                    }
                }
            }
            Fill::Linear => {
                let known: Vec<(usize, f64)> =
                    rows.iter().enumerate().filter_map(|(k, (_, r))| r[i].as_f64().map(|v| (k, v))).collect();
                for w in known.windows(2) {
                    let ((a, va), (b, vb)) = (w[0], w[1]);
                    for (k, (_, row)) in rows.iter_mut().enumerate().take(b).skip(a + 1) {
                        let v = va + (vb - va) * (k - a) as f64 / (b - a) as f64;
                        row[i] = json!(v);
                    }
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_follow_influxdb() {
        let mut v: Vec<(i64, Num)> =
            [3, 1, 4, 1, 5, 9, 2, 6].iter().enumerate().map(|(t, x)| (t as i64, Num::Int(*x))).collect();
        let get = |f: Func, arg: Option<f64>, v: &mut Vec<(i64, Num)>| aggregate(f, arg, v);
        assert_eq!(get(Func::Count, None, &mut v).unwrap().0, json!(8));
        assert_eq!(get(Func::Sum, None, &mut v).unwrap().0, json!(31));
        assert_eq!(get(Func::Mean, None, &mut v).unwrap().0, json!(3.875));
        assert_eq!(get(Func::Median, None, &mut v).unwrap().0, json!(3.5));
        assert_eq!(get(Func::Spread, None, &mut v).unwrap().0, json!(8));
        assert_eq!(get(Func::Max, None, &mut v).unwrap(), (json!(9), Some(5)));
        assert_eq!(get(Func::Percentile, Some(90.0), &mut v).unwrap().0, json!(6));
        assert_eq!(get(Func::Percentile, Some(50.0), &mut v).unwrap().0, json!(3));
        let sd = get(Func::Stddev, None, &mut v).unwrap().0.as_f64().unwrap();
        assert!((sd - 2.748376).abs() < 1e-6, "{sd}");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
