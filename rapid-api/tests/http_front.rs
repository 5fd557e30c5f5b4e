//! Tests of the axum HTTP front (`rapid_api::http`), served on a real loopback socket and
//! driven by a plain HTTP client, the way a runtime client (`awslambdaric`, `lambda_runtime`)
//! talks to it. Status-and-body rows for every endpoint x state x bad input live in
//! `protocol_table.rs`; this file covers behaviour beyond one exchange.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rapid_api::{
    CoreError, ErrorReport, Invocation, InvokeOutcome, RuntimeCore, StreamEvent, StreamLimits,
    MAX_RESPONSE_BYTES, MAX_XRAY_CAUSE_BYTES,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(100);

/// One Runtime API server on 127.0.0.1, stopped when dropped.
struct Server {
    core: Arc<RuntimeCore>,
    addr: SocketAddr,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Server {
    async fn start() -> Server {
        let core = RuntimeCore::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(rapid_api::http::serve(listener, core.clone(), async move {
            let _ = stopped.await;
        }));
        Server {
            core,
            addr,
            client: reqwest::Client::new(),
            _stop: stop,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/2018-06-01/runtime{path}", self.addr)
    }

    /// `GET /next`, as a task so the caller can do things while it blocks.
    fn next(&self) -> tokio::task::JoinHandle<reqwest::Response> {
        let req = self.client.get(self.url("/invocation/next"));
        tokio::spawn(async move { req.send().await.expect("GET /next") })
    }

    /// Queues `inv` and fetches it with `GET /next`; returns the outcome receiver.
    async fn deliver(&self, inv: Invocation) -> oneshot::Receiver<InvokeOutcome> {
        let id = inv.request_id.clone();
        let rx = self.core.invoke(inv).expect("invoke");
        let res = within(self.next()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "lambda-runtime-aws-request-id"), Some(id));
        rx
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path))
    }
}

