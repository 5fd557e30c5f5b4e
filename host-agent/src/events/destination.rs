//! Destinations of asynchronous invocations and the record Lambda sends them.

use serde_json::{json, Value};

use super::queue::{EventRecord, LastResponse};

/// Where an outcome goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `arn:aws:lambda:REGION:ACCOUNT:function:NAME[:$LATEST]`: an async invocation of it.
    Function(String),
    /// `arn:aws:sqs:REGION:ACCOUNT:QUEUE`: a local queue in the agent's event database
    /// (region and account are not checked: there is one agent, one set of queues).
    Queue(String),
}

/// SQS's queue name rule for standard queues: 1-80 of `[A-Za-z0-9_-]`.
pub fn is_queue_name(name: &str) -> bool {
    (1..=80).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Destination {
    /// The destinations Kindling can deliver to; `None` for any other ARN.
    pub fn parse(arn: &str) -> Option<Destination> {
        let parts: Vec<&str> = arn.split(':').collect();
        match parts.as_slice() {
            ["arn", p, "lambda", _, _, "function", name] if p.starts_with("aws") => {
                crate::functions::parse_function_ref(name)
                    .filter(|r| r.qualifier.is_none())
                    .map(|r| Destination::Function(r.name))
            }
            ["arn", p, "lambda", _, _, "function", name, "$LATEST"] if p.starts_with("aws") => {
                crate::functions::parse_function_ref(name)
                    .filter(|r| r.qualifier.is_none())
                    .map(|r| Destination::Function(r.name))
            }
            ["arn", p, "sqs", _, _, queue] if p.starts_with("aws") && is_queue_name(queue) => {
                Some(Destination::Queue(queue.to_string()))
            }
            _ => None,
        }
    }
}

/// Why an event ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Success,
    RetriesExhausted,
    EventAgeExceeded,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Success => "Success",
            Condition::RetriesExhausted => "RetriesExhausted",
            Condition::EventAgeExceeded => "EventAgeExceeded",
        }
    }
}

/// JSON text as a value; anything else as a string.
fn json_or_string(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Lambda's invocation record (version 1.0) for an event's outcome. `responseContext` and
/// `responsePayload` are there when the function ran at least once.
pub fn record(event: &EventRecord, function_arn: &str, condition: Condition) -> Value {
    let mut r = json!({
        "version": "1.0",
        "timestamp": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        "requestContext": {
            "requestId": event.request_id,
            "functionArn": format!("{function_arn}:$LATEST"),
            "condition": condition.as_str(),
            "approximateInvokeCount": event.attempts,
        },
        "requestPayload": json_or_string(&event.payload),
    });
    if let Some(LastResponse {
        function_error,
        body,
    }) = &event.last_response
    {
        let mut ctx = json!({ "statusCode": 200, "executedVersion": "$LATEST" });
        if let Some(fe) = function_error {
            ctx["functionError"] = json!(fe);
        }
        r["responseContext"] = ctx;
        r["responsePayload"] = json_or_string(body);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_destinations_kindling_serves() {
        assert_eq!(
            Destination::parse("arn:aws:lambda:us-east-1:000000000000:function:f-1"),
            Some(Destination::Function("f-1".into()))
        );
        assert_eq!(
            Destination::parse("arn:aws:lambda:eu-west-1:123456789012:function:f:$LATEST"),
            Some(Destination::Function("f".into()))
        );
        assert_eq!(
            Destination::parse("arn:aws:sqs:us-east-1:000000000000:dlq_1"),
            Some(Destination::Queue("dlq_1".into()))
        );
        for bad in [
            "arn:aws:lambda:us-east-1:000000000000:function:f:7",
            "arn:aws:sqs:us-east-1:000000000000:q.fifo",
            "arn:aws:sns:us-east-1:000000000000:topic",
            "arn:aws:sqs:us-east-1:000000000000:",
            "not an arn",
        ] {
            assert_eq!(Destination::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn record_has_lambda_fields() {
        let mut ev = EventRecord::new("rid".into(), "f".into(), r#"{"a":1}"#.into(), None);
        ev.attempts = 3;
        ev.last_response = Some(LastResponse {
            function_error: Some("Unhandled".into()),
            body: r#"{"errorMessage":"boom"}"#.into(),
        });
        let r = record(
            &ev,
            "arn:aws:lambda:us-east-1:000000000000:function:f",
            Condition::RetriesExhausted,
        );
        assert_eq!(r["version"], "1.0");
        assert_eq!(r["requestContext"]["requestId"], "rid");
        assert_eq!(r["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(r["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(r["requestPayload"], json!({"a": 1}));
        assert_eq!(r["responseContext"]["functionError"], "Unhandled");
        assert_eq!(r["responsePayload"]["errorMessage"], "boom");
        assert!(r["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
