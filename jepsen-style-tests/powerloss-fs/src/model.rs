//! The filesystem as the power sees it: every inode in memory, file bytes
//! in backing files, and beside each change what the disk would hold if the
//! power went now.
//!
//! Writes are applied at once (so reads are plain), and each inode keeps
//! just enough to undo what is not durable yet:
//! - a file written since its last fsync remembers its durable length (an
//!   append is undone by truncating back to it) and, if bytes below that
//!   length were overwritten or cut, a backup copy of its durable bytes;
//! - a directory changed since its last fsync keeps a copy of its durable
//!   entries.
//!
//! [`State::power_off`] puts every directory back to its durable entries
//! and every file back to its durable bytes, then drops whatever is no
//! longer reachable from the root: a file whose name was never made durable
//! is gone, whatever was fsynced into it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::SystemTime;

use fuser::{Errno, FileAttr, FileType, INodeNo};

/// An inode number; never reused, so a stale one the kernel still holds
/// after a power cut can only miss.
pub type Ino = u64;
pub const ROOT: Ino = 1;

/// How many unlinked, closed inodes may wait before a sweep removes their
/// backing files (each sweep walks the whole tree).
const SWEEP_AFTER: usize = 256;

type Res<T> = Result<T, Errno>;

fn io_errno(e: io::Error) -> Errno {
    Errno::from(e)
}

/// What a file has changed since it was last fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dirty {
    /// Its length at the last fsync: bytes past it are lost with the power.
    durable_len: u64,
    /// Bytes below `durable_len` were overwritten or cut: the durable bytes
    /// are in the backup file.
    backup: bool,
}

#[derive(Debug)]
struct FileNode {
    size: u64,
    /// Opened read-write on the backing file for the inode's whole life.
    data: File,
    /// None: everything written is durable.
    dirty: Option<Dirty>,
}

#[derive(Debug, Default)]
struct DirNode {
    entries: BTreeMap<OsString, Ino>,
    /// The entries at the last fsync of this directory; None: unchanged since.
    durable: Option<BTreeMap<OsString, Ino>>,
    parent: Ino,
}

#[derive(Debug)]
enum Kind {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Names in current directory entries.
    links: u32,
    /// Open handles (files and directories).
    open: u32,
}

/// An open file or directory. Handles from before a power cut are dead.
#[derive(Debug)]
struct Handle {
    ino: Ino,
    boot: u64,
    /// A directory's entries when it was opened, so offsets stay meaningful.
    listing: Option<Vec<(Ino, FileType, OsString)>>,
}

/// Every inode and handle, and whether the power is on.
#[derive(Debug)]
pub struct State {
    nodes: HashMap<Ino, Node>,
    handles: HashMap<u64, Handle>,
    next_ino: Ino,
    next_fh: u64,
    data_dir: PathBuf,
    backup_dir: PathBuf,
    /// Bumped at each power cut: handles carry the boot they were opened in.
    boot: u64,
    off: bool,
    /// Inodes with no name and no handle since the last sweep.
    unlinked: usize,
}

impl State {
    /// An empty filesystem whose bytes live under `backing` (which must be
    /// empty or absent).
    pub fn new(backing: PathBuf) -> io::Result<State> {
        let data_dir = backing.join("data");
        let backup_dir = backing.join("durable");
        std::fs::create_dir_all(&data_dir)?;
        std::fs::create_dir_all(&backup_dir)?;
        let now = SystemTime::now();
        let root = Node {
            kind: Kind::Dir(DirNode { parent: ROOT, ..DirNode::default() }),
            perm: 0o755,
            uid: 0,
            gid: 0,
            atime: now,
            mtime: now,
            ctime: now,
            links: 1,
            open: 0,
        };
        Ok(State {
            nodes: HashMap::from([(ROOT, root)]),
            handles: HashMap::new(),
            next_ino: ROOT + 1,
            next_fh: 1,
            data_dir,
            backup_dir,
            boot: 0,
            off: false,
            unlinked: 0,
        })
    }

