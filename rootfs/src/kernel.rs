//! The guest kernel: Debian's `linux-source-6.1`, our patch series and config fragment
//! (`rootfs/kernel/`), built into a `vmlinux` and cached by a hash of those inputs.
//!
//! Layout under the cache directory (`$KINDLING_CACHE_DIR`, default `~/.cache/kindling`):
//!
//! ```text
//! kernel/<hash>/vmlinux        the kernel the VMM boots (ELF, 64-bit entry)
//! kernel/<hash>/config         the final .config, for reference
//! kernel/<hash>/System.map     symbols, for reading guest RIPs in VMM error reports
//! kernel/<hash>/build.json     what went in (package version, patches) and how long it took
//! kernel/src/linux-source-6.1_<version>_all.deb   the downloaded source package
//! kernel/build-XXXXXX/         a build in progress (kept, with build.log, when it fails)
//! kernel/.lock                 serialises builds between processes
//! ```
//!
//! Everything here blocks (a build takes many minutes); async callers use `spawn_blocking`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};

/// Bump when the build steps change in a way that changes the output for the same inputs.
pub const RECIPE_VERSION: u32 = 1;

/// The Debian package that carries the kernel source.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// Our config, applied on top of `make tinyconfig`.
pub const CONFIG_FRAGMENT: &str = include_str!("../kernel/config.fragment");

/// Merged after [`CONFIG_FRAGMENT`] for [`Flavour::Up`].
pub const UP_FRAGMENT: &str = include_str!("../kernel/up.fragment");

/// Which kernel: the default SMP one, or a uniprocessor one for single-vCPU guests on hosts
/// that emulate guest kernel code (faster to boot there; see `kernel/up.fragment`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Flavour {
    #[default]
    Smp,
    Up,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Smp => "smp",
            Flavour::Up => "up",
        }
    }

    /// The config fragments, in merge order (later lines win).
    pub fn fragments(self) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![("config.fragment", CONFIG_FRAGMENT)];
        if self == Flavour::Up {
            v.push(("up.fragment", UP_FRAGMENT));
        }
        v
    }
}

impl std::str::FromStr for Flavour {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "smp" => Ok(Flavour::Smp),
            "up" => Ok(Flavour::Up),
            other => Err(format!("unknown kernel flavour {other:?} (smp or up)")),
        }
    }
}

/// Our patch series against the Debian source, applied in this order with `patch -p1`.
/// A unit test checks that this list matches `rootfs/kernel/patches/`.
pub const PATCHES: &[(&str, &[u8])] = &[
    (
        "0001-x86-alternative-skip-int3-selftest-under-a-hypervisor.patch",
        include_bytes!(
            "../kernel/patches/0001-x86-alternative-skip-int3-selftest-under-a-hypervisor.patch"
        ),
    ),
    (
        "0002-x86-fpu-no-fwait-in-fpu__drop.patch",
        include_bytes!("../kernel/patches/0002-x86-fpu-no-fwait-in-fpu__drop.patch"),
    ),
    (
        "0003-x86-mm-do-not-poison-freed-init-memory.patch",
        include_bytes!("../kernel/patches/0003-x86-mm-do-not-poison-freed-init-memory.patch"),
    ),
    (
        "0004-x86-mm-run-syscalls-that-fault-at-entry_SYSCALL_64.patch",
        include_bytes!(
            "../kernel/patches/0004-x86-mm-run-syscalls-that-fault-at-entry_SYSCALL_64.patch"
        ),
    ),
];

/// Every kernel `make` runs with this architecture (tinyconfig would otherwise pick i386).
const ARCH: &str = "ARCH=x86_64";

/// Lines of the log quoted in an error.
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "the kernel build needs host tools that are missing: {missing}\n  \
         install them with: apt-get install -y {packages}"
    )]
    MissingTools { missing: String, packages: String },
    #[error(
        "cannot tell which version of {SOURCE_PACKAGE} to build: {detail}\n  \
         (run `apt-get update`, or put a {SOURCE_PACKAGE}_<version>_all.deb in {})",
        src_dir.display()
    )]
    SourceVersion { detail: String, src_dir: PathBuf },
    #[error("{path} is {SOURCE_PACKAGE} version {found}, expected {expected}")]
    SourceMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "kernel build step `{step}` failed ({status}): {command}\n  full log: {}\n--- last lines of the log ---\n{tail}",
        log.display()
    )]
    Step {
        step: String,
        command: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "the kernel .config does not match rootfs/kernel/config.fragment \
         (a dependency is missing or something selects a disabled option):\n{}\n  \
         final config: {}\n  log: {}",
        problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"),
        config.display(),
        log.display()
    )]
    ConfigMismatch {
        problems: Vec<ConfigProblem>,
        config: PathBuf,
        log: PathBuf,
    },
    #[error("the build finished but produced no {}", path.display())]
    NoOutput { path: PathBuf },
    #[error("no cache directory: set KINDLING_CACHE_DIR or HOME")]
    NoCacheDir,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Io { context, source }
}

