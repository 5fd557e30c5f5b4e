//! Function configuration: the CreateFunction request, the stored configuration (in Lambda's
//! own JSON shape, so SDKs parse it), and validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Runtimes the agent can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `provided.al2023` / `provided.al2`: the code holds an executable `bootstrap`.
    Provided,
    /// `python3.11`: `awslambdaric` runs the `module.function` handler.
    Python311,
}

pub const SUPPORTED_RUNTIMES: &[&str] = &["provided.al2023", "provided.al2", "python3.11"];

impl Runtime {
    pub fn parse(name: &str) -> Option<Runtime> {
        match name {
            "provided.al2023" | "provided.al2" => Some(Runtime::Provided),
            "python3.11" => Some(Runtime::Python311),
            _ => None,
        }
    }
}

/// Environment variables Lambda reserves; a function may not set them.
const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

pub const DEFAULT_TIMEOUT_S: u32 = 3;
pub const MAX_TIMEOUT_S: u32 = 900;
pub const DEFAULT_MEMORY_MB: u32 = 128;
pub const MIN_MEMORY_MB: u32 = 128;
pub const MAX_MEMORY_MB: u32 = 10240;

/// The body of `POST /2015-03-31/functions`. Fields Kindling does not use are accepted and
/// ignored, as SDKs send many of them.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateFunctionRequest {
    pub function_name: Option<String>,
    pub runtime: Option<String>,
    pub handler: Option<String>,
    pub role: Option<String>,
    pub description: Option<String>,
    pub timeout: Option<u32>,
    pub memory_size: Option<u32>,
    pub code: Option<CodeInput>,
    pub environment: Option<EnvironmentInput>,
    pub package_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub image_config: Option<ImageConfig>,
}

/// A container image function's overrides of its image's ENTRYPOINT, CMD and WORKDIR
/// (Lambda's `ImageConfig`, in requests and in `ImageConfigResponse`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfigResponse {
    pub image_config: ImageConfig,
}

/// Where a container image function's image came from and what overrides it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// `Code.ImageUri`: on Kindling, a local path to an OCI layout directory or a
    /// `docker save` / OCI archive tarball (the agent copies it at create time).
    pub uri: String,
    pub config: ImageConfig,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CodeInput {
    /// Base64 of the ZIP archive.
    pub zip_file: Option<String>,
    #[serde(rename = "S3Bucket")]
    pub s3_bucket: Option<String>,
    pub image_uri: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EnvironmentInput {
    pub variables: Option<BTreeMap<String, String>>,
}

/// A request Lambda would refuse.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// Breaks a constraint of the API model (pattern, range, enum, required member):
    /// Lambda's `ValidationException`.
    #[error("1 validation error detected: {0}")]
    Constraint(String),
    /// Well-formed but not acceptable: `InvalidParameterValueException`.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError::Invalid(msg.into())
}

fn constraint(msg: impl Into<String>) -> ValidationError {
    ValidationError::Constraint(msg.into())
}

/// The model's constraint on function names, as Lambda words it.
pub fn name_constraint(value: &str, field: &str) -> ValidationError {
    constraint(format!(
        "Value '{value}' at '{field}' failed to satisfy constraint: Member must satisfy regular \
         expression pattern: (arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{{2}}(-gov)?-[a-z]+-\\d{{1}}:)?(\\d{{12}}:)?(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?"
    ))
}

/// The validated settings of a new function, before code is stored.
#[derive(Debug, Clone)]
pub struct NewFunction {
    pub name: String,
    pub runtime: String,
    pub handler: String,
    pub role: String,
    pub description: String,
    pub timeout: u32,
    pub memory_size: u32,
    pub variables: BTreeMap<String, String>,
    pub architecture: String,
    /// `Some` for `PackageType: Image` functions (the code bytes are then empty).
    pub image: Option<ImageSpec>,
}

