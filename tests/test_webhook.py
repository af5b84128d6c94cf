"""Webhook delivery against a real HTTP server on loopback and real Azurite queue messages."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from azure.data.tables import TableClient
from azure.functions.queue import QueueMessage
from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy, QueueClient

import function_app
from shared.errors import SettingsError
from shared.functions import QueuePoison, set_forwarder
from shared.settings import load_webhook_settings
from shared.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryError,
    Forwarder,
    MemoryDeliveryLog,
    TableDeliveryLog,
    WebhookTarget,
    json_payload,
    slack_payload,
    teams_payload,
    verify_signature,
)

from .conftest import Azurite, app_functions

REPO = Path(__file__).resolve().parent.parent
SECRET = "test-secret-d5b1e0"


def snapshot(revision: int = 1, action: str = "created", severity: int = 9, incident: str = "inc-abc") -> dict[str, Any]:
    return {
        "incidentId": incident,
        "revision": revision,
        "action": action,
        "ruleId": "PH_RULE_X",
        "ruleName": "MS 365 Defender: Task",
        "severity": severity,
        "category": "Security",
        "tactics": [{"id": "TA0003", "name": "Persistence"}],
        "techniques": [{"id": "T1053.002", "name": "At"}],
        "groupBy": {},
        "attributes": {"alertName": "Task", "incidentCount": revision},
        "triggerCount": 1,
        "firstSeen": "2026-11-20T09:14:05Z",
        "lastSeen": "2026-11-20T09:14:05Z",
        "remediation": "Investigate.",
        "triggerEvents": [{"attributes": {"alertWebUrl": "https://security.microsoft.com/alerts/da1"}, "raw": {"x": 1}}],
    }


class Script:
    """A loopback HTTP server answering from a script of (status, headers, delay_s)."""

    def __init__(self, responses: list[tuple[int, dict[str, str], float]] | None = None) -> None:
        self.responses = list(responses or [])
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                script.requests.append((self.path, dict(self.headers.items()), body))
                status, headers, delay = script.responses.pop(0) if script.responses else (204, {}, 0.0)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[Script]:
    s = Script()
    yield s
    s.close()


def target(url: str, **kw: Any) -> WebhookTarget:
    return WebhookTarget.model_validate(
        {"url": url, "secret": SECRET, "allow_http": True, "backoff_s": 0.05, "timeout_s": 2, **kw}
    )


def forwarder(*targets: WebhookTarget, **kw: Any) -> Forwarder:
    return Forwarder(list(targets), kw.pop("deliveries", MemoryDeliveryLog()), **kw)


# -- signing -----------------------------------------------------------------------------------


def readme_verifier() -> Any:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- verify-snippet -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "README must carry the receiver-side verification snippet"
    namespace: dict[str, Any] = {}
    exec(match.group(1), namespace)
    return namespace["verify"]


def test_signature_verifies_with_the_documented_snippet(server: Script) -> None:
    forwarder(target(server.url)).handle(orjson.dumps(snapshot()))
    _, headers, body = server.requests[0]
    verify = readme_verifier()
    assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER]) is True
    assert verify_signature(SECRET, headers, body)
    assert headers[IDEMPOTENCY_HEADER] == "inc-abc:1"
    assert json.loads(body)["schemaVersion"] == "1.1"


def test_tampered_body_or_stale_timestamp_fails_verification(server: Script) -> None:
    forwarder(target(server.url)).handle(orjson.dumps(snapshot()))
    _, headers, body = server.requests[0]
    verify = readme_verifier()
    assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER], body.replace(b"Task", b"Tusk"), headers[SIGNATURE_HEADER]) is False
    stale = dict(headers)
    stale[TIMESTAMP_HEADER] = str(int(headers[TIMESTAMP_HEADER]) - 3600)
    assert verify(SECRET.encode(), stale[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER]) is False
    assert not verify_signature(SECRET, stale, body)
    assert not verify_signature("other-secret", headers, body)


# -- retries -----------------------------------------------------------------------------------


def test_500_twice_then_200_is_delivered_once_in_three_attempts(server: Script) -> None:
    server.responses = [(500, {}, 0), (500, {}, 0), (200, {}, 0)]
    result = forwarder(target(server.url)).handle(orjson.dumps(snapshot()))
    assert result.delivered == ["default"]
    assert len(server.requests) == 3
    assert {r[1][IDEMPOTENCY_HEADER] for r in server.requests} == {"inc-abc:1"}


def test_400_is_not_retried_and_is_reported(server: Script) -> None:
    server.responses = [(400, {}, 0)]
    poisoned: list[str] = []
    result = forwarder(target(server.url), poison=type("P", (), {"send": lambda self, m: poisoned.append(m)})()).handle(
        orjson.dumps(snapshot())
    )
    assert len(server.requests) == 1
    assert "HTTP 400" in result.failed["default"]
    assert "HTTP 400" in json.loads(poisoned[0])["reason"]


def test_a_timeout_is_retried(server: Script) -> None:
    server.responses = [(200, {}, 1.5), (200, {}, 0)]
    result = forwarder(target(server.url, timeout_s=0.5)).handle(orjson.dumps(snapshot()))
    assert result.delivered == ["default"]
    assert len(server.requests) == 2


def test_429_honours_retry_after(server: Script) -> None:
    server.responses = [(429, {"Retry-After": "1"}, 0), (204, {}, 0)]
    start = time.monotonic()
    forwarder(target(server.url)).handle(orjson.dumps(snapshot()))
    assert time.monotonic() - start >= 0.95
    assert len(server.requests) == 2


def test_redirects_are_followed_only_within_the_same_host(server: Script) -> None:
    server.responses = [(307, {"Location": "/moved"}, 0), (204, {}, 0)]
    forwarder(target(server.url)).handle(orjson.dumps(snapshot()))
    assert [r[0] for r in server.requests] == ["/hook", "/moved"]
    server.requests.clear()
    server.responses = [(307, {"Location": "http://127.0.0.2:9/steal"}, 0)]
    result = forwarder(target(server.url)).handle(orjson.dumps(snapshot(revision=2)))
    assert "refused redirect to another host" in result.failed["default"]
    assert len(server.requests) == 1


# -- idempotency and filters -------------------------------------------------------------------


def test_same_snapshot_twice_and_an_older_revision_after_a_newer_are_not_sent_again(server: Script) -> None:
    fw = forwarder(target(server.url))
    fw.handle(orjson.dumps(snapshot(revision=1)))
    fw.handle(orjson.dumps(snapshot(revision=1)))
    fw.handle(orjson.dumps(snapshot(revision=3, action="updated")))
    fw.handle(orjson.dumps(snapshot(revision=2, action="updated")))
    assert [r[1][IDEMPOTENCY_HEADER] for r in server.requests] == ["inc-abc:1", "inc-abc:3"]


def test_actions_and_minimum_severity_filter_targets(server: Script) -> None:
    fw = forwarder(target(server.url, actions=("created",), min_severity=8))
    assert fw.handle(orjson.dumps(snapshot(revision=2, action="updated"))).skipped == ["default"]
    assert fw.handle(orjson.dumps(snapshot(severity=5, incident="inc-low"))).skipped == ["default"]
    assert fw.handle(orjson.dumps(snapshot())).delivered == ["default"]
    assert len(server.requests) == 1


# -- security ----------------------------------------------------------------------------------


def test_only_https_or_loopback_with_the_override_is_accepted() -> None:
    with pytest.raises(SettingsError, match="must be https"):
        WebhookTarget(url="http://example.com/hook").check_url()
    with pytest.raises(SettingsError, match="needs the allow-http override"):
        WebhookTarget(url="http://127.0.0.1:8080/hook").check_url()
    WebhookTarget(url="https://example.com/hook").check_url()
    WebhookTarget(url="http://localhost:8080/x", allow_http=True).check_url()


def test_secret_never_appears_in_logs_reprs_or_errors(server: Script, caplog: pytest.LogCaptureFixture) -> None:
    server.responses = [(500, {}, 0)] * 10
    caplog.set_level(logging.DEBUG)
    t = target(server.url, retries=1)
    with pytest.raises(DeliveryError) as info:
        forwarder(t).handle(orjson.dumps(snapshot()))
    assert SECRET not in caplog.text and SECRET not in repr(t) and SECRET not in str(info.value)
    with pytest.raises(SettingsError) as bad:
        load_webhook_settings({"WEBHOOK_URL": "ftp://x", "WEBHOOK_SECRET": SECRET})
    assert SECRET not in str(bad.value)


def test_payload_is_capped_with_a_marker() -> None:
    big = snapshot()
    big["triggerEvents"] = [{"raw": "x" * 100_000} for _ in range(5)]
    body = json_payload(big, limit=256 * 1024)
    data = json.loads(body)
    assert len(body) <= 256 * 1024
    assert data["triggerEventsTrimmed"] == 3 and len(data["triggerEvents"]) == 2


def test_settings_read_single_and_several_targets() -> None:
    one = load_webhook_settings(
        {
            "WEBHOOK_URL": "https://hooks.example/a",
            "WEBHOOK_SECRET": "s",
            "WEBHOOK_ACTIONS": "created",
            "WEBHOOK_MIN_SEVERITY": "7",
        }
    )
    assert one.targets[0].actions == ("created",) and one.targets[0].min_severity == 7
    assert one.poison_queue == "incidents-poison" and one.max_dequeue_count == 5
    many = load_webhook_settings(
        {
            "WEBHOOK_TARGETS": json.dumps(
                [
                    {"name": "teams", "url": "https://t.example/x", "format": "teams", "secretSetting": "TEAMS_SECRET"},
                    {"name": "slack", "url": "https://s.example/y", "format": "slack"},
                ]
            ),
            "TEAMS_SECRET": "k",
        }
    )
    assert [t.format for t in many.targets] == ["teams", "slack"]
    with pytest.raises(SettingsError, match="app setting MISSING_SECRET"):
        load_webhook_settings(
            {"WEBHOOK_TARGETS": json.dumps([{"url": "https://t.example/x", "secretSetting": "MISSING_SECRET"}])}
        )
    with pytest.raises(SettingsError, match="WEBHOOK_URL"):
        load_webhook_settings({})


# -- Teams and Slack shapes --------------------------------------------------------------------

TEXT = {"type": "string", "minLength": 1}
TEAMS_SCHEMA = {
    "type": "object",
    "required": ["type", "attachments"],
    "properties": {
        "type": {"const": "message"},
        "attachments": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["contentType", "content"],
                "properties": {
                    "contentType": {"const": "application/vnd.microsoft.card.adaptive"},
                    "content": {
                        "type": "object",
                        "required": ["type", "version", "body"],
                        "properties": {
                            "type": {"const": "AdaptiveCard"},
                            "version": {"enum": ["1.2", "1.3", "1.4", "1.5"]},
                            "body": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["type"],
                                    "properties": {
                                        "type": {"enum": ["TextBlock", "FactSet", "ColumnSet", "Container", "Image"]},
                                        "facts": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "required": ["title", "value"],
                                                "properties": {"title": {"type": "string"}, "value": {"type": "string"}},
                                            },
                                        },
                                    },
                                },
                            },
                            "actions": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["type", "title", "url"],
                                    "properties": {
                                        "type": {"const": "Action.OpenUrl"},
                                        "url": {"type": "string", "pattern": "^https://"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
SLACK_TEXT_OBJ = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"enum": ["plain_text", "mrkdwn"]}, "text": TEXT},
}
SLACK_SCHEMA = {
    "type": "object",
    "required": ["text", "blocks"],
    "properties": {
        "text": TEXT,
        "blocks": {
            "type": "array",
            "maxItems": 50,
            "items": {
                "type": "object",
                "required": ["type"],
                "oneOf": [
                    {
                        "properties": {
                            "type": {"const": "header"},
                            "text": {
                                **SLACK_TEXT_OBJ,
                                "properties": {"type": {"const": "plain_text"}, "text": {"type": "string", "maxLength": 150}},
                            },
                        },
                        "required": ["text"],
                    },
                    {
                        "properties": {
                            "type": {"const": "section"},
                            "fields": {
                                "type": "array",
                                "maxItems": 10,
                                "items": {
                                    **SLACK_TEXT_OBJ,
                                    "properties": {
                                        "type": {"enum": ["plain_text", "mrkdwn"]},
                                        "text": {"type": "string", "maxLength": 2000},
                                    },
                                },
                            },
                        }
                    },
                    {
                        "properties": {
                            "type": {"const": "context"},
                            "elements": {"type": "array", "maxItems": 10, "items": SLACK_TEXT_OBJ},
                        },
                        "required": ["elements"],
                    },
                    {
                        "properties": {
                            "type": {"const": "actions"},
                            "elements": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["type", "text"],
                                    "properties": {"type": {"const": "button"}},
                                },
                            },
                        },
                        "required": ["elements"],
                    },
                ],
            },
        },
    },
}


def test_teams_payload_is_an_adaptive_card_message() -> None:
    payload = json.loads(teams_payload(snapshot()))
    jsonschema.validate(payload, TEAMS_SCHEMA)
    facts = {f["title"]: f["value"] for f in payload["attachments"][0]["content"]["body"][1]["facts"]}
    assert facts["Severity"] == "9" and facts["alertName"] == "Task"


def test_slack_payload_is_block_kit() -> None:
    payload = json.loads(slack_payload(snapshot()))
    jsonschema.validate(payload, SLACK_SCHEMA)
    assert payload["blocks"][0]["text"]["text"].startswith("MS 365 Defender: Task")


def test_slack_schema_rejects_a_malformed_message() -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {"text": "x", "blocks": [{"type": "section", "fields": [{"type": "bogus", "text": "x"}]}]}, SLACK_SCHEMA
        )


# -- the queue-triggered function with real Azurite queue messages -----------------------------


def test_forward_incident_binding_metadata() -> None:
    functions: dict[str, Any] = app_functions()  # type: ignore[assignment]
    bindings = json.loads(functions["forward_incident"].get_function_json())["bindings"]
    assert bindings == [
        {
            "direction": "IN",
            "type": "queueTrigger",
            "name": "message",
            "queueName": "%INCIDENTS_QUEUE%",
            "connection": "AzureWebJobsStorage",
        }
    ]
    host = json.loads((REPO / "host.json").read_text())
    assert (
        host["extensions"]["queues"]["maxDequeueCount"]
        == load_webhook_settings({"WEBHOOK_URL": "https://x.example/", "WEBHOOK_SECRET": SECRET}).max_dequeue_count
    )


class Host:
    """Drives the queue trigger like the Functions host: receive, invoke, delete or let it reappear."""

    def __init__(self, azurite: Azurite, name: str) -> None:
        policy = {"message_encode_policy": BinaryBase64EncodePolicy(), "message_decode_policy": BinaryBase64DecodePolicy()}
        self.incidents = QueueClient.from_connection_string(azurite.connection_string, f"{name}-incidents", **policy)
        self.poison = QueueClient.from_connection_string(azurite.connection_string, f"{name}-poison")
        self.incidents.create_queue()
        self.deliveries = TableDeliveryLog(TableClient.from_connection_string(azurite.connection_string, name.replace("-", "")))

    def enqueue(self, snap: dict[str, Any]) -> None:
        self.incidents.send_message(orjson.dumps(snap))

    def run(self, max_rounds: int = 10) -> int:
        fn = function_app.forward_incident.build().get_user_function()
        invocations = 0
        for _ in range(max_rounds):
            msgs = list(self.incidents.receive_messages(max_messages=1, visibility_timeout=30))
            if not msgs:
                return invocations
            m = msgs[0]
            invocations += 1
            try:
                fn(QueueMessage(id=m.id, body=m.content, dequeue_count=m.dequeue_count, pop_receipt=m.pop_receipt))
            except DeliveryError:
                self.incidents.update_message(m, visibility_timeout=0)  # the host makes it visible again
                continue
            self.incidents.delete_message(m)
        return invocations

    def poisoned(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(m.content) for m in self.poison.peek_messages(max_messages=32)]
        except Exception:
            return []


@pytest.fixture
def host(azurite: Azurite, table_name: str) -> Iterator[Host]:
    h = Host(azurite, "h" + table_name[1:14])
    yield h
    set_forwarder(None)


@pytest.mark.azurite
def test_queued_duplicates_and_older_revisions_are_delivered_at_most_once(host: Host, server: Script) -> None:
    set_forwarder(forwarder(target(server.url), deliveries=host.deliveries, poison=QueuePoison(host.poison)))
    host.enqueue(snapshot(revision=1))
    host.enqueue(snapshot(revision=1))
    host.enqueue(snapshot(revision=2, action="updated"))
    host.run()
    host.enqueue(snapshot(revision=1))
    host.run()
    keys = [r[1][IDEMPOTENCY_HEADER] for r in server.requests]
    assert keys == ["inc-abc:1", "inc-abc:2"]
    assert host.deliveries.delivered_revision("default", "inc-abc") == 2


@pytest.mark.azurite
def test_receiver_down_past_the_retry_budget_ends_on_the_poison_queue_with_its_reason(host: Host) -> None:
    dead = "http://127.0.0.1:9/hook"  # nothing listens on the discard port
    set_forwarder(
        forwarder(target(dead, retries=1), deliveries=host.deliveries, poison=QueuePoison(host.poison), max_dequeue_count=3)
    )
    host.enqueue(snapshot())
    invocations = host.run()
    assert invocations == 3
    [poisoned] = host.poisoned()
    assert "gave up after 3 deliveries" in poisoned["reason"] and "ConnectionError" in poisoned["reason"]
    assert json.loads(poisoned["body"])["incidentId"] == "inc-abc"
    assert host.deliveries.delivered_revision("default", "inc-abc") == 0


def test_teams_card_is_kept_under_the_teams_size_limit() -> None:
    snap = snapshot()
    snap["attributes"] = {f"attr{i}": "v" * 190 for i in range(400)}
    payload = teams_payload(snap)
    assert len(payload) <= 28 * 1024
    jsonschema.validate(json.loads(payload), TEAMS_SCHEMA)


@pytest.mark.azurite
def test_end_to_end_event_hub_batch_to_signed_webhook(host: Host, server: Script, azurite: Azurite, table_name: str) -> None:
    """correlate_alerts -> incidents queue (Azurite) -> forward_incident -> receiver verifies the signature."""
    from shared.functions import set_runtime

    from .test_function_app import Out, Storage, graph_alert, hub_events

    storage = Storage(azurite, table_name)
    set_runtime(storage.runtime())
    try:
        out = Out()
        function_app.correlate_alerts.build().get_user_function()(hub_events([orjson.dumps(graph_alert("da-e2e", 1))]), out)
    finally:
        set_runtime(None)
    assert out.value
    for message in out.value:  # what the queue output binding would enqueue
        host.incidents.send_message(message.encode())
    set_forwarder(forwarder(target(server.url), deliveries=host.deliveries, poison=QueuePoison(host.poison)))
    assert host.run() == len(out.value)
    [(_, headers, body)] = server.requests
    assert verify_signature(SECRET, headers, body)
    delivered = json.loads(body)
    assert delivered["attributes"]["alertIdStr"] == "da-e2e" and delivered["schemaVersion"] == "1.1"


def test_an_unresolved_key_vault_reference_is_never_used_as_a_secret() -> None:
    with pytest.raises(SettingsError, match="WEBHOOK_SECRET: its Key Vault reference was not resolved"):
        load_webhook_settings(
            {"WEBHOOK_URL": "https://x.example/", "WEBHOOK_SECRET": "@Microsoft.KeyVault(SecretUri=https://kv/secrets/w)"}
        )


def test_local_receiver_prints_signed_incidents_and_refuses_bad_signatures() -> None:
    import io

    import requests

    from shared.receiver import serve

    out = io.StringIO()
    receiver = serve("127.0.0.1", 0, SECRET, out)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/incidents"
    try:
        result = forwarder(target(url)).handle(orjson.dumps(snapshot()))
        assert result.delivered == ["default"]
        forged = requests.post(
            url,
            data=b'{"incidentId": "x"}',
            headers={TIMESTAMP_HEADER: str(int(time.time())), SIGNATURE_HEADER: "sha256=00"},
            timeout=5,
        )
        assert forged.status_code == 401
    finally:
        receiver.shutdown()
        receiver.server_close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("RECEIVED inc-abc rev 1 created sev 9 PH_RULE_X")
    assert lines[1].startswith("REJECTED bad or stale signature")


# -- the URL policy, log redaction, poison once per (revision, target) --------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example\\@127.0.0.1:8787/",  # urllib3 connects to evil.example:80
        "https://evil.example\\@hooks.example/",
        "http://user:pw@127.0.0.1:8787/hook",
        "https://token@hooks.example/hook",
        "http://127.0.0.1.evil.example/hook",
        "http://localhost.evil.example/hook",
        "https://hooks.example/a b",
        "https://hooks.example/\x00",
        "https:///hook",
        "file:///etc/passwd",
    ],
)
def test_the_url_policy_checks_what_the_http_client_connects_to(url: str) -> None:
    with pytest.raises(SettingsError) as err:
        WebhookTarget(url=url, allow_http=True).check_url()
    assert "webhook target default" in str(err.value) and "evil" not in str(err.value)


def test_the_checked_url_is_the_one_connected_to(server: Script) -> None:
    t = target(server.url.replace("127.0.0.1", "LOCALHOST") + "?k=v")
    assert t.endpoint() == server.url.replace("127.0.0.1", "localhost") + "?k=v"
    assert forwarder(t).handle(orjson.dumps(snapshot())).delivered == ["default"]
    assert server.requests[0][0] == "/hook?k=v"


def test_redirect_targets_pass_the_same_url_policy(server: Script) -> None:
    port = server.server.server_address[1]
    server.responses = [(307, {"Location": f"http://evil.example\\@127.0.0.1:{port}/x"}, 0)]
    result = forwarder(target(server.url)).handle(orjson.dumps(snapshot()))
    assert "refused redirect" in result.failed["default"] and len(server.requests) == 1


def test_no_log_line_shows_a_webhook_url_path_or_query(server: Script, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret_path = "/services/T0SECRET/B0SECRET/XSECRETX?sig=QSECRETQ"
    dead = "http://127.0.0.1:9" + secret_path  # connection refused, retried
    with pytest.raises(DeliveryError):
        forwarder(target(dead, retries=1)).handle(orjson.dumps(snapshot()))
    server.responses = [(500, {}, 0), (204, {}, 0)]  # a status retry: urllib3 logs the path at debug
    forwarder(target(server.url.replace("/hook", secret_path), retries=1)).handle(orjson.dumps(snapshot()))
    urllib3_lines = [r for r in caplog.records if r.name.startswith("urllib3")]
    assert any('"POST ' in r.getMessage() for r in urllib3_lines)  # urllib3 logs each request line ...
    assert "SECRET" not in caplog.text  # ... without the path or the query


def test_one_permanent_and_one_transient_target_park_the_revision_once_per_target(server: Script) -> None:
    refusing = Script([(400, {}, 0)] * 20)
    try:
        parked: list[dict[str, Any]] = []
        sink = type("P", (), {"send": lambda self, m: parked.append(json.loads(m))})()
        deliveries = MemoryDeliveryLog()
        fw = Forwarder(
            [
                target(refusing.url, name="permanent"),
                target("http://127.0.0.1:9/hook", name="transient", retries=0),
            ],
            deliveries,
            poison=sink,
            max_dequeue_count=5,
        )
        body = orjson.dumps(snapshot())
        for dequeue in range(1, 6):
            try:
                fw.handle(body, dequeue_count=dequeue, message_id="m1")
            except DeliveryError:
                assert dequeue < 5
        fw.handle(body, dequeue_count=1, message_id="m2")  # a duplicate message of the same revision
        assert sorted(p["targets"][0] for p in parked) == ["permanent", "transient"]
        assert len(parked) == 2
        assert len(refusing.requests) == 1  # the refusing target was not called again on each re-delivery
        assert json.loads(parked[0]["body"])["revision"] == 1
        assert deliveries.poisoned_revision("permanent", "inc-abc") == 1
        # a new revision is tried afresh
        fw.handle(orjson.dumps(snapshot(revision=2, action="updated")), dequeue_count=5, message_id="m3")
        assert len(refusing.requests) == 2 and len(parked) == 3
        deliveries.clear_poisoned("permanent", "inc-abc")  # a re-drive is delivered again
        fw.handle(orjson.dumps(snapshot(revision=2, action="updated")), dequeue_count=5, message_id="m4")
        assert len(refusing.requests) == 3 and parked[-1]["targets"] == ["permanent"]
    finally:
        refusing.close()


@pytest.mark.azurite
def test_table_delivery_log_keeps_delivered_and_poisoned_revisions(azurite: Azurite, table_name: str) -> None:
    log = TableDeliveryLog(TableClient.from_connection_string(azurite.connection_string, table_name))
    assert (log.delivered_revision("a", "inc"), log.poisoned_revision("a", "inc")) == (0, 0)
    log.record_poisoned("a", "inc", 3)
    log.record("a", "inc", 2)
    log.record_poisoned("a", "inc", 1)  # never lowered
    assert (log.delivered_revision("a", "inc"), log.poisoned_revision("a", "inc")) == (2, 3)
    log.clear_poisoned("a", "inc")
    assert (log.delivered_revision("a", "inc"), log.poisoned_revision("a", "inc")) == (2, 0)


def test_every_table_backed_store_maps_azure_failures_to_store_error() -> None:
    from shared.errors import StoreError
    from shared.graph import TableCursorStore

    conn = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;TableEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    for store, call in (
        (TableDeliveryLog, lambda s: s.delivered_revision("a", "inc")),
        (TableDeliveryLog, lambda s: s.record("a", "inc", 1)),
        (TableCursorStore, lambda s: s.load("t")),
        (TableCursorStore, lambda s: s.save("t", "2026-01-01T00:00:00Z", [])),
    ):
        instance = store(TableClient.from_connection_string(conn, "unreachable", retry_total=0))
        with pytest.raises(StoreError, match=r"\(table unreachable\): ServiceRequestError"):
            call(instance)


@pytest.mark.azurite
def test_a_requeued_poison_incident_is_delivered_again_and_parked_at_most_once(host: Host, azurite: Azurite) -> None:
    from shared.claimcheck import MemoryClaims
    from shared.clients import StorageClients
    from shared.redrive import requeue_poison

    refusing = Script([(400, {}, 0)] * 3)
    try:
        set_forwarder(forwarder(target(refusing.url), deliveries=host.deliveries, poison=QueuePoison(host.poison)))
        host.enqueue(snapshot())
        host.enqueue(snapshot())  # a duplicate of the same revision
        host.run()
        assert len(refusing.requests) == 1 and len(host.poisoned()) == 1  # parked once, the duplicate skipped
        assert host.poisoned()[0]["targets"] == ["default"]
        refusing.responses = []  # the receiver is fixed: it now answers 204
        incidents = StorageClients.from_connection_string(azurite.connection_string).queue(host.incidents.queue_name, base64=True)
        moved = requeue_poison(host.poison, incidents, MemoryClaims(), err=io.StringIO(), deliveries=host.deliveries)
        assert moved.requeued == 1
        host.run()
        assert len(refusing.requests) == 2 and host.deliveries.delivered_revision("default", "inc-abc") == 1
        assert host.poisoned() == []
    finally:
        refusing.close()
