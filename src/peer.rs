//! The client side of the internal API (`/internal/v1/...`): how a node asks its peers for
//! catalog state today, and for replica writes and partial query results in the coming issues.
//! A trait, so that the simulator can deliver calls in process through a faulty network instead
//! of sockets; [`HttpPeers`] is the real thing.

use crate::model::ShardId;
use crate::model::batch::RowBatch;
use crate::query::plan::SelectPlan;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `POST /internal/v1/write`: store these points of one shard on this replica (answered after
/// they are fsynced).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaWrite {
    pub shard: ShardId,
    pub batch: RowBatch,
    /// The sender's drop epoch of the shard's metric ([`crate::catalog::Catalog::drop_epoch`]).
    pub epoch: u64,
}

/// `POST /internal/v1/delete`: remove this replica's points of one shard that match `filter`
/// within `[from, to)`; answered with the postcard count removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaDelete {
    pub shard: ShardId,
    /// When the coordinator ran the delete: every replica keeps the same tombstone, so
    /// replicas can exchange tombstones and recognise the ones they share.
    pub at_ms: i64,
    pub filter: Option<crate::query::plan::Filter>,
    pub from: i64,
    pub to: i64,
    /// The sender's drop epoch of the shard's metric ([`crate::catalog::Catalog::drop_epoch`]).
    pub epoch: u64,
}

/// A replica write as hints written before drop epochs hold it.
#[derive(Deserialize)]
struct ReplicaWriteV0 {
    shard: ShardId,
    batch: RowBatch,
}

impl ReplicaWrite {
    /// Decodes a write, also one kept as a hint before writes carried a drop epoch (epoch 0:
    /// delivered unless its metric has been dropped since).
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes).or_else(|e| match postcard::from_bytes::<ReplicaWriteV0>(bytes) {
            Ok(old) => Ok(Self { shard: old.shard, batch: old.batch, epoch: 0 }),
            Err(_) => Err(e),
        })
    }
}

/// The first byte of a tombstone rule written since deletes carry `at_ms` and `epoch`. An
/// older rule starts with the length of a db name, which is below 128.
const TOMBSTONE_RULE_V1: u8 = 0xd1;

/// A delete as tombstones written before drop epochs hold it.
#[derive(Deserialize)]
struct ReplicaDeleteV0 {
    shard: ShardId,
    filter: Option<crate::query::plan::Filter>,
    from: i64,
    to: i64,
}

impl ReplicaDelete {
    /// The bytes a tombstone keeps of this delete (see [`ReplicaDelete::from_rule`]).
    pub fn to_rule(&self) -> Vec<u8> {
        let mut out = vec![TOMBSTONE_RULE_V1];
        out.extend(postcard::to_stdvec(self).expect("deletes encode"));
        out
    }

    /// Decodes a tombstone's rule, also one written before the version byte (epoch 0).
    pub fn from_rule(bytes: &[u8]) -> Result<Self, postcard::Error> {
        match bytes.split_first() {
            Some((&TOMBSTONE_RULE_V1, rest)) => postcard::from_bytes(rest),
            _ => postcard::from_bytes::<ReplicaDeleteV0>(bytes).map(|old| Self {
                shard: old.shard,
                at_ms: 0,
                filter: old.filter,
                from: old.from,
                to: old.to,
                epoch: 0,
            }),
        }
    }
}

/// `POST /internal/v1/partial`: this replica's partial result of a select over one shard,
/// within `[from, to)`; answered with a postcard [`PartialAnswer`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartialRequest {
    pub shard: ShardId,
    pub plan: SelectPlan,
    pub from: i64,
    pub to: i64,
    /// The version of this replica's copy that the asker's cached answer was computed from:
    /// if the copy is still at it, the replica answers `Unchanged` without reading anything.
    pub known: Option<ShardVersion>,
    /// The sender's drop epoch of the shard's metric ([`crate::catalog::Catalog::drop_epoch`]).
    pub epoch: u64,
}

/// Appended to a [`PartialRequest`]: the asker would hold a read lease ([`crate::lease`]).
/// Versions before leases decode the request and ignore what follows it (postcard reads a
/// message from the front), so the two mix during a rolling upgrade.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseAsk {
    /// The asker's node id, to which the replica sends the revoke.
    pub holder: String,
}

/// Appended to a [`PartialAnswer`] when the request asked for a lease: whether it was granted.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub granted: bool,
}

