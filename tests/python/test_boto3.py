"""Conformance tests: boto3's Lambda client against a real `kindling serve`.

Each test talks to the agent only the way an AWS SDK user would (endpoint_url override), and
checks what Lambda itself would answer: the shapes boto3 parses, error codes and HTTP statuses,
and what the function code sees.
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from kindling_agent import ROLE, code_sha256, make_zip

MB = 1024 * 1024
#: Lambda's synchronous invoke payload limit.
MAX_SYNC_PAYLOAD = 6 * MB


# --- helpers -------------------------------------------------------------------------------


def create(client, name, runtime, code, handler=None, **extra):
    args = dict(FunctionName=name, Runtime=runtime, Role=ROLE, Code={"ZipFile": code}, **extra)
    if handler is not None:
        args["Handler"] = handler
    return client.create_function(**args)


def invoke(client, name, event=None, **extra):
    """Invokes synchronously; returns (response, parsed JSON payload)."""
    payload = extra.pop("Payload", None)
    if payload is None:
        payload = json.dumps(event if event is not None else {})
    res = client.invoke(FunctionName=name, Payload=payload, **extra)
    body = res["Payload"].read()
    return res, (json.loads(body) if body else None)


def error_of(excinfo):
    """(error code, HTTP status, message) of a botocore ClientError."""
    r = excinfo.value.response
    return r["Error"]["Code"], r["ResponseMetadata"]["HTTPStatusCode"], r["Error"].get("Message", "")


def list_names(client):
    names = []
    for page in client.get_paginator("list_functions").paginate():
        names += [f["FunctionName"] for f in page["Functions"]]
    return names


def assert_gone(client, name):
    with pytest.raises(ClientError) as e:
        client.get_function(FunctionName=name)
    assert error_of(e)[:2] == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as e:
        client.get_function_configuration(FunctionName=name)
    assert error_of(e)[:2] == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as e:
        client.invoke(FunctionName=name, Payload=b"{}")
    assert error_of(e)[:2] == ("ResourceNotFoundException", 404)
    # boto3's modelled exception class matches too, as SDK users catch it that way.
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke(FunctionName=name, Payload=b"{}")
    assert name not in list_names(client)


# --- 1. the bundled examples ---------------------------------------------------------------


def test_example_hello_python(examples_client):
    res, body = invoke(examples_client, "hello-python", {"name": "kindling"})
    assert res["StatusCode"] == 200
    assert "FunctionError" not in res
    assert res["ExecutedVersion"] == "$LATEST"
    assert body["message"] == "Hello, kindling!"
    assert body["functionName"] == "hello-python"
    assert body["requestId"] == res["ResponseMetadata"]["RequestId"]
    assert body["region"] == "us-east-1"
    assert str(body["memoryLimitInMB"]) == "128"


def test_example_echo_rust(examples_client):
    event = {"hello": "rust", "n": [1, 2, 3], "nested": {"ok": True, "none": None}}
    res, body = invoke(examples_client, "echo-rust", event)
    assert res["StatusCode"] == 200
    assert "FunctionError" not in res
    assert body["echo"] == event
    assert body["functionName"] == "echo-rust"
    assert body["requestId"] == res["ResponseMetadata"]["RequestId"]


def test_examples_are_listed_with_their_configuration(examples_client):
    fns = {f["FunctionName"]: f for f in examples_client.list_functions()["Functions"]}
    assert fns["hello-python"]["Runtime"] == "python3.11"
    assert fns["hello-python"]["Handler"] == "lambda_function.handler"
    assert fns["echo-rust"]["Runtime"] == "provided.al2023"
    for f in fns.values():
        assert f["FunctionArn"] == f"arn:aws:lambda:us-east-1:000000000000:function:{f['FunctionName']}"


# --- 2. the function lifecycle for each runtime --------------------------------------------


def _check_shell(res, body, name, event):
    assert body == {
        "runtime": "sh",
        "requestId": res["ResponseMetadata"]["RequestId"],
        "functionName": name,
        "event": event,
    }


def _check_rust(res, body, name, event):
    assert body["echo"] == event
    assert body["requestId"] == res["ResponseMetadata"]["RequestId"]
    assert body["functionName"] == name
    assert body["runtime"] == "lambda_runtime (Rust)"


def _check_python(res, body, name, event):
    assert body == {
        "runtime": "python",
        "greeting": f"Hello, {event['name']}!",
        "requestId": res["ResponseMetadata"]["RequestId"],
        "functionName": name,
    }


RUNTIME_CASES = {
    "shell-al2023": ("provided.al2023", "shell_code", None, _check_shell),
    "rust-al2": ("provided.al2", "rust_code", "bootstrap", _check_rust),
    "python311": ("python3.11", "python_code", "app.handler", _check_python),
}


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_lifecycle(client, fname, request, case):
    runtime, code_fixture, handler, check = RUNTIME_CASES[case]
    code = request.getfixturevalue(code_fixture)

    cfg = create(client, fname, runtime, code, handler, Description=f"conformance {case}")
    assert cfg["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert cfg["FunctionName"] == fname
    assert cfg["FunctionArn"] == f"arn:aws:lambda:us-east-1:000000000000:function:{fname}"
    assert cfg["Runtime"] == runtime
    # No Handler was given for the shell function: Kindling records "bootstrap" for it.
    assert cfg["Handler"] == (handler or "bootstrap")
    assert cfg["Role"] == ROLE
    assert cfg["Description"] == f"conformance {case}"
    assert cfg["CodeSize"] == len(code)
    assert cfg["CodeSha256"] == code_sha256(code)
    assert cfg["Timeout"] == 3
    assert cfg["MemorySize"] == 128
    assert cfg["Version"] == "$LATEST"
    assert cfg["PackageType"] == "Zip"
    assert cfg["State"] == "Active"
    assert cfg["LastUpdateStatus"] == "Successful"
    assert cfg["Architectures"] == ["x86_64"]
    assert cfg["RevisionId"]
    assert cfg["LastModified"]

    assert fname in list_names(client)

    got = client.get_function(FunctionName=fname)
    assert got["Configuration"]["FunctionName"] == fname
    assert got["Configuration"]["CodeSha256"] == cfg["CodeSha256"]
    assert got["Configuration"]["Runtime"] == runtime
    assert "Location" in got["Code"]
    conf = client.get_function_configuration(FunctionName=fname)
    assert conf["CodeSha256"] == cfg["CodeSha256"]
    assert conf["Handler"] == cfg["Handler"]

    # Two invokes: the first starts an environment, the second reuses it (warm).
    for i in range(2):
        event = {"name": f"{case}-{i}", "i": i, "list": [1, "two", None]}
        res, body = invoke(client, fname, event)
        assert res["StatusCode"] == 200, body
        assert "FunctionError" not in res, body
        assert res["ExecutedVersion"] == "$LATEST"
        check(res, body, fname, event)

    # Invoking by ARN reaches the same function.
    res, body = invoke(client, cfg["FunctionArn"], {"name": "by-arn"})
    assert res["StatusCode"] == 200
    check(res, body, fname, {"name": "by-arn"})

    delete = client.delete_function(FunctionName=fname)
    assert delete["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert_gone(client, fname)


def test_recreate_after_delete_runs_new_code(client, fname, python_code, shell_code):
    """A function deleted and created again under the same name runs its new code, not an idle
    environment of the old one."""
    create(client, fname, "python3.11", python_code, "app.handler")
    _, body = invoke(client, fname, {"name": "old"})
    assert body["runtime"] == "python"
    client.delete_function(FunctionName=fname)
    cfg = create(client, fname, "provided.al2023", shell_code, "bootstrap")
    assert cfg["CodeSha256"] == code_sha256(shell_code)
    res, body = invoke(client, fname, {"name": "new"})
    _check_shell(res, body, fname, {"name": "new"})
    client.delete_function(FunctionName=fname)


def test_list_functions_paginates(client, fname, shell_code):
    names = [f"{fname}-{i}" for i in range(3)]
    for n in names:
        create(client, n, "provided.al2023", shell_code)
    try:
        pages = list(client.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 1}))
        seen = [f["FunctionName"] for p in pages for f in p["Functions"]]
        assert all(len(p["Functions"]) <= 1 for p in pages)
        assert len(seen) == len(set(seen)), f"a function was listed twice: {seen}"
        assert set(names) <= set(seen)
        assert all("NextMarker" in p for p in pages[:-1])
        assert "NextMarker" not in pages[-1]
    finally:
        for n in names:
            client.delete_function(FunctionName=n)


# --- 3. function errors --------------------------------------------------------------------


def test_python_function_error(client, fname, python_code):
    create(client, fname, "python3.11", python_code, "app.fail")
    try:
        res, body = invoke(client, fname, {"why": "because"})
        assert res["StatusCode"] == 200
        assert res["FunctionError"] == "Unhandled"
        assert body["errorType"] == "ValueError"
        assert body["errorMessage"] == "bad value: because"
        assert isinstance(body.get("stackTrace"), list)
        assert body["requestId"] == res["ResponseMetadata"]["RequestId"]
        # The environment survives a handled error: the next invoke works the same way.
        res, body = invoke(client, fname, {"why": "again"})
        assert res["FunctionError"] == "Unhandled"
        assert body["errorMessage"] == "bad value: again"
    finally:
        client.delete_function(FunctionName=fname)


def test_rust_function_error(client, fname, rust_code):
    create(client, fname, "provided.al2", rust_code, "bootstrap")
    try:
        res, body = invoke(client, fname, {"fail": "x"})
        assert res["StatusCode"] == 200
        assert res["FunctionError"] == "Unhandled"
        assert body["errorType"] == "EchoFailure"
        assert body["errorMessage"] == "x"
        # And a good event right after, on the same environment.
        res, body = invoke(client, fname, {"fine": True})
        assert "FunctionError" not in res
        assert body["echo"] == {"fine": True}
    finally:
        client.delete_function(FunctionName=fname)


def test_shell_function_error(client, fname, shell_code):
    create(client, fname, "provided.al2023", shell_code)
    try:
        # A JSON error document comes back to the caller as the runtime posted it.
        res, body = invoke(client, fname, {"mode": "fail-json"})
        assert res["StatusCode"] == 200
        assert res["FunctionError"] == "Unhandled"
        assert body == {"errorMessage": "shell says no", "errorType": "MyError"}
        # A body that is not JSON is wrapped, with the type from the error-type header.
        res, body = invoke(client, fname, {"mode": "fail-text"})
        assert res["FunctionError"] == "Unhandled"
        assert body == {"errorMessage": "plain text failure", "errorType": "Function.MyError"}
        res, body = invoke(client, fname, {"mode": "ok"})
        assert "FunctionError" not in res
        _check_shell(res, body, fname, {"mode": "ok"})
    finally:
        client.delete_function(FunctionName=fname)


def test_bootstrap_that_exits_is_a_function_error(client, fname):
    """A runtime that dies before asking for work: Lambda answers 200 + FunctionError
    with a Runtime.* error type (not an API error)."""
    code = make_zip({"bootstrap": "#!/bin/sh\necho dying >&2\nexit 3\n"}, executable=("bootstrap",))
    create(client, fname, "provided.al2023", code)
    try:
        res, body = invoke(client, fname, {})
        assert res["StatusCode"] == 200
        assert res["FunctionError"] == "Unhandled"
        assert body["errorType"] == "Runtime.ExitError"
        assert "exit status 3" in body["errorMessage"]
    finally:
        client.delete_function(FunctionName=fname)


def test_function_timeout(client, fname, python_code):
    """A handler running past Timeout: 200 + Unhandled, errorType Sandbox.Timedout, and the
    next invoke works (on a fresh environment)."""
    create(client, fname, "python3.11", python_code, "app.sleep", Timeout=1)
    try:
        started = time.monotonic()
        res, body = invoke(client, fname, {"seconds": 5})
        elapsed = time.monotonic() - started
        assert res["StatusCode"] == 200
        assert res["FunctionError"] == "Unhandled"
        assert body["errorType"] == "Sandbox.Timedout"
        assert "Task timed out after 1.00 seconds" in body["errorMessage"]
        assert res["ResponseMetadata"]["RequestId"] in body["errorMessage"]
        assert elapsed < 4, f"the timeout took {elapsed:.1f} s to be reported"
        res, body = invoke(client, fname, {"seconds": 0})
        assert "FunctionError" not in res, body
        assert body["slept"] == 0
    finally:
        client.delete_function(FunctionName=fname)


def test_response_too_large(client, fname, python_code):
    create(client, fname, "python3.11", python_code, "app.too_big")
    try:
        res, body = invoke(client, fname, {})
        assert res["StatusCode"] == 200
        assert res["FunctionError"] == "Unhandled"
        assert body["errorType"] == "Function.ResponseSizeTooLarge"
        assert "Response payload size exceeded maximum allowed payload size" in body["errorMessage"]
    finally:
        client.delete_function(FunctionName=fname)


@pytest.mark.parametrize(
    "handler,error_type,needle",
    [
        ("missing_module.handler", "Runtime.ImportModuleError", "missing_module"),
        ("app.no_such_function", "Runtime.HandlerNotFound", "no_such_function"),
    ],
    ids=["import-error", "handler-not-found"],
)
def test_python_init_errors(client, fname, python_code, handler, error_type, needle):
    """awslambdaric reports these through /runtime/init/error: still a 200 + Unhandled invoke."""
    create(client, fname, "python3.11", python_code, handler)
    try:
        for _ in range(2):  # and again: the broken environment is not reused as if healthy
            res, body = invoke(client, fname, {})
            assert res["StatusCode"] == 200
            assert res["FunctionError"] == "Unhandled"
            assert body["errorType"] == error_type
            assert needle in body["errorMessage"]
    finally:
        client.delete_function(FunctionName=fname)


@pytest.mark.parametrize(
    "files,executable",
    [
        ({"README.txt": "no bootstrap here"}, ()),
        ({"bootstrap": "#!/bin/sh\nexit 0\n"}, ()),
    ],
    ids=["missing", "not-executable"],
)
def test_bad_bootstrap_is_invalid_entrypoint(client, fname, files, executable):
    create(client, fname, "provided.al2023", make_zip(files, executable=executable))
    try:
        res, body = invoke(client, fname, {})
        assert res["StatusCode"] == 200
        assert res["FunctionError"] == "Unhandled"
        assert body["errorType"] == "Runtime.InvalidEntrypoint"
    finally:
        client.delete_function(FunctionName=fname)


# --- 4. API errors -------------------------------------------------------------------------


def test_invoke_unknown_function(client):
    with pytest.raises(ClientError) as e:
        client.invoke(FunctionName="no-such-function-anywhere", Payload=b"{}")
    code, status, message = error_of(e)
    assert (code, status) == ("ResourceNotFoundException", 404)
    assert "no-such-function-anywhere" in message
    assert e.value.response["ResponseMetadata"]["RequestId"]


@pytest.mark.parametrize(
    "call",
    ["get_function", "get_function_configuration", "delete_function"],
)
def test_unknown_function_control_plane(client, call):
    with pytest.raises(ClientError) as e:
        getattr(client, call)(FunctionName="no-such-function-anywhere")
    assert error_of(e)[:2] == ("ResourceNotFoundException", 404)


def test_create_duplicate(client, fname, shell_code):
    create(client, fname, "provided.al2023", shell_code)
    try:
        with pytest.raises(ClientError) as e:
            create(client, fname, "provided.al2023", shell_code)
        assert error_of(e)[:2] == ("ResourceConflictException", 409)
        with pytest.raises(client.exceptions.ResourceConflictException):
            create(client, fname, "python3.11", shell_code, "app.handler")
        # The original is untouched.
        assert client.get_function_configuration(FunctionName=fname)["Runtime"] == "provided.al2023"
    finally:
        client.delete_function(FunctionName=fname)


IPVE = {"InvalidParameterValueException"}
#: Values outside the API model's ranges and enums: AWS's own answers vary between these two
#: codes (both 400) depending on the operation and the field, so either is accepted.
EITHER = {"InvalidParameterValueException", "ValidationException"}


@pytest.mark.parametrize(
    "runtime,handler,extra,codes,needle",
    [
        ("nodejs20.x", "index.handler", {}, IPVE, "nodejs20.x"),
        ("python3.11", "no_dot_handler", {}, IPVE, "no_dot_handler"),
        ("provided.al2023", None, {"Timeout": 901}, EITHER, "imeout"),
        ("provided.al2023", None, {"MemorySize": 20000}, EITHER, "emorySize"),
        ("provided.al2023", None, {"Environment": {"Variables": {"AWS_REGION": "eu-west-1"}}}, IPVE, "AWS_REGION"),
        ("provided.al2023", None, {"Architectures": ["sparc"]}, EITHER, "sparc"),
    ],
    ids=["unsupported-runtime", "python-handler", "timeout", "memory", "reserved-env", "architecture"],
)
def test_create_invalid_parameters(client, fname, shell_code, runtime, handler, extra, codes, needle):
    with pytest.raises(ClientError) as e:
        create(client, fname, runtime, shell_code, handler, **extra)
    code, status, message = error_of(e)
    assert code in codes and status == 400, (code, status, message)
    assert needle in message
    with pytest.raises(ClientError) as e:
        client.get_function(FunctionName=fname)
    assert error_of(e)[0] == "ResourceNotFoundException"


def test_create_with_a_corrupt_zip(client, fname):
    with pytest.raises(ClientError) as e:
        create(client, fname, "provided.al2023", b"this is not a zip archive")
    assert error_of(e)[:2] == ("InvalidParameterValueException", 400)
    with pytest.raises(ClientError) as e:
        client.get_function(FunctionName=fname)
    assert error_of(e)[0] == "ResourceNotFoundException"


@pytest.fixture(scope="module")
def sizer(client, python_code):
    """A python function that returns the length of event["data"]."""
    name = "conformance-sizer"
    create(client, name, "python3.11", python_code, "app.size")
    yield name
    client.delete_function(FunctionName=name)


def test_payload_over_6mb(client, sizer):
    payload = json.dumps({"data": "x" * MAX_SYNC_PAYLOAD}).encode()
    assert len(payload) > MAX_SYNC_PAYLOAD
    with pytest.raises(ClientError) as e:
        client.invoke(FunctionName=sizer, Payload=payload)
    assert error_of(e)[:2] == ("RequestTooLargeException", 413)
    with pytest.raises(client.exceptions.RequestTooLargeException):
        client.invoke(FunctionName=sizer, Payload=payload)


def test_payload_just_under_6mb_is_accepted(client, sizer):
    n = MAX_SYNC_PAYLOAD - 1024
    res, body = invoke(client, sizer, {"data": "y" * n})
    assert "FunctionError" not in res, body
    assert body == {"length": n}


def test_dry_run(client, sizer):
    res = client.invoke(FunctionName=sizer, InvocationType="DryRun", Payload=b"{}")
    assert res["StatusCode"] == 204
    assert res["Payload"].read() == b""
    with pytest.raises(ClientError) as e:
        client.invoke(FunctionName="no-such-function-anywhere", InvocationType="DryRun")
    assert error_of(e)[:2] == ("ResourceNotFoundException", 404)


@pytest.mark.parametrize("payload", [b"not json", b"{\"unterminated\": ", b"\xff\xfe"])
def test_invalid_json_payload(client, sizer, payload):
    with pytest.raises(ClientError) as e:
        client.invoke(FunctionName=sizer, Payload=payload)
    assert error_of(e)[:2] == ("InvalidRequestContentException", 400)


def test_empty_payload_is_an_empty_object(client, sizer):
    res = client.invoke(FunctionName=sizer)  # boto3 sends no body at all
    assert res["StatusCode"] == 200
    assert json.loads(res["Payload"].read()) == {"length": 0}


def test_any_json_payload(client, fname, shell_code):
    """Any JSON value is a valid event, not only objects; UTF-8 passes through unchanged."""
    create(client, fname, "provided.al2023", shell_code)
    try:
        for event in ([1, 2, 3], "a string", 42, None, {"unicode": "héllo ☃ 𝄞"}):
            res, body = invoke(client, fname, Payload=json.dumps(event, ensure_ascii=False).encode())
            assert "FunctionError" not in res, body
            assert body["event"] == event
    finally:
        client.delete_function(FunctionName=fname)


def test_qualifiers(client, fname, python_code):
    cfg = create(client, fname, "python3.11", python_code, "app.handler")
    try:
        for kwargs in ({"FunctionName": fname, "Qualifier": "$LATEST"},
                       {"FunctionName": f"{fname}:$LATEST"},
                       {"FunctionName": f"{cfg['FunctionArn']}:$LATEST"},
                       {"FunctionName": f"000000000000:function:{fname}"}):
            res = client.invoke(Payload=b'{"name": "q"}', **kwargs)
            body = json.loads(res["Payload"].read())
            assert "FunctionError" not in res, (kwargs, body)
            assert body["functionName"] == fname
        assert client.get_function(FunctionName=fname, Qualifier="$LATEST")["Configuration"]["FunctionName"] == fname
        # Kindling has no published versions or aliases: any other qualifier does not exist.
        for q in ("1", "live"):
            with pytest.raises(ClientError) as e:
                client.invoke(FunctionName=fname, Qualifier=q, Payload=b"{}")
            assert error_of(e)[:2] == ("ResourceNotFoundException", 404)
    finally:
        client.delete_function(FunctionName=fname)


@pytest.mark.parametrize("operation", ["invoke", "create_function"])
def test_malformed_function_name_is_a_validation_error(client, shell_code, operation):
    with pytest.raises(ClientError) as e:
        if operation == "invoke":
            client.invoke(FunctionName="not a valid name", Payload=b"{}")
        else:
            create(client, "not a valid name", "provided.al2023", shell_code)
    code, status, message = error_of(e)
    assert status == 400
    assert "1 validation error detected" in message
    assert code == "ValidationException"


def test_client_context(client, fname, python_code):
    create(client, fname, "python3.11", python_code, "app.client_context")
    try:
        ctx = {
            "custom": {"tenant": "t-1"},
            "env": {"platform": "test"},
            "client": {
                "installation_id": "inst", "app_title": "title", "app_version_name": "1.0",
                "app_version_code": "100", "app_package_name": "pkg",
            },
        }
        res, body = invoke(client, fname, {}, ClientContext=base64.b64encode(json.dumps(ctx).encode()).decode())
        assert "FunctionError" not in res, body
        assert body["clientContext"] == ctx
        res, body = invoke(client, fname, {})
        assert body["clientContext"] is None
        # Not base64 of a JSON object: refused before the function runs.
        for bad in ("%%% not base64 %%%", base64.b64encode(b"[1, 2]").decode()):
            with pytest.raises(ClientError) as e:
                client.invoke(FunctionName=fname, ClientContext=bad, Payload=b"{}")
            assert error_of(e)[:2] == ("InvalidRequestContentException", 400)
    finally:
        client.delete_function(FunctionName=fname)


def test_log_type_tail(client, fname, python_code):
    """LogType=Tail: X-Amz-Log-Result is base64 of the last 4 KB of this invocation's log,
    START .. the function's own output .. END, REPORT."""
    create(client, fname, "python3.11", python_code, "app.client_context")
    try:
        for cold in (True, False):
            res, body = invoke(client, fname, {}, LogType="Tail")
            assert res["StatusCode"] == 200
            assert body == {"clientContext": None}
            assert "LogResult" in res, "no X-Amz-Log-Result header"
            raw = base64.b64decode(res["LogResult"])
            assert len(raw) <= 4096
            log = raw.decode()
            rid = res["ResponseMetadata"]["RequestId"]
            lines = log.splitlines()
            assert lines[0] == f"START RequestId: {rid} Version: $LATEST", log
            assert "client_context handler was here" in lines
            assert lines[-2] == f"END RequestId: {rid}", log
            assert lines[-1].startswith(f"REPORT RequestId: {rid}\tDuration: "), log
            assert "\tBilled Duration: " in lines[-1] and "\tMemory Size: 128 MB" in lines[-1]
            assert ("\tInit Duration: " in lines[-1]) == cold, log
        # Without LogType (or with None) there is no log result.
        res, _ = invoke(client, fname, {})
        assert "LogResult" not in res
    finally:
        client.delete_function(FunctionName=fname)


