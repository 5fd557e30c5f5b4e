//! The Telemetry and Logs APIs end to end: extensions subscribe over HTTP, a subscriber HTTP
//! server (axum on 127.0.0.1:0) receives the batches.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use common::*;
use rapid_api::InvokeOutcome;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

/// A subscriber: every batch POSTed to it arrives on `batches`. With `hold`, it answers its
/// first request only once `hold` is notified.
struct Subscriber {
    uri: String,
    batches: mpsc::UnboundedReceiver<Vec<Value>>,
}

async fn subscriber(hold: Option<Arc<Notify>>) -> Subscriber {
    let (tx, rx) = mpsc::unbounded_channel();
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let app = Router::new().route(
        "/telemetry",
        post(move |Json(batch): Json<Vec<Value>>| {
            let (tx, hold, first) = (tx.clone(), hold.clone(), first.clone());
            async move {
                let _ = tx.send(batch);
                if let Some(h) = hold {
                    if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        h.notified().await;
                    }
                }
                ""
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Subscriber {
        uri: format!("http://sandbox.localdomain:{}/telemetry", addr.port()),
        batches: rx,
    }
}

impl Subscriber {
    async fn batch(&mut self) -> Vec<Value> {
        within(self.batches.recv()).await.expect("subscriber gone")
    }

    /// Records until one satisfies `last`.
    async fn until(&mut self, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut all = Vec::new();
        loop {
            let b = self.batch().await;
            let done = b.iter().any(&last);
            all.extend(b);
            if done {
                return all;
            }
        }
    }
}

async fn subscribe(srv: &Server, api: &str, id: &str, body: Value) -> (u16, Value) {
    let res = srv
        .client
        .put(srv.url(api))
        .header("Lambda-Extension-Identifier", id)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (
        res.status().as_u16(),
        res.json().await.unwrap_or(Value::Null),
    )
}

fn telemetry_body(uri: &str, types: Value, buffering: Value) -> Value {
    json!({
        "schemaVersion": "2022-12-13",
        "types": types,
        "buffering": buffering,
        "destination": {"protocol": "HTTP", "URI": uri},
    })
}

fn is_rfc3339_ms(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

type Next = tokio::task::JoinHandle<(u16, String)>;

/// Ends init: an extension (already registered) and the runtime reach their `next`. Returns
/// the runtime's pending `/next`.
async fn finish_init(srv: &Server, ext_id: &str) -> Next {
    let _ext = srv.ext_next(ext_id);
    let rt = srv.runtime_next();
    within(srv.core.wait_ready()).await.unwrap();
    rt
}

/// One invocation through the runtime's pending `/next`; the runtime then calls `/next` again.
async fn run_invocation(srv: &Server, next: &mut Next, id: &str, fail: bool) -> InvokeOutcome {
    let rx = srv.core.invoke(inv(id)).unwrap();
    let (_, got) = within(&mut *next).await.unwrap();
    assert_eq!(got, id);
    *next = srv.runtime_next();
    srv.core.function_log(format!("handling {id}"));
    let status = if fail {
        srv.function_error(id).await
    } else {
        srv.respond(id, "done").await
    };
    assert_eq!(status, 202);
    let o = outcome(rx).await;
    within(srv.core.wait_idle()).await.unwrap();
    o
}

#[tokio::test]
async fn platform_and_function_records_of_an_init_and_two_invocations() {
    let srv = Server::start(config()).await;
    srv.core.set_memory_probe(Box::new(|| Some(42)));
    let mut sub = subscriber(None).await;
    let id = srv.register("tel", "[]").await;
    srv.core.function_log("before subscribing");
    let (status, body) = subscribe(
        &srv,
        "/2022-07-01/telemetry",
        &id,
        telemetry_body(
            &sub.uri,
            json!(["platform", "function"]),
            json!({"timeoutMs": 25}),
        ),
    )
    .await;
    assert_eq!((status, body), (200, json!("OK")));
    srv.core.function_log("init line");
    let mut next = finish_init(&srv, &id).await;
    run_invocation(&srv, &mut next, "r1", false).await;
    run_invocation(&srv, &mut next, "r2", true).await;
    let records = sub
        .until(|r| r["type"] == "platform.report" && r["record"]["requestId"] == "r2")
        .await;
    for r in &records {
        assert!(is_rfc3339_ms(r["time"].as_str().unwrap()), "{r}");
    }
    let types: Vec<&str> = records
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "platform.initStart",
            "platform.extension",
            "function",
            "platform.telemetrySubscription",
            "function",
            "platform.initRuntimeDone",
            "platform.initReport",
            "platform.start",
            "function",
            "platform.runtimeDone",
            "platform.report",
            "platform.start",
            "function",
            "platform.runtimeDone",
            "platform.report",
        ]
    );
    let rec = |i: usize| records[i]["record"].clone();
    assert_eq!(
        rec(0),
        json!({"initializationType": "on-demand", "phase": "init", "functionName": "f", "functionVersion": "$LATEST"})
    );
    assert_eq!(
        rec(1),
        json!({"name": "tel", "state": "Ready", "events": []})
    );
    assert_eq!(rec(2), json!("before subscribing"));
    assert_eq!(
        rec(3),
        json!({"name": "tel", "state": "Subscribed", "types": ["platform", "function"]})
    );
    assert_eq!(rec(4), json!("init line"));
    assert_eq!(
        rec(5),
        json!({"initializationType": "on-demand", "phase": "init", "status": "success"})
    );
    assert_eq!(rec(6)["status"], "success");
    assert!(rec(6)["metrics"]["durationMs"].as_f64().unwrap() >= 0.0);
    let tracing = json!({"type": "X-Amzn-Trace-Id", "value": "Root=1-5f35ae12-0c0fec141ab77a00bc047aa2;Sampled=1"});
    assert_eq!(
        rec(7),
        json!({"requestId": "r1", "version": "$LATEST", "tracing": tracing})
    );
    assert_eq!(rec(8), json!("handling r1"));
    assert_eq!(rec(9)["requestId"], "r1");
    assert_eq!(rec(9)["status"], "success");
    assert_eq!(rec(9)["metrics"]["producedBytes"], 4);
    let report1 = rec(10);
    assert_eq!(report1["requestId"], "r1");
    assert_eq!(report1["status"], "success");
    let m = &report1["metrics"];
    assert_eq!(m["memorySizeMB"], 128);
    assert_eq!(m["maxMemoryUsedMB"], 42);
    assert!(m["billedDurationMs"].as_u64().unwrap() >= 1);
    assert!(m["durationMs"].as_f64().is_some());
    assert!(
        m["initDurationMs"].as_f64().is_some(),
        "first report has initDurationMs"
    );
    assert_eq!(rec(13)["status"], "error");
    assert_eq!(rec(13)["errorType"], "Function.Boom");
    assert_eq!(rec(14)["status"], "error");
    assert!(rec(14)["metrics"].get("initDurationMs").is_none());
}

#[tokio::test]
async fn logs_api_records() {
    let srv = Server::start(config()).await;
    let mut sub = subscriber(None).await;
    let id = srv.register("logs", "[]").await;
    let (status, body) = subscribe(
        &srv,
        "/2020-08-15/logs",
        &id,
        json!({
            "destination": {"protocol": "HTTP", "URI": sub.uri},
            "types": ["platform", "function"],
            "buffering": {"timeoutMs": 25},
        }),
    )
    .await;
    assert_eq!((status, body), (200, json!("OK")));
    let mut next = finish_init(&srv, &id).await;
    run_invocation(&srv, &mut next, "r1", false).await;
    let records = sub.until(|r| r["type"] == "platform.report").await;
    let types: Vec<&str> = records
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "platform.extension",
            "platform.logsSubscription",
            "platform.start",
            "function",
            "platform.runtimeDone",
            "platform.end",
            "platform.report",
        ]
    );
    assert_eq!(
        records[2]["record"],
        json!({"requestId": "r1", "version": "$LATEST"})
    );
    assert_eq!(records[5]["record"], json!({"requestId": "r1"}));
    assert_eq!(records[6]["record"]["requestId"], "r1");
    assert!(records[6]["record"].get("status").is_none());
}

