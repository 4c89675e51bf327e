//! The catalog: metric schemas and shard placement, held whole by every node as state-based
//! CRDTs (`crdts` 7.3.2) so that any node can change them without coordination. Merging is
//! commutative, associative and idempotent, so loss, duplication and reordering of messages
//! are harmless.
//!
//! The state is cut into one part per metric ([`MetricState`]): the metric's drop epoch, its
//! schema and its shards' placements. Parts merge on their own, so a change travels and is
//! stored as the parts it touched, never as the whole catalog: a new shard is one metric's
//! part pushed to the peers and one record appended to the catalog log.
//!
//! - epoch: a part holds the content of one drop epoch (see [`Catalog::drop_epoch`]). The
//!   higher epoch wins whole: a drop resets the part and raises the epoch, so everything from
//!   before the drop goes at once, wherever it merges. Equal epochs merge their content. This
//!   lexicographic product of a chain and a lattice is again a join-semilattice.
//! - schema: `Map<field, MVReg<(class, type)>>`. Concurrent first writes of one field with
//!   different types leave sibling values in its register; every node resolves them by the
//!   same rule, the most general one: class `tag` > `dimension` > `value`, then type
//!   VARCHAR > DECIMAL > INT. Points already stored under the losing type keep their stored
//!   values and stay readable (queries compare numbers numerically whatever their type).
//! - placement: `Map<shard start, Orswot<node id>>`. Concurrent placements of one shard merge
//!   into their union: over-replication is possible, under-replication is not.
//!
//! Actor ids are node ids (stable across restarts), never generations. Each change is appended
//! to `catalog.log` (the parts it changed, fsynced) before it takes effect; the log is rewritten
//! as one snapshot once it has grown to twice the state's size, and replayed on start.
//!
//! Anti-entropy (in `node`) compares whole-catalog digests in gossip; where they differ, the two
//! nodes compare per-metric digests ([`CatalogDiff`]) and send each other only the parts that
//! differ.

use crate::model::batch::RowBatch;
use crate::model::{FieldClass, FieldType, MetricKey, NewField, Schema, ShardId};
use crate::storage::wal::AppendLog;
use crdts::{CmRDT, CvRDT, MVReg, Map, Orswot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

pub type NodeId = String;
type FieldDef = (FieldClass, FieldType);
type Fields = Map<String, MVReg<FieldDef, NodeId>, NodeId>;
type Placement = Map<i64, Orswot<NodeId, NodeId>, NodeId>;

/// Largest catalog state (or part of one) accepted from a peer or from one log record.
pub const STATE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// The catalog log is rewritten as one snapshot once it is this many times the state's size.
const LOG_REWRITE_FACTOR: u64 = 2;
/// ... and at least this large: a small catalog is not rewritten over and over.
const LOG_REWRITE_BYTES_MIN: u64 = 1024 * 1024;

/// One metric's part of the catalog (see the module's documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricState {
    epoch: u64,
    fields: Fields,
    placement: Placement,
    /// The Influx measurement and field the metric stands for, when it was written as another
    /// field than `value` (see [`crate::ingest::Batch::origins`]).
    origin: MVReg<(String, String), NodeId>,
}

/// The deterministic resolution of a field's concurrent definitions.
fn resolve(defs: &[FieldDef]) -> Option<FieldDef> {
    defs.iter().copied().max()
}

/// FNV-1a: stable across processes and versions, unlike std's hasher.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl MetricState {
    pub fn merge(&mut self, other: MetricState) {
        match other.epoch.cmp(&self.epoch) {
            std::cmp::Ordering::Greater => *self = other,
            std::cmp::Ordering::Equal => {
                self.fields.merge(other.fields);
                self.placement.merge(other.placement);
                self.origin.merge(other.origin);
            }
            std::cmp::Ordering::Less => {}
        }
    }

    /// Holds nothing a digest or a reader sees (it may still hold clocks of removed entries).
    fn is_blank(&self) -> bool {
        self.epoch == 0 && self.fields.iter().next().is_none() && self.placement().is_empty()
    }

    /// The resolved schema; `None` while the metric does not exist (never written, or dropped).
    fn schema(&self) -> Option<Schema> {
        let mut schema = Schema::default();
        for f in self.fields.iter() {
            let (name, reg) = f.val;
            if let Some(def) = resolve(&reg.read().val) {
                schema.fields.insert(name.clone(), def);
            }
        }
        (!schema.fields.is_empty()).then_some(schema)
    }

    /// Shard start → replicas, shards whose replicas were all removed left out.
    fn placement(&self) -> BTreeMap<i64, BTreeSet<NodeId>> {
        self.placement
            .iter()
            .map(|e| (*e.val.0, e.val.1.read().val.into_iter().collect::<BTreeSet<_>>()))
            .filter(|(_, nodes)| !nodes.is_empty())
            .collect()
    }

    /// A hash of the content (not the clocks: removes do not advance them), equal on nodes
    /// that hold the same epoch, sibling definitions and placements.
    fn digest(&self) -> u64 {
        let mut fields: BTreeMap<&String, Vec<FieldDef>> = BTreeMap::new();
        for f in self.fields.iter() {
            let (name, reg) = f.val;
            let mut defs = reg.read().val;
            defs.sort();
            fields.insert(name, defs);
        }
        fnv(&postcard::to_stdvec(&(self.epoch, fields, self.placement(), self.origin())).expect("content encodes"))
    }

    /// The Influx measurement and field, resolved the same way everywhere (the least).
    fn origin(&self) -> Option<(String, String)> {
        self.origin.read().val.into_iter().min()
    }

    fn add_field(&mut self, actor: &NodeId, name: &str, def: FieldDef) {
        let ctx = self.fields.read_ctx().derive_add_ctx(actor.clone());
        let op = self.fields.update(name.to_string(), ctx, |reg, ctx| reg.write(def, ctx));
        self.fields.apply(op);
    }

    fn add_replicas(&mut self, actor: &NodeId, start: i64, nodes: &[NodeId]) {
        let ctx = self.placement.read_ctx().derive_add_ctx(actor.clone());
        let op = self.placement.update(start, ctx, |set, ctx| set.add_all(nodes.iter().cloned(), ctx));
        self.placement.apply(op);
    }

    /// The dot is `actor`'s own (the node making the change), never the removed node's: a dot
    /// must not be minted for another actor.
    fn remove_replica(&mut self, actor: &NodeId, start: i64, node: &NodeId) {
        if let Some(set) = self.placement.get(&start).val {
            let ctx = set.contains(node).derive_rm_ctx();
            let op = set.rm(node.clone(), ctx);
            let add = self.placement.read_ctx().derive_add_ctx(actor.clone());
            let op = self.placement.update(start, add, |_, _| op);
            self.placement.apply(op);
        }
    }

    fn remove_shard(&mut self, start: i64) {
        let ctx = self.placement.get(&start).derive_rm_ctx();
        let op = self.placement.rm(start, ctx);
        self.placement.apply(op);
    }
}

