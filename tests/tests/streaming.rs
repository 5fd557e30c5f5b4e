//! Response streaming end to end (issue #3): InvokeWithResponseStream
//! (`POST /2021-11-15/functions/{name}/response-streaming-invocations`) on a real `kindling
//! serve` (process backend) with real runtime clients: the `echo-rust-streaming` example on
//! `lambda_runtime::streaming`, `echo-rust` (a buffered answer), and a Python bootstrap that
//! writes a chunked body with error trailers the way the Runtime API documents them.
//! The event-stream framing is also decoded by botocore in `tests/python/test_boto3.py`.

use std::io::Read;
use std::time::Duration;

use kindling_tests::{microvm_agent, python, workspace_bin, zip, Agent, AgentOptions};
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;

/// One decoded event-stream message.
#[derive(Debug)]
enum Event {
    Chunk(Vec<u8>),
    Complete(Value),
}

/// Reads event-stream messages off a streamed answer one at a time.
struct Events {
    res: reqwest::blocking::Response,
}

impl Events {
    fn next(&mut self) -> Option<Event> {
        let mut prelude = [0u8; 12];
        match self.res.read_exact(&mut prelude) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => panic!("reading the stream: {e}"),
        }
        let total = u32::from_be_bytes(prelude[0..4].try_into().unwrap()) as usize;
        let hlen = u32::from_be_bytes(prelude[4..8].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; total - 12];
        self.res.read_exact(&mut rest).expect("a whole message");
        let (mut headers, payload) = rest[..total - 16].split_at(hlen);
        let mut event_type = String::new();
        while !headers.is_empty() {
            let n = headers[0] as usize;
            let name = String::from_utf8_lossy(&headers[1..1 + n]).into_owned();
            assert_eq!(headers[1 + n], 7, "string header");
            let vlen = u16::from_be_bytes([headers[2 + n], headers[3 + n]]) as usize;
            let value = String::from_utf8_lossy(&headers[4 + n..4 + n + vlen]).into_owned();
            if name == ":event-type" {
                event_type = value;
            }
            headers = &headers[4 + n + vlen..];
        }
        Some(match event_type.as_str() {
            "PayloadChunk" => Event::Chunk(payload.to_vec()),
            "InvokeComplete" => Event::Complete(serde_json::from_slice(payload).expect("JSON")),
            other => panic!("unexpected event {other}"),
        })
    }

    /// Chunks until (and with) the first one containing `needle`; all bytes so far.
    fn until(&mut self, needle: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            match self.next() {
                Some(Event::Chunk(c)) => {
                    got.extend_from_slice(&c);
                    if got.windows(needle.len()).any(|w| w == needle) {
                        return got;
                    }
                }
                other => panic!(
                    "stream ended ({other:?}) before {:?}; had {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&got)
                ),
            }
        }
    }

    /// The rest: all chunk bytes, and the InvokeComplete document.
    fn rest(&mut self) -> (Vec<u8>, Value) {
        let mut got = Vec::new();
        loop {
            match self.next() {
                Some(Event::Chunk(c)) => got.extend_from_slice(&c),
                Some(Event::Complete(v)) => {
                    assert!(self.next().is_none(), "nothing after InvokeComplete");
                    return (got, v);
                }
                None => panic!("the stream ended without InvokeComplete"),
            }
        }
    }
}

fn stream_invoke(agent: &Agent, name: &str, payload: &Value) -> Events {
    let res = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .post(format!(
            "{}/2021-11-15/functions/{name}/response-streaming-invocations",
            agent.url
        ))
        .body(payload.to_string())
        .send()
        .expect("streaming invoke");
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/vnd.amazon.eventstream")
    );
    Events { res }
}

fn create_bin(agent: &Agent, name: &str, bin: &str) {
    let code = std::fs::read(workspace_bin(bin)).expect("binary");
    agent.create_ok(
        name,
        "provided.al2023",
        "bootstrap",
        &zip(&[("bootstrap", &code, 0o755)]),
        json!({"Timeout": 30}),
    );
}