    fn on(&self) -> Res<()> {
        if self.off {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    fn node(&self, ino: Ino) -> Res<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: Ino) -> Res<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: Ino) -> Res<&DirNode> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Res<&mut DirNode> {
        match &mut self.node_mut(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn data_path(&self, ino: Ino) -> PathBuf {
        self.data_dir.join(ino.to_string())
    }

    fn backup_path(&self, ino: Ino) -> PathBuf {
        self.backup_dir.join(ino.to_string())
    }

    /// Change directory `ino`'s entries: its durable entries are kept first.
    fn entries_mut(&mut self, ino: Ino) -> Res<&mut BTreeMap<OsString, Ino>> {
        let d = self.dir_mut(ino)?;
        if d.durable.is_none() {
            d.durable = Some(d.entries.clone());
        }
        Ok(&mut d.entries)
    }

    pub fn attr(&self, ino: Ino) -> Res<FileAttr> {
        let n = self.node(ino)?;
        let (kind, size, nlink) = match &n.kind {
            Kind::File(f) => (FileType::RegularFile, f.size, n.links),
            Kind::Dir(_) => (FileType::Directory, 4096, 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.ctime,
            crtime: n.ctime,
            kind,
            perm: n.perm,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Res<FileAttr> {
        self.on()?;
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        self.attr(ino)
    }

    pub fn getattr(&self, ino: Ino) -> Res<FileAttr> {
        self.on()?;
        self.attr(ino)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &mut self,
        ino: Ino,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Res<FileAttr> {
        self.on()?;
        if let Some(size) = size {
            self.truncate(ino, size)?;
        }
        let n = self.node_mut(ino)?;
        if let Some(m) = mode {
            n.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(g) = gid {
            n.gid = g;
        }
        if let Some(t) = atime {
            n.atime = t;
        }
        if let Some(t) = mtime {
            n.mtime = t;
        }
        n.ctime = SystemTime::now();
        self.attr(ino)
    }

    fn check_name(&self, parent: Ino, name: &OsStr) -> Res<()> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }

    fn add_node(&mut self, kind: Kind, mode: u32, uid: u32, gid: u32) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        self.nodes.insert(
            ino,
            Node {
                kind,
                perm: (mode & 0o7777) as u16,
                uid,
                gid,
                atime: now,
                mtime: now,
                ctime: now,
                links: 0,
                open: 0,
            },
        );
        ino
    }

    fn link_name(&mut self, parent: Ino, name: &OsStr, ino: Ino) -> Res<()> {
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        self.node_mut(ino)?.links += 1;
        let now = SystemTime::now();
        let p = self.node_mut(parent)?;
        p.mtime = now;
        p.ctime = now;
        Ok(())
    }

    fn unlink_name(&mut self, parent: Ino, name: &OsStr) -> Res<Ino> {
        let ino = self.entries_mut(parent)?.remove(name).ok_or(Errno::ENOENT)?;
        let now = SystemTime::now();
        let p = self.node_mut(parent)?;
        p.mtime = now;
        p.ctime = now;
        let n = self.node_mut(ino)?;
        n.links -= 1;
        n.ctime = now;
        if n.links == 0 && n.open == 0 {
            self.note_unlinked();
        }
        Ok(ino)
    }

    pub fn mkdir(&mut self, parent: Ino, name: &OsStr, mode: u32, uid: u32, gid: u32) -> Res<FileAttr> {
        self.on()?;
        self.check_name(parent, name)?;
        let ino = self.add_node(Kind::Dir(DirNode { parent, ..DirNode::default() }), mode, uid, gid);
        self.link_name(parent, name, ino)?;
        self.attr(ino)
    }

    /// Create a regular file; with `open`, also a handle on it.
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
        open: bool,
    ) -> Res<(FileAttr, u64)> {
        self.on()?;
        self.check_name(parent, name)?;
        let ino = self.next_ino;
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.data_path(ino))
            .map_err(io_errno)?;
        let ino2 = self.add_node(Kind::File(FileNode { size: 0, data, dirty: None }), mode, uid, gid);
        debug_assert_eq!(ino, ino2);
        self.link_name(parent, name, ino)?;
        let fh = if open { self.open_handle(ino, None)? } else { 0 };
        Ok((self.attr(ino)?, fh))
    }

    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Res<()> {
        self.on()?;
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        if matches!(self.node(ino)?.kind, Kind::Dir(_)) {
            return Err(Errno::EISDIR);
        }
        self.unlink_name(parent, name)?;
        Ok(())
    }

    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Res<()> {
        self.on()?;
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        if !self.dir(ino)?.entries.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.unlink_name(parent, name)?;
        Ok(())
    }

    /// Whether `ino` is `anc` or lies under it in the current tree.
    fn is_within(&self, mut ino: Ino, anc: Ino) -> bool {
        loop {
            if ino == anc {
                return true;
            }
            match self.dir(ino) {
                Ok(d) if d.parent != ino => ino = d.parent,
                _ => return false,
            }
        }
    }

    pub fn rename(&mut self, parent: Ino, name: &OsStr, newparent: Ino, newname: &OsStr, noreplace: bool) -> Res<()> {
        self.on()?;
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        self.dir(newparent)?;
        if newname.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let is_dir = matches!(self.node(ino)?.kind, Kind::Dir(_));
        if is_dir && self.is_within(newparent, ino) {
            return Err(Errno::EINVAL);
        }
        if let Some(&old) = self.dir(newparent)?.entries.get(newname) {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(Errno::EEXIST);
            }
            match (&self.node(old)?.kind, is_dir) {
                (Kind::Dir(d), true) if !d.entries.is_empty() => return Err(Errno::ENOTEMPTY),
                (Kind::Dir(_), false) => return Err(Errno::EISDIR),
                (Kind::File(_), true) => return Err(Errno::ENOTDIR),
                _ => {}
            }
            self.unlink_name(newparent, newname)?;
        }
        // The new name first: the inode is never without one (a sweep in
        // between would take it).
        self.link_name(newparent, newname, ino)?;
        self.unlink_name(parent, name)?;
        if let Kind::Dir(d) = &mut self.node_mut(ino)?.kind {
            d.parent = newparent;
        }
        Ok(())
    }

    pub fn link(&mut self, ino: Ino, newparent: Ino, newname: &OsStr) -> Res<FileAttr> {
        self.on()?;
        if matches!(self.node(ino)?.kind, Kind::Dir(_)) {
            return Err(Errno::EPERM);
        }
        self.check_name(newparent, newname)?;
        self.link_name(newparent, newname, ino)?;
        self.attr(ino)
    }

    fn open_handle(&mut self, ino: Ino, listing: Option<Vec<(Ino, FileType, OsString)>>) -> Res<u64> {
        self.node_mut(ino)?.open += 1;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, boot: self.boot, listing });
        Ok(fh)
    }

