//! The NSDb SQL dialect: `plan` parses statements; `exec` computes per-shard partial results
//! and merges them. This module runs a query over the shards of this node; the cluster's read
//! coordinator will run the same `exec` on each replica and merge the partials it receives.

pub mod answer;
pub mod blocks;
pub mod cache;
pub mod exec;
pub mod plan;

use crate::catalog::Catalog;
use crate::model::MetricKey;
use crate::storage::{Storage, StorageError};
use exec::Partial;
use plan::{Aggregate, Filter, Projection, SelectPlan};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Invalid(String),
    #[error("metric {0} does not exist")]
    UnknownMetric(String),
    #[error("the query matches more than {max} records; narrow it or add LIMIT")]
    TooLarge { max: usize },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Checks that every field the plan names exists in the metric's schema.
pub fn validate_fields(catalog: &Catalog, key: &MetricKey, plan: &SelectPlan) -> Result<(), QueryError> {
    let mut names = Vec::new();
    if let Some(f) = &plan.filter {
        f.fields(&mut names);
    }
    match &plan.projection {
        Projection::Fields(fields) => names.extend(fields.iter().cloned()),
        Projection::Aggregate(Aggregate::CountDistinct(f)) => names.push(f.clone()),
        _ => {}
    }
    for t in plan.group.iter().flat_map(|g| &g.tags) {
        if !matches!(catalog.field(key, t), Some((crate::model::FieldClass::Tag, _))) {
            return Err(QueryError::Invalid(format!("GROUP BY {t}: {t} is not a tag of metric {}", key.metric)));
        }
    }
    if let Some(o) = &plan.order {
        let group_field = plan.group.as_ref().is_some_and(|g| g.tags.contains(&o.field));
        if !group_field {
            names.push(o.field.clone());
        }
    }
    for name in names {
        if name != "timestamp" && name != "value" && catalog.field(key, &name).is_none() {
            return Err(QueryError::Invalid(format!("field {name} does not exist in metric {}", key.metric)));
        }
    }
    Ok(())
}

/// The time range a select must read: its filter's range intersected with the request's.
pub fn time_range(filter: Option<&Filter>, from: Option<i64>, to: Option<i64>) -> (i64, i64) {
    let (lo, hi) = filter.map_or((i64::MIN, i64::MAX), Filter::time_range);
    (lo.max(from.unwrap_or(i64::MIN)), hi.min(to.map_or(i64::MAX, |t| t.saturating_add(1))))
}

/// Runs a select over this node's shards of `key`, returning its partial result.
pub fn partial_local(
    storage: &Storage,
    key: &MetricKey,
    plan: &SelectPlan,
    range: (i64, i64),
    max: usize,
) -> Result<Partial, QueryError> {
    partial_of_shards(storage.shards_of(key, range.0, range.1).into_iter().map(|s| s.snapshot()), plan, range, max)
}

/// Runs a select over the given shard states (a replica answering for one shard, or all local
/// ones; an iterator takes each snapshot only when its shard's turn comes).
pub fn partial_of_shards(
    snapshots: impl IntoIterator<Item = crate::storage::ShardSnapshot>,
    plan: &SelectPlan,
    range: (i64, i64),
    max: usize,
) -> Result<Partial, QueryError> {
    let mut total = Partial::empty(plan);
    let mut columns = Vec::new();
    if let Some(f) = &plan.filter {
        f.fields(&mut columns);
    }
    if let Some(g) = &plan.group {
        columns.extend(g.tags.iter().cloned());
    }
    if let Projection::Aggregate(Aggregate::CountDistinct(f)) = &plan.projection {
        columns.push(f.clone());
    }
    // Raw rows need every column; aggregates decode only what they read.
    let columns = matches!(plan.projection, Projection::Aggregate(_)).then_some(columns);
    let threads = crate::env::scan_threads();
    for snapshot in snapshots {
        let work = snapshot.blocks_in(range.0, range.1, &mut blocks::SelectVisitor::new(plan, range, max));
        let parts = if work >= PARALLEL_SCAN_BLOCKS_MIN { threads } else { 1 };
        let scan_part = |part: usize| -> Result<Partial, QueryError> {
            let mut visitor = blocks::SelectVisitor::new(plan, range, max);
            snapshot.visit_part(range.0, range.1, columns.as_deref(), &mut visitor, part, parts)?;
            if visitor.too_large {
                return Err(QueryError::TooLarge { max });
            }
            Ok(visitor.partial)
        };
        let partials: Vec<Result<Partial, QueryError>> = if parts == 1 {
            vec![scan_part(0)]
        } else {
            std::thread::scope(|scope| {
                let scan_part = &scan_part;
                let running: Vec<_> = (1..parts).map(|part| scope.spawn(move || scan_part(part))).collect();
                let mut partials = vec![scan_part(0)];
                for worker in running {
                    partials.push(worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
                }
                partials
            })
        };
        // Merged in part order, so a sum adds up the same way on every run.
        for partial in partials {
            total.merge(partial?);
            total.trim(plan);
            if total.size(plan) > max {
                return Err(QueryError::TooLarge { max });
            }
        }
    }
    Ok(total)
}

/// A shard scan is split over the cores from this many blocks in range: below it, starting
/// threads and merging their partials costs more than it saves.
const PARALLEL_SCAN_BLOCKS_MIN: usize = 64;