/// One way the built .config differs from the fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigProblem {
    /// The fragment sets it, the final .config does not have it at all or has it off.
    Lost { option: String, wanted: String },
    /// The final .config has another value.
    Changed {
        option: String,
        wanted: String,
        got: String,
    },
    /// The fragment turns it off, but it ended up enabled (something selects it).
    Enabled { option: String, got: String },
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigProblem::Lost { option, wanted } => {
                write!(f, "{option}={wanted} was dropped (unmet dependency?)")
            }
            ConfigProblem::Changed {
                option,
                wanted,
                got,
            } => write!(f, "{option}={wanted} became {option}={got}"),
            ConfigProblem::Enabled { option, got } => {
                write!(f, "{option} should be off but is {option}={got}")
            }
        }
    }
}

/// What a fragment line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    Value(String),
    Off,
}

/// `CONFIG_X=value` and `# CONFIG_X is not set` lines, in order; later lines win.
fn parse_config(text: &str) -> BTreeMap<String, Wanted> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") && !name.contains(char::is_whitespace) {
                    out.insert(name.to_string(), Wanted::Off);
                }
            }
        } else if line.starts_with("CONFIG_") {
            if let Some((name, value)) = line.split_once('=') {
                let value = value.trim().to_string();
                let wanted = if value == "n" {
                    Wanted::Off
                } else {
                    Wanted::Value(value)
                };
                out.insert(name.trim().to_string(), wanted);
            }
        }
    }
    out
}

/// Compares a final .config with the fragment it was built from: every `CONFIG_X=value` line
/// of the fragment must be in the .config with that value, and every `# CONFIG_X is not set`
/// must not be enabled there. Returns the differences (empty when all is well).
pub fn verify_config(fragment: &str, config: &str) -> Vec<ConfigProblem> {
    let have = parse_config(config);
    let mut problems = Vec::new();
    for (option, wanted) in parse_config(fragment) {
        match (wanted, have.get(&option)) {
            (Wanted::Value(w), Some(Wanted::Value(g))) if &w != g => {
                problems.push(ConfigProblem::Changed {
                    option,
                    wanted: w,
                    got: g.clone(),
                })
            }
            (Wanted::Value(_), Some(Wanted::Value(_))) => {}
            (Wanted::Value(w), None | Some(Wanted::Off)) => {
                problems.push(ConfigProblem::Lost { option, wanted: w })
            }
            (Wanted::Off, Some(Wanted::Value(g))) => problems.push(ConfigProblem::Enabled {
                option,
                got: g.clone(),
            }),
            (Wanted::Off, None | Some(Wanted::Off)) => {}
        }
    }
    problems
}

/// Everything the kernel build depends on; its hash names the cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInputs {
    /// Debian version of [`SOURCE_PACKAGE`], e.g. `6.1.172-1`.
    pub source_version: String,
    /// (file name, contents) of each config fragment, in merge order.
    pub fragments: Vec<(String, Vec<u8>)>,
    /// (file name, contents), applied in order.
    pub patches: Vec<(String, Vec<u8>)>,
    pub recipe_version: u32,
}

impl KernelInputs {
    /// Our embedded fragments and patches, on the given source version.
    pub fn embedded(source_version: &str, flavour: Flavour) -> Self {
        KernelInputs {
            source_version: source_version.to_string(),
            fragments: flavour
                .fragments()
                .into_iter()
                .map(|(name, text)| (name.to_string(), text.as_bytes().to_vec()))
                .collect(),
            patches: PATCHES
                .iter()
                .map(|(name, bytes)| (name.to_string(), bytes.to_vec()))
                .collect(),
            recipe_version: RECIPE_VERSION,
        }
    }

    /// sha256 (hex) over the recipe version, the package name and version, each fragment's
    /// and each patch's name and bytes, every field length-prefixed so no two inputs collide.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(b"kindling-guest-kernel");
        field(&self.recipe_version.to_le_bytes());
        field(SOURCE_PACKAGE.as_bytes());
        field(self.source_version.as_bytes());
        field(&(self.fragments.len() as u64).to_le_bytes());
        for (name, bytes) in &self.fragments {
            field(name.as_bytes());
            field(bytes);
        }
        field(&(self.patches.len() as u64).to_le_bytes());
        for (name, bytes) in &self.patches {
            field(name.as_bytes());
            field(bytes);
        }
        hex(&h.finalize())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Progress reports from [`ensure_kernel_build`].
#[derive(Debug, Clone)]
pub enum Progress {
    /// A new phase started ("downloading linux-source-6.1 6.1.172-1", "compiling", ...).
    Phase(String),
    /// `make` printed a build line (`  CC      kernel/fork.o`); `steps` counts them so far.
    Make { steps: usize, line: String },
}

pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

#[derive(Default)]
pub struct KernelOptions {
    /// Default: `$KINDLING_CACHE_DIR`, else `~/.cache/kindling`.
    pub cache_dir: Option<PathBuf>,
    /// Rebuild even if a cached kernel exists.
    pub force: bool,
    /// `make -j`; default: the number of CPUs.
    pub jobs: Option<usize>,
    pub flavour: Flavour,
    /// Default: phase lines on stderr.
    pub progress: Option<ProgressFn>,
}

impl fmt::Debug for KernelOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelOptions")
            .field("cache_dir", &self.cache_dir)
            .field("force", &self.force)
            .field("jobs", &self.jobs)
            .field("flavour", &self.flavour)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// A built (or cached) kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBuild {
    pub vmlinux: PathBuf,
    pub config: PathBuf,
    /// The directory holding both (`<cache>/kernel/<hash>`).
    pub dir: PathBuf,
    pub hash: String,
    pub source_version: String,
    pub flavour: Flavour,
    /// True when it was already in the cache.
    pub cached: bool,
}

