//! Uncompressed initramfs archives (cpio "newc", what the kernel's initramfs unpacker reads).
//!
//! Uncompressed on purpose: on an emulating host gunzip in the guest kernel took ~60 s.
//!
//! Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
//! each entry is a 110-byte ASCII header (`070701` and 13 fields of 8 hex digits), the NUL
//! terminated name padded so that header + name is a multiple of 4, then the data padded to
//! 4. The archive ends with an entry named `TRAILER!!!`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device node.
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// One archive member. `path` is relative to the root (a leading `/` is dropped); `mode` is
/// the permission bits only (e.g. 0o755), the file type comes from `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub mode: u32,
    pub kind: EntryKind,
}

/// An initramfs under construction. Parent directories are added (mode 0755) where missing;
/// entries are written in the order given, each after its parents.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, entry: Entry) -> &mut Self {
        self.entries.push(entry);
        self
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.push(Entry {
            path: path.into(),
            mode,
            kind: EntryKind::Dir,
        })
    }

    pub fn file(&mut self, path: &str, mode: u32, contents: impl Into<Vec<u8>>) -> &mut Self {
        self.push(Entry {
            path: path.into(),
            mode,
            kind: EntryKind::File(contents.into()),
        })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.push(Entry {
            path: path.into(),
            mode: 0o777,
            kind: EntryKind::Symlink(target.into()),
        })
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.push(Entry {
            path: path.into(),
            mode,
            kind: EntryKind::CharDev { major, minor },
        })
    }

    /// The entries as written: normalised paths, parents first, no duplicate directories.
    pub fn entries(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut dirs = BTreeSet::new();
        let mut names = BTreeSet::new();
        for e in &self.entries {
            let path = normalise(&e.path)?;
            // Parents the caller did not list.
            let mut parent = String::new();
            for comp in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(comp);
                if dirs.insert(parent.clone()) {
                    names.insert(parent.clone());
                    out.push(Entry {
                        path: parent.clone(),
                        mode: 0o755,
                        kind: EntryKind::Dir,
                    });
                }
            }
            if e.kind == EntryKind::Dir {
                if !dirs.insert(path.clone()) {
                    // Already there (listed twice, or created as a parent): the last mode wins.
                    if let Some(prev) = out.iter_mut().find(|p| p.path == path) {
                        prev.mode = e.mode & 0o7777;
                    }
                    continue;
                }
            } else if dirs.contains(&path) || names.contains(&path) {
                return Err(invalid(format!("{path} is in the archive twice")));
            }
            names.insert(path.clone());
            out.push(Entry {
                path,
                mode: e.mode & 0o7777,
                kind: e.kind.clone(),
            });
        }
        Ok(out)
    }

    /// Writes the archive (uncompressed newc cpio).
    pub fn write_to<W: Write>(&self, mut w: W) -> io::Result<()> {
        for (i, e) in self.entries()?.iter().enumerate() {
            let ino = i as u32 + 1;
            let (ftype, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &e.kind {
                EntryKind::Dir => (S_IFDIR, 2, &[], (0, 0)),
                EntryKind::File(d) => (S_IFREG, 1, d, (0, 0)),
                EntryKind::Symlink(t) => (S_IFLNK, 1, t.as_bytes(), (0, 0)),
                EntryKind::CharDev { major, minor } => (S_IFCHR, 1, &[], (*major, *minor)),
            };
            write_entry(&mut w, ino, ftype | e.mode, nlink, rdev, &e.path, data)?;
        }
        write_entry(&mut w, 0, 0, 1, (0, 0), TRAILER, &[])?;
        w.flush()
    }

    /// Writes the archive to a file (created or truncated).
    pub fn write_file(&self, path: &Path) -> io::Result<()> {
        let f = File::create(path)?;
        self.write_to(BufWriter::new(f))
    }

    /// The archive in memory.
    pub fn to_bytes(&self) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn normalise(path: &str) -> io::Result<String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") || path.contains('\0') || path == TRAILER {
        return Err(invalid(format!("bad initramfs path {path:?}")));
    }
    Ok(parts.join("/"))
}

fn pad4(w: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

fn write_entry(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let size = u32::try_from(data.len())
        .map_err(|_| invalid(format!("{name} is larger than 4 GiB (newc limit)")))?;
    let namesize = name.len() as u32 + 1;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
    ];
    let mut header = Vec::with_capacity(110);
    header.extend_from_slice(MAGIC);
    for f in fields {
        header.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    debug_assert_eq!(header.len(), 110);
    w.write_all(&header)?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, header.len() + namesize as usize)?;
    w.write_all(data)?;
    pad4(w, data.len())
}

/// One member of a parsed archive (for tests and inspection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub name: String,
    pub mode: u32,
    pub nlink: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer (strictly: magic, hex fields, alignment).