impl CreateFunctionRequest {
    /// Checks the request the way Lambda does and returns the settings plus the decoded zip.
    pub fn validate(mut self) -> Result<(NewFunction, Vec<u8>), ValidationError> {
        let name = self
            .function_name
            .take()
            .ok_or_else(|| constraint("Value null at 'functionName' failed to satisfy constraint: Member must not be null"))?;
        if !is_valid_name(&name) {
            return Err(name_constraint(&name, "functionName"));
        }
        let is_image = match self.package_type.as_deref() {
            None | Some("Zip") => false,
            Some("Image") => true,
            Some(other) => {
                return Err(constraint(format!(
                    "Value '{other}' at 'packageType' failed to satisfy constraint: Member must \
                     satisfy enum value set: [Image, Zip]"
                )))
            }
        };
        if is_image {
            return self.validate_image(name);
        }
        if self.image_config.is_some() {
            return Err(invalid(
                "ImageConfig is only supported for functions with the Image package type",
            ));
        }
        let runtime = self
            .runtime
            .ok_or_else(|| invalid("Runtime is required for .zip file packages"))?;
        let parsed = Runtime::parse(&runtime).ok_or_else(|| {
            invalid(format!(
                "The runtime parameter of {runtime} is not supported by Kindling. Supported runtimes: {}",
                SUPPORTED_RUNTIMES.join(", ")
            ))
        })?;
        let handler = match (parsed, self.handler) {
            (Runtime::Python311, Some(h)) if is_python_handler(&h) => h,
            (Runtime::Python311, Some(h)) => {
                return Err(invalid(format!(
                    "Handler '{h}' is not valid for python3.11: expected module.function"
                )))
            }
            (Runtime::Python311, None) => {
                return Err(invalid("Handler is required for the python3.11 runtime"))
            }
            (Runtime::Provided, h) => h.unwrap_or_else(|| "bootstrap".to_string()),
        };
        if handler.len() > 128 {
            return Err(constraint(format!(
                "Value '{handler}' at 'handler' failed to satisfy constraint: Member must have length less than or equal to 128"
            )));
        }
        let common = Common::validate(
            self.timeout,
            self.memory_size,
            self.environment,
            self.architectures,
        )?;
        let code = self.code.ok_or_else(|| {
            constraint("Value null at 'code' failed to satisfy constraint: Member must not be null")
        })?;
        if code.s3_bucket.is_some() {
            return Err(invalid(
                "Code.S3Bucket is not supported: upload the ZIP as Code.ZipFile",
            ));
        }
        if code.image_uri.is_some() {
            return Err(invalid(
                "Code.ImageUri is only valid with PackageType Image",
            ));
        }
        let zip_b64 = code
            .zip_file
            .ok_or_else(|| invalid("Code.ZipFile is required"))?;
        use base64::Engine as _;
        let zip = base64::engine::general_purpose::STANDARD
            .decode(zip_b64.trim())
            .map_err(|_| invalid("Code.ZipFile is not valid base64"))?;
        Ok((
            NewFunction {
                name,
                runtime,
                handler,
                role: self.role.unwrap_or_default(),
                description: self.description.unwrap_or_default(),
                timeout: common.timeout,
                memory_size: common.memory_size,
                variables: common.variables,
                architecture: common.architecture,
                image: None,
            },
            zip,
        ))
    }

