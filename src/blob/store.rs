use std::collections::HashSet;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;

use super::write::append_stream;
use super::BlobError;
use crate::oci::Digest;

/// Where blobs arriving from peers are written before they are verified.
const INCOMING: &str = ".incoming";

/// How an incoming copy is proven to match its digest.
enum Check {
    /// Hash it here, as it is written.
    Hash,
    /// Someone hashing the same bytes says whether they matched.
    Vouched(tokio::sync::oneshot::Receiver<bool>),
}

/// Read buffer for serving blobs: large enough that a pull is not
/// dominated by per-read overhead.
const READ_CHUNK: usize = 1 << 20;

/// The content-addressed store: `<root>/<algorithm>/<first two hex>/<hex>`.
/// A file exists here only if its bytes hashed to its name when written.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
    /// Blobs whose bytes this process has hashed (when writing them, or on
    /// a first read): served without re-hashing until the scrub says
    /// otherwise.
    verified: Arc<Mutex<HashSet<Digest>>>,
    /// Free space (bytes) below which this node takes no new content it
    /// can do without: uploads start elsewhere, read-throughs are not cached.
    reserve: u64,
    /// Striped by digest: a file put in place (or claimed again) and the
    /// garbage sweep's check-then-delete of the same digest never
    /// interleave, so the sweep never deletes a copy just written.
    placing: Arc<[Mutex<()>; PLACING_STRIPES]>,
}

const PLACING_STRIPES: usize = 64;

/// Bound on the verified set; past it the set restarts empty (reads then
/// verify again), so memory stays bounded for any number of blobs.
const MAX_VERIFIED: usize = 1 << 20;

/// An open blob, ready to stream a byte range.
pub struct BlobReader {
    file: tokio::fs::File,
    pub size: u64,
}

impl BlobStore {
    pub fn new(root: PathBuf) -> std::io::Result<BlobStore> {
        crate::durable::create_dir_all(&root)?;
        // Leftovers of transfers interrupted by a crash are never valid.
        let incoming = root.join(INCOMING);
        let _ = std::fs::remove_dir_all(&incoming);
        crate::durable::create_dir_all(&incoming)?;
        Ok(BlobStore {
            root,
            verified: Default::default(),
            reserve: 0,
            placing: Arc::new(std::array::from_fn(|_| Mutex::new(()))),
        })
    }

    /// Keep `bytes` free: see [`BlobStore::short_of_space`].
    pub fn with_reserve(mut self, bytes: u64) -> BlobStore {
        self.reserve = bytes;
        self
    }

    /// Whether the blob disk has less free space than the reserve.
    pub fn short_of_space(&self) -> bool {
        match self.free_bytes() {
            Ok(free) => free < self.reserve,
            Err(e) => {
                tracing::warn!(error = %e, "reading free space of the blob disk");
                false
            }
        }
    }

