//! The CA directory, in Istio's plug-in CA layout, that agents on a node share: lock, read, write.
//!
//! Istio's names and meaning: `ca-cert.pem` signs workload certificates, `ca-key.pem` is its
//! key, `root-cert.pem` is the trust root, `cert-chain.pem` the chain from `ca-cert` to the root.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

pub(crate) const CA_CERT: &str = "ca-cert.pem";
pub(crate) const CA_KEY: &str = "ca-key.pem";
pub(crate) const ROOT_CERT: &str = "root-cert.pem";
pub(crate) const CERT_CHAIN: &str = "cert-chain.pem";
const LOCK: &str = ".lock";

/// Why the CA directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaDirError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{dir} holds an incomplete plug-in CA: {missing} missing (all of {CA_CERT}, {CA_KEY}, {ROOT_CERT} and {CERT_CHAIN} are needed)", dir = dir.display())]
    Incomplete { dir: PathBuf, missing: String },
    #[error("{dir} has no CA files and is not writable, so no CA can be created there", dir = dir.display())]
    NotWritable { dir: PathBuf },
}

/// The raw contents of the four files.
pub(crate) struct CaFiles {
    pub ca_cert: Vec<u8>,
    pub ca_key: Vec<u8>,
    pub root_cert: Vec<u8>,
    pub cert_chain: Vec<u8>,
}

/// Exclusive use of the CA directory while alive, so that agents starting together agree on
/// one CA: the first creates it, the others wait and then read it.
pub(crate) struct CaDir {
    dir: PathBuf,
    /// The `flock`ed `.lock` file; `None` when the directory is read-only (a mounted Secret with
    /// plug-in certificates), where nobody can create a CA and reading needs no lock.
    lock: Option<File>,
}

impl CaDir {
    /// Creates the directory if needed (mode 0700) and blocks until its lock is ours.
    pub(crate) fn lock(dir: &Path) -> Result<Self, CaDirError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| io_error("creating", dir, source))?;
        let lock_path = dir.join(LOCK);
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
        {
            Ok(file) => file,
            Err(e) if is_not_writable(&e) => {
                return Ok(Self {
                    dir: dir.to_owned(),
                    lock: None,
                });
            }
            Err(source) => return Err(io_error("opening", &lock_path, source)),
        };
        // flock(2): released when the file is closed, including when the process dies.
        file.lock()
            .map_err(|source| io_error("locking", &lock_path, source))?;
        Ok(Self {
            dir: dir.to_owned(),
            lock: Some(file),
        })
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// All four files, `None` when there are none, an error when only some are there.
    pub(crate) fn read(&self) -> Result<Option<CaFiles>, CaDirError> {
        let mut missing = Vec::new();
        let mut read = |name: &'static str| -> Result<Vec<u8>, CaDirError> {
            let path = self.path(name);
            match fs::read(&path) {
                Ok(bytes) => Ok(bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.push(name);
                    Ok(Vec::new())
                }
                Err(source) => Err(io_error("reading", &path, source)),
            }
        };
        let files = CaFiles {
            ca_cert: read(CA_CERT)?,
            ca_key: read(CA_KEY)?,
            root_cert: read(ROOT_CERT)?,
            cert_chain: read(CERT_CHAIN)?,
        };
        match missing.len() {
            0 => Ok(Some(files)),
            4 => Ok(None),
            _ => Err(CaDirError::Incomplete {
                dir: self.dir.clone(),
                missing: missing.join(", "),
            }),
        }
    }

    /// Writes the four files, each to a temporary name first and then renamed into place, so a
    /// reader never sees a half-written file. The key is written with mode 0600.
    pub(crate) fn write(&self, files: &CaFiles) -> Result<(), CaDirError> {
        if self.lock.is_none() {
            return Err(CaDirError::NotWritable {
                dir: self.dir.clone(),
            });
        }
        // The key first and ca-cert.pem last: whatever a crash leaves is reported as incomplete.
        let order = [
            (CA_KEY, &files.ca_key, 0o600),
            (ROOT_CERT, &files.root_cert, 0o644),
            (CERT_CHAIN, &files.cert_chain, 0o644),
            (CA_CERT, &files.ca_cert, 0o644),
        ];
        for (name, contents, mode) in order {
            self.write_one(name, contents, mode)?;
        }
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| io_error("syncing", &self.dir, source))
    }

    fn write_one(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), CaDirError> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        // A leftover from a crash may have another mode; `mode` only applies to new files.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error("removing", &tmp, source)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|source| io_error("creating", &tmp, source))?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(|source| io_error("writing", &tmp, source))?;
        fs::rename(&tmp, &path).map_err(|source| io_error("renaming into", &path, source))
    }
}

fn is_not_writable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied
    )
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> CaDirError {
    CaDirError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn files() -> CaFiles {
        CaFiles {
            ca_cert: b"ca".to_vec(),
            ca_key: b"key".to_vec(),
            root_cert: b"root".to_vec(),
            cert_chain: b"chain".to_vec(),
        }
    }

    #[test]
    fn empty_directory_reads_as_none_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/ca");
        let ca_dir = CaDir::lock(&dir).unwrap();
        assert!(ca_dir.read().unwrap().is_none());
        ca_dir.write(&files()).unwrap();
        let read = ca_dir.read().unwrap().unwrap();
        assert_eq!(read.ca_key, b"key");
        assert_eq!(read.cert_chain, b"chain");
        let mode = |name: &str| fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(CA_KEY), 0o600);
        assert_eq!(mode(CA_CERT), 0o644);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn a_partial_set_names_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(CA_CERT), "x").unwrap();
        fs::write(tmp.path().join(ROOT_CERT), "x").unwrap();
        let err = CaDir::lock(tmp.path()).unwrap().read().err().unwrap();
        let message = err.to_string();
        assert!(
            message.contains("ca-key.pem, cert-chain.pem missing"),
            "{message}"
        );
    }

    #[test]
    fn the_lock_is_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let held = CaDir::lock(tmp.path()).unwrap();
        let other = File::open(tmp.path().join(LOCK)).unwrap();
        assert!(other.try_lock().is_err());
        drop(held);
        assert!(other.try_lock().is_ok());
    }
}