    /// A `PackageType: Image` request: an image path instead of a ZIP, no runtime or handler.
    fn validate_image(self, name: String) -> Result<(NewFunction, Vec<u8>), ValidationError> {
        if self.runtime.is_some() || self.handler.is_some() {
            return Err(invalid(
                "Runtime and Handler are not supported for the Image package type: the image's \
                 ENTRYPOINT and CMD (or ImageConfig) say what runs",
            ));
        }
        let common = Common::validate(
            self.timeout,
            self.memory_size,
            self.environment,
            self.architectures,
        )?;
        let code = self.code.ok_or_else(|| {
            constraint("Value null at 'code' failed to satisfy constraint: Member must not be null")
        })?;
        if code.zip_file.is_some() || code.s3_bucket.is_some() {
            return Err(invalid(
                "Code.ZipFile and Code.S3Bucket are not valid with PackageType Image: give Code.ImageUri",
            ));
        }
        let uri = code
            .image_uri
            .ok_or_else(|| invalid("Code.ImageUri is required for the Image package type"))?;
        if !uri.starts_with('/') {
            return Err(invalid(format!(
                "Source image {uri} is not valid: Kindling takes an absolute local path to an OCI \
                 layout directory or an image tarball (`docker save`, OCI archive)"
            )));
        }
        let config = self.image_config.unwrap_or_default();
        if let Some(d) = &config.working_directory {
            if !d.is_empty() && !d.starts_with('/') {
                return Err(invalid(format!(
                    "ImageConfig.WorkingDirectory {d} must be an absolute path"
                )));
            }
        }
        Ok((
            NewFunction {
                name,
                runtime: String::new(),
                handler: String::new(),
                role: self.role.unwrap_or_default(),
                description: self.description.unwrap_or_default(),
                timeout: common.timeout,
                memory_size: common.memory_size,
                variables: common.variables,
                architecture: common.architecture,
                image: Some(ImageSpec { uri, config }),
            },
            Vec::new(),
        ))
    }
}

/// The settings every package type shares, validated.
struct Common {
    timeout: u32,
    memory_size: u32,
    variables: BTreeMap<String, String>,
    architecture: String,
}

impl Common {
    fn validate(
        timeout: Option<u32>,
        memory_size: Option<u32>,
        environment: Option<EnvironmentInput>,
        architectures: Option<Vec<String>>,
    ) -> Result<Common, ValidationError> {
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT_S);
        if !(1..=MAX_TIMEOUT_S).contains(&timeout) {
            return Err(constraint(format!(
                "Value '{timeout}' at 'timeout' failed to satisfy constraint: Member must have value \
                 between 1 and {MAX_TIMEOUT_S}"
            )));
        }
        let memory_size = memory_size.unwrap_or(DEFAULT_MEMORY_MB);
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&memory_size) {
            return Err(constraint(format!(
                "Value '{memory_size}' at 'memorySize' failed to satisfy constraint: Member must have \
                 value between {MIN_MEMORY_MB} and {MAX_MEMORY_MB}"
            )));
        }
        let variables = environment.and_then(|e| e.variables).unwrap_or_default();
        let reserved: Vec<&str> = variables
            .keys()
            .filter(|k| RESERVED_ENV.contains(&k.as_str()))
            .map(String::as_str)
            .collect();
        if !reserved.is_empty() {
            return Err(invalid(format!(
                "Lambda was unable to configure your environment variables because the environment variables \
                 you have provided contains reserved keys that are currently not supported for modification. \
                 Reserved keys used in this request: {}",
                reserved.join(", ")
            )));
        }
        if let Some(bad) = variables.keys().find(|k| !is_valid_env_key(k)) {
            return Err(invalid(format!(
                "Environment variable name '{bad}' is not valid: it must match [a-zA-Z][a-zA-Z0-9_]+"
            )));
        }
        let architecture = match architectures.as_deref() {
            None | Some([]) => "x86_64".to_string(),
            Some([a]) if a == "x86_64" => a.clone(),
            Some(other) => {
                return Err(constraint(format!(
                    "Value '{other:?}' at 'architectures' failed to satisfy constraint: Member must \
                     have length 1 and its member must satisfy enum value set: [x86_64] on this host"
                )))
            }
        };
        Ok(Common {
            timeout,
            memory_size,
            variables,
            architecture,
        })
    }
}

pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn is_python_handler(h: &str) -> bool {
    matches!(h.rsplit_once('.'), Some((m, f)) if !m.is_empty() && !f.is_empty())
}

