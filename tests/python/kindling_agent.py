"""Helpers for the boto3 conformance tests: run a real `kindling serve`, build function zips.

The agent is the binary from `cargo build --workspace` (`<repo>/target/debug/kindling`, or
`$KINDLING_BIN`). It prints one stdout line, `kindling: listening on http://127.0.0.1:PORT`,
once it accepts requests; its log goes to stderr, which is written to a file next to the data
dir so that a full pipe can never block it and a failing test can show it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import boto3
import botocore.config

REPO = Path(__file__).resolve().parents[2]

#: How long the agent may take to print its listening line.
START_TIMEOUT_S = 30
#: How long the agent may take to exit after SIGINT (the brief: exit 0 within 15 s).
STOP_TIMEOUT_S = 15
#: What every test passes as Role (boto3 requires one; Kindling stores it unchecked).
ROLE = "arn:aws:iam::000000000000:role/lambda"
LISTEN_PREFIX = "kindling: listening on "


def kindling_bin() -> Path:
    override = os.environ.get("KINDLING_BIN")
    p = Path(override) if override else REPO / "target" / "debug" / "kindling"
    if not p.is_file():
        raise RuntimeError(
            f"{p} is missing: build the workspace first (`cargo build --workspace`) or set KINDLING_BIN"
        )
    return p


def echo_rust_bin() -> Path:
    """The echo-rust example binary: `$KINDLING_ECHO_RUST`, else beside the kindling binary
    (where the agent itself looks for it when deploying the bundled examples)."""
    override = os.environ.get("KINDLING_ECHO_RUST")
    p = Path(override) if override else kindling_bin().parent / "echo-rust"
    if not p.is_file():
        raise RuntimeError(f"{p} is missing: build it with `cargo build --workspace`")
    return p


def tail(path: Path, limit: int = 12_000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


class Agent:
    """One running `kindling serve` with its own data dir."""

    #: Every agent started in this pytest process, so failing tests can show their logs.
    started: list["Agent"] = []

    def __init__(self, data_dir: Path, *, examples: bool = False, log_name: str = "agent"):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.{log_name}.{time.time_ns()}.log"
        self.examples = examples
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._start()

    def _start(self) -> None:
        cmd = [
            str(kindling_bin()),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.data_dir),
            "--python",
            sys.executable,
            # The default backend is the microvm one where /dev/kvm works; the conformance
            # suite checks the API, which both backends share, on processes.
            "--backend",
            "process",
        ]
        if not self.examples:
            cmd.append("--no-examples")
        env = dict(os.environ)
        env.setdefault("KINDLING_LOG", "info,kindling::function=debug")
        env["NO_COLOR"] = "1"  # plain text in the log file
        # The agent reads AWS_REGION as its default region: pin it to what the tests expect.
        env["AWS_REGION"] = "us-east-1"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        Agent.started.append(self)
        lines: queue.Queue[bytes | None] = queue.Queue()

        def pump(stdout=self.proc.stdout) -> None:
            # Reads stdout to the end so the agent never blocks on a full pipe.
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                self.kill()
                raise RuntimeError(
                    f"kindling did not print its listening line within {START_TIMEOUT_S} s; "
                    f"log:\n{tail(self.log_path)}"
                ) from None
            if line is None:
                rc = self.proc.wait()
                raise RuntimeError(f"kindling exited ({rc}) before listening; log:\n{tail(self.log_path)}")
            text = line.decode(errors="replace").strip()
            if text.startswith(LISTEN_PREFIX):
                self.url = text[len(LISTEN_PREFIX):].strip()
                return
            # Anything else on stdout breaks the documented contract (exactly one line).
            self.kill()
            raise AssertionError(f"unexpected stdout line before the listening line: {text!r}")

    def client(self):
        return lambda_client(self.url)

    def log(self) -> str:
        return tail(self.log_path)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        """SIGINT, then waits (at most STOP_TIMEOUT_S) for the exit status, which it returns."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"kindling did not exit within {STOP_TIMEOUT_S} s of SIGINT; log:\n{self.log()}"
                ) from None
        self.returncode = self.proc.returncode
        return self.returncode

    def stop_ok(self) -> None:
        rc = self.stop()
        assert rc == 0, f"kindling exited with {rc} after SIGINT (expected 0); log:\n{self.log()}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def lambda_client(url: str):
    return boto3.client(
        "lambda",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(
            retries={"max_attempts": 1},
            read_timeout=60,
            connect_timeout=10,
        ),
    )


