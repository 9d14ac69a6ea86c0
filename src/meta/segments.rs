//! The Raft log's entries on disk, in append-only segment files of their
//! own, apart from the state's RocksDB.
//!
//! Why not a column family of the state's database: its memtables joined
//! the state's in one atomic flush group, so every flush of the state also
//! wrote the log's entries a second time (once to the write-ahead log, once
//! to tables), and those flushes' syncs queued on the device beside the
//! log's own. Here each entry is written once, appended, and a purge
//! deletes whole files. docs/ARCHITECTURE.md (Storage) has the measurements.
//!
//! A segment is `<first index, 20 digits>.seg`: an 8-byte header (magic and
//! format version), then records, each
//! `len: u32 LE | crc32: u32 LE | index: u64 LE | payload (len bytes)`,
//! the checksum over the index and the payload, indexes consecutive within
//! a file. A new segment starts when the active one passes
//! [`SEGMENT_BYTES`], or when an append does not follow the last entry (the
//! first append after a snapshot install purged everything before it).
//!
//! Durability, by the rules of `crate::durable`: appends land in the page
//! cache at once (readers see them) and [`Segments::sync`] makes everything
//! appended before it durable: the files written since the last sync, then
//! the directory if a segment was created. A truncation is durable when it
//! returns, the deleted files' names first, so a crash never leaves a later
//! segment behind a shortened one. At open, a record that is cut short or
//! fails its checksum ends the log there (what a power cut leaves of writes
//! never synced, hence never acknowledged): the file is cut at that point
//! and any later segment deleted. Purged segments' deletions are not
//! synced: one that comes back lies wholly at or below the purge mark and
//! is deleted again.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Where a segment passes the active one's role to a new file. Small
/// enough that a purge frees space soon after a snapshot (the log kept is
/// at most one segment more than what openraft keeps), large enough that a
/// new file (and the directory sync it costs) is rare: every few seconds at
/// the busiest.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// The first bytes of every segment: magic and the segment format.
const HEADER: [u8; 8] = *b"BRTHLOG\x01";
const RECORD_HEADER: usize = 16;
const EXT: &str = "seg";

/// One segment file and where each of its records starts.
struct Segment {
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Offset of the record of index `first + i`.
    offsets: Vec<u64>,
    /// Bytes of the file that hold the header and whole records.
    end: u64,
}

impl Segment {
    /// One past the index of the last record.
    fn next(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }

    /// The byte range of the records of indexes `r` (within this segment).
    fn span(&self, r: &Range<u64>) -> Range<u64> {
        let at = |i: u64| self.offsets.get((i - self.first) as usize).copied().unwrap_or(self.end);
        at(r.start)..at(r.end)
    }
}

#[derive(Default)]
struct Inner {
    /// Oldest first; the last is the one appended to.
    segments: VecDeque<Segment>,
    /// Files written since the last sync, beside the active one (those a
    /// new segment took over from).
    unsynced: Vec<Arc<File>>,
    /// A segment was created since the last sync: its name is not durable.
    dir_dirty: bool,
    bytes: u64,
}

/// The segment files of one node's Raft log (see the module doc). Entries
/// are opaque payloads here; [`super::LogStore`] encodes them.
pub struct Segments {
    dir: PathBuf,
    inner: RwLock<Inner>,
}

fn corrupt(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn checksum(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A record's 16 bytes before its payload: the one place that knows their
/// layout, for writing, reading back and recovering.
struct RecordHead {
    len: u32,
    crc: u32,
    index: u64,
}

impl RecordHead {
    /// Append the record of `payload` at `index` to `buf`.
    fn write(index: u64, payload: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("a log entry over 4 GiB"))?;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&checksum(index, payload).to_le_bytes());
        buf.extend_from_slice(&index.to_le_bytes());
        buf.extend_from_slice(payload);
        Ok(())
    }

    fn parse(head: &[u8; RECORD_HEADER]) -> RecordHead {
        let word = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 bytes"));
        RecordHead { len: word(0), crc: word(4), index: u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")) }
    }

    /// Whether `payload` is this record's.
    fn checks(&self, payload: &[u8]) -> bool {
        checksum(self.index, payload) == self.crc
    }
}

/// Parse the records of `buf`, which starts at a record boundary; yields
/// `(index, payload)` and stops at the first record that is cut short or
/// fails its checksum.
fn records(buf: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let head = RecordHead::parse(buf.get(at..at + RECORD_HEADER)?.try_into().expect("16 bytes"));
        let len = head.len as usize;
        let payload = buf.get(at + RECORD_HEADER..at + RECORD_HEADER + len)?;
        if !head.checks(payload) {
            return None;
        }
        at += RECORD_HEADER + len;
        Some((head.index, payload))
    })
}

/// Fill `buf` from `r`: false if the file ends first.
fn read_whole(r: &mut impl io::Read, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.{EXT}"))
}

