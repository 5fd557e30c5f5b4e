//! Errors in the shape Lambda's API returns them: a status, the `x-amzn-ErrorType` header and
//! a JSON body `{"Type": "User"|"Service", "message": ...}`, which botocore parses.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct LambdaError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The `Reason` field of the body (throttles: Lambda's `ThrottleReason`).
    pub reason: Option<&'static str>,
}

impl LambdaError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        LambdaError {
            status,
            code,
            message: message.into(),
            reason: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "ResourceConflictException", message)
    }

    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            message,
        )
    }

    /// A constraint of the API model broken: pattern, range, enum, required member.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ValidationException", message)
    }

    pub fn invalid_content(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            message,
        )
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            message,
        )
    }

    pub fn throttled(message: impl Into<String>) -> Self {
        LambdaError {
            reason: Some("ConcurrentInvocationLimitExceeded"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                message,
            )
        }
    }

    /// A 429 with Lambda's `Reason` (e.g. `ReservedFunctionConcurrentInvocationLimitExceeded`).
    pub fn throttled_with_reason(reason: &'static str, message: impl Into<String>) -> Self {
        LambdaError {
            reason: Some(reason),
            ..Self::throttled(message)
        }
    }

    /// The agent is shutting down and takes no new invocations.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "ServiceException", message)
    }

    pub fn provisioned_config_not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ProvisionedConcurrencyConfigNotFoundException",
            message,
        )
    }

    pub fn service(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            message,
        )
    }

    pub fn unknown_operation() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "Unknown operation",
        )
    }
}

impl IntoResponse for LambdaError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "Service"
        } else {
            "User"
        };
        let mut body = json!({ "Type": kind, "message": self.message });
        if let Some(reason) = self.reason {
            body["Reason"] = json!(reason);
        }
        let mut res = (self.status, Json(body)).into_response();
        res.headers_mut()
            .insert("x-amzn-errortype", HeaderValue::from_static(self.code));
        res
    }
}

impl From<crate::functions::ValidationError> for LambdaError {
    fn from(e: crate::functions::ValidationError) -> Self {
        use crate::functions::ValidationError as V;
        match e {
            V::Constraint(_) => LambdaError::validation(e.to_string()),
            V::Invalid(m) => LambdaError::invalid_parameter(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn throttles_carry_their_reason() {
        let res = LambdaError::throttled_with_reason(
            "ReservedFunctionConcurrentInvocationLimitExceeded",
            "Rate Exceeded.",
        )
        .into_response();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            res.headers()["x-amzn-errortype"],
            "TooManyRequestsException"
        );
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"Type": "User", "message": "Rate Exceeded.",
                   "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded"})
        );
        let plain = LambdaError::not_found("x").into_response();
        let body = axum::body::to_bytes(plain.into_body(), 1 << 16)
            .await
            .unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("Reason"));
    }
}