/// A message with an optional tail appended (see [`LeaseAsk`]): `None` when there is none,
/// as from a node of an older version, or one this version cannot read (a later version's).
/// These messages can therefore only grow by tails.
pub fn decode_with_tail<'a, T: Deserialize<'a>, U: Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<(T, Option<U>), postcard::Error> {
    let (message, rest) = postcard::take_from_bytes::<T>(bytes)?;
    Ok((message, postcard::from_bytes::<U>(rest).ok()))
}

/// `message` with `tail` appended.
pub fn encode_with_tail<T: Serialize, U: Serialize>(message: &T, tail: Option<&U>) -> Vec<u8> {
    let mut bytes = postcard::to_stdvec(message).expect("encodes");
    if let Some(tail) = tail {
        bytes.extend(postcard::to_stdvec(tail).expect("encodes"));
    }
    bytes
}

/// One state of one replica's copy of a shard: equal versions hold the same points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardVersion {
    /// The replica's generation: a restarted node never repeats a version.
    pub generation: u64,
    pub state: u64,
}

/// A replica's answer to a [`PartialRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PartialAnswer {
    /// This node holds no copy of the shard (the coordinator then asks the next replica).
    NotHeld,
    /// The copy is at the version the request named.
    Unchanged,
    /// The partial result over the copy at `version`.
    Computed { version: ShardVersion, partial: crate::query::exec::Partial },
}

/// `POST /internal/v1/merge`: store the points of one shard that the replica does not hold
/// yet (hint replay, repair, hand-off), except those a delete newer than `as_of_ms` (less a
/// margin) removed; answered with the postcard count of points stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergeRequest {
    pub shard: ShardId,
    pub batch: RowBatch,
    /// The sender's drop epoch of the shard's metric ([`crate::catalog::Catalog::drop_epoch`]).
    pub epoch: u64,
}

/// `POST /internal/v1/digests`: this replica's block digests of one shard within `[from, to)`;
/// answered with a postcard `Option<Vec<BlockDigest>>` (`None`: the shard is not held here).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DigestRequest {
    pub shard: ShardId,
    pub from: i64,
    pub to: i64,
    pub block_ms: i64,
    /// The sender's drop epoch of the shard's metric ([`crate::catalog::Catalog::drop_epoch`]).
    pub epoch: u64,
}

/// `POST /internal/v1/points`: every point this replica holds of one shard within
/// `[from, to)`; answered with a postcard `RowBatch`, refused with 413 past `max` points.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointsRequest {
    pub shard: ShardId,
    pub from: i64,
    pub to: i64,
    pub max: u64,
    /// The sender's drop epoch of the shard's metric ([`crate::catalog::Catalog::drop_epoch`]).
    pub epoch: u64,
}

/// `POST /internal/v1/tombstones`: the sender's live tombstones of one shard; the replica
/// applies those it lacks (deleting what they match) and answers with a postcard
/// `Vec<Tombstone>` of its own live ones, so that one call brings both sides to the union.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TombstonesRequest {
    pub shard: ShardId,
    pub tombstones: Vec<crate::storage::Tombstone>,
    /// The sender's drop epoch of the shard's metric ([`crate::catalog::Catalog::drop_epoch`]).
    pub epoch: u64,
}

/// Timeout of one internal call: a peer slower than this is treated as unreachable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Header carrying the cluster id on internal requests; other ids are refused with 403.
pub const CLUSTER_HEADER: &str = "x-shoal-cluster";

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("peer {addr} answered {status}: {message}")]
    Refused { addr: String, status: u16, message: String },
}

#[async_trait::async_trait]
pub trait PeerClient: Send + Sync + 'static {
    /// `GET http://{addr}{path}`; the answer's body.
    async fn get(&self, addr: &str, path: &str) -> Result<Vec<u8>, PeerError>;
    /// `POST http://{addr}{path}` with a postcard body; the answer's body.
    async fn post(&self, addr: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>, PeerError>;
}

/// Most internal calls in flight to one peer; more wait, so a slow peer cannot absorb every
/// task and connection of this node.
pub const CALLS_PER_PEER_MAX: usize = 64;
/// Longest a call waits for one of those slots: a stalled peer holds all of them for a call
/// timeout each, and the calls queued behind fail fast instead of piling up.
pub const QUEUE_WAIT_MAX: Duration = Duration::from_secs(2);

/// Longest a pooled connection to a peer stays idle: below the smallest sensible
/// `shoal.http.header-read-timeout`, after which the peer closes it.
pub const POOL_IDLE_MAX: Duration = Duration::from_secs(4);

