//! A function's asynchronous invocation settings (Lambda's `FunctionEventInvokeConfig`),
//! stored beside its configuration as `functions/<name>/event-invoke-config.json`, so they
//! live and die with the function.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::destination::Destination;
use crate::functions::Function;

pub const FILE_NAME: &str = "event-invoke-config.json";
pub const DEFAULT_RETRIES: u32 = 2;
pub const MAX_RETRIES: u32 = 2;
pub const MIN_EVENT_AGE_S: u32 = 60;
pub const MAX_EVENT_AGE_S: u32 = 21_600;
/// Longest destination ARN the API model allows.
const MAX_DESTINATION_LEN: usize = 350;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A constraint of the API model (range, pattern, length): `ValidationException`.
    #[error("{0}")]
    Constraint(String),
    /// Well-formed but unacceptable: `InvalidParameterValueException`.
    #[error("{0}")]
    Invalid(String),
    #[error("event invoke config I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("event invoke config is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationConfig {
    #[serde(default)]
    pub on_success: Target,
    #[serde(default)]
    pub on_failure: Target,
}

/// The stored settings; absent values mean Lambda's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct EventInvokeConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_retry_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_event_age_in_seconds: Option<u32>,
    #[serde(default)]
    pub destination_config: DestinationConfig,
    /// Seconds since the Unix epoch (Lambda's `LastModified` is a timestamp number).
    pub last_modified: f64,
}

/// The body of Put/UpdateFunctionEventInvokeConfig. Numbers are read wide so that any
/// out-of-range value gets Lambda's validation message rather than a parse error.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ConfigRequest {
    pub maximum_retry_attempts: Option<i64>,
    pub maximum_event_age_in_seconds: Option<i64>,
    pub destination_config: Option<DestinationConfigInput>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationConfigInput {
    pub on_success: Option<Target>,
    pub on_failure: Option<Target>,
}

/// The settings an event runs under.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub max_retries: u32,
    pub max_age: Duration,
    pub on_success: Option<Destination>,
    pub on_failure: Option<Destination>,
}

impl Default for Effective {
    fn default() -> Self {
        Effective {
            max_retries: DEFAULT_RETRIES,
            max_age: Duration::from_secs(u64::from(MAX_EVENT_AGE_S)),
            on_success: None,
            on_failure: None,
        }
    }
}

impl EventInvokeConfig {
    pub fn effective(&self) -> Effective {
        let dest = |t: &Target| t.destination.as_deref().and_then(Destination::parse);
        Effective {
            max_retries: self.maximum_retry_attempts.unwrap_or(DEFAULT_RETRIES),
            max_age: Duration::from_secs(u64::from(
                self.maximum_event_age_in_seconds.unwrap_or(MAX_EVENT_AGE_S),
            )),
            on_success: dest(&self.destination_config.on_success),
            on_failure: dest(&self.destination_config.on_failure),
        }
    }

    /// Lambda's response shape: the settings plus the (qualified) function ARN.
    pub fn to_response(&self, function_arn: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["FunctionArn"] = serde_json::Value::String(format!("{function_arn}:$LATEST"));
        v
    }
}

fn range_error(value: i64, field: &str, min: i64, max: i64) -> ConfigError {
    let bound = if value < min {
        format!("greater than or equal to {min}")
    } else {
        format!("less than or equal to {max}")
    };
    ConfigError::Constraint(format!(
        "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: \
         Member must have value {bound}"
    ))
}

fn check_range(
    v: Option<i64>,
    field: &str,
    min: u32,
    max: u32,
) -> Result<Option<u32>, ConfigError> {
    match v {
        None => Ok(None),
        Some(n) if (i64::from(min)..=i64::from(max)).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(range_error(n, field, i64::from(min), i64::from(max))),
    }
}

/// The API model's constraint on a destination: at most 350 characters, an ARN shape
/// (`arn:partition:service:region:account:resource`), or empty (= none).
fn check_destination_shape(arn: &str, field: &str) -> Result<(), ConfigError> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let shaped = arn.is_empty()
        || (parts.len() == 6
            && parts[0] == "arn"
            && parts[1].starts_with("aws")
            && !parts[2].is_empty()
            && (parts[4].is_empty()
                || (parts[4].len() == 12 && parts[4].bytes().all(|b| b.is_ascii_digit()))));
    if arn.len() > MAX_DESTINATION_LEN {
        return Err(ConfigError::Constraint(format!(
            "1 validation error detected: Value '{arn}' at '{field}' failed to satisfy constraint: \
             Member must have length less than or equal to {MAX_DESTINATION_LEN}"
        )));
    }
    if !shaped {
        return Err(ConfigError::Constraint(format!(
            "1 validation error detected: Value '{arn}' at '{field}' failed to satisfy constraint: \
             Member must satisfy regular expression pattern: ^$|arn:(aws[a-zA-Z0-9-]*):([a-zA-Z0-9\\-])+:([a-z]{{2}}(-gov)?-[a-z]+-\\d{{1}})?:(\\d{{12}})?:(.*)"
        )));
    }
    Ok(())
}

