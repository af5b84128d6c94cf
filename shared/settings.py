"""App settings, read once into a typed, validated object; a bad setting fails naming itself."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    if not settings.storage_connection and not (settings.table_service_uri and settings.queue_service_uri):
        raise SettingsError(
            "app setting STATE_STORAGE_CONNECTION is missing (or set both STATE_STORAGE__tableServiceUri and "
            "STATE_STORAGE__queueServiceUri for identity-based access)"
        )
    return settings
