//! The node assembly: the one place that knows every concrete part and wires them together.
//! The binary, the integration tests and (later) the simulator all build a node through here.

use crate::catalog::{Catalog, CatalogError};
use crate::config::Config;
use crate::env::Env;
use crate::ingest::Batch;
use crate::membership::{
    KEY_CAPACITY, KEY_CATALOG_DIGEST, KEY_HTTP_ADDR, KEY_READINESS, KEY_ROLES, Member, Membership, MembershipConfig,
};
use crate::metrics::Metrics;
use crate::model::MetricKey;
use crate::query::{self, QueryError, plan};
use crate::storage::{Storage, StorageConfig, StorageError};
use std::sync::Arc;

/// Why a graceful leave did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    #[error("a leave is already in progress on this node")]
    InProgress,
    #[error(
        "leave abandoned: {kept} of {total} shards found no other storage node to take them within \
         shoal.cluster.leave-timeout; the node stays in the cluster and keeps them"
    )]
    Abandoned { kept: usize, total: usize },
}

/// What can go wrong serving a request, with enough detail to pick the HTTP status.
/// A file in the data dir of a node that completed `shoal leave`.
const LEFT_MARKER: &str = "left";

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
    /// The request was made against data of a metric that has since been dropped.
    #[error("{0}")]
    Dropped(String),
    /// The disk is full: nothing was stored, and the write may be retried once space is freed.
    #[error("{0}")]
    StorageFull(String),
    #[error("{0}")]
    Internal(String),
}

impl From<CatalogError> for NodeError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Conflict { .. } => NodeError::BadRequest(e.to_string()),
            CatalogError::Storage { .. } => NodeError::Internal(e.to_string()),
            CatalogError::NotSynced => NodeError::Unavailable(e.to_string()),
        }
    }
}

impl From<StorageError> for NodeError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Closed => NodeError::Unavailable(e.to_string()),
            full if full.is_disk_full() => {
                NodeError::StorageFull(format!("the disk is full, nothing was stored: {full}"))
            }
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
    /// A select's answer as its JSON body ([`query::answer::Records::to_json`]), computed or
    /// kept: the records, and under `"partial"` the shards no replica could answer for (only when the
    /// request allowed a partial answer; otherwise they fail it with a 503).
    Records(axum::body::Bytes),
    Deleted(u64),
}

/// The addresses and transport a node runs on; the binary binds real sockets, tests and the
/// simulator hand in their own.
pub struct NodeIo<'a> {
    pub http_addr: std::net::SocketAddr,
    pub gossip_listen: std::net::SocketAddr,
    pub gossip_advertise: std::net::SocketAddr,
    pub gossip_transport: &'a dyn chitchat::transport::Transport,
    pub capacity_probe: Box<dyn crate::capacity::CapacityProbe>,
    /// How this node calls its peers' internal API.
    pub peers: Arc<dyn crate::peer::PeerClient>,
    /// The cluster keyring (`None`: no cluster secret, internal requests are not checked).
    /// The gossip transport and the peer client are expected to use the same one.
    pub keyring: Option<Arc<crate::keyring::Keyring>>,
}

/// What one replica made of its share of a write; a missed share keeps its encoded
/// `ReplicaWrite` so it can become a hint.
struct ReplicaOutcome {
    shard: crate::model::ShardId,
    replica: String,
    result: Result<(), String>,
    /// The replica failed because its disk is full.
    disk_full: bool,
    payload: Option<Vec<u8>>,
}

/// A restart is a new generation: the start time, or one more than the last generation this
/// data dir used if the clock is behind it (stepped back, skewed), so generations only grow.
fn next_generation(data_dir: &std::path::Path, now_ms: i64) -> anyhow::Result<u64> {
    let path = data_dir.join("generation");
    let last = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    let generation = (now_ms.max(0) as u64).max(last + 1);
    crate::storage::write_atomic(&path, generation.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot record the generation in {}: {e}", path.display()))?;
    Ok(generation)
}

/// The rows a delete keeps: those outside its range or not matching its filter.
fn delete_rule(filter: Option<crate::query::plan::Filter>, from: i64, to: i64) -> crate::storage::KeepRow {
    Box::new(move |batch| {
        let mut keep = vec![true; batch.len()];
        for row in query::exec::matching_rows(filter.as_ref(), batch, from, to) {
            keep[row] = false;
        }
        keep
    })
}

/// Turns a stored tombstone (a `ReplicaDelete` rule) back into its rule.
pub(crate) fn tombstone_rule() -> crate::storage::TombstoneRule {
    Arc::new(|bytes| match crate::peer::ReplicaDelete::from_rule(bytes) {
        Ok(d) => delete_rule(d.filter, d.from, d.to),
        Err(e) => {
            tracing::error!(error = %e, "an unreadable tombstone is ignored");
            Box::new(|batch| vec![true; batch.len()])
        }
    })
}

/// The drop epoch a tombstone's delete was made under (0 when unreadable or older).
pub(crate) fn tombstone_epoch(rule: &[u8]) -> u64 {
    crate::peer::ReplicaDelete::from_rule(rule).map_or(0, |d| d.epoch)
}

/// What the read coordinator learned of one shard.
enum ShardReply {
    /// The copy the cached answer read is unchanged.
    Unchanged(crate::model::ShardId),
    /// The shard's partial, and the copy it was read from (`None`: no replica holds one).
    Computed { partial: query::exec::Partial, source: Option<query::cache::Source> },
}

/// Answers gathered so far by a scatter.
struct Gathered {
    total: query::exec::Partial,
    missing: Vec<String>,
    reasons: Vec<String>,
    sources: Option<Vec<query::cache::Source>>,
    unchanged: Vec<crate::model::ShardId>,
}

/// What a scatter reuses and what it is for: the kept answer whose copies it asks about,
/// and whether its answer will be kept (then it asks other replicas for read leases).
#[derive(Clone, Copy)]
struct Keeping<'a> {
    cached: Option<&'a query::cache::CachedAnswer>,
    lease: bool,
}

/// What a scatter came to.
enum Scattered {
    /// Every shard the cached answer read is unchanged, and no other shard is in range.
    Unchanged,
    /// The merged partial, the shards missing from it, and the copies it read (`None` when
    /// that cannot be told, so the answer is not kept).
    Merged { partial: query::exec::Partial, missing: Vec<String>, sources: Option<Vec<query::cache::Source>> },
}

/// Why the read coordinator has no partial result for a shard.
enum ShardAnswer {
    /// No replica could answer: the shard is missing from the result.
    Missing { shard: String, reason: String },
    /// An answer that fails the whole query (a result too large).
    Fatal(NodeError),
}

/// How one shard of a write is doing against its consistency level.
#[derive(Default)]
struct ShardTally {
    replicas: usize,
    required: usize,
    acks: usize,
    errors: Vec<String>,
    /// How many of the errors were full disks.
    disk_full: usize,
}

/// Whether this node accepts writes, recomputed every gossip interval from the membership view.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Why writes are refused, when they are.
    pub reason: Option<String>,
    pub live_members: usize,
    pub bootstrapped: bool,
}

pub struct Node {
    pub cfg: Config,
    pub env: Env,
    pub metrics: Arc<Metrics>,
    pub membership: Arc<Membership>,
    pub catalog: Arc<Catalog>,
    pub storage: Arc<Storage>,
    pub started_ms: i64,
    pub http_addr: std::net::SocketAddr,
    readiness: std::sync::RwLock<Readiness>,
    /// Set once this node has compared its whole catalog with a live peer's since it started
    /// (see [`Node::catalog_is_confirmed`]).
    catalog_confirmed: std::sync::atomic::AtomicBool,
    leaving: std::sync::atomic::AtomicBool,
    /// Flips to true when the node has been asked to stop (`shoal leave`).
    stop_tx: tokio::sync::watch::Sender<bool>,
    /// Client for the internal API of peers.
    pub(crate) peers: Arc<dyn crate::peer::PeerClient>,
    pub(crate) hints: Arc<crate::hints::HintStore>,
    pub(crate) repair: crate::repair::RepairState,
    /// Taken shared by every request that stores points at a checked drop epoch, and
    /// exclusively while a drop removes this node's shards: no point of the old epoch lands
    /// after the drop, none of the new one before it (see [`Node::fence_epoch`]).
    drop_fence: tokio::sync::RwLock<()>,
    /// Answers of recent selects, kept to be served again while their shard copies are unchanged.
    answers: std::sync::Mutex<query::cache::AnswerCache>,
    /// Read leases granted on this node's copies and held on other replicas' ([`crate::lease`]).
    pub(crate) leases: crate::lease::Leases,
    pub keyring: Option<Arc<crate::keyring::Keyring>>,
    /// The users of the public API (`shoal.auth.file`); `None`: no credentials are asked.
    pub users: Option<Arc<crate::auth::Users>>,
}
/// The storage's [`crate::storage::ChangeGate`]: a change to a shard revokes its read leases.
struct RevokeLeases(std::sync::Weak<Node>);