/// `$KINDLING_CACHE_DIR`, else `~/.cache/kindling`.
pub fn cache_root() -> Result<PathBuf, KernelError> {
    if let Some(dir) = std::env::var_os("KINDLING_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("kindling")),
        None => Err(KernelError::NoCacheDir),
    }
}

/// The path of a built `vmlinux`, building it first when it is not cached.
pub fn ensure_kernel(opts: KernelOptions) -> Result<PathBuf, KernelError> {
    ensure_kernel_build(opts).map(|b| b.vmlinux)
}

/// The cached kernel for the current inputs, if it has been built; builds nothing.
pub fn cached_kernel(
    cache_dir: Option<PathBuf>,
    flavour: Flavour,
) -> Result<Option<KernelBuild>, KernelError> {
    let kernel_dir = kernel_dir(cache_dir)?;
    let version = source_version(&kernel_dir.join("src"))?;
    let hash = KernelInputs::embedded(&version, flavour).hash();
    Ok(lookup(&kernel_dir, &hash, &version, flavour))
}

fn kernel_dir(cache_dir: Option<PathBuf>) -> Result<PathBuf, KernelError> {
    Ok(match cache_dir {
        Some(d) => d,
        None => cache_root()?,
    }
    .join("kernel"))
}

fn lookup(kernel_dir: &Path, hash: &str, version: &str, flavour: Flavour) -> Option<KernelBuild> {
    let dir = kernel_dir.join(hash);
    let vmlinux = dir.join("vmlinux");
    vmlinux.is_file().then(|| KernelBuild {
        config: dir.join("config"),
        vmlinux,
        dir,
        hash: hash.to_string(),
        source_version: version.to_string(),
        flavour,
        cached: true,
    })
}

/// Like [`ensure_kernel`], with the details (`kindling kernel build --json`).
pub fn ensure_kernel_build(mut opts: KernelOptions) -> Result<KernelBuild, KernelError> {
    let mut progress = opts
        .progress
        .take()
        .unwrap_or_else(|| Box::new(default_progress));
    let kernel_dir = kernel_dir(opts.cache_dir.clone())?;
    let src_dir = kernel_dir.join("src");
    let version = source_version(&src_dir)?;
    let flavour = opts.flavour;
    let inputs = KernelInputs::embedded(&version, flavour);
    let hash = inputs.hash();
    if !opts.force {
        if let Some(found) = lookup(&kernel_dir, &hash, &version, flavour) {
            return Ok(found);
        }
    }
    fs::create_dir_all(&src_dir).map_err(io_err(format!("create {}", src_dir.display())))?;

    // One build at a time per cache: a second process waits, then finds the result.
    let _lock = lock(&kernel_dir.join(".lock"), &mut *progress)?;
    if !opts.force {
        if let Some(found) = lookup(&kernel_dir, &hash, &version, flavour) {
            return Ok(found);
        }
    }
    let deb = src_dir.join(format!("{SOURCE_PACKAGE}_{version}_all.deb"));
    check_tools(!deb.is_file())?;
    remove_stale_builds(&kernel_dir);

    let build = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&kernel_dir)
        .map_err(io_err(format!(
            "create a build directory in {}",
            kernel_dir.display()
        )))?;
    let jobs = opts.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let started = Instant::now();
    let result = build_in(
        build.path(),
        &deb,
        &inputs,
        flavour,
        jobs,
        &kernel_dir,
        &mut *progress,
    );
    match result {
        Ok(out) => {
            progress(&Progress::Phase(format!(
                "built {} in {:.0} s",
                out.vmlinux.display(),
                started.elapsed().as_secs_f64()
            )));
            Ok(out)
        }
        Err(e) => {
            // Keep the tree and its build.log for the post-mortem; the next build removes it.
            let _ = build.keep();
            Err(e)
        }
    }
}

fn default_progress(p: &Progress) {
    if let Progress::Phase(phase) = p {
        eprintln!("kindling kernel: {phase}");
    }
}

