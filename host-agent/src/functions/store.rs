//! The registry of functions, persisted under `<data-dir>/functions/`:
//!
//! ```text
//! functions/<name>/config.json   FunctionConfiguration, Lambda's JSON shape
//! functions/<name>/code.zip      the archive as uploaded (CodeSha256 is over it)
//! functions/<name>/code/         the unpacked task root
//! ```
//! A container image function (`PackageType: Image`) keeps a copy of its image instead of
//! the ZIP: `code/` is the OCI layout directory, or `code/image.tar` the tarball, checked at
//! create time by unpacking it once.
//! A function appears atomically: it is built in `functions/.staging-<uuid>` and renamed into
//! place. Deletion renames to `functions/.trash-<uuid>` first. Leftovers of either (a crash
//! mid-way) are removed at start.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::archive::{extract_zip, ArchiveError};
use super::config::{
    is_valid_name, ConcurrencySettings, EnvironmentResponse, EphemeralStorage,
    FunctionConfiguration, ImageConfigResponse, NewFunction,
};

/// A deployed function: its configuration and where its code lives.
#[derive(Debug)]
pub struct Function {
    pub config: FunctionConfiguration,
    /// The unpacked code: `LAMBDA_TASK_ROOT`'s source.
    pub code_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Function already exist: {0}")]
    Exists(String),
    #[error("Function not found: {0}")]
    NotFound(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The container image cannot be read or used.
    #[error("Source image {uri} is not usable: {reason}")]
    BadImage { uri: String, reason: String },
    #[error("function store I/O error: {0}")]
    Io(#[from] io::Error),
}

pub struct Registry {
    root: PathBuf,
    region: String,
    account: String,
    functions: RwLock<BTreeMap<String, Arc<Function>>>,
    /// Serialises creates and deletes (their file-system work happens outside `functions`).
    write_lock: Mutex<()>,
}

impl Registry {
    /// Opens (creating if needed) the store under `data_dir`, loading every valid function.
    /// A function directory that cannot be read is logged and skipped, never deleted.
    pub fn open(data_dir: &Path, region: &str, account: &str) -> Result<Registry, RegistryError> {
        let root = data_dir.join("functions");
        fs::create_dir_all(&root)?;
        let mut functions = BTreeMap::new();
        for entry in fs::read_dir(&root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".staging-") || name.starts_with(".trash-") {
                tracing::info!(path = %path.display(), "removing leftover of an interrupted change");
                let _ = fs::remove_dir_all(&path);
                continue;
            }
            match load_function(&path, &name) {
                Ok(f) => {
                    functions.insert(name, Arc::new(f));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable function")
                }
            }
        }
        Ok(Registry {
            root,
            region: region.to_string(),
            account: account.to_string(),
            functions: RwLock::new(functions),
            write_lock: Mutex::new(()),
        })
    }

    pub fn arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.region, self.account
        )
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.read().get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Function>> {
        self.read().values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Function>>> {
        self.functions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Function>>> {
        self.functions.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a new function. Blocking (file I/O): call from a blocking context.
    pub fn create(&self, new: NewFunction, zip: &[u8]) -> Result<Arc<Function>, RegistryError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.read().contains_key(&new.name) {
            return Err(RegistryError::Exists(new.name));
        }
        let staging = self.root.join(format!(".staging-{}", uuid::Uuid::new_v4()));
        let result = self.build(&staging, new, zip);
        let config = match result {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let dir = self.root.join(&config.function_name);
        fs::rename(&staging, &dir)?;
        let f = Arc::new(Function {
            code_dir: dir.join("code"),
            config,
        });
        self.write()
            .insert(f.config.function_name.clone(), f.clone());
        Ok(f)
    }

    fn build(
        &self,
        staging: &Path,
        new: NewFunction,
        zip: &[u8],
    ) -> Result<FunctionConfiguration, RegistryError> {
        let code = staging.join("code");
        let (package_type, code_size, sha) = match &new.image {
            None => {
                fs::create_dir_all(&code)?;
                extract_zip(zip, &code)?;
                write_synced(&staging.join("code.zip"), zip)?;
                let sha = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(zip));
                ("Zip", zip.len() as u64, sha)
            }
            Some(image) => {
                let (size, sha) = store_image(&image.uri, &code)?;
                ("Image", size, sha)
            }
        };
        let image_config_response = new.image.as_ref().map(|i| ImageConfigResponse {
            image_config: i.config.clone(),
        });
        let config = FunctionConfiguration {
            function_arn: self.arn(&new.name),
            function_name: new.name,
            runtime: new.runtime,
            role: new.role,
            handler: new.handler,
            code_size,
            description: new.description,
            timeout: new.timeout,
            memory_size: new.memory_size,
            last_modified: chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
                .to_string(),
            code_sha256: sha,
            version: "$LATEST".into(),
            environment: (!new.variables.is_empty()).then_some(EnvironmentResponse {
                variables: new.variables,
            }),
            revision_id: uuid::Uuid::new_v4().to_string(),
            state: "Active".into(),
            last_update_status: "Successful".into(),
            package_type: package_type.into(),
            architectures: vec![new.architecture],
            ephemeral_storage: EphemeralStorage { size: 512 },
            image_config_response,
        };
        let json = serde_json::to_vec_pretty(&config).map_err(io::Error::other)?;
        write_synced(&staging.join("config.json"), &json)?;
        Ok(config)
    }

    /// A function's concurrency settings (`functions/<name>/concurrency.json`; none stored =
    /// the defaults). Blocking (file I/O).
    pub fn concurrency(&self, name: &str) -> Result<ConcurrencySettings, RegistryError> {
        match fs::read(self.root.join(name).join(CONCURRENCY_FILE)) {
            Ok(json) => serde_json::from_slice(&json).map_err(|e| {
                RegistryError::Io(io::Error::other(format!("{CONCURRENCY_FILE}: {e}")))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ConcurrencySettings::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a function's concurrency settings (atomically: a temporary file renamed into
    /// place). Blocking (file I/O).
    pub fn set_concurrency(
        &self,
        name: &str,
        settings: &ConcurrencySettings,
    ) -> Result<(), RegistryError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.read().contains_key(name) {
            return Err(RegistryError::NotFound(self.arn(name)));
        }
        let dir = self.root.join(name);
        let tmp = dir.join(format!(".{CONCURRENCY_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(settings).map_err(io::Error::other)?;
        write_synced(&tmp, &json)?;
        fs::rename(&tmp, dir.join(CONCURRENCY_FILE))?;
        Ok(())
    }

    /// Removes a function and its code. Blocking (file I/O).
    pub fn delete(&self, name: &str) -> Result<Arc<Function>, RegistryError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let f = self
            .write()
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(self.arn(name)))?;
        let trash = self.root.join(format!(".trash-{}", uuid::Uuid::new_v4()));
        fs::rename(self.root.join(name), &trash)?;
        if let Err(e) = fs::remove_dir_all(&trash) {
            tracing::warn!(path = %trash.display(), error = %e, "could not remove deleted code; removed at next start");
        }
        Ok(f)
    }
}

/// Where a function's concurrency settings live, beside `config.json`.
const CONCURRENCY_FILE: &str = "concurrency.json";

/// The file name of a stored image tarball inside `code/`.
const IMAGE_TAR: &str = "image.tar";

impl Function {
    /// A container image function's stored image (layout directory or tarball); `None` for
    /// ZIP functions.
    pub fn image_source(&self) -> Option<PathBuf> {
        if self.config.package_type != "Image" {
            return None;
        }
        let tar = self.code_dir.join(IMAGE_TAR);
        Some(if tar.is_file() {
            tar
        } else {
            self.code_dir.clone()
        })
    }
}

/// Copies the image at `uri` (a local path) into `code`, then unpacks the copy once into a
/// scratch directory so that a bad image is refused now, with its reason, rather than at the
/// first cold start. Returns the stored size and the CodeSha256: hex SHA-256 of the tarball,
/// or of a layout's `index.json` (which pins every manifest, config and layer by digest).
fn store_image(uri: &str, code: &Path) -> Result<(u64, String), RegistryError> {
    let bad = |reason: String| RegistryError::BadImage {
        uri: uri.to_string(),
        reason,
    };
    let src = Path::new(uri);
    let meta = fs::metadata(src).map_err(|e| bad(e.to_string()))?;
    let (stored, size, sha) = if meta.is_dir() {
        let index = fs::read(src.join("index.json"))
            .map_err(|e| bad(format!("index.json: {e} (not an OCI layout directory)")))?;
        let size = copy_tree(src, code)?;
        (
            code.to_path_buf(),
            size,
            format!("{:x}", Sha256::digest(&index)),
        )
    } else if meta.is_file() {
        fs::create_dir_all(code)?;
        let dest = code.join(IMAGE_TAR);
        let size = fs::copy(src, &dest)?;
        let mut hasher = Sha256::new();
        io::copy(&mut fs::File::open(&dest)?, &mut hasher)?;
        (dest, size, format!("{:x}", hasher.finalize()))
    } else {
        return Err(bad("neither a directory nor a file".into()));
    };
    let scratch = tempfile::tempdir()?;
    let (root, unpacked) = (scratch.path().join("root"), scratch.path().join("tar"));
    fs::create_dir_all(&root)?;
    fs::create_dir_all(&unpacked)?;
    rootfs::image::oci::unpack_image(&stored, &root, &unpacked, &mut |_| {})
        .map_err(|e| bad(e.to_string()))?;
    Ok((size, sha))
}

/// Copies a directory tree of plain files and directories; returns the bytes copied.
/// Symbolic links are refused: an OCI layout has none, and following one could copy
/// anything on the host.
fn copy_tree(src: &Path, dst: &Path) -> Result<u64, RegistryError> {
    fs::create_dir_all(dst)?;
    let mut total = 0;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let to = dst.join(entry.file_name());
        if ty.is_dir() {
            total += copy_tree(&entry.path(), &to)?;
        } else if ty.is_file() {
            total += fs::copy(entry.path(), &to)?;
        } else {
            return Err(RegistryError::BadImage {
                uri: src.display().to_string(),
                reason: format!("{} is not a regular file", entry.path().display()),
            });
        }
    }
    Ok(total)
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn load_function(dir: &Path, name: &str) -> Result<Function, String> {
    if !is_valid_name(name) {
        return Err("not a function name".into());
    }
    let json = fs::read(dir.join("config.json")).map_err(|e| format!("config.json: {e}"))?;
    let config: FunctionConfiguration =
        serde_json::from_slice(&json).map_err(|e| format!("config.json: {e}"))?;
    if config.function_name != name {
        return Err(format!(
            "config.json names {:?}, directory is {name:?}",
            config.function_name
        ));
    }
    let code_dir = dir.join("code");
    if !code_dir.is_dir() {
        return Err("code/ is missing".into());
    }
    Ok(Function { config, code_dir })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::CreateFunctionRequest;

    fn new_fn(name: &str) -> (NewFunction, Vec<u8>) {
        let mut buf = io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buf);
        w.start_file("app.py", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(b"def handler(e, c): return e\n").unwrap();
        w.finish().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(buf.into_inner());
        let req: CreateFunctionRequest = serde_json::from_value(serde_json::json!({
            "FunctionName": name, "Runtime": "python3.11", "Handler": "app.handler",
            "Code": {"ZipFile": b64}, "Environment": {"Variables": {"GREETING": "hi"}}
        }))
        .unwrap();
        req.validate().unwrap()
    }

    #[test]
    fn create_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), "us-east-1", "000000000000").unwrap();
        let (n, zip) = new_fn("f1");
        let f = reg.create(n, &zip).unwrap();
        assert_eq!(f.config.code_size, zip.len() as u64);
        assert!(f.code_dir.join("app.py").is_file());
        let (n, zip) = new_fn("f1");
        assert!(matches!(reg.create(n, &zip), Err(RegistryError::Exists(_))));

        // A leftover staging dir and a corrupt function are dealt with at open.
        fs::create_dir_all(dir.path().join("functions/.staging-x")).unwrap();
        fs::create_dir_all(dir.path().join("functions/broken")).unwrap();
        let reg2 = Registry::open(dir.path(), "us-east-1", "000000000000").unwrap();
        let names: Vec<_> = reg2
            .list()
            .iter()
            .map(|f| f.config.function_name.clone())
            .collect();
        assert_eq!(names, vec!["f1".to_string()]);
        assert_eq!(
            reg2.get("f1")
                .unwrap()
                .config
                .environment
                .as_ref()
                .unwrap()
                .variables["GREETING"],
            "hi"
        );
        assert!(!dir.path().join("functions/.staging-x").exists());
        assert!(dir.path().join("functions/broken").exists());

        reg2.delete("f1").unwrap();
        assert!(reg2.get("f1").is_none());
        assert!(!dir.path().join("functions/f1").exists());
        assert!(matches!(reg2.delete("f1"), Err(RegistryError::NotFound(_))));
    }

    #[test]
    fn failed_create_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), "us-east-1", "000000000000").unwrap();
        let (n, _) = new_fn("f2");
        assert!(matches!(
            reg.create(n, b"not a zip"),
            Err(RegistryError::Archive(_))
        ));
        assert_eq!(
            fs::read_dir(dir.path().join("functions")).unwrap().count(),
            0
        );
        assert!(reg.get("f2").is_none());
    }
}