def test_invalid_invocation_and_log_types(client, sizer):
    for kwargs in ({"InvocationType": "Sometimes"}, {"LogType": "Everything"}):
        with pytest.raises(ClientError) as e:
            client.invoke(FunctionName=sizer, Payload=b"{}", **kwargs)
        code, status, _ = error_of(e)
        assert status == 400 and code in EITHER, (kwargs, code)


def test_concurrent_invokes(client, fname, python_code):
    """Overlapping invokes of one function run side by side (one environment each), as on
    Lambda: four 1 s invokes at once finish well before 4 s."""
    create(client, fname, "python3.11", python_code, "app.sleep", Timeout=10)
    try:
        invoke(client, fname, {"seconds": 0})  # one warm environment to start from

        def one(_):
            return invoke(client, fname, {"seconds": 1})

        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        elapsed = time.monotonic() - started
        for res, body in results:
            assert res["StatusCode"] == 200 and "FunctionError" not in res, body
            assert body["requestId"] == res["ResponseMetadata"]["RequestId"]
        assert len({body["requestId"] for _, body in results}) == 4
        assert elapsed < 3.5, f"4 concurrent 1 s invokes took {elapsed:.1f} s: they ran one at a time"
    finally:
        client.delete_function(FunctionName=fname)


# --- 5. environment ------------------------------------------------------------------------