#[async_trait::async_trait]
impl crate::storage::ChangeGate for RevokeLeases {
    async fn changed(&self, shards: &[crate::model::ShardId]) {
        if let Some(node) = self.0.upgrade() {
            node.revoke_leases(shards).await;
        }
    }
}

/// Shards a query asks at once.
const SCATTER_SHARDS_MAX: usize = 32;
/// Anti-entropy also pulls from one live peer this often when all digests agree.
const CATALOG_PULL_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// After a change, the changed parts are pushed to at most this many peers (gossip does the rest).
const CATALOG_PUSH_FANOUT: usize = 3;

/// The rows of a metric's batch by the start of their shard's time bucket. A batch inside one
/// shard, the usual case, gets an empty row list: it goes on whole.
fn rows_by_shard(timestamps: &[i64], interval: i64) -> std::collections::BTreeMap<i64, Vec<usize>> {
    let bucket = |ts: i64| ts.div_euclid(interval) * interval;
    let mut by_shard: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
    let (lo, hi) = timestamps.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    if !timestamps.is_empty() && bucket(lo) == bucket(hi) {
        by_shard.insert(bucket(lo), Vec::new());
    } else {
        for (row, &ts) in timestamps.iter().enumerate() {
            by_shard.entry(bucket(ts)).or_default().push(row);
        }
    }
    by_shard
}

impl Node {
    pub async fn open(cfg: Config, env: Env, io: NodeIo<'_>) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", cfg.data_dir.display()))?;
        // A node that left handed its shards to others: starting it again on the same data dir
        // would bring back copies that no placement lists (a container restarted after
        // `shoal leave`, as a StatefulSet does until it is scaled down).
        let left = cfg.data_dir.join(LEFT_MARKER);
        if left.exists() {
            anyhow::bail!(
                "node {} left the cluster (shoal leave) and its shards live elsewhere now; to join again, \
                 start it on an empty data dir (remove {} or point shoal.data-dir elsewhere)",
                cfg.node_id,
                cfg.data_dir.display()
            );
        }
        let metrics = Arc::new(Metrics::default());
        // A node that was part of a formed cluster but lost its catalog file must sync first.
        let was_in_cluster = cfg.data_dir.join("bootstrapped").exists();
        let catalog = Arc::new(Catalog::open(&cfg.data_dir, &cfg.node_id, env.clock.now_ms(), was_in_cluster)?);
        let storage_cfg = StorageConfig {
            shard_interval_ms: cfg.shard_interval_ms,
            memtable_points_max: cfg.memtable_points_max,
            memtable_budget_points: cfg.memtable_budget_points,
            flush_interval: cfg.flush_interval,
            segments_max: cfg.segments_max,
            // Long enough to outlive any copy read before a delete: hints live this long.
            tombstone_grace_ms: cfg.hints_age_max.as_millis() as i64,
            wal_file_bytes: crate::storage::wal::WAL_FILE_BYTES,
            wal_salvage: cfg.wal_salvage,
        };
        crate::env::set_background_priority(cfg.compaction_priority);
        let storage = Storage::open(&cfg.data_dir, storage_cfg, metrics.clone(), tombstone_rule()).await?;
        let started_ms = env.clock.now_ms();
        // Written by versions that guessed when points came from the time alive.
        let _ = std::fs::remove_file(cfg.data_dir.join("last-alive"));
        let bootstrapped = cfg.data_dir.join("bootstrapped").exists() || cfg.bootstrap_expect <= 1;
        let roles: Vec<&str> = cfg
            .roles
            .iter()
            .map(|r| match r {
                crate::config::Role::Storage => "storage",
                crate::config::Role::Query => "query",
            })
            .collect();
        let mut probe = io.capacity_probe;
        let capacity = probe.sample();
        let keys = vec![
            (KEY_CAPACITY.to_string(), capacity.to_gossip()),
            (KEY_HTTP_ADDR.to_string(), io.http_addr.to_string()),
            (KEY_ROLES.to_string(), roles.join(",")),
            (KEY_READINESS.to_string(), if bootstrapped { "ready" } else { "joining" }.to_string()),
        ];
        // A node that ran before on this data dir may have granted read leases that still run.
        let restarted = cfg.data_dir.join("generation").exists();
        let generation = next_generation(&cfg.data_dir, started_ms)?;
        let membership_cfg = MembershipConfig {
            node_id: cfg.node_id.clone(),
            generation,
            cluster_id: cfg.cluster_id.clone(),
            listen_addr: io.gossip_listen,
            advertise_addr: io.gossip_advertise,
            gossip_interval: cfg.gossip_interval,
            phi_threshold: cfg.phi_threshold,
            dead_node_grace: cfg.dead_node_grace,
            seeds: cfg.seeds.clone(),
        };
        let membership = Membership::start(membership_cfg, io.gossip_transport, keys).await?;
        membership.spawn_observer();
        if cfg.discovery_mode != crate::config::DiscoveryMode::Static {
            let name = cfg.discovery_name.clone().or_else(|| cfg.discovery_service.clone()).unwrap_or_default();
            let dns_server = match &cfg.discovery_dns_server {
                Some(s) => Some(s.parse().map_err(|_| {
                    anyhow::anyhow!("config key shoal.cluster.discovery.dns-server: expected ip:port, got {s:?}")
                })?),
                None => None,
            };
            let name = if cfg.discovery_mode == crate::config::DiscoveryMode::DnsSrv {
                cfg.discovery_service.clone().unwrap_or(name)
            } else {
                name
            };
            let discovery = crate::discovery::DiscoveryConfig {
                mode: cfg.discovery_mode,
                name,
                dns_server,
                gossip_port: io.gossip_advertise.port(),
                etcd: (cfg.discovery_mode == crate::config::DiscoveryMode::Etcd).then(|| cfg.discovery_etcd.clone()),
                cluster_id: cfg.cluster_id.clone(),
                node_id: cfg.node_id.clone(),
            };
            crate::discovery::spawn(&membership, discovery);
        }
        let users = match &cfg.auth_file {
            Some(path) => {
                Some(Arc::new(crate::auth::Users::load(path).map_err(|e| anyhow::anyhow!("shoal.auth.file: {e}"))?))
            }
            None => None,
        };
        let readiness = Readiness { ready: false, reason: Some("starting".into()), live_members: 1, bootstrapped };
        let hints = crate::hints::HintStore::open(&cfg.data_dir, cfg.hints_bytes_max_per_node, cfg.hints_age_max)
            .map_err(|e| anyhow::anyhow!("cannot open the hints in {}: {e}", cfg.data_dir.display()))?;
        let hints = Arc::new(hints);
        let answers = std::sync::Mutex::new(query::cache::AnswerCache::new(cfg.query_cache_bytes));
        let node = Arc::new(Self {
            cfg,
            env,
            metrics,
            membership,
            catalog,
            storage,
            started_ms,
            http_addr: io.http_addr,
            readiness: std::sync::RwLock::new(readiness),
            catalog_confirmed: Default::default(),
            leaving: Default::default(),
            stop_tx: tokio::sync::watch::channel(false).0,
            peers: io.peers,
            hints,
            repair: Default::default(),
            drop_fence: Default::default(),
            answers,
            leases: crate::lease::Leases::start(restarted),
            keyring: io.keyring,
            users,
        });
        node.storage.set_change_gate(Arc::new(RevokeLeases(Arc::downgrade(&node))));
        node.update_readiness().await;
        node.spawn_background();
        node.spawn_recovery();
        node.spawn_capacity_probe(probe);
        Ok(node)
    }

    /// Applies the write gates to the current membership view (DESIGN.md section 3):
    /// `bootstrap-expect` for a new cluster, `required-contact-point-nr` against partitions.
    async fn update_readiness(&self) {
        let members = self.membership.members().await;
        let seen = members.len();
        let live = members.iter().filter(|m| m.is_live()).count();
        let mut bootstrapped = self.readiness.read().expect("readiness lock").bootstrapped;
        if !bootstrapped && seen >= self.cfg.bootstrap_expect {
            bootstrapped = true;
            // Remembered, so a restarted node of a formed cluster does not wait again.
            if let Err(e) = crate::storage::write_atomic(&self.cfg.data_dir.join("bootstrapped"), b"1") {
                tracing::warn!(error = %e, "cannot record that the cluster is bootstrapped");
            }
            if !self.leaving.load(std::sync::atomic::Ordering::SeqCst) {
                self.membership.set(KEY_READINESS, "ready").await;
            }
            tracing::info!(members = seen, "cluster bootstrapped: accepting writes");
        }
        let reason = if self.membership.is_deaf() {
            Some("the gossip task has stopped: this node cannot hear the cluster".to_string())
        } else if self.leaving.load(std::sync::atomic::Ordering::SeqCst) {
            Some("this node is leaving the cluster".to_string())
        } else if !bootstrapped {
            Some(format!(
                "the cluster is not formed yet: {seen} of {} expected members seen, {} missing (shoal.cluster.bootstrap-expect)",
                self.cfg.bootstrap_expect,
                self.cfg.bootstrap_expect - seen
            ))
        } else if !self.catalog_is_confirmed() {
            Some("this node has not compared its catalog with another member's since it started, and its catalog names other nodes: its schemas and shard map may be stale (a metric dropped, a shard placed while it was down); queries with ?partial=true are served".to_string())
        } else if live < self.cfg.required_contact_point_nr {
            Some(format!(
                "this node sees {live} live members but needs {} (shoal.cluster.required-contact-point-nr); reads are still served",
                self.cfg.required_contact_point_nr
            ))
        } else {
            None
        };
        *self.readiness.write().expect("readiness lock") =
            Readiness { ready: reason.is_none(), reason, live_members: live, bootstrapped };
    }