fn is_valid_env_key(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic())
        && k.len() >= 2
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// The stored configuration, in the shape of Lambda's `FunctionConfiguration`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionConfiguration {
    pub function_name: String,
    pub function_arn: String,
    /// Empty (and left out of the JSON) for container image functions, as in Lambda.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runtime: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handler: String,
    pub code_size: u64,
    pub description: String,
    pub timeout: u32,
    pub memory_size: u32,
    pub last_modified: String,
    pub code_sha256: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<EnvironmentResponse>,
    pub revision_id: String,
    pub state: String,
    pub last_update_status: String,
    pub package_type: String,
    pub architectures: Vec<String>,
    pub ephemeral_storage: EphemeralStorage,
    /// Container image functions: their ImageConfig overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_config_response: Option<ImageConfigResponse>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EnvironmentResponse {
    pub variables: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EphemeralStorage {
    pub size: u32,
}

/// A function's concurrency settings (PutFunctionConcurrency, PutProvisionedConcurrencyConfig),
/// stored beside its configuration in `concurrency.json`: Lambda keeps them out of
/// `FunctionConfiguration`, and changing them does not change the RevisionId.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ConcurrencySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_concurrent_executions: Option<u32>,
    /// Provisioned concurrency of `$LATEST` (the only qualifier Kindling has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned: Option<ProvisionedSetting>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProvisionedSetting {
    pub requested_provisioned_concurrent_executions: u32,
    pub last_modified: String,
}

/// A function named in a URL: a name, a partial ARN or a full ARN, with an optional qualifier.
#[derive(Debug, PartialEq, Eq)]
pub struct FunctionRef {
    pub name: String,
    pub qualifier: Option<String>,
}

