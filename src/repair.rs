//! Recovery: what brings every shard back to `replication-factor` equal copies after faults.
//!
//! - Hint replay: hints kept by the write coordinator go to their replica, in order, once it
//!   is alive again ([`crate::hints`]).
//! - Replica repair: replicas of a shard compare digests per time block (a count and an
//!   order-independent hash of the points) and copy only the points of blocks that differ, in
//!   both directions, so both end with the union. It runs with a peer as soon as the peer is
//!   seen alive (again), and with every replica each `shoal.repair.interval`.
//! - Re-replication: a replica dead longer than `shoal.cluster.replica-replace-after` is
//!   replaced. One survivor (the live replica with the smallest id) copies the shard to new
//!   replicas chosen by the capacity selector, adds them to the placement, copies again what
//!   arrived meanwhile, and only then removes the dead node's location.
//! - Unowned shards: a node holding a shard whose placement no longer names it (it came back
//!   after being replaced) first copies its points to the owners, then drops its copy.
//! - Hand-off: `shoal leave` moves each of the node's shards to a new replica the same way
//!   before the node exits.
//!
//! Every copy stores through [`crate::storage::Shard::merge`], which keeps only points the
//! target does not hold yet: each of these steps is safe to repeat or to race with another.

use crate::membership::{Liveness, Member};
use crate::model::ShardId;
use crate::model::batch::RowBatch;
use crate::node::{Node, NodeError};
use crate::peer::{DigestRequest, MergeRequest, PointsRequest, ReplicaWrite, TombstonesRequest};
use crate::placement::Candidate;
use crate::storage::BlockDigest;
use crate::storage::{MergeTimes, Tombstone};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// A block with more points than this on either side is compared again as 16 smaller blocks
/// before any point moves, so one transfer stays far below the internal body limit.
const TRANSFER_POINTS_MAX: u64 = 100_000;
const SPLIT: i64 = 16;
/// About this many bytes of hints are read and sent per step of a replay.
const HINT_REPLAY_BYTES: u64 = 4 << 20;

/// What recovery is doing now, for `GET /status` and `shoal leave`.
#[derive(Default)]
pub struct RepairState {
    /// A repair round or a re-replication is under way.
    running: AtomicBool,
    rounds: AtomicU64,
    leave: Mutex<Option<LeaveProgress>>,
    /// Since when each local shard has been missing from its placement (see `drop_unowned`).
    unowned_since: Mutex<HashMap<ShardId, tokio::time::Instant>>,
    /// Set once a leaving node has handed off its shards: it takes no more replica writes.
    handed_off: AtomicBool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LeaveProgress {
    pub moved: usize,
    pub total: usize,
    /// Shards not moved yet (no other storage node could take them so far).
    pub kept: usize,
    pub done: bool,
    /// The leave gave up after `shoal.cluster.leave-timeout` with `kept` shards still here;
    /// the node stays a member.
    pub abandoned: bool,
}

impl RepairState {
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "running": self.running.load(Relaxed),
            "rounds": self.rounds.load(Relaxed),
            "leave": *self.leave.lock().expect("repair lock"),
        })
    }

    pub fn clear_leave_progress(&self) {
        *self.leave.lock().expect("repair lock") = None;
    }

    pub fn handed_off(&self) -> bool {
        self.handed_off.load(Relaxed)
    }
}

/// Marks recovery as running for as long as it lives.
struct Running<'a>(&'a AtomicBool);

impl<'a> Running<'a> {
    fn start(flag: &'a AtomicBool) -> Self {
        flag.store(true, Relaxed);
        Self(flag)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Relaxed);
    }
}

fn live_addr(members: &[Member], id: &str) -> Option<String> {
    members.iter().find(|m| m.id == id && !m.is_self && m.is_live()).and_then(|m| m.http_addr.clone())
}

