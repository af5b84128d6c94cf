"""Infra checks without the Bicep CLI: every file parses (pycep), app settings and roles match the
code, parameters are described, outputs carry no secrets. checkov runs in scripts/test.sh."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

# Settings the code reads that the Azure deployment deliberately does not set, with the reason.
LOCAL_ONLY = {
    "STATE_STORAGE_CONNECTION": "connection string for Azurite/local runs; Azure uses STATE_STORAGE__*ServiceUri + identity",
    "ALERTS_EVENTHUB": "connection-string form for local runs; Azure uses ALERTS_EVENTHUB__fullyQualifiedNamespace",
    "WEBHOOK_ALLOW_HTTP": "plain HTTP to loopback is for tests and local runs only",
    "WEBHOOK_TARGETS": "optional extra targets; users add them after deployment",
    "RULES_DIR": "optional; the package ships rules/",
    "GRAPH_CERTIFICATE_PATH": "certificate auth is configured by hand (the certificate is not a template input)",
    "GRAPH_BASE_URL": "national clouds only",
}
# Settings the Bicep sets for the Functions host and bindings rather than for our code.
PLATFORM = re.compile(r"^(AzureWebJobsStorage__\w+|APPLICATIONINSIGHTS_\w+|ALERTS_EVENTHUB__(credential|clientId))$")
# Roles the code needs, by built-in role definition id.
REQUIRED_ROLES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner: host storage, checkpoints, Flex deployment",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor: state, deliveries, cursors",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor: incidents, dead letters, poison",
    "a638d3c7-ab3a-418d-83e6-5f17a39d4fde": "Azure Event Hubs Data Receiver: correlate_alerts trigger",
    "2b629674-e913-4c01-ae53-ef4638d8f975": "Azure Event Hubs Data Sender: poll_graph_alerts publishes",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher: App Insights with local auth off",
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User: Key Vault references",
}


def parse(text: str | None = None, path: Path | None = None) -> dict[str, Any]:
    if text is not None:
        return BicepParser().parse(text=text)  # type: ignore[no-any-return]
    return BicepParser().parse(file_path=path)  # type: ignore[no-any-return]


def code_settings() -> tuple[set[str], set[str]]:
    """(setting names, binding connection prefixes) the code reads."""
    names: set[str] = set()
    prefixes: set[str] = set()
    for path in [REPO / "function_app.py", *sorted((REPO / "shared").glob("*.py"))]:
        text = path.read_text()
        if path.name == "settings.py":
            names |= set(re.findall(r'alias="([A-Za-z_][A-Za-z0-9_]*)"', text))
        names |= set(re.findall(r'source(?:\.(?:get|text|flag|name)\(|\[)"([A-Z][A-Za-z0-9_]*)"', text))
        names |= set(re.findall(r'"%([A-Z][A-Z0-9_]*)%"', text))
        prefixes |= set(re.findall(r'connection="([A-Za-z_][A-Za-z0-9_]*)"', text))
    return names, prefixes


def props(resource: dict[str, Any]) -> dict[str, Any]:
    config = resource["config"]
    if "condition" in config:  # `if (...)` resources nest their body one level deeper
        config = config["config"]
    return config["properties"]  # type: ignore[no-any-return]


def bicep_settings(parsed: dict[str, Any]) -> set[str]:
    site = props(parsed["resources"]["site"])["siteConfig"]
    return {item["name"] for item in site["appSettings"]}


def app_roles(parsed: dict[str, Any]) -> set[str]:
    """Role ids assigned to the app's identity (param principalId)."""
    roles = parsed["variables"]["roles"]["value"]
    out = set()
    for resource in parsed["resources"].values():
        if resource.get("type") != "Microsoft.Authorization/roleAssignments":
            continue
        properties = props(resource)
        if properties.get("principalId") != "principalId":
            continue
        name = properties["roleDefinitionId"]["function"]["parameters"]["resource_name_1"]["operator"]["operands"]["operand_2"]
        out.add(roles[name])
    return out


