//! What a run tells a person: a summary (operations by outcome, faults,
//! availability inside and outside fault windows, the longest write
//! outage after a leader kill, violations) and an SVG timeline.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::checker::Violation;
use crate::history::{History, Op, Outcome};

#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub attempted: usize,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
}

impl Counts {
    fn add(&mut self, o: Outcome) {
        self.attempted += 1;
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Fail => self.failed += 1,
            Outcome::Unknown => self.unknown += 1,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub duration_s: f64,
    pub ops: BTreeMap<&'static str, Counts>,
    pub faults: BTreeMap<String, usize>,
    /// Share of operations that succeeded, invoked inside / outside faults.
    pub availability_during_faults: f64,
    pub availability_outside_faults: f64,
    /// Longest time from a leader kill to the next acknowledged write
    /// invoked after it (seconds).
    pub longest_write_outage_after_leader_kill_s: Option<f64>,
    pub check_seconds: f64,
    pub violations: Vec<Violation>,
}

fn workload(op: &Op) -> &'static str {
    match op {
        Op::Write { .. } | Op::Read { .. } | Op::Delete { .. } => "register",
        Op::Add { .. } => "set",
        Op::Push { .. } => "no-lost-push",
    }
}

pub fn summarize(h: &History, duration_s: f64, violations: Vec<Violation>, check_seconds: f64) -> Summary {
    let mut ops: BTreeMap<&'static str, Counts> = BTreeMap::new();
    let (mut inside, mut outside) = (Counts::default(), Counts::default());
    for e in &h.events {
        ops.entry(workload(&e.op)).or_default().add(e.outcome);
        let during = h.faults.iter().any(|f| e.invoke_ms >= f.start_ms && e.invoke_ms <= f.end_ms);
        if during { &mut inside } else { &mut outside }.add(e.outcome);
    }
    let mut faults = BTreeMap::new();
    for f in &h.faults {
        *faults.entry(f.kind.clone()).or_insert(0) += 1;
    }
    let share = |c: &Counts| if c.attempted == 0 { 1.0 } else { c.ok as f64 / c.attempted as f64 };
    let outage = h
        .faults
        .iter()
        .filter(|f| f.kind == "kill-leader")
        .filter_map(|f| {
            h.events
                .iter()
                .filter(|e| matches!(e.op, Op::Write { .. }) && e.outcome == Outcome::Ok && e.invoke_ms >= f.start_ms)
                .filter_map(|e| e.complete_ms)
                .min_by(f64::total_cmp)
                .map(|t| (t - f.start_ms) / 1000.0)
        })
        .max_by(f64::total_cmp);
    Summary {
        seed: h.seed,
        duration_s,
        ops,
        faults,
        availability_during_faults: share(&inside),
        availability_outside_faults: share(&outside),
        longest_write_outage_after_leader_kill_s: outage,
        check_seconds,
        violations,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {}  duration {:.0} s  checked in {:.2} s", self.seed, self.duration_s, self.check_seconds)?;
        writeln!(f, "{:<14} {:>9} {:>9} {:>9} {:>9}", "workload", "attempted", "ok", "failed", "unknown")?;
        for (w, c) in &self.ops {
            writeln!(f, "{:<14} {:>9} {:>9} {:>9} {:>9}", w, c.attempted, c.ok, c.failed, c.unknown)?;
        }
        let faults: Vec<String> = self.faults.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        writeln!(f, "faults: {}", faults.join(", "))?;
        writeln!(
            f,
            "availability: {:.1}% of operations ok during faults, {:.1}% outside",
            self.availability_during_faults * 100.0,
            self.availability_outside_faults * 100.0
        )?;
        if let Some(s) = self.longest_write_outage_after_leader_kill_s {
            writeln!(f, "longest write outage after a leader kill: {s:.2} s")?;
        }
        writeln!(f, "violations: {}", self.violations.len())?;
        for v in &self.violations {
            writeln!(f, "  [{}] {}: {}", v.workload, v.key, v.what)?;
        }
        Ok(())
    }
}

/// Operations per target over time (one lane per target and process
/// group), fault windows shaded and labelled. Green: ok, red: failed,
/// orange: unknown.
pub fn timeline_svg(h: &History, duration_ms: f64) -> String {
    let mut lanes: Vec<String> = h.events.iter().map(|e| e.target.clone()).collect();
    lanes.sort();
    lanes.dedup();
    let (left, top, lane_h, width) = (70.0, 30.0, 60.0, 1400.0);
    let height = top + lane_h * lanes.len() as f64 + 30.0;
    let x = |ms: f64| left + (ms / duration_ms.max(1.0)) * (width - left - 10.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for f in &h.faults {
        let (x0, x1) = (x(f.start_ms), x(f.end_ms.max(f.start_ms + 1.0)));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="{:.1}" fill="#8888cc" fill-opacity="0.25"><title>{} {} {:.1}-{:.1}s</title></rect>"##,
            (x1 - x0).max(1.0),
            lane_h * lanes.len() as f64,
            f.kind,
            f.detail,
            f.start_ms / 1000.0,
            f.end_ms / 1000.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{x0:.1}" y="{:.1}" transform="rotate(-30 {x0:.1} {:.1})">{}</text>"#,
            top - 4.0,
            top - 4.0,
            f.kind
        );
    }
    for (i, lane) in lanes.iter().enumerate() {
        let y = top + lane_h * i as f64;
        let _ = writeln!(s, r#"<text x="4" y="{:.1}">{lane}</text>"#, y + lane_h / 2.0);
        let _ = writeln!(s, r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ccc"/>"##, width - 10.0);
    }
    for e in &h.events {
        let lane = lanes.iter().position(|l| *l == e.target).unwrap_or(0);
        let y = top + lane_h * lane as f64 + 4.0 + (e.process % 12) as f64 * 4.5;
        let color = match e.outcome {
            Outcome::Ok => "#2a2",
            Outcome::Fail => "#d22",
            Outcome::Unknown => "#f90",
        };
        let end = e.complete_ms.unwrap_or(e.invoke_ms + 1.0);
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="{color}" stroke-width="3"/>"#,
            x(e.invoke_ms),
            x(end).max(x(e.invoke_ms) + 0.8)
        );
    }
    let _ = writeln!(s, r#"<text x="{left}" y="{:.1}">0 s</text>"#, height - 8.0);
    let _ =
        writeln!(s, r#"<text x="{:.1}" y="{:.1}">{:.0} s</text>"#, width - 60.0, height - 8.0, duration_ms / 1000.0);
    s.push_str("</svg>\n");
    s
}