fn streaming_agent(extra_args: &[&str]) -> Agent {
    let agent = Agent::start_with(AgentOptions {
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    create_bin(&agent, "stream", "echo-rust-streaming");
    agent
}

#[test]
fn chunks_reach_the_caller_before_the_function_finishes() {
    let agent = streaming_agent(&[]);
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let mut events = stream_invoke(
        &agent,
        "stream",
        &json!({"chunks": 3, "gate": gate.to_str().unwrap()}),
    );
    // The function waits on the gate after its first chunk: the caller can only hold that
    // chunk now if it was relayed while the function was still running.
    let first = events.until(b"chunk 0\n");
    assert!(!first.windows(7).any(|w| w == b"chunk 1"));
    std::fs::write(&gate, b"").unwrap();
    let (rest, complete) = events.rest();
    assert_eq!(rest, b"chunk 1\nchunk 2\n");
    assert_eq!(complete, json!({}), "no error");
}

#[test]
fn a_mid_stream_crash_ends_with_invoke_complete_and_its_error_code() {
    let agent = streaming_agent(&[]);
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let mut events = stream_invoke(
        &agent,
        "stream",
        &json!({"chunks": 3, "exit_after": 1, "gate": gate.to_str().unwrap()}),
    );
    events.until(b"chunk 0\n");
    std::fs::write(&gate, b"").unwrap();
    let (rest, complete) = events.rest();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(complete["ErrorCode"], "Runtime.ExitError", "{complete}");
    let details = complete["ErrorDetails"].as_str().unwrap();
    assert!(details.contains("exit status 7"), "{details}");
    // The environment is gone; the next invocation gets a new one and streams fine.
    let (body, complete) = stream_invoke(&agent, "stream", &json!({"chunks": 1})).rest();
    assert!(body.ends_with(b"chunk 0\n"));
    assert_eq!(complete, json!({}));
}

/// A `provided` bootstrap in Python that streams its answer by hand on the Runtime API:
/// chunked, `Lambda-Runtime-Function-Response-Mode: streaming`, two chunks, then the error
/// trailers.
fn trailer_bootstrap() -> Vec<u8> {
    let script = format!(
        r#"#!{python}
import base64, json, os, socket
host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
def request(raw):
    s = socket.create_connection((host, int(port)))
    s.sendall(raw)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, v = line.split(b":", 1)
        if k.strip().lower() == b"content-length":
            length = int(v)
        if k.strip().lower() == b"lambda-runtime-aws-request-id":
            rid = v.strip().decode()
    while len(body) < length:
        body += s.recv(65536)
    s.close()
    return head, body
while True:
    head, body = request(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n")
    rid = [l.split(b":", 1)[1].strip().decode() for l in head.split(b"\r\n")
           if l.lower().startswith(b"lambda-runtime-aws-request-id:")][0]
    err = base64.b64encode(json.dumps({{"errorMessage": "gave up half way", "errorType": "HalfWay"}}).encode())
    raw = (f"POST /2018-06-01/runtime/invocation/{{rid}}/response HTTP/1.1\r\nHost: x\r\n"
           "Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n"
           "Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n\r\n"
           "6\r\npart 1\r\n6\r\npart 2\r\n0\r\n"
           "Lambda-Runtime-Function-Error-Type: Function.HalfWay\r\n"
           f"Lambda-Runtime-Function-Error-Body: {{err.decode()}}\r\n\r\n").encode()
    request(raw)
"#,
        python = python().display()
    );
    zip(&[("bootstrap", script.as_bytes(), 0o755)])
}

#[test]
fn error_trailers_arrive_as_invoke_complete_with_their_error_code() {
    let agent = Agent::start();
    agent.create_ok(
        "trailers",
        "provided.al2023",
        "bootstrap",
        &trailer_bootstrap(),
        json!({}),
    );
    let (body, complete) = stream_invoke(&agent, "trailers", &json!({})).rest();
    assert_eq!(body, b"part 1part 2");
    assert_eq!(
        complete,
        json!({"ErrorCode": "Function.HalfWay", "ErrorDetails": "gave up half way"})
    );
}

#[test]
fn a_stream_over_six_mb_arrives_whole() {
    // Past 6 MiB the default 2 MiB/s cap applies: 1 MiB over takes about half a second.
    let agent = streaming_agent(&[]);
    let (body, complete) =
        stream_invoke(&agent, "stream", &json!({"chunks": 7, "chunk_bytes": MIB})).rest();
    assert_eq!(complete, json!({}));
    // lambda_runtime's prelude (JSON + 8 NULs), then the 7 MiB.
    let start = body
        .windows(8)
        .position(|w| w == [0u8; 8])
        .expect("prelude end")
        + 8;
    assert_eq!(body.len() - start, 7 * MIB);
    assert!(body[start..].iter().all(|&b| b == b'x' || b == b'\n'));
}

#[test]
fn the_stream_size_cap_is_enforced() {
    // A 1 MiB cap stands in for Lambda's 200 MiB (same code path, much faster).
    let agent = streaming_agent(&["--stream-max-bytes", "1048576"]);
    let (body, complete) =
        stream_invoke(&agent, "stream", &json!({"chunks": 3, "chunk_bytes": MIB})).rest();
    assert!(body.len() <= MIB, "{} bytes passed the cap", body.len());
    assert_eq!(
        complete["ErrorCode"], "Function.ResponseSizeTooLarge",
        "{complete}"
    );
    assert!(complete["ErrorDetails"]
        .as_str()
        .unwrap()
        .contains("1048576"));
}

#[test]
fn a_buffered_answer_is_one_payload_chunk_and_a_stream_through_invoke_is_buffered() {
    let agent = streaming_agent(&[]);
    create_bin(&agent, "echo", "echo-rust");
    // echo-rust answers buffered: its whole body in one PayloadChunk.
    let mut events = stream_invoke(&agent, "echo", &json!({"hello": "world"}));
    let Some(Event::Chunk(body)) = events.next() else {
        panic!("expected one PayloadChunk")
    };
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["echo"], json!({"hello": "world"}));
    let (rest, complete) = events.rest();
    assert!(rest.is_empty());
    assert_eq!(complete, json!({}));
    // A function error on a buffered runtime: no chunk, InvokeComplete carries it.
    let (rest, complete) = stream_invoke(&agent, "echo", &json!({"fail": "nope"})).rest();
    assert!(rest.is_empty());
    assert_eq!(
        complete,
        json!({"ErrorCode": "Runtime.Unknown", "ErrorDetails": "nope"})
    );

    // The streaming function through plain Invoke: the whole stream, buffered.
    let r = agent.invoke("stream", br#"{"chunks": 2}"#);
    assert_eq!(r.status, 200);
    assert!(r.header("x-amz-function-error").is_none());
    assert!(r.body.ends_with(b"chunk 0\nchunk 1\n"), "{}", r.text());
    // ... up to 6 MB.
    let r = agent.invoke("stream", br#"{"chunks": 7, "chunk_bytes": 1048576}"#);
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    assert_eq!(r.json()["errorType"], "Function.ResponseSizeTooLarge");
}

#[test]
fn unknown_functions_and_bad_invocation_types_are_api_errors() {
    let agent = Agent::start();
    let url = |name: &str| {
        format!(
            "{}/2021-11-15/functions/{name}/response-streaming-invocations",
            agent.url
        )
    };
    let http = reqwest::blocking::Client::new();
    let r = http.post(url("nope")).body("{}").send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        r.headers().get("x-amzn-errortype").unwrap(),
        "ResourceNotFoundException"
    );
    create_bin(&agent, "stream", "echo-rust-streaming");
    let r = http
        .post(url("stream"))
        .header("x-amz-invocation-type", "Event")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = http
        .post(url("stream"))
        .header("x-amz-invocation-type", "DryRun")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
}

/// The microvm backend carries a stream over vsock (StreamStart / StreamChunk frames): the
/// statically linked `echo-rust-streaming` in a microVM answers InvokeWithResponseStream with
/// its chunks and an InvokeComplete without error. Skipped where /dev/kvm is not usable.
#[test]
fn a_stream_from_a_microvm_arrives_as_chunks() {
    if !kindling_tests::have_kvm("microvm streaming test") {
        return;
    }
    let bin = rootfs::static_bin::build("echo-rust", "echo-rust-streaming")
        .expect("static echo-rust-streaming");
    let agent = microvm_agent();
    let code = std::fs::read(&bin).unwrap();
    agent.create_ok(
        "stream-vm",
        "provided.al2023",
        "bootstrap",
        &zip(&[("bootstrap", &code, 0o755)]),
        json!({"Timeout": 60}),
    );
    let mut events = stream_invoke(&agent, "stream-vm", &json!({"chunks": 3}));
    // lambda_runtime's prelude (JSON + 8 NULs) comes first, as function bytes. A buffered
    // answer would be one PayloadChunk: streamed, each chunk the function writes is its own.
    let mut all = Vec::new();
    let mut pieces = 0;
    let complete = loop {
        match events.next() {
            Some(Event::Chunk(c)) => {
                pieces += 1;
                all.extend_from_slice(&c);
            }
            Some(Event::Complete(v)) => break v,
            None => panic!("the stream ended without InvokeComplete"),
        }
    };
    assert!(pieces >= 3, "{pieces} PayloadChunks: not streamed");
    assert!(
        all.ends_with(b"chunk 0\nchunk 1\nchunk 2\n"),
        "{:?}\n{}",
        String::from_utf8_lossy(&all),
        agent.log()
    );
    assert_eq!(complete, json!({}), "no error");
}
