//! Every Lambda Runtime API header name, in one place.

pub const REQUEST_ID: &str = "lambda-runtime-aws-request-id";
pub const DEADLINE_MS: &str = "lambda-runtime-deadline-ms";
pub const INVOKED_FUNCTION_ARN: &str = "lambda-runtime-invoked-function-arn";
pub const TRACE_ID: &str = "lambda-runtime-trace-id";
pub const CLIENT_CONTEXT: &str = "lambda-runtime-client-context";
pub const COGNITO_IDENTITY: &str = "lambda-runtime-cognito-identity";
pub const TENANT_ID: &str = "lambda-runtime-aws-tenant-id";
pub const INVOCATION_ID: &str = "lambda-runtime-invocation-id";
pub const FUNCTION_ERROR_TYPE: &str = "lambda-runtime-function-error-type";
/// Trailer of a streamed response: base64 of the error document.
pub const FUNCTION_ERROR_BODY: &str = "lambda-runtime-function-error-body";
pub const XRAY_ERROR_CAUSE: &str = "lambda-runtime-function-xray-error-cause";
pub const RESPONSE_MODE: &str = "lambda-runtime-function-response-mode";

/// Content type of a function error body.
pub const ERROR_CONTENT_TYPE: &str = "application/vnd.aws.lambda.error+json";
