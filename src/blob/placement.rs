//! Placement: which nodes should hold a blob. Rendezvous hashing over the
//! members, so every node computes the same answer and a membership change
//! moves only the blobs it must; with regions, copies spread across regions
//! before any region gets a second one.

use sha2::{Digest as _, Sha256};

use crate::oci::Digest;
use crate::NodeId;

/// A candidate holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: NodeId,
    pub region: String,
}

fn score(digest: &Digest, id: NodeId) -> u64 {
    let mut h = Sha256::new();
    h.update(digest.hex().as_bytes());
    h.update(id.to_be_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// All candidates in placement order: the first `n` are the blob's targets.
pub fn rank(digest: &Digest, candidates: &[Candidate]) -> Vec<Candidate> {
    let mut by_score: Vec<Candidate> = candidates.to_vec();
    by_score.sort_by_key(|c| std::cmp::Reverse(score(digest, c.id)));
    // First the best candidate of each region, then everyone else.
    let mut seen = std::collections::BTreeSet::new();
    let (firsts, rest): (Vec<_>, Vec<_>) = by_score.into_iter().partition(|c| seen.insert(c.region.clone()));
    firsts.into_iter().chain(rest).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, r: &str) -> Candidate {
        Candidate { id, region: r.into() }
    }

    #[test]
    fn stable_and_region_spread() {
        let d: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let nodes = [c(1, "a"), c(2, "a"), c(3, "b"), c(4, "a")];
        let r1 = rank(&d, &nodes);
        assert_eq!(r1, rank(&d, &nodes), "deterministic");
        let first_two: std::collections::BTreeSet<_> = r1[..2].iter().map(|c| c.region.clone()).collect();
        assert_eq!(first_two.len(), 2, "both regions before a second copy in one");
        // Removing a node that is not a target keeps the targets.
        let top = r1[0].id;
        let fewer: Vec<_> = nodes.iter().filter(|n| n.id != r1[3].id).cloned().collect();
        assert_eq!(rank(&d, &fewer)[0].id, top);
    }
}
