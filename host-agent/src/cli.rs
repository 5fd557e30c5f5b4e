//! The client commands: a thin layer over the agent's Lambda API.

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::functions::zip_dir;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the agent at {endpoint}: {source} (is `kindling serve` running?)")]
    Connect {
        endpoint: String,
        source: reqwest::Error,
    },
    #[error("{code}: {message}")]
    Api { code: String, message: String },
    #[error("{0}")]
    Input(String),
    /// `kindling serve` failed.
    #[error("{0}")]
    Serve(String),
}

pub struct Client {
    endpoint: String,
    http: reqwest::Client,
}

/// What an invoke returned.
pub struct InvokeResult {
    pub status: u16,
    pub function_error: Option<String>,
    pub executed_version: Option<String>,
    pub payload: bytes::Bytes,
}

impl Client {
    pub fn new(endpoint: &str) -> Self {
        Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/2015-03-31/functions{path}", self.endpoint)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, CliError> {
        let res = req.send().await.map_err(|source| CliError::Connect {
            endpoint: self.endpoint.clone(),
            source,
        })?;
        if res.status().is_success() {
            return Ok(res);
        }
        let code = res
            .headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("HTTP error")
            .to_string();
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let message = body["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(CliError::Api { code, message })
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value, CliError> {
        let res = self.send(req).await?;
        res.json().await.map_err(|e| CliError::Api {
            code: "InvalidResponse".into(),
            message: e.to_string(),
        })
    }

    pub async fn invoke(&self, name: &str, payload: Vec<u8>) -> Result<InvokeResult, CliError> {
        let url = format!("{}/{}/invocations", self.url(""), name);
        let res = self.send(self.http.post(url).body(payload)).await?;
        let header = |n: &str| {
            res.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let function_error = header("x-amz-function-error");
        let executed_version = header("x-amz-executed-version");
        let status = res.status().as_u16();
        let payload = res.bytes().await.map_err(|source| CliError::Connect {
            endpoint: self.endpoint.clone(),
            source,
        })?;
        Ok(InvokeResult {
            status,
            function_error,
            executed_version,
            payload,
        })
    }

    pub async fn create(&self, body: Value) -> Result<Value, CliError> {
        self.json(self.http.post(self.url("")).json(&body)).await
    }

    pub async fn list(&self) -> Result<Vec<Value>, CliError> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut req = self.http.get(self.url("/"));
            if let Some(m) = &marker {
                req = req.query(&[("Marker", m)]);
            }
            let page = self.json(req).await?;
            out.extend(page["Functions"].as_array().cloned().unwrap_or_default());
            match page["NextMarker"].as_str() {
                Some(m) => marker = Some(m.to_string()),
                None => return Ok(out),
            }
        }
    }

    pub async fn get(&self, name: &str) -> Result<Value, CliError> {
        self.json(self.http.get(self.url(&format!("/{name}"))))
            .await
    }

    pub async fn delete(&self, name: &str) -> Result<(), CliError> {
        self.send(self.http.delete(self.url(&format!("/{name}"))))
            .await
            .map(|_| ())
    }
}

/// The body of a CreateFunction request built from CLI flags.
pub struct CreateArgs {
    pub name: String,
    pub runtime: String,
    pub handler: Option<String>,
    pub zip: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub timeout: Option<u32>,
    pub memory: Option<u32>,
    pub env: Vec<String>,
}

pub fn create_body(a: CreateArgs) -> Result<Value, CliError> {
    let zip = match (&a.zip, &a.dir) {
        (Some(z), None) => {
            std::fs::read(z).map_err(|e| CliError::Input(format!("{}: {e}", z.display())))?
        }
        (None, Some(d)) => {
            zip_dir(d).map_err(|e| CliError::Input(format!("{}: {e}", d.display())))?
        }
        _ => {
            return Err(CliError::Input(
                "give exactly one of --zip FILE or --dir DIR".into(),
            ))
        }
    };
    let mut vars = serde_json::Map::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CliError::Input(format!("--env {kv}: expected KEY=VALUE")))?;
        vars.insert(k.to_string(), Value::String(v.to_string()));
    }
    let mut body = json!({
        "FunctionName": a.name,
        "Runtime": a.runtime,
        "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip) },
    });
    if let Some(h) = a.handler {
        body["Handler"] = json!(h);
    }
    if let Some(t) = a.timeout {
        body["Timeout"] = json!(t);
    }
    if let Some(m) = a.memory {
        body["MemorySize"] = json!(m);
    }
    if !vars.is_empty() {
        body["Environment"] = json!({ "Variables": vars });
    }
    Ok(body)
}
