//! The invoke benchmark's load generator: a closed loop of `concurrency` workers, each
//! sending its next request as soon as its previous one is answered.
//!
//! The client shares the host's CPUs with the systems it measures, so it is kept lean: one
//! OS thread running a current-thread runtime, each worker owning one HTTP/1.1 keep-alive
//! connection (hyper's connection API: no pool lock, no cross-thread wake-ups). Every CPU
//! microsecond the client does not spend is left to the system under test, which is what
//! the benchmark compares.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;

/// What went wrong with one invocation.
pub struct Failure {
    /// The server answered (as opposed to: no connection, no complete answer).
    pub answered: bool,
    pub msg: String,
}

/// Judges one answer: a 200 without `X-Amz-Function-Error` whose body is echo-rust's (it
/// carries the event under `"echo"`: a cheap check that the function itself answered, not
/// some other server on the port).
pub fn check_answer(
    status: http::StatusCode,
    function_error: Option<&[u8]>,
    body: &[u8],
) -> Result<(), Failure> {
    let answered = |msg: String| Failure {
        answered: true,
        msg,
    };
    let excerpt = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if !status.is_success() || function_error.is_some() {
        return Err(answered(format!(
            "HTTP {status}{}: {}",
            function_error
                .map(|f| format!(" (function error {})", String::from_utf8_lossy(f)))
                .unwrap_or_default(),
            excerpt()
        )));
    }
    if !body.windows(7).any(|w| w == b"\"echo\":") {
        return Err(answered(format!("unexpected answer: {}", excerpt())));
    }
    Ok(())
}

/// Where the requests go.
#[derive(Debug, Clone)]
pub struct Endpoint {
    addr: SocketAddr,
    /// `host:port`, for the Host header.
    authority: String,
    path: String,
}

impl Endpoint {
    /// From an `http://host:port/path` URL (the host resolved once, here).
    pub async fn parse(url: &str) -> Result<Endpoint, String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        if u.scheme() != "http" {
            return Err(format!("{url}: only http:// is supported"));
        }
        let host = u.host_str().ok_or_else(|| format!("{url}: no host"))?;
        let port = u.port_or_known_default().unwrap_or(80);
        let authority = format!("{host}:{port}");
        let addr = tokio::net::lookup_host(&authority)
            .await
            .map_err(|e| format!("{authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{authority}: no address"))?;
        let mut path = u.path().to_string();
        if let Some(q) = u.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Endpoint {
            addr,
            authority,
            path,
        })
    }
}

/// One closed-loop run's results.
pub struct Run {
    pub latencies_ms: Vec<f64>,
    pub elapsed: Duration,
    pub errors: usize,
    pub first_error: Option<String>,
}

/// Sends `total` requests from `concurrency` workers on the load thread; `done` counts
/// answered requests as they come (for progress).
pub async fn drive(
    endpoint: &Endpoint,
    payload: &Bytes,
    total: usize,
    concurrency: usize,
    limit: Duration,
    done: Arc<AtomicUsize>,
) -> Run {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (endpoint, payload) = (endpoint.clone(), payload.clone());
    let spawned = std::thread::Builder::new()
        .name("bench-load".into())
        .spawn(move || {
            let run = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run_workers(
                    endpoint,
                    payload,
                    total,
                    concurrency,
                    limit,
                    done,
                )),
                Err(e) => failed_run(total, format!("load thread runtime: {e}")),
            };
            let _ = tx.send(run);
        });
    if let Err(e) = spawned {
        return failed_run(total, format!("load thread: {e}"));
    }
    rx.await
        .unwrap_or_else(|_| failed_run(total, "the load thread panicked".into()))
}

fn failed_run(total: usize, msg: String) -> Run {
    Run {
        latencies_ms: Vec::new(),
        elapsed: Duration::ZERO,
        errors: total,
        first_error: Some(msg),
    }
}

async fn run_workers(
    endpoint: Endpoint,
    payload: Bytes,
    total: usize,
    concurrency: usize,
    limit: Duration,
    done: Arc<AtomicUsize>,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let endpoint = Arc::new(endpoint);
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(total) {
        let (endpoint, payload) = (endpoint.clone(), payload.clone());
        let (next, done) = (next.clone(), done.clone());
        workers.spawn(async move {
            let mut conn = None;
            let mut lat = Vec::with_capacity(total / concurrency.max(1) + 1);
            let mut errors = 0;
            let mut first_error = None;
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                match within(limit, invoke(&mut conn, &endpoint, &payload)).await {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(e) => {
                        // The connection's state is unknown: the next request opens a new one.
                        conn = None;
                        errors += 1;
                        first_error.get_or_insert(e.msg);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (lat, errors, first_error)
        });
    }
    let mut run = Run {
        latencies_ms: Vec::with_capacity(total),
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
    };
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((lat, errors, first)) => {
                run.latencies_ms.extend(lat);
                run.errors += errors;
                if run.first_error.is_none() {
                    run.first_error = first;
                }
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    run.elapsed = start.elapsed();
    run
}

/// One invocation on a connection of its own, within `limit` (for probing a server that may
/// not be up yet).
pub async fn invoke_once(
    endpoint: &Endpoint,
    payload: &Bytes,
    limit: Duration,
) -> Result<(), Failure> {
    within(limit, invoke(&mut None, endpoint, payload)).await
}

async fn within(
    limit: Duration,
    f: impl std::future::Future<Output = Result<(), Failure>>,
) -> Result<(), Failure> {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
        Err(Failure {
            answered: false,
            msg: format!("no answer within {limit:?}"),
        })
    })
}

/// One invocation on the worker's connection (opened first when there is none).
async fn invoke(
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    endpoint: &Endpoint,
    payload: &Bytes,
) -> Result<(), Failure> {
    let transport = |msg: String| Failure {
        answered: false,
        msg,
    };
    let sender = match conn {
        Some(s) if !s.is_closed() => s,
        _ => conn.insert(connect(endpoint).await.map_err(transport)?),
    };
    sender
        .ready()
        .await
        .map_err(|e| transport(format!("connection: {e}")))?;
    let req = http::Request::post(endpoint.path.as_str())
        .header(http::header::HOST, endpoint.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(payload.clone()))
        .map_err(|e| transport(format!("request: {e}")))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| transport(format!("request: {e}")))?;
    let status = res.status();
    let function_error = res.headers().get("x-amz-function-error").cloned();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| transport(format!("body: {e}")))?
        .to_bytes();
    check_answer(status, function_error.as_ref().map(|v| v.as_bytes()), &body)
}

async fn connect(endpoint: &Endpoint) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(endpoint.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", endpoint.addr))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
    // The connection's I/O runs as its own task on the same thread; it ends when the
    // sender is dropped or the server closes.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