/// The whole catalog, or some of its parts (a change, a push, a reply): any subset of parts is
/// a state of its own and merges like one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogState {
    metrics: BTreeMap<MetricKey, MetricState>,
}

/// The state as catalog files (`catalog.bin`) written before the catalog was cut into parts.
#[derive(Deserialize)]
struct WholeState {
    schemas: Map<MetricKey, Fields, NodeId>,
    placement: Map<ShardId, Orswot<NodeId, NodeId>, NodeId>,
    drops: BTreeMap<MetricKey, u64>,
}

/// Older still: before drop epochs.
#[derive(Deserialize)]
struct WholeStateWithoutDrops {
    schemas: Map<MetricKey, Fields, NodeId>,
    placement: Map<ShardId, Orswot<NodeId, NodeId>, NodeId>,
}

impl CatalogState {
    pub fn merge(&mut self, other: CatalogState) {
        for (key, part) in other.metrics {
            self.metrics.entry(key).or_default().merge(part);
        }
    }

    fn part(&mut self, key: &MetricKey) -> &mut MetricState {
        self.metrics.entry(key.clone()).or_default()
    }

    pub fn add_field(&mut self, actor: &NodeId, key: &MetricKey, name: &str, def: FieldDef) {
        self.part(key).add_field(actor, name, def);
    }

    /// Drops a metric: its part starts over, empty, at drop epoch `epoch` (if that is newer).
    pub fn remove_metric(&mut self, key: &MetricKey, epoch: u64) {
        self.part(key).merge(MetricState { epoch, ..Default::default() });
    }

    /// Removes shards' placements (their data is past retention).
    pub fn remove_shards(&mut self, shards: &[ShardId]) {
        for shard in shards {
            self.part(&shard.metric).remove_shard(shard.start);
        }
    }

    pub fn add_replicas(&mut self, actor: &NodeId, shard: &ShardId, nodes: &[NodeId]) {
        self.part(&shard.metric).add_replicas(actor, shard.start, nodes);
    }

    pub fn remove_replica(&mut self, actor: &NodeId, shard: &ShardId, node: &NodeId) {
        self.part(&shard.metric).remove_replica(actor, shard.start, node);
    }

    /// Every schema, with concurrent definitions resolved.
    pub fn schemas(&self) -> BTreeMap<MetricKey, Schema> {
        self.metrics.iter().filter_map(|(key, part)| Some((key.clone(), part.schema()?))).collect()
    }

    /// Each metric's Influx measurement and field, for those written as another field than
    /// `value`.
    pub fn origins(&self) -> BTreeMap<MetricKey, (String, String)> {
        self.metrics.iter().filter_map(|(key, part)| Some((key.clone(), part.origin()?))).collect()
    }

    /// The metrics ever dropped, with their drop epochs.
    pub fn drop_epochs(&self) -> BTreeMap<MetricKey, u64> {
        self.metrics.iter().filter(|(_, p)| p.epoch > 0).map(|(key, p)| (key.clone(), p.epoch)).collect()
    }

    /// Every shard with replicas, and its replicas.
    pub fn placement(&self) -> BTreeMap<ShardId, BTreeSet<NodeId>> {
        let mut out = BTreeMap::new();
        for (key, part) in &self.metrics {
            for (start, nodes) in part.placement() {
                out.insert(ShardId { metric: key.clone(), start }, nodes);
            }
        }
        out
    }

    /// Each part's digest, blank parts left out.
    pub fn part_digests(&self) -> BTreeMap<MetricKey, u64> {
        self.metrics.iter().filter(|(_, p)| !p.is_blank()).map(|(key, p)| (key.clone(), p.digest())).collect()
    }

    /// The digest of the whole content (see [`combined_digest`]).
    pub fn digest(&self) -> u64 {
        combined_digest(&self.part_digests())
    }

    /// These parts only (those it has).
    pub fn only(&self, keys: &[MetricKey]) -> CatalogState {
        CatalogState { metrics: keys.iter().filter_map(|k| Some((k.clone(), self.metrics.get(k)?.clone()))).collect() }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("catalog state encodes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > STATE_BYTES_MAX {
            return Err(format!("catalog state larger than {STATE_BYTES_MAX} bytes"));
        }
        postcard::from_bytes(bytes).map_err(|e| e.to_string())
    }

    /// Rebuilds the parts from a whole state of before the catalog was cut into parts, with
    /// `actor`'s dots: each node converts its own file, and the conversions merge as any
    /// concurrent writes of the same content do.
    fn from_whole_state(bytes: &[u8], actor: &NodeId) -> Result<Self, String> {
        let whole = postcard::from_bytes::<WholeState>(bytes).or_else(|e| {
            postcard::from_bytes::<WholeStateWithoutDrops>(bytes)
                .map(|old| WholeState { schemas: old.schemas, placement: old.placement, drops: BTreeMap::new() })
                .map_err(|_| e.to_string())
        })?;
        let mut state = CatalogState::default();
        for (key, epoch) in whole.drops {
            state.remove_metric(&key, epoch);
        }
        for entry in whole.schemas.iter() {
            let (key, fields) = entry.val;
            for f in fields.iter() {
                let (name, reg) = f.val;
                if let Some(def) = resolve(&reg.read().val) {
                    state.add_field(actor, key, name, def);
                }
            }
        }
        for entry in whole.placement.iter() {
            let (shard, nodes) = entry.val;
            let nodes: Vec<NodeId> = nodes.read().val.into_iter().collect();
            if !nodes.is_empty() {
                state.add_replicas(actor, shard, &nodes);
            }
        }
        Ok(state)
    }
}

