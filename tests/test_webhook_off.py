"""With no webhook configured (WEBHOOK_URL and WEBHOOK_TARGETS unset, as `azd up` without them
deploys), forward_incident consumes every incident once, raises nothing and poisons nothing."""

from __future__ import annotations

import pytest

from shared.errors import SettingsError
from shared.functions import build_forwarder
from shared.settings import load_webhook_settings

from .conftest import Azurite
from .test_webhook import Host, host, snapshot  # noqa: F401  (host is a fixture)


def test_no_target_is_allowed_only_when_asked_for() -> None:
    assert load_webhook_settings({}, require_target=False).targets == ()
    with pytest.raises(SettingsError, match="WEBHOOK_URL"):
        load_webhook_settings({})


def test_forwarder_without_targets_needs_no_storage_settings() -> None:
    assert build_forwarder({}).targets == []
    # With a target, forwarding is on and its storage settings are required as before.
    with pytest.raises(SettingsError, match="STATE_STORAGE_CONNECTION"):
        build_forwarder({"WEBHOOK_URL": "https://hooks.example/x", "WEBHOOK_SECRET": "s", "ALERTS_EVENTHUB_NAME": "alerts"})


@pytest.mark.azurite
def test_incidents_are_consumed_once_without_error_or_poison_when_no_webhook_is_set(
    host: Host,  # noqa: F811
    azurite: Azurite,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("WEBHOOK_URL", "WEBHOOK_TARGETS", "WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STATE_STORAGE_CONNECTION", azurite.connection_string)
    monkeypatch.setenv("INCIDENTS_POISON_QUEUE", host.poison.queue_name)
    host.enqueue(snapshot(revision=1))
    host.enqueue(snapshot(revision=2, action="updated"))
    host.enqueue(snapshot(incident="inc-other", severity=1))
    host.incidents.send_message(b"not json")  # even a broken message is not poisoned: there is nowhere to send it
    assert host.run() == 4  # each message once: no exception, so no redelivery
    assert list(host.incidents.peek_messages(max_messages=32)) == []
    assert host.poisoned() == []
