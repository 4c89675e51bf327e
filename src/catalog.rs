//! The catalog: metric schemas and shard placement, held whole by every node as state-based
//! CRDTs (`crdts` 7.3.2) so that any node can change them without coordination; anti-entropy
//! (in `node`) exchanges whole states, and merging is commutative, associative and idempotent,
//! so loss, duplication and reordering of messages are harmless.
//!
//! - schemas: `Map<MetricKey, Map<field, MVReg<(class, type)>>>`. Concurrent first writes of
//!   one field with different types leave sibling values in its register; every node resolves
//!   them by the same rule, the most general one: class `tag` > `dimension` > `value`, then type
//!   VARCHAR > DECIMAL > INT. Points already stored under the losing type keep their stored
//!   values and stay readable (queries compare numbers numerically whatever their type).
//! - placement: `Map<ShardId, Orswot<node id>>`. Concurrent placements of one shard merge into
//!   their union: over-replication is possible, under-replication is not.
//!
//! Actor ids are node ids (stable across restarts), never generations. The state is persisted
//! atomically after every change and reloaded on start.

use crate::model::batch::RowBatch;
use crate::model::{FieldClass, FieldType, MetricKey, NewField, Schema, ShardId};
use crdts::{CmRDT, CvRDT, MVReg, Map, Orswot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

pub type NodeId = String;
type FieldDef = (FieldClass, FieldType);
type Fields = Map<String, MVReg<FieldDef, NodeId>, NodeId>;

/// Largest catalog state accepted from a peer or from disk.
pub const STATE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogState {
    schemas: Map<MetricKey, Fields, NodeId>,
    placement: Map<ShardId, Orswot<NodeId, NodeId>, NodeId>,
    /// Each dropped metric's drop epoch (see [`Catalog::drop_epoch`]), merged by max: a
    /// join-semilattice, so it merges as the CRDTs above do.
    drops: BTreeMap<MetricKey, u64>,
}

/// The state as catalog files written before drop epochs hold it.
#[derive(Deserialize)]
struct StateWithoutDrops {
    schemas: Map<MetricKey, Fields, NodeId>,
    placement: Map<ShardId, Orswot<NodeId, NodeId>, NodeId>,
}

/// The deterministic resolution of a field's concurrent definitions.
fn resolve(defs: &[FieldDef]) -> Option<FieldDef> {
    defs.iter().copied().max()
}

impl CatalogState {
    pub fn merge(&mut self, other: CatalogState) {
        self.schemas.merge(other.schemas);
        self.placement.merge(other.placement);
        for (key, epoch) in other.drops {
            let known = self.drops.entry(key).or_default();
            *known = (*known).max(epoch);
        }
    }

    pub fn add_field(&mut self, actor: &NodeId, key: &MetricKey, name: &str, def: FieldDef) {
        let ctx = self.schemas.read_ctx().derive_add_ctx(actor.clone());
        let op = self.schemas.update(key.clone(), ctx, |fields, ctx| {
            fields.update(name.to_string(), ctx, |reg, ctx| reg.write(def, ctx))
        });
        self.schemas.apply(op);
    }

    /// Removes a metric's schema and the placements of its shards, and raises its drop epoch
    /// to `epoch`.
    pub fn remove_metric(&mut self, key: &MetricKey, epoch: u64) {
        let known = self.drops.entry(key.clone()).or_default();
        *known = (*known).max(epoch);
        let ctx = self.schemas.get(key).derive_rm_ctx();
        let op = self.schemas.rm(key.clone(), ctx);
        self.schemas.apply(op);
        let shards: Vec<ShardId> = self.placement.keys().map(|k| k.val.clone()).filter(|s| &s.metric == key).collect();
        for shard in shards {
            let ctx = self.placement.get(&shard).derive_rm_ctx();
            let op = self.placement.rm(shard, ctx);
            self.placement.apply(op);
        }
    }

    /// Removes shards' placements (their data is past retention).
    pub fn remove_shards(&mut self, shards: &[ShardId]) {
        for shard in shards {
            let ctx = self.placement.get(shard).derive_rm_ctx();
            let op = self.placement.rm(shard.clone(), ctx);
            self.placement.apply(op);
        }
    }

    pub fn add_replicas(&mut self, actor: &NodeId, shard: &ShardId, nodes: &[NodeId]) {
        let ctx = self.placement.read_ctx().derive_add_ctx(actor.clone());
        let op = self.placement.update(shard.clone(), ctx, |set, ctx| set.add_all(nodes.iter().cloned(), ctx));
        self.placement.apply(op);
    }

    /// Removes `node` from a shard's replicas. The dot is `actor`'s own (the node making the
    /// change), never the removed node's: a dot must not be minted for another actor.
    pub fn remove_replica(&mut self, actor: &NodeId, shard: &ShardId, node: &NodeId) {
        if let Some(set) = self.placement.get(shard).val {
            let ctx = set.contains(node).derive_rm_ctx();
            let op = set.rm(node.clone(), ctx);
            let add = self.placement.read_ctx().derive_add_ctx(actor.clone());
            let op = self.placement.update(shard.clone(), add, |_, _| op);
            self.placement.apply(op);
        }
    }

    /// Every schema, with concurrent definitions resolved.
    pub fn schemas(&self) -> BTreeMap<MetricKey, Schema> {
        let mut out = BTreeMap::new();
        for entry in self.schemas.iter() {
            let (key, fields) = entry.val;
            let mut schema = Schema::default();
            for f in fields.iter() {
                let (name, reg) = f.val;
                if let Some(def) = resolve(&reg.read().val) {
                    schema.fields.insert(name.clone(), def);
                }
            }
            out.insert(key.clone(), schema);
        }
        out
    }

    pub fn drop_epochs(&self) -> &BTreeMap<MetricKey, u64> {
        &self.drops
    }

    pub fn placement(&self) -> BTreeMap<ShardId, BTreeSet<NodeId>> {
        self.placement.iter().map(|e| (e.val.0.clone(), e.val.1.read().val.into_iter().collect())).collect()
    }

    /// A hash of the content (not the clocks: removes do not advance them), equal on nodes
    /// that hold the same schemas, sibling definitions and placements.
    pub fn digest(&self) -> u64 {
        let mut schemas: BTreeMap<&MetricKey, BTreeMap<&String, Vec<FieldDef>>> = BTreeMap::new();
        for entry in self.schemas.iter() {
            let (key, fields) = entry.val;
            let map = schemas.entry(key).or_default();
            for f in fields.iter() {
                let (name, reg) = f.val;
                let mut defs = reg.read().val;
                defs.sort();
                map.insert(name, defs);
            }
        }
        // Drop epochs count only once there are some, so the digest of a catalog without any
        // is what nodes from before drop epochs compute (no endless pulls while upgrading).
        let bytes = if self.drops.is_empty() {
            postcard::to_stdvec(&(schemas, self.placement())).expect("content encodes")
        } else {
            postcard::to_stdvec(&(schemas, self.placement(), &self.drops)).expect("content encodes")
        };
        // FNV-1a: stable across processes and versions, unlike std's hasher.
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("catalog state encodes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > STATE_BYTES_MAX {
            return Err(format!("catalog state larger than {STATE_BYTES_MAX} bytes"));
        }
        postcard::from_bytes(bytes).or_else(|e| match postcard::from_bytes::<StateWithoutDrops>(bytes) {
            Ok(old) => Ok(Self { schemas: old.schemas, placement: old.placement, drops: BTreeMap::new() }),
            Err(_) => Err(e.to_string()),
        })
    }
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

pub struct Catalog {
    actor: NodeId,
    path: PathBuf,
    state: Mutex<CatalogState>,
    /// Held through each change, its write to disk included: changes come one at a time,
    /// while readers take `state` only to read or clone.
    writer: tokio::sync::Mutex<()>,
    /// Resolved schemas, rebuilt after every change: the read path never touches the CRDT.
    schemas: RwLock<BTreeMap<MetricKey, Schema>>,
    /// The drop epochs, read by every internal request: kept apart from the state's lock,
    /// which a commit holds across its fsync.
    drops: RwLock<BTreeMap<MetricKey, u64>>,
    digest: std::sync::atomic::AtomicU64,
    synced: AtomicBool,
}

impl Catalog {
    /// Loads the catalog of `data_dir`. `lost_means_unsynced`: when the file is missing but the
    /// node was part of a formed cluster before, refuse local changes until a peer's state
    /// has been merged, so that this actor's CRDT dots are not reused.
    pub fn open(data_dir: &Path, actor: &str, lost_means_unsynced: bool) -> Result<Self, CatalogError> {
        let path = data_dir.join("catalog.bin");
        let err = |message: String| CatalogError::Storage { path: path.display().to_string(), message };
        let (state, synced) = match std::fs::read(&path) {
            Ok(bytes) => {
                if bytes.len() < 4 {
                    return Err(err("truncated".into()));
                }
                let (body, crc) = bytes.split_at(bytes.len() - 4);
                if crc32fast::hash(body).to_le_bytes() != crc {
                    return Err(err("fails its checksum".into()));
                }
                (CatalogState::from_bytes(body).map_err(err)?, true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (CatalogState::default(), !lost_means_unsynced),
            Err(e) => return Err(err(e.to_string())),
        };
        let catalog = Self {
            actor: actor.to_string(),
            path,
            schemas: RwLock::new(state.schemas()),
            drops: RwLock::new(state.drops.clone()),
            digest: state.digest().into(),
            state: Mutex::new(state),
            writer: Default::default(),
            synced: AtomicBool::new(synced),
        };
        Ok(catalog)
    }

    /// Makes a change: `edit` works on a copy of the state; if the content changed, the copy
    /// is written to disk (write to temp, fsync, rename) on a blocking thread, with no lock a
    /// reader needs held, and only then becomes the state and refreshes the read views. A
    /// change that cannot be persisted (a full disk) leaves the state as it was, so memory,
    /// disk and the digest the node gossips never disagree, and the same change can simply
    /// come again.
    async fn change<T>(
        &self,
        edit: impl FnOnce(&mut CatalogState) -> Result<T, CatalogError>,
    ) -> Result<(T, bool), CatalogError> {
        let _one_at_a_time = self.writer.lock().await;
        let mut next = self.state.lock().expect("catalog lock").clone();
        let out = edit(&mut next)?;
        let digest = next.digest();
        if digest == self.digest() {
            return Ok((out, false));
        }
        let mut bytes = next.to_bytes();
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        let path = self.path.clone();
        let storage_err = |message: String| CatalogError::Storage { path: self.path.display().to_string(), message };
        crate::env::spawn_blocking(move || crate::storage::write_atomic(&path, &bytes))
            .await
            .map_err(|e| storage_err(e.to_string()))?
            .map_err(|e| storage_err(e.to_string()))?;
        *self.schemas.write().expect("catalog lock") = next.schemas();
        *self.drops.write().expect("catalog lock") = next.drops.clone();
        self.digest.store(digest, Ordering::SeqCst);
        *self.state.lock().expect("catalog lock") = next;
        Ok((out, true))
    }

    pub fn digest(&self) -> u64 {
        self.digest.load(Ordering::SeqCst)
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Marks the catalog usable without a peer (a cluster of one has nobody to sync from).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    pub fn state_bytes(&self) -> Vec<u8> {
        self.state.lock().expect("catalog lock").to_bytes()
    }

    /// Merges a peer's state; returns whether anything changed here.
    pub async fn merge(&self, other: CatalogState) -> Result<bool, CatalogError> {
        let ((), changed) = self
            .change(|next| {
                next.merge(other);
                Ok(())
            })
            .await?;
        self.mark_synced();
        Ok(changed)
    }

    pub fn schema(&self, key: &MetricKey) -> Option<Schema> {
        self.schemas.read().expect("catalog lock").get(key).cloned()
    }

    /// Checks every point of a batch against the schemas and extends them with new fields,
    /// all or nothing across all the batch's metrics.
    pub async fn admit(&self, batch: &[(MetricKey, RowBatch)]) -> Result<(), CatalogError> {
        let mut additions: Vec<(&MetricKey, Vec<NewField>)> = Vec::new();
        {
            let schemas = self.schemas.read().expect("catalog lock");
            let empty = Schema::default();
            for (key, rows) in batch {
                let known = schemas.get(key).unwrap_or(&empty);
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
        self.change(|next| {
            // Another writer (or a merge) may have defined the same fields since we looked.
            let current = next.schemas();
            for (key, added) in &additions {
                for (name, class, ty) in added {
                    if let Some(&(c, t)) = current.get(*key).and_then(|s| s.fields.get(name))
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
                for (name, class, ty) in added {
                    next.add_field(actor, key, &name, (class, ty));
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
            .change(|next| {
                if !next.schemas().contains_key(key) {
                    return Ok(None);
                }
                let epoch = (now_ms.max(0) as u64).max(next.drops.get(key).map_or(0, |e| e + 1));
                next.remove_metric(key, epoch);
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
        self.drops.read().expect("catalog lock").get(key).copied().unwrap_or(0)
    }

    /// Raises a metric's drop epoch to `epoch`, learnt from a peer's request before its
    /// catalog arrives.
    pub async fn note_drop(&self, key: &MetricKey, epoch: u64) -> Result<(), CatalogError> {
        self.change(|next| {
            let known = next.drops.entry(key.clone()).or_default();
            *known = (*known).max(epoch);
            Ok(())
        })
        .await
        .map(|_| ())
    }

    pub fn metrics(&self) -> Vec<MetricKey> {
        self.schemas.read().expect("catalog lock").keys().cloned().collect()
    }

    /// Field class and type of a metric, for the query planner.
    pub fn field(&self, key: &MetricKey, name: &str) -> Option<(FieldClass, FieldType)> {
        self.schemas.read().expect("catalog lock").get(key).and_then(|s| s.fields.get(name).copied())
    }

    pub fn placement(&self) -> BTreeMap<ShardId, BTreeSet<NodeId>> {
        self.state.lock().expect("catalog lock").placement()
    }

    /// The replicas recorded for a shard (empty when it has no placement).
    pub fn replicas(&self, shard: &ShardId) -> BTreeSet<NodeId> {
        self.state
            .lock()
            .expect("catalog lock")
            .placement
            .get(shard)
            .val
            .map(|s| s.read().val.into_iter().collect())
            .unwrap_or_default()
    }

    /// Placed shards of `key` overlapping `[from, to)`, with their replicas.
    pub fn shards_of(&self, key: &MetricKey, from: i64, to: i64, interval: i64) -> BTreeMap<ShardId, BTreeSet<NodeId>> {
        let state = self.state.lock().expect("catalog lock");
        state
            .placement
            .iter()
            .filter(|e| &e.val.0.metric == key && e.val.0.start.saturating_add(interval) > from && e.val.0.start < to)
            .map(|e| (e.val.0.clone(), e.val.1.read().val.into_iter().collect()))
            .collect()
    }

    /// Whether the shard has replicas. An entry can outlive its last replica (a metric drop
    /// merged with a concurrent `remove_replica` of one of its shards keeps the entry, empty):
    /// such a shard is placed again like a new one.
    pub fn has_placement(&self, shard: &ShardId) -> bool {
        !self.replicas(shard).is_empty()
    }

    /// Removes `node` from a shard's replicas (after its points were copied elsewhere).
    pub async fn remove_replica(&self, shard: &ShardId, node: &NodeId) -> Result<(), CatalogError> {
        self.change(|next| {
            next.remove_replica(&self.actor, shard, node);
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Removes the placements of `shards` in one change.
    pub async fn remove_shards(&self, shards: &[ShardId]) -> Result<(), CatalogError> {
        self.change(|next| {
            next.remove_shards(shards);
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Records replicas of a shard (merged as a union with any concurrent placement).
    pub async fn add_replicas(&self, shard: &ShardId, nodes: &[NodeId]) -> Result<(), CatalogError> {
        self.change(|next| {
            next.add_replicas(&self.actor, shard, nodes);
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
        let cat = Catalog::open(dir.path(), "a", false).unwrap();
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

    #[tokio::test]
    async fn admit_is_all_or_nothing_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let cat = Catalog::open(dir.path(), "a", false).unwrap();
        let mut a =
            Point { timestamp: 1, value: Num::Int(1), dimensions: Default::default(), tags: Default::default() };
        a.tags.insert("region".into(), FieldValue::Str("eu".into()));
        let mut b = a.clone();
        b.tags.insert("region".into(), FieldValue::Int(1));
        b.dimensions.insert("host".into(), FieldValue::Str("h".into()));
        let other = MetricKey::new("d", "n", "other").unwrap();
        let rows = |p: &[Point]| RowBatch::from_points(p).unwrap();
        let batch = vec![(other.clone(), rows(&[a.clone()])), (key.clone(), rows(&[a.clone(), b]))];
        let err = cat.admit(&batch).await.unwrap_err().to_string();
        assert!(err.contains("region") && err.contains("one batch"), "{err}");
        assert!(cat.schema(&key).is_none() && cat.schema(&other).is_none(), "a rejected batch changes no schema");
        cat.admit(&[(key.clone(), rows(&[a.clone()]))]).await.unwrap();
        let shard = ShardId { metric: key.clone(), start: 0 };
        cat.add_replicas(&shard, &["a".into(), "b".into()]).await.unwrap();
        drop(cat);
        let cat = Catalog::open(dir.path(), "a", false).unwrap();
        assert_eq!(cat.field(&key, "region"), Some((FieldClass::Tag, FieldType::Str)));
        assert_eq!(cat.placement()[&shard].len(), 2);
        assert_eq!(cat.drop_metric(&key, 5000).await.unwrap(), Some(5000));
        assert!(cat.metrics().is_empty());
        // A later drop with a clock behind the first still raises the epoch.
        cat.admit(&[(key.clone(), rows(&[a]))]).await.unwrap();
        assert_eq!(cat.drop_metric(&key, 10).await.unwrap(), Some(5001));
        drop(cat);
        let cat = Catalog::open(dir.path(), "a", false).unwrap();
        assert_eq!(cat.drop_epoch(&key), 5001, "drop epochs persist");
        assert_eq!(cat.drop_metric(&key, 6000).await.unwrap(), None, "a dropped metric cannot be dropped again");
    }

    #[tokio::test]
    async fn lost_catalog_refuses_changes_until_synced() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), "a", true).unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let p = Point { timestamp: 1, value: Num::Int(1), dimensions: Default::default(), tags: Default::default() };
        let batch = [(key, RowBatch::from_points(&[p]).unwrap())];
        assert!(matches!(cat.admit(&batch).await, Err(CatalogError::NotSynced)));
        cat.merge(CatalogState::default()).await.unwrap();
        cat.admit(&batch).await.unwrap();
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