/// Internal calls over HTTP, with connection reuse, our cluster id on every request and, when
/// the cluster has a secret, a signature made with its keyring.
pub struct HttpPeers {
    client: reqwest::Client,
    /// `http` or `https`: every node of a cluster serves the same.
    scheme: &'static str,
    cluster_id: String,
    keyring: Option<std::sync::Arc<crate::keyring::Keyring>>,
    clock: std::sync::Arc<dyn crate::env::Clock>,
    in_flight: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>,
}

impl HttpPeers {
    /// With `tls`, peers are called over https and verified against its CAs.
    pub fn new(
        cluster_id: &str,
        keyring: Option<std::sync::Arc<crate::keyring::Keyring>>,
        clock: std::sync::Arc<dyn crate::env::Clock>,
        tls: Option<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        crate::tls::install_default_provider();
        // A node closes a connection that sends no request within its header-read timeout
        // (10 s by default), also between requests; a call that picks such a connection from
        // the pool as it closes fails with "error sending request" (seen as 503s under load in
        // the 3-node benchmark). Idle connections are let go well before.
        let mut builder = reqwest::Client::builder().timeout(CALL_TIMEOUT).pool_idle_timeout(POOL_IDLE_MAX);
        let scheme = match tls {
            Some(config) => {
                builder = builder.tls_backend_preconfigured(config);
                "https"
            }
            None => "http",
        };
        let client = builder.build()?;
        Ok(Self { client, scheme, cluster_id: cluster_id.to_string(), keyring, clock, in_flight: Default::default() })
    }

    /// Signs the request when the cluster has a secret (see [`crate::keyring::Keyring::sign`]).
    fn signed(
        &self,
        mut req: reqwest::RequestBuilder,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> reqwest::RequestBuilder {
        if let Some(keyring) = &self.keyring {
            for (name, value) in keyring.sign(method, path, self.clock.now_ms(), body) {
                req = req.header(name, value);
            }
        }
        req
    }

    async fn send(&self, addr: &str, req: reqwest::RequestBuilder) -> Result<Vec<u8>, PeerError> {
        let limit = self
            .in_flight
            .lock()
            .expect("peer limits lock")
            .entry(addr.to_string())
            .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(CALLS_PER_PEER_MAX)))
            .clone();
        let _permit = tokio::time::timeout(QUEUE_WAIT_MAX, limit.acquire_owned())
            .await
            .map_err(|_| PeerError::Unreachable {
                addr: addr.to_string(),
                reason: format!(
                    "{CALLS_PER_PEER_MAX} calls to it are already waiting for answers and none ended within {QUEUE_WAIT_MAX:?}"
                ),
            })?
            .expect("never closed");
        // With its causes: reqwest's own message ("error sending request") does not say
        // whether the connection was refused, reset or closed.
        let unreachable = |e: reqwest::Error| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                reason.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            PeerError::Unreachable { addr: addr.to_string(), reason }
        };
        let resp = req.header(CLUSTER_HEADER, &self.cluster_id).send().await.map_err(unreachable)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            Ok(body.to_vec())
        } else {
            let message = String::from_utf8_lossy(&body).chars().take(500).collect();
            Err(PeerError::Refused { addr: addr.to_string(), status: status.as_u16(), message })
        }
    }
}

#[async_trait::async_trait]
impl PeerClient for HttpPeers {
    async fn get(&self, addr: &str, path: &str) -> Result<Vec<u8>, PeerError> {
        let req = self.signed(self.client.get(format!("{}://{addr}{path}", self.scheme)), "GET", path, &[]);
        self.send(addr, req).await
    }

    async fn post(&self, addr: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>, PeerError> {
        let req = self.signed(self.client.post(format!("{}://{addr}{path}", self.scheme)), "POST", path, &body);
        self.send(addr, req.body(body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that accepts connections and never answers holds every call slot for a call
    /// timeout each; the calls queued behind them fail after the queue wait, not later.
    #[tokio::test]
    async fn calls_queued_behind_a_stalled_peer_fail_fast() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let peers =
            std::sync::Arc::new(HttpPeers::new("c", None, std::sync::Arc::new(crate::env::SystemClock), None).unwrap());
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..CALLS_PER_PEER_MAX + 1 {
            let (peers, addr) = (peers.clone(), addr.clone());
            calls.spawn(async move { peers.post(&addr, "/internal/v1/write", vec![1]).await });
        }
        let first = calls.join_next().await.unwrap().unwrap();
        match first {
            Err(PeerError::Unreachable { reason, .. }) => {
                assert!(reason.contains("already waiting"), "the first to end is the queued call: {reason}")
            }
            other => panic!("expected the queued call to fail first, got {other:?}"),
        }
        calls.abort_all();
        silent.abort();
    }
}
