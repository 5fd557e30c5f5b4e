//! Chunked root images (issue 8) end to end through the real CLI: `kindling image push`
//! into L3 (a local directory, or moto's S3), `kindling image pull` through L1 (per process)
//! and L2 (real memcached instances), dedup between images sharing a base, a memcached node
//! going down, corrupt chunks in each tier, and gc.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kindling_tests::servers::{Memcached, Moto};
use kindling_tests::workspace_bin;
use serde_json::Value;
use sha2::{Digest, Sha256};

const CHUNK: usize = 512 * 1024;

/// Deterministic, incompressible bytes (SHA-256 in counter mode) for chunk `seed`.
fn chunk_bytes(seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK);
    let mut i = 0u64;
    while out.len() < CHUNK {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update(i.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        i += 1;
    }
    out.truncate(CHUNK);
    out
}

/// An image of the given chunks: Some(seed) = data, None = zeros.
fn image(chunks: &[Option<u64>]) -> Vec<u8> {
    chunks
        .iter()
        .flat_map(|c| match c {
            Some(s) => chunk_bytes(*s),
            None => vec![0u8; CHUNK],
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn chunk_hash(seed: u64) -> String {
    hex(&Sha256::digest(chunk_bytes(seed)))
}

/// A scratch area: HOME (so no default path escapes it), the L3 directory, L1 directories.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn l3(&self) -> String {
        format!("file://{}", self.path("l3").display())
    }

    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    /// Runs `kindling image ARGS` as its own process (a "host").
    fn kindling(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(workspace_bin("kindling"));
        cmd.arg("image").args(args).env("HOME", self.dir.path());
        for v in [
            "KINDLING_IMAGE_L3",
            "KINDLING_IMAGE_L2",
            "KINDLING_IMAGE_L1_DIR",
            "KINDLING_S3_ENDPOINT",
        ] {
            cmd.env_remove(v);
        }
        cmd.envs(envs.iter().copied());
        cmd.output().expect("run kindling")
    }

    fn json(&self, args: &[&str], envs: &[(&str, &str)]) -> Value {
        let out = self.kindling(args, envs);
        assert!(
            out.status.success(),
            "kindling image {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

/// Hits per tier from a pull's JSON: (L1, L2, L3).
fn hits(pull: &Value) -> (u64, u64, u64) {
    let tiers = pull["tiers"].as_array().unwrap();
    let get = |name: &str| {
        tiers
            .iter()
            .find(|t| t["tier"] == name)
            .map(|t| t["hits"].as_u64().unwrap())
            .unwrap_or(0)
    };
    (get("L1"), get("L2"), get("L3"))
}

fn tier<'a>(pull: &'a Value, name: &str) -> &'a Value {
    pull["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == name)
        .unwrap()
}

fn assert_same_file(a: &Path, b: &[u8]) {
    let got = std::fs::read(a).unwrap();
    assert_eq!(got.len(), b.len(), "{} size", a.display());
    assert!(got == b, "{} differs from the pushed image", a.display());
}

#[test]
fn dedup_between_images_sharing_a_base_and_gc() {
    let s = Scratch::new();
    let l3 = s.l3();
    // base: 8 data chunks and 4 zero chunks; app: the base with chunk 3 changed and two
    // chunks appended.
    let mut layout: Vec<Option<u64>> = (0..8).map(Some).collect();
    layout.extend([None; 4]);
    let base = image(&layout);
    layout[3] = Some(100);
    layout.extend([Some(101), Some(102)]);
    let app = image(&layout);
    let base_f = s.write("base.img", &base);
    let app_f = s.write("app.img", &app);

    let r = s.json(
        &[
            "push",
            base_f.to_str().unwrap(),
            "--name",
            "base",
            "--json",
            "--l3",
            &l3,
        ],
        &[],
    );
    assert_eq!(r["chunks"], 12);
    assert_eq!(r["zero_chunks"], 4);
    assert_eq!(r["new_chunks"], 8);
    let r = s.json(
        &[
            "push",
            app_f.to_str().unwrap(),
            "--name",
            "app",
            "--json",
            "--l3",
            &l3,
        ],
        &[],
    );
    assert_eq!(r["chunks"], 14);
    assert_eq!(r["unique_chunks"], 10);
    assert_eq!(
        r["new_chunks"], 3,
        "only the changed and appended chunks: {r}"
    );
    assert_eq!(r["new_bytes"], 3 * CHUNK as u64);
    let stored = std::fs::read_dir(s.path("l3/chunks")).unwrap().count();
    assert_eq!(stored, 11, "8 base chunks + 3 new");

    let ls = s.json(&["ls", "--json", "--l3", &l3], &[]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app", "base"]);

    let out = s.path("app.pulled");
    let l1 = s.path("l1");
    let p = s.json(
        &[
            "pull",
            "app",
            "--out",
            out.to_str().unwrap(),
            "--json",
            "--l3",
            &l3,
            "--l1-dir",
            l1.to_str().unwrap(),
        ],
        &[],
    );
    assert_same_file(&out, &app);
    assert_eq!(hits(&p), (0, 0, 10));

    // Nothing is garbage while both images exist; without `base`, its one own chunk is.
    let g = s.json(&["gc", "--min-age-secs", "0", "--json", "--l3", &l3], &[]);
    assert_eq!(
        (g["kept_chunks"].as_u64(), g["deleted_chunks"].as_u64()),
        (Some(11), Some(0))
    );
    std::fs::remove_file(s.path("l3/manifests/base")).unwrap();
    let g = s.json(
        &["gc", "--min-age-secs", "3600", "--json", "--l3", &l3],
        &[],
    );
    assert_eq!(
        g["young_chunks"], 1,
        "a young unreferenced chunk is kept: {g}"
    );
    let g = s.json(&["gc", "--min-age-secs", "0", "--json", "--l3", &l3], &[]);
    assert_eq!(g["deleted_chunks"], 1, "{g}");
    assert!(!s.path("l3/chunks").join(chunk_hash(3)).exists());
    assert!(s.path("l3/chunks").join(chunk_hash(100)).exists());

    let bad = s.kindling(&["pull", "nope", "--out", "/dev/null", "--l3", &l3], &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not found"));
}

#[test]
fn second_host_reads_from_l2_and_a_memcached_node_down_fails_no_read() {
    let s = Scratch::new();
    let l3 = s.l3();
    let mut nodes: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let l2 = nodes.iter().map(|n| n.addr()).collect::<Vec<_>>().join(",");
    let layout: Vec<Option<u64>> = (0..12).map(|i| Some(1000 + i)).collect();
    let img = image(&layout);
    let f = s.write("img", &img);
    s.json(
        &[
            "push",
            f.to_str().unwrap(),
            "--name",
            "fn1",
            "--json",
            "--l3",
            &l3,
        ],
        &[],
    );

    let pull = |host: &str| {
        let out = s.path(&format!("{host}.img"));
        let l1 = s.path(&format!("{host}-l1"));
        let p = s.json(
            &[
                "pull",
                "fn1",
                "--out",
                out.to_str().unwrap(),
                "--json",
                "--l3",
                &l3,
                "--l2",
                &l2,
                "--l1-dir",
                l1.to_str().unwrap(),
            ],
            &[],
        );
        assert_same_file(&out, &img);
        p
    };
    // Host A: cold everywhere, from L3, filling L2 and its L1.
    assert_eq!(hits(&pull("a")), (0, 0, 12));
    // The chunks are spread over the three nodes.
    let on = |n: &Memcached| {
        (0..12)
            .filter(|i| n.has(&format!("kindling:chunk:{}", chunk_hash(1000 + i))))
            .count()
    };
    let spread: Vec<usize> = nodes.iter().map(on).collect();
    assert_eq!(spread.iter().sum::<usize>(), 12, "{spread:?}");
    // Rendezvous hashing over nodes on random ports: 12 chunks may leave one node empty
    // (~2 % of runs), but all on one node would be a bug.
    assert!(
        spread.iter().filter(|&&n| n > 0).count() >= 2,
        "rendezvous spread {spread:?}"
    );
    // Host B (another process, its own L1): everything from L2.
    assert_eq!(hits(&pull("b")), (0, 12, 0));
    // Host A again: its own L1 (disk; memory is per process).
    assert_eq!(hits(&pull("a")), (12, 0, 0));

    // One node down (the fullest): its chunks come from L3, the rest from L2, no read fails.
    let down = (0..nodes.len()).max_by_key(|&i| spread[i]).unwrap_or(0);
    let lost = spread[down] as u64;
    nodes[down].stop();
    let p = pull("c");
    assert_eq!(hits(&p), (0, 12 - lost, lost));
    // The lost node's chunks were refilled onto their runner-up nodes.
    assert_eq!(hits(&pull("d")), (0, 12, 0));
}

#[test]
fn corrupt_chunks_are_dropped_and_refetched_and_bad_everywhere_fails_the_read() {
    let s = Scratch::new();
    let l3 = s.l3();
    let node = Memcached::start();
    let l2 = node.addr();
    let layout: Vec<Option<u64>> = (0..4).map(|i| Some(2000 + i)).collect();
    let img = image(&layout);
    let f = s.write("img", &img);
    s.json(
        &[
            "push",
            f.to_str().unwrap(),
            "--name",
            "fn2",
            "--json",
            "--l3",
            &l3,
        ],
        &[],
    );
    let l1 = s.path("l1");
    let out = s.path("out.img");
    let args = [
        "pull",
        "fn2",
        "--out",
        out.to_str().unwrap(),
        "--json",
        "--l3",
        &l3,
        "--l2",
        &l2,
        "--l1-dir",
        l1.to_str().unwrap(),
    ];
    assert_eq!(hits(&s.json(&args, &[])), (0, 0, 4));

    // Corrupt chunk 2 in L1 (its disk copy) and in L2: both copies are dropped, L3 serves it.
    let h = chunk_hash(2002);
    let key = format!("kindling:chunk:{h}");
    std::fs::write(l1.join(&h), b"not the chunk").unwrap();
    node.set_raw(&key, b"also not the chunk");
    let p = s.json(&args, &[]);
    assert_same_file(&out, &img);
    assert_eq!(hits(&p), (3, 0, 1));
    assert_eq!(tier(&p, "L1")["corrupt"], 1);
    assert_eq!(tier(&p, "L2")["corrupt"], 1);
    // ...and both tiers were refilled with the good copy.
    assert_eq!(std::fs::read(l1.join(&h)).unwrap(), chunk_bytes(2002));
    assert_eq!(hits(&s.json(&args, &[])), (4, 0, 0));

    // Bad in every tier: the read fails with an I/O error, logged with the chunk's name.
    std::fs::write(l1.join(&h), b"bad").unwrap();
    node.set_raw(&key, b"bad");
    std::fs::write(s.path("l3/chunks").join(&h), b"bad").unwrap();
    let o = s.kindling(&args, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&h), "{err}");
    assert!(err.contains("no intact copy in any tier"), "{err}");
    assert!(
        !out.exists() || std::fs::read(&out).unwrap() == img,
        "no partial image left behind"
    );
}

#[test]
fn s3_round_trip_through_moto() {
    let s = Scratch::new();
    let moto = Moto::start();
    moto.create_bucket("kindling-images");
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let l3 = "s3://kindling-images/prefix";
    let base_layout = [Some(3000), None, Some(3001), Some(3002)];
    let base = image(&base_layout);
    let mut app_layout = base_layout.to_vec();
    app_layout.push(Some(3003));
    let app = image(&app_layout);
    let (bf, af) = (s.write("base", &base), s.write("app", &app));
    let common = ["--l3", l3, "--s3-endpoint", &moto.endpoint];
    let run = |args: &[&str]| {
        let mut v = args.to_vec();
        v.extend(common);
        s.json(&v, &env)
    };
    let r = run(&["push", bf.to_str().unwrap(), "--name", "base", "--json"]);
    assert_eq!(r["new_chunks"], 3);
    let r = run(&["push", af.to_str().unwrap(), "--name", "app", "--json"]);
    assert_eq!(r["new_chunks"], 1);
    let ls = run(&["ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let out = s.path("app.out");
    let l1 = s.path("l1");
    let p = run(&[
        "pull",
        "app",
        "--out",
        out.to_str().unwrap(),
        "--json",
        "--l1-dir",
        l1.to_str().unwrap(),
    ]);
    assert_same_file(&out, &app);
    assert_eq!(hits(&p), (0, 0, 4));
}

/// A `kindling image chunk-server` process, killed on drop.
struct ChunkServer(std::process::Child);

impl ChunkServer {
    fn start(s: &Scratch, socket: &Path, args: &[&str]) -> ChunkServer {
        let mut cmd = Command::new(workspace_bin("kindling"));
        cmd.args([
            "image",
            "chunk-server",
            "--socket",
            socket.to_str().unwrap(),
        ])
        .args(args)
        .env("HOME", s.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        let child = cmd.spawn().expect("spawn chunk-server");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "chunk-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        ChunkServer(child)
    }
}

impl Drop for ChunkServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The VMM's chunked virtio-blk backend against a real chunk server: an image that lives only
/// in L3 is read lazily (only the chunks touched are fetched), and a second host's chunk
/// server gets them from L2 (they are gone from L3 by then).
#[test]
fn vmm_backend_reads_lazily_through_the_chunk_server_and_l2() {
    use vmm::config::ChunkedImageConfig;
    use vmm::devices::virtio::block::chunked::ChunkedDisk;
    use vmm::devices::virtio::block::DiskBackend;

    let s = Scratch::new();
    let l3 = s.l3();
    let node = Memcached::start();
    let layout: Vec<Option<u64>> = (0..40).map(|i| Some(4000 + i)).collect();
    let img = image(&layout);
    let f = s.write("img", &img);
    s.json(
        &[
            "push",
            f.to_str().unwrap(),
            "--name",
            "fn3",
            "--json",
            "--l3",
            &l3,
        ],
        &[],
    );
    let manifest = s.path("l3/manifests/fn3");

    let read_some = |socket: &Path| {
        let cfg = ChunkedImageConfig {
            socket: socket.to_path_buf(),
            overlay: None,
            cache_mib: 8,
        };
        let mut disk = ChunkedDisk::open(&manifest, &cfg, true).expect("open chunked disk");
        assert_eq!(disk.size(), img.len() as u64);
        // A "boot": the first sectors, something in the middle, the last sector.
        for (off, len) in [
            (0usize, 4096usize),
            (17 * CHUNK + 512, 8192),
            (img.len() - 512, 512),
        ] {
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, off as u64).expect("read");
            assert!(buf == img[off..off + len], "bytes at {off}");
        }
        disk.fetched_chunks().to_vec()
    };

    let sock_a = s.path("a.sock");
    let l1_a = s.path("a-l1");
    let server_a = ChunkServer::start(
        &s,
        &sock_a,
        &[
            "--l3",
            &l3,
            "--l2",
            &node.addr(),
            "--l1-dir",
            l1_a.to_str().unwrap(),
        ],
    );
    assert_eq!(
        read_some(&sock_a),
        vec![0, 17, 39],
        "3 of 40 chunks fetched"
    );
    assert_eq!(
        std::fs::read_dir(&l1_a).unwrap().count(),
        3,
        "host A cached only those"
    );
    drop(server_a);

    // Host B: the chunks are gone from L3; L2 has them.
    for i in [0u64, 17, 39] {
        std::fs::remove_file(s.path("l3/chunks").join(chunk_hash(4000 + i))).unwrap();
    }
    let sock_b = s.path("b.sock");
    let l1_b = s.path("b-l1");
    let _server_b = ChunkServer::start(
        &s,
        &sock_b,
        &[
            "--l3",
            &l3,
            "--l2",
            &node.addr(),
            "--l1-dir",
            l1_b.to_str().unwrap(),
        ],
    );
    assert_eq!(read_some(&sock_b), vec![0, 17, 39]);
    // A chunk in no tier fails that read with an error, the rest of the disk still reads.
    let cfg = ChunkedImageConfig {
        socket: sock_b.clone(),
        overlay: None,
        cache_mib: 8,
    };
    std::fs::remove_file(s.path("l3/chunks").join(chunk_hash(4005))).unwrap();
    let mut disk = ChunkedDisk::open(&manifest, &cfg, true).unwrap();
    let mut buf = vec![0u8; 512];
    assert!(disk.read_at(&mut buf, 5 * CHUNK as u64).is_err());
    assert!(disk.read_at(&mut buf, 6 * CHUNK as u64).is_ok());
}
