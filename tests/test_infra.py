"""Infra checks without the Bicep CLI: every file parses (pycep), app settings and roles match the
code, parameters are described, outputs carry no secrets, and every resource type, API version and
Flex Consumption site property is one infra/flex-facts.json documents (with its source). checkov runs
in scripts/test.sh."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
FACTS = json.loads((INFRA / "flex-facts.json").read_text())

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


def name_value_pairs(node: Any, variables: dict[str, Any]) -> Iterator[tuple[str, Any, bool]]:
    """(setting name, value, conditional?) for every {name, value} pair in an appSettings
    expression, following variable references and concat()/conditional operators."""

    def walk(node: Any, conditional: bool) -> Iterator[tuple[str, Any, bool]]:
        if isinstance(node, str) and node in variables:
            yield from walk(variables[node]["value"], conditional)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, conditional)
        elif isinstance(node, dict):
            if set(node) == {"name", "value"} and isinstance(node["name"], str):
                yield node["name"], node["value"], conditional
                return
            operator = node.get("operator", {})
            if operator.get("type") == "conditional":
                operands = operator["operands"]
                yield from walk(operands["true_value"], True)
                yield from walk(operands["false_value"], True)
                return
            for value in node.values():
                yield from walk(value, conditional)

    yield from walk(node, False)


def site_setting_pairs(parsed: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    site = props(parsed["resources"]["site"])["siteConfig"]
    return list(name_value_pairs(site["appSettings"], parsed.get("variables", {})))


def bicep_settings(parsed: dict[str, Any]) -> set[str]:
    return {name for name, _, _ in site_setting_pairs(parsed)}


def app_roles(*parsed_files: dict[str, Any]) -> set[str]:
    """Role ids assigned to the app's identity (param principalId) in the given modules."""
    out = set()
    for parsed in parsed_files:
        roles = parsed["variables"]["roles"]["value"]
        for resource in parsed["resources"].values():
            if resource.get("type") != "Microsoft.Authorization/roleAssignments":
                continue
            properties = props(resource)
            if properties.get("principalId") != "principalId":
                continue
            role = properties["roleDefinitionId"]["function"]["parameters"]["resource_name_1"]["operator"]["operands"]
            out.add(roles[role["operand_2"]])
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


def roles_problems(*parsed_files: dict[str, Any]) -> list[str]:
    assigned = app_roles(*parsed_files)
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


def role_modules() -> list[dict[str, Any]]:
    return [parse(path=INFRA / "modules" / "rbac.bicep"), parse(path=INFRA / "modules" / "hubaccess.bicep")]


def test_roles_match_what_the_code_needs() -> None:
    assert roles_problems(*role_modules()) == []


def test_removing_an_app_setting_from_the_bicep_is_caught() -> None:
    text = (INFRA / "modules" / "functionapp.bicep").read_text()
    mutated = "\n".join(line for line in text.splitlines() if "'WEBHOOK_URL'" not in line)
    assert settings_problems(parse(text=mutated)) == ["code reads WEBHOOK_URL but the Bicep does not set it"]


def test_removing_a_role_assignment_from_the_bicep_is_caught() -> None:
    text = (INFRA / "modules" / "hubaccess.bicep").read_text()
    mutated = re.sub(r"resource hubReceiver .*?\n}\n", "", text, flags=re.DOTALL)
    assert mutated != text
    rbac = parse(path=INFRA / "modules" / "rbac.bicep")
    assert roles_problems(rbac, parse(text=mutated)) == ["missing role: Azure Event Hubs Data Receiver: correlate_alerts trigger"]


def test_storage_and_event_hubs_allow_no_keys_and_old_tls() -> None:
    storage = props(parse(path=INFRA / "modules" / "storage.bicep")["resources"]["account"])
    assert storage["allowSharedKeyAccess"] is False and storage["minimumTlsVersion"] == "TLS1_2"
    assert storage["supportsHttpsTrafficOnly"] is True and storage["allowBlobPublicAccess"] is False
    hub = props(parse(path=INFRA / "modules" / "eventhubs.bicep")["resources"]["namespace"])
    assert hub["disableLocalAuth"] is True and hub["minimumTlsVersion"] == "1.2"