def test_environment_variables(client, fname, python_code):
    variables = {
        "GREETING": "hello world",
        "SYMBOLS": "a=b&c;d 'quoted' \"double\" $HOME",
        "UNICODE": "héllo ✓",
    }
    cfg = create(
        client,
        fname,
        "python3.11",
        python_code,
        "app.environment",
        MemorySize=256,
        Timeout=30,
        Environment={"Variables": variables},
    )
    assert cfg["Environment"]["Variables"] == variables
    assert cfg["MemorySize"] == 256
    assert cfg["Timeout"] == 30
    assert client.get_function_configuration(FunctionName=fname)["Environment"]["Variables"] == variables
    try:
        names = list(variables) + [
            "AWS_LAMBDA_FUNCTION_NAME",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            "AWS_LAMBDA_FUNCTION_VERSION",
            "AWS_EXECUTION_ENV",
            "_HANDLER",
            "LAMBDA_TASK_ROOT",
            "AWS_LAMBDA_RUNTIME_API",
        ]
        res, body = invoke(client, fname, {"names": names})
        assert "FunctionError" not in res, body
        env = body["env"]
        for k, v in variables.items():
            assert env[k] == v, k
        assert env["AWS_LAMBDA_FUNCTION_NAME"] == fname
        assert env["AWS_REGION"] == "us-east-1"
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
        assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
        assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
        assert env["AWS_EXECUTION_ENV"] == "AWS_Lambda_python3.11"
        assert env["_HANDLER"] == "app.environment"
        assert env["LAMBDA_TASK_ROOT"]
        assert env["AWS_LAMBDA_RUNTIME_API"]

        assert body["requestId"] == res["ResponseMetadata"]["RequestId"]
        assert body["functionName"] == fname
        assert int(body["memoryLimitInMB"]) == 256
        assert body["invokedFunctionArn"] == cfg["FunctionArn"]
        assert 0 < body["remainingTimeMs"] <= 30_000

        # A second invoke gets a new request id, and the context follows it.
        res2, body2 = invoke(client, fname, {"names": []})
        assert body2["requestId"] == res2["ResponseMetadata"]["RequestId"]
        assert body2["requestId"] != body["requestId"]
    finally:
        client.delete_function(FunctionName=fname)