    /// A live handle's inode: a handle from before a power cut gets EIO.
    fn handle(&self, fh: u64) -> Res<&Handle> {
        self.on()?;
        let h = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        if h.boot != self.boot {
            return Err(Errno::EIO);
        }
        Ok(h)
    }

    pub fn open(&mut self, ino: Ino, truncate: bool) -> Res<u64> {
        self.on()?;
        match self.node(ino)?.kind {
            Kind::Dir(_) => return Err(Errno::EISDIR),
            Kind::File(_) => {}
        }
        if truncate {
            self.truncate(ino, 0)?;
        }
        self.open_handle(ino, None)
    }

    pub fn opendir(&mut self, ino: Ino) -> Res<u64> {
        self.on()?;
        let d = self.dir(ino)?;
        let mut listing = vec![(ino, FileType::Directory, ".".into()), (d.parent, FileType::Directory, "..".into())];
        for (name, &child) in &d.entries {
            let kind = match self.node(child)?.kind {
                Kind::Dir(_) => FileType::Directory,
                Kind::File(_) => FileType::RegularFile,
            };
            listing.push((child, kind, name.clone()));
        }
        self.open_handle(ino, Some(listing))
    }

    pub fn readdir(&self, fh: u64) -> Res<&[(Ino, FileType, OsString)]> {
        Ok(self.handle(fh)?.listing.as_deref().unwrap_or(&[]))
    }

    /// Close a handle; allowed with the power off (the killed processes'
    /// files are closed after the cut).
    pub fn release(&mut self, fh: u64) {
        let Some(h) = self.handles.remove(&fh) else { return };
        if h.boot != self.boot {
            return;
        }
        if let Some(n) = self.nodes.get_mut(&h.ino) {
            n.open -= 1;
            if n.open == 0 && n.links == 0 {
                self.note_unlinked();
            }
        }
    }

    fn file(&self, ino: Ino) -> Res<&FileNode> {
        match &self.node(ino)?.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(Errno::EISDIR),
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        let ino = self.handle(fh)?.ino;
        let f = self.file(ino)?;
        let len = f.size.saturating_sub(offset).min(u64::from(size)) as usize;
        let mut buf = vec![0; len];
        f.data.read_exact_at(&mut buf, offset).map_err(io_errno)?;
        Ok(buf)
    }

