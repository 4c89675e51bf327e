//! Placement: which storage nodes hold a new shard's replicas. A pure function of the live
//! members, their capacities, the selector, the replication factor and the replicas a shard
//! already has, so that nodes with the same view choose the same replicas. Ranking is by the
//! selected free capacity (rounded to hundredths, so noise does not reorder nodes), ties broken
//! by a hash of (shard, node) that spreads shards evenly over equal nodes.

use crate::capacity::Capacity;
use crate::config::Selector;
use crate::model::ShardId;
use std::collections::BTreeSet;

#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub storage: bool,
    pub capacity: Option<Capacity>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("replication factor {rf} needs {rf} live storage nodes but only {available} are alive")]
    NotEnoughStorageNodes { rf: usize, available: usize },
}

fn tie_break(shard: &ShardId, node: &str) -> u64 {
    let text = format!("{shard}/{node}");
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The replicas `shard` should have: the existing live storage replicas first, then the best
/// ranked other storage nodes, `rf` in all.
pub fn place(
    shard: &ShardId,
    candidates: &[Candidate],
    selector: Selector,
    rf: usize,
    existing: &BTreeSet<String>,
) -> Result<Vec<String>, PlacementError> {
    let storage: Vec<&Candidate> = candidates.iter().filter(|c| c.storage).collect();
    if storage.len() < rf {
        return Err(PlacementError::NotEnoughStorageNodes { rf, available: storage.len() });
    }
    let mut chosen: Vec<String> =
        storage.iter().filter(|c| existing.contains(&c.id)).map(|c| c.id.clone()).take(rf).collect();
    let mut rest: Vec<(i64, u64, &str)> = storage
        .iter()
        .filter(|c| !existing.contains(&c.id))
        .map(|c| {
            let free = c.capacity.map_or(0.0, |cap| cap.get(selector));
            (-((free * 100.0).round() as i64), tie_break(shard, &c.id), c.id.as_str())
        })
        .collect();
    rest.sort();
    chosen.extend(rest.into_iter().take(rf - chosen.len()).map(|(_, _, id)| id.to_string()));
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MetricKey;

    fn shard(start: i64) -> ShardId {
        ShardId { metric: MetricKey::new("d", "n", "m").unwrap(), start }
    }

    fn node(id: &str, disk: f64, storage: bool) -> Candidate {
        Candidate { id: id.into(), storage, capacity: Some(Capacity::new(0.5, 0.5, 0.5, disk)) }
    }

    #[test]
    fn ranks_by_selected_capacity() {
        let nodes = [node("a", 0.2, true), node("b", 0.9, true), node("c", 0.5, true)];
        assert_eq!(place(&shard(0), &nodes, Selector::Disk, 2, &BTreeSet::new()).unwrap(), ["b", "c"]);
        // With heap equal everywhere, the choice falls to the tie-break, not to disk.
        let by_heap = place(&shard(0), &nodes, Selector::Heap, 3, &BTreeSet::new()).unwrap();
        assert_eq!(by_heap.len(), 3);
    }

    #[test]
    fn tie_break_is_stable_and_spreads_shards() {
        let nodes: Vec<Candidate> = (0..4).map(|i| node(&format!("n{i}"), 0.5, true)).collect();
        let mut firsts = BTreeSet::new();
        for start in 0..40 {
            let a = place(&shard(start), &nodes, Selector::Disk, 2, &BTreeSet::new()).unwrap();
            let mut reversed = nodes.clone();
            reversed.reverse();
            let b = place(&shard(start), &reversed, Selector::Disk, 2, &BTreeSet::new()).unwrap();
            assert_eq!(a, b, "the input order must not matter");
            firsts.insert(a[0].clone());
        }
        assert_eq!(firsts.len(), 4, "equal nodes share the shards");
    }

    #[test]
    fn never_a_non_storage_node_and_keeps_existing_replicas() {
        let nodes = [node("q", 1.0, false), node("a", 0.1, true), node("b", 0.2, true), node("c", 0.9, true)];
        let chosen = place(&shard(0), &nodes, Selector::Disk, 3, &BTreeSet::new()).unwrap();
        assert!(!chosen.contains(&"q".to_string()));
        let existing: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(place(&shard(0), &nodes, Selector::Disk, 2, &existing).unwrap(), ["a", "c"]);
    }

    #[test]
    fn rf_larger_than_storage_nodes_is_an_error_that_says_so() {
        let nodes = [node("q", 1.0, false), node("a", 0.1, true)];
        let err = place(&shard(0), &nodes, Selector::Disk, 2, &BTreeSet::new()).unwrap_err();
        assert_eq!(err, PlacementError::NotEnoughStorageNodes { rf: 2, available: 1 });
        assert!(err.to_string().contains("only 1 are alive"));
    }
}