    /// Bytes free for new content on the blob disk.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.root.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is NUL-terminated and `st` is written by statvfs
        // before it is read (only when it returns 0).
        if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: statvfs returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        // The field types differ between platforms (u32 on some 32-bit ones).
        #[allow(clippy::unnecessary_cast)]
        let (blocks, size) = (st.f_bavail as u64, st.f_frsize as u64);
        Ok(blocks.saturating_mul(size))
    }

    /// Store a blob arriving as a stream (from a peer): hashed as it is
    /// written, kept only if it matches `expected`, fsynced before it
    /// becomes visible. Returns its size.
    pub async fn ingest<S>(&self, expected: &Digest, body: S) -> Result<u64, BlobError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
    {
        self.ingest_checked(expected, body, Check::Hash).await
    }

    /// Store a copy of bytes someone else is already hashing (a read-through
    /// stream on its way to a client): written unhashed, kept only when
    /// `verdict` says the whole stream matched `expected`. A dropped verdict
    /// (the stream ended early) keeps nothing.
    pub async fn ingest_vouched<S>(
        &self,
        expected: &Digest,
        body: S,
        verdict: tokio::sync::oneshot::Receiver<bool>,
    ) -> Result<u64, BlobError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
    {
        self.ingest_checked(expected, body, Check::Vouched(verdict)).await
    }

    async fn ingest_checked<S>(&self, expected: &Digest, body: S, check: Check) -> Result<u64, BlobError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
    {
        let tmp = self.root.join(INCOMING).join(format!("{:032x}", rand::random::<u128>()));
        tokio::fs::File::create(&tmp).await?;
        let result = async {
            let hasher = matches!(check, Check::Hash).then(|| expected.algorithm().hasher());
            let done = append_stream(&tmp, 0, hasher, body).await?;
            if let Some(e) = done.cut {
                return Err(BlobError::Body(e));
            }
            let (size, hasher) = (done.bytes, done.hasher);
            match (hasher, check) {
                (Some(h), _) => {
                    let computed = h.finish();
                    if &computed != expected {
                        return Err(BlobError::DigestMismatch { computed: computed.to_string() });
                    }
                }
                (None, Check::Vouched(verdict)) => {
                    if verdict.await != Ok(true) {
                        return Err(BlobError::DigestMismatch { computed: "not verified".into() });
                    }
                }
                (None, Check::Hash) => unreachable!("a hashed ingest always has a hasher"),
            }
            let store = self.clone();
            let (path, d) = (tmp.clone(), expected.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::File::open(&path)?.sync_all()?;
                store.commit_file(&path, &d)
            })
            .await
            .map_err(|e| BlobError::Io(std::io::Error::other(e)))??;
            Ok(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    pub fn is_verified(&self, d: &Digest) -> bool {
        self.verified.lock().unwrap().contains(d)
    }

    pub fn mark_verified(&self, d: &Digest) {
        let mut v = self.verified.lock().unwrap();
        if v.len() >= MAX_VERIFIED {
            v.clear();
        }
        v.insert(d.clone());
    }

    /// Re-hash a local copy; false if it is missing or does not match.
    pub async fn check(&self, d: &Digest) -> std::io::Result<bool> {
        self.check_at(d, 0).await
    }

    /// [`BlobStore::check`], reading at most `bytes_per_sec` (0: as fast
    /// as the disk goes): the background scrub's pace.
    pub async fn check_at(&self, d: &Digest, bytes_per_sec: u64) -> std::io::Result<bool> {
        let path = self.path(d);
        let alg = d.algorithm();
        let computed = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Digest>> {
            use std::io::Read;
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut h = alg.hasher();
            let mut buf = vec![0u8; READ_CHUNK];
            let started = std::time::Instant::now();
            let mut read = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Ok(Some(h.finish()));
                }
                h.update(&buf[..n]);
                read += n as u64;
                if bytes_per_sec > 0 {
                    let due = std::time::Duration::from_secs_f64(read as f64 / bytes_per_sec as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        })
        .await
        .map_err(std::io::Error::other)??;
        let ok = computed.as_ref() == Some(d);
        if ok {
            self.mark_verified(d);
        } else {
            self.verified.lock().unwrap().remove(d);
        }
        Ok(ok)
    }

    /// Remove a local copy (found corrupt, or no longer placed here).
    pub async fn remove(&self, d: &Digest) -> std::io::Result<()> {
        self.verified.lock().unwrap().remove(d);
        match tokio::fs::remove_file(self.path(d)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.root.join(d.algorithm().as_str()).join(&d.hex()[..2]).join(d.hex())
    }

    pub async fn contains(&self, d: &Digest) -> bool {
        tokio::fs::metadata(self.path(d)).await.is_ok()
    }

    pub async fn open(&self, d: &Digest) -> std::io::Result<Option<BlobReader>> {
        match tokio::fs::File::open(self.path(d)).await {
            Ok(file) => {
                let size = file.metadata().await?.len();
                Ok(Some(BlobReader { file, size }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn placing(&self, d: &Digest) -> std::sync::MutexGuard<'_, ()> {
        let h = d.hex().as_bytes().iter().take(8).fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(*b as usize));
        self.placing[h % PLACING_STRIPES].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The size of the local copy of `d`, if there is one, claimed afresh:
    /// its modification time is set to now, so the garbage sweep leaves it
    /// alone for a grace period while the caller records it in the index.
    pub async fn claim_existing(&self, d: &Digest) -> std::io::Result<Option<u64>> {
        let store = self.clone();
        let d = d.clone();
        tokio::task::spawn_blocking(move || {
            let _placing = store.placing(&d);
            match std::fs::OpenOptions::new().write(true).open(store.path(&d)) {
                Ok(f) => {
                    f.set_modified(std::time::SystemTime::now())?;
                    Ok(Some(f.metadata()?.len()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Delete the local copy of `d` if it was last written or claimed more
    /// than `grace` ago; its size if it was deleted. The caller has checked
    /// that the index does not name this node as a holder: a copy written
    /// since then is younger than `grace` and stays.
    pub async fn remove_unclaimed(&self, d: &Digest, grace: std::time::Duration) -> std::io::Result<Option<u64>> {
        let store = self.clone();
        let d = d.clone();
        tokio::task::spawn_blocking(move || {
            let _placing = store.placing(&d);
            let path = store.path(&d);
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let age = meta.modified()?.elapsed().unwrap_or_default();
            if age < grace {
                return Ok(None);
            }
            std::fs::remove_file(&path)?;
            store.verified.lock().unwrap().remove(&d);
            Ok(Some(meta.len()))
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// The fan-out directories of the store (`<algorithm>/<two hex>`), for
    /// a walk over every file a directory at a time.
    pub fn fan_out_dirs(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for alg in std::fs::read_dir(&self.root)? {
            let alg = alg?;
            if alg.file_name().to_string_lossy().starts_with('.') || !alg.file_type()?.is_dir() {
                continue;
            }
            for sub in std::fs::read_dir(alg.path())? {
                let sub = sub?;
                if sub.file_type()?.is_dir() {
                    out.push(sub.path());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The blobs stored in one fan-out directory (names that are not a
    /// digest of that directory are left out).
    pub fn blobs_in(&self, dir: &Path) -> std::io::Result<Vec<Digest>> {
        let alg = dir.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        let Some(alg) = alg else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Ok(d) = format!("{alg}:{name}").parse::<Digest>() {
                if self.path(&d).parent() == Some(dir) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// Move a verified, fsynced file into place. Blocking: call from a
    /// blocking context.
    pub fn commit_file(&self, src: &Path, d: &Digest) -> std::io::Result<()> {
        let _placing = self.placing(d);
        let dst = self.path(d);
        let dir = dst.parent().expect("blob path has a parent");
        // A new fan-out directory's own name must be durable too, or the
        // power takes the blob with it.
        crate::durable::create_dir_all(dir)?;
        // Replacing an existing copy is harmless (same verified bytes) and
        // heals one that rotted on disk.
        crate::durable::rename_into_place(src, &dst)?;
        self.mark_verified(d);
        Ok(())
    }
}

impl BlobReader {
    /// The open file itself, positioned at its start (for sendfile).
    pub async fn into_std(self) -> std::fs::File {
        self.file.into_std().await
    }

    /// Stream bytes `start..end` (end exclusive) of the blob. A blocking
    /// thread reads ahead in large chunks while hyper writes the previous
    /// ones, so a pull costs one read and one send per chunk.
    pub async fn stream(
        self,
        start: u64,
        end: u64,
    ) -> std::io::Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        let mut file = self.file.into_std().await;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek};
            if let Err(e) = file.seek(SeekFrom::Start(start)) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
            let mut left = end.saturating_sub(start);
            while left > 0 {
                let want = left.min(READ_CHUNK as u64) as usize;
                let mut buf = Vec::with_capacity(want);
                let res = match (&mut file).take(want as u64).read_to_end(&mut buf) {
                    Ok(n) if n == want => Ok(Bytes::from(buf)),
                    Ok(_) => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob file shrank")),
                    Err(e) => Err(e),
                };
                let failed = res.is_err();
                if tx.blocking_send(res).is_err() || failed {
                    return;
                }
                left -= want as u64;
            }
        });
        Ok(tokio_stream_of(rx))
    }
}

fn tokio_stream_of<T: Send + 'static>(rx: tokio::sync::mpsc::Receiver<T>) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn age(store: &BlobStore, d: &Digest, by: Duration) {
        let f = std::fs::OpenOptions::new().write(true).open(store.path(d)).unwrap();
        f.set_modified(SystemTime::now() - by).unwrap();
    }

    /// The garbage sweep takes only copies nothing wrote or claimed for the
    /// grace period: a copy just put in place, or one already here that a
    /// replication claims again, stays while its holder is being recorded.
    #[tokio::test]
    async fn the_sweep_takes_only_copies_untouched_for_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().join("blobs")).unwrap();
        let data = Bytes::from_static(b"some blob");
        let mut h = crate::oci::Algorithm::Sha256.hasher();
        h.update(&data);
        let d = h.finish();
        store.ingest(&d, futures::stream::iter([Ok(data.clone())])).await.unwrap();
        let grace = Duration::from_secs(60);

        assert_eq!(store.remove_unclaimed(&d, grace).await.unwrap(), None, "just written: kept");
        age(&store, &d, 2 * grace);
        assert_eq!(store.claim_existing(&d).await.unwrap(), Some(data.len() as u64));
        assert_eq!(store.remove_unclaimed(&d, grace).await.unwrap(), None, "claimed again: kept");
        assert!(store.contains(&d).await);

        age(&store, &d, 2 * grace);
        assert_eq!(store.remove_unclaimed(&d, grace).await.unwrap(), Some(data.len() as u64));
        assert!(!store.contains(&d).await);
        assert_eq!(store.claim_existing(&d).await.unwrap(), None, "nothing left to claim");
        let dirs = store.fan_out_dirs().unwrap();
        assert_eq!(dirs.len(), 1);
        assert!(store.blobs_in(&dirs[0]).unwrap().is_empty());
    }
}