/// The digest of a whole catalog from its parts' digests: a sum of per-part hashes, so that
/// it is updated part by part.
pub fn combined_digest(parts: &BTreeMap<MetricKey, u64>) -> u64 {
    parts.iter().fold(0u64, |sum, (key, digest)| sum.wrapping_add(part_hash(key, *digest)))
}

fn part_hash(key: &MetricKey, digest: u64) -> u64 {
    let mut bytes = postcard::to_stdvec(key).expect("keys encode");
    bytes.extend_from_slice(&digest.to_le_bytes());
    fnv(&bytes)
}

/// `POST /internal/v1/catalog/diff`: the asking node's per-metric digests
/// ([`CatalogState::part_digests`]); with `metric`, only that metric's part is compared.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CatalogDiffRequest {
    pub digests: BTreeMap<MetricKey, u64>,
    pub metric: Option<MetricKey>,
}

/// The answer: the answering node's parts that the asker lacks or holds otherwise, and the
/// metrics whose parts it wants from the asker (it lacks them or holds them otherwise).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CatalogDiff {
    pub state: CatalogState,
    pub wanted: Vec<MetricKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A point contradicts the schema (or another point of the same batch): a client error.
    #[error("metric {metric}: {message}")]
    Conflict { metric: String, message: String },
    #[error("catalog file {path}: {message}")]
    Storage { path: String, message: String },
    /// The catalog file was lost: writing before a sync could reuse CRDT dots.
    #[error("the catalog has not been synced from a peer since it was lost; retry shortly")]
    NotSynced,
}

/// What a change sees: the state, with the parts it touches copied on first touch.
pub struct Draft<'a> {
    base: &'a CatalogState,
    touched: CatalogState,
}

impl Draft<'_> {
    fn part(&mut self, key: &MetricKey) -> &mut MetricState {
        let base = self.base;
        self.touched.metrics.entry(key.clone()).or_insert_with(|| base.metrics.get(key).cloned().unwrap_or_default())
    }

    fn get(&self, key: &MetricKey) -> Option<&MetricState> {
        self.touched.metrics.get(key).or_else(|| self.base.metrics.get(key))
    }

    /// The state as the change will leave it, for the parts of `keys`.
    fn touch_all(&mut self, keys: impl IntoIterator<Item = MetricKey>) -> &mut CatalogState {
        for key in keys {
            self.part(&key);
        }
        &mut self.touched
    }
}

/// What readers use, rebuilt part by part after every change: the read path never touches the
/// CRDTs.
#[derive(Default)]
struct Views {
    schemas: BTreeMap<MetricKey, Schema>,
    drops: BTreeMap<MetricKey, u64>,
    digests: BTreeMap<MetricKey, u64>,
}

impl Views {
    fn update(&mut self, key: &MetricKey, part: &MetricState) {
        match part.schema() {
            Some(schema) => self.schemas.insert(key.clone(), schema),
            None => self.schemas.remove(key),
        };
        if part.epoch > 0 {
            self.drops.insert(key.clone(), part.epoch);
        }
        if part.is_blank() {
            self.digests.remove(key);
        } else {
            self.digests.insert(key.clone(), part.digest());
        }
    }
}

/// The catalog log: one record per change, the parts it changed.
struct CatalogLog {
    path: PathBuf,
    log: AppendLog,
    /// Bytes of the state when the log was last rewritten as one snapshot.
    snapshot_bytes: u64,
}

impl CatalogLog {
    fn append(&mut self, changed: &CatalogState) -> Result<(), CatalogError> {
        let mut record = Vec::new();
        crate::storage::wal::encode_record(changed, &mut record);
        self.log.append_durable(&record).map_err(|e| self.error(e.to_string()))
    }

    fn due_for_rewrite(&self) -> bool {
        self.log.len() > (self.snapshot_bytes * LOG_REWRITE_FACTOR).max(LOG_REWRITE_BYTES_MIN)
    }

    /// Replaces the log with one record holding `state` (write aside, fsync, rename).
    fn rewrite(&mut self, state: &CatalogState) -> Result<(), CatalogError> {
        let mut record = Vec::new();
        crate::storage::wal::encode_record(state, &mut record);
        crate::storage::write_atomic(&self.path, &record).map_err(|e| self.error(e.to_string()))?;
        self.log = AppendLog::open(&self.path).map_err(|e| self.error(e.to_string()))?;
        self.snapshot_bytes = record.len() as u64;
        Ok(())
    }

    fn error(&self, message: String) -> CatalogError {
        CatalogError::Storage { path: self.path.display().to_string(), message }
    }
}

pub struct Catalog {
    actor: NodeId,
    state: Mutex<CatalogState>,
    /// Held through each change, its write to disk included: changes come one at a time,
    /// while readers take `state` only to read or clone.
    writer: tokio::sync::Mutex<()>,
    log: Arc<Mutex<CatalogLog>>,
    views: RwLock<Views>,
    digest: std::sync::atomic::AtomicU64,
    synced: AtomicBool,
}