    /// Before changing file `ino` from byte `from` on: remember its durable
    /// length, and back up its durable bytes if `from` cuts into them.
    fn before_change(&mut self, ino: Ino, from: u64) -> Res<()> {
        let backup = self.backup_path(ino);
        let Kind::File(f) = &mut self.node_mut(ino)?.kind else { return Err(Errno::EISDIR) };
        let dirty = f.dirty.get_or_insert(Dirty { durable_len: f.size, backup: false });
        if from < dirty.durable_len && !dirty.backup {
            let mut out = File::create(&backup).map_err(io_errno)?;
            let mut reader = PositionedReader { file: &f.data, pos: 0, left: dirty.durable_len };
            io::copy(&mut reader, &mut out).map_err(io_errno)?;
            dirty.backup = true;
        }
        Ok(())
    }

    pub fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Res<u32> {
        let ino = self.handle(fh)?.ino;
        self.before_change(ino, offset)?;
        let n = self.node_mut(ino)?;
        let now = SystemTime::now();
        n.mtime = now;
        n.ctime = now;
        let Kind::File(f) = &mut n.kind else { return Err(Errno::EISDIR) };
        f.data.write_all_at(data, offset).map_err(io_errno)?;
        f.size = f.size.max(offset + data.len() as u64);
        Ok(data.len() as u32)
    }

    fn truncate(&mut self, ino: Ino, size: u64) -> Res<()> {
        self.before_change(ino, size)?;
        let n = self.node_mut(ino)?;
        let now = SystemTime::now();
        n.mtime = now;
        n.ctime = now;
        let Kind::File(f) = &mut n.kind else { return Err(Errno::EISDIR) };
        f.data.set_len(size).map_err(io_errno)?;
        f.size = size;
        Ok(())
    }