/// Validates a Put or Update request against the function `self_name`; `previous` is the
/// stored config that an Update merges into (`None` for Put, which replaces).
/// `function_exists` answers whether a destination function is deployed.
pub fn apply(
    req: ConfigRequest,
    previous: Option<&EventInvokeConfig>,
    self_name: &str,
    function_exists: impl Fn(&str) -> bool,
) -> Result<EventInvokeConfig, ConfigError> {
    let retries = check_range(
        req.maximum_retry_attempts,
        "maximumRetryAttempts",
        0,
        MAX_RETRIES,
    )?;
    let age = check_range(
        req.maximum_event_age_in_seconds,
        "maximumEventAgeInSeconds",
        MIN_EVENT_AGE_S,
        MAX_EVENT_AGE_S,
    )?;
    let on_success = req
        .destination_config
        .as_ref()
        .and_then(|d| d.on_success.as_ref())
        .and_then(|t| t.destination.clone());
    let on_failure = req
        .destination_config
        .as_ref()
        .and_then(|d| d.on_failure.as_ref())
        .and_then(|t| t.destination.clone());
    for (arn, field) in [
        (&on_success, "destinationConfig.onSuccess.destination"),
        (&on_failure, "destinationConfig.onFailure.destination"),
    ] {
        if let Some(a) = arn {
            check_destination_shape(a, field)?;
        }
    }
    if retries.is_none() && age.is_none() && req.destination_config.is_none() {
        return Err(ConfigError::Invalid(
            "You must specify at least one of error handling or destination setting.".into(),
        ));
    }
    let mut bad = false;
    for arn in [&on_success, &on_failure].into_iter().flatten() {
        if arn.is_empty() {
            continue;
        }
        match Destination::parse(arn) {
            Some(Destination::Function(name)) if name == self_name => {
                return Err(ConfigError::Invalid(
                    "You can't specify the function as a destination for itself.".into(),
                ))
            }
            Some(Destination::Function(name)) if !function_exists(&name) => {
                return Err(ConfigError::Invalid(format!(
                    "The destination ARN {arn} is invalid."
                )))
            }
            Some(_) => {}
            None => bad = true,
        }
    }
    if bad {
        let part = |d: &Option<String>, label: &str| match d {
            Some(a) => format!("{label}(destination={a})"),
            None => "null".into(),
        };
        return Err(ConfigError::Invalid(format!(
            "The provided destination config DestinationConfig(onSuccess={}, onFailure={}) is \
             invalid. Kindling delivers to Lambda functions (arn:aws:lambda:REGION:ACCOUNT:\
             function:NAME) and local queues (arn:aws:sqs:REGION:ACCOUNT:QUEUE) only.",
            part(&on_success, "OnSuccess"),
            part(&on_failure, "OnFailure"),
        )));
    }
    let norm = |a: Option<String>| a.filter(|s| !s.is_empty());
    let mut out = match previous {
        Some(p) => p.clone(),
        None => EventInvokeConfig::default(),
    };
    if previous.is_none() || retries.is_some() {
        out.maximum_retry_attempts = retries;
    }
    if previous.is_none() || age.is_some() {
        out.maximum_event_age_in_seconds = age;
    }
    if previous.is_none() || req.destination_config.is_some() {
        out.destination_config = DestinationConfig {
            on_success: Target {
                destination: norm(on_success),
            },
            on_failure: Target {
                destination: norm(on_failure),
            },
        };
    }
    out.last_modified = super::queue::now_ms() as f64 / 1000.0;
    Ok(out)
}

/// Where a function's settings live.
pub fn path_of(function: &Function) -> PathBuf {
    match function.code_dir.parent() {
        Some(dir) => dir.join(FILE_NAME),
        None => PathBuf::from(FILE_NAME),
    }
}

/// Reads a function's settings; `None` when it has none. Blocking.
pub fn load(function: &Function) -> Result<Option<EventInvokeConfig>, ConfigError> {
    read(&path_of(function))
}

