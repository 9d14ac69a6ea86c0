//! This node's identity at run time, and the checks every internal message
//! passes.
//!
//! - Every gRPC call a member makes carries its cluster id in the
//!   `berth-cluster` metadata ([`Stamp`]); a node refuses a call from
//!   another cluster ([`check_cluster`]).
//! - Every Raft message also names the incarnation the sender's membership
//!   records for the receiver. A node whose data dir is newer than that
//!   (wiped, replaced) refuses it: it neither votes nor takes entries as the
//!   member it was, and says what the operator does next
//!   ([`Identity::admit_raft`]).
//! - A node takes on a cluster id only from a Raft message that names its
//!   own incarnation: proof that the cluster added this very data dir.

use std::sync::{Arc, Mutex};

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::meta::{IdentityStore, StoredIdentity};
use crate::NodeId;

/// The metadata key of the sender's cluster id (16 hex digits).
pub const CLUSTER_HEADER: &str = "berth-cluster";

/// A handle on this node's identity. Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    store: Option<IdentityStore>,
    state: Mutex<State>,
}

struct State {
    stored: StoredIdentity,
    /// Why this node is refusing to act as its member id, if it is.
    problem: Option<String>,
}

impl Identity {
    pub fn new(store: IdentityStore, stored: StoredIdentity) -> Identity {
        Identity { inner: Arc::new(Inner { store: Some(store), state: Mutex::new(State { stored, problem: None }) }) }
    }