def test_dead_letter_claim_checks_expire_by_lifecycle_rule_on_their_own_container() -> None:
    parsed = parse(path=INFRA / "modules" / "storage.bicep")
    text = json.dumps(props(parsed["resources"]["deadLetterLifecycle"]))
    # the rule's prefix is the dead-letter container (nothing in the app deletes claim checks)
    assert "deadLetterContainerName" in text and "deadLetterRetentionDays" in text and "daysAfterModificationGreaterThan" in text
    container = props(parsed["resources"]["deadLetterContainer"])
    assert container["publicAccess"] == "None"
    assert "'deadletters'" in (INFRA / "modules" / "storage.bicep").read_text()


def test_azd_manifest_points_at_the_infra() -> None:
    import yaml

    manifest = yaml.safe_load((REPO / "azure.yaml").read_text())
    assert manifest["infra"] == {"provider": "bicep", "path": "infra"}
    assert manifest["services"]["api"]["host"] == "function"
    assert (INFRA / "main.parameters.json").is_file()


# -- facts about Azure (infra/flex-facts.json), so the next ARM rejection is caught here -----------


def resources_of(parsed: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from parsed["resources"].items()


def api_version_problems(parsed_files: dict[str, dict[str, Any]]) -> list[str]:
    documented: dict[str, list[str]] = {k: v for k, v in FACTS["apiVersions"].items() if not k.startswith("_")}
    problems = []
    for file, parsed in parsed_files.items():
        for name, resource in resources_of(parsed):
            kind, version = resource["type"], resource["api_version"]
            if version not in documented.get(kind, []):
                problems.append(f"{file}: {name} uses {kind}@{version}, not in flex-facts.json apiVersions")
    return problems


def flex_site_problems(parsed_app: dict[str, Any]) -> list[str]:
    flex = FACTS["flexSite"]
    site = parsed_app["resources"]["site"]
    properties = props(site)
    problems = [f"site property {p} is not known to work on Flex" for p in properties if p not in flex["properties"]]
    site_config = properties["siteConfig"]
    for key in site_config:
        if key in flex["siteConfigRejected"]:
            problems.append(f"siteConfig.{key} is rejected on Flex Consumption ({flex['siteConfigRejected'][key]})")
        elif key not in flex["siteConfigAllowed"]:
            problems.append(f"siteConfig.{key} is not known to be allowed on Flex Consumption")
    problems += [
        f"app setting {name} is deprecated on Flex Consumption"
        for name in bicep_settings(parsed_app)
        if name in flex["appSettingsRejected"]
    ]
    if site["api_version"] < flex["minimumSitesApiVersion"]["value"]:
        problems.append(f"Microsoft.Web/sites@{site['api_version']} predates functionAppConfig")
    scale = properties["functionAppConfig"]["scaleAndConcurrency"]
    if scale["instanceMemoryMB"] not in flex["instanceMemoryMB"]["values"]:
        problems.append(f"instanceMemoryMB {scale['instanceMemoryMB']} is not a Flex size")
    return problems


def parsed_infra() -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(INFRA)): parse(path=p) for p in BICEP_FILES}


def decorator(param: dict[str, Any], kind: str) -> Any:
    for d in param.get("decorators", []):
        if d["type"] == kind:
            return d["argument"]
    return None


def test_every_fact_cites_a_known_source() -> None:
    sources = FACTS["sources"]
    assert all(url.startswith("https://") for url in sources.values())
    cited: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                is_refs = isinstance(value, list) and all(isinstance(v, str) and v in sources for v in value)
                if isinstance(value, list) and (key == "sources" or (value and is_refs)):
                    cited.extend(value)
                else:
                    collect(value)

    collect({k: v for k, v in FACTS.items() if k not in ("sources", "apiVersions")})
    assert cited and set(cited) <= set(sources)
    for group in ("properties", "siteConfigAllowed", "siteConfigRejected", "appSettingsRejected"):
        for key, refs in FACTS["flexSite"][group].items():
            assert key.startswith("_") or (refs and set(refs) <= set(sources)), f"{group}.{key} has no source"