pub fn parse(mut bytes: &[u8]) -> io::Result<Vec<Parsed>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let total = bytes.len();
    let mut out = Vec::new();
    loop {
        let offset = total - bytes.len();
        if offset & 3 != 0 {
            return Err(bad("entry not 4-byte aligned"));
        }
        if bytes.len() < 110 || &bytes[..6] != MAGIC {
            return Err(bad("bad or missing newc header"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8])
                .map_err(|_| bad("header is not ASCII"))?;
            *f = u32::from_str_radix(hex, 16).map_err(|_| bad("bad hex field"))?;
        }
        let (mode, nlink, size, namesize) = (fields[1], fields[4], fields[6] as usize, fields[11]);
        let namesize = namesize as usize;
        let name_end = 110 + namesize;
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start + size;
        if namesize == 0 || bytes.len() < data_end || bytes[name_end - 1] != 0 {
            return Err(bad("truncated entry"));
        }
        let name = String::from_utf8(bytes[110..name_end - 1].to_vec())
            .map_err(|_| bad("name is not UTF-8"))?;
        if name == TRAILER {
            return Ok(out);
        }
        out.push(Parsed {
            name,
            mode,
            nlink,
            rdev: (fields[9], fields[10]),
            data: bytes[data_start..data_end].to_vec(),
        });
        bytes = &bytes[data_end.next_multiple_of(4).min(bytes.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Initramfs {
        let mut i = Initramfs::new();
        i.dir("/dev", 0o755)
            .dir("/proc", 0o555)
            .char_dev("/dev/console", 0o600, 5, 1)
            .file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .file("/etc/deep/a.txt", 0o644, b"abc".to_vec())
            .file("/empty", 0o600, Vec::new())
            .symlink("/bin/sh", "/init");
        i
    }

    #[test]
    fn layout_round_trips_through_our_parser() {
        let bytes = sample().to_bytes().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let parsed = parse(&bytes).unwrap();
        let names: Vec<&str> = parsed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "dev/console",
                "init",
                "etc",
                "etc/deep",
                "etc/deep/a.txt",
                "empty",
                "bin",
                "bin/sh"
            ]
        );
        let get = |n: &str| parsed.iter().find(|p| p.name == n).unwrap();
        assert_eq!(get("dev").mode, 0o040755);
        assert_eq!(get("dev").nlink, 2);
        assert_eq!(get("proc").mode, 0o040555);
        assert_eq!(get("dev/console").mode, 0o020600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("init").data, b"#!/bin/sh\necho hi\n");
        assert_eq!(get("etc/deep/a.txt").data, b"abc");
        assert_eq!(get("etc").mode, 0o040755);
        assert_eq!(get("empty").data, b"");
        assert_eq!(get("bin/sh").mode, 0o120777);
        assert_eq!(get("bin/sh").data, b"/init");
    }

    #[test]
    fn header_is_exactly_the_newc_layout() {
        let mut i = Initramfs::new();
        i.file("a", 0o644, b"xyz".to_vec());
        let bytes = i.to_bytes().unwrap();
        let expected_header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            1, 0o100644, 0, 0, 1, 0, 3, 0, 0, 0, 0, 2, 0
        );
        assert_eq!(&bytes[..110], expected_header.as_bytes());
        // name "a\0" ends at 112 (aligned), data 3 bytes + 1 pad, then the trailer.
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(&bytes[112..116], b"xyz\0");
        assert_eq!(&bytes[116..122], b"070701");
        let trailer_name = &bytes[116 + 110..116 + 110 + 11];
        assert_eq!(trailer_name, b"TRAILER!!!\0");
        assert_eq!(bytes.len(), (116 + 110 + 11usize).next_multiple_of(4));
    }

    #[test]
    fn rejects_bad_paths_and_duplicates() {
        for bad in ["", "/", "../x", "a/../b", "TRAILER!!!"] {
            let mut i = Initramfs::new();
            i.file(bad, 0o644, Vec::new());
            assert!(i.to_bytes().is_err(), "{bad:?} must be rejected");
        }
        let mut i = Initramfs::new();
        i.file("/a", 0o644, Vec::new()).file("a", 0o644, Vec::new());
        assert!(i.to_bytes().is_err());
        // The same directory twice is fine.
        let mut i = Initramfs::new();
        i.dir("/d", 0o755)
            .dir("d/", 0o700)
            .file("/d/f", 0o644, vec![1]);
        let parsed = parse(&i.to_bytes().unwrap()).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].mode, 0o040700);
    }

    #[test]
    fn parser_rejects_garbage() {
        assert!(parse(b"").is_err());
        assert!(parse(&[b'0'; 200]).is_err());
        let mut bytes = sample().to_bytes().unwrap();
        bytes.truncate(bytes.len() - 20);
        assert!(parse(&bytes).is_err());
    }

    /// GNU cpio reads what we write (skipped when cpio is not installed).
    #[test]
    fn gnu_cpio_reads_the_archive() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; skipping (apt-get install cpio)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("test.cpio");
        sample().write_file(&archive).unwrap();
        let list = Command::new("cpio")
            .args(["-it", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(list.status.success(), "{list:?}");
        let names: Vec<String> = String::from_utf8(list.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(names.len(), 10, "{names:?}");
        for n in ["init", "dev/console", "etc/deep/a.txt", "bin/sh"] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        let verbose = Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        let verbose = String::from_utf8(verbose.stdout).unwrap();
        assert!(
            verbose
                .lines()
                .any(|l| l.starts_with("crw-------") && l.contains("dev/console")),
            "{verbose}"
        );
        assert!(
            verbose
                .lines()
                .any(|l| l.starts_with("lrwxrwxrwx") && l.contains("bin/sh -> /init")),
            "{verbose}"
        );
        let content = Command::new("cpio")
            .args(["-i", "--quiet", "--to-stdout", "-F"])
            .arg(&archive)
            .arg("etc/deep/a.txt")
            .output()
            .unwrap();
        assert!(content.status.success(), "{content:?}");
        assert_eq!(content.stdout, b"abc");
    }
}
