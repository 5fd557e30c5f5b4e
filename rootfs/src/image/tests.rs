//! Image builder tests: real ext4 images (mkfs.ext4), inspected with debugfs. No VM.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::*;

fn debugfs(image: &Path, req: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", req])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Names listed in a directory of the image.
fn ls(image: &Path, dir: &str) -> Vec<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("ls -p {dir}")])
        .arg(image)
        .output()
        .expect("debugfs runs");
    // -p: /inode/mode/uid/gid/name/size/
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| n != "." && n != ".." && !n.is_empty())
        .collect()
}

fn cat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// e2fsck finds nothing to fix.
fn fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(image)
        .output()
        .expect("e2fsck runs");
    assert!(
        out.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fake_init(dir: &Path) -> PathBuf {
    let p = dir.join("guest-init");
    fs::write(&p, b"\x7fELF fake guest-init").unwrap();
    p
}

fn build_opts(source: Source, out: PathBuf, init: Option<PathBuf>) -> BuildOptions {
    BuildOptions {
        base: None,
        source,
        out,
        guest_init: init,
        progress: None,
    }
}

#[test]
fn from_dir_on_provided_base() {
    let t = tempfile::tempdir().unwrap();
    let code = t.path().join("code");
    fs::create_dir_all(code.join("lib")).unwrap();
    fs::write(code.join("bootstrap"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(code.join("bootstrap"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(code.join("lib/data.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink("data.txt", code.join("lib/link")).unwrap();
    let out = t.path().join("out/fn.ext4");
    let r = build(build_opts(
        Source::Dir(code),
        out.clone(),
        Some(fake_init(t.path())),
    ))
    .unwrap();
    assert_eq!(r.source, "dir");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.bytes, fs::metadata(&out).unwrap().len());
    let root = ls(&out, "/");
    for d in ["proc", "sys", "dev", "tmp", "var", "opt", "sbin", "etc"] {
        assert!(root.contains(&d.to_string()), "{d} missing: {root:?}");
    }
    assert_eq!(cat(&out, "/sbin/init"), "\x7fELF fake guest-init");
    assert_eq!(cat(&out, "/var/task/lib/data.txt"), "hello");
    assert!(debugfs(&out, "stat /var/task/bootstrap").contains("Mode:  0755"));
    assert!(debugfs(&out, "stat /var/task/lib/link").contains("Type: symlink"));
    let cfg: ImageConfig = serde_json::from_str(&cat(&out, "/etc/kindling/image.json")).unwrap();
    assert_eq!(cfg.source, "dir");
    assert_eq!(cfg.init.as_deref(), Some("/sbin/init"));
    assert_eq!(cfg.working_dir, "/var/task");
    assert!(debugfs(&out, "stats").contains("read-only"));
    fsck_clean(&out);
}

fn make_zip(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut w = ::zip::ZipWriter::new(&mut buf);
    for (name, data, mode) in entries {
        w.start_file(
            *name,
            ::zip::write::SimpleFileOptions::default().unix_permissions(*mode),
        )
        .unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
    buf.into_inner()
}

#[test]
fn from_zip_and_missing_bootstrap_warns() {
    let t = tempfile::tempdir().unwrap();
    let zip = t.path().join("fn.zip");
    fs::write(
        &zip,
        make_zip(&[
            ("bootstrap", b"#!/bin/sh\n", 0o755),
            ("a/b.txt", b"bee", 0o644),
        ]),
    )
    .unwrap();
    let out = t.path().join("fn.ext4");
    let r = build(build_opts(
        Source::Zip(zip),
        out.clone(),
        Some(fake_init(t.path())),
    ))
    .unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(cat(&out, "/var/task/a/b.txt"), "bee");
    assert!(debugfs(&out, "stat /var/task/bootstrap").contains("Mode:  0755"));

    let zip2 = t.path().join("nobootstrap.zip");
    fs::write(&zip2, make_zip(&[("handler.py", b"x", 0o644)])).unwrap();
    let r = build(build_opts(
        Source::Zip(zip2),
        t.path().join("n.ext4"),
        Some(fake_init(t.path())),
    ))
    .unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("no bootstrap")));

    // A ZIP escaping its root is refused; so is garbage; no guest-init is a typed error.
    let evil = t.path().join("evil.zip");
    fs::write(&evil, make_zip(&[("../evil", b"x", 0o644)])).unwrap();
    let e = build(build_opts(
        Source::Zip(evil),
        t.path().join("e.ext4"),
        Some(fake_init(t.path())),
    ));
    assert!(
        matches!(e, Err(ImageError::Zip(zip::ZipError::Invalid(_)))),
        "{e:?}"
    );
    let junk = t.path().join("junk.zip");
    fs::write(&junk, b"not a zip").unwrap();
    let e = build(build_opts(
        Source::Zip(junk.clone()),
        t.path().join("j.ext4"),
        Some(fake_init(t.path())),
    ));
    assert!(matches!(e, Err(ImageError::Zip(_))), "{e:?}");
    let e = build(build_opts(Source::Zip(junk), t.path().join("j.ext4"), None));
    assert!(matches!(e, Err(ImageError::MissingGuestInit(_))), "{e:?}");
    assert!(!t.path().join("e.ext4").exists());
}

/// A tar layer from (path, kind) entries: 'f' file with contents, 'd' dir, 'l' symlink.
fn tar_layer(entries: &[(&str, char, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match kind {
            'd' => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            'l' => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, data).unwrap();
            }
            'h' => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, path, data).unwrap();
            }
            'c' => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            _ => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A raw tar entry with any name (the tar builder refuses `..`).
fn raw_tar_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let hex = format!("{:x}", Sha256::digest(data));
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("blobs/sha256").join(&hex), data).unwrap();
    format!("sha256:{hex}")
}

/// An OCI layout with these layers (gzipped when `gz`), returning the layer digests.
fn oci_layout(dir: &Path, layers: &[Vec<u8>], gz: bool) -> Vec<String> {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["/lambda-entrypoint.sh"],
            "Cmd": ["app.handler"],
            "Env": ["PATH=/usr/bin:/bin", "LAMBDA_TASK_ROOT=/var/task"],
            "WorkingDir": "/var/task"
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let config_digest = put_blob(dir, config.to_string().as_bytes());
    let mut descs = Vec::new();
    let mut digests = Vec::new();
    for l in layers {
        let data = if gz { gzip(l) } else { l.clone() };
        let d = put_blob(dir, &data);
        descs.push(serde_json::json!({
            "mediaType": if gz { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar" },
            "digest": d, "size": data.len()
        }));
        digests.push(d);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 1},
        "layers": descs
    });
    let m = manifest.to_string();
    let md = put_blob(dir, m.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": m.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}]
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    digests
}

fn two_layers() -> Vec<Vec<u8>> {
    let base = tar_layer(&[
        ("etc/", 'd', ""),
        ("etc/keep.conf", 'f', "keep"),
        ("etc/gone.conf", 'f', "gone"),
        ("opq/", 'd', ""),
        ("opq/old1", 'f', "1"),
        ("opq/sub/", 'd', ""),
        ("opq/sub/old2", 'f', "2"),
        ("bin/", 'd', ""),
        ("bin/tool", 'f', "tool"),
        ("bin/tool-link", 'h', "bin/tool"),
        ("bin/sh", 'l', "/bin/busybox"),
        ("dev/", 'd', ""),
        ("dev/null", 'c', ""),
    ]);
    let top = tar_layer(&[
        ("etc/.wh.gone.conf", 'f', ""),
        ("opq/", 'd', ""),
        ("opq/new", 'f', "new"),
        ("opq/.wh..wh..opq", 'f', ""),
        ("var/task/app.py", 'f', "def handler(e, c): return e"),
    ]);
    vec![base, top]
}

#[test]
fn from_oci_layout_with_whiteouts() {
    for gz in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let layout = t.path().join("layout");
        oci_layout(&layout, &two_layers(), gz);
        let out = t.path().join("oci.ext4");
        let r = build(build_opts(
            Source::Oci(layout),
            out.clone(),
            Some(fake_init(t.path())),
        ))
        .unwrap();
        assert_eq!(r.source, "oci");
        assert!(
            r.warnings.iter().any(|w| w.contains("/dev/null")),
            "{:?}",
            r.warnings
        );
        let etc = ls(&out, "/etc");
        assert!(etc.contains(&"keep.conf".to_string()), "{etc:?}");
        assert!(!etc.contains(&"gone.conf".to_string()), "{etc:?}");
        assert!(!etc.iter().any(|n| n.starts_with(".wh.")), "{etc:?}");
        let opq = ls(&out, "/opq");
        assert_eq!(opq, vec!["new".to_string()], "opaque dir: {opq:?}");
        assert_eq!(cat(&out, "/bin/tool-link"), "tool");
        assert!(debugfs(&out, "stat /bin/tool").contains("Links: 2"));
        assert!(debugfs(&out, "stat /bin/sh").contains("Type: symlink"));
        assert!(ls(&out, "/dev").is_empty());
        assert_eq!(cat(&out, "/var/kindling/init"), "\x7fELF fake guest-init");
        let cfg: ImageConfig =
            serde_json::from_str(&cat(&out, "/etc/kindling/image.json")).unwrap();
        assert_eq!(cfg.entrypoint, vec!["/lambda-entrypoint.sh"]);
        assert_eq!(cfg.cmd, vec!["app.handler"]);
        assert_eq!(cfg.env.len(), 2);
        assert_eq!(cfg.working_dir, "/var/task");
        assert_eq!(cfg.init.as_deref(), Some("/var/kindling/init"));
        assert!(ls(&out, "/").contains(&"proc".to_string()));
        fsck_clean(&out);
    }
}

#[test]
fn from_docker_save_tarball() {
    let t = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let config = serde_json::json!({
        "config": {"Cmd": ["app.handler"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter()
            .map(|l| format!("sha256:{:x}", Sha256::digest(l))).collect::<Vec<_>>()}
    })
    .to_string();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    add("cfg.json", config.as_bytes());
    add("l1/layer.tar", &layers[0]);
    add("l2/layer.tar", &layers[1]);
    add(
        "manifest.json",
        br#"[{"Config":"cfg.json","RepoTags":["x:latest"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#,
    );
    let tarball = t.path().join("image.tar");
    fs::write(&tarball, b.into_inner().unwrap()).unwrap();
    let out = t.path().join("d.ext4");
    let r = build(build_opts(Source::Oci(tarball), out.clone(), None)).unwrap();
    assert!(r.config.init.is_none());
    assert_eq!(r.config.cmd, vec!["app.handler"]);
    assert!(!ls(&out, "/etc").contains(&"gone.conf".to_string()));
    assert_eq!(ls(&out, "/opq"), vec!["new".to_string()]);
}

#[test]
fn malformed_oci_images_give_typed_errors() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.ext4");
    let go = |layout: &Path| build(build_opts(Source::Oci(layout.into()), out.clone(), None));

    // No index.json (and no manifest.json).
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let e = go(&empty);
    assert!(
        matches!(&e, Err(ImageError::BadOci(m)) if m.contains("index.json")),
        "{e:?}"
    );

    // A layer whose bytes do not match its digest.
    let bad_digest = t.path().join("digest");
    let digests = oci_layout(&bad_digest, &two_layers(), false);
    let hex = digests[1].trim_start_matches("sha256:");
    fs::write(bad_digest.join("blobs/sha256").join(hex), b"tampered").unwrap();
    let e = go(&bad_digest);
    assert!(
        matches!(&e, Err(ImageError::DigestMismatch { blob, .. }) if *blob == digests[1]),
        "{e:?}"
    );

    // A layer that is not a tar.
    let bad_tar = t.path().join("badtar");
    oci_layout(
        &bad_tar,
        &[b"this is not a tar archive at all, not even close..".repeat(20)],
        false,
    );
    let e = go(&bad_tar);
    assert!(matches!(&e, Err(ImageError::BadLayer { .. })), "{e:?}");

    // A path escaping the root.
    let escape = t.path().join("escape");
    oci_layout(&escape, &[raw_tar_file("../../escaped", b"x")], false);
    let e = go(&escape);
    assert!(
        matches!(&e, Err(ImageError::PathEscapes { path, .. }) if path.contains("escaped")),
        "{e:?}"
    );
    assert!(!t.path().join("escaped").exists());

    // Writing through a symlink planted by an earlier layer.
    let through = t.path().join("through");
    let target = t.path().join("host-dir");
    fs::create_dir(&target).unwrap();
    let l1 = tar_layer(&[("etc", 'l', target.to_str().unwrap())]);
    let l2 = tar_layer(&[("etc/passwd", 'f', "pwned")]);
    oci_layout(&through, &[l1, l2], false);
    let e = go(&through);
    assert!(matches!(&e, Err(ImageError::PathEscapes { .. })), "{e:?}");
    assert!(!target.join("passwd").exists());

    // A source that does not exist.
    let e = go(&t.path().join("nope"));
    assert!(matches!(&e, Err(ImageError::BadSource(_))), "{e:?}");
    assert!(!out.exists());
}

#[test]
fn image_size_grows_with_content() {
    let small = ext4::image_size(
        &ext4::TreeStats {
            entries: 10,
            files: 5,
            blocks: 10,
        },
        0,
    );
    let big = ext4::image_size(
        &ext4::TreeStats {
            entries: 10,
            files: 5,
            blocks: 100_000,
        },
        0,
    );
    assert!(small >= 8 << 20 && (small >> 20) << 20 == small);
    assert!(big > 100_000 * 4096);
    assert!(
        ext4::image_size(
            &ext4::TreeStats {
                entries: 10,
                files: 5,
                blocks: 10
            },
            1
        ) > small
    );
}

#[test]
fn zip_byte_cap_counts_bytes_written() {
    let t = tempfile::tempdir().unwrap();
    let z = make_zip(&[("a", b"12345", 0o644)]);
    let e = zip::extract_zip(std::io::Cursor::new(&z), t.path(), 4);
    assert!(
        matches!(e, Err(zip::ZipError::TooLarge { limit: 4 })),
        "{e:?}"
    );
    let d = tempfile::tempdir().unwrap();
    assert_eq!(
        zip::extract_zip(std::io::Cursor::new(&z), d.path(), 5).unwrap(),
        5
    );
}

#[test]
fn whiteout_under_a_missing_directory_makes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let l = tar_layer(&[("nowhere/.wh.x", 'f', ""), ("a/.wh..wh..opq", 'f', "")]);
    let s = layer::apply_layer(&l[..], t.path(), "l", 1 << 20).unwrap();
    assert_eq!(s.whiteouts, 2);
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
}

#[test]
fn a_base_tree_is_copied_under_the_code_and_guest_init_moves_aside() {
    let dir = tempfile::tempdir().unwrap();
    // A base whose /sbin is a symlink, as in Debian's merged-/usr trees.
    let base = dir.path().join("base");
    std::fs::create_dir_all(base.join("usr/sbin")).unwrap();
    std::fs::create_dir_all(base.join("usr/bin")).unwrap();
    std::fs::write(base.join("usr/bin/python3.11"), b"#!fake").unwrap();
    std::os::unix::fs::symlink("usr/sbin", base.join("sbin")).unwrap();
    let code = dir.path().join("code");
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(code.join("app.py"), b"def handler(e, c): return e\n").unwrap();
    let init = dir.path().join("init");
    std::fs::write(&init, b"\x7fELF init").unwrap();
    let out = dir.path().join("img.ext4");
    let mut opts = build_opts(Source::Dir(code), out.clone(), Some(init));
    opts.base = Some(("python3.11".into(), base));
    let report = build(opts).unwrap();
    assert_eq!(report.config.base.as_deref(), Some("python3.11"));
    assert_eq!(report.config.init.as_deref(), Some("/var/kindling/init"));
    assert!(
        report.warnings.is_empty(),
        "no bootstrap warning for a python base: {:?}",
        report.warnings
    );
}
