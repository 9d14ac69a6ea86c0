//! The data dir's format, and the one-time conversion of a data dir written
//! before format 1 (bincode 1, no version anywhere).
//!
//! The metadata database records its format under [`KEY_FORMAT`] in the
//! raft column family: 1 for values in codec format 1 with the Raft log in
//! the `logs` family, 2 ([`DIR_FORMAT`]) once the log is in segment files
//! (moved by `LogStore::open`). At open:
//! - 1 or 2: nothing to do here;
//! - a newer one: refused (a node never misreads what a later release
//!   wrote; downgrading needs the copy an upgrade keeps, below);
//! - none, over an empty database: a new data dir, marked current;
//! - none, over data: written by a release before format 1. A RocksDB
//!   checkpoint of it is taken first (hard links, no copy) beside it, as
//!   `<db>-format-0`; every structured value is then read from that frozen
//!   copy and rewritten in the current format in place, a received
//!   snapshot being installed too, and the marker goes last, synced (the
//!   old current snapshot file is replaced by a checkpoint when the state
//!   machine opens). A crash midway
//!   starts over from the copy, so the conversion is idempotent. The copy
//!   stays for a rollback to the old release; delete it when done.

use std::path::{Path, PathBuf};

use openraft::{LogId, StoredMembership, Vote};
use rocksdb::{IteratorMode, Options, WriteBatch, DB};

use super::command::Outcome;
use super::snapshot::StoredSnapshot;
use super::{BlobInfo, ManifestRecord, CF_BLOBS, CF_LOGS, CF_MANIFESTS, CF_RAFT, CF_REQUESTS, CF_SM};
use crate::codec::{self, legacy, FORMAT};
use crate::meta::identity::StoredIdentity;
use crate::{NodeId, NodeInfo, TypeConfig};

/// Where the data dir's format is recorded (raft column family).
pub const KEY_FORMAT: &[u8] = b"format";

/// The data dir format this release writes: values in [`FORMAT`], and the
/// Raft log in segment files (`meta/segments.rs`), not the `logs` family
/// where format 1 kept it. `LogStore::open` moves a format-1 log and then
/// marks the data dir 2; a release before refuses a data dir so marked
/// (newer than it reads) instead of starting on an empty log.
pub const DIR_FORMAT: u8 = 2;

/// Why a data dir could not be opened in the current format.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("this data dir was written in format {0} by a newer release of berth; this release reads formats up to {DIR_FORMAT} (start the newer release, or restore the copy its upgrade kept)")]
    Newer(u8),
    #[error("converting the data dir from format 0: {cf} key {key:?}: {why}")]
    Value { cf: &'static str, key: String, why: String },
    #[error("converting the data dir from format 0: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("converting the data dir from format 0: {0}")]
    Io(#[from] std::io::Error),
}

/// The column families whose values are structured (encoded by
/// [`codec`]); every other one holds plain bytes whose layout the keys
/// module defines, unchanged by the format.
const ENCODED_CFS: [&str; 6] = [CF_RAFT, CF_LOGS, CF_SM, CF_MANIFESTS, CF_BLOBS, CF_REQUESTS];

/// Make the database at `path` current (see the module doc). `snap_dir` is
/// the state machine's snapshot directory, where a snapshot being installed
/// is converted with the rest.
pub fn ensure_current(db: &DB, path: &Path, snap_dir: &Path) -> Result<(), UpgradeError> {
    let raft = db.cf_handle(CF_RAFT).expect("raft cf");
    if let Some(v) = db.get_cf(raft, KEY_FORMAT)? {
        return match v.first() {
            // 1: the Raft log is still in the database; opening the log
            // store moves it and marks the data dir current.
            Some(&f) if (FORMAT..=DIR_FORMAT).contains(&f) => Ok(()),
            Some(&f) if f > DIR_FORMAT => Err(UpgradeError::Newer(f)),
            _ => Err(UpgradeError::Value { cf: CF_RAFT, key: "format".into(), why: format!("{v:?}") }),
        };
    }
    let empty = ENCODED_CFS
        .iter()
        .all(|name| db.iterator_cf(db.cf_handle(name).expect("cf"), IteratorMode::Start).next().is_none());
    // A converted data dir holds its log in the database, as format 1
    // does; a new one is current at once.
    let format = if empty { DIR_FORMAT } else { FORMAT };
    if !empty {
        convert(db, path, snap_dir)?;
    }
    mark(db, format)?;
    Ok(())
}

/// Record the data dir's format `format`, synced.
fn mark(db: &DB, format: u8) -> Result<(), rocksdb::Error> {
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.put_cf_opt(db.cf_handle(CF_RAFT).expect("raft cf"), KEY_FORMAT, [format], &opts)
}

/// Mark the data dir current ([`DIR_FORMAT`]) once its Raft log is in
/// segment files; nothing to do if it is already.
pub(crate) fn mark_log_moved(db: &DB) -> Result<(), rocksdb::Error> {
    match db.get_cf(db.cf_handle(CF_RAFT).expect("raft cf"), KEY_FORMAT)?.as_deref() {
        Some([DIR_FORMAT]) => Ok(()),
        _ => mark(db, DIR_FORMAT),
    }
}

/// Where the frozen copy of a format-0 database at `path` goes.
pub fn backup_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "meta".into());
    path.with_file_name(format!("{name}-format-0"))
}

