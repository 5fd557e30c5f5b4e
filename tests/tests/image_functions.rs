//! Container image functions (`PackageType: Image`): an OCI layout made by the test is
//! registered through CreateFunction, checked at create time, and (where /dev/kvm works)
//! boots in a microVM with the image's ENTRYPOINT, ENV and WORKDIR, whiteouts applied.

use kindling_tests::{
    have_kvm, microvm_agent_with, oci_layout, static_bin, zip, Agent, LayerEntry,
};
use serde_json::{json, Value};

fn image_body(name: &str, uri: &std::path::Path, extra: Value) -> Value {
    let mut body = json!({
        "FunctionName": name, "PackageType": "Image",
        "Code": {"ImageUri": uri.display().to_string()},
    });
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    body
}

/// What the agent checks without starting anything: malformed images are refused at
/// create time with their reason, nothing is left behind, and the process backend says
/// plainly that it cannot run an image.
#[test]
fn image_functions_are_checked_at_create() {
    let agent = Agent::start();
    let t = tempfile::tempdir().unwrap();

    // Not there at all.
    let r = agent.create(&image_body("img", &t.path().join("nope"), json!({})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["Type"], "User");
    assert!(r.text().contains("is not usable"), "{}", r.text());

    // A directory that is no OCI layout.
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let r = agent.create(&image_body("img", &empty, json!({})));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("index.json"), "{}", r.text());

    // A tarball that is not a tar.
    let bad_tar = t.path().join("bad.tar");
    std::fs::write(&bad_tar, b"this is not a tar archive at all, just text").unwrap();
    let r = agent.create(&image_body("img", &bad_tar, json!({})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("bad.tar"), "{}", r.text());

    // A layout whose layer blob was tampered with (digest mismatch).
    let layout = t.path().join("tampered");
    oci_layout(
        &layout,
        &[vec![LayerEntry::File("app/x", b"hello", 0o644)]],
        json!({"Entrypoint": ["/app/x"]}),
    );
    let blobs: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for b in &blobs {
        let bytes = std::fs::read(b).unwrap();
        if bytes.windows(5).any(|w| w == b"hello") {
            let patched: Vec<u8> = bytes
                .iter()
                .map(|&c| if c == b'h' { b'j' } else { c })
                .collect();
            std::fs::write(b, patched).unwrap();
        }
    }
    let r = agent.create(&image_body("img", &layout, json!({})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("digest mismatch"), "{}", r.text());
    // Nothing half-made is left: the name is still free.
    assert_eq!(agent.get("/2015-03-31/functions/img").status, 404);

    // A good image is stored (a copy: the source may go away) and described as Lambda does.
    let good = t.path().join("good");
    oci_layout(
        &good,
        &[vec![LayerEntry::File("app/run", b"#!/bin/sh\n", 0o755)]],
        json!({"Entrypoint": ["/app/run"]}),
    );
    let r = agent.create(&image_body(
        "img",
        &good,
        json!({"ImageConfig": {"Command": ["h"], "WorkingDirectory": "/app"}, "MemorySize": 256}),
    ));
    assert_eq!(r.status, 201, "{}", r.text());
    let cfg = r.json();
    assert_eq!(cfg["PackageType"], "Image");
    assert!(
        cfg.get("Runtime").is_none() && cfg.get("Handler").is_none(),
        "{cfg}"
    );
    assert_eq!(
        cfg["ImageConfigResponse"]["ImageConfig"],
        json!({"Command": ["h"], "WorkingDirectory": "/app"})
    );
    assert_eq!(cfg["CodeSha256"].as_str().unwrap().len(), 64);
    std::fs::remove_dir_all(&good).unwrap();
    let got = agent.get("/2015-03-31/functions/img").json();
    assert!(got["Code"]["ImageUri"]
        .as_str()
        .unwrap()
        .starts_with(&agent.data_dir.display().to_string()));

    // The process backend cannot run an image, and says so.
    let r = agent.invoke("img", b"{}");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("--backend microvm"), "{}", r.text());
}

/// An image made by the test boots and answers from a microVM: ENTRYPOINT and CMD make the
/// command line, ENV and WORKDIR are honoured, a later layer's whiteout removes a file, and
/// a function without a bootstrap, or an image without a command, is a clear init error.
#[test]
fn oci_image_function_in_a_microvm() {
    if !have_kvm("microVM image test") {
        return;
    }
    let echo = static_bin("echo-rust", "echo-rust");
    let echo = std::fs::read(echo).unwrap();
    // Image functions, not snapshots (snapshot_restore.rs and microvm_backend.rs cover the
    // snapshotted-and-kept VM): this test once hit an open bug there, the kept VM rebooting on
    // its second invocation (3 of 10 runs in session 3, 0 of 28 in session 4; a recurrence now
    // logs the guest's last console lines, see `microvm::exit_note`).
    let agent = microvm_agent_with(&["--snapshots", "off"]);
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    oci_layout(
        &layout,
        &[
            vec![
                LayerEntry::File("app/handler", &echo, 0o755),
                LayerEntry::File("app/junk", b"removed by the next layer", 0o644),
                LayerEntry::File("etc/motd", b"base", 0o644),
            ],
            vec![
                LayerEntry::Whiteout("app/junk"),
                LayerEntry::File("etc/greeting", b"hi", 0o644),
            ],
        ],
        json!({
            "Entrypoint": ["/app/handler"], "Cmd": ["my.handler"],
            "Env": ["IMAGE_VAR=from-image", "SHARED=image", "PATH=/app:/usr/bin:/bin"],
            "WorkingDir": "/app",
        }),
    );
    let r = agent.create(&image_body(
        "img-vm",
        &layout,
        json!({"Timeout": 10, "Environment": {"Variables": {"SHARED": "function"}}}),
    ));
    assert_eq!(r.status, 201, "{}", r.text());

    let probe = json!({"probe": {
        "env": ["IMAGE_VAR", "SHARED", "PATH", "_HANDLER", "AWS_LAMBDA_FUNCTION_NAME"],
        "paths": ["/app/junk", "/etc/greeting", "/etc/motd"],
    }});
    let r = agent.invoke("img-vm", probe.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}\n{}", r.text(), agent.log());
    let body = r.json();
    assert_eq!(body["functionName"], "img-vm", "{body}");
    let p = &body["probe"];
    assert_eq!(p["args"], json!(["/app/handler", "my.handler"]), "{p}");
    assert_eq!(p["cwd"], "/app");
    assert_eq!(p["env"]["IMAGE_VAR"], "from-image");
    assert_eq!(p["env"]["SHARED"], "function");
    assert_eq!(p["env"]["PATH"], "/app:/usr/bin:/bin");
    assert_eq!(p["env"]["_HANDLER"], "my.handler");
    assert_eq!(p["env"]["AWS_LAMBDA_FUNCTION_NAME"], "img-vm");
    assert_eq!(
        p["paths"],
        json!({"/app/junk": false, "/etc/greeting": true, "/etc/motd": true})
    );
    // Warm: the same VM answers again.
    let r = agent.invoke("img-vm", br#"{"n":2}"#);
    assert_eq!(
        r.json()["echo"],
        json!({"n": 2}),
        "{}\n{}",
        r.text(),
        agent.log()
    );

    // An image with no ENTRYPOINT and no CMD fails its init with the reason.
    let bare = t.path().join("bare");
    oci_layout(
        &bare,
        &[vec![LayerEntry::File("app/handler", &echo, 0o755)]],
        json!({"Env": ["X=1"]}),
    );
    let r = agent.create(&image_body("bare-vm", &bare, json!({"Timeout": 10})));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = agent.invoke("bare-vm", b"{}");
    assert_eq!(
        r.header("x-amz-function-error"),
        Some("Unhandled"),
        "{}",
        r.text()
    );
    assert_eq!(
        r.json()["errorType"],
        "Runtime.InvalidEntrypoint",
        "{}",
        r.text()
    );
    assert!(
        r.text().contains("neither an ENTRYPOINT nor a CMD"),
        "{}",
        r.text()
    );

    // A provided function whose ZIP has no bootstrap: refused before any VM starts.
    let z = zip(&[("README", b"no bootstrap here", 0o644)]);
    agent.create_ok("nobootstrap", "provided.al2023", "bootstrap", &z, json!({}));
    let r = agent.invoke("nobootstrap", b"{}");
    assert_eq!(
        r.json()["errorType"],
        "Runtime.InvalidEntrypoint",
        "{}",
        r.text()
    );
    assert!(
        r.text().contains("Couldn't find valid bootstrap"),
        "{}",
        r.text()
    );
}
