//! The power-loss filesystem itself, mounted for real: what survives a cut
//! is exactly what was fsynced, names included.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use powerloss_fs::PowerLossFs;

struct Disk {
    fs: PowerLossFs,
    _dir: tempfile::TempDir,
}

impl Disk {
    fn root(&self) -> PathBuf {
        self.fs.mountpoint().to_path_buf()
    }

    fn cut(&self) {
        self.fs.power_off().unwrap();
        self.fs.power_on();
    }
}

/// A mounted filesystem, or None (said loudly) where FUSE is not available.
fn disk() -> Option<Disk> {
    if let Err(why) = PowerLossFs::available() {
        let why = format!("power-loss filesystem tests: {why}");
        eprintln!("SKIPPED: {why}");
        if let Some(path) = std::env::var_os("BERTH_SKIP_LOG") {
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{why}");
            }
        }
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let fs = PowerLossFs::mount(&dir.path().join("backing"), &mnt).unwrap();
    Some(Disk { fs, _dir: dir })
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn write_synced(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read(p: &Path) -> Option<Vec<u8>> {
    match fs::read(p) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("reading {}: {e}", p.display()),
    }
}

#[test]
fn bytes_not_fsynced_are_lost_and_fsynced_ones_kept() {
    let Some(d) = disk() else { return };
    let a = d.root().join("a");
    write_synced(&a, b"hello");
    sync_dir(&d.root());
    let mut f = OpenOptions::new().append(true).open(&a).unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(read(&a).unwrap(), b"hello world", "written bytes are read back before the cut");
    d.cut();
    assert_eq!(read(&a).unwrap(), b"hello", "an append without fsync is lost");

    // fdatasync counts as well.
    let f = OpenOptions::new().append(true).open(&a).unwrap();
    (&f).write_all(b"!").unwrap();
    f.sync_data().unwrap();
    drop(f);
    d.cut();
    assert_eq!(read(&a).unwrap(), b"hello!");
}

#[test]
fn overwritten_and_truncated_bytes_come_back_until_fsynced() {
    let Some(d) = disk() else { return };
    let a = d.root().join("a");
    write_synced(&a, b"AAAAAAAA");
    sync_dir(&d.root());
    let f = OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(b"BB", 2).unwrap();
    f.write_all_at(b"CCCC", 6).unwrap();
    drop(f);
    assert_eq!(read(&a).unwrap(), b"AABBAACCCC");
    d.cut();
    assert_eq!(read(&a).unwrap(), b"AAAAAAAA", "overwrites without fsync are undone");

    let f = OpenOptions::new().write(true).open(&a).unwrap();
    f.set_len(3).unwrap();
    drop(f);
    d.cut();
    assert_eq!(read(&a).unwrap(), b"AAAAAAAA", "a truncation without fsync is undone");

    let f = OpenOptions::new().write(true).open(&a).unwrap();
    f.set_len(3).unwrap();
    f.write_all_at(b"Z", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    d.cut();
    assert_eq!(read(&a).unwrap(), b"ZAA");
}

#[test]
fn a_new_name_needs_an_fsync_of_its_directory() {
    let Some(d) = disk() else { return };
    let a = d.root().join("a");
    write_synced(&a, b"data fsynced, name not");
    d.cut();
    assert_eq!(read(&a), None, "a file whose directory was never fsynced is gone");

    write_synced(&a, b"both");
    sync_dir(&d.root());
    d.cut();
    assert_eq!(read(&a).unwrap(), b"both");

    // A new directory is the same: its name is in its parent.
    let sub = d.root().join("sub");
    fs::create_dir(&sub).unwrap();
    write_synced(&sub.join("f"), b"x");
    sync_dir(&sub);
    d.cut();
    assert!(!sub.exists(), "a directory whose parent was never fsynced is gone, with what it held");

    fs::create_dir(&sub).unwrap();
    sync_dir(&d.root());
    write_synced(&sub.join("f"), b"x");
    sync_dir(&sub);
    d.cut();
    assert_eq!(read(&sub.join("f")).unwrap(), b"x");
}

#[test]
fn rename_and_unlink_are_undone_until_the_directory_is_fsynced() {
    let Some(d) = disk() else { return };
    let (tmp, fin) = (d.root().join("tmp"), d.root().join("final"));
    write_synced(&fin, b"old");
    write_synced(&tmp, b"new");
    sync_dir(&d.root());
    fs::rename(&tmp, &fin).unwrap();
    assert_eq!(read(&fin).unwrap(), b"new");
    d.cut();
    assert_eq!(read(&fin).unwrap(), b"old", "a rename over a file is undone without a directory fsync");
    assert_eq!(read(&tmp).unwrap(), b"new", "and the source name is back");

    fs::rename(&tmp, &fin).unwrap();
    sync_dir(&d.root());
    d.cut();
    assert_eq!(read(&fin).unwrap(), b"new");
    assert_eq!(read(&tmp), None);

    fs::remove_file(&fin).unwrap();
    d.cut();
    assert_eq!(read(&fin).unwrap(), b"new", "an unlink is undone without a directory fsync");
    fs::remove_file(&fin).unwrap();
    sync_dir(&d.root());
    d.cut();
    assert_eq!(read(&fin), None);

    // The classic mistake: rename a file whose bytes were never fsynced.
    let mut f = File::create(&tmp).unwrap();
    f.write_all(b"unsynced").unwrap();
    drop(f);
    fs::rename(&tmp, &fin).unwrap();
    sync_dir(&d.root());
    d.cut();
    assert_eq!(read(&fin).unwrap(), b"", "the name survives, the bytes do not");
}

#[test]
fn hard_links_share_durable_bytes() {
    let Some(d) = disk() else { return };
    let (a, b) = (d.root().join("a"), d.root().join("b"));
    write_synced(&a, b"one");
    fs::hard_link(&a, &b).unwrap();
    sync_dir(&d.root());
    fs::remove_file(&a).unwrap();
    sync_dir(&d.root());
    d.cut();
    assert_eq!(read(&a), None);
    assert_eq!(read(&b).unwrap(), b"one");
}

#[test]
fn nothing_is_served_while_off_and_old_handles_stay_dead() {
    let Some(d) = disk() else { return };
    let a = d.root().join("a");
    write_synced(&a, b"x");
    sync_dir(&d.root());
    let mut f = OpenOptions::new().read(true).write(true).open(&a).unwrap();
    d.fs.power_off().unwrap();
    assert!(f.write_all(b"y").and_then(|_| f.sync_all()).is_err(), "a write with the power off fails");
    assert!(fs::metadata(&a).is_err(), "so does a stat");
    d.fs.power_on();
    let mut buf = Vec::new();
    assert!(f.read_to_end(&mut buf).is_err(), "a handle from before the cut stays dead");
    assert_eq!(read(&a).unwrap(), b"x", "a new open sees what survived");
}

#[test]
fn directory_listings_show_what_survived() {
    let Some(d) = disk() else { return };
    for i in 0..300 {
        write_synced(&d.root().join(format!("f{i:03}")), b"");
    }
    sync_dir(&d.root());
    for i in 0..300 {
        if i % 2 == 0 {
            fs::remove_file(d.root().join(format!("f{i:03}"))).unwrap();
        }
    }
    write_synced(&d.root().join("late"), b"");
    let mut names: Vec<String> =
        fs::read_dir(d.root()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names.len(), 151);
    d.cut();
    let mut names: Vec<String> =
        fs::read_dir(d.root()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let want: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
    assert_eq!(names, want);
}