    /// One round of catalog anti-entropy: publish our digest; compare parts with a peer whose
    /// digest differs (or, now and then, with any live peer); push the parts changed since the
    /// last push to a few peers.
    async fn catalog_anti_entropy(
        &self,
        round: usize,
        pushed: &mut std::collections::BTreeMap<MetricKey, u64>,
        last_pull: &mut tokio::time::Instant,
    ) {
        let digest = self.catalog.digest();
        let digest_text = format!("{digest:016x}");
        let members = self.membership.members().await;
        if members.iter().find(|m| m.is_self).and_then(|m| m.catalog_digest.as_deref()) != Some(digest_text.as_str()) {
            self.membership.set(KEY_CATALOG_DIGEST, &digest_text).await;
        }
        let peers: Vec<&Member> =
            members.iter().filter(|m| !m.is_self && m.is_live() && m.http_addr.is_some()).collect();
        if peers.is_empty() {
            return;
        }
        if peers.iter().any(|m| m.catalog_digest.as_deref() == Some(digest_text.as_str())) {
            self.catalog_confirmed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let differing: Vec<&&Member> =
            peers.iter().filter(|m| m.catalog_digest.as_deref().is_some_and(|d| d != digest_text)).collect();
        let exchange_with = if !differing.is_empty() {
            Some(differing[round % differing.len()].http_addr.clone())
        } else if last_pull.elapsed() >= CATALOG_PULL_EVERY {
            Some(peers[round % peers.len()].http_addr.clone())
        } else {
            None
        };
        if let Some(Some(addr)) = exchange_with {
            *last_pull = tokio::time::Instant::now();
            if let Err(e) = self.exchange_catalog(&addr).await {
                tracing::debug!(peer = %addr, error = %e, "catalog exchange failed");
            }
        }
        let digests = self.catalog.part_digests();
        let changed: Vec<MetricKey> =
            digests.iter().filter(|(k, d)| pushed.get(*k) != Some(*d)).map(|(k, _)| k.clone()).collect();
        *pushed = digests;
        if changed.is_empty() {
            return;
        }
        // The exchange may have taken a while: push only to peers that are still live now.
        let members = self.membership.members().await;
        let peers: Vec<&Member> =
            members.iter().filter(|m| !m.is_self && m.is_live() && m.http_addr.is_some()).collect();
        if peers.is_empty() {
            return;
        }
        let parts = self.catalog.parts_bytes(&changed);
        for m in peers.iter().cycle().skip(round % peers.len()).take(CATALOG_PUSH_FANOUT.min(peers.len())) {
            let Some(addr) = &m.http_addr else { continue };
            if let Err(e) = self.peers.post(addr, "/internal/v1/catalog", parts.clone()).await {
                tracing::debug!(peer = %addr, error = %e, "catalog push failed");
            }
        }
    }

    /// Compares catalogs with a peer part by part: merges the parts it sends, and sends it the
    /// parts it asks for.
    async fn exchange_catalog(&self, addr: &str) -> anyhow::Result<()> {
        let request = crate::catalog::CatalogDiffRequest { digests: self.catalog.part_digests(), metric: None };
        let body = postcard::to_stdvec(&request).expect("diff requests encode");
        let bytes = self.peers.post(addr, "/internal/v1/catalog/diff", body).await?;
        if bytes.len() > crate::catalog::STATE_BYTES_MAX {
            anyhow::bail!("a catalog diff larger than {} bytes", crate::catalog::STATE_BYTES_MAX);
        }
        let diff: crate::catalog::CatalogDiff = postcard::from_bytes(&bytes)?;
        if self.merge_catalog(diff.state).await? {
            tracing::debug!(peer = %addr, "catalog updated from a peer");
        }
        if !diff.wanted.is_empty() {
            self.peers.post(addr, "/internal/v1/catalog", self.catalog.parts_bytes(&diff.wanted)).await?;
        }
        self.catalog_confirmed.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Brings this node's part of the catalog for `metric` up to date with every live member
    /// (and theirs with it): a DELETE must reach every shard of the metric, also one placed by
    /// another node whose placement has not arrived here yet, or one this node could not
    /// record (its disk full). Fails, naming the member, when one cannot be asked.
    async fn sync_metric_catalog(&self, metric: &MetricKey, what: &str) -> Result<(), NodeError> {
        let members = self.membership.members().await;
        let peers: Vec<String> =
            members.iter().filter(|m| !m.is_self && m.is_live()).filter_map(|m| m.http_addr.clone()).collect();
        let exchanges = peers.iter().map(|addr| async move {
            let digests = self.catalog.part_digests().into_iter().filter(|(k, _)| k == metric).collect();
            let request = crate::catalog::CatalogDiffRequest { digests, metric: Some(metric.clone()) };
            let body = postcard::to_stdvec(&request).expect("diff requests encode");
            let bytes = self.peers.post(addr, "/internal/v1/catalog/diff", body).await.map_err(|e| e.to_string())?;
            let diff: crate::catalog::CatalogDiff = postcard::from_bytes(&bytes).map_err(|e| e.to_string())?;
            self.merge_catalog(diff.state).await.map_err(|e| e.to_string())?;
            if !diff.wanted.is_empty() {
                let part = self.catalog.parts_bytes(std::slice::from_ref(metric));
                self.peers.post(addr, "/internal/v1/catalog", part).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        });
        let failed: Vec<String> = futures_util::future::join_all(exchanges)
            .await
            .into_iter()
            .zip(&peers)
            .filter_map(|(r, addr)| r.err().map(|e| format!("{addr}: {e}")))
            .collect();
        if !failed.is_empty() {
            return Err(NodeError::Unavailable(format!(
                "cannot confirm every shard of {metric} with every live member (retry the {what}): {}",
                failed.join("; ")
            )));
        }
        // Gossip names the members only once it has heard one of them: a node restarted a
        // moment before saw itself alone, was its own majority below, and confirmed a DELETE
        // with a catalog missing a shard placed while it was down; the shard kept its points
        // (simulator seed 444087341).
        if !self.catalog_is_confirmed() {
            return Err(NodeError::Unavailable(format!(
                "this node has not compared its catalog with another member's since it started, and its catalog names other nodes: the shard map of {metric} cannot be confirmed yet (retry the {what} once it hears the cluster)"
            )));
        }
        // A node cut off from the others sees no one live and would confirm nothing: the shard
        // map must come from a majority of the members it knows (all but those that left). In
        // its first `dead-node-grace`, those include the nodes its catalog names that gossip
        // does not show yet: two nodes restarted together hear each other first, and each
        // would be the other's majority with the same stale catalog. (Later, a node absent
        // from gossip was evicted as dead for that long.)
        let mut known: std::collections::BTreeSet<&str> =
            members.iter().filter(|m| m.state != crate::membership::Liveness::Left).map(|m| m.id.as_str()).collect();
        known.insert(self.cfg.node_id.as_str());
        let placed = if self.within_dead_node_grace_of_start() { self.catalog.placement() } else { Default::default() };
        let shown: std::collections::BTreeSet<&str> = members.iter().map(|m| m.id.as_str()).collect();
        known.extend(placed.values().flatten().map(String::as_str).filter(|id| !shown.contains(id)));
        let known = known.len();
        let confirmed = peers.len() + 1;
        if confirmed * 2 <= known {
            return Err(NodeError::Unavailable(format!(
                "a {what} needs the shard map of {metric} confirmed by a majority of the cluster's members; this node reaches {confirmed} of {known} (retry once it sees them)"
            )));
        }
        Ok(())
    }

    /// Whether this node's catalog is known to be the cluster's, as far as it can know, since
    /// it started: it compared the whole catalog with a live peer's (an anti-entropy exchange,
    /// or the same digest gossiped); or nothing says there is another member (its catalog names
    /// no other node: a cluster of one, or a new node); or it has waited `dead-node-grace` (the
    /// members it could have known would have been forgotten by then, had it run all along: a
    /// cluster shrunk to this node). Until then a restarted node refuses writes, DELETE and
    /// DROP: with a stale catalog it admitted writes to a metric dropped while it was down (the
    /// catalog's drop then took them), placed a second copy of a shard placed meanwhile, and
    /// confirmed a DELETE alone.
    fn catalog_is_confirmed(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.catalog_confirmed.load(Relaxed) {
            return true;
        }
        let confirmed = !self.within_dead_node_grace_of_start()
            || self.catalog.placement().into_values().flatten().all(|id| id == self.cfg.node_id);
        if confirmed {
            self.catalog_confirmed.store(true, Relaxed);
        }
        confirmed
    }

    /// Whether this node started less than `dead-node-grace` ago: a member it cannot see yet
    /// may still be one (after that long, gossip would have evicted it as dead anyway).
    fn within_dead_node_grace_of_start(&self) -> bool {
        self.env.clock.now_ms().saturating_sub(self.started_ms) < self.cfg.dead_node_grace.as_millis() as i64
    }

    /// Merges a peer's catalog state. A metric whose drop epoch it raises loses its local
    /// shards first (a node that was away during a DROP, say), so that nothing of the dropped
    /// metric is left to be read or copied once the catalog says it was dropped.
    pub async fn merge_catalog(&self, state: crate::catalog::CatalogState) -> Result<bool, NodeError> {
        for (metric, epoch) in state.drop_epochs() {
            if epoch > self.catalog.drop_epoch(&metric) {
                self.apply_drop(&metric, epoch).await?;
            }
        }
        Ok(self.catalog.merge(state).await?)
    }

    /// Removes this node's shards of `metric` held under an epoch before `epoch`, then records
    /// the epoch.
    async fn apply_drop(&self, metric: &MetricKey, epoch: u64) -> Result<(), NodeError> {
        let _exclusive = self.drop_fence.write().await;
        if self.catalog.drop_epoch(metric) >= epoch {
            return Ok(());
        }
        self.storage.drop_metric(metric).await?;
        self.catalog.note_drop(metric, epoch).await?;
        tracing::info!(%metric, epoch, "dropped this node's shards of a metric dropped elsewhere");
        Ok(())
    }

    /// Checks a request's drop epoch of `metric` against this node's before the request
    /// touches the metric's data. An older epoch is refused (the data it is about was dropped:
    /// a late hint, a stale peer's repair); a newer one means a drop this node has not heard
    /// of yet, which is applied first. The guard holds drops off while the request stores.
    pub(crate) async fn fence_epoch(
        &self,
        metric: &MetricKey,
        epoch: u64,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, NodeError> {
        if epoch > self.catalog.drop_epoch(metric) {
            self.apply_drop(metric, epoch).await?;
        }
        let shared = self.drop_fence.read().await;
        let local = self.catalog.drop_epoch(metric);
        if epoch < local {
            return Err(NodeError::Dropped(format!(
                "metric {metric} was dropped (drop epoch {local}) after this request was made (epoch {epoch})"
            )));
        }
        Ok(shared)
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.read().expect("readiness lock").clone()
    }

    pub async fn members(&self) -> Vec<Member> {
        self.membership.members().await
    }

    /// Leaves the cluster gracefully: announces `leaving` (no new shard is placed here), hands
    /// each shard to a new replica, gives the news a few gossip rounds to spread, then stops
    /// gossiping so that peers see this node as `left`, not dead. When some shard finds no new
    /// replica within `shoal.cluster.leave-timeout` the leave is abandoned: the node announces
    /// itself ready again and keeps its shards, because it may hold the only copy of some
    /// acknowledged points.
    pub async fn leave(&self) -> Result<(), LeaveError> {
        self.begin_leave()?;
        self.complete_leave().await
    }

    /// The part of [`Node::leave`] that must happen before the caller answers: a second leave
    /// is refused, and a previous abandoned leave's progress is cleared.
    pub fn begin_leave(&self) -> Result<(), LeaveError> {
        if self.leaving.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(LeaveError::InProgress);
        }
        self.repair.clear_leave_progress();
        Ok(())
    }

    /// The rest of [`Node::leave`], after [`Node::begin_leave`] succeeded.
    pub async fn complete_leave(&self) -> Result<(), LeaveError> {
        use std::sync::atomic::Ordering::SeqCst;
        tracing::info!("leaving the cluster");
        self.membership.set(KEY_READINESS, "leaving").await;
        self.update_readiness().await;
        let progress = self.hand_off().await;
        if progress.abandoned {
            let (kept, total) = (progress.kept, progress.total);
            tracing::error!(kept, total, "leave abandoned: no storage node could take some shards; staying a member");
            self.leaving.store(false, SeqCst);
            let bootstrapped = self.readiness.read().expect("readiness lock").bootstrapped;
            self.membership.set(KEY_READINESS, if bootstrapped { "ready" } else { "joining" }).await;
            self.update_readiness().await;
            return Err(LeaveError::Abandoned { kept, total });
        }
        if let Err(e) = crate::storage::write_atomic(&self.cfg.data_dir.join(LEFT_MARKER), b"left\n") {
            tracing::warn!(error = %e, "cannot record the leave in the data dir; a restart there would rejoin");
        }
        let spread = (self.cfg.gossip_interval * 10).max(std::time::Duration::from_millis(500));
        tokio::time::sleep(spread).await;
        self.membership.shutdown().await;
        Ok(())
    }

    /// Asks the process to stop (after a leave); `main` waits on [`Node::stopped`].
    pub fn request_stop(&self) {
        let _ = self.stop_tx.send(true);
    }

    pub async fn stopped(&self) {
        let mut rx = self.stop_tx.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Measures free capacity every `shoal.cluster.capacity-interval` and publishes it.
    fn spawn_capacity_probe(self: &Arc<Self>, probe: Box<dyn crate::capacity::CapacityProbe>) {
        let weak = Arc::downgrade(self);
        let period = self.cfg.capacity_interval;
        tokio::spawn(async move {
            let mut probe = Some(probe);
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(mut p) = probe.take() else { return };
                let Ok((p, capacity)) = crate::env::spawn_blocking(move || {
                    let c = p.sample();
                    (p, c)
                })
                .await
                else {
                    return;
                };
                probe = Some(p);
                let Some(node) = weak.upgrade() else { return };
                node.membership.set(KEY_CAPACITY, &capacity.to_gossip()).await;
            }
        });
    }

    /// Records replicas for the shards of `batch` that have none yet, chosen by the capacity
    /// selector among the live storage members. Concurrent choices by other nodes merge into a
    /// union in the catalog.
    async fn place_new_shards(&self, batch: &Batch) -> Result<(), NodeError> {
        let interval = self.cfg.shard_interval_ms;
        let mut new_shards = Vec::new();
        for (key, rows) in &batch.metrics {
            for start in rows_by_shard(&rows.timestamps, interval).into_keys() {
                let shard = crate::model::ShardId { metric: key.clone(), start };
                if !self.catalog.has_placement(&shard) {
                    new_shards.push(shard);
                }
            }
        }
        if new_shards.is_empty() {
            return Ok(());
        }
        let candidates: Vec<crate::placement::Candidate> = self
            .membership
            .members()
            .await
            .into_iter()
            .filter(|m| m.is_live() && m.readiness != "leaving")
            .map(|m| crate::placement::Candidate {
                storage: m.roles.iter().any(|r| r == "storage"),
                id: m.id,
                capacity: m.capacity,
            })
            .collect();
        for shard in &new_shards {
            let replicas = crate::placement::place(
                shard,
                &candidates,
                self.cfg.metrics_selector,
                self.cfg.replication_factor,
                &Default::default(),
            )
            .map_err(|e| NodeError::Unavailable(format!("cannot place shard {shard}: {e}")))?;
            self.catalog.add_replicas(shard, &replicas).await?;
        }
        // New placements go to every live peer before the write is acknowledged, so that a
        // query through any node right after the ack finds the new shards (best effort: a peer
        // that misses this gets them by anti-entropy). Only the parts of their metrics go.
        let metrics: Vec<MetricKey> = new_shards
            .iter()
            .map(|s| s.metric.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for e in self.post_to_live_peers("/internal/v1/catalog", self.catalog.parts_bytes(&metrics)).await {
            tracing::debug!(error = %e, "a peer missed a new placement; anti-entropy will bring it");
        }
        Ok(())
    }

    pub fn shard_interval_ms(&self) -> i64 {
        self.cfg.shard_interval_ms
    }

    /// With `shoal.retention`, the oldest timestamp kept now.
    fn retained_from_ms(&self) -> Option<i64> {
        let retention = self.cfg.retention?;
        Some(self.env.clock.now_ms().saturating_sub(retention.as_millis().min(i64::MAX as u128) as i64))
    }

    /// Drops the shards entirely older than `shoal.retention`: their placements leave the
    /// catalog (in one change) and their folders this node. Every node does it on its own
    /// clock, so no coordination is needed.
    async fn expire_shards(&self) {
        let Some(cut) = self.retained_from_ms() else { return };
        let interval = self.cfg.shard_interval_ms;
        let expired: Vec<crate::model::ShardId> =
            self.catalog.placement().into_keys().filter(|s| s.start.saturating_add(interval) <= cut).collect();
        if !expired.is_empty() {
            match self.catalog.remove_shards(&expired).await {
                Ok(()) => {
                    tracing::info!(shards = expired.len(), "dropped shards past shoal.retention from the catalog")
                }
                Err(e) => tracing::warn!(error = %e, "cannot drop expired shards from the catalog; retried"),
            }
        }
        for shard in self.storage.all_shards().into_iter().filter(|s| s.end <= cut) {
            if let Err(e) = self.storage.drop_shard(&shard.id).await {
                tracing::warn!(shard = %shard.id, error = %e, "cannot drop an expired shard; retried");
            }
        }
    }

    fn spawn_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = self.cfg.gossip_interval.max(std::time::Duration::from_millis(200));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut round, mut pushed, mut last_pull) = (0usize, Default::default(), tokio::time::Instant::now());
            loop {
                tick.tick().await;
                let Some(node) = weak.upgrade() else { return };
                round += 1;
                node.catalog_anti_entropy(round, &mut pushed, &mut last_pull).await;
            }
        });
        self.every(self.cfg.gossip_interval, |node| async move { node.update_readiness().await });
        let flush_period = (self.cfg.flush_interval / 4).max(std::time::Duration::from_millis(100));
        self.every(flush_period, |node| async move { node.storage.flush_idle().await });
        self.every(self.cfg.hints_replay_interval, |node| async move { node.replay_hints().await });
        if let Some(retention) = self.cfg.retention {
            let period =
                (retention / 4).clamp(std::time::Duration::from_millis(200), std::time::Duration::from_secs(60));
            self.every(period, |node| async move { node.expire_shards().await });
        }
    }

