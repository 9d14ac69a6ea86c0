//! A FUSE filesystem for crash tests that models power loss.
//!
//! Everything written through it reaches a backing directory at once, so the
//! programs on it run as usual; beside that it remembers what a disk would
//! not yet hold if the power went:
//! - bytes written to a file since its last `fsync`/`fdatasync`;
//! - creates, renames, links and unlinks in a directory since its last
//!   `fsync` (a new file or directory's own name is durable only once its
//!   parent directory is fsynced, whatever was fsynced inside it).
//!
//! [`PowerLossFs::power_off`] discards exactly that, and every call fails
//! with EIO until [`PowerLossFs::power_on`]; the processes using the
//! filesystem are to be killed at the cut (their handles stay dead).
//!
//! The model is POSIX's promise, the one programs may rely on everywhere,
//! and so a little harsher than ext4 with `data=ordered` in two places:
//! ext4 commits a new file's directory entry with the journal when the file
//! is fsynced, and data written but not fsynced often reaches the disk
//! within seconds anyway. Here neither survives without the fsync that
//! POSIX asks for. Like ext4 it keeps a rename atomic (the old name or the
//! new, never a half), and it never tears a single write. Attributes other
//! than size (mode, times) are not rolled back.
//!
//! The page cache cannot hide anything: attributes and names are never
//! cached by the kernel (zero timeouts), and each open drops a file's
//! cached pages, so after a cut every reader sees what survived.

mod model;

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, BsdFileFlags, Config, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

use model::State;

/// Nothing is cached by the kernel: after a power cut it must ask again.
const TTL: Duration = Duration::ZERO;

/// A mounted power-loss filesystem; unmounted when dropped.
pub struct PowerLossFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl PowerLossFs {
    /// Mount an empty filesystem at `mountpoint` (an existing, empty
    /// directory), keeping its bytes under `backing` (created if missing;
    /// must not hold an earlier run's files). Needs /dev/fuse, root (or
    /// `user_allow_other`) and fusermount3.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<PowerLossFs> {
        let state = Arc::new(Mutex::new(State::new(backing.to_path_buf())?));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("powerloss".into()), MountOption::Subtype("powerloss".into())];
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(Fuse { state: state.clone() }, mountpoint, &config)?;
        Ok(PowerLossFs { state, mountpoint: mountpoint.to_path_buf(), session: Some(session) })
    }

    /// Whether this machine can mount one (for tests to skip honestly).
    pub fn available() -> Result<(), String> {
        if std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_err() {
            return Err("/dev/fuse cannot be opened (FUSE needs root or the fuse group)".into());
        }
        // Root mounts directly; anyone else goes through fusermount3.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let has_fusermount = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()));
        if !root && !has_fusermount {
            return Err("not root, and fusermount3 is not installed (Debian's fuse3 package)".into());
        }
        Ok(())
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Cut the power: from now on every call fails with EIO, and the
    /// filesystem holds exactly what had been made durable. Kill the
    /// processes using it next; their writes after this point are lost.
    pub fn power_off(&self) -> io::Result<()> {
        lock(&self.state).power_off()
    }

    /// Make everything durable, as `sync(1)` does on a real disk.
    pub fn sync(&self) {
        lock(&self.state).sync_everything()
    }

    /// Restore the power: the filesystem serves what survived the cut.
    pub fn power_on(&self) {
        lock(&self.state).power_on()
    }
}

impl Drop for PowerLossFs {
    fn drop(&mut self) {
        // A lazy unmount first: it cannot fail because a killed process's
        // files are still being closed, and the session's own unmount
        // then finds nothing left to do.
        if let Ok(path) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string; umount2 keeps no pointer.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        drop(self.session.take());
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The FUSE side: each call takes the one lock, so a power cut sees no
/// half-done operation.
struct Fuse {
    state: Arc<Mutex<State>>,
}

impl Fuse {
    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for Fuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.st().lookup(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.st().getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.st().setattr(ino.0, mode, uid, gid, size, atime.map(time), mtime.map(time)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        match self.st().create(parent.0, name, mode & !umask, req.uid(), req.gid(), false) {
            Ok((attr, _)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.st().mkdir(parent.0, name, mode & !umask, req.uid(), req.gid()) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.st().unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.st().rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.st().rename(parent.0, name, newparent.0, newname, noreplace) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        match self.st().link(ino.0, newparent.0, newname) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.st().open(ino.0, flags.0 & libc::O_TRUNC != 0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.st().create(parent.0, name, mode & !umask, req.uid(), req.gid(), true) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.st().read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.st().write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() does not make anything durable.
        match self.st().check_handle(fh.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.st().release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut st = self.st();
        match st.check_handle(fh.0).and_then(|_| st.fsync(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.st().opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let st = self.st();
        match st.readdir(fh.0) {
            Ok(listing) => {
                for (i, (ino, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.st().release(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut st = self.st();
        match st.check_handle(fh.0).and_then(|_| st.fsyncdir(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The backing filesystem's space: a program that checks free space
        // sees the real figure.
        let st = self.st();
        if st.is_off() {
            return reply.error(Errno::EIO);
        }
        match st.statvfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.st().getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.st().fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
