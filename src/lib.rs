//! berth: a replicated, highly available OCI registry.
//!
//! Layers, bottom up: [`oci`] (the spec as types), [`meta`] (the Raft-replicated
//! metadata on RocksDB), [`blob`] (content-addressed files and uploads),
//! [`cluster`] (the Raft node and its gRPC transport), [`api`] (the HTTP V2
//! API), and [`node`], which wires one node together.

// openraft and tonic fix the error types of the storage and RPC traits; they
// are large by design and boxing them would only add allocations.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod blob;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod durable;
pub mod meta;
pub mod node;
pub mod notify;
pub mod oci;
pub mod policy;
pub mod rewind;

use std::fmt;

use serde::{Deserialize, Serialize};

pub type NodeId = u64;

/// This node's wall clock in ms since the Unix epoch: the time writes are
/// stamped with (links, push times, events) and schedules are kept by.
pub fn clock_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// What the cluster knows about a member: where to reach it and where it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// HTTP API address (for operators and clients; members reach each
    /// other, forwarded uploads included, on `grpc`).
    pub api: String,
    /// gRPC address for Raft and blob transfer.
    pub grpc: String,
    #[serde(default)]
    pub region: String,
    /// The member's data dir (see `meta::StoredIdentity`): messages meant
    /// for it are refused by any other data dir started under its id.
    #[serde(default)]
    pub incarnation: u64,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "api={} grpc={} region={} incarnation={:016x}", self.api, self.grpc, self.region, self.incarnation)
    }
}

openraft::declare_raft_types!(
    /// The Raft type configuration: entries are batches of [`meta::Command`]; a
    /// snapshot is a checkpoint of the database, streamed when sent and spooled
    /// to a file when received, so a large state never has to fit in memory.
    pub TypeConfig:
        D = meta::Batch,
        R = meta::Outcomes,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = meta::SnapshotData,
        AsyncRuntime = cluster::BerthRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
