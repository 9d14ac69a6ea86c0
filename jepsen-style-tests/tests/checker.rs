//! The checkers on hand-made histories: each kind of broken promise must be
//! flagged, and valid concurrent histories (with timeouts) must pass.

use std::collections::BTreeMap;

use berth_jepsen::checker::{check_pushes, check_register, check_set, PushSeen};
use berth_jepsen::history::{Event, Op, Outcome, UNPARSEABLE};

fn ev(process: usize, op: Op, invoke: f64, complete: Option<f64>, outcome: Outcome) -> Event {
    Event { process, target: "node1".into(), op, invoke_ms: invoke, complete_ms: complete, outcome, error: None }
}
fn write(p: usize, v: u64, t0: f64, t1: f64) -> Event {
    ev(p, Op::Write { key: "t".into(), value: v }, t0, Some(t1), Outcome::Ok)
}
fn read(p: usize, v: Option<u64>, t0: f64, t1: f64) -> Event {
    ev(p, Op::Read { key: "t".into(), value: v }, t0, Some(t1), Outcome::Ok)
}
fn timed_out_write(p: usize, v: u64, t0: f64) -> Event {
    ev(p, Op::Write { key: "t".into(), value: v }, t0, None, Outcome::Unknown)
}

#[test]
fn valid_concurrent_history_passes() {
    let h = vec![
        read(0, None, 0., 1.),
        write(1, 1, 2., 10.),
        read(2, None, 3., 4.), // before the write took effect
        read(3, Some(1), 5., 6.),
        write(0, 2, 7., 12.),
        read(2, Some(1), 8., 9.),
        read(3, Some(2), 11., 13.),
        read(2, Some(2), 14., 15.),
    ];
    assert_eq!(check_register(&h), vec![]);
}

#[test]
fn timed_out_writes_may_or_may_not_take_effect() {
    // 5 was never seen: fine. 6 shows up long after its client gave up: fine.
    let h = vec![
        write(0, 1, 0., 1.),
        timed_out_write(1, 5, 2.),
        timed_out_write(2, 6, 3.),
        read(0, Some(1), 4., 5.),
        read(0, Some(6), 100., 101.),
        read(3, Some(6), 102., 103.),
    ];
    assert_eq!(check_register(&h), vec![]);
}

fn delete(p: usize, t0: f64, t1: f64) -> Event {
    ev(p, Op::Delete { key: "t".into() }, t0, Some(t1), Outcome::Ok)
}

#[test]
fn deletes_are_register_writes_of_absence() {
    // Read absent after an acknowledged delete; a concurrent read may see
    // either; a timed-out delete may land late.
    let ok = vec![
        write(0, 1, 0., 1.),
        delete(1, 2., 5.),
        read(2, Some(1), 3., 4.),
        read(2, None, 6., 7.),
        write(0, 2, 8., 9.),
        ev(1, Op::Delete { key: "t".into() }, 10., None, Outcome::Unknown),
        read(2, Some(2), 11., 12.),
        read(2, None, 50., 51.),
    ];
    assert_eq!(check_register(&ok), vec![]);
    // A value read back after its delete was acknowledged (and nothing
    // wrote it again) is a lost delete.
    let lost = vec![write(0, 1, 0., 1.), delete(1, 2., 3.), read(2, Some(1), 4., 5.)];
    let v = check_register(&lost);
    assert_eq!(v.len(), 1, "{v:?}");
    // A refused delete changed nothing.
    let refused = vec![
        write(0, 1, 0., 1.),
        ev(1, Op::Delete { key: "t".into() }, 2., Some(3.), Outcome::Fail),
        read(2, Some(1), 4., 5.),
    ];
    assert_eq!(check_register(&refused), vec![]);
}

#[test]
fn a_stale_read_is_flagged() {
    // 2 was acknowledged before the read began, yet the read saw 1.
    let h = vec![write(0, 1, 0., 1.), write(0, 2, 2., 3.), read(1, Some(1), 4., 5.)];
    let v = check_register(&h);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].workload, "register");
}

#[test]
fn an_unparseable_read_is_a_violation_not_a_failure() {
    // A 200 whose body no client wrote: counted, never dropped.
    let mut bad = ev(1, Op::Read { key: "t".into(), value: None }, 2., Some(3.), Outcome::Fail);
    bad.error = Some(format!("{UNPARSEABLE}: a manifest no client wrote: {{}}"));
    let v = check_register(&[write(0, 1, 0., 1.), bad]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].what.contains("unparseable"), "{v:?}");
    // A refused read (a 503) is only a failure.
    let mut refused = ev(1, Op::Read { key: "t".into(), value: None }, 2., Some(3.), Outcome::Fail);
    refused.error = Some("503 Service Unavailable".into());
    assert_eq!(check_register(&[write(0, 1, 0., 1.), refused]), vec![]);
}