impl Segments {
    /// Open the log in `dir` (created, durably, if missing), recovering it
    /// as the module doc says.
    pub fn open(dir: &Path) -> io::Result<Segments> {
        crate::durable::create_dir_all(dir)?;
        let mut firsts = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name.strip_suffix(&format!(".{EXT}")).and_then(|s| s.parse::<u64>().ok()) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut inner = Inner::default();
        let mut cut = false;
        for first in firsts {
            let path = segment_path(dir, first);
            if cut {
                tracing::warn!(file = %path.display(), "deleting a Raft log segment past where the log ends");
                std::fs::remove_file(&path)?;
                inner.dir_dirty = true;
                continue;
            }
            if let Some(prev) = inner.segments.back() {
                if first < prev.next() {
                    return Err(corrupt(format!(
                        "Raft log segment {} overlaps the one before it (which ends at index {})",
                        path.display(),
                        prev.next() - 1
                    )));
                }
            }
            let (segment, whole) = Self::recover(first, path)?;
            cut = !whole;
            inner.bytes += segment.end;
            inner.segments.push_back(segment);
        }
        if inner.dir_dirty {
            crate::durable::sync_dir(dir)?;
            inner.dir_dirty = false;
        }
        Ok(Segments { dir: dir.to_path_buf(), inner: RwLock::new(inner) })
    }

