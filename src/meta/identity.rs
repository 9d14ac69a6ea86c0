//! Who this data dir is: the node id it was created for, an incarnation
//! drawn when it was created, and the cluster it joined. Raft is safe only
//! while a node never forgets its vote and its log; a node whose data dir
//! was wiped or replaced has forgotten both, so it must not act as the
//! member it was. The incarnation is how the others tell: the membership
//! records each member's incarnation, and every Raft message names the one
//! it expects.

use std::sync::Arc;

use rocksdb::DB;
use serde::{Deserialize, Serialize};

use super::CF_RAFT;
use crate::NodeId;

const KEY_IDENTITY: &[u8] = b"identity";

/// The durable identity of a data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIdentity {
    pub node: NodeId,
    /// Random, drawn once when the data dir is created; never 0.
    pub incarnation: u64,
    /// Set when this node initializes a cluster or first accepts a message
    /// from one (with its own incarnation in it); never changes after.
    pub cluster: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this data dir belongs to node {stored}, not node {configured}: point node_id or data_dir elsewhere")]
    OtherNode { stored: NodeId, configured: NodeId },
    #[error("this node belongs to cluster {mine:016x}, not {other:016x}")]
    OtherCluster { mine: u64, other: u64 },
    #[error("identity storage: {0}")]
    Storage(String),
}

/// Reads and writes the identity record, synced (it is as vital as the vote).
#[derive(Clone)]
pub struct IdentityStore {
    db: Arc<DB>,
}

impl IdentityStore {
    pub fn new(db: Arc<DB>) -> IdentityStore {
        IdentityStore { db }
    }

    fn cf(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_RAFT).expect("raft cf")
    }

    fn put(&self, id: &StoredIdentity) -> Result<(), IdentityError> {
        let bytes = crate::codec::encode(id);
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.put_cf_opt(self.cf(), KEY_IDENTITY, bytes, &opts).map_err(|e| IdentityError::Storage(e.to_string()))
    }

    /// The data dir's identity, created (with a fresh incarnation) on the
    /// first start of a new data dir.
    pub fn load_or_create(&self, node: NodeId) -> Result<StoredIdentity, IdentityError> {
        let stored = self.db.get_cf(self.cf(), KEY_IDENTITY).map_err(|e| IdentityError::Storage(e.to_string()))?;
        if let Some(v) = stored {
            let id: StoredIdentity = crate::codec::decode(&v).map_err(|e| IdentityError::Storage(e.to_string()))?;
            if id.node != node {
                return Err(IdentityError::OtherNode { stored: id.node, configured: node });
            }
            return Ok(id);
        }
        let id = StoredIdentity { node, incarnation: rand::random::<u64>().max(1), cluster: None };
        self.put(&id)?;
        Ok(id)
    }

    /// Record the cluster this node belongs to, once.
    pub fn set_cluster(&self, current: &StoredIdentity, cluster: u64) -> Result<StoredIdentity, IdentityError> {
        match current.cluster {
            Some(mine) if mine == cluster => Ok(*current),
            Some(mine) => Err(IdentityError::OtherCluster { mine, other: cluster }),
            None => {
                let next = StoredIdentity { cluster: Some(cluster), ..*current };
                self.put(&next)?;
                Ok(next)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_survives_restarts_and_a_new_data_dir_gets_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = IdentityStore::new(super::super::open_db(&dir.path().join("db")).unwrap());
            let id = store.load_or_create(3).unwrap();
            store.set_cluster(&id, 42).unwrap()
        };
        let store = IdentityStore::new(super::super::open_db(&dir.path().join("db")).unwrap());
        assert_eq!(store.load_or_create(3).unwrap(), first);
        assert!(matches!(store.load_or_create(4), Err(IdentityError::OtherNode { stored: 3, configured: 4 })));
        assert!(matches!(store.set_cluster(&first, 43), Err(IdentityError::OtherCluster { .. })));

        let wiped = tempfile::tempdir().unwrap();
        let fresh = IdentityStore::new(super::super::open_db(&wiped.path().join("db")).unwrap());
        let again = fresh.load_or_create(3).unwrap();
        assert_ne!(again.incarnation, first.incarnation);
        assert_eq!(again.cluster, None);
    }
}
