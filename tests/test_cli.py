"""Every ``python -m shared`` command: its documented exit code, and one line (never a traceback)
for every user error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.__main__ import main
from shared.receiver import serve

REPO = Path(__file__).resolve().parent.parent
DEMO = sorted(str(p) for p in (REPO / "samples" / "demo").glob("*.json*"))
BAD_RULE = "id: X\nname: [unclosed\n"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def receiver() -> Iterator[str]:
    server = serve("127.0.0.1", 0, "right-secret", open(os.devnull, "w"))  # noqa: SIM115
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_validate_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["validate"], capsys)[0] == 0
    (tmp_path / "bad.yaml").write_text(BAD_RULE)
    code, err = run(["validate", str(tmp_path / "bad.yaml")], capsys)
    assert code == 1 and "bad.yaml" in err
    code, err = run(["validate", str(tmp_path / "absent")], capsys)
    assert code == 1 and "no such file" in err


def test_test_rules_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["test-rules"], capsys)[0] == 0
    (tmp_path / "bad.yaml").write_text(BAD_RULE)
    assert run(["test-rules", str(tmp_path / "bad.yaml")], capsys)[0] == 2


def test_replay_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["replay", *DEMO], capsys)[0] == 0
    code, err = run(["replay", str(tmp_path / "absent.json")], capsys)
    assert code == 2 and "no such file" in one_error_line(err)
    (tmp_path / "bad.yaml").write_text(BAD_RULE)
    code, err = run(["replay", "--rules", str(tmp_path / "bad.yaml"), *DEMO], capsys)
    assert code == 2 and "invalid rules" in one_error_line(err)
    (tmp_path / "junk.jsonl").write_text('{"not": "an alert"}\n')
    assert run(["replay", str(tmp_path / "junk.jsonl")], capsys)[0] == 1


def test_replay_forward_refuses_a_url_outside_the_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["replay", "--forward", "http://evil.example\\@127.0.0.1:8787/", *DEMO], capsys)
    assert code == 2 and "backslash" in one_error_line(err)


def test_replay_forward_exits_4_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code, err = run(["replay", "--forward", f"http://127.0.0.1:{port}/", DEMO[0]], capsys)
    assert code == 4 and "failed: " in err


@pytest.mark.parametrize("secret", ["wrong-secret", None])
def test_replay_forward_exits_4_when_the_receiver_refuses_the_signature(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, receiver: str, secret: str | None
) -> None:
    if secret is None:
        monkeypatch.delenv("WEBHOOK_SECRET", raising=False)
    else:
        monkeypatch.setenv("WEBHOOK_SECRET", secret)
    code, err = run(["replay", "--forward", receiver, DEMO[0]], capsys)
    assert code == 4 and "HTTP 401" in err


def test_replay_forward_exits_0_when_every_incident_is_delivered(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, receiver: str
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "right-secret")
    code, err = run(["replay", "--forward", receiver, DEMO[0]], capsys)
    assert code == 0 and "failed: 0" in err


def test_send_usage_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENTHUB_CONNECTION_STRING", raising=False)
    code, err = run(["send", DEMO[0], "--hub", "h"], capsys)
    assert code == 2 and "EVENTHUB_CONNECTION_STRING" in one_error_line(err)
    code, err = run(["send", "/absent.json", "--hub", "h"], capsys)
    assert code == 2 and "no such file" in one_error_line(err)
    code, err = run(["send", DEMO[0]], capsys)
    assert code == 2 and "--hub" in one_error_line(err)
    monkeypatch.setenv("EVENTHUB_CONNECTION_STRING", "Endpoint=sb://x/;SharedAccessKeyName=only-a-name")
    code, err = run(["send", DEMO[0], "--hub", "h"], capsys)
    assert code == 2 and "$EVENTHUB_CONNECTION_STRING is not an Event Hubs connection string" in one_error_line(err)
    assert "only-a-name" not in err  # the value (which may hold a key) is never echoed


def test_receiver_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for port in ("99999", "abc", "-1", "\u0661"):
        code, err = run(["receiver", "--port", port], capsys)
        assert code == 2 and "port must be a number from 0 to 65535" in one_error_line(err)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = run(["receiver", "--port", str(taken.getsockname()[1])], capsys)
    assert code == 3 and "cannot listen on 127.0.0.1" in one_error_line(err)


def test_unknown_command_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in one_error_line(err)


def test_send_to_an_unreachable_hub_exits_3_with_one_line_from_the_real_entry_point() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "EVENTHUB_CONNECTION_STRING": f"Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=k;SharedAccessKey=dmFsdWU=",
    }
    done = subprocess.run(
        [sys.executable, "-m", "shared", "send", DEMO[0], "--hub", "alerts"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert one_error_line(done.stderr).startswith("error: could not send to the Event Hub")


@pytest.mark.parametrize(
    "argv",
    [
        ["schema", "--write", "/etc/hostname/x.json"],
        ["coverage", "--layer", "/etc/hostname/x.json"],
        ["test-rules", "--junit", "/etc/hostname/x.xml"],
        ["replay", "--html", "/etc/hostname/x.html", DEMO[0]],
    ],
    ids=["schema", "coverage", "test-rules", "replay"],
)
def test_an_unwritable_output_file_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, err = run(argv, capsys)
    assert code == 2 and "/etc/hostname" in one_error_line(err)


@pytest.mark.parametrize(
    "argv",
    [["import", "fortisiem", "/absent.xml"], ["import", "sigma", "/absent.yml"], ["coverage", "/absent"]],
    ids=["import-fortisiem", "import-sigma", "coverage"],
)
def test_a_missing_input_is_exit_2_without_a_traceback(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, err = run(argv, capsys)
    assert code == 2 and "/absent" in err


def _failing(exc: BaseException) -> object:
    def command(args: object) -> int:
        raise exc

    return command


def _remote_failures() -> list[BaseException]:
    from azure.core.exceptions import ServiceRequestError
    from azure.eventhub.exceptions import EventHubError

    from shared.errors import StoreError

    return [
        StoreError("state table unreachable: ServiceRequestError"),
        ServiceRequestError("connection refused"),
        EventHubError("amqp connection refused"),
    ]


@pytest.mark.parametrize("exc", _remote_failures(), ids=lambda e: type(e).__name__)
def test_an_unreachable_service_in_any_command_is_exit_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    monkeypatch.setattr("shared.__main__.cmd_validate", _failing(exc))
    code, err = run(["validate"], capsys)
    assert code == 3 and one_error_line(err).startswith("error: ")


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shared.__main__.cmd_validate", _failing(KeyError("bug")))
    with pytest.raises(KeyError):
        main(["validate"])


@pytest.mark.parametrize("argv", [["redrive", "list"], ["redrive", "list", "--poison"], ["redrive", "show", "rejected/x"]])
@pytest.mark.parametrize("connection", ["garbage", "AccountKey=k"])
def test_a_malformed_storage_connection_string_is_one_line_naming_it_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], connection: str
) -> None:
    monkeypatch.setenv("STATE_STORAGE_CONNECTION", connection)
    code, err = run(argv, capsys)
    assert code == 2 and "STATE_STORAGE_CONNECTION" in one_error_line(err)
    assert connection not in err  # the value (which may hold a key) is never echoed