impl Node {
    /// Repair compares a shard in blocks of this span: 24 per shard (an hour for 1-day shards).
    fn repair_block_ms(&self) -> i64 {
        (self.cfg.shard_interval_ms / 24).max(1)
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, String> {
        let bytes = postcard::to_stdvec(body).expect("internal requests encode");
        let answer = self.peers.post(addr, path, bytes).await.map_err(|e| e.to_string())?;
        postcard::from_bytes(&answer).map_err(|e| format!("{addr}{path}: undecodable answer: {e}"))
    }

    async fn local_digests(
        &self,
        shard: &ShardId,
        from: i64,
        to: i64,
        block_ms: i64,
    ) -> Result<Vec<BlockDigest>, String> {
        let Some(s) = self.storage.shard_if_held(shard) else { return Ok(Vec::new()) };
        crate::env::spawn_blocking(move || s.digests(from, to, block_ms))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn local_points(&self, shard: &ShardId, from: i64, to: i64) -> Result<RowBatch, String> {
        let Some(s) = self.storage.shard_if_held(shard) else { return Ok(RowBatch::default()) };
        crate::env::spawn_blocking(move || s.points_in(from, to))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Makes this node's copy of `shard` and the copy at `addr` hold the same points: compares
    /// block digests and moves the points of differing blocks only. With `push_only` points go
    /// only from here to the peer (hand-off to a new replica). Returns the blocks copied.
    /// Tombstones go first, both ways: a copy read from a replica that missed a DELETE (it
    /// was away, or not placed yet) must not bring the deleted points back.
    pub(crate) async fn sync_shard(&self, shard: &ShardId, addr: &str, push_only: bool) -> Result<u64, String> {
        let epoch = self.catalog.drop_epoch(&shard.metric);
        let mine = self.storage.tombstones(shard, self.env.clock.now_ms()).await.map_err(|e| e.to_string())?;
        let req = TombstonesRequest { shard: shard.clone(), tombstones: mine, epoch };
        let theirs: Vec<Tombstone> = self.call(addr, "/internal/v1/tombstones", &req).await?;
        self.apply_tombstones(shard, theirs, epoch).await.map_err(|e| e.to_string())?;
        let end = shard.start.saturating_add(self.cfg.shard_interval_ms);
        let mut work = vec![(shard.start, end, self.repair_block_ms())];
        let mut copied = 0;
        while let Some((from, to, block_ms)) = work.pop() {
            let local = self.local_digests(shard, from, to, block_ms).await?;
            let req = DigestRequest { shard: shard.clone(), from, to, block_ms, epoch };
            let remote: Option<Vec<BlockDigest>> = self.call(addr, "/internal/v1/digests", &req).await?;
            let mut blocks: BTreeMap<i64, (Option<BlockDigest>, Option<BlockDigest>)> = BTreeMap::new();
            for d in local {
                blocks.entry(d.start).or_default().0 = Some(d);
            }
            for d in remote.unwrap_or_default() {
                blocks.entry(d.start).or_default().1 = Some(d);
            }
            for (start, (mine, theirs)) in blocks {
                self.metrics.repair_blocks_compared.fetch_add(1, Relaxed);
                if mine == theirs {
                    continue;
                }
                let (mine, theirs) = (mine.map_or(0, |d| d.count), theirs.map_or(0, |d| d.count));
                let block_end = start.saturating_add(block_ms).min(to);
                if mine.max(theirs) > TRANSFER_POINTS_MAX && block_ms > 1 {
                    work.push((start, block_end, (block_ms / SPLIT).max(1)));
                    continue;
                }
                if theirs > 0 && !push_only {
                    let max = theirs.saturating_mul(2).max(TRANSFER_POINTS_MAX);
                    let req = PointsRequest { shard: shard.clone(), from: start, to: block_end, max, epoch };
                    let batch: RowBatch = self.call(addr, "/internal/v1/points", &req).await?;
                    batch.validate().map_err(|e| format!("points from {addr}: {e}"))?;
                    let times = MergeTimes { now_ms: self.env.clock.now_ms() };
                    let _stores = self.fence_epoch(&shard.metric, epoch).await.map_err(|e| e.to_string())?;
                    let stored = self.storage.merge(shard, batch, times).await.map_err(|e| e.to_string())?;
                    self.metrics.repair_points_copied.fetch_add(stored, Relaxed);
                }
                if mine > 0 {
                    let batch = self.local_points(shard, start, block_end).await?;
                    let req = MergeRequest { shard: shard.clone(), batch, epoch };
                    let stored: u64 = self.call(addr, "/internal/v1/merge", &req).await?;
                    self.metrics.repair_points_copied.fetch_add(stored, Relaxed);
                }
                self.metrics.repair_blocks_copied.fetch_add(1, Relaxed);
                copied += 1;
            }
        }
        Ok(copied)
    }

    /// Repairs every shard placed on this node with its other live replicas; with `only`, just
    /// with that peer (it has just come back), otherwise with the replicas whose id is greater
    /// than ours (the other side of each pair does the rest).
    async fn repair_round(&self, members: &[Member], only: Option<&str>) {
        let _running = Running::start(&self.repair.running);
        let me = &self.cfg.node_id;
        for (shard, replicas) in self.catalog.placement() {
            if !replicas.contains(me) {
                continue;
            }
            let peers = replicas.iter().filter(|r| match only {
                Some(o) => r.as_str() == o,
                None => r.as_str() > me.as_str(),
            });
            for peer in peers {
                let Some(addr) = live_addr(members, peer) else { continue };
                match self.sync_shard(&shard, &addr, false).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(%shard, %peer, blocks = n, "repaired differing blocks"),
                    Err(e) => tracing::debug!(%shard, %peer, error = %e, "repair failed; retried next round"),
                }
            }
        }
        self.repair.rounds.fetch_add(1, Relaxed);
    }

    /// Whether `id` counts as lost for good: dead (or evicted) for longer than
    /// `shoal.cluster.replica-replace-after`, or gone by a graceful leave.
    fn is_gone(&self, members: &[Member], id: &str) -> bool {
        let after = self.cfg.replica_replace_after.as_millis() as u64;
        match members.iter().find(|m| m.id == id) {
            Some(m) if m.is_self => false,
            Some(m) => match m.state {
                Liveness::Left => true,
                Liveness::Dead => m.heartbeat_age_ms.is_none_or(|age| age >= after),
                Liveness::Alive | Liveness::Suspect => false,
            },
            // Evicted after the dead-node grace, or not heard of since this node started.
            None => (self.env.clock.now_ms() - self.started_ms) as u64 >= after,
        }
    }

    /// Removes replicas that left from a shard's placement (see `rereplicate`).
    async fn forget_left(&self, shard: &ShardId, left: &[&String]) {
        if left.is_empty() {
            return;
        }
        for r in left {
            if let Err(e) = self.catalog.remove_replica(shard, r).await {
                tracing::warn!(%shard, replica = %r, error = %e, "cannot remove a replica that left");
            }
        }
        self.publish_catalog(shard).await;
        tracing::info!(%shard, left = ?left, "removed replicas that left");
    }

    fn new_replica_candidates(&self, members: &[Member], except: &str) -> Vec<Candidate> {
        members
            .iter()
            .filter(|m| m.id != except && m.is_live() && m.readiness == "ready")
            .map(|m| Candidate {
                storage: m.roles.iter().any(|r| r == "storage"),
                id: m.id.clone(),
                capacity: m.capacity,
            })
            .collect()
    }

    /// Copies `shard` to `new` replicas, adds them to the placement, then copies again what
    /// reached only the old replicas meanwhile. False if a copy failed (nothing was changed
    /// in the placement then, or the new replicas are listed and repair finishes the copy).
    async fn copy_to_new_replicas(&self, shard: &ShardId, new: &[String], members: &[Member]) -> bool {
        let mut addrs = Vec::new();
        for n in new {
            let Some(addr) = live_addr(members, n) else { return false };
            if let Err(e) = self.sync_shard(shard, &addr, true).await {
                tracing::warn!(%shard, to = %n, error = %e, "copying a shard to a new replica failed; retrying later");
                return false;
            }
            addrs.push((n, addr));
        }
        if !new.is_empty() {
            if let Err(e) = self.catalog.add_replicas(shard, new).await {
                tracing::warn!(%shard, error = %e, "cannot record the new replicas");
                return false;
            }
            self.publish_catalog(shard).await;
            for (n, addr) in addrs {
                if let Err(e) = self.sync_shard(shard, &addr, true).await {
                    tracing::warn!(%shard, to = %n, error = %e, "catch-up copy failed; repair will finish it");
                }
            }
        }
        true
    }

    /// Pushes what this node holds of `shard` to replicas that hold it already: a leaving node
    /// may have the only copy of points written at consistency `one` while they were away, and
    /// must not leave until they have them. False if a push failed.
    async fn push_to_replicas(&self, shard: &ShardId, replicas: &BTreeSet<String>, members: &[Member]) -> bool {
        for r in replicas {
            let Some(addr) = live_addr(members, r) else { return false };
            if let Err(e) = self.sync_shard(shard, &addr, true).await {
                tracing::warn!(%shard, to = %r, error = %e, "pushing a shard to a replica before leaving failed; retrying later");
                return false;
            }
        }
        true
    }

    /// Pushes a shard's metric's part of the catalog to every live peer now (rather than waiting for anti-entropy), so
    /// write coordinators learn new placements quickly.
    async fn publish_catalog(&self, shard: &ShardId) {
        let part = self.catalog.parts_bytes(std::slice::from_ref(&shard.metric));
        for e in self.post_to_live_peers("/internal/v1/catalog", part).await {
            tracing::debug!(error = %e, "a peer missed a placement change; anti-entropy will bring it");
        }
    }

    /// Replaces replicas that are gone for good and tops up shards placed on fewer than
    /// `replication-factor` nodes (placed while fewer storage nodes were up, or left by a
    /// leave that found no spare node), for the shards where this node is the first live
    /// replica by id (so that one survivor acts per shard). A replica that is only down (a
    /// restart, a partition) still counts until it is gone.
    ///
    /// A gone replica leaves the placement only once the shard has `replication-factor`
    /// replicas without it: on the minority side of a long partition every other replica looks
    /// gone, and removing them there (while the majority removes this side's) would empty the
    /// placement when the two merge.
    async fn rereplicate(&self, members: &[Member]) {
        let me = &self.cfg.node_id;
        let rf = self.cfg.replication_factor;
        let candidates = self.new_replica_candidates(members, "");
        let storage_nodes = candidates.iter().filter(|c| c.storage).count();
        for (shard, replicas) in self.catalog.placement() {
            let gone: Vec<&String> = replicas.iter().filter(|r| self.is_gone(members, r)).collect();
            // Replicas that are only down (restarting, partitioned) still count.
            let kept = replicas.len() - gone.len();
            let need = rf.saturating_sub(kept);
            if gone.is_empty() && need == 0 {
                continue;
            }
            let live: BTreeSet<String> = replicas
                .iter()
                .filter(|r| members.iter().any(|m| &m.id == *r && m.is_live() && m.state != Liveness::Left))
                .cloned()
                .collect();
            if live.iter().next() != Some(me) {
                continue;
            }
            let _running = Running::start(&self.repair.running);
            // The ready storage nodes that hold no replica yet, best first, as many as needed.
            let want = (live.len() + need).min(storage_nodes);
            let new: Vec<String> = if want > live.len() {
                match crate::placement::place(&shard, &candidates, self.cfg.metrics_selector, want, &live) {
                    Ok(chosen) => chosen.into_iter().filter(|c| !replicas.contains(c)).take(need).collect(),
                    Err(e) => {
                        tracing::debug!(%shard, error = %e, "cannot re-replicate yet");
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            // A replica that left handed off what it held and is not coming back: it goes from
            // the placement even while the shard stays below RF (it can be listed again by a
            // top-up that ran while its leave was still spreading).
            let left: Vec<&String> = gone
                .iter()
                .copied()
                .filter(|r| members.iter().any(|m| &m.id == *r && m.state == Liveness::Left))
                .collect();
            let full_without_gone = kept + new.len() >= rf;
            if (new.is_empty() && !full_without_gone) || !self.copy_to_new_replicas(&shard, &new, members).await {
                self.forget_left(&shard, &left).await;
                continue;
            }
            if !full_without_gone {
                // Topped up as far as the ready nodes allow; the gone replicas stay listed.
                tracing::info!(%shard, added = ?new, "topped up a shard below the replication factor");
                self.forget_left(&shard, &left).await;
                continue;
            }
            for g in &gone {
                if let Err(e) = self.catalog.remove_replica(&shard, g).await {
                    tracing::warn!(%shard, replica = %g, error = %e, "cannot remove a lost replica");
                }
            }
            self.publish_catalog(&shard).await;
            self.metrics.shards_rereplicated.fetch_add(1, Relaxed);
            tracing::info!(%shard, lost = ?gone, added = ?new, "re-replicated a shard");
        }
        // Hints for nodes that hold no replica any more can never be delivered usefully.
        let placed: BTreeSet<String> = self.catalog.placement().into_values().flatten().collect();
        for (target, _) in self.hints.pending() {
            if !placed.contains(&target) && self.is_gone(members, &target) {
                let (hints, metrics, t) = (self.hints.clone(), self.metrics.clone(), target.clone());
                let discarded = crate::env::spawn_blocking(move || hints.discard(&t, &metrics)).await;
                if let Err(e) = discarded.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))) {
                    tracing::warn!(%target, error = %e, "cannot discard hints");
                }
            }
        }
    }

    /// Drops local shards whose placement has not named this node for `replica-replace-after`
    /// (it was replaced while away), after copying their points to every owner.
    async fn drop_unowned(&self, members: &[Member]) {
        if !self.catalog.is_synced() {
            return;
        }
        let me = &self.cfg.node_id;
        let now = tokio::time::Instant::now();
        for shard in self.storage.all_shards() {
            let replicas = self.catalog.replicas(&shard.id);
            let since = {
                let mut unowned = self.repair.unowned_since.lock().expect("repair lock");
                if replicas.is_empty() || replicas.contains(me) {
                    unowned.remove(&shard.id);
                    continue;
                }
                *unowned.entry(shard.id.clone()).or_insert(now)
            };
            if now.duration_since(since) < self.cfg.replica_replace_after {
                continue;
            }
            let mut all_copied = true;
            for owner in &replicas {
                let copied = match live_addr(members, owner) {
                    Some(addr) => self.sync_shard(&shard.id, &addr, true).await.is_ok(),
                    None => false,
                };
                all_copied &= copied;
            }
            if !all_copied {
                continue;
            }
            match self.storage.drop_shard(&shard.id).await {
                Ok(()) => {
                    tracing::info!(shard = %shard.id, owners = ?replicas, "dropped a shard this node no longer owns")
                }
                Err(e) => tracing::warn!(shard = %shard.id, error = %e, "cannot drop an unowned shard"),
            }
            self.repair.unowned_since.lock().expect("repair lock").remove(&shard.id);
        }
    }

    /// The recovery loop: repairs with peers that come (back) alive, re-replicates shards of
    /// lost nodes, drops unowned shards, and runs a full repair round every repair interval.
    pub(crate) fn spawn_recovery(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        let check = (self.cfg.gossip_interval * 5).clamp(
            std::time::Duration::from_millis(100),
            self.cfg.repair_interval.max(std::time::Duration::from_millis(100)),
        );
        let full_every = self.cfg.repair_interval;
        tokio::spawn(async move {
            let mut seen: HashMap<String, u64> = HashMap::new();
            let mut last_full = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(check).await;
                let Some(node) = weak.upgrade() else { return };
                if node.repair.handed_off() {
                    return;
                }
                let members = node.membership.members().await;
                let mut returned = Vec::new();
                for m in members.iter().filter(|m| !m.is_self) {
                    if m.is_live() {
                        if seen.insert(m.id.clone(), m.generation) != Some(m.generation) {
                            returned.push(m.id.clone());
                        }
                    } else {
                        seen.remove(&m.id);
                    }
                }
                for peer in returned {
                    node.repair_round(&members, Some(&peer)).await;
                }
                node.rereplicate(&members).await;
                node.drop_unowned(&members).await;
                if last_full.elapsed() >= full_every {
                    node.repair_round(&members, None).await;
                    last_full = tokio::time::Instant::now();
                    node.metrics.repair_round_finished_ms.store(node.env.clock.now_ms(), Relaxed);
                }
            }
        });
    }

    /// Sends waiting hints to their targets that are alive, oldest first; stops at a target's
    /// first failure (the rest wait for the next try, in order).
    pub(crate) async fn replay_hints(&self) {
        let pending = self.hints.pending();
        if pending.is_empty() {
            return;
        }
        let members = self.membership.members().await;
        for (target, _) in pending {
            let Some(addr) = live_addr(&members, &target) else { continue };
            loop {
                let now_ms = self.env.clock.now_ms();
                let (store, metrics, t) = (self.hints.clone(), self.metrics.clone(), target.clone());
                let next = crate::env::spawn_blocking(move || store.next(&t, HINT_REPLAY_BYTES, now_ms, &metrics))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                let (hints, offset) = match next {
                    Ok(Some(next)) => next,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "cannot read hints");
                        break;
                    }
                };
                let count = hints.len() as u64;
                let mut delivered = true;
                for hint in hints {
                    let mut write = match ReplicaWrite::decode(&hint.payload) {
                        Ok(w) => w,
                        Err(e) => {
                            tracing::error!(%target, error = %e, "an undecodable hint is dropped");
                            self.metrics.hints_dropped.fetch_add(1, Relaxed);
                            continue;
                        }
                    };
                    // A hint kept before points carried their write time: it is the hint's.
                    if !write.batch.columns.contains_key(crate::model::batch::WRITTEN_COLUMN) {
                        write.batch.stamp_written(hint.recorded_ms);
                    }
                    let req = MergeRequest { shard: write.shard, batch: write.batch, epoch: write.epoch };
                    let body = postcard::to_stdvec(&req).expect("merges encode");
                    match self.peers.post(&addr, "/internal/v1/merge", body).await {
                        Ok(_) => {}
                        // The target refuses this hint for good (its metric was dropped, say):
                        // skip it rather than block the ones behind it.
                        Err(crate::peer::PeerError::Refused { status, message, .. })
                            if (400..500).contains(&status) =>
                        {
                            tracing::warn!(%target, status, %message, "a hint was refused and is dropped");
                            self.metrics.hints_dropped.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            tracing::debug!(%target, error = %e, "hint replay stopped; retried later");
                            delivered = false;
                            break;
                        }
                    }
                }
                if !delivered {
                    return;
                }
                let (store, metrics, t) = (self.hints.clone(), self.metrics.clone(), target.clone());
                let replayed = crate::env::spawn_blocking(move || store.replayed(&t, offset, count, &metrics))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                if let Err(e) = replayed {
                    tracing::warn!(%target, error = %e, "cannot record replayed hints");
                    break;
                }
                if count > 0 {
                    tracing::info!(%target, hints = count, "replayed hints");
                }
                if !self.hints.pending().iter().any(|(t, _)| *t == target) {
                    break;
                }
            }
        }
    }

    /// Graceful leave, part one: hands each shard placed on this node to a new replica and
    /// removes this node from its placement, reporting progress in `GET /status`. A shard that
    /// no other storage node can take yet (this node may have just come out of a partition and
    /// see no one live) is retried until `shoal.cluster.leave-timeout`: this node may hold the
    /// only copy of some points, so it must not go while it still owns a shard. Returns
    /// the final progress; only when nothing is kept does it stop taking replica writes.
    pub(crate) async fn hand_off(&self) -> LeaveProgress {
        let me = self.cfg.node_id.clone();
        let mut pending: Vec<ShardId> =
            self.catalog.placement().into_iter().filter(|(_, r)| r.contains(&me)).map(|(s, _)| s).collect();
        let mine = pending.clone();
        let set_progress = |p: LeaveProgress| *self.repair.leave.lock().expect("repair lock") = Some(p);
        let mut progress = LeaveProgress { total: mine.len(), ..Default::default() };
        set_progress(progress.clone());
        let _running = Running::start(&self.repair.running);
        let deadline = tokio::time::Instant::now() + self.cfg.leave_timeout;
        let retry_every = (self.cfg.gossip_interval * 10).max(std::time::Duration::from_millis(500));
        loop {
            let mut kept = Vec::new();
            for shard in pending {
                if self.hand_off_shard(&shard, &me).await {
                    progress.moved += 1;
                } else {
                    kept.push(shard);
                }
                progress.kept = kept.len();
                set_progress(progress.clone());
                tracing::info!(moved = progress.moved, total = progress.total, "leave: handing off shards");
            }
            pending = kept;
            if pending.is_empty() || tokio::time::Instant::now() + retry_every > deadline {
                break;
            }
            // With no other storage node known at all (a cluster of one) no retry can succeed.
            let members = self.membership.members().await;
            let someone = members.iter().any(|m| {
                !m.is_self && m.state != crate::membership::Liveness::Left && m.roles.iter().any(|r| r == "storage")
            });
            if !someone {
                break;
            }
            tracing::warn!(shards = pending.len(), "leave: no storage node could take some shards yet; retrying");
            tokio::time::sleep(retry_every).await;
        }
        if !pending.is_empty() {
            progress.abandoned = true;
            progress.done = true;
            set_progress(progress.clone());
            return progress;
        }
        // Writes routed here by coordinators that had not yet heard of the new placement are
        // refused from now on, and those that arrived are copied to the owners once more.
        self.repair.handed_off.store(true, Relaxed);
        let members = self.membership.members().await;
        for shard in &mine {
            for owner in self.catalog.replicas(shard) {
                if owner == me {
                    continue;
                }
                if let Some(addr) = live_addr(&members, &owner)
                    && let Err(e) = self.sync_shard(shard, &addr, true).await
                {
                    tracing::warn!(%shard, %owner, error = %e, "final hand-off copy failed");
                }
            }
        }
        progress.done = true;
        set_progress(progress.clone());
        progress
    }

    /// Copies one shard to a new replica and takes this node out of its placement; false when
    /// no live storage node could take it or the copy failed.
    async fn hand_off_shard(&self, shard: &ShardId, me: &String) -> bool {
        let replicas = self.catalog.replicas(shard);
        if !replicas.contains(me) {
            return true;
        }
        let members = self.membership.members().await;
        let candidates = self.new_replica_candidates(&members, me);
        let others: BTreeSet<String> =
            replicas.iter().filter(|r| *r != me && live_addr(&members, r).is_some()).cloned().collect();
        let storage_nodes = candidates.iter().filter(|c| c.storage).count();
        let rf = self.cfg.replication_factor.min(storage_nodes);
        let moved = match crate::placement::place(shard, &candidates, self.cfg.metrics_selector, rf, &others) {
            Ok(chosen) if !chosen.is_empty() => {
                let new: Vec<String> = chosen.into_iter().filter(|c| !others.contains(c)).collect();
                self.copy_to_new_replicas(shard, &new, &members).await
                    && self.push_to_replicas(shard, &others, &members).await
            }
            _ => false,
        };
        if !moved {
            tracing::warn!(%shard, "no storage node could take this shard yet");
            return false;
        }
        if let Err(e) = self.catalog.remove_replica(shard, me).await {
            tracing::warn!(%shard, error = %e, "cannot remove this node from a shard's placement");
        }
        self.publish_catalog(shard).await;
        true
    }

    /// `(points, digest)` of `replica`'s copy of `shard` as it reports them (0 and 0 when it
    /// holds none); `None` when it cannot be asked. For `GET /cluster/shards?verify=true`.
    pub async fn verify_replica(&self, members: &[Member], shard: &ShardId, replica: &str) -> Option<(u64, u64)> {
        let end = shard.start.saturating_add(self.cfg.shard_interval_ms);
        let req = DigestRequest {
            shard: shard.clone(),
            from: shard.start,
            to: end,
            block_ms: self.cfg.shard_interval_ms,
            epoch: self.catalog.drop_epoch(&shard.metric),
        };
        let blocks: Option<Vec<BlockDigest>> = if replica == self.cfg.node_id {
            self.replica_digests(req).await.ok()?
        } else {
            self.call(&live_addr(members, replica)?, "/internal/v1/digests", &req).await.ok()?
        };
        Some(BlockDigest::total(&blocks.unwrap_or_default()))
    }

    /// This replica's block digests of a shard (the replica side of repair).
    pub async fn replica_digests(&self, req: DigestRequest) -> Result<Option<Vec<BlockDigest>>, NodeError> {
        drop(self.fence_epoch(&req.shard.metric, req.epoch).await?);
        if self.storage.shard_if_held(&req.shard).is_none() {
            return Ok(None);
        }
        let digests =
            self.local_digests(&req.shard, req.from, req.to, req.block_ms.max(1)).await.map_err(NodeError::Internal)?;
        Ok(Some(digests))
    }

    /// This replica's points of a shard in a range (the replica side of a repair copy).
    pub async fn replica_points(&self, req: PointsRequest) -> Result<RowBatch, NodeError> {
        drop(self.fence_epoch(&req.shard.metric, req.epoch).await?);
        let batch = self.local_points(&req.shard, req.from, req.to).await.map_err(NodeError::Internal)?;
        if batch.len() as u64 > req.max {
            return Err(NodeError::TooLarge(format!(
                "{} points in [{}, {}) of shard {}, more than the {} asked for",
                batch.len(),
                req.from,
                req.to,
                req.shard,
                req.max
            )));
        }
        Ok(batch)
    }

    /// Stores the points of a shard this replica lacks (the replica side of hint replay,
    /// repair and hand-off); returns how many were new.
    pub async fn replica_merge(&self, req: MergeRequest) -> Result<u64, NodeError> {
        let write = ReplicaWrite { shard: req.shard, batch: req.batch, epoch: req.epoch };
        self.check_replica_write(&write)?;
        let _stores = self.fence_epoch(&write.shard.metric, write.epoch).await?;
        let times = MergeTimes { now_ms: self.env.clock.now_ms() };
        let stored = self.storage.merge(&write.shard, write.batch, times).await?;
        self.metrics.points_written.fetch_add(stored, Relaxed);
        Ok(stored)
    }

    /// Applies a peer's tombstones of a shard and answers with this replica's own (the
    /// replica side of the tombstone exchange that starts every repair copy).
    pub async fn replica_tombstones(&self, req: TombstonesRequest) -> Result<Vec<Tombstone>, NodeError> {
        // Checked before anything is answered: a stale peer must not get this epoch's
        // tombstones, nor hand over its own (a newer epoch drops this node's shards first).
        drop(self.fence_epoch(&req.shard.metric, req.epoch).await?);
        self.apply_tombstones(&req.shard, req.tombstones, req.epoch).await?;
        Ok(self.storage.tombstones(&req.shard, self.env.clock.now_ms()).await?)
    }

    /// Applies the deletes this node's copy of `shard` missed, so that the points they
    /// removed elsewhere go here too (only those written at or before each delete: a point
    /// written again since stays) and later merges are filtered. Expired ones are ignored.
    async fn apply_tombstones(&self, shard: &ShardId, tombstones: Vec<Tombstone>, epoch: u64) -> Result<(), NodeError> {
        let now_ms = self.env.clock.now_ms();
        let grace_ms = self.cfg.hints_age_max.as_millis() as i64;
        let _stores = self.fence_epoch(&shard.metric, epoch).await?;
        // A delete made under an earlier drop epoch was about the metric before that drop:
        // it must not delete points of the metric created since.
        let local_epoch = self.catalog.drop_epoch(&shard.metric);
        let fresh: Vec<Tombstone> = tombstones
            .into_iter()
            .filter(|t| now_ms - t.at_ms <= grace_ms && crate::node::tombstone_epoch(&t.rule) >= local_epoch)
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let held = self.storage.tombstones(shard, now_ms).await?;
        for t in fresh.into_iter().filter(|t| !held.contains(t)) {
            let keep = (crate::node::tombstone_rule())(&t.rule);
            let removed = self.storage.delete(shard, keep, t).await?;
            tracing::info!(%shard, removed, "applied a delete this replica had missed");
        }
        Ok(())
    }
}
