//! Shared helpers of the rapid-api integration tests: a Runtime/Extensions API server on a
//! real loopback socket, raw HTTP exchanges and invocations.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rapid_api::{CoreConfig, Invocation, InvokeOutcome, RuntimeCore};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub const LIMIT: Duration = Duration::from_secs(10);
pub const SHORT: Duration = Duration::from_millis(150);

pub fn config() -> CoreConfig {
    CoreConfig {
        function_name: "f".into(),
        function_version: "$LATEST".into(),
        handler: "h".into(),
        account_id: "123456789012".into(),
        memory_size_mb: Some(128),
        ..CoreConfig::default()
    }
}

/// One API server on 127.0.0.1, stopped when dropped.
pub struct Server {
    pub core: Arc<RuntimeCore>,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Server {
    pub async fn start(config: CoreConfig) -> Server {
        let core = RuntimeCore::with_config(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(rapid_api::http::serve(listener, core.clone(), async move {
            let _ = stopped.await;
        }));
        Server {
            core,
            addr,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            _stop: stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Registers an extension over HTTP; returns its identifier.
    pub async fn register(&self, name: &str, events: &str) -> String {
        let res = self
            .client
            .post(self.url("/2020-01-01/extension/register"))
            .header("Lambda-Extension-Name", name)
            .body(format!(r#"{{"events":{events}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "register {name}");
        res.headers()["lambda-extension-identifier"]
            .to_str()
            .unwrap()
            .to_string()
    }

    /// `GET event/next` for `id`, as a task.
    pub fn ext_next(&self, id: &str) -> tokio::task::JoinHandle<(u16, Value)> {
        let req = self
            .client
            .get(self.url("/2020-01-01/extension/event/next"))
            .header("Lambda-Extension-Identifier", id);
        tokio::spawn(async move {
            let res = req.send().await.expect("event/next");
            let status = res.status().as_u16();
            (status, res.json().await.unwrap_or(Value::Null))
        })
    }

    /// The runtime's `GET /next`, as a task; yields (status, request id).
    pub fn runtime_next(&self) -> tokio::task::JoinHandle<(u16, String)> {
        let req = self
            .client
            .get(self.url("/2018-06-01/runtime/invocation/next"));
        tokio::spawn(async move {
            let res = req.send().await.expect("GET /next");
            let id = res
                .headers()
                .get("lambda-runtime-aws-request-id")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (res.status().as_u16(), id)
        })
    }

    /// The runtime's response to `id` over HTTP.
    pub async fn respond(&self, id: &str, body: &'static str) -> u16 {
        self.client
            .post(self.url(&format!("/2018-06-01/runtime/invocation/{id}/response")))
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn function_error(&self, id: &str) -> u16 {
        self.client
            .post(self.url(&format!("/2018-06-01/runtime/invocation/{id}/error")))
            .header("Lambda-Runtime-Function-Error-Type", "Function.Boom")
            .body(r#"{"errorMessage":"boom","errorType":"Boom"}"#)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

pub fn inv(request_id: &str) -> Invocation {
    Invocation {
        request_id: request_id.to_string(),
        invocation_id: format!("inv-{request_id}"),
        deadline_ms: 1_700_000_123_456,
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f".to_string(),
        trace_id: Some("Root=1-5f35ae12-0c0fec141ab77a00bc047aa2;Sampled=1".to_string()),
        client_context: None,
        cognito_identity: None,
        tenant_id: None,
        content_type: "application/json".to_string(),
        payload: Bytes::from_static(br#"{"k":"v"}"#),
    }
}

pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("operation did not complete in time")
}

/// Asserts that `f` is still pending after [`SHORT`].
pub async fn stays_pending<F: Future + Unpin>(f: &mut F) {
    assert!(
        tokio::time::timeout(SHORT, f).await.is_err(),
        "expected this to keep waiting"
    );
}

pub async fn outcome(rx: oneshot::Receiver<InvokeOutcome>) -> InvokeOutcome {
    within(rx).await.expect("outcome sender was dropped")
}

/// Sends raw bytes, optionally half-closes, and returns the whole answer as text.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], shutdown_write: bool) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    if shutdown_write {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    within(s.read_to_end(&mut out)).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Status and body of a raw HTTP/1.1 answer (chunked bodies are joined).
pub fn parse_raw(answer: &str) -> (u16, String) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}