def test_every_resource_type_and_api_version_is_a_documented_one() -> None:
    assert api_version_problems(parsed_infra()) == []


def test_an_undocumented_api_version_is_caught() -> None:
    text = (INFRA / "modules" / "identity.bicep").read_text().replace("@2023-01-31", "@2099-01-01")
    [problem] = api_version_problems({"identity.bicep": parse(text=text)})
    assert problem.startswith("identity.bicep: identity uses Microsoft.ManagedIdentity/userAssignedIdentities@2099-01-01")


def test_the_flex_site_sets_only_properties_flex_accepts() -> None:
    assert flex_site_problems(parse(path=INFRA / "modules" / "functionapp.bicep")) == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("ftpsState: 'Disabled'", "siteConfig.ftpsState is rejected on Flex Consumption"),
        ("http20Enabled: true", "siteConfig.http20Enabled is not known to be allowed on Flex Consumption"),
        ("linuxFxVersion: 'Python|3.11'", "siteConfig.linuxFxVersion is rejected on Flex Consumption"),
    ],
)
def test_a_site_config_property_flex_rejects_is_caught(line: str, problem: str) -> None:
    text = (INFRA / "modules" / "functionapp.bicep").read_text()
    mutated = text.replace("      minTlsVersion: '1.2'\n", f"      minTlsVersion: '1.2'\n      {line}\n")
    assert mutated != text
    [found] = flex_site_problems(parse(text=mutated))
    assert found.startswith(problem)


def test_a_deprecated_app_setting_is_caught() -> None:
    text = (INFRA / "modules" / "functionapp.bicep").read_text()
    line = "        { name: 'AZURE_CLIENT_ID', value: identityClientId }\n"
    mutated = text.replace(line, line + "        { name: 'FUNCTIONS_WORKER_RUNTIME', value: 'python' }\n")
    assert flex_site_problems(parse(text=mutated)) == ["app setting FUNCTIONS_WORKER_RUNTIME is deprecated on Flex Consumption"]


def test_region_runtime_and_sizes_are_limited_to_what_flex_offers() -> None:
    main = parse(path=INFRA / "main.bicep")["parameters"]
    assert decorator(main["location"], "allowed") == FACTS["regions"]["values"]
    pythons = decorator(main["pythonVersion"], "allowed")
    assert pythons == FACTS["pythonVersions"]["values"] and main["pythonVersion"]["default"] in pythons
    skus = FACTS["storageSkus"]
    assert set(decorator(main["storageSku"], "allowed")) == set(skus["everywhere"] + skus["zonalOnly"])
    assert main["storageSku"]["default"] in skus["everywhere"]
    limits = FACTS["flexSite"]["maximumInstanceCount"]
    count = main["maximumInstanceCount"]
    assert (decorator(count, "min_value"), decorator(count, "max_value")) == (limits["min"], limits["max"])
    app = parse(path=INFRA / "modules" / "functionapp.bicep")
    assert props(app["resources"]["site"])["functionAppConfig"]["runtime"] == {"name": "python", "version": "pythonVersion"}


def test_every_main_parameter_can_be_set_from_the_azd_environment() -> None:
    params = set(parse(path=INFRA / "main.bicep")["parameters"])
    mapped = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert params == set(mapped)
    for name in ("Namespace", "Name", "ResourceGroup", "SubscriptionId"):
        name = "existingEventHub" + name
        assert re.fullmatch(r"\$\{[A-Z_]+=\}", mapped[name]["value"]), name