    /// Runs `work` every `period` until the node is dropped.
    fn every<F, Fut>(self: &Arc<Self>, period: std::time::Duration, work: F)
    where
        F: Fn(Arc<Node>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(node) = weak.upgrade() else { return };
                work(node).await;
            }
        });
    }

    /// Admits a whole batch into the schema (all or nothing), then makes it durable.
    /// Refuses a write (ingest, delete, drop) with 503 while the node is not ready for writes.
    fn write_gate(&self) -> Result<(), NodeError> {
        match self.readiness().reason {
            Some(reason) => Err(NodeError::Unavailable(format!("writes are refused: {reason}"))),
            None => Ok(()),
        }
    }

    /// The write coordinator: admits a whole batch into the schemas (all or nothing), places
    /// new shards, sends each shard's points to every replica in parallel and answers once
    /// `consistency` replicas of every shard have fsynced them.
    pub async fn ingest(
        self: &Arc<Self>,
        batch: Batch,
        consistency: Option<crate::config::Consistency>,
    ) -> Result<usize, NodeError> {
        self.write_gate()?;
        if batch.len() > self.cfg.write_batch_points_max {
            return Err(NodeError::TooLarge(format!(
                "the batch has {} points; at most {} are accepted per request (shoal.write.max-batch-points)",
                batch.len(),
                self.cfg.write_batch_points_max
            )));
        }
        if let Some(cut) = self.retained_from_ms() {
            for (key, rows) in &batch.metrics {
                if let Some(old) = rows.timestamps.iter().find(|t| **t < cut) {
                    return Err(NodeError::BadRequest(format!(
                        "metric {key}: timestamp {old} is older than shoal.retention allows (points from {cut} on are kept)"
                    )));
                }
            }
        }
        self.catalog.admit(&batch.metrics, &batch.origins).await?;
        self.place_new_shards(&batch).await?;
        let accepted_ms = self.env.clock.now_ms();
        let total = batch.len();
        let consistency = consistency.unwrap_or(self.cfg.write_consistency);
        let interval = self.cfg.shard_interval_ms;
        let mut sends: futures_util::stream::FuturesUnordered<
            std::pin::Pin<Box<dyn std::future::Future<Output = ReplicaOutcome> + Send>>,
        > = Default::default();
        let mut tally: std::collections::BTreeMap<crate::model::ShardId, ShardTally> = Default::default();
        for (key, mut rows) in batch.metrics {
            rows.stamp_written(accepted_ms);
            let by_shard = rows_by_shard(&rows.timestamps, interval);
            let single = by_shard.len() == 1;
            let epoch = self.catalog.drop_epoch(&key);
            let mut rows = Some(rows);
            for (start, picked) in by_shard {
                let shard = crate::model::ShardId { metric: key.clone(), start };
                // A batch inside one shard is handed on without a copy; the last replica takes
                // the batch itself, the others a clone.
                let part = if single {
                    rows.take().expect("one shard")
                } else {
                    rows.as_ref().expect("kept for the other shards").select(&picked)
                };
                let replicas: Vec<String> = self.catalog.replicas(&shard).into_iter().collect();
                let required = consistency.required(replicas.len());
                tally.insert(shard.clone(), ShardTally { replicas: replicas.len(), required, ..Default::default() });
                let mut part = Some(part);
                for (i, replica) in replicas.iter().enumerate() {
                    let batch =
                        if i + 1 == replicas.len() { part.take().expect("once") } else { part.clone().expect("kept") };
                    // The answer goes out once the consistency level is met, and the slower
                    // replicas finish (or get a hint) behind it. A send to another node is a task
                    // of its own, so that it finishes even if the client goes away; this node's
                    // own write runs in place (its command is queued at once, and a task more per
                    // request costs a thread wake-up).
                    let (node, replica, shard) = (self.clone(), replica.clone(), shard.clone());
                    let write = crate::peer::ReplicaWrite { shard: shard.clone(), batch, epoch };
                    if replica == self.cfg.node_id {
                        sends.push(Box::pin(async move { node.send_to_replica(replica, write).await }));
                    } else {
                        let task = tokio::spawn({
                            let replica = replica.clone();
                            async move { node.send_to_replica(replica, write).await }
                        });
                        sends.push(Box::pin(async move {
                            task.await.unwrap_or_else(|e| ReplicaOutcome {
                                shard,
                                replica,
                                result: Err(format!("the send failed: {e}")),
                                disk_full: false,
                                payload: None,
                            })
                        }));
                    }
                }
            }
        }
        use futures_util::StreamExt;
        let mut unmet = tally.values().filter(|t| t.required > 0).count();
        let mut missed: Vec<ReplicaOutcome> = Vec::new();
        let mut impossible = false;
        while unmet > 0 && !impossible {
            let Some(outcome) = sends.next().await else { break };
            let t = tally.get_mut(&outcome.shard).expect("every send has a tally");
            match &outcome.result {
                Ok(()) => {
                    t.acks += 1;
                    if t.acks == t.required {
                        unmet -= 1;
                    }
                }
                Err(e) => {
                    t.errors.push(e.clone());
                    t.disk_full += usize::from(outcome.disk_full);
                    impossible = t.replicas - t.errors.len() < t.required;
                    missed.push(outcome);
                }
            }
        }
        if impossible || unmet > 0 {
            // Let the sends still running finish (each is bounded by the call timeout), so that
            // the answer says exactly which replicas have the points.
            while let Some(outcome) = sends.next().await {
                let t = tally.get_mut(&outcome.shard).expect("every send has a tally");
                match outcome.result {
                    Ok(()) => t.acks += 1,
                    Err(e) => {
                        t.errors.push(e);
                        t.disk_full += usize::from(outcome.disk_full);
                    }
                }
            }
            let short_of = |t: &&ShardTally| t.acks < t.required;
            // Only full disks stood in the way: say so (507), the client should not just retry.
            let disks_full =
                tally.values().filter(short_of).all(|t| !t.errors.is_empty() && t.disk_full == t.errors.len());
            let short: Vec<String> = tally
                .iter()
                .filter(|(_, t)| short_of(t))
                .map(|(shard, t)| {
                    format!(
                        "{shard}: {} of {} replicas acknowledged, {} needed ({:?})",
                        t.acks, t.replicas, t.required, t.errors
                    )
                })
                .collect();
            let message = format!(
                "write consistency {consistency:?} not met; the points may be stored on some replicas: {}",
                short.join("; ")
            );
            return Err(if disks_full {
                NodeError::StorageFull(format!("no space left on the disk of the replicas that refused: {message}"))
            } else {
                NodeError::Unavailable(message)
            });
        }
        // Acknowledged, but some replicas missed it: keep their share for hinted handoff, before
        // the answer for those known now, behind it for the sends still running.
        for outcome in missed {
            self.record_hint(outcome, accepted_ms).await;
        }
        if !sends.is_empty() {
            let node = self.clone();
            tokio::spawn(async move {
                while let Some(outcome) = sends.next().await {
                    if outcome.result.is_err() {
                        node.record_hint(outcome, accepted_ms).await;
                    }
                }
            });
        }
        Ok(total)
    }

    /// Keeps a missed replica's share of an acknowledged write for hinted handoff. A hint that
    /// cannot be kept (this node's disk is full, say) does not fail the write, which its
    /// consistency level already made durable: replica repair copies the points instead.
    /// The hint is stamped with when the write was accepted (`accepted_ms`): a DELETE after
    /// that and before the hint was recorded still filters it at replay.
    /// The record is fsynced on a blocking thread, not on the request's.
    async fn record_hint(&self, missed: ReplicaOutcome, accepted_ms: i64) {
        let Some(payload) = missed.payload else { return };
        let (hints, metrics, replica) = (self.hints.clone(), self.metrics.clone(), missed.replica.clone());
        let recorded = crate::env::spawn_blocking(move || hints.record(&replica, &payload, accepted_ms, &metrics))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = recorded {
            self.metrics.hints_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(replica = %missed.replica, error = %e, "a replica missed an acknowledged write and no hint could be kept; repair will copy it");
        }
    }

    /// The HTTP address of member `id` if it is live in this node's view.
    async fn live_http_addr(&self, id: &str) -> Option<String> {
        self.membership.members().await.into_iter().find(|m| m.id == id && m.is_live()).and_then(|m| m.http_addr)
    }

    /// Posts `body` to `path` on every other live member, in parallel; returns the failures.
    pub(crate) async fn post_to_live_peers(&self, path: &str, body: Vec<u8>) -> Vec<crate::peer::PeerError> {
        let members = self.membership.members().await;
        let posts =
            members.iter().filter(|m| !m.is_self && m.is_live()).filter_map(|m| m.http_addr.clone()).map(|addr| {
                let body = body.clone();
                async move { self.peers.post(&addr, path, body).await }
            });
        futures_util::future::join_all(posts).await.into_iter().filter_map(Result::err).collect()
    }

    /// Stores a shard's points on one replica: this node directly, a peer over the internal API.
    async fn send_to_replica(&self, replica: String, write: crate::peer::ReplicaWrite) -> ReplicaOutcome {
        let shard = write.shard.clone();
        if replica == self.cfg.node_id {
            let result = match self.fence_epoch(&shard.metric, write.epoch).await {
                Ok(_stores) => self.storage.write(&shard.metric, write.batch).await.map_err(NodeError::from),
                Err(e) => Err(e),
            };
            let disk_full = matches!(result, Err(NodeError::StorageFull(_)));
            let result = result.map_err(|e| e.to_string());
            return ReplicaOutcome { shard, replica, result, disk_full, payload: None };
        }
        let body = postcard::to_stdvec(&write).expect("encodes");
        let Some(addr) = self.live_http_addr(&replica).await else {
            let result = Err(format!("{replica} is not live"));
            return ReplicaOutcome { shard, replica, result, disk_full: false, payload: Some(body) };
        };
        let result = self.peers.post(&addr, "/internal/v1/write", body.clone()).await;
        let disk_full = matches!(&result, Err(crate::peer::PeerError::Refused { status: 507, .. }));
        let result = result.map(|_| ()).map_err(|e| e.to_string());
        let payload = result.is_err().then_some(body);
        ReplicaOutcome { shard, replica, result, disk_full, payload }
    }

    /// The read coordinator: asks one replica per shard overlapping `range` (this node first
    /// when it holds the shard, then the live others) for its partial result, and merges them.
    /// A shard no replica answers for fails the query, or with `allow_partial` is left out and
    /// named in the second value: an answer is never silently short.
    /// Runs `plan` over `[from, to)` of one metric on every shard and merges the answers (the
    /// InfluxQL executor builds on it).
    pub async fn select(
        &self,
        key: &MetricKey,
        plan: &plan::SelectPlan,
        range: (i64, i64),
    ) -> Result<Vec<crate::model::Point>, NodeError> {
        match self.scatter(key, plan, range, false, Keeping { cached: None, lease: false }).await? {
            Scattered::Merged { partial, .. } => Ok(query::answer::finish(plan, partial).into_points()),
            Scattered::Unchanged => unreachable!("nothing cached was named"),
        }
    }

    /// Asks every shard in range for its partial and merges them. With `keep.cached`, the replicas
    /// it read are asked first whether their copies changed: if none did and no other shard
    /// is in range, the cached answer stands (`Scattered::Unchanged`). With `keep.lease`, the
    /// answer will be kept, and other replicas are asked for read leases on their copies.
    async fn scatter(
        &self,
        key: &MetricKey,
        plan: &plan::SelectPlan,
        range: (i64, i64),
        allow_partial: bool,
        keep: Keeping<'_>,
    ) -> Result<Scattered, NodeError> {
        // A node restarted a moment before may not know shards placed while it was down: an
        // answer from its catalog alone could be short with nothing to say so.
        let catalog_unconfirmed = !self.catalog_is_confirmed();
        if catalog_unconfirmed && !allow_partial {
            return Err(NodeError::Unavailable(format!(
                "this node has not compared its catalog with another member's since it started: shards of {key} placed while it was down may be missing from the answer (retry, or add ?partial=true to accept one)"
            )));
        }
        let interval = self.cfg.shard_interval_ms;
        let shards = self.catalog.shards_of(key, range.0, range.1, interval);
        let shard_count = shards.len();
        let mut gathered = Gathered {
            total: query::exec::Partial::empty(plan),
            missing: Vec::new(),
            reasons: Vec::new(),
            sources: Some(Vec::new()),
            unchanged: Vec::new(),
        };
        self.gather(key, shards.clone(), plan, range, keep, &mut gathered).await?;
        if !gathered.unchanged.is_empty() {
            if gathered.unchanged.len() == shard_count && keep.cached.is_some_and(|c| c.sources.len() == shard_count) {
                return Ok(Scattered::Unchanged);
            }
            // Some copies changed (or a shard came into range): the partials of the unchanged
            // ones were not kept, so they are read after all.
            let again = std::mem::take(&mut gathered.unchanged)
                .into_iter()
                .filter_map(|shard| shards.get(&shard).map(|replicas| (shard.clone(), replicas.clone())))
                .collect();
            self.gather(key, again, plan, range, Keeping { cached: None, ..keep }, &mut gathered).await?;
        }
        let Gathered { total, mut missing, reasons, sources, .. } = gathered;
        if catalog_unconfirmed {
            missing.push("any shard placed while this node was down (its catalog is not confirmed yet)".to_string());
        }
        if !missing.is_empty() && !allow_partial {
            return Err(NodeError::Unavailable(format!(
                "no replica could answer for {} shard(s) of {key}, so the answer would be incomplete \
                 (add ?partial=true to accept one): {}",
                missing.len(),
                reasons.join("; ")
            )));
        }
        let sources = sources.filter(|_| missing.is_empty());
        Ok(Scattered::Merged { partial: total, missing, sources })
    }

    /// Asks `shards` and merges their answers into `into` as they arrive; at most
    /// `SCATTER_SHARDS_MAX` shards are asked at once, so a query holds one bounded result,
    /// not one per shard.
    async fn gather(
        &self,
        key: &MetricKey,
        shards: std::collections::BTreeMap<crate::model::ShardId, std::collections::BTreeSet<String>>,
        plan: &plan::SelectPlan,
        range: (i64, i64),
        keep: Keeping<'_>,
        into: &mut Gathered,
    ) -> Result<(), NodeError> {
        let epoch = self.catalog.drop_epoch(key);
        let asks =
            shards.into_iter().map(|(shard, replicas)| self.ask_shard(shard, replicas, plan, range, epoch, keep));
        use futures_util::StreamExt;
        let mut answers = futures_util::stream::iter(asks).buffer_unordered(SCATTER_SHARDS_MAX);
        while let Some(answer) = answers.next().await {
            match answer {
                Ok(ShardReply::Unchanged(shard)) => into.unchanged.push(shard),
                Ok(ShardReply::Computed { partial, source }) => {
                    into.total.merge(partial);
                    match (source, &mut into.sources) {
                        (Some(source), Some(sources)) => sources.push(source),
                        _ => into.sources = None,
                    }
                }
                Err(ShardAnswer::Fatal(e)) => return Err(e),
                Err(ShardAnswer::Missing { shard, reason }) => {
                    into.reasons.push(format!("{shard} ({reason})"));
                    into.missing.push(shard);
                }
            }
            into.total.trim(plan);
            if into.total.size(plan) > self.cfg.query_records_max {
                return Err(QueryError::TooLarge { max: self.cfg.query_records_max }.into());
            }
        }
        Ok(())
    }

    /// Asks the replicas of one shard in turn (this node first when it holds the shard) until
    /// one answers for it.
    async fn ask_shard(
        &self,
        shard: crate::model::ShardId,
        replicas: std::collections::BTreeSet<String>,
        plan: &plan::SelectPlan,
        range: (i64, i64),
        epoch: u64,
        Keeping { cached, lease }: Keeping<'_>,
    ) -> Result<ShardReply, ShardAnswer> {
        let mut order: Vec<String> = replicas.iter().filter(|r| **r == self.cfg.node_id).cloned().collect();
        order.extend(replicas.iter().filter(|r| **r != self.cfg.node_id).cloned());
        let mut errors = Vec::new();
        let mut none_held = false;
        for replica in order {
            let known = cached.and_then(|c| c.version_of(&shard, &replica));
            let req = crate::peer::PartialRequest {
                shard: shard.clone(),
                plan: plan.clone(),
                from: range.0,
                to: range.1,
                epoch,
                known,
            };
            // A result too large for one shard is the query's fault, not the replica's:
            // it fails the query (413) instead of passing for an unreachable replica.
            let (asked_at, revokes_before) = (tokio::time::Instant::now(), self.leases.asking());
            let answer = if replica == self.cfg.node_id {
                match self.replica_partial(req, None).await {
                    Err(e @ NodeError::TooLarge(_)) => return Err(ShardAnswer::Fatal(e)),
                    other => other.map_err(|e| e.to_string()),
                }
            } else {
                let Some(addr) = self.live_http_addr(&replica).await else {
                    errors.push(format!("{replica} is not live"));
                    continue;
                };
                let ask = lease.then(|| crate::peer::LeaseAsk { holder: self.cfg.node_id.clone() });
                let body = crate::peer::encode_with_tail(&req, ask.as_ref());
                match self.peers.post(&addr, "/internal/v1/partial", body).await {
                    Ok(bytes) => crate::peer::decode_with_tail::<_, crate::peer::LeaseGrant>(&bytes)
                        .map(|(answer, grant)| (answer, grant.is_some_and(|g| g.granted)))
                        .map_err(|e| e.to_string()),
                    Err(crate::peer::PeerError::Refused { status: 413, message, .. }) => {
                        return Err(ShardAnswer::Fatal(NodeError::TooLarge(message)));
                    }
                    Err(e) => Err(e.to_string()),
                }
            };
            let hold = |version| self.leases.hold(&shard, &replica, version, asked_at, revokes_before);
            match answer {
                Ok((crate::peer::PartialAnswer::Computed { version, partial }, leased)) => {
                    if leased {
                        hold(version);
                    }
                    let source = query::cache::Source { shard, replica, version };
                    return Ok(ShardReply::Computed { partial, source: Some(source) });
                }
                Ok((crate::peer::PartialAnswer::Unchanged, leased)) => {
                    if leased && let Some(version) = known {
                        hold(version);
                    }
                    return Ok(ShardReply::Unchanged(shard));
                }
                // A placed replica without a copy (a new disk, a copy not made yet) would
                // answer with nothing: the next replica is asked instead.
                Ok((crate::peer::PartialAnswer::NotHeld, _)) => none_held = true,
                Err(e) => errors.push(format!("{replica}: {e}")),
            }
        }
        if none_held && errors.is_empty() {
            // Every replica answered and none holds a copy: no point of it exists.
            return Ok(ShardReply::Computed { partial: query::exec::Partial::empty(plan), source: None });
        }
        // A replica that could not be asked may hold the copy the others lack.
        Err(ShardAnswer::Missing { shard: shard.to_string(), reason: errors.join("; ") })
    }

    /// Whether a kept answer stands without asking any replica: every shard now in range is
    /// one it read from a replica still placed, and each copy it read is this node's own, at
    /// the same version, or one whose replica leased that version to this node.
    fn kept_answer_stands(&self, key: &MetricKey, range: (i64, i64), kept: &query::cache::CachedAnswer) -> bool {
        let shards = self.catalog.shards_of(key, range.0, range.1, self.cfg.shard_interval_ms);
        if shards.len() != kept.sources.len() {
            return false;
        }
        let generation = self.membership.config().generation;
        kept.sources.iter().all(|source| {
            // A scatter reads this node's own copy first: one placed here since is read.
            let placed = shards.get(&source.shard).is_some_and(|replicas| {
                replicas.contains(&source.replica)
                    && (source.replica == self.cfg.node_id || !replicas.contains(&self.cfg.node_id))
            });
            placed
                && if source.replica == self.cfg.node_id {
                    self.storage.shard_if_held(&source.shard).is_some_and(|copy| {
                        crate::peer::ShardVersion { generation, state: copy.version() } == source.version
                    })
                } else {
                    self.leases.holds(&source.shard, &source.replica, source.version)
                }
        })
    }

    /// Runs a select or a delete. With `allow_partial`, a select whose shards are not all
    /// reachable answers with what it could read and names the missing shards.
    pub async fn query(&self, req: QueryRequest, allow_partial: bool) -> Result<QueryOutcome, NodeError> {
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
                let cache_key = (self.cfg.query_cache_bytes > 0)
                    .then(|| query::cache::AnswerKey::new(&key, &plan, range, self.catalog.drop_epoch(&key)));
                let cached = cache_key.as_ref().and_then(|k| self.answers.lock().expect("answers lock").get(k));
                if let Some(kept) = cached.as_deref()
                    && self.kept_answer_stands(&key, range, kept)
                {
                    self.metrics.query_cache_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(QueryOutcome::Records(kept.body.clone()));
                }
                let keep = Keeping { cached: cached.as_deref(), lease: cache_key.is_some() };
                match self.scatter(&key, &plan, range, allow_partial, keep).await? {
                    Scattered::Unchanged => {
                        self.metrics.query_cache_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Ok(QueryOutcome::Records(cached.expect("an answer was cached").body.clone()))
                    }
                    Scattered::Merged { partial, missing, sources } => {
                        let records = query::answer::finish(&plan, partial);
                        let json = records.to_json(&missing);
                        let body = axum::body::Bytes::from(json);
                        if let (Some(k), Some(mut sources)) = (cache_key, sources) {
                            sources.sort_by(|a, b| a.shard.cmp(&b.shard));
                            let answer = query::cache::CachedAnswer { sources, body: body.clone() };
                            self.answers.lock().expect("answers lock").put(k, answer);
                        }
                        Ok(QueryOutcome::Records(body))
                    }
                }
            }
            plan::Statement::Delete(plan) => {
                self.write_gate()?;
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
                self.sync_metric_catalog(&key, "delete").await?;
                let shards = self.catalog.shards_of(&key, range.0, range.1, self.cfg.shard_interval_ms);
                let epoch = self.catalog.drop_epoch(&key);
                // Stamped with the end of the second it came in, and sent once this clock is past
                // it: whatever the answer (even none, a crash), a write sent after it gets a later
                // write time. (One wait: a clock stepped back, or a test's fixed clock, does not
                // hold the delete longer.)
                let now_ms = self.env.clock.now_ms();
                let at_ms = crate::model::batch::write_time(now_ms);
                tokio::time::sleep(std::time::Duration::from_millis((at_ms - now_ms) as u64 + 1)).await;
                // Every replica of every shard must apply the delete, or a later read could
                // bring the points back; the count reported is the largest any replica removed.
                let deletes = shards.into_iter().map(|(shard, replicas)| {
                    let filter = plan.filter.clone();
                    async move {
                        let req = crate::peer::ReplicaDelete {
                            shard: shard.clone(),
                            at_ms,
                            filter,
                            from: range.0,
                            to: range.1,
                            epoch,
                        };
                        let mut most = 0u64;
                        for replica in replicas {
                            let removed = if replica == self.cfg.node_id {
                                self.replica_delete(req.clone()).await.map_err(|e| e.to_string())
                            } else {
                                match self.live_http_addr(&replica).await {
                                    None => Err(format!("{replica} is not live")),
                                    Some(addr) => {
                                        let body = postcard::to_stdvec(&req).expect("encodes");
                                        match self.peers.post(&addr, "/internal/v1/delete", body).await {
                                            Ok(bytes) => postcard::from_bytes::<u64>(&bytes).map_err(|e| e.to_string()),
                                            Err(e) => Err(e.to_string()),
                                        }
                                    }
                                }
                            };
                            most = most.max(removed.map_err(|e| format!("shard {shard} on {replica}: {e}"))?);
                        }
                        Ok::<u64, String>(most)
                    }
                });
                let mut deleted = 0;
                let mut failed = Vec::new();
                for result in futures_util::future::join_all(deletes).await {
                    match result {
                        Ok(n) => deleted += n,
                        Err(e) => failed.push(e),
                    }
                }
                if !failed.is_empty() {
                    return Err(NodeError::Unavailable(format!(
                        "the delete did not reach every replica (retry it; it is idempotent): {}",
                        failed.join("; ")
                    )));
                }
                Ok(QueryOutcome::Deleted(deleted))
            }
        }
    }

    /// Stores a replica's share of a write (the replica side of the internal write API).
    pub async fn replica_write(&self, write: crate::peer::ReplicaWrite) -> Result<(), NodeError> {
        self.check_replica_write(&write)?;
        if self.repair.handed_off() {
            return Err(NodeError::Unavailable(format!(
                "node {} is leaving and has handed off its shards",
                self.cfg.node_id
            )));
        }
        let _stores = self.fence_epoch(&write.shard.metric, write.epoch).await?;
        self.storage.write(&write.shard.metric, write.batch).await?;
        Ok(())
    }

    /// What a replica checks before storing points it was sent: it has the storage role, the
    /// batch is well formed and every point falls inside the shard.
    pub(crate) fn check_replica_write(&self, write: &crate::peer::ReplicaWrite) -> Result<(), NodeError> {
        if !self.cfg.roles.contains(&crate::config::Role::Storage) {
            return Err(NodeError::BadRequest(format!("node {} has no storage role", self.cfg.node_id)));
        }
        write.batch.validate().map_err(|e| NodeError::BadRequest(format!("replica write: {e}")))?;
        let (start, end) = (write.shard.start, write.shard.start.saturating_add(self.cfg.shard_interval_ms));
        // A late hint or copy of an expired shard would bring it back: refused for good.
        if self.retained_from_ms().is_some_and(|cut| end <= cut) {
            return Err(NodeError::Dropped(format!("shard {} is past shoal.retention and was dropped", write.shard)));
        }
        if write.shard.start.rem_euclid(self.cfg.shard_interval_ms) != 0
            || write.batch.timestamps.iter().any(|t| *t < start || *t >= end)
        {
            return Err(NodeError::BadRequest(format!(
                "replica write: points outside shard {} [{start}, {end}) or a shard not aligned to this node's sharding interval",
                write.shard
            )));
        }
        Ok(())
    }

    /// Removes matching points from this node's copy of one shard (the replica side of DELETE),
    /// leaving a tombstone so that a repair or hint carrying copies read before the delete
    /// cannot bring them back.
    pub async fn replica_delete(&self, req: crate::peer::ReplicaDelete) -> Result<u64, NodeError> {
        let _stores = self.fence_epoch(&req.shard.metric, req.epoch).await?;
        let tombstone = crate::storage::Tombstone { at_ms: req.at_ms, rule: req.to_rule() };
        let removed = self.storage.delete(&req.shard, delete_rule(req.filter, req.from, req.to), tombstone).await?;
        Ok(removed)
    }

    /// This node's partial result for one shard (the replica side of the internal query API),
    /// or word that its copy is still at the version the asker knows.
    /// With `lease_to`, that node asks for a read lease on the copy ([`crate::lease`]); the
    /// answer says whether it got one.
    pub async fn replica_partial(
        &self,
        req: crate::peer::PartialRequest,
        lease_to: Option<&str>,
    ) -> Result<(crate::peer::PartialAnswer, bool), NodeError> {
        use crate::peer::{PartialAnswer, ShardVersion};
        drop(self.fence_epoch(&req.shard.metric, req.epoch).await?);
        let Some(shard) = self.storage.shard_if_held(&req.shard) else { return Ok((PartialAnswer::NotHeld, false)) };
        // Granted before the version is read: a change after this revokes the lease, and a
        // change before it is in the version read.
        let leased = lease_to.is_some_and(|holder| self.leases.grant(&req.shard, holder));
        let generation = self.membership.config().generation;
        if req.known == Some(ShardVersion { generation, state: shard.version() }) {
            return Ok((PartialAnswer::Unchanged, leased));
        }
        let max = self.cfg.query_records_max;
        crate::env::spawn_blocking(move || {
            let snapshot = shard.snapshot();
            let version = ShardVersion { generation, state: snapshot.version };
            query::partial_of_shards(Some(snapshot), &req.plan, (req.from, req.to), max)
                .map(|partial| (PartialAnswer::Computed { version, partial }, leased))
        })
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))?
        .map_err(NodeError::from)
    }

    /// Revokes the read leases on `shards` before a change to them is acknowledged: at each
    /// holder, or, when one cannot be reached, by waiting until its lease has run out.
    async fn revoke_leases(&self, shards: &[crate::model::ShardId]) {
        if tokio::time::Instant::now() < self.leases.changes_from() {
            tokio::time::sleep_until(self.leases.changes_from()).await;
        }
        let due = self.leases.changing(shards);
        if due.is_empty() {
            return;
        }
        let revokes = due.iter().map(|due| async move {
            let revoke = crate::lease::Revoke { shard: due.shard.clone(), replica: self.cfg.node_id.clone() };
            let told = match self.live_http_addr(&due.holder).await {
                Some(addr) => {
                    let body = postcard::to_stdvec(&revoke).expect("encodes");
                    tokio::time::timeout_at(due.until, self.peers.post(&addr, "/internal/v1/revoke", body))
                        .await
                        .is_ok_and(|r| r.is_ok())
                }
                None => false,
            };
            if told {
                self.metrics.lease_revokes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                self.metrics.lease_waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep_until(due.until).await;
            }
            self.leases.revoked(due);
        });
        futures_util::future::join_all(revokes).await;
    }

    /// Drops a metric everywhere: its schema and placements leave the catalog (and spread by
    /// anti-entropy), and every live member removes its shards of it now.
    /// A member that misses the drop now (away, partitioned) learns its epoch from the
    /// catalog, or from the first request about the metric, and drops its shards then.
    ///
    /// The local shards go before the catalog records the drop (as in `apply_drop`): a drop
    /// that fails half-way leaves the metric in the catalog, to be dropped again, never a
    /// raised epoch over shards that nothing would remove any more. It runs as a task of its
    /// own, so a client that goes away cannot cut it between the two.
    pub async fn drop_metric(self: &Arc<Self>, key: &MetricKey) -> Result<(), NodeError> {
        self.write_gate()?;
        // As for a DELETE, a majority must be reachable: a node cut off from the others would
        // record a drop that nobody hears of until the partition heals, and that would then
        // take the points written meanwhile on the other side (simulator seed 90012).
        self.sync_metric_catalog(key, "drop").await?;
        let (node, metric) = (self.clone(), key.clone());
        let epoch = tokio::spawn(async move {
            let _exclusive = node.drop_fence.write().await;
            if node.catalog.schema(&metric).is_none() {
                return Err(NodeError::NotFound(format!("metric {metric} does not exist")));
            }
            node.storage.drop_metric(&metric).await?;
            node.catalog
                .drop_metric(&metric, node.env.clock.now_ms())
                .await?
                .ok_or_else(|| NodeError::NotFound(format!("metric {metric} does not exist")))
        })
        .await
        .map_err(|e| NodeError::Internal(format!("the drop task failed: {e}")))??;
        // The new state carries the schema's removal and the drop epoch together: a member
        // that merges it drops its shards of the metric before the catalog says it is gone.
        let part = self.catalog.parts_bytes(std::slice::from_ref(key));
        for e in self.post_to_live_peers("/internal/v1/catalog", part).await {
            tracing::warn!(error = %e, metric = %key, "a member did not get the drop now; anti-entropy will bring it");
        }
        tracing::info!(metric = %key, epoch, "dropped a metric");
        Ok(())
    }

    pub fn status(&self) -> serde_json::Value {
        let shards = self.storage.all_shards();
        serde_json::json!({
            "node_id": self.cfg.node_id,
            "cluster_id": self.cfg.cluster_id,
            "version": env!("CARGO_PKG_VERSION"),
            "state": if self.readiness().ready { "ready" } else { "not ready" },
            "readiness": self.readiness(),
            "http_addr": self.http_addr.to_string(),
            "gossip_addr": self.membership.config().advertise_addr.to_string(),
            "generation": self.membership.config().generation,
            "uptime_ms": self.env.clock.now_ms() - self.started_ms,
            "data_dir": self.cfg.data_dir.display().to_string(),
            "metrics": self.catalog.metrics().len(),
            "shards": shards.len(),
            "points": shards.iter().map(|s| s.points()).sum::<u64>(),
            "hints_pending_bytes": self.hints.pending(),
            "repair": self.repair.status(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::rows_by_shard;

    #[test]
    fn rows_are_split_by_shard_only_when_a_batch_spans_several() {
        let one = rows_by_shard(&[1000, 1500, 1999], 1000);
        assert_eq!(one.into_iter().collect::<Vec<_>>(), vec![(1000, vec![])]);
        let spanning = rows_by_shard(&[-1, 0, 999, 1000, -1000], 1000);
        assert_eq!(
            spanning.into_iter().collect::<Vec<_>>(),
            vec![(-1000, vec![0, 4]), (0, vec![1, 2]), (1000, vec![3])]
        );
        assert!(rows_by_shard(&[], 1000).is_empty());
    }
}