impl Catalog {
    /// Loads the catalog of `data_dir` (`catalog.log`, or a `catalog.bin` written before the
    /// log, which is converted). `lost_means_unsynced`: when the catalog is missing, or its
    /// log ends in bytes that are not whole records, but the node was part of a formed cluster
    /// before, refuse local changes until a peer's state has been merged, so that this actor's
    /// CRDT dots are not reused.
    ///
    /// The CRDT actor is `node_id`, or, for a catalog begun anew (a new data dir, a lost or cut
    /// catalog), `node_id.incarnation` (kept in `catalog.actor`): a node that left and joined
    /// again on an empty data dir under the same id counted its dots from 1 again, and its
    /// peers, having seen that actor's dots up to far more, took each new entry for one
    /// removed and dropped it (a placement gone: its points unreadable).
    pub fn open(
        data_dir: &Path,
        node_id: &str,
        incarnation: i64,
        lost_means_unsynced: bool,
    ) -> Result<Self, CatalogError> {
        let path = data_dir.join("catalog.log");
        let err = |path: &Path, message: String| CatalogError::Storage { path: path.display().to_string(), message };
        let legacy = data_dir.join("catalog.bin");
        let mut state = CatalogState::default();
        let mut lost = false;
        if path.exists() {
            let (_, torn) = crate::storage::wal::replay_records(&path, |end, payload| {
                let part = CatalogState::from_bytes(payload)
                    .map_err(|e| std::io::Error::other(format!("the record ending at byte {end}: {e}")))?;
                state.merge(part);
                Ok::<(), std::io::Error>(())
            })
            .map_err(|e| err(&path, e.to_string()))?;
            if torn > 0 {
                tracing::warn!(file = %path.display(), torn, "the catalog log ends in a torn record, cut off");
                lost = true;
            }
        } else if legacy.exists() {
            let bytes = std::fs::read(&legacy).map_err(|e| err(&legacy, e.to_string()))?;
            if bytes.len() < 4 {
                return Err(err(&legacy, "truncated".into()));
            }
            let (body, crc) = bytes.split_at(bytes.len() - 4);
            if crc32fast::hash(body).to_le_bytes() != crc {
                return Err(err(&legacy, "fails its checksum".into()));
            }
            state = CatalogState::from_whole_state(body, &node_id.to_string()).map_err(|e| err(&legacy, e))?;
        } else {
            lost = true;
        }
        let actor_path = data_dir.join("catalog.actor");
        let actor = if lost {
            let actor = format!("{node_id}.{incarnation}");
            crate::storage::write_atomic(&actor_path, actor.as_bytes()).map_err(|e| err(&actor_path, e.to_string()))?;
            actor
        } else {
            // Catalogs from before `catalog.actor` were the node id's.
            match std::fs::read_to_string(&actor_path) {
                Ok(actor) if !actor.trim().is_empty() => actor.trim().to_string(),
                Ok(_) => node_id.to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => node_id.to_string(),
                Err(e) => return Err(err(&actor_path, e.to_string())),
            }
        };
        let log = AppendLog::open(&path).map_err(|e| err(&path, e.to_string()))?;
        let mut log = CatalogLog { path: path.clone(), log, snapshot_bytes: 0 };
        if legacy.exists() {
            log.rewrite(&state)?;
            std::fs::remove_file(&legacy).map_err(|e| err(&legacy, e.to_string()))?;
            tracing::info!(file = %legacy.display(), "converted the catalog file to the catalog log");
        } else {
            log.snapshot_bytes = log.log.len();
        }
        let mut views = Views::default();
        for (key, part) in &state.metrics {
            views.update(key, part);
        }
        Ok(Self {
            actor,
            digest: combined_digest(&views.digests).into(),
            views: RwLock::new(views),
            state: Mutex::new(state),
            writer: Default::default(),
            log: Arc::new(Mutex::new(log)),
            synced: AtomicBool::new(!(lost && lost_means_unsynced)),
        })
    }

