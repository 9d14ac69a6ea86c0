//! Linearizability of one register (one tag) by the Wing & Gong search
//! with Lowe's memoization, as Knossos and Porcupine do it.
//!
//! Operations whose outcome is unknown (the client gave up, or the server
//! said it could not tell) are writes that may take effect at any point
//! after their invocation, or never: they get an infinite return time, so
//! the search may place them last, which is the same as never. A read with
//! an unknown outcome observed nothing and is left out.

use std::collections::HashSet;

/// One operation on the register, with its real-time window.
#[derive(Debug, Clone, PartialEq)]
pub struct RegOp {
    pub call: f64,
    /// `f64::INFINITY` when the outcome is unknown.
    pub ret: f64,
    pub kind: RegKind,
    /// Index into the caller's history, to report a violation.
    pub id: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegKind {
    /// A write of a value, or (None) a delete.
    Write(Option<u64>),
    /// What the read returned (None: the tag did not exist).
    Read(Option<u64>),
}

type State = Option<u64>;

fn step(state: State, kind: RegKind) -> Option<State> {
    match kind {
        RegKind::Write(v) => Some(v),
        RegKind::Read(seen) => (seen == state).then_some(state),
    }
}

/// A history with no linearization; `op` is the caller's id of the first
/// operation whose completion no ordering could explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotLinearizable {
    pub op: usize,
}

/// Leave out what cannot constrain the search: unknown writes whose value
/// nobody read (placing them last is always possible, so dropping them
/// changes nothing), which also keeps the search from branching on every
/// timed-out write of a long partition.
pub fn prune(ops: Vec<RegOp>) -> Vec<RegOp> {
    let read: HashSet<Option<u64>> = ops
        .iter()
        .filter_map(|o| match o.kind {
            RegKind::Read(v) => Some(v),
            _ => None,
        })
        .collect();
    ops.into_iter().filter(|o| o.ret.is_finite() || matches!(o.kind, RegKind::Write(v) if read.contains(&v))).collect()
}

const NIL: usize = usize::MAX;

/// Check that `ops`, starting from an absent tag, is linearizable.
pub fn check(ops: &[RegOp]) -> Result<(), NotLinearizable> {
    let n = ops.len();
    if n == 0 {
        return Ok(());
    }
    // Events: 2i is the call of op i, 2i+1 its return. Calls sort before
    // returns at the same instant (those operations count as concurrent).
    let mut events: Vec<usize> = (0..2 * n).collect();
    let time = |e: usize| if e.is_multiple_of(2) { ops[e / 2].call } else { ops[e / 2].ret };
    events.sort_by(|a, b| time(*a).total_cmp(&time(*b)).then((a % 2).cmp(&(b % 2))));
    // A doubly linked list over the events, with a head sentinel at 2n.
    let head = 2 * n;
    let mut next = vec![NIL; 2 * n + 1];
    let mut prev = vec![NIL; 2 * n + 1];
    let mut last = head;
    for &e in &events {
        next[last] = e;
        prev[e] = last;
        last = e;
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, nx) = (prev[e], next[e]);
        next[p] = nx;
        if nx != NIL {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, nx) = (prev[e], next[e]);
        next[p] = e;
        if nx != NIL {
            prev[nx] = e;
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut entry = next[head];
    // The latest return the search got stuck on: the operation no order
    // could explain once everything before it was.
    let mut stuck = entry;
    while next[head] != NIL {
        if entry.is_multiple_of(2) {
            let i = entry / 2;
            if let Some(new) = step(state, ops[i].kind) {
                let mut lin = linearized.clone();
                lin[i / 64] |= 1 << (i % 64);
                if cache.insert((lin.clone(), new)) {
                    stack.push((entry, state));
                    state = new;
                    linearized = lin;
                    // Lift the call and its return out of the list.
                    unlink(&mut next, &mut prev, entry + 1);
                    unlink(&mut next, &mut prev, entry);
                    entry = next[head];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // A return whose call is not linearized yet: backtrack.
            if time(entry) >= time(stuck) {
                stuck = entry;
            }
            let Some((call, before)) = stack.pop() else {
                return Err(NotLinearizable { op: ops[stuck / 2].id });
            };
            let i = call / 2;
            linearized[i / 64] &= !(1 << (i % 64));
            state = before;
            relink(&mut next, &mut prev, call);
            relink(&mut next, &mut prev, call + 1);
            entry = next[call];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: usize, call: f64, ret: f64, v: u64) -> RegOp {
        RegOp { call, ret, kind: RegKind::Write(Some(v)), id }
    }
    fn r(id: usize, call: f64, ret: f64, v: Option<u64>) -> RegOp {
        RegOp { call, ret, kind: RegKind::Read(v), id }
    }

    #[test]
    fn sequential_history_passes() {
        assert!(check(&[r(0, 0., 1., None), w(1, 2., 3., 1), r(2, 4., 5., Some(1))]).is_ok());
    }

    #[test]
    fn a_read_concurrent_with_a_write_may_see_either_value() {
        let h =
            [w(0, 0., 1., 1), w(1, 2., 6., 2), r(2, 3., 4., Some(1)), r(3, 3.5, 5., Some(2)), r(4, 7., 8., Some(2))];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn reads_that_go_back_in_time_fail() {
        // Both reads overlap the write, but once 2 was read, 1 cannot be.
        let h = [w(0, 0., 1., 1), w(1, 2., 9., 2), r(2, 3., 4., Some(2)), r(3, 5., 6., Some(1))];
        assert_eq!(check(&h), Err(NotLinearizable { op: 3 }));
    }
}