/// Which version to build: apt's candidate, else the newest .deb already in the cache.
fn source_version(src_dir: &Path) -> Result<String, KernelError> {
    let apt = Command::new("apt-cache")
        .args(["policy", SOURCE_PACKAGE])
        .env("LC_ALL", "C")
        .stderr(Stdio::null())
        .output();
    let apt_detail = match apt {
        Ok(out) if out.status.success() => {
            match parse_apt_candidate(&String::from_utf8_lossy(&out.stdout)) {
                Some(v) => return Ok(v),
                None => format!("apt-cache policy {SOURCE_PACKAGE} shows no candidate"),
            }
        }
        Ok(out) => format!("apt-cache policy {SOURCE_PACKAGE} failed ({})", out.status),
        Err(e) => format!("cannot run apt-cache: {e}"),
    };
    let mut debs: Vec<(std::time::SystemTime, String)> = fs::read_dir(src_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name
                .strip_prefix(&format!("{SOURCE_PACKAGE}_"))?
                .strip_suffix("_all.deb")?
                .to_string();
            Some((e.metadata().ok()?.modified().ok()?, version))
        })
        .collect();
    debs.sort();
    debs.pop()
        .map(|(_, v)| v)
        .ok_or(KernelError::SourceVersion {
            detail: apt_detail,
            src_dir: src_dir.to_path_buf(),
        })
}

fn parse_apt_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

/// A tool the build runs, and the Debian package that provides it.
const TOOLS: &[(&str, &str)] = &[
    ("make", "make"),
    ("gcc", "gcc"),
    ("ld", "binutils"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl"),
    ("tar", "tar"),
    ("xz", "xz-utils"),
    ("dpkg-deb", "dpkg"),
    ("patch", "patch"),
];

fn check_tools(need_download: bool) -> Result<(), KernelError> {
    let mut missing = Vec::new();
    let mut packages = Vec::new();
    let mut need = |what: &str, pkg: &str| {
        missing.push(what.to_string());
        if !packages.iter().any(|p| p == pkg) {
            packages.push(pkg.to_string());
        }
    };
    for (tool, pkg) in TOOLS {
        if which(tool).is_none() {
            need(tool, pkg);
        }
    }
    if need_download && which("apt-get").is_none() {
        need("apt-get", "apt");
    }
    // objtool (CONFIG_OBJTOOL) is built against libelf.
    let libelf = ["/usr/include", "/usr/local/include"]
        .iter()
        .any(|d| Path::new(d).join("gelf.h").is_file());
    if !libelf {
        need("libelf headers (gelf.h)", "libelf-dev");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::MissingTools {
            missing: missing.join(", "),
            packages: packages.join(" "),
        })
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

struct FileLock(File);

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: the fd is owned by self.0 and still open; unlocking cannot affect memory.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn lock(path: &Path, progress: &mut dyn FnMut(&Progress)) -> Result<FileLock, KernelError> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(format!("open {}", path.display())))?;
    let mut flags = libc::LOCK_EX | libc::LOCK_NB;
    loop {
        // SAFETY: flock on an fd we own; no memory is involved.
        let rc = unsafe { libc::flock(f.as_raw_fd(), flags) };
        if rc == 0 {
            return Ok(FileLock(f));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EWOULDBLOCK) if flags & libc::LOCK_NB != 0 => {
                progress(&Progress::Phase(format!(
                    "another kernel build holds {}; waiting for it",
                    path.display()
                )));
                flags = libc::LOCK_EX;
            }
            _ => return Err(io_err(format!("lock {}", path.display()))(e)),
        }
    }
}

