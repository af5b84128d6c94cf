"""Every app setting is validated under its own name; Key Vault references that did not resolve are
refused whatever the setting is called; names follow Azure's rules; host.json and the forwarder agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.errors import SettingsError
from shared.settings import load_graph_settings, load_settings, load_webhook_settings

from .conftest import Azurite

HOOK = {"WEBHOOK_URL": "https://hooks.example/a", "WEBHOOK_SECRET": "s3cret-for-tests"}
BASE = {"ALERTS_EVENTHUB_NAME": "alerts", "STATE_STORAGE_CONNECTION": "UseDevelopmentStorage=true"}
GRAPH = {
    "GRAPH_TENANTS": "t1",
    "ALERTS_EVENTHUB__fullyQualifiedNamespace": "ns.servicebus.windows.net",
    "ALERTS_EVENTHUB_NAME": "a",
}
UNRESOLVED = "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/x)"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WEBHOOK_MIN_SEVERITY", "high"),
        ("WEBHOOK_MIN_SEVERITY", "11"),
        ("WEBHOOK_FORMAT", "xml"),
        ("WEBHOOK_ACTIONS", "created,deleted"),
        ("WEBHOOK_ALLOW_HTTP", "treu"),
        ("WEBHOOK_ALLOW_HTTP", "2"),
        ("WEBHOOK_MAX_DEQUEUE_COUNT", "50"),
        ("WEBHOOK_MAX_DEQUEUE_COUNT", "five"),
        ("DELIVERY_TABLE", "bad name!"),
        ("DELIVERY_TABLE", "tables"),
        ("DELIVERY_TABLE", "1deliveries"),
        ("INCIDENTS_QUEUE", "Bad_Queue"),
        ("INCIDENTS_QUEUE", "double--dash"),
        ("INCIDENTS_POISON_QUEUE", "-poison"),
        ("WEBHOOK_URL", "http://hooks.example/a"),
        ("WEBHOOK_ACTIONS", ","),  # no action at all: the target would forward nothing, silently
        ("WEBHOOK_ACTIONS", " , "),
        ("WEBHOOK_URL", "https://hooks.example/\udcff"),  # an undecodable byte in the environment
        ("WEBHOOK_URL", "https://hooks.example/a\u200bb"),  # invisible in a portal, a different URL
        ("WEBHOOK_TARGETS", "[" * 100_000 + "]" * 100_000),  # nested past the JSON parser's depth
    ],
)
def test_a_bad_webhook_setting_is_reported_under_its_own_name(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^app setting {name}: "):
        load_webhook_settings({**HOOK, name: value})


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [
        ("minSeverity", 0, "WEBHOOK_TARGETS[0].minSeverity"),
        ("format", "xml", "WEBHOOK_TARGETS[0].format"),
        ("actions", ["nope"], "WEBHOOK_TARGETS[0].actions"),
        ("actions", [], "WEBHOOK_TARGETS[0].actions"),
        ("url", "https://a\\@b.example/", "WEBHOOK_TARGETS[0].url"),
        ("colour", "red", "WEBHOOK_TARGETS[0]"),
    ],
)
def test_a_bad_listed_target_names_its_index_and_key(key: str, value: object, where: str) -> None:
    listed = [{"name": "soar", "url": "https://soar.example/x", key: value}]
    with pytest.raises(SettingsError, match="^app setting " + re.escape(where)):
        load_webhook_settings({"WEBHOOK_TARGETS": json.dumps(listed)})


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_booleans_accept_only_the_documented_spellings(value: str) -> None:
    hooks = load_webhook_settings({**HOOK, "WEBHOOK_URL": "http://127.0.0.1:8787/", "WEBHOOK_ALLOW_HTTP": value})
    assert hooks.targets[0].allow_http is True
    assert load_webhook_settings({**HOOK, "WEBHOOK_ALLOW_HTTP": "False"}).targets[0].allow_http is False


@pytest.mark.parametrize("name", ["SOAR_HOOK_KEY", "soar_hook_key", "WEBHOOK_SECRET", "WEBHOOK_URL", "DELIVERY_TABLE"])
@pytest.mark.parametrize("spelling", [UNRESOLVED, UNRESOLVED.lower(), "  " + UNRESOLVED.upper()])
def test_an_unresolved_key_vault_reference_fails_by_name_whatever_the_setting_is_called(name: str, spelling: str) -> None:
    listed = [{"name": "soar", "url": "https://soar.example/x", "secretSetting": name}]
    env = {"WEBHOOK_TARGETS": json.dumps(listed), name: spelling}
    with pytest.raises(SettingsError, match=f"^app setting {name}: its Key Vault reference was not resolved"):
        load_webhook_settings(env)


@pytest.mark.parametrize("name", ["GRAPH_CLIENT_SECRET", "GRAPH_TENANTS", "GRAPH_BASE_URL", "ALERTS_EVENTHUB"])
def test_graph_settings_refuse_unresolved_references_too(name: str) -> None:
    env = {**GRAPH, "GRAPH_AUTH": "client_secret", "GRAPH_CLIENT_ID": "c", "GRAPH_CLIENT_SECRET": "s", name: UNRESOLVED}
    with pytest.raises(SettingsError, match=f"^app setting {name}: its Key Vault reference"):
        load_graph_settings(env)


@pytest.mark.parametrize("name", ["STATE_STORAGE_CONNECTION", "ALERTS_EVENTHUB_NAME", "RULES_DIR"])
def test_app_settings_refuse_unresolved_references_too(name: str) -> None:
    with pytest.raises(SettingsError, match=f"^app setting {name}: its Key Vault reference"):
        load_settings({**BASE, name: UNRESOLVED})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GRAPH_CURSOR_TABLE", "graph_cursors"),
        ("GRAPH_BASE_URL", "http://graph.example/v1.0"),
        ("GRAPH_BASE_URL", "https://u:p@graph.microsoft.com/v1.0"),
        ("GRAPH_TENANTS", "t1,evil tenant"),
        ("GRAPH_AUTH", "password"),
    ],
)
def test_a_bad_graph_setting_is_reported_under_its_own_name(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^app setting {name}: "):
        load_graph_settings({**GRAPH, name: value})


@pytest.mark.parametrize("value", ["ns.servicebus.windows.net", "Endpoint=sb://ns/;SharedAccessKeyName=k"])
def test_a_hub_connection_that_is_no_connection_string_is_named_before_the_poller_starts(value: str) -> None:
    """Without the namespace setting, ALERTS_EVENTHUB must be a whole connection string: anything else
    failed every timer tick with an AssertionError or the SDK's ValueError, never naming the setting."""
    env = {k: v for k, v in GRAPH.items() if k != "ALERTS_EVENTHUB__fullyQualifiedNamespace"}
    with pytest.raises(SettingsError, match=r"^app setting ALERTS_EVENTHUB: ") as caught:
        load_graph_settings({**env, "ALERTS_EVENTHUB": value})
    assert value not in str(caught.value)  # a connection string may hold a key: never echoed