def settings_problems(parsed_app: dict[str, Any]) -> list[str]:
    names, prefixes = code_settings()
    in_bicep = bicep_settings(parsed_app)
    problems = [f"code reads {n} but the Bicep does not set it" for n in sorted(names - in_bicep - set(LOCAL_ONLY))]
    for prefix in sorted(prefixes):
        if prefix != "AzureWebJobsStorage" and not any(s == prefix or s.startswith(prefix + "__") for s in in_bicep):
            problems.append(f"binding connection {prefix} has no {prefix}__* setting in the Bicep")
    problems += [f"the Bicep sets {n} but no code reads it" for n in sorted(in_bicep - names) if not PLATFORM.match(n)]
    return problems


def roles_problems(parsed_rbac: dict[str, Any]) -> list[str]:
    assigned = app_roles(parsed_rbac)
    missing = [f"missing role: {REQUIRED_ROLES[r]}" for r in sorted(set(REQUIRED_ROLES) - assigned)]
    extra = [f"role {r} assigned but not needed by the code" for r in sorted(assigned - set(REQUIRED_ROLES))]
    return missing + extra


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_bicep_file_parses(path: Path) -> None:
    parsed = parse(path=path)
    assert parsed["resources"] or parsed.get("modules")


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_parameter_has_a_description(path: Path) -> None:
    params = parse(path=path).get("parameters", {})
    undescribed = [n for n, p in params.items() if not any(d["type"] == "description" for d in p.get("decorators", []))]
    assert not undescribed


def test_outputs_carry_names_never_secrets() -> None:
    for path in BICEP_FILES:
        text = path.read_text()
        for line in re.findall(r"^output .*$", text, re.MULTILINE):
            bad = (
                r"(?i)listkeys|listconnectionstrings|primarykey|secondarykey|connectionstring|password"
                r"|webhookSecret\b|graphClientSecret\b"
            )
            assert not re.search(bad, line), f"{path}: {line}"


def test_app_settings_match_what_the_code_reads() -> None:
    assert settings_problems(parse(path=INFRA / "modules" / "functionapp.bicep")) == []


def test_roles_match_what_the_code_needs() -> None:
    assert roles_problems(parse(path=INFRA / "modules" / "rbac.bicep")) == []


def test_removing_an_app_setting_from_the_bicep_is_caught() -> None:
    text = (INFRA / "modules" / "functionapp.bicep").read_text()
    mutated = "\n".join(line for line in text.splitlines() if "'WEBHOOK_URL'" not in line)
    assert settings_problems(parse(text=mutated)) == ["code reads WEBHOOK_URL but the Bicep does not set it"]


def test_removing_a_role_assignment_from_the_bicep_is_caught() -> None:
    text = (INFRA / "modules" / "rbac.bicep").read_text()
    mutated = re.sub(r"resource hubReceiver .*?\n}\n", "", text, flags=re.DOTALL)
    assert mutated != text
    assert roles_problems(parse(text=mutated)) == ["missing role: Azure Event Hubs Data Receiver: correlate_alerts trigger"]


def test_storage_and_event_hubs_allow_no_keys_and_old_tls() -> None:
    storage = props(parse(path=INFRA / "modules" / "storage.bicep")["resources"]["account"])
    assert storage["allowSharedKeyAccess"] is False and storage["minimumTlsVersion"] == "TLS1_2"
    assert storage["supportsHttpsTrafficOnly"] is True and storage["allowBlobPublicAccess"] is False
    hub = props(parse(path=INFRA / "modules" / "eventhubs.bicep")["resources"]["created"])
    assert hub["disableLocalAuth"] is True and hub["minimumTlsVersion"] == "1.2"


def test_azd_manifest_points_at_the_infra() -> None:
    import yaml

    manifest = yaml.safe_load((REPO / "azure.yaml").read_text())
    assert manifest["infra"] == {"provider": "bicep", "path": "infra"}
    assert manifest["services"]["api"]["host"] == "function"
    assert (INFRA / "main.parameters.json").is_file()
