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

/// Who a session belongs to, for the limits on open sessions.
struct Owner {
    repo: String,
    /// The user or address that opened it; empty when not known (a session
    /// found on disk after a restart).
    client: String,
}

/// Bounds on open sessions, so one repository or one client cannot fill
/// the node's disk and memory with sessions it never finishes.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub per_repo: usize,
    pub per_client: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits { per_repo: usize::MAX, per_client: usize::MAX }
    }
}

type SessionMap = HashMap<String, (Owner, Arc<AsyncMutex<Session>>)>;

/// The upload sessions of this node.
#[derive(Clone)]
pub struct Uploads {
    node: NodeId,
    dir: PathBuf,
    store: BlobStore,
    limits: SessionLimits,
    sessions: Arc<Mutex<SessionMap>>,
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
    /// The sessions under `dir`, including those left by an earlier run
    /// (they count against the limits until finished or expired).
    pub fn new(node: NodeId, dir: PathBuf, store: BlobStore, limits: SessionLimits) -> std::io::Result<Uploads> {
        std::fs::create_dir_all(&dir)?;
        let mut sessions = SessionMap::new();
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let (Ok(repo), Ok(meta)) =
                (std::fs::read_to_string(e.path().join("repo")), std::fs::metadata(data_path(&e.path())))
            else {
                continue;
            };
            let s = Session { dir: e.path(), size: meta.len(), hasher: None };
            let owner = Owner { repo, client: String::new() };
            sessions.insert(e.file_name().to_string_lossy().into_owned(), (owner, Arc::new(AsyncMutex::new(s))));
        }
        Ok(Uploads { node, dir, store, limits, sessions: Arc::new(Mutex::new(sessions)) })
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Start a session for `repo`, opened by `client` (a user name or an
    /// address), unless either already has as many open as allowed.
    pub async fn start(&self, repo: &Name, client: &str) -> Result<UploadId, BlobError> {
        let id = UploadId { node: self.node, token: format!("{:032x}", rand::random::<u128>()) };
        let dir = self.dir.join(id.to_string());
        let s = Session { dir: dir.clone(), size: 0, hasher: Some(Algorithm::Sha256.hasher()) };
        {
            // Counted and reserved under one lock, so racing starts cannot
            // overshoot the limits.
            let mut sessions = self.sessions.lock().unwrap();
            let (mut in_repo, mut of_client) = (0, 0);
            for (owner, _) in sessions.values() {
                in_repo += usize::from(owner.repo == repo.as_str());
                of_client += usize::from(!client.is_empty() && owner.client == client);
            }
            if in_repo >= self.limits.per_repo {
                return Err(BlobError::TooManyUploads(format!(
                    "repository {repo} has {in_repo} open upload sessions, the most allowed; finish or cancel some"
                )));
            }
            if of_client >= self.limits.per_client {
                return Err(BlobError::TooManyUploads(format!(
                    "you have {of_client} open upload sessions on this node, the most allowed; finish or cancel some"
                )));
            }
            let owner = Owner { repo: repo.as_str().to_owned(), client: client.to_owned() };
            sessions.insert(id.to_string(), (owner, Arc::new(AsyncMutex::new(s))));
        }
        let made = async {
            tokio::fs::create_dir_all(&dir).await?;
            tokio::fs::write(dir.join("repo"), repo.as_str()).await?;
            tokio::fs::File::create(data_path(&dir)).await?;
            Ok::<_, std::io::Error>(())
        }
        .await;
        if let Err(e) = made {
            self.sessions.lock().unwrap().remove(&id.to_string());
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e.into());
        }
        Ok(id)
    }

    /// Open sessions on this node.
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }

    /// Find a session of `repo`.
    async fn session(&self, id: &UploadId, repo: &Name) -> Result<Arc<AsyncMutex<Session>>, BlobError> {
        if id.node != self.node {
            return Err(BlobError::UploadUnknown);
        }
        let key = id.to_string();
        let existing = self.sessions.lock().unwrap().get(&key).map(|(o, s)| (o.repo == repo.as_str(), s.clone()));
        match existing {
            Some((true, s)) => Ok(s),
            Some((false, _)) => Err(BlobError::UploadUnknown),
            // Every session on disk was loaded at start; one missing from
            // the map is finished, cancelled or expired.
            None => Err(BlobError::UploadUnknown),
        }
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
    /// current size. A chunk that breaks midway is rolled back entirely; one
    /// cut for being too slow keeps what arrived.
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
                let s = self.sessions.lock().unwrap().remove(&key).map(|(_, s)| s);
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

/// Append `body` to the session's data file. A body cut for being too slow
/// keeps what arrived, so the client can ask for the upload's status and
/// resume; a broken body or a failed disk write leaves the session exactly
/// as it was (the running hash must then be recomputed).
async fn append_locked<S>(s: &mut Session, body: S) -> Result<(), BlobError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
{
    let start = s.size;
    match append_stream(&data_path(&s.dir), start, s.hasher.take(), body).await {
        Ok(done) => {
            s.size = start + done.bytes;
            s.hasher = done.hasher;
            match done.cut {
                None => Ok(()),
                Some(e) => Err(BlobError::Body(e)),
            }
        }
        Err(e) => {
            s.hasher = (start == 0).then(|| Algorithm::Sha256.hasher());
            Err(e)
        }
    }
}
