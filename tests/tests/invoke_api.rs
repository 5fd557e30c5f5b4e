//! The Invoke API's own behaviour: errors, invocation types, request ids, client context.

use base64::Engine as _;
use kindling_tests::{shell_bootstrap, Agent};
use serde_json::json;

fn agent_with_echo() -> Agent {
    let agent = Agent::start();
    // Answers with the request id, the client context header and its own pid.
    let zip = shell_bootstrap(
        r#"CC=$(grep -i '^lambda-runtime-client-context:' "$HDRS" | cut -d' ' -f2- | tr -d '\r')
  respond "{\"rid\":\"$RID\",\"cc\":\"$(printf %s "$CC" | base64 -w0)\",\"event\":$EVENT}""#,
    );
    agent.create_ok("echo-sh", "provided.al2023", "bootstrap", &zip, json!({}));
    agent
}

#[test]
fn invoke_round_trip_and_request_id() {
    let agent = agent_with_echo();
    let r = agent.invoke("echo-sh", br#"{"k":[1,2,3]}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["event"], json!({"k": [1, 2, 3]}));
    assert_eq!(r.header("x-amzn-requestid"), body["rid"].as_str());
    assert_eq!(r.header("x-amz-executed-version"), Some("$LATEST"));
    assert_eq!(r.header("x-amz-function-error"), None);

    // An empty payload is the empty JSON object.
    let r = agent.invoke("echo-sh", b"");
    assert_eq!(r.json()["event"], json!({}));

    // Full and partial ARNs name the same function; other qualifiers do not exist.
    let arn = "arn:aws:lambda:us-east-1:000000000000:function:echo-sh";
    assert_eq!(agent.invoke(arn, b"{}").status, 200);
    assert_eq!(
        agent.invoke("000000000000:function:echo-sh", b"{}").status,
        200
    );
    assert_eq!(agent.invoke("echo-sh:$LATEST", b"{}").status, 200);
    let r = agent.invoke("echo-sh:7", b"{}");
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("ResourceNotFoundException")
    );
}

#[test]
fn client_context_reaches_the_runtime_decoded() {
    let agent = agent_with_echo();
    let cc = r#"{"custom":{"tenant":"t1"}}"#;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cc);
    let r = agent.invoke_with("echo-sh", b"{}", &[("X-Amz-Client-Context", &b64)]);
    assert_eq!(r.status, 200, "{}", r.text());
    // The bootstrap re-encodes what it saw in Lambda-Runtime-Client-Context.
    let seen = r.json()["cc"].as_str().unwrap().to_string();
    let seen = base64::engine::general_purpose::STANDARD
        .decode(seen)
        .unwrap();
    assert_eq!(String::from_utf8(seen).unwrap(), cc);

    let r = agent.invoke_with("echo-sh", b"{}", &[("X-Amz-Client-Context", "!!notbase64")]);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("InvalidRequestContentException")
    );
    let too_big = "A".repeat(3584);
    let r = agent.invoke_with("echo-sh", b"{}", &[("X-Amz-Client-Context", &too_big)]);
    assert_eq!(r.status, 400);
}

#[test]
fn invoke_errors_follow_the_invoke_api_table() {
    let agent = agent_with_echo();

    let r = agent.invoke("missing", b"{}");
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("ResourceNotFoundException")
    );
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("function:missing"));

    let big = vec![b' '; 6 * 1024 * 1024 + 1];
    let r = agent.invoke("echo-sh", &big);
    assert_eq!(r.status, 413);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("RequestTooLargeException")
    );
    // Exactly 6 MB (whitespace around a JSON value) is still accepted.
    let mut max = vec![b' '; 6 * 1024 * 1024 - 2];
    max.extend_from_slice(b"{}");
    let r = agent.invoke("echo-sh", &max);
    assert_eq!(r.status, 200, "{}", r.text());

    let r = agent.invoke("echo-sh", b"{not json");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("InvalidRequestContentException")
    );

    let r = agent.invoke_with("echo-sh", b"{}", &[("X-Amz-Invocation-Type", "Sometimes")]);
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-amzn-errortype"), Some("ValidationException"));
    // Asynchronous: queued, 202 with an empty body (tests/tests/async_invoke.rs has the rest).
    let r = agent.invoke_with("echo-sh", b"{}", &[("X-Amz-Invocation-Type", "Event")]);
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(r.body.is_empty());
    assert!(r.header("x-amzn-requestid").is_some());

    let r = agent.invoke_with("echo-sh", b"{}", &[("X-Amz-Invocation-Type", "DryRun")]);
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let r = agent.invoke_with("missing", b"{}", &[("X-Amz-Invocation-Type", "DryRun")]);
    assert_eq!(r.status, 404);

    let r = agent.invoke_with("bad name!", b"{}", &[]);
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-amzn-errortype"), Some("ValidationException"));

    let r = agent.get("/2015-03-31/no-such-api");
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("UnknownOperationException")
    );
}
