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

    fn queue_url(&self, path: &str) -> String {
        format!("{}/kindling/v1/queues{path}", self.endpoint)
    }

    /// The local queues (asynchronous invocation destinations) and their message counts.
    pub async fn queues(&self) -> Result<Value, CliError> {
        self.json(self.http.get(self.queue_url(""))).await
    }

    /// A local queue's messages, oldest first.
    pub async fn queue_messages(&self, queue: &str) -> Result<Value, CliError> {
        self.json(self.http.get(self.queue_url(&format!("/{queue}/messages"))))
            .await
    }

    /// Empties a local queue.
    pub async fn purge_queue(&self, queue: &str) -> Result<Value, CliError> {
        self.json(
            self.http
                .delete(self.queue_url(&format!("/{queue}/messages"))),
        )
        .await
    }

    /// Reads a function's log (`GET /kindling/v1/functions/{name}/logs`) and hands each line
    /// (without its newline) to `line`; with `follow`, until the agent closes the stream or
    /// `line` fails (e.g. a closed stdout).
    pub async fn logs(
        &self,
        name: &str,
        follow: bool,
        since_ms: Option<i64>,
        mut line: impl FnMut(&str) -> std::io::Result<()>,
    ) -> Result<(), CliError> {
        let mut req = self.http.get(format!(
            "{}/kindling/v1/functions/{name}/logs",
            self.endpoint
        ));
        if follow {
            req = req.query(&[("follow", "true")]);
        }
        if let Some(ms) = since_ms {
            req = req.query(&[("since_ms", ms.to_string())]);
        }
        let mut res = self.send(req).await?;
        let mut partial: Vec<u8> = Vec::new();
        loop {
            let chunk = res.chunk().await.map_err(|source| CliError::Connect {
                endpoint: self.endpoint.clone(),
                source,
            })?;
            let Some(chunk) = chunk else {
                break;
            };
            partial.extend_from_slice(&chunk);
            while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                let rest = partial.split_off(i + 1);
                let text = String::from_utf8_lossy(&partial[..i]).into_owned();
                partial = rest;
                if line(&text).is_err() {
                    return Ok(());
                }
            }
        }
        if !partial.is_empty() {
            let _ = line(&String::from_utf8_lossy(&partial));
        }
        Ok(())
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
    pub runtime: Option<String>,
    pub handler: Option<String>,
    pub zip: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    /// A container image on the agent's host (sent as an absolute path).
    pub image: Option<PathBuf>,
    pub image_entrypoint: Vec<String>,
    pub image_command: Vec<String>,
    pub image_workdir: Option<String>,
    pub timeout: Option<u32>,
    pub memory: Option<u32>,
    pub env: Vec<String>,
}

pub fn create_body(a: CreateArgs) -> Result<Value, CliError> {
    let code = match (&a.zip, &a.dir, &a.image) {
        (Some(z), None, None) => {
            let zip =
                std::fs::read(z).map_err(|e| CliError::Input(format!("{}: {e}", z.display())))?;
            json!({ "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip) })
        }
        (None, Some(d), None) => {
            let zip = zip_dir(d).map_err(|e| CliError::Input(format!("{}: {e}", d.display())))?;
            json!({ "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip) })
        }
        (None, None, Some(i)) => {
            let abs = std::path::absolute(i)
                .map_err(|e| CliError::Input(format!("{}: {e}", i.display())))?;
            json!({ "ImageUri": abs.display().to_string() })
        }
        _ => {
            return Err(CliError::Input(
                "give exactly one of --zip FILE, --dir DIR or --image PATH".into(),
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
    let mut body = json!({ "FunctionName": a.name, "Code": code });
    if let Some(r) = a.runtime {
        body["Runtime"] = json!(r);
    }
    if a.image.is_some() {
        body["PackageType"] = json!("Image");
        let mut ic = serde_json::Map::new();
        if !a.image_entrypoint.is_empty() {
            ic.insert("EntryPoint".into(), json!(a.image_entrypoint));
        }
        if !a.image_command.is_empty() {
            ic.insert("Command".into(), json!(a.image_command));
        }
        if let Some(w) = a.image_workdir {
            ic.insert("WorkingDirectory".into(), json!(w));
        }
        if !ic.is_empty() {
            body["ImageConfig"] = Value::Object(ic);
        }
    }
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

/// Parses a duration such as `90` (seconds), `30s`, `5m`, `2h`, `1d` or `1h30m`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, CliError> {
    let bad = || {
        CliError::Input(format!(
            "{text:?} is not a duration (examples: 90, 30s, 5m, 2h, 1d, 1h30m)"
        ))
    };
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !number.is_empty() || text.is_empty() {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["", "m", "5x", "1h30", "-3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
