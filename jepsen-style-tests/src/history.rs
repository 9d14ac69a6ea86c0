//! The recorded history: every operation a client attempted, when it was
//! invoked and when (if ever) it completed, where it went, and how it ended.

use serde::{Deserialize, Serialize};

/// How an operation ended, from the client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Acknowledged: it took effect.
    Ok,
    /// Refused: it definitely did not take effect.
    Fail,
    /// Timed out or answered with a server error: it may or may not have
    /// taken effect, now or later.
    Unknown,
}

/// What the operation was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "f")]
pub enum Op {
    /// Tag `key` to the manifest carrying `value` (register workload).
    Write { key: String, value: u64 },
    /// Read the tag `key`; `value` is what was seen (None: no such tag).
    Read { key: String, value: Option<u64> },
    /// Delete the tag `key` (register workload): afterwards it is absent,
    /// whether it existed (202) or not (404, answered through Raft too).
    Delete { key: String },
    /// Add tag `key` (set workload).
    Add { key: String },
    /// Push an image (blobs, then the manifest tagged `key`).
    Push { key: String, manifest: String, blobs: Vec<String> },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Write { key, .. }
            | Op::Read { key, .. }
            | Op::Delete { key }
            | Op::Add { key }
            | Op::Push { key, .. } => key,
        }
    }
}

/// One completed (or abandoned) operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// The client process that ran it (one operation at a time each).
    pub process: usize,
    /// Where it was sent: "node1".."node4" or "lb".
    pub target: String,
    #[serde(flatten)]
    pub op: Op,
    /// Milliseconds since the start of the run.
    pub invoke_ms: f64,
    /// None when the client gave up waiting (the outcome is then Unknown).
    pub complete_ms: Option<f64>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// A fault as it was injected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultWindow {
    pub kind: String,
    pub detail: String,
    pub start_ms: f64,
    pub end_ms: f64,
}

/// Everything a run recorded; written as JSON for later analysis.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub seed: u64,
    pub events: Vec<Event>,
    pub faults: Vec<FaultWindow>,
}

/// How a read that answered 200 with a body no client wrote (or no JSON)
/// is marked in its event's error: the checker counts it as a violation,
/// never as a mere failure.
pub const UNPARSEABLE: &str = "unparseable";
