//! The node assembly: the one place that knows every concrete part and wires them together.
//! The binary, the integration tests and (later) the simulator all build a node through here.

use crate::catalog::{Catalog, CatalogError};
use crate::config::Config;
use crate::env::Env;
use crate::ingest::Batch;
use crate::metrics::Metrics;
use crate::model::{MetricKey, Point};
use crate::query::{self, QueryError, plan};
use crate::storage::{Storage, StorageConfig, StorageError};
use std::sync::Arc;

/// What can go wrong serving a request, with enough detail to pick the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<CatalogError> for NodeError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Conflict { .. } => NodeError::BadRequest(e.to_string()),
            CatalogError::Storage { .. } => NodeError::Internal(e.to_string()),
        }
    }
}

impl From<StorageError> for NodeError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Closed => NodeError::Unavailable(e.to_string()),
            other => NodeError::Internal(other.to_string()),
        }
    }
}

impl From<QueryError> for NodeError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Invalid(m) => NodeError::BadRequest(m),
            QueryError::UnknownMetric(_) => NodeError::NotFound(e.to_string()),
            QueryError::TooLarge { .. } => NodeError::TooLarge(e.to_string()),
            QueryError::Storage(s) => s.into(),
        }
    }
}

/// A query as `POST /query` receives it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryRequest {
    pub db: String,
    pub namespace: String,
    #[serde(default)]
    pub metric: Option<String>,
    pub query_string: String,
    #[serde(default)]
    pub from: Option<i64>,
    #[serde(default)]
    pub to: Option<i64>,
}

pub enum QueryOutcome {
    Records(Vec<Point>),
    Deleted(u64),
}

pub struct Node {
    pub cfg: Config,
    pub env: Env,
    pub metrics: Arc<Metrics>,
    pub catalog: Arc<Catalog>,
    pub storage: Arc<Storage>,
    pub started_ms: i64,
}

impl Node {
    pub async fn open(cfg: Config, env: Env) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", cfg.data_dir.display()))?;
        let metrics = Arc::new(Metrics::default());
        let catalog = Arc::new(Catalog::open(&cfg.data_dir)?);
        let storage_cfg = StorageConfig {
            shard_interval_ms: cfg.shard_interval_ms,
            memtable_points_max: cfg.memtable_points_max,
            flush_interval: cfg.flush_interval,
            segments_max: cfg.segments_max,
        };
        let storage = Storage::open(&cfg.data_dir, storage_cfg, metrics.clone()).await?;
        let started_ms = env.clock.now_ms();
        let node = Arc::new(Self { cfg, env, metrics, catalog, storage, started_ms });
        node.spawn_background();
        Ok(node)
    }

    fn spawn_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = (self.cfg.flush_interval / 4).max(std::time::Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(node) = weak.upgrade() else { return };
                node.storage.flush_idle().await;
            }
        });
    }

    /// Admits a whole batch into the schema (all or nothing), then makes it durable.
    pub async fn ingest(&self, batch: Batch) -> Result<usize, NodeError> {
        if batch.len() > self.cfg.write_batch_points_max {
            return Err(NodeError::TooLarge(format!(
                "the batch has {} points; at most {} are accepted per request (shoal.write.max-batch-points)",
                batch.len(),
                self.cfg.write_batch_points_max
            )));
        }
        self.catalog.admit(&batch.metrics)?;
        let total = batch.len();
        let writes = batch.metrics.into_iter().map(|(key, rows)| async move { self.storage.write(&key, rows).await });
        for result in futures_util::future::join_all(writes).await {
            result?;
        }
        Ok(total)
    }

    pub async fn query(&self, req: QueryRequest) -> Result<QueryOutcome, NodeError> {
        self.metrics.queries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let statement =
            plan::parse(&req.query_string, self.env.clock.now_ms()).map_err(|e| NodeError::BadRequest(e.0))?;
        let metric = match &statement {
            plan::Statement::Select(s) => &s.metric,
            plan::Statement::Delete(d) => &d.metric,
        };
        if let Some(m) = &req.metric
            && m != metric
        {
            return Err(NodeError::BadRequest(format!("the request names metric {m} but the query reads {metric}")));
        }
        let key = MetricKey::new(&req.db, &req.namespace, metric).map_err(NodeError::BadRequest)?;
        if self.catalog.schema(&key).is_none() {
            return Err(QueryError::UnknownMetric(key.to_string()).into());
        }
        match statement {
            plan::Statement::Select(plan) => {
                query::validate_fields(&self.catalog, &key, &plan)?;
                let range = query::time_range(plan.filter.as_ref(), req.from, req.to);
                let storage = self.storage.clone();
                let max = self.cfg.query_records_max;
                let records = tokio::task::spawn_blocking(move || -> Result<Vec<Point>, QueryError> {
                    let partial = query::partial_local(&storage, &key, &plan, range, max)?;
                    Ok(query::exec::finish(&plan, partial))
                })
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))??;
                Ok(QueryOutcome::Records(records))
            }
            plan::Statement::Delete(plan) => {
                let probe = plan::SelectPlan {
                    metric: plan.metric.clone(),
                    projection: plan::Projection::All,
                    filter: plan.filter.clone(),
                    group: None,
                    order: None,
                    limit: None,
                };
                query::validate_fields(&self.catalog, &key, &probe)?;
                let range = query::time_range(plan.filter.as_ref(), req.from, req.to);
                let filter = Arc::new(plan.filter);
                let mut deleted = 0;
                for shard in self.storage.shards_of(&key, range.0, range.1) {
                    let filter = filter.clone();
                    deleted += shard
                        .delete(Box::new(move |batch| {
                            let mut keep = vec![true; batch.len()];
                            for row in query::exec::matching_rows(filter.as_ref().as_ref(), batch, range.0, range.1) {
                                keep[row] = false;
                            }
                            keep
                        }))
                        .await?;
                }
                Ok(QueryOutcome::Deleted(deleted))
            }
        }
    }

    pub async fn drop_metric(&self, key: &MetricKey) -> Result<(), NodeError> {
        if !self.catalog.drop_metric(key)? {
            return Err(NodeError::NotFound(format!("metric {key} does not exist")));
        }
        self.storage.drop_metric(key).await?;
        Ok(())
    }

    pub fn status(&self) -> serde_json::Value {
        let shards = self.storage.all_shards();
        serde_json::json!({
            "node_id": self.cfg.node_id,
            "cluster_id": self.cfg.cluster_id,
            "version": env!("CARGO_PKG_VERSION"),
            "state": "ready",
            "uptime_ms": self.env.clock.now_ms() - self.started_ms,
            "data_dir": self.cfg.data_dir.display().to_string(),
            "metrics": self.catalog.metrics().len(),
            "shards": shards.len(),
            "points": shards.iter().map(|s| s.points()).sum::<u64>(),
        })
    }
}
