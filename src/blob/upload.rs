//! Upload sessions. A session is a directory `<uploads>/<id>/` holding the
//! bytes received so far (`data`) and the repository it belongs to (`repo`).
//! The running SHA-256 is kept in memory and recomputed from `data` when it
//! is missing (after a restart, or after a failed append was rolled back).

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::Mutex as AsyncMutex;

use super::write::append_stream;
use super::{BlobError, BlobStore};
use crate::oci::{Algorithm, Digest, Hasher, Name};
use crate::NodeId;

/// Bytes buffered before each write+hash step on the blocking side.
const WRITE_CHUNK: usize = 1 << 20;

/// An upload id: the owning node's id and 128 random bits, so any node can
/// tell which node holds the session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UploadId {
    pub node: NodeId,
    token: String,
}

impl FromStr for UploadId {
    type Err = BlobError;
    fn from_str(s: &str) -> Result<Self, BlobError> {
        let (node, token) = s.split_once('-').ok_or(BlobError::UploadUnknown)?;
        let node = node.parse().map_err(|_| BlobError::UploadUnknown)?;
        if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return Err(BlobError::UploadUnknown);
        }
        Ok(UploadId { node, token: token.to_owned() })
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.node, self.token)
    }
}

struct Session {
    dir: PathBuf,
    size: u64,
    /// SHA-256 of `data[..size]`, when known.
    hasher: Option<Hasher>,
}

/// The upload sessions of this node.
#[derive(Clone)]
pub struct Uploads {
    node: NodeId,
    dir: PathBuf,
    store: BlobStore,
    sessions: Arc<Mutex<HashMap<String, Arc<AsyncMutex<Session>>>>>,
}

fn data_path(dir: &std::path::Path) -> PathBuf {
    dir.join("data")
}

/// Hash the first `len` bytes of a file (after a restart or a rollback).
fn rehash(path: &std::path::Path, alg: Algorithm) -> std::io::Result<Hasher> {
    let mut f = std::fs::File::open(path)?;
    let mut h = alg.hasher();
    let mut buf = vec![0u8; WRITE_CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h);
        }
        h.update(&buf[..n]);
    }
}