/// Parses `name`, `name:qualifier`, `123456789012:function:name[:q]` and
/// `arn:aws:lambda:region:123456789012:function:name[:q]`.
pub fn parse_function_ref(s: &str) -> Option<FunctionRef> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, qualifier) = match parts.as_slice() {
        [name] => (*name, None),
        [name, q] => (*name, Some(*q)),
        [_, "function", name] => (*name, None),
        [_, "function", name, q] => (*name, Some(*q)),
        ["arn", _, "lambda", _, _, "function", name] => (*name, None),
        ["arn", _, "lambda", _, _, "function", name, q] => (*name, Some(*q)),
        _ => return None,
    };
    if !is_valid_name(name) {
        return None;
    }
    Some(FunctionRef {
        name: name.to_string(),
        qualifier: qualifier.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> CreateFunctionRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn parses_names_and_arns() {
        let f = |s| parse_function_ref(s).map(|r| (r.name, r.qualifier));
        assert_eq!(f("hello"), Some(("hello".into(), None)));
        assert_eq!(
            f("hello:$LATEST"),
            Some(("hello".into(), Some("$LATEST".into())))
        );
        assert_eq!(
            f("arn:aws:lambda:us-east-1:123456789012:function:hello"),
            Some(("hello".into(), None))
        );
        assert_eq!(
            f("123456789012:function:hello:7"),
            Some(("hello".into(), Some("7".into())))
        );
        assert_eq!(f("bad name"), None);
        assert_eq!(f("a:b:c:d:e"), None);
        assert_eq!(f(""), None);
    }

    #[test]
    fn validates_create_requests() {
        let ok = req(serde_json::json!({
            "FunctionName": "f", "Runtime": "python3.11", "Handler": "app.handler",
            "Code": {"ZipFile": "UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="}
        }));
        let (f, zip) = ok.validate().unwrap();
        assert_eq!(f.timeout, DEFAULT_TIMEOUT_S);
        assert_eq!(f.memory_size, DEFAULT_MEMORY_MB);
        assert_eq!(zip.len(), 22);

        let cases = [
            (
                serde_json::json!({"FunctionName": "f", "Runtime": "nodejs20.x", "Handler": "a.b", "Code": {"ZipFile": ""}}),
                "not supported",
            ),
            (
                serde_json::json!({"FunctionName": "f", "Runtime": "python3.11", "Handler": "nodot", "Code": {"ZipFile": ""}}),
                "module.function",
            ),
            (
                serde_json::json!({"FunctionName": "f g", "Runtime": "python3.11", "Handler": "a.b", "Code": {"ZipFile": ""}}),
                "regular expression",
            ),
            (
                serde_json::json!({"FunctionName": "f", "Runtime": "provided.al2023", "Timeout": 901, "Code": {"ZipFile": ""}}),
                "'timeout'",
            ),
            (
                serde_json::json!({"FunctionName": "f", "Runtime": "provided.al2023", "MemorySize": 64, "Code": {"ZipFile": ""}}),
                "'memorySize'",
            ),
            (
                serde_json::json!({"FunctionName": "f", "Runtime": "provided.al2023", "Environment": {"Variables": {"AWS_REGION": "x"}}, "Code": {"ZipFile": ""}}),
                "AWS_REGION",
            ),
            (
                serde_json::json!({"FunctionName": "f", "Runtime": "provided.al2023", "Code": {"ZipFile": "@@@"}}),
                "base64",
            ),
            (
                serde_json::json!({"FunctionName": "f", "Runtime": "provided.al2023"}),
                "'code'",
            ),
            (
                serde_json::json!({"Runtime": "provided.al2023", "Code": {"ZipFile": ""}}),
                "must not be null",
            ),
            (
                serde_json::json!({"FunctionName": "f", "PackageType": "Docker", "Code": {"ImageUri": "/i"}}),
                "'packageType'",
            ),
            (
                serde_json::json!({"FunctionName": "f", "PackageType": "Image", "Runtime": "python3.11", "Code": {"ImageUri": "/i"}}),
                "not supported for the Image package type",
            ),
            (
                serde_json::json!({"FunctionName": "f", "PackageType": "Image", "Code": {"ZipFile": ""}}),
                "not valid with PackageType Image",
            ),
            (
                serde_json::json!({"FunctionName": "f", "PackageType": "Image", "Code": {"ImageUri": "123.dkr.ecr.us-east-1.amazonaws.com/r:t"}}),
                "absolute local path",
            ),
            (
                serde_json::json!({"FunctionName": "f", "PackageType": "Image", "Code": {"ImageUri": "/i"}, "ImageConfig": {"WorkingDirectory": "rel"}}),
                "absolute path",
            ),
            (
                serde_json::json!({"FunctionName": "f", "Runtime": "provided.al2023", "Code": {"ImageUri": "/i"}}),
                "only valid with PackageType Image",
            ),
        ];
        for (json, needle) in cases {
            let err = req(json.clone()).validate().unwrap_err();
            // Model constraints are worded "1 validation error detected: Value ..."; the
            // service's own refusals are not.
            let is_constraint = matches!(err, ValidationError::Constraint(_));
            let err = err.to_string();
            assert!(err.contains(needle), "{json}: {err}");
            assert_eq!(
                is_constraint,
                err.starts_with("1 validation error detected"),
                "{err}"
            );
        }
    }

    #[test]
    fn image_functions_take_a_path_and_overrides() {
        let (f, code) = req(serde_json::json!({
            "FunctionName": "img", "PackageType": "Image", "MemorySize": 256,
            "Code": {"ImageUri": "/srv/images/app.tar"},
            "ImageConfig": {"EntryPoint": ["/app/run"], "Command": ["h"], "WorkingDirectory": "/app"}
        }))
        .validate()
        .unwrap();
        assert!(code.is_empty());
        assert_eq!(f.memory_size, 256);
        assert!(f.runtime.is_empty() && f.handler.is_empty());
        let image = f.image.unwrap();
        assert_eq!(image.uri, "/srv/images/app.tar");
        assert_eq!(image.config.entry_point, Some(vec!["/app/run".to_string()]));
        assert_eq!(image.config.command, Some(vec!["h".to_string()]));
        assert_eq!(image.config.working_directory.as_deref(), Some("/app"));
    }
}
