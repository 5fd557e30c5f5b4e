"""Fixtures: real `kindling serve` agents and boto3 Lambda clients pointed at them.

- `agent` / `client`: one agent for the whole session, without the bundled examples; tests
  give their functions unique names, so they do not see each other.
- `examples_agent` / `examples_client`: a second session agent, with the bundled examples.
- `start_agent`: a factory for agents that live for one test (e.g. restart on a data dir).

Every agent is stopped with SIGINT and must exit 0 within 15 s. A failing test gets the logs
of the agents that were running during it appended to its report.
"""

from __future__ import annotations

import uuid

import pytest

from kindling_agent import Agent, echo_rust_bin, make_zip, python_zip, shell_zip


@pytest.fixture(scope="session")
def agent(tmp_path_factory):
    a = Agent(tmp_path_factory.mktemp("agent") / "data")
    yield a
    a.stop_ok()


@pytest.fixture(scope="session")
def client(agent):
    return agent.client()


@pytest.fixture(scope="session")
def examples_agent(tmp_path_factory):
    a = Agent(tmp_path_factory.mktemp("examples") / "data", examples=True, log_name="examples")
    yield a
    a.stop_ok()


@pytest.fixture(scope="session")
def examples_client(examples_agent):
    return examples_agent.client()


@pytest.fixture
def start_agent(tmp_path):
    """`start_agent(data_dir=None, examples=False)` starts an agent stopped (exit 0) at teardown
    unless the test stopped it already."""
    agents: list[Agent] = []

    def start(data_dir=None, examples=False) -> Agent:
        a = Agent(data_dir or tmp_path / "data", examples=examples, log_name=f"agent{len(agents)}")
        agents.append(a)
        return a

    yield start
    for a in agents:
        if a.running:
            a.stop_ok()


@pytest.fixture
def fname(request):
    """A unique function name for this test (a prefix from the test name, plus random hex)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def shell_code() -> bytes:
    return shell_zip()


@pytest.fixture(scope="session")
def python_code() -> bytes:
    return python_zip()


@pytest.fixture(scope="session")
def rust_code() -> bytes:
    """The echo-rust binary zipped as an executable `bootstrap` (built once per session)."""
    return make_zip({"bootstrap": echo_rust_bin().read_bytes()}, executable=("bootstrap",))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_FIRST_AGENT] = len(Agent.started)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A failing phase shows the logs of the agents still running and of those this test started.
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        first = item.stash.get(_FIRST_AGENT, len(Agent.started))
        for i, a in enumerate(Agent.started):
            if a.running or i >= first:
                report.sections.append((f"kindling log ({a.log_path.name})", a.log()))


_FIRST_AGENT = pytest.StashKey[int]()