impl Uploads {
    pub fn new(node: NodeId, dir: PathBuf, store: BlobStore) -> std::io::Result<Uploads> {
        std::fs::create_dir_all(&dir)?;
        Ok(Uploads { node, dir, store, sessions: Default::default() })
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Start a session for `repo`.
    pub async fn start(&self, repo: &Name) -> Result<UploadId, BlobError> {
        let id = UploadId { node: self.node, token: format!("{:032x}", rand::random::<u128>()) };
        let dir = self.dir.join(id.to_string());
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::write(dir.join("repo"), repo.as_str()).await?;
        tokio::fs::File::create(data_path(&dir)).await?;
        let s = Session { dir, size: 0, hasher: Some(Algorithm::Sha256.hasher()) };
        self.sessions.lock().unwrap().insert(id.to_string(), Arc::new(AsyncMutex::new(s)));
        Ok(id)
    }

    /// Find a session of `repo`, loading it from disk if this process has
    /// not seen it yet (it was started before a restart).
    async fn session(&self, id: &UploadId, repo: &Name) -> Result<Arc<AsyncMutex<Session>>, BlobError> {
        if id.node != self.node {
            return Err(BlobError::UploadUnknown);
        }
        let key = id.to_string();
        let dir = self.dir.join(&key);
        let existing = self.sessions.lock().unwrap().get(&key).cloned();
        let s = match existing {
            Some(s) => s,
            None => {
                let size = match tokio::fs::metadata(data_path(&dir)).await {
                    Ok(m) => m.len(),
                    Err(_) => return Err(BlobError::UploadUnknown),
                };
                let s = Arc::new(AsyncMutex::new(Session { dir: dir.clone(), size, hasher: None }));
                self.sessions.lock().unwrap().entry(key).or_insert(s).clone()
            }
        };
        let owner = tokio::fs::read_to_string(dir.join("repo")).await.map_err(|_| BlobError::UploadUnknown)?;
        if owner != repo.as_str() {
            return Err(BlobError::UploadUnknown);
        }
        Ok(s)
    }

    /// Bytes received so far.
    pub async fn status(&self, id: &UploadId, repo: &Name) -> Result<u64, BlobError> {
        let s = self.session(id, repo).await?;
        let s = s.lock().await;
        if !s.dir.exists() {
            return Err(BlobError::UploadUnknown);
        }
        Ok(s.size)
    }

    /// Append a chunk. `offset`, when given (Content-Range), must equal the
    /// current size. A chunk that fails midway is rolled back entirely.
    pub async fn append<S>(&self, id: &UploadId, repo: &Name, offset: Option<u64>, body: S) -> Result<u64, BlobError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
    {
        let s = self.session(id, repo).await?;
        let mut s = s.lock().await;
        if let Some(o) = offset {
            if o != s.size {
                return Err(BlobError::OutOfOrder { expected: s.size, got: o });
            }
        }
        append_locked(&mut s, body).await?;
        Ok(s.size)
    }

    /// Finish: append an optional last chunk, verify `digest` (and `size`
    /// when the client declared one), fsync, and move into the store.
    pub async fn finish<S>(&self, id: &UploadId, repo: &Name, digest: &Digest, body: S) -> Result<u64, BlobError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
    {
        let s = self.session(id, repo).await?;
        let mut s = s.lock().await;
        append_locked(&mut s, body).await?;
        let dir = s.dir.clone();
        let hasher = match digest.algorithm() {
            Algorithm::Sha256 => s.hasher.take(),
            Algorithm::Sha512 => None,
        };
        let store = self.store.clone();
        let want = digest.clone();
        let size = s.size;
        let result = tokio::task::spawn_blocking(move || -> Result<(), BlobError> {
            let path = data_path(&dir);
            let computed = match hasher {
                Some(h) => h.finish(),
                None => rehash(&path, want.algorithm())?.finish(),
            };
            if computed != want {
                return Err(BlobError::DigestMismatch { computed: computed.to_string() });
            }
            std::fs::File::open(&path)?.sync_all()?;
            store.commit_file(&path, &want)?;
            Ok(())
        })
        .await
        .map_err(|e| BlobError::Io(std::io::Error::other(e)))?;
        // Success or digest mismatch both end the session: nothing was stored
        // on mismatch, and the client must start over as the spec says.
        if matches!(result, Ok(()) | Err(BlobError::DigestMismatch { .. })) {
            let _ = tokio::fs::remove_dir_all(&s.dir).await;
            self.sessions.lock().unwrap().remove(&id.to_string());
        }
        result.map(|()| size)
    }

    pub async fn cancel(&self, id: &UploadId, repo: &Name) -> Result<(), BlobError> {
        let s = self.session(id, repo).await?;
        let s = s.lock().await;
        tokio::fs::remove_dir_all(&s.dir).await.map_err(|_| BlobError::UploadUnknown)?;
        self.sessions.lock().unwrap().remove(&id.to_string());
        Ok(())
    }

    /// Remove sessions untouched for longer than `max_age`.
    pub async fn expire(&self, max_age: Duration) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut rd = tokio::fs::read_dir(&self.dir).await?;
        while let Some(e) = rd.next_entry().await? {
            let touched = match tokio::fs::metadata(data_path(&e.path())).await {
                Ok(m) => m.modified()?,
                Err(_) => e.metadata().await?.modified()?,
            };
            if SystemTime::now().duration_since(touched).unwrap_or_default() > max_age {
                let key = e.file_name().to_string_lossy().into_owned();
                let s = self.sessions.lock().unwrap().remove(&key);
                let _guard = match &s {
                    Some(s) => Some(s.lock().await),
                    None => None,
                };
                tokio::fs::remove_dir_all(e.path()).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Append `body` to the session's data file; a failed chunk leaves the
/// session exactly as it was (the running hash must then be recomputed).
async fn append_locked<S>(s: &mut Session, body: S) -> Result<(), BlobError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
{
    let start = s.size;
    match append_stream(&data_path(&s.dir), start, s.hasher.take(), body).await {
        Ok((n, hasher)) => {
            s.size = start + n;
            s.hasher = hasher;
            Ok(())
        }
        Err(e) => {
            s.hasher = (start == 0).then(|| Algorithm::Sha256.hasher());
            Err(e)
        }
    }
}