    /// Read one segment back: its records up to the first that is cut
    /// short or fails its checksum, and whether it ended cleanly (if not,
    /// the file is cut there, durably).
    fn recover(first: u64, path: PathBuf) -> io::Result<(Segment, bool)> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let file_len = file.metadata()?.len();
        let mut offsets = Vec::new();
        let mut end = HEADER.len() as u64;
        let mut r = io::BufReader::with_capacity(1 << 20, &file);
        let mut header = [0u8; HEADER.len()];
        let header_ok = read_whole(&mut r, &mut header)? && header == HEADER;
        if header_ok {
            let mut payload = Vec::new();
            loop {
                let mut head = [0u8; RECORD_HEADER];
                if !read_whole(&mut r, &mut head)? {
                    break;
                }
                let head = RecordHead::parse(&head);
                let len = u64::from(head.len);
                // A length past the file's end is garbage, not a reason
                // to allocate it.
                if end + RECORD_HEADER as u64 + len > file_len {
                    break;
                }
                payload.resize(len as usize, 0);
                if !read_whole(&mut r, &mut payload)?
                    || !head.checks(&payload)
                    || head.index != first + offsets.len() as u64
                {
                    break;
                }
                offsets.push(end);
                end += RECORD_HEADER as u64 + len;
            }
        }
        drop(r);
        let whole = header_ok && end == file_len;
        if !whole {
            tracing::warn!(
                file = %path.display(),
                kept = offsets.len(),
                at = end,
                of = file_len,
                "the Raft log ends inside this segment (a write cut short by a crash): cutting it there"
            );
            if !header_ok {
                file.set_len(0)?;
                file.write_all_at(&HEADER, 0)?;
                end = HEADER.len() as u64;
            } else {
                file.set_len(end)?;
            }
            file.sync_all()?;
        }
        Ok((Segment { first, path, file: Arc::new(file), offsets, end }, whole))
    }

    /// The index of the first entry on disk, if any.
    #[cfg(test)]
    pub fn first_index(&self) -> Option<u64> {
        let g = self.inner.read().expect("log lock");
        g.segments.iter().find(|s| !s.offsets.is_empty()).map(|s| s.first)
    }

    /// The index of the last entry on disk, if any.
    pub fn last_index(&self) -> Option<u64> {
        let g = self.inner.read().expect("log lock");
        g.segments.iter().rev().find(|s| !s.offsets.is_empty()).map(|s| s.next() - 1)
    }

    /// The first index at or after `from` where the entries stop being
    /// consecutive (a hole before the next segment), if any.
    pub fn first_gap_after(&self, from: u64) -> Option<u64> {
        let g = self.inner.read().expect("log lock");
        let mut expect: Option<u64> = None;
        for s in g.segments.iter().filter(|s| !s.offsets.is_empty() && s.next() > from) {
            if let Some(e) = expect {
                if s.first != e && e >= from {
                    return Some(e);
                }
            }
            expect = Some(s.next());
        }
        None
    }

    /// Bytes of the segment files.
    pub fn bytes(&self) -> u64 {
        self.inner.read().expect("log lock").bytes
    }

    /// Append `entries` (index, payload), indexes consecutive and after the
    /// last entry; visible to readers at once, durable after the next
    /// [`Segments::sync`].
    pub fn append(&self, entries: &[(u64, Vec<u8>)]) -> io::Result<()> {
        let Some(&(first, _)) = entries.first() else { return Ok(()) };
        let mut g = self.inner.write().expect("log lock");
        let (next, full) = match g.segments.back() {
            Some(s) => (Some(s.next()), s.end >= SEGMENT_BYTES),
            None => (None, false),
        };
        if let Some(next) = next {
            if first < next {
                return Err(io::Error::other(format!(
                    "append at index {first} over the log's entries up to {} (truncate first)",
                    next - 1
                )));
            }
        }
        if let Some((i, (index, _))) = entries.iter().enumerate().find(|(i, (index, _))| *index != first + *i as u64) {
            return Err(io::Error::other(format!("append of index {index} after {}", first + i as u64 - 1)));
        }
        if next != Some(first) || full {
            self.start_segment(&mut g, first)?;
        }
        let mut buf = Vec::with_capacity(entries.iter().map(|(_, p)| RECORD_HEADER + p.len()).sum());
        let s = g.segments.back_mut().expect("an active segment");
        let mut offsets = Vec::with_capacity(entries.len());
        for (index, payload) in entries {
            offsets.push(s.end + buf.len() as u64);
            RecordHead::write(*index, payload, &mut buf)?;
        }
        s.file.write_all_at(&buf, s.end)?;
        s.end += buf.len() as u64;
        s.offsets.extend(offsets);
        g.bytes += buf.len() as u64;
        Ok(())
    }

    /// Begin a new active segment whose first record will be `first`.
    fn start_segment(&self, g: &mut Inner, first: u64) -> io::Result<()> {
        let path = segment_path(&self.dir, first);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        file.write_all_at(&HEADER, 0)?;
        if let Some(old) = g.segments.back() {
            g.unsynced.push(old.file.clone());
        }
        g.dir_dirty = true;
        g.bytes += HEADER.len() as u64;
        g.segments.push_back(Segment {
            first,
            path,
            file: Arc::new(file),
            offsets: Vec::new(),
            end: HEADER.len() as u64,
        });
        Ok(())
    }

    /// Make every append before this call durable (one fdatasync per file
    /// written since the last sync, usually one; a directory sync if a
    /// segment was created). Called by one thread, for a group of appends.
    pub fn sync(&self) -> io::Result<()> {
        let (mut files, dir) = {
            let mut g = self.inner.write().expect("log lock");
            let mut files = std::mem::take(&mut g.unsynced);
            files.extend(g.segments.back().map(|s| s.file.clone()));
            (files, std::mem::take(&mut g.dir_dirty))
        };
        let r = files.drain(..).try_for_each(|f| f.sync_data());
        if let Err(e) = r {
            // Sync them again next time: a failed fsync may have dropped
            // the pages' dirty state, so the caller must treat this as fatal.
            self.inner.write().expect("log lock").dir_dirty |= dir;
            return Err(e);
        }
        if dir {
            if let Err(e) = crate::durable::sync_dir(&self.dir) {
                self.inner.write().expect("log lock").dir_dirty = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// The payloads of the entries in `range` that are on disk, in order
    /// (stopping at a hole).
    pub fn read(&self, range: Range<u64>) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let g = self.inner.read().expect("log lock");
        let mut out = Vec::new();
        for s in g.segments.iter() {
            let r = range.start.max(s.first)..range.end.min(s.next());
            if r.start >= r.end {
                continue;
            }
            if let Some((last, _)) = out.last() {
                if r.start != last + 1 {
                    break;
                }
            }
            let span = s.span(&r);
            let mut buf = vec![0u8; (span.end - span.start) as usize];
            s.file.read_exact_at(&mut buf, span.start)?;
            let before = out.len();
            out.extend(records(&buf).map(|(i, p)| (i, p.to_vec())));
            let want = (r.end - r.start) as usize;
            if out.len() - before != want || out.last().map(|(i, _)| *i) != Some(r.end - 1) {
                return Err(corrupt(format!(
                    "Raft log segment {}: entries {}..{} do not read back",
                    s.path.display(),
                    r.start,
                    r.end
                )));
            }
        }
        Ok(out)
    }

    /// Remove every entry from `index` on, durably before returning.
    pub fn truncate(&self, index: u64) -> io::Result<()> {
        let mut g = self.inner.write().expect("log lock");
        let mut removed = false;
        while g.segments.back().is_some_and(|s| s.first >= index && (s.first > index || g.segments.len() > 1)) {
            let s = g.segments.pop_back().expect("checked");
            std::fs::remove_file(&s.path)?;
            g.bytes -= s.end;
            removed = true;
        }
        if removed {
            crate::durable::sync_dir(&self.dir)?;
        }
        let Some(s) = g.segments.back_mut() else { return Ok(()) };
        if index >= s.next() {
            return Ok(());
        }
        let keep = index.saturating_sub(s.first) as usize;
        let end = s.offsets.get(keep).copied().unwrap_or(s.end);
        s.file.set_len(end)?;
        s.file.sync_all()?;
        let freed = s.end - end;
        s.offsets.truncate(keep);
        s.end = end;
        g.bytes -= freed;
        Ok(())
    }

    /// Delete the segments whose entries are all at or below `upto` (the
    /// active one stays: it is appended to). What remains at or below it is
    /// the caller's to ignore.
    pub fn purge(&self, upto: u64) -> io::Result<()> {
        let mut g = self.inner.write().expect("log lock");
        while g.segments.len() > 1 && g.segments.front().is_some_and(|s| s.next() <= upto + 1) {
            let s = g.segments.pop_front().expect("checked");
            std::fs::remove_file(&s.path)?;
            g.bytes -= s.end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i as usize * 31 + k) as u8).collect()
    }

    fn entries(range: Range<u64>, len: usize) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, payload(i, len))).collect()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    /// Entries read back as written, across segments and a reopen; a
    /// truncation and a purge remove what they say, durably.
    #[test]
    fn appends_read_back_across_segments_truncations_purges_and_reopens() {
        let t = tempfile::tempdir().unwrap();
        let log = Segments::open(t.path()).unwrap();
        // 40 KiB entries: a segment every ~400.
        for chunk in (0..1200u64).step_by(100) {
            log.append(&entries(chunk..chunk + 100, 40 << 10)).unwrap();
            log.sync().unwrap();
        }
        assert!(files(t.path()).len() >= 3, "{:?}", files(t.path()));
        assert_eq!(log.read(350..450).unwrap(), entries(350..450, 40 << 10));
        log.truncate(1000).unwrap();
        log.purge(500).unwrap();
        assert_eq!(log.last_index(), Some(999));
        let first = log.first_index().unwrap();
        assert!(first <= 501 && first > 0, "first {first}");
        drop(log);
        let log = Segments::open(t.path()).unwrap();
        assert_eq!(log.last_index(), Some(999));
        assert_eq!(log.read(501..1000).unwrap(), entries(501..1000, 40 << 10));
        assert!(log.append(&entries(990..991, 10)).is_err(), "an append over entries must truncate first");
        log.append(&entries(1000..1001, 10)).unwrap();
        assert_eq!(log.read(999..2000).unwrap().len(), 2);
        let on_disk: u64 = files(t.path()).iter().map(|f| std::fs::metadata(t.path().join(f)).unwrap().len()).sum();
        assert_eq!(log.bytes(), on_disk);
    }

    /// What a power cut leaves of writes never synced (a torn record, a
    /// record of garbage, a later segment) ends the log at the last whole
    /// record, and appends go on from there.
    #[test]
    fn a_torn_tail_ends_the_log_at_the_last_whole_record() {
        let t = tempfile::tempdir().unwrap();
        let log = Segments::open(t.path()).unwrap();
        log.append(&entries(1..11, 100)).unwrap();
        log.sync().unwrap();
        drop(log);
        let seg = segment_path(t.path(), 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        // Entry 10 cut short; and a later segment that must go too.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 20).unwrap();
        std::fs::write(segment_path(t.path(), 11), [HEADER.as_slice(), &[7u8; 50]].concat()).unwrap();
        let log = Segments::open(t.path()).unwrap();
        assert_eq!(log.last_index(), Some(9));
        assert_eq!(files(t.path()), vec![format!("{:020}.seg", 1)]);
        // A flipped byte in entry 5 ends it at 4.
        drop(log);
        let f = OpenOptions::new().read(true).write(true).open(&seg).unwrap();
        let at = HEADER.len() as u64 + 4 * (RECORD_HEADER as u64 + 100) + RECORD_HEADER as u64 + 3;
        f.write_all_at(&[0xff], at).unwrap();
        let log = Segments::open(t.path()).unwrap();
        assert_eq!(log.last_index(), Some(4));
        log.append(&entries(5..8, 100)).unwrap();
        assert_eq!(log.read(1..8).unwrap(), entries(1..8, 100));
    }

    /// An append that does not follow the last entry (after a snapshot
    /// install) starts a new segment; what lies before the hole is found.
    #[test]
    fn an_append_past_a_hole_starts_a_segment() {
        let t = tempfile::tempdir().unwrap();
        let log = Segments::open(t.path()).unwrap();
        log.append(&entries(0..5, 10)).unwrap();
        log.append(&entries(100..103, 10)).unwrap();
        log.sync().unwrap();
        assert_eq!(log.first_gap_after(0), Some(5));
        assert_eq!(log.first_gap_after(99), None);
        log.purge(99).unwrap();
        assert_eq!(log.first_index(), Some(100));
        drop(log);
        let log = Segments::open(t.path()).unwrap();
        assert_eq!(log.read(100..103).unwrap(), entries(100..103, 10));
    }
}
