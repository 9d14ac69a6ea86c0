//! The checkers: linearizability per tag for the register workload, and
//! the set and no-lost-push properties against what the nodes hold after
//! the faults are healed. Each returns the violations it found.

pub mod register;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::history::{Event, Op, Outcome};
use register::{RegKind, RegOp};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub workload: &'static str,
    pub key: String,
    pub what: String,
}

/// Every register key's history must be linearizable. Histories are
/// checked per tag (tags are independent registers), which keeps each
/// search small.
pub fn check_register(events: &[Event]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<RegOp>> = BTreeMap::new();
    for (id, e) in events.iter().enumerate() {
        let kind = match (&e.op, e.outcome) {
            (Op::Write { .. }, Outcome::Fail) => continue,
            (Op::Write { value, .. }, _) => RegKind::Write(Some(*value)),
            (Op::Delete { .. }, Outcome::Fail) => continue,
            (Op::Delete { .. }, _) => RegKind::Write(None),
            (Op::Read { value, .. }, Outcome::Ok) => RegKind::Read(*value),
            _ => continue,
        };
        let ret = match (e.outcome, e.complete_ms) {
            (Outcome::Ok, Some(t)) => t,
            _ => f64::INFINITY,
        };
        by_key.entry(e.op.key()).or_default().push(RegOp { call: e.invoke_ms, ret, kind, id });
    }
    // A 200 whose body is not a manifest some client wrote is wrong
    // whatever the order: it is never dropped as a mere failure.
    let mut out: Vec<Violation> = events
        .iter()
        .filter(|e| matches!(e.op, Op::Read { .. }))
        .filter(|e| e.error.as_deref().is_some_and(|m| m.starts_with(crate::history::UNPARSEABLE)))
        .map(|e| Violation {
            workload: "register",
            key: e.op.key().to_owned(),
            what: format!(
                "unparseable read by process {} via {} at {:.3}s: {}",
                e.process,
                e.target,
                e.invoke_ms / 1000.0,
                e.error.as_deref().unwrap_or_default()
            ),
        })
        .collect();
    for (key, ops) in by_key {
        if let Err(bad) = register::check(&register::prune(ops)) {
            let e = &events[bad.op];
            out.push(Violation {
                workload: "register",
                key: key.to_owned(),
                what: format!(
                    "not linearizable: no order explains {:?} by process {} via {} at {:.3}s",
                    e.op,
                    e.process,
                    e.target,
                    e.invoke_ms / 1000.0
                ),
            });
        }
    }
    out
}

/// Every acknowledged add is listed by every node; nothing is listed that
/// was never attempted, or that was definitely refused.
pub fn check_set(events: &[Event], listed: &BTreeMap<String, Vec<String>>) -> Vec<Violation> {
    let mut outcome: HashMap<&str, Outcome> = HashMap::new();
    for e in events {
        if let Op::Add { key } = &e.op {
            outcome.insert(key, e.outcome);
        }
    }
    let mut out = Vec::new();
    for (node, tags) in listed {
        let have: HashSet<&str> = tags.iter().map(String::as_str).collect();
        for (key, o) in &outcome {
            if *o == Outcome::Ok && !have.contains(key) {
                out.push(v("set", key, format!("acknowledged add is missing on {node}")));
            }
        }
        for t in tags {
            match outcome.get(t.as_str()) {
                None => out.push(v("set", t, format!("{node} lists a tag that was never written"))),
                Some(Outcome::Fail) => out.push(v("set", t, format!("{node} lists a tag whose add was refused"))),
                _ => {}
            }
        }
    }
    out
}

/// What one node answered for one acknowledged push after the heal.
#[derive(Debug, Clone)]
pub struct PushSeen {
    pub node: String,
    pub key: String,
    /// The manifest digest the tag resolved to (None: not found).
    pub manifest: Option<String>,
    /// Blobs that were missing or whose bytes did not hash to their digest.
    pub bad_blobs: Vec<String>,
}

/// Every acknowledged push is served whole, byte for byte, by every node.
pub fn check_pushes(events: &[Event], seen: &[PushSeen]) -> Vec<Violation> {
    let acked: HashMap<&str, &str> = events
        .iter()
        .filter(|e| e.outcome == Outcome::Ok)
        .filter_map(|e| match &e.op {
            Op::Push { key, manifest, .. } => Some((key.as_str(), manifest.as_str())),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for s in seen {
        let Some(want) = acked.get(s.key.as_str()) else { continue };
        if s.manifest.as_deref() != Some(*want) {
            out.push(v("no-lost-push", &s.key, format!("{} resolves it to {:?}, not {want}", s.node, s.manifest)));
        }
        for b in &s.bad_blobs {
            out.push(v("no-lost-push", &s.key, format!("{} does not serve blob {b} intact", s.node)));
        }
    }
    for key in acked.keys() {
        if !seen.iter().any(|s| s.key == *key) {
            out.push(v("no-lost-push", key, "acknowledged push was not checked".into()));
        }
    }
    out
}

fn v(workload: &'static str, key: &str, what: String) -> Violation {
    Violation { workload, key: key.to_owned(), what }
}