def test_the_existing_hub_is_configured_in_its_own_resource_group_and_subscription() -> None:
    main = parse(path=INFRA / "main.bicep")
    access = main["modules"]["hubAccess"]
    scope = access["config"]["scope"]["function"]
    assert scope["type"] == "resource_group"
    assert scope["parameters"] == {"subscription_id": "hubSubscriptionId", "resource_group_name": "hubResourceGroup"}
    assert "condition" not in access["config"]  # created hub or existing one: always where the hub is
    text = (INFRA / "main.bicep").read_text()
    assert "existingEventHubResourceGroup : resourceGroupName" in text
    assert "existingEventHubSubscriptionId : subscription().subscriptionId" in text
    # The consumer group and Event Hubs roles live only in that module.
    for file, parsed in parsed_infra().items():
        kinds = {r["type"] for _, r in resources_of(parsed)}
        if file != "modules/hubaccess.bicep":
            assert "Microsoft.EventHub/namespaces/eventhubs/consumergroups" not in kinds, file
    rbac, hub = role_modules()
    assert app_roles(rbac).isdisjoint(app_roles(hub))


def test_no_secret_reference_without_its_secret() -> None:
    app = parse(path=INFRA / "modules" / "functionapp.bicep")
    conditional = {name: cond for name, _, cond in site_setting_pairs(app)}
    assert conditional["WEBHOOK_SECRET"] is True and conditional["GRAPH_CLIENT_SECRET"] is True
    conditions = {
        name: app["variables"][name]["value"]["operator"]["operands"]["condition"]
        for name in ("webhookSecretSettings", "graphSecretSettings")
    }
    assert conditions == {
        "webhookSecretSettings": "webhookSecretConfigured",
        "graphSecretSettings": "graphClientSecretConfigured",
    }
    references = [(name, cond) for name, value, cond in site_setting_pairs(app) if "@Microsoft.KeyVault" in json.dumps(value)]
    assert references == [("WEBHOOK_SECRET", True), ("GRAPH_CLIENT_SECRET", True)]
    text = (INFRA / "main.bicep").read_text()
    assert "webhookSecretConfigured: !empty(webhookSecret)" in text
    assert "graphClientSecretConfigured: graphAuth == 'client_secret' && !empty(graphClientSecret)" in text
    vault = parse(path=INFRA / "modules" / "keyvault.bicep")["resources"]
    assert vault["webhook"]["config"]["condition"]["operator"]["type"] == "not"


def test_key_vault_purge_protection_is_never_an_explicit_false() -> None:
    vault = props(parse(path=INFRA / "modules" / "keyvault.bicep")["resources"]["vault"])
    operands = vault["enablePurgeProtection"]["operator"]["operands"]
    assert (operands["condition"], operands["true_value"], operands["false_value"]) == ("purgeProtection", True, None)


def test_dead_letter_container_and_blob_access_for_claim_checks() -> None:
    storage = parse(path=INFRA / "modules" / "storage.bicep")
    assert storage["variables"]["deadLetterContainerName"]["value"] == "deadletters"
    assert storage["resources"]["deadLetterContainer"]["config"]["name"] == "deadLetterContainerName"
    app = parse(path=INFRA / "modules" / "functionapp.bicep")
    pairs = {name: value for name, value, _ in site_setting_pairs(app)}
    assert pairs["STATE_STORAGE__blobServiceUri"] == "blobUri" and pairs["DEADLETTER_CONTAINER"] == "deadletters"
    # Storage Blob Data Owner on the whole account covers reading and writing that container.
    assert "b7e6dc6d-f1e8-4753-8033-0f276bb0955b" in app_roles(parse(path=INFRA / "modules" / "rbac.bicep"))


def test_batch_summary_traces_are_never_sampled_so_the_readme_query_sums_everything() -> None:
    host = json.loads((REPO / "host.json").read_text())
    sampling = host["logging"]["applicationInsights"]["samplingSettings"]
    assert sampling["isEnabled"] is False or "Trace" in sampling["excludedTypes"].split(";")
    readme = (REPO / "README.md").read_text()
    assert 'traces\n| where message startswith "batch_summary "' in readme


def test_requirements_are_pinned_exactly() -> None:
    for file in ("requirements.txt", "requirements-dev.txt"):
        for line in (REPO / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if not line or line.startswith("-r "):
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[0-9][0-9A-Za-z.]*( *; *python_version *[<>=]+ *\"[0-9.]+\")?", line), (
                f"{file}: {line}"
            )
