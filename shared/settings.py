"""App settings, read once into a typed, validated object; a bad setting fails naming itself."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .errors import SettingsError

# Azure naming rules. Tables: 3-63 letters and digits, starting with a letter ("tables" is reserved).
# Queues (and blob containers): 3-63 lower-case letters, digits and single dashes, no dash at either end.
TABLE_NAME = r"^(?![Tt][Aa][Bb][Ll][Ee][Ss]$)[A-Za-z][A-Za-z0-9]{2,62}$"
QUEUE_NAME = r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"
MAX_TIME_LIMIT_S = 10_000 * 366 * 86400
HOST_JSON = Path(__file__).resolve().parent.parent / "host.json"


class Settings(BaseModel):
    """Every app setting the code reads (the Bicep sets each of them; a test checks that)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, regex_engine="python-re")  # naming rules use look-ahead

    alerts_eventhub_name: str = Field(alias="ALERTS_EVENTHUB_NAME", min_length=1)
    alerts_consumer_group: str = Field(alias="ALERTS_CONSUMER_GROUP", default="$Default", min_length=1)
    incidents_queue: str = Field(alias="INCIDENTS_QUEUE", default="incidents", pattern=QUEUE_NAME)
    rejected_queue: str = Field(alias="REJECTED_QUEUE", default="rejected-alerts", pattern=QUEUE_NAME)
    state_table: str = Field(alias="STATE_TABLE", default="correlatorstate", pattern=TABLE_NAME)
    purge_schedule: str = Field(alias="PURGE_SCHEDULE", default="0 */15 * * * *")
    rules_dir: str | None = Field(alias="RULES_DIR", default=None)
    # Storage for state and dead letters: a connection string (local/Azurite) or identity-based URIs.
    storage_connection: str | None = Field(alias="STATE_STORAGE_CONNECTION", default=None)
    table_service_uri: str | None = Field(alias="STATE_STORAGE__tableServiceUri", default=None)
    queue_service_uri: str | None = Field(alias="STATE_STORAGE__queueServiceUri", default=None)
    blob_service_uri: str | None = Field(alias="STATE_STORAGE__blobServiceUri", default=None)
    deadletter_container: str = Field(
        alias="DEADLETTER_CONTAINER", default="deadletters", pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"
    )
    # Event times further ahead of arrival than this, or older than the max age, are clamped to arrival.
    # at most 10,000 years (all of datetime's span): more would overflow the runtime's timedelta
    event_time_max_skew_s: int = Field(alias="EVENT_TIME_MAX_SKEW_SECONDS", default=300, ge=0, le=MAX_TIME_LIMIT_S)
    event_time_max_age_s: int = Field(alias="EVENT_TIME_MAX_AGE_SECONDS", default=3650 * 86400, gt=0, le=MAX_TIME_LIMIT_S)
    managed_identity_client_id: str | None = Field(alias="AZURE_CLIENT_ID", default=None)

    def rules_path(self) -> Path:
        from .rules import default_rules_dir

        return Path(self.rules_dir) if self.rules_dir else default_rules_dir()


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default: the process environment).

    Raises:
        SettingsError: naming the missing or malformed setting.
    """
    source = dict(os.environ if env is None else env)
    _reject_unresolved_references(source, [str(f.alias) for f in Settings.model_fields.values()])
    try:
        settings = Settings.model_validate({k: v for k, v in source.items() if v != ""})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"app setting {name}: {err['msg']}")
        raise SettingsError("; ".join(problems)) from None
    if not settings.storage_connection and not (
        settings.table_service_uri and settings.queue_service_uri and settings.blob_service_uri
    ):
        raise SettingsError(
            "app setting STATE_STORAGE_CONNECTION is missing (or set STATE_STORAGE__tableServiceUri, "
            "STATE_STORAGE__queueServiceUri and STATE_STORAGE__blobServiceUri for identity-based access)"
        )
    return settings


_REFERENCE_PREFIXES = ("@microsoft.keyvault(", "@microsoft.appconfiguration(")  # App Service reference syntaxes


def _is_unresolved_reference(value: object) -> bool:
    return isinstance(value, str) and value.lstrip().lower().startswith(_REFERENCE_PREFIXES)


def _reject_unresolved_references(source: Mapping[str, str], names: Iterable[str]) -> None:
    """A Key Vault reference the platform could not resolve arrives as its own text; using that text
    (as a secret, a URL, a name) would sign with a guessable value or worse, so any setting read that
    holds one is an error naming it, whatever it is called."""
    for name in names:
        if _is_unresolved_reference(source.get(name)):
            kind = "App Configuration" if "appconfiguration" in str(source.get(name)).lower() else "Key Vault"
            raise SettingsError(f"app setting {name}: its {kind} reference was not resolved (value missing or no access)")


class _Source:
    """The app settings as read by one loader: every value read is checked for an unresolved Key
    Vault reference under its own name; empty values count as unset."""

    def __init__(self, env: Mapping[str, str] | None) -> None:
        self.env = dict(os.environ if env is None else env)

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        if value is None or value == "":
            return default
        _reject_unresolved_references(self.env, [name])
        return value

    def text(self, name: str, default: str) -> str:
        value = self.get(name, default)
        return default if value is None else value

    def flag(self, name: str, default: bool = False) -> bool:
        """A strict boolean: true/false, 1/0 or yes/no (any case); anything else is an error."""
        value = self.get(name)
        if value is None:
            return default
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise SettingsError(f"app setting {name}: {value[:40]!r} is not a boolean (true or false)")

    def name(self, name: str, default: str, pattern: str, kind: str) -> str:
        value = self.text(name, default)
        if not re.fullmatch(pattern, value):
            rule = (
                "3-63 letters and digits, starting with a letter"
                if kind == "table"
                else "3-63 lower-case letters, digits and single dashes, not at either end"
            )
            raise SettingsError(f"app setting {name}: {value[:70]!r} is not a valid Azure {kind} name ({rule})")
        return value


def host_max_dequeue_count(path: Path = HOST_JSON) -> int | None:
    """``extensions.queues.maxDequeueCount`` from ``host.json`` (None when the file is not there).

    Raises: SettingsError when the file is there but unreadable or the value is not a positive integer.
    """
    import json

    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("extensions", {}).get("queues", {}).get("maxDequeueCount", 5)
    except (OSError, ValueError, AttributeError):
        raise SettingsError(f"{path.name}: cannot read extensions.queues.maxDequeueCount") from None
    if type(value) is not int or value < 1:
        raise SettingsError(f"{path.name}: extensions.queues.maxDequeueCount must be a positive integer")
    return value


class WebhookSettings(BaseModel):
    """Settings of ``forward_incident``: the targets, the delivery table and the poison queue."""

    model_config = ConfigDict(frozen=True)

    targets: tuple[Any, ...]
    delivery_table: str
    poison_queue: str
    max_dequeue_count: int


_TARGET_FIELDS = {
    "url": "url",
    "secret": "secretSetting",
    "format": "format",
    "actions": "actions",
    "min_severity": "minSeverity",
    "name": "name",
}
_DEFAULT_TARGET_SETTINGS = {
    "url": "WEBHOOK_URL",
    "secret": "WEBHOOK_SECRET",
    "format": "WEBHOOK_FORMAT",
    "actions": "WEBHOOK_ACTIONS",
    "min_severity": "WEBHOOK_MIN_SEVERITY",
    "name": "WEBHOOK_URL",
}


def _listed_setting(where: str, field: str) -> str:
    return f"{where}.{_TARGET_FIELDS.get(field, field)}"


def load_webhook_settings(
    env: Mapping[str, str] | None = None, *, host_json: Path = HOST_JSON, require_target: bool = True
) -> WebhookSettings:
    """Targets from ``WEBHOOK_URL`` (+ ``WEBHOOK_SECRET``, ``WEBHOOK_FORMAT``, ``WEBHOOK_ACTIONS``,
    ``WEBHOOK_MIN_SEVERITY``, ``WEBHOOK_ALLOW_HTTP``) and/or ``WEBHOOK_TARGETS`` (a JSON list of
    ``{name, url, secretSetting, format, actions, minSeverity}``; each secret read from the app
    setting it names, e.g. a Key Vault reference).

    Raises:
        SettingsError: naming the setting (never its secret value): each value is checked under its
            own name.
    """
    import json

    from .webhook import WebhookTarget

    source = _Source(env)
    allow_http = source.flag("WEBHOOK_ALLOW_HTTP")
    raw: list[tuple[dict[str, Any], Callable[[str], str]]] = []
    url = source.get("WEBHOOK_URL")
    if url:
        actions = source.text("WEBHOOK_ACTIONS", "created,updated")
        raw.append(
            (
                {
                    "name": "default",
                    "url": url,
                    "secret": source.get("WEBHOOK_SECRET"),
                    "format": source.text("WEBHOOK_FORMAT", "json"),
                    "actions": tuple(a.strip() for a in actions.split(",") if a.strip()),
                    "min_severity": source.text("WEBHOOK_MIN_SEVERITY", "1"),
                    "allow_http": allow_http,
                },
                lambda field: _DEFAULT_TARGET_SETTINGS.get(field, "WEBHOOK_URL"),
            )
        )
    listed_text = source.get("WEBHOOK_TARGETS")
    if listed_text:
        try:
            listed = json.loads(listed_text)
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
            listed = None
        if not isinstance(listed, list):
            raise SettingsError("app setting WEBHOOK_TARGETS: must be a JSON list of targets")
        for i, item in enumerate(listed):
            where = f"WEBHOOK_TARGETS[{i}]"
            if not isinstance(item, dict):
                raise SettingsError(f"app setting {where}: must be an object")
            unknown = set(item) - set(_TARGET_FIELDS.values())
            if unknown:
                raise SettingsError(f"app setting {where}: unknown keys {sorted(unknown)}")
            secret_setting = item.get("secretSetting")
            if secret_setting is not None and (not isinstance(secret_setting, str) or not source.get(secret_setting)):
                raise SettingsError(f"app setting {secret_setting} (secret of {where}) is missing")
            raw.append(
                (
                    {
                        "name": item.get("name", f"target{i}"),
                        "url": item.get("url", ""),
                        "secret": source.get(secret_setting) if secret_setting else None,
                        "format": item.get("format", "json"),
                        "actions": item.get("actions", ("created", "updated")),
                        "min_severity": item.get("minSeverity", 1),
                        "allow_http": allow_http,
                    },
                    functools.partial(_listed_setting, where),
                )
            )
    if not raw and require_target:
        raise SettingsError("app setting WEBHOOK_URL (or WEBHOOK_TARGETS) is missing")
    targets = []
    for item, setting_of in raw:
        try:
            target = WebhookTarget.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "url"
            raise SettingsError(f"app setting {setting_of(field)}: {first['msg']}") from None
        try:
            target.check_url()
        except SettingsError as exc:
            raise SettingsError(f"app setting {setting_of('url')}: {str(exc).split(': ', 1)[-1]}") from None
        if target.format == "json" and target.secret is None:
            # a receiver can only trust a signed delivery; Teams and Slack URLs are their own credential
            raise SettingsError(f"app setting {setting_of('secret')}: is missing (json deliveries are always signed)")
        targets.append(target)
    if len({t.name for t in targets}) != len(targets):
        raise SettingsError("app setting WEBHOOK_TARGETS: target names repeat")
    max_dequeue = _max_dequeue_count(source, host_json)
    incidents_queue = source.name("INCIDENTS_QUEUE", "incidents", QUEUE_NAME, "queue")
    return WebhookSettings(
        targets=tuple(targets),
        delivery_table=source.name("DELIVERY_TABLE", "webhookdeliveries", TABLE_NAME, "table"),
        poison_queue=source.name("INCIDENTS_POISON_QUEUE", f"{incidents_queue}-poison", QUEUE_NAME, "queue"),
        max_dequeue_count=max_dequeue,
    )


def _max_dequeue_count(source: _Source, host_json: Path) -> int:
    """``WEBHOOK_MAX_DEQUEUE_COUNT``, derived from ``host.json`` when unset; a value that disagrees
    with ``host.json`` fails start-up (the forwarder would give up too late or too early)."""
    from_host = host_max_dequeue_count(host_json)
    text = source.get("WEBHOOK_MAX_DEQUEUE_COUNT")
    if text is None:
        return from_host if from_host is not None else 5
    if not re.fullmatch(r"[0-9]{1,4}", text.strip()) or int(text) < 1:
        raise SettingsError(f"app setting WEBHOOK_MAX_DEQUEUE_COUNT: {text[:20]!r} is not a positive integer")
    value = int(text)
    if from_host is not None and value != from_host:
        raise SettingsError(
            f"app setting WEBHOOK_MAX_DEQUEUE_COUNT: {value} disagrees with host.json "
            f"extensions.queues.maxDequeueCount {from_host} (leave it unset to take host.json's)"
        )
    return value


class GraphSettings(BaseModel):
    """Settings of ``poll_graph_alerts``; ``tenants`` empty means the poller is off."""

    model_config = ConfigDict(frozen=True)

    tenants: tuple[str, ...]
    auth: str
    client_id: str | None
    client_secret: SecretStr | None
    certificate_path: str | None
    cursor_table: str
    base_url: str
    resources: tuple[str, ...] = ("alerts_v2", "incidents")
    eventhub_namespace: str | None
    eventhub_connection: SecretStr | None
    eventhub_name: str


def _is_eventhub_connection_string(text: str) -> bool:
    """What ``EventHubProducerClient.from_connection_string`` accepts: an endpoint and a key (or a SAS)."""
    parts = {k.strip().lower(): v for k, _, v in (p.partition("=") for p in text.split(";") if "=" in p)}
    has_key = parts.get("sharedaccesskeyname") and parts.get("sharedaccesskey")
    return bool(parts.get("endpoint", "").startswith("sb://") and (has_key or parts.get("sharedaccesssignature")))


def load_graph_settings(env: Mapping[str, str] | None = None) -> GraphSettings:
    """Raises: SettingsError naming the setting."""
    source = _Source(env)
    tenants = tuple(t.strip() for t in source.text("GRAPH_TENANTS", "").split(",") if t.strip())
    for tenant in tenants:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", tenant):
            raise SettingsError(f"app setting GRAPH_TENANTS: {tenant[:60]!r} is not a tenant id or domain")
    auth = source.text("GRAPH_AUTH", "managed_identity")
    if auth not in ("managed_identity", "client_secret", "certificate"):
        raise SettingsError("app setting GRAPH_AUTH: must be managed_identity, client_secret or certificate")
    if tenants and auth == "client_secret" and not (source.get("GRAPH_CLIENT_ID") and source.get("GRAPH_CLIENT_SECRET")):
        raise SettingsError("app settings GRAPH_CLIENT_ID and GRAPH_CLIENT_SECRET are needed with GRAPH_AUTH=client_secret")
    if tenants and auth == "certificate" and not (source.get("GRAPH_CLIENT_ID") and source.get("GRAPH_CERTIFICATE_PATH")):
        raise SettingsError("app settings GRAPH_CLIENT_ID and GRAPH_CERTIFICATE_PATH are needed with GRAPH_AUTH=certificate")
    namespace = source.get("ALERTS_EVENTHUB__fullyQualifiedNamespace")
    connection = source.get("ALERTS_EVENTHUB")
    if tenants and not (namespace or connection):
        raise SettingsError(
            "app setting ALERTS_EVENTHUB__fullyQualifiedNamespace (or ALERTS_EVENTHUB) is needed to publish Graph alerts"
        )
    if tenants and connection and not namespace and not _is_eventhub_connection_string(connection):
        raise SettingsError(
            "app setting ALERTS_EVENTHUB: not an Event Hubs connection string (Endpoint=sb://<namespace>/;"
            "SharedAccessKeyName=...;SharedAccessKey=...); in Azure set ALERTS_EVENTHUB__fullyQualifiedNamespace"
        )
    if tenants and not source.get("ALERTS_EVENTHUB_NAME"):
        raise SettingsError("app setting ALERTS_EVENTHUB_NAME is missing")
    base_url = source.text("GRAPH_BASE_URL", "https://graph.microsoft.com/v1.0")
    from .webhook import checked_url

    checked_url(base_url, allow_http=True, where="app setting GRAPH_BASE_URL")  # http only to loopback (emulators)
    client_secret = source.get("GRAPH_CLIENT_SECRET")
    resources = tuple(
        dict.fromkeys(r.strip() for r in source.text("GRAPH_RESOURCES", "alerts_v2,incidents").split(",") if r.strip())
    )
    if not resources or any(r not in ("alerts_v2", "incidents") for r in resources):
        raise SettingsError("app setting GRAPH_RESOURCES: a comma-separated list of alerts_v2 and incidents")
    return GraphSettings(
        tenants=tenants,
        auth=auth,
        client_id=source.get("GRAPH_CLIENT_ID") or source.get("AZURE_CLIENT_ID"),
        client_secret=SecretStr(client_secret) if client_secret else None,
        certificate_path=source.get("GRAPH_CERTIFICATE_PATH"),
        cursor_table=source.name("GRAPH_CURSOR_TABLE", "graphcursors", TABLE_NAME, "table"),
        base_url=base_url,
        resources=resources,
        eventhub_namespace=namespace,
        eventhub_connection=SecretStr(connection) if connection else None,
        eventhub_name=source.text("ALERTS_EVENTHUB_NAME", ""),
    )