def test_agent_environment_does_not_leak(client, fname, python_code):
    """The function sees Lambda's variables, not the agent's: the agent runs with KINDLING_LOG
    set (see kindling_agent.Agent), which must not reach the function."""
    create(client, fname, "python3.11", python_code, "app.environment")
    try:
        res, body = invoke(client, fname, {"names": ["KINDLING_LOG"]})
        assert "FunctionError" not in res, body
        assert body["env"] == {"KINDLING_LOG": None}
    finally:
        client.delete_function(FunctionName=fname)


# --- 6. persistence ------------------------------------------------------------------------


def test_functions_survive_a_restart(start_agent, tmp_path, python_code, shell_code):
    data = tmp_path / "persist"
    first = start_agent(data)
    c1 = first.client()
    cfg_py = create(
        c1, "persisted-py", "python3.11", python_code, "app.environment",
        MemorySize=512, Environment={"Variables": {"KEPT": "yes"}},
    )
    cfg_sh = create(c1, "persisted-sh", "provided.al2023", shell_code)
    create(c1, "deleted-before-restart", "provided.al2023", shell_code)
    c1.delete_function(FunctionName="deleted-before-restart")
    res, _ = invoke(c1, "persisted-py", {"names": []})
    assert res["StatusCode"] == 200
    first.stop_ok()

    second = start_agent(data)
    c2 = second.client()
    assert sorted(list_names(c2)) == ["persisted-py", "persisted-sh"]
    for cfg in (cfg_py, cfg_sh):
        got = c2.get_function_configuration(FunctionName=cfg["FunctionName"])
        for key in ("FunctionArn", "Runtime", "Handler", "CodeSize", "CodeSha256", "MemorySize",
                    "Timeout", "Role", "LastModified"):
            assert got[key] == cfg[key], key
    assert c2.get_function_configuration(FunctionName="persisted-py")["Environment"]["Variables"] == {"KEPT": "yes"}

    res, body = invoke(c2, "persisted-py", {"names": ["KEPT", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"]})
    assert "FunctionError" not in res, body
    assert body["env"] == {"KEPT": "yes", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512"}
    res, body = invoke(c2, "persisted-sh", {"after": "restart"})
    _check_shell(res, body, "persisted-sh", {"after": "restart"})
    with pytest.raises(c2.exceptions.ResourceNotFoundException):
        c2.get_function(FunctionName="deleted-before-restart")
    second.stop_ok()


def test_deleted_example_stays_deleted_after_restart(start_agent, tmp_path):
    data = tmp_path / "examples"
    first = start_agent(data, examples=True)
    c1 = first.client()
    assert {"hello-python", "echo-rust"} <= set(list_names(c1))
    c1.delete_function(FunctionName="hello-python")
    first.stop_ok()

    second = start_agent(data, examples=True)
    names = list_names(second.client())
    assert "hello-python" not in names
    assert "echo-rust" in names


# --- asynchronous invocation (InvocationType Event) and its configuration -----------------

#: Lambda's asynchronous invoke payload limit.
MAX_ASYNC_PAYLOAD = 1 * MB


def _queue_messages(agent, queue_name):
    """The messages of a Kindling local queue (an arn:aws:sqs destination), via its own route."""
    import urllib.request

    with urllib.request.urlopen(f"{agent.url}/kindling/v1/queues/{queue_name}/messages") as r:
        return json.loads(r.read())["Messages"]


def test_event_invoke_config_and_async_invoke(agent, client, fname, shell_code):
    create(client, fname, "provided.al2023", shell_code)
    queue_name = f"{fname}-ok"[:80]
    destination = f"arn:aws:sqs:us-east-1:000000000000:{queue_name}"
    try:
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            client.get_function_event_invoke_config(FunctionName=fname)
        put = client.put_function_event_invoke_config(
            FunctionName=fname,
            MaximumRetryAttempts=0,
            DestinationConfig={"OnSuccess": {"Destination": destination}},
        )
        assert put["FunctionArn"].endswith(f":function:{fname}:$LATEST")
        assert put["MaximumRetryAttempts"] == 0
        assert put["DestinationConfig"]["OnSuccess"]["Destination"] == destination
        assert put["LastModified"].year >= 2024  # botocore parsed the timestamp
        got = client.get_function_event_invoke_config(FunctionName=fname)
        assert got["DestinationConfig"] == put["DestinationConfig"]
        upd = client.update_function_event_invoke_config(FunctionName=fname, MaximumEventAgeInSeconds=600)
        assert (upd["MaximumRetryAttempts"], upd["MaximumEventAgeInSeconds"]) == (0, 600)
        listed = client.list_function_event_invoke_configs(FunctionName=fname)["FunctionEventInvokeConfigs"]
        assert [c["MaximumEventAgeInSeconds"] for c in listed] == [600]

        with pytest.raises(ClientError) as e:
            client.put_function_event_invoke_config(FunctionName=fname, MaximumRetryAttempts=2,
                                                    MaximumEventAgeInSeconds=21601)
        assert error_of(e)[:2] == ("ValidationException", 400)

        event = {"async": True, "n": 7}
        res = client.invoke(FunctionName=fname, InvocationType="Event", Payload=json.dumps(event))
        assert res["StatusCode"] == 202
        assert res["Payload"].read() == b""
        request_id = res["ResponseMetadata"]["RequestId"]
        deadline = time.monotonic() + 20
        while not (msgs := _queue_messages(agent, queue_name)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(msgs) == 1, agent.log()
        record = json.loads(msgs[0]["Body"])
        assert record["requestContext"]["condition"] == "Success"
        assert record["requestContext"]["requestId"] == request_id
        assert record["requestPayload"] == event
        assert record["responsePayload"]["event"] == event
        assert record["responsePayload"]["requestId"] == request_id

        with pytest.raises(client.exceptions.RequestTooLargeException):
            client.invoke(FunctionName=fname, InvocationType="Event",
                          Payload=json.dumps({"data": "x" * MAX_ASYNC_PAYLOAD}))

        client.delete_function_event_invoke_config(FunctionName=fname)
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            client.get_function_event_invoke_config(FunctionName=fname)
    finally:
        client.delete_function(FunctionName=fname)


# --- concurrency -----------------------------------------------------------------------------


def test_function_concurrency_put_get_delete(client, fname, shell_code):
    create(client, fname, "provided.al2023", shell_code)
    try:
        assert "ReservedConcurrentExecutions" not in client.get_function_concurrency(FunctionName=fname)
        res = client.put_function_concurrency(FunctionName=fname, ReservedConcurrentExecutions=3)
        assert res["ReservedConcurrentExecutions"] == 3
        assert client.get_function_concurrency(FunctionName=fname)["ReservedConcurrentExecutions"] == 3
        assert client.get_function(FunctionName=fname)["Concurrency"] == {"ReservedConcurrentExecutions": 3}

        # Far over the host's limit: Lambda's refusal, as an InvalidParameterValueException.
        with pytest.raises(client.exceptions.InvalidParameterValueException) as e:
            client.put_function_concurrency(FunctionName=fname, ReservedConcurrentExecutions=100000)
        assert "UnreservedConcurrentExecution" in error_of(e)[2]

        # A reservation of 0 throttles every invoke, with Lambda's reason.
        client.put_function_concurrency(FunctionName=fname, ReservedConcurrentExecutions=0)
        with pytest.raises(client.exceptions.TooManyRequestsException) as e:
            invoke(client, fname, {"x": 1})
        assert error_of(e)[:2] == ("TooManyRequestsException", 429)
        assert e.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"

        client.delete_function_concurrency(FunctionName=fname)
        assert "ReservedConcurrentExecutions" not in client.get_function_concurrency(FunctionName=fname)
        assert "Concurrency" not in client.get_function(FunctionName=fname)
        res, body = invoke(client, fname, {"x": 1})
        assert res["StatusCode"] == 200 and "FunctionError" not in res
    finally:
        client.delete_function(FunctionName=fname)


def test_provisioned_concurrency_on_latest(client, fname, shell_code):
    create(client, fname, "provided.al2023", shell_code)
    try:
        with pytest.raises(client.exceptions.ProvisionedConcurrencyConfigNotFoundException):
            client.get_provisioned_concurrency_config(FunctionName=fname, Qualifier="$LATEST")
        res = client.put_provisioned_concurrency_config(
            FunctionName=fname, Qualifier="$LATEST", ProvisionedConcurrentExecutions=1)
        assert res["RequestedProvisionedConcurrentExecutions"] == 1
        assert res["Status"] in ("IN_PROGRESS", "READY")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            cfg = client.get_provisioned_concurrency_config(FunctionName=fname, Qualifier="$LATEST")
            if cfg["Status"] == "READY":
                break
            time.sleep(0.1)
        assert cfg["Status"] == "READY"
        assert cfg["AllocatedProvisionedConcurrentExecutions"] == 1
        listed = client.list_provisioned_concurrency_configs(FunctionName=fname)
        assert [c["FunctionArn"].rsplit(":", 1)[1] for c in listed["ProvisionedConcurrencyConfigs"]] == ["$LATEST"]
        client.delete_provisioned_concurrency_config(FunctionName=fname, Qualifier="$LATEST")
        assert client.list_provisioned_concurrency_configs(FunctionName=fname)["ProvisionedConcurrencyConfigs"] == []
    finally:
        client.delete_function(FunctionName=fname)


# --- response streaming (InvokeWithResponseStream) ------------------------------------------


def _stream_events(client, name, event, **extra):
    """Invokes with a streamed response; returns (response, chunk bytes, InvokeComplete).
    botocore parses the event stream itself (prelude and message CRCs included)."""
    res = client.invoke_with_response_stream(FunctionName=name, Payload=json.dumps(event), **extra)
    chunks, complete = [], None
    for ev in res["EventStream"]:
        assert complete is None, "nothing may follow InvokeComplete"
        if "PayloadChunk" in ev:
            chunks.append(ev["PayloadChunk"]["Payload"])
        elif "InvokeComplete" in ev:
            complete = ev["InvokeComplete"]
    assert complete is not None, "the stream must end with InvokeComplete"
    return res, b"".join(chunks), complete


def test_invoke_with_response_stream(client, fname):
    from kindling_agent import kindling_bin

    binary = kindling_bin().parent / "echo-rust-streaming"
    code = make_zip({"bootstrap": binary.read_bytes()}, executable=("bootstrap",))
    create(client, fname, "provided.al2023", code, "bootstrap")
    try:
        res, body, complete = _stream_events(client, fname, {"chunks": 3}, LogType="Tail")
        assert res["StatusCode"] == 200
        assert res["ExecutedVersion"] == "$LATEST"
        assert res["ResponseStreamContentType"] == "application/vnd.amazon.eventstream"
        # lambda_runtime's HTTP-integration prelude, then the function's chunks.
        assert body.endswith(b"\0" * 8 + b"chunk 0\nchunk 1\nchunk 2\n")
        assert "ErrorCode" not in complete
        assert b"REPORT RequestId" in base64.b64decode(complete["LogResult"])
        # A crash mid-stream: the chunks sent so far, then the error in InvokeComplete.
        _, body, complete = _stream_events(client, fname, {"chunks": 3, "exit_after": 3})
        assert complete["ErrorCode"] == "Runtime.ExitError"
        assert "exit status 7" in complete["ErrorDetails"]
    finally:
        client.delete_function(FunctionName=fname)


def test_invoke_with_response_stream_of_a_buffered_function(client, fname, rust_code):
    create(client, fname, "provided.al2", rust_code, "bootstrap")
    try:
        _, body, complete = _stream_events(client, fname, {"k": "v"})
        assert json.loads(body)["echo"] == {"k": "v"}
        assert complete == {}
    finally:
        client.delete_function(FunctionName=fname)


def test_invoke_with_response_stream_unknown_function(client):
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke_with_response_stream(FunctionName="no-such-function", Payload=b"{}")