    /// The identity of a client that is not a member (the command line):
    /// no cluster id, so its calls carry none.
    pub fn outsider() -> Identity {
        let stored = StoredIdentity { node: 0, incarnation: 0, cluster: None };
        Identity { inner: Arc::new(Inner { store: None, state: Mutex::new(State { stored, problem: None }) }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn node(&self) -> NodeId {
        self.state().stored.node
    }

    pub fn incarnation(&self) -> u64 {
        self.state().stored.incarnation
    }

    pub fn cluster(&self) -> Option<u64> {
        self.state().stored.cluster
    }

    /// The cluster id as calls carry it and `cluster status` shows it (16
    /// hex digits), empty if this node belongs to none yet.
    pub fn cluster_label(&self) -> String {
        self.cluster().map(|c| format!("{c:016x}")).unwrap_or_default()
    }

    /// Belong to the cluster this node is about to initialize: a new
    /// cluster id, or the one recorded by an initialization a crash cut
    /// short.
    pub fn found_cluster(&self) -> Result<(), Status> {
        self.adopt(self.cluster().unwrap_or_else(|| rand::random::<u64>().max(1)))
    }

    /// Why this node refuses to act as its member id, if it does.
    pub fn problem(&self) -> Option<String> {
        self.state().problem.clone()
    }

    /// Record (and log once) why this node refuses to act as its member id.
    pub fn refuse(&self, why: String) {
        let mut st = self.state();
        if st.problem.as_deref() != Some(why.as_str()) {
            tracing::error!("{why}");
            st.problem = Some(why);
        }
    }

    /// Belong to `cluster` from now on (durably), if this node belongs to
    /// none yet; an error if it belongs to another.
    pub fn adopt(&self, cluster: u64) -> Result<(), Status> {
        let mut st = self.state();
        if st.stored.cluster == Some(cluster) {
            return Ok(());
        }
        let store = self.inner.store.as_ref().ok_or_else(|| Status::internal("not a member"))?;
        st.stored = store.set_cluster(&st.stored, cluster).map_err(|e| Status::permission_denied(e.to_string()))?;
        tracing::info!(cluster = %format!("{cluster:016x}"), "this node now belongs to the cluster");
        Ok(())
    }

    /// Whether a Raft message naming `to_incarnation` for this node, from
    /// cluster `from`, may be handled. A node with a newer data dir than the
    /// sender expects refuses, and says what the operator does next.
    ///
    /// `member_here`: this node's own Raft state already lists it under its
    /// current incarnation (it was initialized with it, or replaced and
    /// caught up). Such a node is the member; a message naming another
    /// incarnation is then only stale (a lagging peer's view from before a
    /// replace) and is refused without marking this node as refusing:
    /// otherwise one stray vote request would stop a healthy leader serving.
    pub fn admit_raft(&self, from: Option<u64>, to_incarnation: u64, member_here: bool) -> Result<(), Status> {
        let Some(from) = from else {
            return Err(Status::permission_denied("a Raft message without a cluster id"));
        };
        let (node, mine) = {
            let st = self.state();
            (st.stored.node, st.stored.incarnation)
        };
        if to_incarnation != mine && member_here {
            return Err(Status::failed_precondition(format!(
                "a message for an earlier data dir of node {node} (incarnation {to_incarnation:016x}; this one is \
                 {mine:016x}, as the membership here records)"
            )));
        }
        if to_incarnation != mine {
            let why = format!(
                "node {node}'s data dir is not the one cluster {from:016x} knows as node {node} \
                 (incarnation {mine:016x} here, {to_incarnation:016x} there): it was wiped or replaced, \
                 so this node will not vote, replicate or serve as node {node}. To bring it back as a \
                 fresh copy of node {node}, run `berth cluster replace --node <a member's grpc address> --id {node}`"
            );
            self.refuse(why.clone());
            return Err(Status::failed_precondition(why));
        }
        self.adopt(from)?;
        self.state().problem = None;
        Ok(())
    }
}

/// The cluster id a call carries, if any.
pub fn cluster_of(meta: &MetadataMap) -> Result<Option<u64>, Status> {
    let Some(v) = meta.get(CLUSTER_HEADER) else { return Ok(None) };
    let parsed = v.to_str().ok().and_then(|s| u64::from_str_radix(s, 16).ok());
    parsed.map(Some).ok_or_else(|| Status::invalid_argument("malformed cluster id"))
}

/// Server side, for every service: refuse a call from another cluster.
/// Calls with no cluster id (the operator's command line, a node that has
/// joined nothing yet asking who is there) pass; Raft messages are checked
/// further by [`Identity::admit_raft`].
pub fn check_cluster(identity: &Identity, meta: &MetadataMap) -> Result<(), Status> {
    match (cluster_of(meta)?, identity.cluster()) {
        (Some(theirs), Some(mine)) if theirs != mine => Err(Status::permission_denied(format!(
            "this node belongs to cluster {mine:016x}, the caller to {theirs:016x}"
        ))),
        _ => Ok(()),
    }
}

/// Client side: stamps every call with this node's cluster id.
#[derive(Clone)]
pub struct Stamp(pub Identity);

impl tonic::service::Interceptor for Stamp {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let label = self.0.cluster_label();
        if !label.is_empty() {
            let v = label.parse().map_err(|_| Status::internal("cluster id header"))?;
            req.metadata_mut().insert(CLUSTER_HEADER, v);
        }
        Ok(req)
    }
}

/// Server side: the [`check_cluster`] interceptor.
#[derive(Clone)]
pub struct Guard(pub Identity);

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        check_cluster(&self.0, req.metadata())?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dir: &std::path::Path) -> Identity {
        let store = IdentityStore::new(crate::meta::open_db(&dir.join("db")).unwrap());
        let stored = store.load_or_create(3).unwrap();
        Identity::new(store, stored)
    }

    /// A stale message (naming the data dir a replace retired) is refused
    /// either way, but marks the node as refusing only if its own Raft
    /// state does not list it as the member: a healthy leader must not
    /// stop serving because a lagging peer asked it for a vote.
    #[test]
    fn a_stale_message_never_stops_a_member_that_knows_itself() {
        let dir = tempfile::tempdir().unwrap();
        let me = identity(dir.path());
        let old = me.incarnation() ^ 1;
        assert!(me.admit_raft(Some(7), me.incarnation(), true).is_ok());
        assert!(me.admit_raft(Some(7), old, true).is_err());
        assert_eq!(me.problem(), None, "a member marked itself refusing for a stale message");
        assert!(me.admit_raft(Some(7), old, false).is_err());
        assert!(me.problem().is_some(), "a wiped node did not say why it refuses");
        assert!(me.admit_raft(Some(7), me.incarnation(), false).is_ok());
        assert_eq!(me.problem(), None);
    }
}