/// Under the lock no other build is running, so build directories left over are dead
/// (failed builds keep theirs for the post-mortem until the next build).
fn remove_stale_builds(kernel_dir: &Path) {
    for entry in fs::read_dir(kernel_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("build-") || name.starts_with(".staging-") || name.starts_with(".old-")
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs the build steps in `build` (a fresh directory) and moves the result into the cache.
fn build_in(
    build: &Path,
    deb: &Path,
    inputs: &KernelInputs,
    flavour: Flavour,
    jobs: usize,
    kernel_dir: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<KernelBuild, KernelError> {
    let hash = &inputs.hash();
    let log_path = build.join("build.log");
    let mut log = Log::create(&log_path)?;
    let timer = Instant::now();
    let version = &inputs.source_version;

    // 1. The source package.
    if deb.is_file() {
        check_deb_version(deb, version, &mut log)?;
    } else {
        progress(&Progress::Phase(format!(
            "downloading {SOURCE_PACKAGE} {version} (apt-get download)"
        )));
        download(deb, version, &mut log)?;
    }

    // 2. Unpack: the .deb holds /usr/src/linux-source-6.1.tar.xz.
    progress(&Progress::Phase(format!("unpacking {}", deb.display())));
    let debdir = build.join("deb");
    log.run(
        "unpack the .deb",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&debdir),
    )?;
    let tarball = debdir.join(format!("usr/src/{SOURCE_PACKAGE}.tar.xz"));
    log.run(
        "unpack the source tarball",
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(build),
    )?;
    let _ = fs::remove_dir_all(&debdir);
    let src = build.join(SOURCE_PACKAGE);
    if !src.join("Makefile").is_file() {
        return Err(KernelError::NoOutput {
            path: src.join("Makefile"),
        });
    }

    // 3. Our patches.
    let patch_dir = build.join("patches");
    fs::create_dir_all(&patch_dir).map_err(io_err("create the patch directory"))?;
    for (name, bytes) in &inputs.patches {
        progress(&Progress::Phase(format!("applying {name}")));
        let file = patch_dir.join(name);
        fs::write(&file, bytes).map_err(io_err(format!("write {}", file.display())))?;
        log.run(
            &format!("apply {name}"),
            Command::new("patch")
                .args(["-p1", "--forward", "--batch", "-i"])
                .arg(&file)
                .current_dir(&src),
        )?;
    }

    // 4. Configure.
    let names: Vec<&str> = inputs.fragments.iter().map(|(n, _)| n.as_str()).collect();
    progress(&Progress::Phase(format!(
        "configuring (tinyconfig + {})",
        names.join(" + ")
    )));
    log.run("make tinyconfig", make(&src).arg("tinyconfig"))?;
    let mut merge = Command::new("scripts/kconfig/merge_config.sh");
    merge.args(["-m", ".config"]).current_dir(&src);
    let mut all_fragments = String::new();
    for (name, bytes) in &inputs.fragments {
        let path = build.join(name);
        fs::write(&path, bytes).map_err(io_err(format!("write {name}")))?;
        merge.arg(&path);
        all_fragments.push_str(&String::from_utf8_lossy(bytes));
        all_fragments.push('\n');
    }
    log.run("merge the config fragments", &mut merge)?;
    log.run("make olddefconfig", make(&src).arg("olddefconfig"))?;
    let config_path = src.join(".config");
    let config = fs::read_to_string(&config_path).map_err(io_err("read .config"))?;
    let problems = verify_config(&all_fragments, &config);
    if !problems.is_empty() {
        return Err(KernelError::ConfigMismatch {
            problems,
            config: config_path,
            log: log_path,
        });
    }

    // 5. Compile.
    progress(&Progress::Phase(format!(
        "compiling vmlinux (make -j{jobs}; log: {})",
        log_path.display()
    )));
    let mut steps = 0usize;
    log.run_streaming(
        "make vmlinux",
        make(&src).arg(format!("-j{jobs}")).arg("vmlinux"),
        &mut |line| {
            // Kbuild's short log: two spaces, an upper-case tag, then the target.
            if line.starts_with("  ") && line[2..].starts_with(|c: char| c.is_ascii_uppercase()) {
                steps += 1;
                progress(&Progress::Make {
                    steps,
                    line: line.trim().to_string(),
                });
            }
        },
    )?;
    let built = src.join("vmlinux");
    if !built.is_file() {
        return Err(KernelError::NoOutput { path: built });
    }

    // 6. Into the cache: fill a staging directory, then rename it into place.
    progress(&Progress::Phase("installing into the cache".into()));
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(kernel_dir)
        .map_err(io_err("create a staging directory"))?;
    let copy = |from: &Path, name: &str| {
        fs::copy(from, staging.path().join(name))
            .map(drop)
            .map_err(io_err(format!("copy {} into the cache", from.display())))
    };
    copy(&built, "vmlinux")?;
    copy(&config_path, "config")?;
    if src.join("System.map").is_file() {
        copy(&src.join("System.map"), "System.map")?;
    }
    let info = serde_json::json!({
        "hash": hash,
        "package": SOURCE_PACKAGE,
        "source_version": version,
        "flavour": flavour.name(),
        "recipe_version": inputs.recipe_version,
        "fragments": inputs.fragments.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "patches": inputs.patches.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "jobs": jobs,
        "build_seconds": timer.elapsed().as_secs(),
    });
    fs::write(
        staging.path().join("build.json"),
        serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )
    .map_err(io_err("write build.json"))?;
    let dest = kernel_dir.join(hash);
    if dest.exists() {
        // --force: move the old build aside first (rename is atomic; deleting is not).
        let old = kernel_dir.join(format!(".old-{hash}"));
        let _ = fs::remove_dir_all(&old);
        fs::rename(&dest, &old).map_err(io_err(format!("move {} aside", dest.display())))?;
        let _ = fs::remove_dir_all(&old);
    }
    let staged = staging.keep();
    fs::rename(&staged, &dest).map_err(io_err(format!(
        "rename {} to {}",
        staged.display(),
        dest.display()
    )))?;
    Ok(KernelBuild {
        vmlinux: dest.join("vmlinux"),
        config: dest.join("config"),
        dir: dest,
        hash: hash.to_string(),
        source_version: version.clone(),
        flavour,
        cached: false,
    })
}

fn make(src: &Path) -> Command {
    let mut c = Command::new("make");
    c.arg(ARCH)
        .current_dir(src)
        // Reproducible-ish output, and nothing from a calling make or cargo.
        .env("LC_ALL", "C")
        .env("KBUILD_BUILD_USER", "kindling")
        .env("KBUILD_BUILD_HOST", "kindling")
        .env(
            "KBUILD_BUILD_TIMESTAMP",
            format!("kindling recipe {RECIPE_VERSION}"),
        )
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .env_remove("CROSS_COMPILE");
    c
}

fn check_deb_version(deb: &Path, expected: &str, log: &mut Log) -> Result<(), KernelError> {
    let found = log.output(
        "read the .deb version",
        Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"),
    )?;
    let found = found.trim();
    if found != expected {
        return Err(KernelError::SourceMismatch {
            path: deb.to_path_buf(),
            found: found.to_string(),
            expected: expected.to_string(),
        });
    }
    Ok(())
}

/// `apt-get download` into a scratch directory next to `deb`, then rename into place, so an
/// interrupted download never looks like a cached package.
fn download(deb: &Path, version: &str, log: &mut Log) -> Result<(), KernelError> {
    let src_dir = deb.parent().expect("deb path has a parent");
    let scratch = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(src_dir)
        .map_err(io_err("create a download directory"))?;
    log.run(
        "apt-get download",
        Command::new("apt-get")
            .arg("download")
            .arg(format!("{SOURCE_PACKAGE}={version}"))
            .current_dir(scratch.path()),
    )?;
    let got = fs::read_dir(scratch.path())
        .map_err(io_err("read the download directory"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| KernelError::NoOutput {
            path: scratch.path().join(deb.file_name().unwrap_or_default()),
        })?;
    check_deb_version(&got, version, log)?;
    fs::rename(&got, deb).map_err(io_err(format!("move the download to {}", deb.display())))?;
    // Older versions' packages (139 MB each) are not needed any more.
    for entry in fs::read_dir(src_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&format!("{SOURCE_PACKAGE}_"))
            && name.ends_with("_all.deb")
            && entry.path() != deb
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The build log: every command's output goes here; errors quote its tail.
struct Log {
    path: PathBuf,
    file: File,
}

impl Log {
    fn create(path: &Path) -> Result<Self, KernelError> {
        let file = File::create(path).map_err(io_err(format!("create {}", path.display())))?;
        Ok(Log {
            path: path.to_path_buf(),
            file,
        })
    }

    fn header(&mut self, step: &str, cmd: &Command) -> String {
        let line = describe(cmd);
        let _ = writeln!(self.file, "\n==> {step}: {line}");
        line
    }

    fn failed(&mut self, step: &str, command: String, status: String) -> KernelError {
        let _ = self.file.flush();
        KernelError::Step {
            step: step.to_string(),
            command,
            status,
            log: self.path.clone(),
            tail: tail(&self.path, LOG_TAIL_LINES),
        }
    }

    fn spawn_err(&mut self, step: &str, command: String, e: io::Error) -> KernelError {
        let _ = writeln!(self.file, "cannot start: {e}");
        self.failed(step, command, format!("cannot start: {e}"))
    }

    /// Runs `cmd` with stdout and stderr appended to the log.
    fn run(&mut self, step: &str, cmd: &mut Command) -> Result<(), KernelError> {
        let command = self.header(step, cmd);
        let out = self.file.try_clone().map_err(io_err("clone the log fd"))?;
        let err = self.file.try_clone().map_err(io_err("clone the log fd"))?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| self.spawn_err(step, command.clone(), e))?;
        if status.success() {
            Ok(())
        } else {
            Err(self.failed(step, command, status.to_string()))
        }
    }

    /// Runs `cmd`, returning its stdout; stderr goes to the log.
    fn output(&mut self, step: &str, cmd: &mut Command) -> Result<String, KernelError> {
        let command = self.header(step, cmd);
        let err = self.file.try_clone().map_err(io_err("clone the log fd"))?;
        let out = cmd
            .stdin(Stdio::null())
            .stderr(err)
            .output()
            .map_err(|e| self.spawn_err(step, command.clone(), e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let _ = self.file.write_all(stdout.as_bytes());
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(self.failed(step, command, out.status.to_string()))
        }
    }

    /// Runs `cmd` with stdout and stderr merged through one pipe, each line appended to the
    /// log and handed to `on_line`.
    fn run_streaming(
        &mut self,
        step: &str,
        cmd: &mut Command,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), KernelError> {
        let command = self.header(step, cmd);
        let (reader, writer) = pipe().map_err(io_err("create a pipe"))?;
        let writer2 = writer.try_clone().map_err(io_err("clone a pipe fd"))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2))
            .spawn()
            .map_err(|e| self.spawn_err(step, command.clone(), e))?;
        // The Command still holds the write ends; drop them so EOF arrives when make exits.
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut lines = BufReader::new(File::from(reader));
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match lines.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {
                    let _ = self.file.write_all(&buf);
                    on_line(String::from_utf8_lossy(&buf).trim_end());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io_err("read make's output")(e));
                }
            }
        }
        let status = child.wait().map_err(io_err("wait for make"))?;
        if status.success() {
            Ok(())
        } else {
            Err(self.failed(step, command, status.to_string()))
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the array we pass; we check the result.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("  (in {})", dir.display()));
    }
    s
}

