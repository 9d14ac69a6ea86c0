//! Making file system changes survive a power loss, by the rules POSIX
//! gives: a file's bytes are durable after an fsync of the file, a name
//! (a create, a rename, a new directory) after an fsync of the directory
//! holding it. A process kill never shows a missing step here (the kernel's
//! page cache survives it); a power loss does, and the crash tests cut the
//! power (`tests/power_loss.rs`).

use std::fs::File;
use std::io;
use std::path::Path;

/// The directory holding `path` ("." for a bare relative name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a directory: the names in it become durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Create `dir` and whatever parents it lacks, each new directory's name
/// made durable in its parent. Costs nothing once the directory exists.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.exists() {
        missing.push(p);
        match p.parent() {
            Some(up) if !up.as_os_str().is_empty() => p = up,
            _ => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    // Top down: a name is only worth syncing once its parent's is durable.
    for m in missing.iter().rev() {
        sync_dir(parent_of(m))?;
    }
    Ok(())
}

/// Move `src` (whose bytes the caller already fsynced) to `dst` and make the
/// new name durable: the directory `dst` is in must already exist durably.
pub fn rename_into_place(src: &Path, dst: &Path) -> io::Result<()> {
    std::fs::rename(src, dst)?;
    sync_dir(parent_of(dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_nested_directories_and_is_idempotent() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/c");
        create_dir_all(&d).unwrap();
        assert!(d.is_dir());
        create_dir_all(&d).unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        rename_into_place(&t.path().join("f"), &d.join("g")).unwrap();
        assert_eq!(std::fs::read(d.join("g")).unwrap(), b"x");
    }
}