@pytest.mark.parametrize(
    ("name", "value"), [("STATE_TABLE", "bad name!"), ("INCIDENTS_QUEUE", "Bad_Queue"), ("REJECTED_QUEUE", "a--b")]
)
def test_state_names_follow_azure_naming_rules(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^app setting {name}: "):
        load_settings({**BASE, name: value})


@pytest.mark.parametrize("name", ["EVENT_TIME_MAX_SKEW_SECONDS", "EVENT_TIME_MAX_AGE_SECONDS"])
def test_an_event_time_limit_past_any_date_span_is_refused_by_name(name: str) -> None:
    with pytest.raises(SettingsError, match=f"^app setting {name}: "):
        load_settings({**BASE, name: str(10**15)})  # would overflow timedelta when the runtime is built


def test_max_dequeue_count_is_taken_from_host_json_and_cannot_disagree(tmp_path: Path) -> None:
    host = tmp_path / "host.json"
    host.write_text(json.dumps({"version": "2.0", "extensions": {"queues": {"maxDequeueCount": 7}}}))
    assert load_webhook_settings(HOOK, host_json=host).max_dequeue_count == 7
    assert load_webhook_settings({**HOOK, "WEBHOOK_MAX_DEQUEUE_COUNT": "7"}, host_json=host).max_dequeue_count == 7
    with pytest.raises(SettingsError, match=r"WEBHOOK_MAX_DEQUEUE_COUNT: 5 disagrees with host\.json"):
        load_webhook_settings({**HOOK, "WEBHOOK_MAX_DEQUEUE_COUNT": "5"}, host_json=host)
    host.write_text(json.dumps({"extensions": {"queues": {"maxDequeueCount": "lots"}}}))
    with pytest.raises(SettingsError, match="maxDequeueCount must be a positive integer"):
        load_webhook_settings(HOOK, host_json=host)
    assert load_webhook_settings(HOOK, host_json=tmp_path / "absent.json").max_dequeue_count == 5


def test_the_shipped_host_json_gives_the_forwarder_its_max_dequeue_count() -> None:
    shipped = json.loads((Path(__file__).resolve().parent.parent / "host.json").read_text())
    assert load_webhook_settings(HOOK).max_dequeue_count == shipped["extensions"]["queues"]["maxDequeueCount"]


@pytest.mark.azurite
def test_forwarder_and_graph_runtime_get_their_tables_from_the_one_client_factory(azurite: Azurite, table_name: str) -> None:
    from shared.functions import build_forwarder, build_graph_runtime

    env = {
        **HOOK,
        "ALERTS_EVENTHUB_NAME": "alerts",
        "STATE_STORAGE_CONNECTION": azurite.connection_string,
        "DELIVERY_TABLE": table_name + "d",
        "GRAPH_TENANTS": "t1",
        "GRAPH_CURSOR_TABLE": table_name + "g",
        "ALERTS_EVENTHUB": "Endpoint=sb://127.0.0.1:9/;SharedAccessKeyName=k;SharedAccessKey=dmFsdWU=",
    }
    forwarder = build_forwarder(env)
    forwarder.deliveries.record_poisoned("default", "inc", 2)
    assert forwarder.deliveries.poisoned_revision("default", "inc") == 2
    graph = build_graph_runtime(env)
    assert graph is not None
    try:
        graph.poller.cursors.save("t1", "2026-11-20T09:00:00Z", ["graph:a:1"])
        assert graph.poller.cursors.load("t1") == ("2026-11-20T09:00:00Z", ["graph:a:1"])
    finally:
        graph.close()


def test_a_json_target_without_a_secret_is_refused_by_the_name_of_its_secret_setting() -> None:
    # an unsigned delivery could be forged by anyone who can reach the receiver
    with pytest.raises(SettingsError, match=r"^app setting WEBHOOK_SECRET: is missing"):
        load_webhook_settings({"WEBHOOK_URL": "https://hooks.example/a"})
    listed = [{"name": "soar", "url": "https://soar.example/x"}]
    with pytest.raises(SettingsError, match=re.escape("app setting WEBHOOK_TARGETS[0].secretSetting: is missing")):
        load_webhook_settings({"WEBHOOK_TARGETS": json.dumps(listed)})
    # Teams and Slack webhook URLs are their own credential: no HMAC secret needed
    teams = load_webhook_settings({"WEBHOOK_URL": "https://x.example/hook", "WEBHOOK_FORMAT": "teams"})
    assert teams.targets[0].secret is None


def test_an_unresolved_app_configuration_reference_fails_by_name_like_a_key_vault_one() -> None:
    ref = "@Microsoft.AppConfiguration(Endpoint=https://cfg.azconfig.io; Key=webhook-secret)"
    with pytest.raises(SettingsError, match=r"^app setting WEBHOOK_SECRET: its App Configuration reference was not resolved"):
        load_webhook_settings({**HOOK, "WEBHOOK_SECRET": ref})
