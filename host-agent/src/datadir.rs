//! Exclusive use of a data dir: two agents on one dir would wipe each other's environments
//! and race on the function store, so the second one refuses to start.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Held for the agent's life; the lock goes with the file descriptor (also on a crash).
pub struct DataDirLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("data dir {path} is in use by another kindling (pid {pid}); stop it or pass another --data-dir")]
    InUse { path: PathBuf, pid: String },
    #[error("data dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates `dir` if needed and takes its lock (`<dir>/.lock`, holding the owner's pid).
pub fn lock(dir: &Path) -> Result<DataDirLock, LockError> {
    let io_err = |source| LockError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(".lock"))
        .map_err(io_err)?;
    // SAFETY: flock(2) on a descriptor we own; it only changes the lock state of the file.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(LockError::InUse {
                path: dir.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        }
        return Err(io_err(err));
    }
    file.set_len(0).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    writeln!(file, "{}", std::process::id()).map_err(io_err)?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        match lock(dir.path()) {
            Err(LockError::InUse { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("second lock must be refused"),
        }
        drop(first);
        assert!(lock(dir.path()).is_ok());
    }
}