    /// fallocate: only the modes that change no byte a reader sees
    /// (reserve space, or extend with zeros).
    pub fn fallocate(&mut self, fh: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        let ino = self.handle(fh)?.ino;
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let size = self.file(ino)?.size;
        if !keep_size && offset + length > size {
            self.before_change(ino, size)?;
        }
        let Kind::File(f) = &mut self.node_mut(ino)?.kind else { return Err(Errno::EISDIR) };
        // SAFETY: fallocate on a descriptor this inode owns; no memory is passed.
        let rc =
            unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f.data), mode, offset as i64, length as i64) };
        if rc != 0 {
            return Err(io_errno(io::Error::last_os_error()));
        }
        if !keep_size {
            f.size = f.size.max(offset + length);
        }
        Ok(())
    }

    /// fsync or fdatasync of a file: its bytes become durable (its name
    /// does not: that takes an fsync of the directory).
    pub fn fsync(&mut self, ino: Ino) -> Res<()> {
        self.on()?;
        let backup = self.backup_path(ino);
        let Kind::File(f) = &mut self.node_mut(ino)?.kind else { return Err(Errno::EISDIR) };
        if f.dirty.take().is_some_and(|d| d.backup) {
            std::fs::remove_file(backup).map_err(io_errno)?;
        }
        Ok(())
    }

    /// fsync of a directory: its entries become durable.
    pub fn fsyncdir(&mut self, ino: Ino) -> Res<()> {
        self.on()?;
        if self.dir_mut(ino)?.durable.take().is_some() {
            self.note_unlinked_maybe_sweep();
        }
        Ok(())
    }

    pub fn check_handle(&self, fh: u64) -> Res<Ino> {
        Ok(self.handle(fh)?.ino)
    }

    pub fn is_off(&self) -> bool {
        self.off
    }

    /// The backing filesystem's space.
    pub fn statvfs(&self) -> Res<libc::statvfs> {
        let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(self.data_dir.as_os_str()))
            .map_err(|_| Errno::EINVAL)?;
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a pointer to a statvfs we own.
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return Err(io_errno(io::Error::last_os_error()));
        }
        Ok(s)
    }

    fn note_unlinked(&mut self) {
        self.unlinked += 1;
        self.note_unlinked_maybe_sweep();
    }

    fn note_unlinked_maybe_sweep(&mut self) {
        if self.unlinked >= SWEEP_AFTER {
            self.sweep(false);
        }
    }

    /// Remove every inode no current or durable entry reaches (nor, with
    /// the power on, an open handle), with its backing files.
    fn sweep(&mut self, after_cut: bool) {
        let mut seen: HashSet<Ino> = HashSet::new();
        let mut todo: Vec<Ino> = vec![ROOT];
        if !after_cut {
            todo.extend(self.nodes.iter().filter(|(_, n)| n.open > 0).map(|(i, _)| *i));
        }
        while let Some(ino) = todo.pop() {
            if !seen.insert(ino) {
                continue;
            }
            if let Some(Node { kind: Kind::Dir(d), .. }) = self.nodes.get(&ino) {
                todo.extend(d.entries.values());
                if let Some(durable) = &d.durable {
                    todo.extend(durable.values());
                }
            }
        }
        let gone: Vec<Ino> = self.nodes.keys().filter(|i| !seen.contains(i)).copied().collect();
        for ino in gone {
            if let Some(Node { kind: Kind::File(_), .. }) = self.nodes.remove(&ino) {
                let _ = std::fs::remove_file(self.data_path(ino));
                let _ = std::fs::remove_file(self.backup_path(ino));
            }
        }
        self.unlinked = 0;
    }

    /// The power goes: from now on every call fails with EIO, and the
    /// filesystem holds exactly what was durable.
    pub fn power_off(&mut self) -> io::Result<()> {
        self.off = true;
        self.boot += 1;
        self.handles.clear();
        let inos: Vec<Ino> = self.nodes.keys().copied().collect();
        for ino in inos {
            let data_path = self.data_path(ino);
            let backup_path = self.backup_path(ino);
            let Some(n) = self.nodes.get_mut(&ino) else { continue };
            n.open = 0;
            match &mut n.kind {
                Kind::Dir(d) => {
                    if let Some(durable) = d.durable.take() {
                        d.entries = durable;
                    }
                }
                Kind::File(f) => match f.dirty.take() {
                    None => {}
                    Some(Dirty { backup: true, durable_len }) => {
                        std::fs::rename(&backup_path, &data_path)?;
                        f.data = std::fs::OpenOptions::new().read(true).write(true).open(&data_path)?;
                        f.size = durable_len;
                    }
                    Some(Dirty { backup: false, durable_len }) => {
                        f.data.set_len(durable_len)?;
                        f.size = durable_len;
                    }
                },
            }
        }
        // Count names again, from the root; a directory reached twice (a
        // rename between directories durable on one side only) keeps its
        // first name, as a journaled rename would.
        for n in self.nodes.values_mut() {
            n.links = 0;
        }
        let mut seen_dirs: HashSet<Ino> = HashSet::from([ROOT]);
        let mut todo = vec![ROOT];
        while let Some(dir) = todo.pop() {
            let entries: Vec<(OsString, Ino)> = match self.nodes.get(&dir) {
                Some(Node { kind: Kind::Dir(d), .. }) => d.entries.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                _ => continue,
            };
            for (name, child) in entries {
                let is_dir = matches!(self.nodes.get(&child), Some(Node { kind: Kind::Dir(_), .. }));
                if is_dir && !seen_dirs.insert(child) {
                    if let Some(Node { kind: Kind::Dir(d), .. }) = self.nodes.get_mut(&dir) {
                        d.entries.remove(&name);
                    }
                    continue;
                }
                let Some(c) = self.nodes.get_mut(&child) else { continue };
                c.links += 1;
                if let Kind::Dir(d) = &mut c.kind {
                    d.parent = dir;
                    todo.push(child);
                }
            }
        }
        self.sweep(true);
        Ok(())
    }

    /// Everything written so far becomes durable (`sync`).
    pub fn sync_everything(&mut self) {
        let inos: Vec<Ino> = self.nodes.keys().copied().collect();
        for ino in inos {
            let _ = match self.nodes.get(&ino).map(|n| matches!(n.kind, Kind::Dir(_))) {
                Some(true) => self.dir_mut(ino).map(|d| drop(d.durable.take())),
                Some(false) => self.fsync(ino),
                None => Ok(()),
            };
        }
        self.sweep(false);
    }

    /// The power comes back: the filesystem serves what survived.
    pub fn power_on(&mut self) {
        self.off = false;
    }
}

/// Reads a file from a position without touching its cursor.
struct PositionedReader<'a> {
    file: &'a File,
    pos: u64,
    left: u64,
}

impl io::Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}