#[test]
fn a_lost_write_is_flagged() {
    // An acknowledged write, and then the tag is gone.
    let h = vec![write(0, 1, 0., 1.), read(1, Some(1), 2., 3.), read(1, None, 4., 5.)];
    assert_eq!(check_register(&h).len(), 1);
}

#[test]
fn a_duplicated_effect_is_flagged() {
    // 1 was overwritten by 2 and read as 2; 1 coming back means the old
    // write was applied a second time.
    let h = vec![write(0, 1, 0., 1.), write(0, 2, 2., 3.), read(1, Some(2), 4., 5.), read(1, Some(1), 6., 7.)];
    assert_eq!(check_register(&h).len(), 1);
}

#[test]
fn a_refused_write_that_takes_effect_is_flagged() {
    let h = vec![
        write(0, 1, 0., 1.),
        ev(1, Op::Write { key: "t".into(), value: 9 }, 2., Some(3.), Outcome::Fail),
        read(0, Some(9), 4., 5.),
    ];
    assert_eq!(check_register(&h).len(), 1);
}

#[test]
fn keys_are_checked_independently() {
    let mut h = vec![write(0, 1, 0., 1.), read(0, Some(1), 2., 3.)];
    h.push(ev(1, Op::Read { key: "u".into(), value: Some(1) }, 4., Some(5.), Outcome::Ok));
    let v = check_register(&h);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].key, "u");
}

#[test]
fn a_long_valid_history_passes() {
    // Six processes, overlapping operations, some timeouts: linearizable by
    // construction (each write takes effect at its midpoint).
    let mut h = Vec::new();
    let mut value = None;
    let mut next = 1u64;
    let mut effects: Vec<(f64, u64)> = Vec::new();
    for step in 0..20_000usize {
        let p = step % 6;
        let t0 = step as f64 * 10.0;
        let t1 = t0 + 35.0;
        if step % 3 == 0 {
            effects.push((t0 + 17.5, next));
            if step % 97 == 0 {
                h.push(timed_out_write(p, next, t0));
            } else {
                h.push(write(p, next, t0, t1));
            }
            next += 1;
        } else {
            // The read takes effect at its midpoint too.
            let at = t0 + 17.5;
            for (t, v) in &effects {
                if *t <= at {
                    value = Some(*v);
                }
            }
            effects.retain(|(t, _)| *t > at);
            h.push(read(p, value, t0, t1));
        }
    }
    assert_eq!(check_register(&h), vec![]);
}

#[test]
fn set_flags_lost_and_phantom_tags() {
    let add = |k: &str, o| ev(0, Op::Add { key: k.into() }, 0., Some(1.), o);
    let h = vec![add("a", Outcome::Ok), add("b", Outcome::Unknown), add("c", Outcome::Fail)];
    let ok: BTreeMap<String, Vec<String>> = [("node1".to_string(), vec!["a".to_string(), "b".to_string()])].into();
    assert_eq!(check_set(&h, &ok), vec![]);
    let lost: BTreeMap<String, Vec<String>> = [("node2".to_string(), vec!["b".to_string()])].into();
    assert_eq!(check_set(&h, &lost).len(), 1);
    let phantom: BTreeMap<String, Vec<String>> =
        [("node3".to_string(), vec!["a".to_string(), "c".to_string(), "z".to_string()])].into();
    assert_eq!(check_set(&h, &phantom).len(), 2);
}

#[test]
fn pushes_must_be_served_whole_everywhere() {
    let push = Op::Push { key: "p1".into(), manifest: "sha256:m".into(), blobs: vec!["sha256:b".into()] };
    let h = vec![ev(0, push, 0., Some(1.), Outcome::Ok)];
    let seen = |node: &str, manifest: Option<&str>, bad: &[&str]| PushSeen {
        node: node.into(),
        key: "p1".into(),
        manifest: manifest.map(Into::into),
        bad_blobs: bad.iter().map(|s| s.to_string()).collect(),
    };
    assert_eq!(check_pushes(&h, &[seen("node1", Some("sha256:m"), &[])]), vec![]);
    assert_eq!(check_pushes(&h, &[seen("node1", None, &[])]).len(), 1);
    assert_eq!(check_pushes(&h, &[seen("node2", Some("sha256:m"), &["sha256:b"])]).len(), 1);
    assert_eq!(check_pushes(&h, &[]).len(), 1, "an unchecked push is not a pass");
}
