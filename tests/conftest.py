from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import Phase, settings

# -- Hypothesis profiles -----------------------------------------------------------------------
# ci:       chosen when the environment has CI set (.ci/run exports CI=true): derandomized, no example
#           database, no deadline, fixed example counts, so a red CI means a regression, never luck.
# dev:      the default for local runs: random exploration, saved counterexamples.
# thorough: for a local hunt, `HYPOTHESIS_PROFILE=thorough pytest ...`: 2,000 examples, every phase.
# A test's own @settings(max_examples=...) wins over the profile's count; it stays a fixed number.
# Every counterexample ever found is pinned on its test with @example.
settings.register_profile("ci", derandomize=True, max_examples=200, deadline=None, database=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None, phases=list(Phase), print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples" / "real"


@pytest.fixture
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip("../shared/samples/real is not beside the repository")
    return SAMPLES


# -- Azurite -----------------------------------------------------------------------------------
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

# Azurite's published development account key (documented by Microsoft; not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class Azurite:
    """A running Azurite: the one .ci/run started, or one this fixture starts and stops."""

    def __init__(
        self,
        connection_string: str,
        process: subprocess.Popen[bytes] | None = None,
        ports: dict[str, int] | None = None,
        location: str | None = None,
    ):
        self.connection_string = connection_string
        self.process = process
        self.ports = ports or {}
        self.location = location

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def start(self) -> None:
        """Restart on the same ports; a private Azurite keeps its data on disk across restarts."""
        assert self.process is not None, "only a fixture-started Azurite can be restarted"
        self.process = _spawn(self.ports, self.location)


def _azurite_binary() -> str | None:
    local = REPO / ".tools" / "node_modules" / ".bin" / "azurite"
    if local.exists():
        return str(local)
    return shutil.which("azurite")


def _spawn(ports: dict[str, int], location: str | None = None) -> subprocess.Popen[bytes]:
    binary = _azurite_binary()
    assert binary is not None
    persistence = ["--location", location] if location else ["--inMemoryPersistence"]
    ports_args = ["--blobPort", str(ports["blob"]), "--queuePort", str(ports["queue"]), "--tablePort", str(ports["table"])]
    proc = subprocess.Popen(
        [binary, "--silent", *persistence, "--disableTelemetry", "--skipApiVersionCheck", *ports_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not (_wait_port(ports["table"]) and _wait_port(ports["queue"])):
        proc.terminate()
        raise RuntimeError("Azurite did not start")
    return proc


def connection_string(ports: dict[str, int]) -> str:
    base = "http://127.0.0.1:{}/devstoreaccount1"
    return (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={base.format(ports['blob'])};QueueEndpoint={base.format(ports['queue'])};"
        f"TableEndpoint={base.format(ports['table'])};"
    )


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    given = os.environ.get("AZURITE_CONNECTION_STRING")
    if given:
        yield Azurite(given)
        return
    if _azurite_binary() is None:
        pytest.fail("Azurite is needed: run `bash scripts/test.sh` (installs it into .tools/) or `npm install -g azurite`")
    ports = {"blob": _free_port(), "queue": _free_port(), "table": _free_port()}
    instance = Azurite(connection_string(ports), _spawn(ports), ports)
    yield instance
    instance.stop()


@pytest.fixture
def private_azurite(tmp_path: Path) -> Iterator[Azurite]:
    """An Azurite of the test's own, persisting to disk, which the test may stop and restart."""
    if _azurite_binary() is None:
        pytest.fail("Azurite is needed: run `bash scripts/test.sh`")
    ports = {"blob": _free_port(), "queue": _free_port(), "table": _free_port()}
    location = str(tmp_path / "azurite")
    instance = Azurite(connection_string(ports), _spawn(ports, location), ports, location)
    yield instance
    instance.stop()


_RUN_SALT = os.urandom(8)  # names differ from run to run: a second run against the same Azurite meets none of the first's


@pytest.fixture
def table_name(request: pytest.FixtureRequest) -> str:
    """A table name of this test and this run (queue, container and table names derive from it)."""
    import hashlib

    return "t" + hashlib.blake2b(request.node.nodeid.encode(), digest_size=8, key=_RUN_SALT).hexdigest()


_FUNCTIONS: dict[str, object] = {}


def app_functions() -> dict[str, object]:
    """The app's built functions; built once, since FunctionApp.get_functions() may run only once."""
    if not _FUNCTIONS:
        import function_app

        _FUNCTIONS.update({f.get_function_name(): f for f in function_app.app.get_functions()})
    return _FUNCTIONS