fn read(path: &Path) -> Result<Option<EventInvokeConfig>, ConfigError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes a function's settings atomically (temporary file, fsync, rename). Blocking.
pub fn store(function: &Function, config: &EventInvokeConfig) -> Result<(), ConfigError> {
    let path = path_of(function);
    let tmp = path.with_extension(format!("json.tmp-{}", uuid::Uuid::new_v4().simple()));
    let json = serde_json::to_vec_pretty(config)?;
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    Ok(())
}

/// Deletes a function's settings; `false` when it had none. Blocking.
pub fn remove(function: &Function) -> Result<bool, ConfigError> {
    match fs::remove_file(path_of(function)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> ConfigRequest {
        serde_json::from_value(v).unwrap()
    }

    const SQS: &str = "arn:aws:sqs:us-east-1:000000000000:failures";
    const FN: &str = "arn:aws:lambda:us-east-1:000000000000:function:other";

    #[test]
    fn put_replaces_and_update_merges() {
        let exists = |n: &str| n == "other";
        let put = apply(
            req(serde_json::json!({"MaximumRetryAttempts": 1,
                "DestinationConfig": {"OnFailure": {"Destination": SQS}}})),
            None,
            "me",
            exists,
        )
        .unwrap();
        assert_eq!(put.maximum_retry_attempts, Some(1));
        let eff = put.effective();
        assert_eq!(eff.max_retries, 1);
        assert_eq!(eff.max_age, Duration::from_secs(21_600));
        assert_eq!(eff.on_failure, Some(Destination::Queue("failures".into())));
        assert_eq!(eff.on_success, None);

        let upd = apply(
            req(serde_json::json!({"MaximumEventAgeInSeconds": 60})),
            Some(&put),
            "me",
            exists,
        )
        .unwrap();
        assert_eq!(upd.maximum_retry_attempts, Some(1));
        assert_eq!(upd.maximum_event_age_in_seconds, Some(60));
        assert_eq!(upd.destination_config, put.destination_config);

        let put2 = apply(
            req(serde_json::json!({"DestinationConfig": {"OnSuccess": {"Destination": FN}}})),
            Some(&upd),
            "me",
            exists,
        )
        .unwrap();
        assert_eq!(
            put2.effective().on_success,
            Some(Destination::Function("other".into()))
        );
        assert_eq!(put2.effective().on_failure, None);
        let json = put2.to_response("arn:aws:lambda:us-east-1:000000000000:function:me");
        assert_eq!(
            json["FunctionArn"],
            "arn:aws:lambda:us-east-1:000000000000:function:me:$LATEST"
        );
        assert_eq!(
            json["DestinationConfig"]["OnFailure"],
            serde_json::json!({})
        );
    }

    #[test]
    fn validation_follows_lambda() {
        let none = |_: &str| false;
        let err = |v| apply(req(v), None, "me", none).unwrap_err();
        assert!(
            matches!(err(serde_json::json!({"MaximumRetryAttempts": 3})),
            ConfigError::Constraint(m) if m.contains("less than or equal to 2"))
        );
        assert!(
            matches!(err(serde_json::json!({"MaximumRetryAttempts": -1})),
            ConfigError::Constraint(m) if m.contains("greater than or equal to 0"))
        );
        assert!(matches!(
            err(serde_json::json!({"MaximumEventAgeInSeconds": 59})),
            ConfigError::Constraint(_)
        ));
        assert!(matches!(
            err(serde_json::json!({"MaximumEventAgeInSeconds": 21601})),
            ConfigError::Constraint(_)
        ));
        assert!(matches!(
            err(serde_json::json!({})),
            ConfigError::Invalid(_)
        ));
        assert!(matches!(
            err(serde_json::json!({"DestinationConfig": {"OnFailure": {"Destination": "nope"}}})),
            ConfigError::Constraint(_)
        ));
        assert!(matches!(
            err(serde_json::json!({"DestinationConfig": {"OnFailure": {"Destination":
                "arn:aws:sns:us-east-1:000000000000:topic"}}})),
            ConfigError::Invalid(m) if m.contains("DestinationConfig(onSuccess=null")
        ));
        assert!(matches!(
            err(serde_json::json!({"DestinationConfig": {"OnFailure": {"Destination":
                "arn:aws:lambda:us-east-1:000000000000:function:me"}}})),
            ConfigError::Invalid(m) if m.contains("itself")
        ));
        assert!(matches!(
            err(serde_json::json!({"DestinationConfig": {"OnFailure": {"Destination": FN}}})),
            ConfigError::Invalid(m) if m.contains("is invalid")
        ));
    }
}