#[tokio::test]
async fn a_full_buffer_is_sent_at_max_items_and_the_rest_at_close() {
    let srv = Server::start(config()).await;
    let mut sub = subscriber(None).await;
    let id = srv.register("tel", "[]").await;
    let body = telemetry_body(
        &sub.uri,
        json!(["function"]),
        json!({"maxItems": 1000, "maxBytes": 1048576, "timeoutMs": 30000}),
    );
    assert_eq!(
        subscribe(&srv, "/2022-07-01/telemetry", &id, body).await.0,
        200
    );
    for i in 0..1500 {
        srv.core.function_log(format!("line {i}"));
    }
    // Far below the 30 s timeout: the batch left because it held maxItems.
    let first = sub.batch().await;
    assert_eq!(first.len(), 1000);
    for (i, r) in first.iter().enumerate() {
        assert_eq!(r["type"], "function");
        assert_eq!(r["record"], json!(format!("line {i}")));
    }
    srv.core.close();
    let rest = sub.batch().await;
    assert_eq!(rest.len(), 500);
    assert_eq!(rest[0]["record"], "line 1000");
    assert_eq!(rest[499]["record"], "line 1499");
}

#[tokio::test]
async fn a_partial_buffer_is_sent_after_timeout_ms() {
    let srv = Server::start(config()).await;
    let mut sub = subscriber(None).await;
    let id = srv.register("tel", "[]").await;
    let body = telemetry_body(
        &sub.uri,
        json!(["function"]),
        json!({"maxItems": 10000, "timeoutMs": 100}),
    );
    assert_eq!(
        subscribe(&srv, "/2022-07-01/telemetry", &id, body).await.0,
        200
    );
    for i in 0..3 {
        srv.core.function_log(format!("line {i}"));
    }
    let batch = sub.batch().await;
    let lines: Vec<&str> = batch
        .iter()
        .map(|r| r["record"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["line 0", "line 1", "line 2"]);
}

#[tokio::test]
async fn a_slow_subscriber_loses_records_beyond_its_buffer_and_is_told_so() {
    let srv = Server::start(config()).await;
    let hold = Arc::new(Notify::new());
    let mut sub = subscriber(Some(hold.clone())).await;
    let id = srv.register("tel", "[]").await;
    let body = telemetry_body(
        &sub.uri,
        json!(["function"]),
        json!({"maxItems": 1000, "timeoutMs": 30000}),
    );
    assert_eq!(
        subscribe(&srv, "/2022-07-01/telemetry", &id, body).await.0,
        200
    );
    for i in 0..1000 {
        srv.core.function_log(format!("line {i}"));
    }
    // The subscriber has the first batch and does not answer: delivery is stuck.
    assert_eq!(sub.batch().await.len(), 1000);
    for i in 1000..3500 {
        srv.core.function_log(format!("line {i}"));
    }
    // Invocations go on meanwhile.
    let mut next = finish_init(&srv, &id).await;
    for r in ["r1", "r2", "r3"] {
        assert!(matches!(
            run_invocation(&srv, &mut next, r, false).await,
            InvokeOutcome::Response { .. }
        ));
    }
    hold.notify_one();
    let batch = sub.batch().await;
    assert_eq!(batch[0]["type"], "platform.logsDropped");
    let dropped = &batch[0]["record"];
    // 2000 more fit in the buffer (two batches), 500 did not, nor the 3 "handling" lines.
    assert_eq!(dropped["droppedRecords"], 503);
    assert!(dropped["droppedBytes"].as_u64().unwrap() > 503 * 40);
    assert!(dropped["reason"]
        .as_str()
        .unwrap()
        .contains("fallen behind"));
    assert_eq!(batch.len(), 1001);
    assert_eq!(batch[1]["record"], "line 1000");
    assert_eq!(batch[1000]["record"], "line 1999");
}

#[tokio::test]
async fn a_dead_subscriber_does_not_block_invocations() {
    let srv = Server::start(config()).await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let id = srv.register("tel", "[]").await;
    let body = telemetry_body(
        &format!("http://127.0.0.1:{port}/"),
        json!(["platform", "function", "extension"]),
        json!({"maxItems": 1000, "timeoutMs": 25}),
    );
    assert_eq!(
        subscribe(&srv, "/2022-07-01/telemetry", &id, body).await.0,
        200
    );
    let mut next = finish_init(&srv, &id).await;
    for i in 0..5 {
        for j in 0..500 {
            srv.core.function_log(format!("{i}/{j}"));
            srv.core.extension_log("tel", format!("ext {i}/{j}"));
        }
        let r = format!("r{i}");
        assert!(matches!(
            run_invocation(&srv, &mut next, &r, false).await,
            InvokeOutcome::Response { .. }
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn subscription_errors() {
    let srv = Server::start(config()).await;
    let id = srv.register("tel", "[]").await;
    let ok_uri = "http://sandbox.localdomain:8080/x";
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"types": ["platform"], "destination": {"protocol": "HTTP", "URI": ok_uri}}),
            "schemaVersion is required",
        ),
        (
            json!({"schemaVersion": "2020-01-01", "types": ["platform"], "destination": {"protocol": "HTTP", "URI": ok_uri}}),
            "schemaVersion must be one of 2022-07-01, 2022-12-13, 2025-01-29",
        ),
        (
            json!({"schemaVersion": "2022-12-13", "types": [], "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain/x"}}),
            "URI port is not provided; types should not be empty",
        ),
        (
            json!({"schemaVersion": "2022-12-13", "types": ["platform", "bogus"], "destination": {"protocol": "HTTP", "URI": ok_uri}}),
            "types: \"bogus\" is not one of platform, function, extension",
        ),
        (
            json!({"schemaVersion": "2022-12-13", "types": ["platform"], "destination": {"protocol": "TCP", "URI": ok_uri}}),
            "destination protocol TCP is not supported; use HTTP",
        ),
        (
            json!({"schemaVersion": "2022-12-13", "types": ["platform"], "destination": {"protocol": "HTTP", "URI": "https://x:1/"}}),
            "URI scheme must be http",
        ),
        (
            json!({"schemaVersion": "2022-12-13", "types": ["platform"]}),
            "destination is required",
        ),
        (
            json!({"schemaVersion": "2022-12-13", "types": ["platform"], "destination": {"protocol": "HTTP", "URI": ok_uri},
                   "buffering": {"maxItems": 999, "maxBytes": 262143, "timeoutMs": 24}}),
            "buffering.maxItems must be an integer between 1000 and 10000; buffering.maxBytes must be an integer between 262144 and 1048576; buffering.timeoutMs must be an integer between 25 and 30000",
        ),
        (
            json!({"schemaVersion": "2022-12-13", "types": ["platform"], "destination": {"protocol": "HTTP", "URI": ok_uri},
                   "buffering": {"maxItems": 10001, "maxBytes": 1048577, "timeoutMs": 30001}}),
            "buffering.maxItems must be an integer between 1000 and 10000; buffering.maxBytes must be an integer between 262144 and 1048576; buffering.timeoutMs must be an integer between 25 and 30000",
        ),
    ];
    for (body, message) in cases {
        let got = subscribe(&srv, "/2022-07-01/telemetry", &id, body.clone()).await;
        assert_eq!(
            got,
            (
                400,
                json!({"errorType": "ValidationError", "errorMessage": message})
            ),
            "{body}"
        );
    }
    // Logs API: its own schema versions.
    let got = subscribe(
        &srv,
        "/2020-08-15/logs",
        &id,
        json!({"schemaVersion": "2022-12-13", "types": ["platform"], "destination": {"protocol": "HTTP", "URI": ok_uri}}),
    )
    .await;
    assert_eq!(
        got,
        (
            400,
            json!({"errorType": "ValidationError", "errorMessage": "schemaVersion must be one of 2020-08-15, 2021-03-18"})
        )
    );
    // Boundaries are accepted.
    let body = json!({"schemaVersion": "2022-07-01", "types": ["extension"], "destination": {"protocol": "HTTP", "URI": ok_uri},
                      "buffering": {"maxItems": 10000, "maxBytes": 1048576, "timeoutMs": 25}});
    assert_eq!(
        subscribe(&srv, "/2022-07-01/telemetry", &id, body).await.0,
        200
    );
    // Only registered extensions, only during init.
    let good = telemetry_body(ok_uri, json!(["platform"]), json!({}));
    let unknown = "00000000-0000-4000-8000-000000000000";
    assert_eq!(
        subscribe(&srv, "/2022-07-01/telemetry", unknown, good.clone()).await,
        (
            403,
            json!({"errorType": "Extension.UnknownExtensionIdentifier", "errorMessage": format!("Unknown extension {unknown}")})
        )
    );
    let _next = finish_init(&srv, &id).await;
    assert_eq!(
        subscribe(&srv, "/2022-07-01/telemetry", &id, good.clone()).await,
        (
            403,
            json!({"errorType": "Telemetry.SubscriptionClosed", "errorMessage": "Telemetry API subscription is closed already"})
        )
    );
    let logs = json!({"types": ["platform"], "destination": {"protocol": "HTTP", "URI": ok_uri}});
    assert_eq!(
        subscribe(&srv, "/2020-08-15/logs", &id, logs).await,
        (
            403,
            json!({"errorType": "Logs.SubscriptionClosed", "errorMessage": "Logs API subscription is closed already"})
        )
    );
}