    /// Makes a change: `edit` works on copies of the parts it touches; the parts it changed are
    /// appended to the log (fsynced) on a blocking thread, with no lock a reader needs held,
    /// and only then become the state and refresh the read views. A change that cannot be
    /// persisted (a full disk) leaves the state as it was, so memory, disk and the digest the
    /// node gossips never disagree, and the same change can simply come again.
    async fn change<T>(
        &self,
        edit: impl FnOnce(&mut Draft) -> Result<T, CatalogError>,
    ) -> Result<(T, bool), CatalogError> {
        let _one_at_a_time = self.writer.lock().await;
        let (out, changed) = {
            let state = self.state.lock().expect("catalog lock");
            let mut draft = Draft { base: &state, touched: CatalogState::default() };
            let out = edit(&mut draft)?;
            let mut changed = draft.touched;
            changed.metrics.retain(|key, part| match state.metrics.get(key) {
                Some(before) => before != part,
                None => *part != MetricState::default(),
            });
            (out, changed)
        };
        if changed.metrics.is_empty() {
            return Ok((out, false));
        }
        let log = self.log.clone();
        let record = changed.clone();
        crate::env::spawn_blocking(move || log.lock().expect("catalog log lock").append(&record))
            .await
            .map_err(|e| CatalogError::Storage { path: "catalog.log".into(), message: e.to_string() })??;
        {
            let mut views = self.views.write().expect("catalog lock");
            let mut state = self.state.lock().expect("catalog lock");
            for (key, part) in changed.metrics {
                views.update(&key, &part);
                state.metrics.insert(key, part);
            }
            self.digest.store(combined_digest(&views.digests), Ordering::SeqCst);
        }
        if self.log.lock().expect("catalog log lock").due_for_rewrite() {
            let (log, snapshot) = (self.log.clone(), self.state.lock().expect("catalog lock").clone());
            let rewritten =
                crate::env::spawn_blocking(move || log.lock().expect("catalog log lock").rewrite(&snapshot)).await;
            // The change itself is durable already: a failed rewrite only leaves a longer log.
            if let Err(e) = rewritten.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                tracing::warn!(error = %e, "cannot rewrite the catalog log; it is tried again after the next change");
            }
        }
        Ok((out, true))
    }

    pub fn digest(&self) -> u64 {
        self.digest.load(Ordering::SeqCst)
    }

    /// Each metric's part digest (see [`CatalogState::part_digests`]).
    pub fn part_digests(&self) -> BTreeMap<MetricKey, u64> {
        self.views.read().expect("catalog lock").digests.clone()
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Marks the catalog usable without a peer (a cluster of one has nobody to sync from).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    /// The whole state, encoded.
    pub fn state_bytes(&self) -> Vec<u8> {
        self.state.lock().expect("catalog lock").to_bytes()
    }

    /// The parts of `metrics`, encoded: what a change to them sends to the peers.
    pub fn parts_bytes(&self, metrics: &[MetricKey]) -> Vec<u8> {
        self.state.lock().expect("catalog lock").only(metrics).to_bytes()
    }

    /// Compares a peer's part digests with this node's (see [`CatalogDiff`]), all of them or
    /// only `metric`'s.
    pub fn diff(&self, theirs: &BTreeMap<MetricKey, u64>, metric: Option<&MetricKey>) -> CatalogDiff {
        let mut ours = self.part_digests();
        if let Some(metric) = metric {
            ours.retain(|k, _| k == metric);
        }
        let send: Vec<MetricKey> =
            ours.iter().filter(|(k, d)| theirs.get(*k) != Some(*d)).map(|(k, _)| k.clone()).collect();
        let wanted = theirs.iter().filter(|(k, d)| ours.get(*k) != Some(*d)).map(|(k, _)| k.clone()).collect();
        CatalogDiff { state: self.state.lock().expect("catalog lock").only(&send), wanted }
    }

    /// Merges a peer's state (whole or some parts); returns whether anything changed here.
    pub async fn merge(&self, other: CatalogState) -> Result<bool, CatalogError> {
        let ((), changed) = self
            .change(|draft| {
                let keys: Vec<MetricKey> = other.metrics.keys().cloned().collect();
                draft.touch_all(keys).merge(other);
                Ok(())
            })
            .await?;
        self.mark_synced();
        Ok(changed)
    }

    pub fn schema(&self, key: &MetricKey) -> Option<Schema> {
        self.views.read().expect("catalog lock").schemas.get(key).cloned()
    }

    /// Checks every point of a batch against the schemas and extends them with new fields,
    /// all or nothing across all the batch's metrics.
    pub async fn admit(
        &self,
        batch: &[(MetricKey, RowBatch)],
        origins: &BTreeMap<MetricKey, (String, String)>,
    ) -> Result<(), CatalogError> {
        let mut additions: Vec<(&MetricKey, Vec<NewField>)> = Vec::new();
        {
            let views = self.views.read().expect("catalog lock");
            let empty = Schema::default();
            for (key, rows) in batch {
                let known = views.schemas.get(key).unwrap_or(&empty);
                let added = known
                    .check_batch(rows)
                    .map_err(|message| CatalogError::Conflict { metric: key.to_string(), message })?;
                if !added.is_empty() {
                    additions.push((key, added));
                }
            }
        }
        if additions.is_empty() {
            return Ok(());
        }
        if !self.is_synced() {
            return Err(CatalogError::NotSynced);
        }
        let actor = &self.actor;
        self.change(|draft| {
            // Another writer (or a merge) may have defined the same fields since we looked.
            for (key, added) in &additions {
                let current = draft.get(key).and_then(MetricState::schema).unwrap_or_default();
                for (name, class, ty) in added {
                    if let Some(&(c, t)) = current.fields.get(name)
                        && (c, t) != (*class, *ty)
                    {
                        return Err(CatalogError::Conflict {
                            metric: key.to_string(),
                            message: format!(
                                "field {name:?} is a {c} of type {t} in the schema but was sent as a {class} of type {ty}"
                            ),
                        });
                    }
                }
            }
            for (key, added) in additions {
                let part = draft.part(key);
                for (name, class, ty) in added {
                    part.add_field(actor, &name, (class, ty));
                }
                if let Some(origin) = origins.get(key)
                    && part.origin().is_none()
                {
                    let ctx = part.origin.read_ctx().derive_add_ctx(actor.clone());
                    let op = part.origin.write(origin.clone(), ctx);
                    part.origin.apply(op);
                }
            }
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Drops a metric: its schema and placements go, and its drop epoch rises to `now_ms` (or
    /// one past the current epoch if the clock is behind it). `None` when it does not exist;
    /// otherwise the new epoch.
    pub async fn drop_metric(&self, key: &MetricKey, now_ms: i64) -> Result<Option<u64>, CatalogError> {
        if !self.is_synced() {
            return Err(CatalogError::NotSynced);
        }
        let (epoch, _) = self
            .change(|draft| {
                let Some(current) = draft.get(key).filter(|p| p.schema().is_some()) else { return Ok(None) };
                let epoch = (now_ms.max(0) as u64).max(current.epoch + 1);
                draft.part(key).merge(MetricState { epoch, ..Default::default() });
                Ok(Some(epoch))
            })
            .await?;
        Ok(epoch)
    }

    /// A metric's drop epoch: 0 if it was never dropped, otherwise the epoch of its latest
    /// drop. Data of a metric belongs to one epoch; every internal request about a shard
    /// carries the sender's epoch, so data from before a drop (a hint, a repair copy, a node
    /// that was away) is never stored into, nor read as, the metric created after it.
    pub fn drop_epoch(&self, key: &MetricKey) -> u64 {
        self.views.read().expect("catalog lock").drops.get(key).copied().unwrap_or(0)
    }

    /// Raises a metric's drop epoch to `epoch`, learnt from a peer's request before its
    /// catalog arrives: the metric's part starts over at that epoch.
    pub async fn note_drop(&self, key: &MetricKey, epoch: u64) -> Result<(), CatalogError> {
        self.change(|draft| {
            draft.part(key).merge(MetricState { epoch, ..Default::default() });
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Each metric's Influx measurement and field (see [`CatalogState::origins`]).
    pub fn origins(&self) -> BTreeMap<MetricKey, (String, String)> {
        self.state.lock().expect("catalog lock").origins()
    }

    pub fn metrics(&self) -> Vec<MetricKey> {
        self.views.read().expect("catalog lock").schemas.keys().cloned().collect()
    }

    /// Field class and type of a metric, for the query planner.
    pub fn field(&self, key: &MetricKey, name: &str) -> Option<(FieldClass, FieldType)> {
        self.views.read().expect("catalog lock").schemas.get(key).and_then(|s| s.fields.get(name).copied())
    }

    pub fn placement(&self) -> BTreeMap<ShardId, BTreeSet<NodeId>> {
        self.state.lock().expect("catalog lock").placement()
    }

    /// The replicas recorded for a shard (empty when it has no placement).
    pub fn replicas(&self, shard: &ShardId) -> BTreeSet<NodeId> {
        let state = self.state.lock().expect("catalog lock");
        state
            .metrics
            .get(&shard.metric)
            .and_then(|p| p.placement.get(&shard.start).val)
            .map(|s| s.read().val.into_iter().collect())
            .unwrap_or_default()
    }

    /// Placed shards of `key` overlapping `[from, to)`, with their replicas.
    pub fn shards_of(&self, key: &MetricKey, from: i64, to: i64, interval: i64) -> BTreeMap<ShardId, BTreeSet<NodeId>> {
        let state = self.state.lock().expect("catalog lock");
        let Some(part) = state.metrics.get(key) else { return BTreeMap::new() };
        part.placement()
            .into_iter()
            .filter(|(start, _)| start.saturating_add(interval) > from && *start < to)
            .map(|(start, nodes)| (ShardId { metric: key.clone(), start }, nodes))
            .collect()
    }

    /// Whether the shard has replicas. An entry can outlive its last replica (every replica
    /// removed): such a shard is placed again like a new one.
    pub fn has_placement(&self, shard: &ShardId) -> bool {
        !self.replicas(shard).is_empty()
    }

    /// Removes `node` from a shard's replicas (after its points were copied elsewhere).
    pub async fn remove_replica(&self, shard: &ShardId, node: &NodeId) -> Result<(), CatalogError> {
        self.change(|draft| {
            draft.part(&shard.metric).remove_replica(&self.actor, shard.start, node);
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Removes the placements of `shards` in one change.
    pub async fn remove_shards(&self, shards: &[ShardId]) -> Result<(), CatalogError> {
        self.change(|draft| {
            for shard in shards {
                draft.part(&shard.metric).remove_shard(shard.start);
            }
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Records replicas of a shard (merged as a union with any concurrent placement).
    pub async fn add_replicas(&self, shard: &ShardId, nodes: &[NodeId]) -> Result<(), CatalogError> {
        self.change(|draft| {
            draft.part(&shard.metric).add_replicas(&self.actor, shard.start, nodes);
            Ok(())
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FieldValue, Num, Point};
    use proptest::prelude::*;

    /// A placement whose last replica was removed is no placement: the shard is placed again
    /// rather than written to no one.
    #[tokio::test]
    async fn a_shard_without_replicas_has_no_placement() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), "a", 0, false).unwrap();
        let shard = ShardId { metric: MetricKey::new("d", "n", "m").unwrap(), start: 0 };
        assert!(!cat.has_placement(&shard));
        cat.add_replicas(&shard, &["a".to_string()]).await.unwrap();
        assert!(cat.has_placement(&shard));
        cat.remove_replica(&shard, &"a".to_string()).await.unwrap();
        assert!(cat.replicas(&shard).is_empty());
        assert!(!cat.has_placement(&shard), "an empty replica set is no placement");
        cat.add_replicas(&shard, &["b".to_string()]).await.unwrap();
        assert_eq!(cat.replicas(&shard).into_iter().collect::<Vec<_>>(), ["b"]);
    }

    /// A node that left and joins again on an empty data dir under the same id: its new
    /// catalog's changes reach a peer that holds every change of its first life. (With one
    /// actor for both, the peer took the new placement, dot 1 of an actor it had seen up to 3,
    /// for one removed.) A catalog reopened keeps its actor.
    #[tokio::test]
    async fn a_node_joining_again_on_an_empty_data_dir_mints_no_dot_seen_before() {
        let (first, again, peer_dir) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let shard = |start| ShardId { metric: MetricKey::new("d", "n", "m").unwrap(), start };
        let a = Catalog::open(first.path(), "a", 1_000, false).unwrap();
        for start in 0..3 {
            a.add_replicas(&shard(start), &["a".to_string()]).await.unwrap();
        }
        let peer = Catalog::open(peer_dir.path(), "p", 1_000, false).unwrap();
        peer.merge(CatalogState::from_bytes(&a.state_bytes()).unwrap()).await.unwrap();
        drop(a);
        let reopened = Catalog::open(first.path(), "a", 2_000, false).unwrap();
        assert_eq!(reopened.actor, "a.1000", "a catalog reopened keeps its actor");
        let a = Catalog::open(again.path(), "a", 3_000, false).unwrap();
        a.add_replicas(&shard(10), &["a".to_string()]).await.unwrap();
        peer.merge(CatalogState::from_bytes(&a.state_bytes()).unwrap()).await.unwrap();
        assert!(peer.has_placement(&shard(10)), "the new life's placement is kept");
        assert_eq!(peer.placement().len(), 4);
    }

    #[tokio::test]
    async fn admit_is_all_or_nothing_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let cat = Catalog::open(dir.path(), "a", 0, false).unwrap();
        let mut a =
            Point { timestamp: 1, value: Num::Int(1), dimensions: Default::default(), tags: Default::default() };
        a.tags.insert("region".into(), FieldValue::Str("eu".into()));
        let mut b = a.clone();
        b.tags.insert("region".into(), FieldValue::Int(1));
        b.dimensions.insert("host".into(), FieldValue::Str("h".into()));
        let other = MetricKey::new("d", "n", "other").unwrap();
        let rows = |p: &[Point]| RowBatch::from_points(p).unwrap();
        let batch = vec![(other.clone(), rows(&[a.clone()])), (key.clone(), rows(&[a.clone(), b]))];
        let err = cat.admit(&batch, &Default::default()).await.unwrap_err().to_string();
        assert!(err.contains("region") && err.contains("one batch"), "{err}");
        assert!(cat.schema(&key).is_none() && cat.schema(&other).is_none(), "a rejected batch changes no schema");
        cat.admit(&[(key.clone(), rows(&[a.clone()]))], &Default::default()).await.unwrap();
        let shard = ShardId { metric: key.clone(), start: 0 };
        cat.add_replicas(&shard, &["a".into(), "b".into()]).await.unwrap();
        drop(cat);
        let cat = Catalog::open(dir.path(), "a", 0, false).unwrap();
        assert_eq!(cat.field(&key, "region"), Some((FieldClass::Tag, FieldType::Str)));
        assert_eq!(cat.placement()[&shard].len(), 2);
        assert_eq!(cat.drop_metric(&key, 5000).await.unwrap(), Some(5000));
        assert!(cat.metrics().is_empty());
        // A later drop with a clock behind the first still raises the epoch.
        cat.admit(&[(key.clone(), rows(&[a]))], &Default::default()).await.unwrap();
        assert_eq!(cat.drop_metric(&key, 10).await.unwrap(), Some(5001));
        drop(cat);
        let cat = Catalog::open(dir.path(), "a", 0, false).unwrap();
        assert_eq!(cat.drop_epoch(&key), 5001, "drop epochs persist");
        assert_eq!(cat.drop_metric(&key, 6000).await.unwrap(), None, "a dropped metric cannot be dropped again");
    }

    /// A change is stored as the parts it changed: a new shard costs one record of about its
    /// metric's size, whatever the size of the catalog; the log is rewritten once it grew.
    #[tokio::test]
    async fn changes_append_only_their_parts_and_the_log_is_rewritten_when_grown() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), "a", 0, false).unwrap();
        let log = dir.path().join("catalog.log");
        let p = Point { timestamp: 1, value: Num::Int(1), dimensions: Default::default(), tags: Default::default() };
        let rows = RowBatch::from_points(&[p]).unwrap();
        for i in 0..300 {
            let key = MetricKey::new("d", "n", &format!("m{i}")).unwrap();
            cat.admit(&[(key.clone(), rows.clone())], &Default::default()).await.unwrap();
            cat.add_replicas(&ShardId { metric: key, start: 0 }, &["a".into(), "b".into()]).await.unwrap();
        }
        let whole = cat.state_bytes().len() as u64;
        let key = MetricKey::new("d", "n", "m7").unwrap();
        let before = std::fs::metadata(&log).unwrap().len();
        cat.add_replicas(&ShardId { metric: key.clone(), start: 1000 }, &["a".into()]).await.unwrap();
        let grown = std::fs::metadata(&log).unwrap().len() - before;
        assert!(grown > 0 && grown * 50 < whole, "one shard appended {grown} bytes; the whole state is {whole}");
        let part = cat.parts_bytes(std::slice::from_ref(&key)).len() as u64;
        assert!(part * 50 < whole, "a push of one metric ({part} bytes) is not the whole state ({whole})");
        // Grow the log past its bound: it is rewritten as one snapshot, and reads back the same.
        for start in 2..40_000i64 {
            cat.add_replicas(&ShardId { metric: key.clone(), start: start * 1000 }, &["a".into()]).await.unwrap();
            if std::fs::metadata(&log).unwrap().len() < before {
                break;
            }
        }
        assert!(std::fs::metadata(&log).unwrap().len() < LOG_REWRITE_BYTES_MIN * 2, "the log was rewritten");
        let (digest, placement) = (cat.digest(), cat.placement());
        drop(cat);
        let cat = Catalog::open(dir.path(), "a", 0, false).unwrap();
        assert_eq!((cat.digest(), cat.placement()), (digest, placement));
        // A torn last record is cut off; a node that was in a cluster then waits for a sync.
        let mut bytes = std::fs::read(&log).unwrap();
        bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        std::fs::write(&log, &bytes).unwrap();
        drop(cat);
        let cat = Catalog::open(dir.path(), "a", 0, true).unwrap();
        assert_eq!(cat.digest(), digest);
        assert!(!cat.is_synced());
    }

    /// A `catalog.bin` from before the log is converted, content and drop epochs kept.
    #[tokio::test]
    async fn a_catalog_file_from_before_the_log_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let actor: NodeId = "a".into();
        let (kept, dropped) = (MetricKey::new("d", "n", "kept").unwrap(), MetricKey::new("d", "n", "gone").unwrap());
        let mut schemas: Map<MetricKey, Fields, NodeId> = Map::new();
        let ctx = schemas.read_ctx().derive_add_ctx(actor.clone());
        let op = schemas.update(kept.clone(), ctx, |fields, ctx| {
            fields.update("host".to_string(), ctx, |reg, ctx| reg.write((FieldClass::Tag, FieldType::Str), ctx))
        });
        schemas.apply(op);
        let mut placement: Map<ShardId, Orswot<NodeId, NodeId>, NodeId> = Map::new();
        let shard = ShardId { metric: kept.clone(), start: 0 };
        let ctx = placement.read_ctx().derive_add_ctx(actor.clone());
        let op = placement.update(shard.clone(), ctx, |set, ctx| set.add_all(["a".to_string(), "b".to_string()], ctx));
        placement.apply(op);
        let drops: BTreeMap<MetricKey, u64> = [(dropped.clone(), 77)].into();
        let mut bytes = postcard::to_stdvec(&(schemas, placement, drops)).unwrap();
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        std::fs::write(dir.path().join("catalog.bin"), bytes).unwrap();
        let cat = Catalog::open(dir.path(), "a", 0, true).unwrap();
        assert!(cat.is_synced());
        assert_eq!(cat.field(&kept, "host"), Some((FieldClass::Tag, FieldType::Str)));
        assert_eq!(cat.replicas(&shard).len(), 2);
        assert_eq!((cat.drop_epoch(&dropped), cat.drop_epoch(&kept)), (77, 0));
        assert!(!dir.path().join("catalog.bin").exists() && dir.path().join("catalog.log").exists());
        drop(cat);
        let cat = Catalog::open(dir.path(), "a", 0, true).unwrap();
        assert_eq!(cat.drop_epoch(&dropped), 77);
    }

    /// Two catalogs that differ exchange only the parts that differ, and then agree.
    #[tokio::test]
    async fn a_diff_names_only_the_parts_that_differ() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) =
            (Catalog::open(da.path(), "a", 0, false).unwrap(), Catalog::open(db.path(), "b", 0, false).unwrap());
        let m = |i: u32| MetricKey::new("d", "n", &format!("m{i}")).unwrap();
        for i in 0..10 {
            let shard = ShardId { metric: m(i), start: 0 };
            a.add_replicas(&shard, &["a".into()]).await.unwrap();
        }
        b.merge(CatalogState::from_bytes(&a.state_bytes()).unwrap()).await.unwrap();
        assert_eq!(a.digest(), b.digest());
        a.add_replicas(&ShardId { metric: m(3), start: 1 }, &["a".into()]).await.unwrap();
        b.add_replicas(&ShardId { metric: m(20), start: 0 }, &["b".into()]).await.unwrap();
        let diff = a.diff(&b.part_digests(), None);
        assert_eq!(diff.state.metrics.keys().cloned().collect::<Vec<_>>(), [m(3)]);
        assert_eq!(diff.wanted, [m(20), m(3)]);
        b.merge(diff.state).await.unwrap();
        a.merge(CatalogState::from_bytes(&b.parts_bytes(&diff.wanted)).unwrap()).await.unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.placement(), b.placement());
    }

    #[tokio::test]
    async fn lost_catalog_refuses_changes_until_synced() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), "a", 0, true).unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let p = Point { timestamp: 1, value: Num::Int(1), dimensions: Default::default(), tags: Default::default() };
        let batch = [(key, RowBatch::from_points(&[p]).unwrap())];
        assert!(matches!(cat.admit(&batch, &Default::default()).await, Err(CatalogError::NotSynced)));
        cat.merge(CatalogState::default()).await.unwrap();
        cat.admit(&batch, &Default::default()).await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_conflicting_definitions_resolve_the_same_everywhere() {
        let key = MetricKey::new("d", "n", "m").unwrap();
        let (mut a, mut b) = (CatalogState::default(), CatalogState::default());
        a.add_field(&"a".into(), &key, "x", (FieldClass::Dimension, FieldType::Int));
        b.add_field(&"b".into(), &key, "x", (FieldClass::Dimension, FieldType::Str));
        let (mut ab, mut ba) = (a.clone(), b.clone());
        ab.merge(b);
        ba.merge(a);
        assert_eq!(ab.schemas(), ba.schemas());
        assert_eq!(ab.schemas()[&key].fields["x"], (FieldClass::Dimension, FieldType::Str));
        assert_eq!(ab.digest(), ba.digest());
    }

    /// Operations a node may apply locally.
    #[derive(Debug, Clone)]
    enum Op {
        Field { metric: u8, field: u8, ty: u8 },
        Drop { metric: u8 },
        Place { metric: u8, start: u8, node: u8 },
        Unplace { metric: u8, start: u8, node: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3u8, 0..3u8, 0..3u8).prop_map(|(metric, field, ty)| Op::Field { metric, field, ty }),
            (0..3u8).prop_map(|metric| Op::Drop { metric }),
            (0..3u8, 0..3u8, 0..4u8).prop_map(|(metric, start, node)| Op::Place { metric, start, node }),
            (0..3u8, 0..3u8, 0..4u8).prop_map(|(metric, start, node)| Op::Unplace { metric, start, node }),
        ]
    }

    fn apply(state: &mut CatalogState, actor: &NodeId, op: &Op) {
        let metric = |m: u8| MetricKey::new("d", "n", &format!("m{m}")).unwrap();
        let shard = |m: u8, s: u8| ShardId { metric: metric(m), start: i64::from(s) * 1000 };
        let types = [FieldType::Int, FieldType::Dec, FieldType::Str];
        match op {
            Op::Field { metric: m, field, ty } => {
                state.add_field(actor, &metric(*m), &format!("f{field}"), (FieldClass::Tag, types[*ty as usize]))
            }
            Op::Drop { metric: m } => state.remove_metric(&metric(*m), u64::from(*m) + 1),
            Op::Place { metric: m, start, node } => {
                state.add_replicas(actor, &shard(*m, *start), &[format!("n{node}")])
            }
            Op::Unplace { metric: m, start, node } => {
                state.remove_replica(actor, &shard(*m, *start), &format!("n{node}"))
            }
        }
    }

    /// Three replicas apply random operations; returns their states.
    fn replicas(ops: &[(u8, Op)]) -> Vec<CatalogState> {
        let mut states = vec![CatalogState::default(); 3];
        for (who, op) in ops {
            let who = *who as usize % 3;
            apply(&mut states[who], &format!("n{who}"), op);
        }
        states
    }

    fn merged(mut a: CatalogState, b: CatalogState) -> CatalogState {
        a.merge(b);
        a
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn merge_is_commutative_associative_idempotent(ops in prop::collection::vec((0..3u8, op()), 0..30)) {
            let s = replicas(&ops);
            let (a, b, c) = (s[0].clone(), s[1].clone(), s[2].clone());
            prop_assert_eq!(merged(a.clone(), b.clone()).digest(), merged(b.clone(), a.clone()).digest());
            prop_assert_eq!(merged(a.clone(), b.clone()).schemas(), merged(b.clone(), a.clone()).schemas());
            let left = merged(merged(a.clone(), b.clone()), c.clone());
            let right = merged(a.clone(), merged(b.clone(), c.clone()));
            prop_assert_eq!(left.digest(), right.digest());
            prop_assert_eq!(merged(a.clone(), a.clone()), a.clone());
        }

        #[test]
        fn exchanges_in_any_order_with_drops_and_duplicates_converge(
            ops in prop::collection::vec((0..3u8, op()), 0..30),
            sends in prop::collection::vec((0..3usize, 0..3usize, any::<bool>()), 0..40),
        ) {
            let mut s = replicas(&ops);
            // Random pushes, some dropped (false), duplicates and reorderings included.
            for (from, to, delivered) in sends {
                if delivered && from != to {
                    let msg = s[from].clone();
                    s[to].merge(msg);
                }
            }
            // Then the network heals: a full round in each direction.
            for _ in 0..2 {
                for from in 0..3 {
                    for to in 0..3 {
                        if from != to {
                            let msg = s[from].clone();
                            s[to].merge(msg);
                        }
                    }
                }
            }
            prop_assert_eq!(&s[0], &s[1]);
            prop_assert_eq!(&s[1], &s[2]);
            prop_assert_eq!(s[0].digest(), s[2].digest());
        }
    }
}