fn convert(db: &DB, path: &Path, snap_dir: &Path) -> Result<(), UpgradeError> {
    let backup = backup_path(path);
    tracing::warn!(copy = %backup.display(), "this data dir was written before format {FORMAT}: converting it (once); the old database is kept as a copy");
    if !backup.exists() {
        let tmp = backup.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        rocksdb::checkpoint::Checkpoint::new(db)?.create_checkpoint(&tmp)?;
        crate::durable::rename_into_place(&tmp, &backup)?;
    }
    let names = DB::list_cf(&Options::default(), &backup)?;
    let old = DB::open_cf_for_read_only(&Options::default(), &backup, &names, false)?;
    let mut converted = 0u64;
    for name in ENCODED_CFS {
        let (Some(from), Some(to)) = (old.cf_handle(name), db.cf_handle(name)) else { continue };
        let mut batch = WriteBatch::default();
        for item in old.iterator_cf(from, IteratorMode::Start) {
            let (k, v) = item?;
            let new = convert_value(name, &k, &v).map_err(|why| UpgradeError::Value {
                cf: name,
                key: String::from_utf8_lossy(&k).into_owned(),
                why,
            })?;
            // The current snapshot's file is replaced by a checkpoint when
            // the state machine opens; a received one being installed is
            // read first, so it is converted.
            if name == CF_SM && &*k == super::snapshot::KEY_INSTALLING {
                let stored: StoredSnapshot = codec::decode(&new).expect("just encoded");
                super::snapshot::convert_snapshot_file(&snap_dir.join(&stored.file))?;
            }
            batch.put_cf(to, &k, new);
            converted += 1;
            if batch.len() >= 4096 {
                db.write(std::mem::take(&mut batch))?;
            }
        }
        db.write(batch)?;
    }
    db.flush_wal(true)?;
    tracing::info!(values = converted, "data dir converted to format {FORMAT}");
    Ok(())
}

fn re<T: serde::Serialize + serde::de::DeserializeOwned>(v: &[u8]) -> Result<Vec<u8>, String> {
    let t: T = legacy::from_bytes(v).map_err(|e| e.to_string())?;
    Ok(codec::encode(&t))
}

type Entry = openraft::Entry<TypeConfig>;
type Membership = StoredMembership<NodeId, NodeInfo>;

/// One value of column family `cf` under `key`, from bincode 1 to the
/// current format: the type each key holds, as the release before format 1
/// wrote it.
pub(super) fn convert_value(cf: &str, key: &[u8], v: &[u8]) -> Result<Vec<u8>, String> {
    match (cf, key) {
        (CF_LOGS, _) => re::<Entry>(v),
        (CF_RAFT, b"vote") => re::<Vote<NodeId>>(v),
        (CF_RAFT, b"committed") => re::<Option<LogId<NodeId>>>(v),
        (CF_RAFT, b"last_purged") => re::<LogId<NodeId>>(v),
        (CF_RAFT, b"identity") => re::<StoredIdentity>(v),
        (CF_SM, b"applied") => re::<Option<LogId<NodeId>>>(v),
        (CF_SM, b"membership") => re::<Membership>(v),
        (CF_SM, b"snapshot" | b"installing") => re::<StoredSnapshot>(v),
        // Markers (the derived indexes' versions).
        (CF_SM, _) if v.len() == 1 => re::<u8>(v),
        (CF_MANIFESTS, _) => re::<ManifestRecord>(v),
        (CF_BLOBS, _) => re::<BlobInfo>(v),
        (CF_REQUESTS, _) => re::<(u64, Outcome)>(v),
        _ => Err("no format-0 type is known for this key".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_format_is_refused_and_a_new_data_dir_is_marked_current() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let db = crate::meta::open_db(&path).unwrap();
        ensure_current(&db, &path, &dir.path().join("snapshots")).unwrap();
        let raft = db.cf_handle(CF_RAFT).unwrap();
        assert_eq!(db.get_cf(raft, KEY_FORMAT).unwrap().as_deref(), Some(&[DIR_FORMAT][..]));
        assert!(!backup_path(&path).exists(), "nothing to convert in a new data dir");
        db.put_cf(raft, KEY_FORMAT, [DIR_FORMAT + 1]).unwrap();
        let e = ensure_current(&db, &path, &dir.path().join("snapshots")).unwrap_err();
        assert!(matches!(e, UpgradeError::Newer(f) if f == DIR_FORMAT + 1), "{e}");
        assert!(e.to_string().contains("newer release"));
    }
}
