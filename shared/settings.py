"""App settings, read once into a typed, validated object; a bad setting fails naming itself."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .errors import SettingsError


class Settings(BaseModel):
    """Every app setting the code reads (the Bicep sets each of them; a test checks that)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    alerts_eventhub_name: str = Field(alias="ALERTS_EVENTHUB_NAME", min_length=1)
    alerts_consumer_group: str = Field(alias="ALERTS_CONSUMER_GROUP", default="$Default", min_length=1)
    incidents_queue: str = Field(alias="INCIDENTS_QUEUE", default="incidents", pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
    rejected_queue: str = Field(alias="REJECTED_QUEUE", default="rejected-alerts", pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
    state_table: str = Field(alias="STATE_TABLE", default="correlatorstate", pattern=r"^[A-Za-z][A-Za-z0-9]{2,62}$")
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
    event_time_max_skew_s: int = Field(alias="EVENT_TIME_MAX_SKEW_SECONDS", default=300, ge=0)
    event_time_max_age_s: int = Field(alias="EVENT_TIME_MAX_AGE_SECONDS", default=3650 * 86400, gt=0)
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


def _reject_unresolved_references(source: Mapping[str, str]) -> None:
    """A Key Vault reference the platform could not resolve arrives as its own text; using that text
    as a secret would sign with a guessable value, so it is an error naming the setting."""
    for name, value in source.items():
        if isinstance(value, str) and value.startswith("@Microsoft.KeyVault(") and ("SECRET" in name or "PASSWORD" in name):
            raise SettingsError(f"app setting {name}: its Key Vault reference was not resolved (secret missing or no access)")


class WebhookSettings(BaseModel):
    """Settings of ``forward_incident``: the targets, the delivery table and the poison queue."""

    model_config = ConfigDict(frozen=True)

    targets: tuple[Any, ...]
    delivery_table: str
    poison_queue: str
    max_dequeue_count: int


def load_webhook_settings(env: Mapping[str, str] | None = None) -> WebhookSettings:
    """Targets from ``WEBHOOK_URL`` (+ ``WEBHOOK_SECRET``, ``WEBHOOK_FORMAT``, ``WEBHOOK_ACTIONS``,
    ``WEBHOOK_MIN_SEVERITY``, ``WEBHOOK_ALLOW_HTTP``) and/or ``WEBHOOK_TARGETS`` (a JSON list of
    ``{name, url, secretSetting, format, actions, minSeverity}``; each secret read from the app
    setting it names, e.g. a Key Vault reference).

    Raises:
        SettingsError: naming the setting (never its secret value).
    """
    import json

    from pydantic import ValidationError as _VE

    from .webhook import WebhookTarget

    source = dict(os.environ if env is None else env)
    _reject_unresolved_references(source)
    allow_http = source.get("WEBHOOK_ALLOW_HTTP", "false").lower() in ("1", "true", "yes")
    raw: list[dict[str, Any]] = []
    if source.get("WEBHOOK_URL"):
        raw.append(
            {
                "name": "default",
                "url": source["WEBHOOK_URL"],
                "secret": source.get("WEBHOOK_SECRET") or None,
                "format": source.get("WEBHOOK_FORMAT", "json"),
                "actions": tuple(a.strip() for a in source.get("WEBHOOK_ACTIONS", "created,updated").split(",") if a.strip()),
                "min_severity": source.get("WEBHOOK_MIN_SEVERITY", "1"),
                "allow_http": allow_http,
            }
        )
    if source.get("WEBHOOK_TARGETS"):
        try:
            listed = json.loads(source["WEBHOOK_TARGETS"])
            assert isinstance(listed, list)
        except (ValueError, AssertionError):
            raise SettingsError("app setting WEBHOOK_TARGETS: must be a JSON list of targets") from None
        for i, item in enumerate(listed):
            if not isinstance(item, dict):
                raise SettingsError(f"app setting WEBHOOK_TARGETS[{i}]: must be an object")
            secret_setting = item.get("secretSetting")
            if secret_setting and not source.get(secret_setting):
                raise SettingsError(f"app setting {secret_setting} (secret of WEBHOOK_TARGETS[{i}]) is missing")
            raw.append(
                {
                    "name": item.get("name", f"target{i}"),
                    "url": item.get("url", ""),
                    "secret": source.get(secret_setting) if secret_setting else None,
                    "format": item.get("format", "json"),
                    "actions": tuple(item.get("actions", ("created", "updated"))),
                    "min_severity": item.get("minSeverity", 1),
                    "allow_http": allow_http,
                }
            )
    if not raw:
        raise SettingsError("app setting WEBHOOK_URL (or WEBHOOK_TARGETS) is missing")
    targets = []
    for i, item in enumerate(raw):
        where = "WEBHOOK_URL" if item["name"] == "default" and i == 0 and source.get("WEBHOOK_URL") else f"WEBHOOK_TARGETS[{i}]"
        try:
            target = WebhookTarget.model_validate(item)
        except _VE as exc:
            first = exc.errors()[0]
            raise SettingsError(f"app setting {where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        target.check_url()
        targets.append(target)
    if len({t.name for t in targets}) != len(targets):
        raise SettingsError("app setting WEBHOOK_TARGETS: target names repeat")
    try:
        max_dequeue = int(source.get("WEBHOOK_MAX_DEQUEUE_COUNT", "5"))
    except ValueError:
        raise SettingsError("app setting WEBHOOK_MAX_DEQUEUE_COUNT: must be an integer") from None
    incidents_queue = source.get("INCIDENTS_QUEUE", "incidents")
    return WebhookSettings(
        targets=tuple(targets),
        delivery_table=source.get("DELIVERY_TABLE", "webhookdeliveries"),
        poison_queue=source.get("INCIDENTS_POISON_QUEUE", f"{incidents_queue}-poison"),
        max_dequeue_count=max_dequeue,
    )


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
    eventhub_namespace: str | None
    eventhub_connection: SecretStr | None
    eventhub_name: str


def load_graph_settings(env: Mapping[str, str] | None = None) -> GraphSettings:
    """Raises: SettingsError naming the setting."""
    source = dict(os.environ if env is None else env)
    _reject_unresolved_references(source)
    tenants = tuple(t.strip() for t in source.get("GRAPH_TENANTS", "").split(",") if t.strip())
    auth = source.get("GRAPH_AUTH", "managed_identity")
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
    if tenants and not source.get("ALERTS_EVENTHUB_NAME"):
        raise SettingsError("app setting ALERTS_EVENTHUB_NAME is missing")
    return GraphSettings(
        tenants=tenants,
        auth=auth,
        client_id=source.get("GRAPH_CLIENT_ID") or source.get("AZURE_CLIENT_ID"),
        client_secret=SecretStr(source["GRAPH_CLIENT_SECRET"]) if source.get("GRAPH_CLIENT_SECRET") else None,
        certificate_path=source.get("GRAPH_CERTIFICATE_PATH"),
        cursor_table=source.get("GRAPH_CURSOR_TABLE", "graphcursors"),
        base_url=source.get("GRAPH_BASE_URL", "https://graph.microsoft.com/v1.0"),
        eventhub_namespace=namespace,
        eventhub_connection=SecretStr(connection) if connection else None,
        eventhub_name=source.get("ALERTS_EVENTHUB_NAME", ""),
    )
