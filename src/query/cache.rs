//! Answers to repeated selects (a dashboard refreshing the same panels). An answer is kept with
//! the version of every shard copy it read; it is served again only after each of those
//! replicas confirms, in the scatter that the query makes anyway, that its copy is still at
//! that version. So a kept answer is never stale: a write, a delete, a compaction or a
//! restart of any replica read changes a version and the query is computed afresh.

use crate::model::{MetricKey, ShardId};
use crate::peer::ShardVersion;
use crate::query::plan::SelectPlan;
use axum::body::Bytes;
use std::sync::Arc;

/// What makes two selects the same question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AnswerKey {
    metric: String,
    /// The plan as postcard: literals, grouping, order and limit all count.
    plan: Vec<u8>,
    range: (i64, i64),
    /// The metric's drop epoch: a metric dropped and made again is another metric.
    epoch: u64,
}

impl AnswerKey {
    pub fn new(key: &MetricKey, plan: &SelectPlan, range: (i64, i64), epoch: u64) -> Self {
        let plan = postcard::to_stdvec(plan).expect("a plan encodes");
        AnswerKey { metric: key.to_string(), plan, range, epoch }
    }

    fn bytes(&self) -> usize {
        self.metric.len() + self.plan.len() + 32
    }
}

/// Which copy of a shard an answer read: the replica and the version of its copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub shard: ShardId,
    pub replica: String,
    pub version: ShardVersion,
}

#[derive(Debug)]
pub struct CachedAnswer {
    /// One per shard the query read, sorted by shard.
    pub sources: Vec<Source>,
    /// The answer's JSON body.
    pub body: Bytes,
}

impl CachedAnswer {
    fn bytes(&self) -> usize {
        let key_len = |k: &MetricKey| k.db.len() + k.namespace.len() + k.metric.len();
        self.body.len() + self.sources.iter().map(|s| s.replica.len() + key_len(&s.shard.metric) + 48).sum::<usize>()
    }

    /// The version of `shard`'s copy on `replica` that this answer read, if it read that copy.
    pub fn version_of(&self, shard: &ShardId, replica: &str) -> Option<ShardVersion> {
        let i = self.sources.binary_search_by(|s| s.shard.cmp(shard)).ok()?;
        (self.sources[i].replica == replica).then_some(self.sources[i].version)
    }
}

/// The kept answers, least recently used out first, within a byte budget.
pub struct AnswerCache {
    entries: lru::LruCache<AnswerKey, Arc<CachedAnswer>>,
    bytes: usize,
    max_bytes: usize,
}

impl AnswerCache {
    pub fn new(max_bytes: usize) -> Self {
        AnswerCache { entries: lru::LruCache::unbounded(), bytes: 0, max_bytes }
    }

    pub fn get(&mut self, key: &AnswerKey) -> Option<Arc<CachedAnswer>> {
        self.entries.get(key).cloned()
    }

    /// Keeps `answer` unless it would take more than half the budget. A panel over many
    /// series is asked again and again however big its answer (per minute by host over 20,000
    /// hosts: 180,000 records, 26 MB, which an eighth of the default budget turned away); an
    /// answer above half would push out everything else, and that is rather an export.
    pub fn put(&mut self, key: AnswerKey, answer: CachedAnswer) {
        let size = key.bytes() + answer.bytes();
        if size > self.max_bytes / 2 {
            self.remove(&key);
            return;
        }
        if let Some(old) = self.entries.put(key.clone(), Arc::new(answer)) {
            self.bytes -= key.bytes() + old.bytes();
        }
        self.bytes += size;
        while self.bytes > self.max_bytes {
            let Some((k, v)) = self.entries.pop_lru() else { break };
            self.bytes -= k.bytes() + v.bytes();
        }
    }

    pub fn remove(&mut self, key: &AnswerKey) {
        if let Some(old) = self.entries.pop(key) {
            self.bytes -= key.bytes() + old.bytes();
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: i64) -> AnswerKey {
        let plan = match crate::query::plan::parse("SELECT count(*) FROM m", 0).unwrap() {
            crate::query::plan::Statement::Select(p) => p,
            _ => unreachable!(),
        };
        AnswerKey::new(&MetricKey::new("db", "ns", "m").unwrap(), &plan, (0, n), 0)
    }

    fn answer(body_len: usize) -> CachedAnswer {
        let shard = ShardId { metric: MetricKey::new("db", "ns", "m").unwrap(), start: 0 };
        let version = ShardVersion { generation: 1, state: 7 };
        CachedAnswer {
            sources: vec![Source { shard, replica: "a".into(), version }],
            body: vec![b'x'; body_len].into(),
        }
    }

    #[test]
    fn stays_within_its_budget_and_drops_the_least_recently_used() {
        let mut cache = AnswerCache::new(10_000);
        for n in 0..20 {
            cache.put(key(n), answer(1_000));
            assert!(cache.bytes() <= 10_000, "{} bytes kept", cache.bytes());
            cache.get(&key(0)); // kept in use: never the one dropped
        }
        assert!(cache.get(&key(0)).is_some());
        assert!(cache.get(&key(1)).is_none(), "the least recently used went first");
        assert!(cache.get(&key(19)).is_some());
        // Too big for the budget: not kept, and it replaces nothing.
        cache.put(key(19), answer(5_000)); // with its key, above half the budget
        assert!(cache.get(&key(19)).is_none());
        let kept = cache.bytes();
        cache.remove(&key(0));
        assert!(cache.bytes() < kept);
    }

    #[test]
    fn a_version_is_only_that_replica_s() {
        let a = answer(10);
        let shard = a.sources[0].shard.clone();
        assert_eq!(a.version_of(&shard, "a"), Some(ShardVersion { generation: 1, state: 7 }));
        assert_eq!(a.version_of(&shard, "b"), None, "another replica's copy is another copy");
        let other = ShardId { start: 3_600_000, ..shard };
        assert_eq!(a.version_of(&other, "a"), None);
    }
}