/// The last `n` lines of a file (reading at most its last 64 KiB).
fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> KernelInputs {
        KernelInputs::embedded("6.1.172-1", Flavour::Smp)
    }

    #[test]
    fn hash_is_stable_and_hex() {
        let a = inputs().hash();
        assert_eq!(a, inputs().hash());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn hash_changes_with_every_input() {
        let base = inputs().hash();
        let mut variants = Vec::new();

        let mut i = inputs();
        i.source_version = "6.1.173-1".into();
        variants.push(("source version", i));

        let mut i = inputs();
        i.fragments[0].1.extend_from_slice(b"CONFIG_FOO=y\n");
        variants.push(("fragment", i));

        variants.push(("flavour", KernelInputs::embedded("6.1.172-1", Flavour::Up)));

        let mut i = inputs();
        i.patches[0].1.push(b'\n');
        variants.push(("patch bytes", i));

        let mut i = inputs();
        i.patches[1].0 = "0002-renamed.patch".into();
        variants.push(("patch name", i));

        let mut i = inputs();
        i.patches.swap(0, 1);
        variants.push(("patch order", i));

        let mut i = inputs();
        i.patches.pop();
        variants.push(("patch removed", i));

        let mut i = inputs();
        i.recipe_version += 1;
        variants.push(("recipe version", i));

        // Moving bytes between adjacent fields must not collide (length framing).
        let mut i = inputs();
        let moved = i.patches[0].1.remove(0);
        i.patches[0].0.push(moved as char);
        variants.push(("field boundary", i));

        for (what, v) in variants {
            assert_ne!(v.hash(), base, "changing the {what} must change the hash");
        }
    }

    #[test]
    fn embedded_patches_match_the_patch_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/patches");
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".patch"))
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = PATCHES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            embedded, on_disk,
            "list every rootfs/kernel/patches/*.patch in kernel::PATCHES, in order"
        );
        for (name, bytes) in PATCHES {
            assert!(bytes.starts_with(b"Subject: "), "{name} needs a header");
            let text = String::from_utf8_lossy(bytes);
            assert!(text.contains("\n--- a/"), "{name} is not a -p1 diff");
            assert!(
                text.contains("Harmless on hardware KVM"),
                "{name} must say why it is harmless on hardware KVM"
            );
        }
    }

    #[test]
    fn config_verification_accepts_a_matching_config() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_N=8\n# CONFIG_B is not set\n";
        let config = "CONFIG_A=y\nCONFIG_N=8\n# CONFIG_B is not set\nCONFIG_OTHER=y\n";
        assert_eq!(verify_config(fragment, config), vec![]);
        // An option the fragment turns off may also be absent altogether.
        assert_eq!(verify_config(fragment, "CONFIG_A=y\nCONFIG_N=8\n"), vec![]);
    }

    #[test]
    fn config_verification_reports_lost_changed_and_enabled_options() {
        let fragment = "CONFIG_EROFS_FS=y\nCONFIG_VIRTIO=y\nCONFIG_NR_CPUS=8\nCONFIG_STR=\"a\"\n\
                        # CONFIG_ACPI is not set\nCONFIG_PCI=n\n";
        let config = "# CONFIG_VIRTIO is not set\nCONFIG_NR_CPUS=64\nCONFIG_STR=\"a\"\n\
                      CONFIG_ACPI=y\nCONFIG_PCI=y\n";
        let problems = verify_config(fragment, config);
        assert_eq!(
            problems,
            vec![
                ConfigProblem::Enabled {
                    option: "CONFIG_ACPI".into(),
                    got: "y".into()
                },
                ConfigProblem::Lost {
                    option: "CONFIG_EROFS_FS".into(),
                    wanted: "y".into()
                },
                ConfigProblem::Changed {
                    option: "CONFIG_NR_CPUS".into(),
                    wanted: "8".into(),
                    got: "64".into()
                },
                ConfigProblem::Enabled {
                    option: "CONFIG_PCI".into(),
                    got: "y".into()
                },
                ConfigProblem::Lost {
                    option: "CONFIG_VIRTIO".into(),
                    wanted: "y".into()
                },
            ]
        );
        let err = KernelError::ConfigMismatch {
            problems,
            config: "/b/.config".into(),
            log: "/b/build.log".into(),
        }
        .to_string();
        assert!(err.contains("CONFIG_EROFS_FS=y was dropped"), "{err}");
        assert!(err.contains("CONFIG_VIRTIO=y was dropped"), "{err}");
    }

    #[test]
    fn our_fragment_parses_and_has_the_essentials() {
        let wanted = parse_config(CONFIG_FRAGMENT);
        for opt in [
            "CONFIG_64BIT",
            "CONFIG_KVM_GUEST",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_EXT4_FS",
            "CONFIG_EROFS_FS",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_DEVTMPFS_MOUNT",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_DEVMEM",
            "CONFIG_HZ_100",
        ] {
            assert_eq!(
                wanted.get(opt),
                Some(&Wanted::Value("y".into())),
                "{opt} must be =y"
            );
        }
        for opt in [
            "CONFIG_MODULES",
            "CONFIG_ACPI",
            "CONFIG_PCI",
            "CONFIG_IPV6",
            "CONFIG_LEGACY_PTYS",
            "CONFIG_STRICT_DEVMEM",
            "CONFIG_CPU_MITIGATIONS",
            "CONFIG_RD_GZIP",
        ] {
            assert_eq!(wanted.get(opt), Some(&Wanted::Off), "{opt} must be off");
        }
    }

    #[test]
    fn up_flavour_turns_smp_off() {
        let frags = Flavour::Up.fragments();
        assert_eq!(frags.len(), 2);
        let merged: String = frags.iter().map(|(_, t)| format!("{t}\n")).collect();
        let wanted = parse_config(&merged);
        assert_eq!(wanted.get("CONFIG_SMP"), Some(&Wanted::Off));
        assert_eq!(
            wanted.get("CONFIG_NR_CPUS"),
            Some(&Wanted::Value("1".into()))
        );
        assert_eq!(Flavour::Smp.fragments().len(), 1);
        assert_eq!("up".parse::<Flavour>(), Ok(Flavour::Up));
        assert_eq!("smp".parse::<Flavour>(), Ok(Flavour::Smp));
        assert!("x".parse::<Flavour>().is_err());
    }

    #[test]
    fn apt_candidate_parsing() {
        let policy = "linux-source-6.1:\n  Installed: (none)\n  Candidate: 6.1.172-1\n  \
                      Version table:\n     6.1.172-1 500\n";
        assert_eq!(parse_apt_candidate(policy).as_deref(), Some("6.1.172-1"));
        assert_eq!(
            parse_apt_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_apt_candidate(""), None);
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        fs::write(&p, text).unwrap();
        assert_eq!(tail(&p, 3), "line 98\nline 99\nline 100");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }

    #[test]
    fn failing_step_names_the_log_and_quotes_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::create(&dir.path().join("build.log")).unwrap();
        log.run("echo", Command::new("sh").args(["-c", "echo fine"]))
            .unwrap();
        let err = log
            .run(
                "failing step",
                Command::new("sh").args(["-c", "echo first; echo 'the error' >&2; exit 3"]),
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("failing step"), "{msg}");
        assert!(msg.contains("build.log"), "{msg}");
        assert!(msg.contains("the error"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");

        let mut seen = Vec::new();
        log.run_streaming(
            "stream",
            Command::new("sh").args(["-c", "echo '  CC      a.o'; echo oops >&2"]),
            &mut |l| seen.push(l.to_string()),
        )
        .unwrap();
        assert!(seen.contains(&"  CC      a.o".to_string()), "{seen:?}");
        assert!(seen.contains(&"oops".to_string()), "{seen:?}");
    }

    #[test]
    fn missing_tools_error_says_what_to_install() {
        let e = KernelError::MissingTools {
            missing: "flex, libelf headers (gelf.h)".into(),
            packages: "flex libelf-dev".into(),
        };
        assert!(e.to_string().contains("apt-get install -y flex libelf-dev"));
    }

    #[test]
    fn cache_root_respects_the_override() {
        // Only reads the environment; the value is what the test process was given.
        if let Some(dir) = std::env::var_os("KINDLING_CACHE_DIR").filter(|d| !d.is_empty()) {
            assert_eq!(cache_root().unwrap(), PathBuf::from(dir));
        } else if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(
                cache_root().unwrap(),
                PathBuf::from(home).join(".cache/kindling")
            );
        }
    }

    /// The whole pipeline, for real (many minutes). `cargo test -p rootfs -- --ignored`.
    #[test]
    #[ignore = "builds the guest kernel (10+ minutes)"]
    fn builds_the_kernel() {
        let b = ensure_kernel_build(KernelOptions::default()).unwrap();
        let mut head = [0u8; 20];
        File::open(&b.vmlinux)
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        assert_eq!(&head[..4], b"\x7fELF");
        assert_eq!(head[4], 2, "64-bit ELF");
        assert_eq!(u16::from_le_bytes([head[18], head[19]]), 62, "x86-64");
        let again = ensure_kernel_build(KernelOptions::default()).unwrap();
        assert!(again.cached);
        assert_eq!(again.vmlinux, b.vmlinux);
    }
}