# --- function code -------------------------------------------------------------------------

EXECUTABLE = 0o100755 << 16
REGULAR = 0o100644 << 16


def make_zip(files: dict[str, bytes | str], executable: tuple[str, ...] = ()) -> bytes:
    """A deflated zip of `files` (name -> content); names in `executable` get mode 0755."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so external_attr carries the mode
            info.external_attr = EXECUTABLE if name in executable else REGULAR
            z.writestr(info, data.encode() if isinstance(data, str) else data)
    return buf.getvalue()


def code_sha256(zip_bytes: bytes) -> str:
    """Lambda's CodeSha256: base64 of the SHA-256 of the deployment package."""
    return base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode()


#: A provided.al2023 runtime in POSIX sh + curl, as in Lambda's custom runtime tutorial.
#: It answers {"runtime": "sh", "requestId", "functionName", "event"}. An event holding
#: "fail-json" posts a JSON error document to /error; one holding "fail-text" posts plain text;
#: both with `Lambda-Runtime-Function-Error-Type: Function.MyError`.
SHELL_BOOTSTRAP = r"""#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
HEADERS="$(mktemp)"
while true; do
  EVENT="$(curl -sS -D "$HEADERS" "$API/invocation/next")"
  REQUEST_ID="$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | cut -d: -f2 | tr -d '[:space:]')"
  case "$EVENT" in
    *fail-json*)
      curl -sS -o /dev/null -X POST "$API/invocation/$REQUEST_ID/error" \
        -H 'Lambda-Runtime-Function-Error-Type: Function.MyError' \
        -d '{"errorMessage": "shell says no", "errorType": "MyError"}'
      ;;
    *fail-text*)
      curl -sS -o /dev/null -X POST "$API/invocation/$REQUEST_ID/error" \
        -H 'Lambda-Runtime-Function-Error-Type: Function.MyError' \
        --data-binary 'plain text failure'
      ;;
    *)
      curl -sS -o /dev/null -X POST "$API/invocation/$REQUEST_ID/response" \
        --data-binary "{\"runtime\": \"sh\", \"requestId\": \"$REQUEST_ID\", \"functionName\": \"$AWS_LAMBDA_FUNCTION_NAME\", \"event\": $EVENT}"
      ;;
  esac
done
"""

#: A python3.11 handler module (app.py): greets, fails on demand, reports its environment.
PYTHON_APP = '''
import os


def handler(event, context):
    return {
        "runtime": "python",
        "greeting": "Hello, %s!" % event.get("name", "world"),
        "requestId": context.aws_request_id,
        "functionName": context.function_name,
    }


def fail(event, context):
    raise ValueError("bad value: %s" % event.get("why", "no reason"))


def environment(event, context):
    names = event.get("names", [])
    return {
        "env": {n: os.environ.get(n) for n in names},
        "requestId": context.aws_request_id,
        "functionName": context.function_name,
        "memoryLimitInMB": context.memory_limit_in_mb,
        "invokedFunctionArn": context.invoked_function_arn,
        "remainingTimeMs": context.get_remaining_time_in_millis(),
    }


def size(event, context):
    return {"length": len(event.get("data", ""))}


def sleep(event, context):
    import time

    time.sleep(event.get("seconds", 1))
    return {"slept": event.get("seconds", 1), "requestId": context.aws_request_id}


def too_big(event, context):
    return "x" * (7 * 1024 * 1024)


def client_context(event, context):
    print("client_context handler was here")
    cc = context.client_context
    if cc is None:
        return {"clientContext": None}
    client = None
    if cc.client is not None:
        fields = ("installation_id", "app_title", "app_version_name", "app_version_code", "app_package_name")
        client = {f: getattr(cc.client, f) for f in fields}
    return {"clientContext": {"custom": cc.custom, "env": cc.env, "client": client}}
'''


def shell_zip() -> bytes:
    return make_zip({"bootstrap": SHELL_BOOTSTRAP}, executable=("bootstrap",))


def python_zip() -> bytes:
    return make_zip({"app.py": PYTHON_APP})