fn inv(request_id: &str) -> Invocation {
    Invocation {
        request_id: request_id.to_string(),
        invocation_id: format!("inv-{request_id}"),
        deadline_ms: 1_700_000_123_456,
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:echo".to_string(),
        trace_id: Some(
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1".into(),
        ),
        client_context: None,
        cognito_identity: None,
        tenant_id: None,
        content_type: "application/json".to_string(),
        payload: Bytes::from_static(br#"{"key":"value"}"#),
    }
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("operation did not complete in time")
}

async fn outcome(rx: oneshot::Receiver<InvokeOutcome>) -> InvokeOutcome {
    within(rx).await.expect("outcome sender was dropped")
}

fn error_report(o: InvokeOutcome) -> ErrorReport {
    match o {
        InvokeOutcome::Error(r) => r,
        other => panic!("expected an error outcome, got {other:?}"),
    }
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// Asserts a Runtime API error: the status and the JSON `{errorMessage, errorType}` body.
async fn assert_api_error(res: reqwest::Response, status: u16, error_type: &str) -> String {
    assert_eq!(res.status().as_u16(), status, "unexpected status");
    let ct = header(&res, "content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let v: Value = res.json().await.expect("error body is JSON");
    assert_eq!(v["errorType"], error_type, "body {v}");
    let msg = v["errorMessage"]
        .as_str()
        .unwrap_or_else(|| panic!("errorMessage missing in {v}"));
    assert!(!msg.is_empty());
    assert_eq!(v.as_object().unwrap().len(), 2, "only two fields: {v}");
    msg.to_string()
}

async fn assert_accepted(res: reqwest::Response) {
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let v: Value = res.json().await.expect("JSON body");
    assert_eq!(v, json!({ "status": "OK" }));
}

/// Sends raw bytes on a fresh connection and returns everything the server wrote back.
async fn raw_exchange(addr: SocketAddr, request: &[u8], shutdown_write: bool) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    if shutdown_write {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    within(s.read_to_end(&mut out)).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

// ---- /next ----

#[tokio::test]
async fn next_returns_payload_content_type_and_all_headers() {
    let srv = Server::start().await;
    let mut i = inv("8476a536-e9f4-11e8-9739-2dfe598c3fcd");
    i.client_context = Some(r#"{"client":{"app_title":"t"},"custom":{"k":"v"}}"#.into());
    i.cognito_identity =
        Some(r#"{"cognitoIdentityId":"id","cognitoIdentityPoolId":"pool"}"#.into());
    i.tenant_id = Some("tenant-7".into());
    i.content_type = "text/plain; charset=utf-8".into();
    i.payload = Bytes::from_static(b"hello runtime");

    let pending = srv.next();
    let rx = srv.core.invoke(i).unwrap();
    let res = within(pending).await.unwrap();

    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        header(&res, "content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        header(&res, "Lambda-Runtime-Aws-Request-Id").as_deref(),
        Some("8476a536-e9f4-11e8-9739-2dfe598c3fcd")
    );
    assert_eq!(
        header(&res, "Lambda-Runtime-Deadline-Ms").as_deref(),
        Some("1700000123456")
    );
    assert_eq!(
        header(&res, "Lambda-Runtime-Invoked-Function-Arn").as_deref(),
        Some("arn:aws:lambda:us-east-1:123456789012:function:echo")
    );
    assert_eq!(
        header(&res, "Lambda-Runtime-Trace-Id").as_deref(),
        Some("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1")
    );
    assert_eq!(
        header(&res, "Lambda-Runtime-Invocation-Id").as_deref(),
        Some("inv-8476a536-e9f4-11e8-9739-2dfe598c3fcd")
    );
    assert_eq!(
        header(&res, "Lambda-Runtime-Client-Context").as_deref(),
        Some(r#"{"client":{"app_title":"t"},"custom":{"k":"v"}}"#)
    );
    assert_eq!(
        header(&res, "Lambda-Runtime-Cognito-Identity").as_deref(),
        Some(r#"{"cognitoIdentityId":"id","cognitoIdentityPoolId":"pool"}"#)
    );
    assert_eq!(
        header(&res, "Lambda-Runtime-Aws-Tenant-Id").as_deref(),
        Some("tenant-7")
    );
    assert_eq!(
        res.bytes().await.unwrap(),
        Bytes::from_static(b"hello runtime")
    );

    // Finish so the outcome is delivered.
    let r = srv
        .post("/invocation/8476a536-e9f4-11e8-9739-2dfe598c3fcd/response")
        .body("ok")
        .send()
        .await
        .unwrap();
    assert_accepted(r).await;
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
}

#[tokio::test]
async fn next_omits_optional_headers_when_unset() {
    let srv = Server::start().await;
    let mut i = inv("plain");
    i.trace_id = None;
    let rx = srv.core.invoke(i).unwrap();
    let res = within(srv.next()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    for absent in [
        "lambda-runtime-client-context",
        "lambda-runtime-cognito-identity",
        "lambda-runtime-aws-tenant-id",
        "lambda-runtime-trace-id",
    ] {
        assert!(
            res.headers().get(absent).is_none(),
            "{absent} should be absent"
        );
    }
    assert_eq!(
        header(&res, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        header(&res, "lambda-runtime-aws-request-id").as_deref(),
        Some("plain")
    );
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({ "key": "value" })
    );
    drop(rx);
}

#[tokio::test]
async fn next_blocks_until_an_invocation_arrives() {
    let srv = Server::start().await;
    let pending = srv.next();
    within(srv.core.wait_ready())
        .await
        .expect("first /next ends init");
    tokio::time::sleep(SHORT).await;
    assert!(!pending.is_finished(), "/next returned with no invocation");
    let _rx = srv.core.invoke(inv("late")).unwrap();
    let res = within(pending).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        header(&res, "lambda-runtime-aws-request-id").as_deref(),
        Some("late")
    );
}

#[tokio::test]
async fn close_answers_blocked_next_with_container_error() {
    let srv = Server::start().await;
    let pending = srv.next();
    within(srv.core.wait_ready()).await.unwrap();
    srv.core.close();
    let res = within(pending).await.unwrap();
    let msg = assert_api_error(res, 500, "ContainerError").await;
    assert_eq!(
        msg,
        "Container error. Non-recoverable state. Runtime should exit promptly."
    );
    // And any later /next.
    let res = within(srv.next()).await.unwrap();
    assert_api_error(res, 500, "ContainerError").await;
}

#[tokio::test]
async fn close_with_running_invocation_fails_outcome_and_answer() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("run")).await;
    srv.core.close();
    assert!(within(rx).await.is_err(), "outcome receiver must error");
    let res = srv
        .post("/invocation/run/response")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_api_error(res, 500, "ContainerError").await;
}

#[tokio::test]
async fn next_client_disconnect_does_not_swallow_the_invocation() {
    let srv = Server::start().await;
    // A runtime that dies while parked in /next.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    within(srv.core.wait_ready()).await.unwrap();
    drop(s);
    tokio::time::sleep(SHORT).await;

    let rx = srv.core.invoke(inv("survivor")).unwrap();
    let res = within(srv.next()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        header(&res, "lambda-runtime-aws-request-id").as_deref(),
        Some("survivor")
    );
    let r = srv
        .post("/invocation/survivor/response")
        .body("alive")
        .send()
        .await
        .unwrap();
    assert_accepted(r).await;
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
}

// ---- /response ----

#[tokio::test]
async fn response_is_accepted_and_reaches_platform() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("r1")).await;
    let res = srv
        .post("/invocation/r1/response")
        .header("content-type", "application/json")
        .header("lambda-runtime-invocation-id", "inv-r1")
        .body(r#"{"statusCode":200,"body":"hi"}"#)
        .send()
        .await
        .unwrap();
    assert_accepted(res).await;
    assert_eq!(
        outcome(rx).await,
        InvokeOutcome::Response {
            body: Bytes::from_static(br#"{"statusCode":200,"body":"hi"}"#),
            content_type: Some("application/json".into()),
        }
    );
    assert!(!srv.core.is_busy());
}

#[tokio::test]
async fn response_without_content_type_or_body() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("empty")).await;
    let res = srv.post("/invocation/empty/response").send().await.unwrap();
    assert_accepted(res).await;
    assert_eq!(
        outcome(rx).await,
        InvokeOutcome::Response {
            body: Bytes::new(),
            content_type: None,
        }
    );
}

#[tokio::test]
async fn response_with_stale_invocation_id_is_refused() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("r")).await;
    let res = srv
        .post("/invocation/r/response")
        .header(
            "lambda-runtime-invocation-id",
            "inv-from-an-earlier-attempt",
        )
        .body("late")
        .send()
        .await
        .unwrap();
    assert!(
        res.status().is_client_error(),
        "a stale invocation id must be refused, got {}",
        res.status()
    );
    let v: Value = res.json().await.unwrap();
    assert!(
        v["errorType"].is_string() && v["errorMessage"].is_string(),
        "{v}"
    );

    let res = srv
        .post("/invocation/r/error")
        .header(
            "lambda-runtime-invocation-id",
            "inv-from-an-earlier-attempt",
        )
        .header("lambda-runtime-function-error-type", "Function.Late")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_client_error(), "got {}", res.status());

    let res = srv
        .post("/invocation/r/response")
        .header("lambda-runtime-invocation-id", "inv-r")
        .body("right")
        .send()
        .await
        .unwrap();
    assert_accepted(res).await;
    match outcome(rx).await {
        InvokeOutcome::Response { body, .. } => assert_eq!(body, Bytes::from_static(b"right")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn response_of_exactly_the_limit_is_accepted() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("max")).await;
    let body = vec![b'a'; MAX_RESPONSE_BYTES];
    assert_eq!(MAX_RESPONSE_BYTES, 6 * 1024 * 1024 + 100);
    let res = within(srv.post("/invocation/max/response").body(body).send())
        .await
        .unwrap();
    assert_accepted(res).await;
    match outcome(rx).await {
        InvokeOutcome::Response { body, .. } => {
            assert_eq!(body.len(), MAX_RESPONSE_BYTES);
            assert!(body.iter().all(|&b| b == b'a'));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn response_one_byte_over_the_limit_is_413_and_function_error() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("over")).await;
    let body = vec![b'a'; MAX_RESPONSE_BYTES + 1];
    let res = within(srv.post("/invocation/over/response").body(body).send())
        .await
        .unwrap();
    assert_api_error(res, 413, "RequestEntityTooLarge").await;

    let rep = error_report(outcome(rx).await);
    assert_eq!(rep.error_type, "Function.ResponseSizeTooLarge");
    let v: Value = serde_json::from_slice(&rep.body).unwrap();
    assert_eq!(v["errorType"], "Function.ResponseSizeTooLarge");

    // The invocation is over: the environment takes the next one.
    assert!(!srv.core.is_busy());
    let rx = srv.deliver(inv("after")).await;
    let res = srv
        .post("/invocation/after/response")
        .body("small")
        .send()
        .await
        .unwrap();
    assert_accepted(res).await;
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
}

#[tokio::test]
async fn invalid_response_mode_is_400_and_invocation_stays_answerable() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("mode")).await;
    for bad in ["buffered", "stream", "RESPONSE_STREAM"] {
        let res = srv
            .post("/invocation/mode/response")
            .header("lambda-runtime-function-response-mode", bad)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_api_error(res, 400, "InvalidFunctionResponseMode").await;
    }
    assert!(srv.core.is_busy());
    let res = srv
        .post("/invocation/mode/response")
        .header("lambda-runtime-function-response-mode", "streaming")
        .body("streamed")
        .send()
        .await
        .unwrap();
    assert_accepted(res).await;
    match outcome(rx).await {
        InvokeOutcome::Response { body, .. } => assert_eq!(body, Bytes::from_static(b"streamed")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn chunked_response_is_accepted() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("chunky")).await;
    let req = b"POST /2018-06-01/runtime/invocation/chunky/response HTTP/1.1\r\n\
Host: localhost\r\nConnection: close\r\nContent-Type: text/plain\r\n\
Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let out = raw_exchange(srv.addr, req, false).await;
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    assert!(out.contains(r#"{"status":"OK"}"#), "{out}");
    assert_eq!(
        outcome(rx).await,
        InvokeOutcome::Response {
            body: Bytes::from_static(b"hello world"),
            content_type: Some("text/plain".into()),
        }
    );
}

#[tokio::test]
async fn truncated_response_body_is_400_truncated_http_request() {
    let srv = Server::start().await;
    let _rx = srv.deliver(inv("cut")).await;
    // Content-Length promises 100 bytes; 10 come, then the runtime's write side closes.
    let req = b"POST /2018-06-01/runtime/invocation/cut/response HTTP/1.1\r\n\
Host: localhost\r\nContent-Length: 100\r\n\r\n0123456789";
    let out = raw_exchange(srv.addr, req, true).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("TruncatedHTTPRequest"), "{out}");
}

// ---- /error ----

async fn post_error(
    srv: &Server,
    id: &str,
    error_type: Option<&str>,
    body: &'static str,
) -> reqwest::Response {
    let mut req = srv
        .post(&format!("/invocation/{id}/error"))
        .header("content-type", "application/vnd.aws.lambda.error+json")
        .body(body);
    if let Some(t) = error_type {
        req = req.header("lambda-runtime-function-error-type", t);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn error_is_accepted_with_type_normalised_and_body_kept_minus_cause() {
    let cases = [
        (Some("ValueError"), "Runtime.Unknown"),
        (Some("Function.Bad1"), "Function.Unknown"),
        (Some("Function.MyError"), "Function.MyError"),
        (
            Some("Runtime.ImportModuleError"),
            "Runtime.ImportModuleError",
        ),
        (None, "Runtime.Unknown"),
    ];
    let srv = Server::start().await;
    for (i, (sent, expected)) in cases.into_iter().enumerate() {
        let id = format!("e{i}");
        let rx = srv.deliver(inv(&id)).await;
        let res = post_error(
            &srv,
            &id,
            sent,
            r#"{"errorMessage":"bad value","errorType":"ValueError","stackTrace":["  File \"h.py\", line 1"],"errorCause":{"paths":[]}}"#,
        )
        .await;
        assert_accepted(res).await;
        let rep = error_report(outcome(rx).await);
        assert_eq!(rep.error_type, expected, "header {sent:?}");
        let v: Value = serde_json::from_slice(&rep.body).unwrap();
        assert_eq!(
            v,
            json!({
                "errorMessage": "bad value",
                "errorType": "ValueError",
                "stackTrace": ["  File \"h.py\", line 1"],
            }),
            "header {sent:?}"
        );
        assert_eq!(rep.xray_cause, None);
    }
}

#[tokio::test]
async fn error_with_non_json_body_is_wrapped() {
    let srv = Server::start().await;
    let rx = srv.deliver(inv("txt")).await;
    let res = post_error(&srv, "txt", Some("Function.Crash"), "segfault").await;
    assert_accepted(res).await;
    let rep = error_report(outcome(rx).await);
    assert_eq!(rep.error_type, "Function.Crash");
    let v: Value = serde_json::from_slice(&rep.body).unwrap();
    assert_eq!(
        v,
        json!({ "errorMessage": "segfault", "errorType": "Function.Crash" })
    );
}

#[tokio::test]
async fn error_carries_xray_cause_up_to_64_kib() {
    let srv = Server::start().await;

    let cause = r#"{"working_directory":"/var/task","exceptions":[],"paths":[]}"#;
    let rx = srv.deliver(inv("x1")).await;
    let res = srv
        .post("/invocation/x1/error")
        .header("lambda-runtime-function-error-type", "Function.E")
        .header("lambda-runtime-function-xray-error-cause", cause)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_accepted(res).await;
    assert_eq!(
        error_report(outcome(rx).await).xray_cause.as_deref(),
        Some(cause)
    );

    let at_limit = "c".repeat(MAX_XRAY_CAUSE_BYTES);
    let rx = srv.deliver(inv("x2")).await;
    let res = srv
        .post("/invocation/x2/error")
        .header("lambda-runtime-function-xray-error-cause", &at_limit)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_accepted(res).await;
    assert_eq!(
        error_report(outcome(rx).await).xray_cause.map(|c| c.len()),
        Some(MAX_XRAY_CAUSE_BYTES)
    );

    let over = "c".repeat(MAX_XRAY_CAUSE_BYTES + 1);
    let rx = srv.deliver(inv("x3")).await;
    let res = srv
        .post("/invocation/x3/error")
        .header("lambda-runtime-function-xray-error-cause", &over)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_accepted(res).await;
    assert_eq!(error_report(outcome(rx).await).xray_cause, None);
}

#[tokio::test]
async fn init_error_is_accepted_and_reaches_platform() {
    let srv = Server::start().await;
    let rx = srv.core.invoke(inv("first")).unwrap();
    let res = srv
        .post("/init/error")
        .header("lambda-runtime-function-error-type", "Runtime.ImportModuleError")
        .body(r#"{"errorMessage":"Unable to import module 'app'","errorType":"Runtime.ImportModuleError","stackTrace":[]}"#)
        .send()
        .await
        .unwrap();
    assert_accepted(res).await;

    match within(srv.core.wait_ready()).await {
        Err(CoreError::InitFailed(r)) => assert_eq!(r.error_type, "Runtime.ImportModuleError"),
        other => panic!("expected InitFailed, got {other:?}"),
    }
    let rep = error_report(outcome(rx).await);
    assert_eq!(rep.error_type, "Runtime.ImportModuleError");
    let v: Value = serde_json::from_slice(&rep.body).unwrap();
    assert_eq!(v["errorMessage"], "Unable to import module 'app'");

    // The runtime may not go on.
    let res = within(srv.next()).await.unwrap();
    assert_api_error(res, 403, "InvalidStateTransition").await;
}

#[tokio::test]
async fn router_works_with_plain_axum_serve() {
    let core = RuntimeCore::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, rapid_api::http::router(core))
            .await
            .unwrap()
    });
    let out = raw_exchange(
        addr,
        b"GET /2018-06-01/runtime/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        false,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains(r#""errorType":"NotFound""#), "{out}");
    server.abort();
}

#[tokio::test]
async fn serve_stops_on_shutdown() {
    let core = RuntimeCore::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(rapid_api::http::serve(listener, core, async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!server.is_finished());
    stop.send(()).unwrap();
    within(server).await.unwrap().expect("serve returns Ok");
}

// ---- a whole runtime loop over HTTP ----

#[tokio::test]
async fn runtime_loop_over_http() {
    let srv = Server::start().await;
    let base = format!("http://{}/2018-06-01/runtime", srv.addr);
    let client = srv.client.clone();
    let runtime = tokio::spawn(async move {
        let mut served = 0u32;
        loop {
            let res = client
                .get(format!("{base}/invocation/next"))
                .send()
                .await
                .unwrap();
            if res.status() != StatusCode::OK {
                return (served, res.status());
            }
            let id = header(&res, "lambda-runtime-aws-request-id").unwrap();
            let inv_id = header(&res, "lambda-runtime-invocation-id").unwrap();
            let payload = res.bytes().await.unwrap();
            let r = client
                .post(format!("{base}/invocation/{id}/response"))
                .header("lambda-runtime-invocation-id", inv_id)
                .body([b"echo:".as_slice(), &payload].concat())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::ACCEPTED);
            served += 1;
        }
    });
    within(srv.core.wait_ready()).await.unwrap();
    for n in 0..10 {
        let mut i = inv(&format!("loop-{n}"));
        i.payload = Bytes::from(n.to_string());
        let rx = srv.core.invoke(i).unwrap();
        match outcome(rx).await {
            InvokeOutcome::Response { body, .. } => {
                assert_eq!(body, Bytes::from(format!("echo:{n}")))
            }
            other => panic!("{other:?}"),
        }
    }
    srv.core.close();
    let (served, status) = within(runtime).await.unwrap();
    assert_eq!(served, 10);
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}

// ---- streaming responses (`Lambda-Runtime-Function-Response-Mode: streaming`) ----

impl Server {
    /// Queues `inv` with a stream sink and fetches it with `GET /next`.
    async fn deliver_streaming(
        &self,
        inv: Invocation,
    ) -> (
        oneshot::Receiver<InvokeOutcome>,
        tokio::sync::mpsc::Receiver<StreamEvent>,
    ) {
        let (sink, events) = rapid_api::stream_channel();
        let rx = self
            .core
            .invoke_with_stream(inv, Some(sink))
            .expect("invoke");
        let res = within(self.next()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        (rx, events)
    }
}

/// Reads the sink until it closes: the content type it started with and the body.
async fn drain(mut events: tokio::sync::mpsc::Receiver<StreamEvent>) -> (Option<String>, Vec<u8>) {
    let mut started = None;
    let mut body = Vec::new();
    while let Some(ev) = within(events.recv()).await {
        match ev {
            StreamEvent::Started { content_type } => {
                assert!(started.is_none(), "Started twice");
                assert!(body.is_empty(), "Started after a chunk");
                started = Some(content_type);
            }
            StreamEvent::Chunk(c) => body.extend_from_slice(&c),
        }
    }
    (started.expect("the sink never saw Started"), body)
}

#[tokio::test]
async fn streaming_response_may_exceed_the_buffered_limit() {
    // lambda-apis.md: a streamed response may be up to 200 MB; only buffered ones stop at
    // 6 MiB + 100 B. Past 6 MiB the default 2 MiB/s cap applies (1 MiB here: ~0.5 s).
    let srv = Server::start().await;
    let (rx, events) = srv.deliver_streaming(inv("big-stream")).await;
    let drained = tokio::spawn(drain(events));
    let body = vec![b's'; MAX_RESPONSE_BYTES + 1024 * 1024];
    let res = within(
        srv.post("/invocation/big-stream/response")
            .header("lambda-runtime-function-response-mode", "streaming")
            .header("content-type", "text/plain")
            .body(body)
            .send(),
    )
    .await
    .expect("send");
    assert_accepted(res).await;
    let (content_type, got) = within(drained).await.unwrap();
    assert_eq!(content_type.as_deref(), Some("text/plain"));
    assert_eq!(got.len(), MAX_RESPONSE_BYTES + 1024 * 1024);
    match outcome(rx).await {
        // The body went to the sink; the outcome only says how the stream ended.
        InvokeOutcome::Response { body, .. } => assert!(body.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn streamed_chunks_reach_the_sink_before_the_body_ends() {
    let srv = Server::start().await;
    let (rx, mut events) = srv.deliver_streaming(inv("live")).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(
        b"POST /2018-06-01/runtime/invocation/live/response HTTP/1.1\r\n\
Host: localhost\r\nConnection: close\r\n\
Lambda-Runtime-Function-Response-Mode: streaming\r\n\
Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
    )
    .await
    .unwrap();
    // The body is still open: the first chunk is already with the platform.
    assert!(matches!(
        within(events.recv()).await,
        Some(StreamEvent::Started { .. })
    ));
    match within(events.recv()).await {
        Some(StreamEvent::Chunk(c)) => assert_eq!(&c[..], b"first"),
        other => panic!("{other:?}"),
    }
    assert!(
        tokio::time::timeout(SHORT, srv.core.wait_idle())
            .await
            .is_err(),
        "the invoke phase lasts until the body ends"
    );
    s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    match within(events.recv()).await {
        Some(StreamEvent::Chunk(c)) => assert_eq!(&c[..], b"second"),
        other => panic!("{other:?}"),
    }
    assert!(
        within(events.recv()).await.is_none(),
        "the sink closes at the end"
    );
    let mut out = Vec::new();
    within(s.read_to_end(&mut out)).await.unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 202"));
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
    within(srv.core.wait_idle()).await.unwrap();
}

#[tokio::test]
async fn streamed_response_over_the_cap_fails_with_response_size_too_large() {
    let srv = Server::start().await;
    srv.core.set_stream_limits(StreamLimits {
        max_bytes: 4096,
        full_speed_bytes: 1024,
        rate_bytes_per_sec: None,
    });
    let (rx, events) = srv.deliver_streaming(inv("capped")).await;
    let drained = tokio::spawn(drain(events));
    let res = within(
        srv.post("/invocation/capped/response")
            .header("lambda-runtime-function-response-mode", "streaming")
            .body(vec![b'x'; 8192])
            .send(),
    )
    .await
    .expect("send");
    let msg = assert_api_error(res, 413, "RequestEntityTooLarge").await;
    assert!(msg.contains("4096"), "{msg}");
    let (_, got) = within(drained).await.unwrap();
    assert!(got.len() <= 4096, "no byte past the cap reaches the caller");
    let rep = error_report(outcome(rx).await);
    assert_eq!(rep.error_type, "Function.ResponseSizeTooLarge");
}

#[tokio::test]
async fn streamed_response_without_a_sink_is_buffered() {
    // A plain Invoke of a streaming function: the whole body, buffered.
    let srv = Server::start().await;
    let rx = srv.deliver(inv("plain")).await;
    let req = b"POST /2018-06-01/runtime/invocation/plain/response HTTP/1.1\r\n\
Host: localhost\r\nConnection: close\r\n\
Lambda-Runtime-Function-Response-Mode: streaming\r\nContent-Type: text/plain\r\n\
Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n";
    let out = raw_exchange(srv.addr, req, false).await;
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    match outcome(rx).await {
        InvokeOutcome::Response { body, content_type } => {
            assert_eq!(&body[..], b"abcdef");
            assert_eq!(content_type.as_deref(), Some("text/plain"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn streamed_error_trailers_end_the_stream_with_the_error() {
    let srv = Server::start().await;
    let (rx, events) = srv.deliver_streaming(inv("trailer-s")).await;
    let drained = tokio::spawn(drain(events));
    // base64 of {"errorMessage":"boom","errorType":"StreamError"}
    let req = b"POST /2018-06-01/runtime/invocation/trailer-s/response HTTP/1.1\r\n\
Host: localhost\r\nConnection: close\r\n\
Lambda-Runtime-Function-Response-Mode: streaming\r\n\
Transfer-Encoding: chunked\r\n\
Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n\r\n\
5\r\nhello\r\n0\r\n\
Lambda-Runtime-Function-Error-Type: Function.StreamError\r\n\
Lambda-Runtime-Function-Error-Body: eyJlcnJvck1lc3NhZ2UiOiJib29tIiwiZXJyb3JUeXBlIjoiU3RyZWFtRXJyb3IifQ==\r\n\r\n";
    let out = raw_exchange(srv.addr, req, false).await;
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    let (_, got) = within(drained).await.unwrap();
    assert_eq!(got, b"hello");
    let rep = error_report(outcome(rx).await);
    assert_eq!(rep.error_type, "Function.StreamError");
    let v: Value = serde_json::from_slice(&rep.body).unwrap();
    assert_eq!(v["errorMessage"], "boom");
}

#[tokio::test]
async fn a_caller_that_goes_away_does_not_stop_the_stream() {
    // Lambda runs a streaming function to its end when the caller disconnects.
    let srv = Server::start().await;
    let (rx, events) = srv.deliver_streaming(inv("gone")).await;
    drop(events);
    let res = within(
        srv.post("/invocation/gone/response")
            .header("lambda-runtime-function-response-mode", "streaming")
            .body(vec![b'x'; 256 * 1024])
            .send(),
    )
    .await
    .expect("send");
    assert_accepted(res).await;
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
}

#[tokio::test]
async fn streaming_error_trailer_fails_the_invocation() {
    // lambda-apis.md: a streamed response reports a mid-stream error in the trailers
    // Lambda-Runtime-Function-Error-Type and Lambda-Runtime-Function-Error-Body (base64).
    let srv = Server::start().await;
    let rx = srv.deliver(inv("trailer")).await;
    // base64 of {"errorMessage":"boom","errorType":"StreamError"}
    let req = b"POST /2018-06-01/runtime/invocation/trailer/response HTTP/1.1\r\n\
Host: localhost\r\nConnection: close\r\n\
Lambda-Runtime-Function-Response-Mode: streaming\r\n\
Transfer-Encoding: chunked\r\n\
Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n\r\n\
5\r\nhello\r\n0\r\n\
Lambda-Runtime-Function-Error-Type: Function.StreamError\r\n\
Lambda-Runtime-Function-Error-Body: eyJlcnJvck1lc3NhZ2UiOiJib29tIiwiZXJyb3JUeXBlIjoiU3RyZWFtRXJyb3IifQ==\r\n\r\n";
    let _ = raw_exchange(srv.addr, req, false).await;
    let rep = error_report(outcome(rx).await);
    assert_eq!(rep.error_type, "Function.StreamError");
}

#[tokio::test]
async fn truncated_streaming_response_fails_with_runtime_truncated_response() {
    // lambda-apis.md: a truncated body is 400 TruncatedHTTPRequest, and the caller sees
    // Runtime.TruncatedResponse.
    let srv = Server::start().await;
    let rx = srv.deliver(inv("cut-stream")).await;
    let req = b"POST /2018-06-01/runtime/invocation/cut-stream/response HTTP/1.1\r\n\
Host: localhost\r\nLambda-Runtime-Function-Response-Mode: streaming\r\n\
Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
    let out = raw_exchange(srv.addr, req, true).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("TruncatedHTTPRequest"), "{out}");
    let rep = error_report(
        tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .expect("the caller must get an outcome, not wait for its timeout")
            .unwrap(),
    );
    assert_eq!(rep.error_type, "Runtime.TruncatedResponse");
}
