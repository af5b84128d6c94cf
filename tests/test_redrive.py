"""``python -m shared redrive``: dead letters listed, shown and re-sent; poison incidents re-queued (Azurite)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from shared.claimcheck import BlobClaims, MemoryClaims
from shared.clients import StorageClients
from shared.deadletters import DeadLetterWriter, Origin, letter
from shared.functions import QueueDeadLetters, QueuePoison
from shared.normalize import Rejection
from shared.redrive import Address, RedriveError, records_of, requeue_poison, resend

from .conftest import Azurite

pytestmark = pytest.mark.azurite
REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 28, 3, 0, tzinfo=timezone.utc)
ALERT = {"@odata.type": "#microsoft.graph.security.alert", "id": "a1", "tenantId": "t1", "category": "Persistence"}


class Env:
    def __init__(self, azurite: Azurite, tag: str) -> None:
        self.clients = StorageClients.from_connection_string(azurite.connection_string)
        self.names = {"container": f"dl{tag}", "incidents": f"inc{tag}", "poison": f"inc{tag}-poison", "rejected": f"rej{tag}"}
        self.claims = BlobClaims(self.clients.container(self.names["container"]))
        self.env = {
            "STATE_STORAGE_CONNECTION": azurite.connection_string,
            "DEADLETTER_CONTAINER": self.names["container"],
            "INCIDENTS_QUEUE": self.names["incidents"],
            "PATH": "/usr/bin:/bin",
        }

    def dead_letter(self, records: Sequence[bytes], first_seq: int = 10) -> str:
        writer = DeadLetterWriter(QueueDeadLetters(self.clients.queue(self.names["rejected"])), self.claims)
        letters = [
            letter(Rejection(f"p seq {first_seq + i}", "bad", raw=r), Origin("0", first_seq + i, NOW))
            for i, r in enumerate(records)
        ]
        message = writer.write(letters, when=NOW)
        assert message is not None
        return str(message["claimCheck"]["blob"])

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "shared", "redrive", *args], capture_output=True, cwd=REPO, env=self.env, timeout=120
        )


@pytest.fixture
def env(azurite: Azurite, request: pytest.FixtureRequest) -> Iterator[Env]:
    # fresh names per run: a second run against the same Azurite must not meet the first run's queues
    yield Env(azurite, hashlib.blake2b(request.node.nodeid.encode() + os.urandom(8), digest_size=5).hexdigest())


def test_list_show_and_resend_to_a_file_round_trip_the_original_bytes(env: Env, tmp_path: Path) -> None:
    records = [orjson.dumps(ALERT), b"\xff not json", orjson.dumps({"x": "y" * 300_000})]
    blob = env.dead_letter(records)
    listed = [json.loads(x) for x in env.cli("list").stdout.splitlines()]
    assert listed == [{"blob": blob, "records": 3, "bytes": listed[0]["bytes"], "resentAt": None}]
    shown = [json.loads(x) for x in env.cli("show", blob).stdout.splitlines()]
    assert [s["address"] for s in shown] == [f"{blob}#0", f"{blob}#1", f"{blob}#2"]
    assert json.loads(shown[0]["record"]) == ALERT and base64.b64decode(shown[1]["rawBase64"]) == records[1]
    assert env.cli("show", f"{blob}#2", "--raw").stdout == records[2] + b"\n"
    out = tmp_path / "again.jsonl"
    result = env.cli("resend", blob, "--to-file", str(out))
    assert result.returncode == 0 and b"re-sent 3 record(s)" in result.stderr
    assert out.read_bytes().splitlines() == records


def test_resending_a_blob_twice_sends_it_once_unless_forced(env: Env, tmp_path: Path) -> None:
    blob = env.dead_letter([orjson.dumps(ALERT)])
    out = tmp_path / "out.jsonl"
    assert env.cli("resend", "--all", "--to-file", str(out)).returncode == 0
    second = env.cli("resend", "--all", "--to-file", str(out))
    assert b"nothing to re-send" in second.stderr
    third = env.cli("resend", blob, "--to-file", str(out))
    assert b"already re-sent" in third.stderr
    assert env.cli("resend", blob, "--to-file", str(out), "--force").returncode == 0
    assert len(out.read_bytes().splitlines()) == 2
    [row] = [json.loads(x) for x in env.cli("list").stdout.splitlines()]
    assert row["resentAt"]


class ListPublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []

    def publish(self, tenant: str, records: Sequence[bytes]) -> list[str]:
        self.sent.append((tenant, list(records)))
        return []


def test_resend_to_the_hub_publishes_each_record_with_its_tenant_as_partition_key() -> None:
    claims = MemoryClaims()
    queue = type("Q", (), {"send": lambda self, m: None})()
    writer = DeadLetterWriter(queue, claims)
    other = {**ALERT, "tenantId": "t2"}
    letters = [
        letter(Rejection("p", "bad", raw=orjson.dumps(r)), Origin("0", i, NOW)) for i, r in enumerate([ALERT, other, ALERT])
    ]
    message = writer.write(letters, when=NOW)
    assert message is not None
    publisher = ListPublisher()
    result = resend(claims, [Address.parse(message["claimCheck"]["blob"] + "#1")], publisher=publisher, err=io.StringIO())
    assert result.sent == 1 and publisher.sent == [("t2", [orjson.dumps(other)])]
    result = resend(claims, [Address.parse(message["claimCheck"]["blob"])], publisher=publisher, err=io.StringIO())
    assert result.sent == 3 and sorted(t for t, _ in publisher.sent[1:]) == ["t1", "t2"]


def test_bad_addresses_are_named() -> None:
    with pytest.raises(RedriveError, match="rejected/"):
        Address.parse("poison/x")
    with pytest.raises(RedriveError, match="integer"):
        Address.parse("rejected/x#one")
    claims = MemoryClaims()
    claims.put("rejected/x", __import__("shared.deadletters", fromlist=["x"]).encode_letters([{"raw": ""}]))
    with pytest.raises(RedriveError, match="holds 1 record"):
        records_of(claims, Address.parse("rejected/x#5"))


def test_cli_errors_exit_2_with_one_line(env: Env) -> None:
    missing = env.cli("show", "rejected/2026/none")
    assert missing.returncode == 2 and missing.stderr.startswith(b"error: ") and b"Traceback" not in missing.stderr
    nowhere = env.cli("resend", "--all")
    assert nowhere.returncode == 2 and b"--to-file PATH or --hub NAME" in nowhere.stderr


def test_poison_incidents_are_requeued_base64_whole_and_only_once(env: Env) -> None:
    poison_q = env.clients.queue(env.names["poison"])
    poison_q.create_queue()
    incidents = env.clients.queue(env.names["incidents"])
    incidents.create_queue()
    small = orjson.dumps({"incidentId": "inc-1", "revision": 2})
    # Under the incidents queue's limit itself, but its quotes double when quoted in a poison message.
    big = orjson.dumps({"incidentId": "inc-2", "revision": 1, "attributes": {"x": '"' * 15_000}})
    assert len(big) < 40_000
    sink = QueuePoison(poison_q, env.claims, clock=lambda: NOW)
    for i, body in enumerate([small, big]):
        sink.send(orjson.dumps({"reason": "HTTP 400", "messageId": f"m{i}", "body": body.decode()}).decode())
    sink.send(orjson.dumps({"reason": "not an incident snapshot", "messageId": "m9", "body": "garbage"}).decode())
    assert any(json.loads(m.content).get("claimCheck") for m in poison_q.peek_messages(max_messages=32))
    listed = [json.loads(x) for x in env.cli("list", "--poison").stdout.splitlines()]
    assert sorted((x["incidentId"], x["bodyBytes"]) for x in listed if x["incidentId"]) == [
        ("inc-1", len(small)),
        ("inc-2", len(big)),
    ]
    result = env.cli("requeue-poison")
    assert result.returncode == 0 and b"re-queued 2" in result.stderr and b"left 1" in result.stderr
    requeued = sorted(base64.b64decode(m.content) for m in incidents.peek_messages(max_messages=32))
    assert requeued == sorted([small, big])  # what the base64 queue trigger of forward_incident decodes
    again = requeue_poison(poison_q, env.clients.queue(env.names["incidents"], base64=True), env.claims, err=io.StringIO())
    assert again.requeued == 0 and again.left == 1  # only the non-snapshot is left, and it stays ...
    assert len(incidents.peek_messages(max_messages=32)) == 2
    [visible] = poison_q.peek_messages(max_messages=32)  # ... visible at once for `redrive list` and people
    assert json.loads(visible.content)["messageId"] == "m9"


def test_an_incident_the_functions_host_parked_itself_is_listed_and_requeued(env: Env) -> None:
    """After maxDequeueCount failed runs the host (not our code: a crash, a timeout) moves the message to
    ``<queue>-poison`` as it was stored: base64, without a reason. It must not stay stuck there."""
    poison_q = env.clients.queue(env.names["poison"])
    poison_q.create_queue()
    incidents = env.clients.queue(env.names["incidents"])
    incidents.create_queue()
    body = orjson.dumps({"incidentId": "inc-7", "revision": 3, "action": "updated"})
    env.clients.queue(env.names["poison"], base64=True).send_message(body.decode())  # as the host stores it
    [listed] = [json.loads(x) for x in env.cli("list", "--poison").stdout.splitlines()]
    assert (listed["incidentId"], listed["revision"], listed["bodyBytes"]) == ("inc-7", 3, len(body))
    result = env.cli("requeue-poison")
    assert result.returncode == 0 and b"re-queued 1" in result.stderr
    assert [base64.b64decode(m.content) for m in incidents.peek_messages(max_messages=32)] == [body]
    assert poison_q.peek_messages(max_messages=32) == []


def test_unreachable_storage_exits_3_with_one_line(tmp_path: Path) -> None:
    key = base64.b64encode(b"k" * 64).decode()
    conn = f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    env = {"STATE_STORAGE_CONNECTION": conn, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "shared", "redrive", "list"], capture_output=True, cwd=REPO, env=env, timeout=60
    )
    assert result.returncode == 3 and result.stderr.startswith(b"error: ") and b"Traceback" not in result.stderr
