"""The committed JSON Schema of rule files is current, and editors using it agree with the loader."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from shared.rules import default_rules_dir, rule_files
from shared.schema import MODELINE_PREFIX, default_schema_path, rule_schema, schema_text


def test_committed_schema_is_generated_from_the_current_model() -> None:
    committed = default_schema_path().read_text(encoding="utf-8")
    assert committed == schema_text(), "schema/rule.schema.json is stale: run `python -m shared schema --write`"


def test_every_shipped_rule_validates_against_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(rule_schema())
    for path in rule_files(default_rules_dir()):
        errors = sorted(validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8"))), key=str)
        assert not errors, f"{path}: {errors[0].message}"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(timeWindw=300), "Additional properties are not allowed"),
        (lambda d: d.update(severity=11), "11 is greater than the maximum of 10"),
        (lambda d: d["subpatterns"][0].update(groupBY=["x"]), "Additional properties are not allowed"),
        (lambda d: d.pop("subpatterns"), "'subpatterns' is a required property"),
    ],
)
def test_the_schema_rejects_what_the_loader_rejects(change: object, expected: str) -> None:
    path = default_rules_dir() / "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)  # type: ignore[operator]
    messages = [e.message for e in jsonschema.Draft202012Validator(rule_schema()).iter_errors(data)]
    assert any(expected in m for m in messages), messages


def test_every_shipped_rule_names_the_schema_on_its_first_line() -> None:
    for path in rule_files(default_rules_dir()):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(MODELINE_PREFIX), path
        target = (path.parent / first[len(MODELINE_PREFIX) :]).resolve()
        assert target == default_schema_path().resolve(), path
        assert json.loads(target.read_text(encoding="utf-8"))["$schema"].startswith("https://json-schema.org/")


def test_schema_command_writes_the_file(tmp_path: Path) -> None:
    from shared.__main__ import main

    out = tmp_path / "s.json"
    assert main(["schema", "--write", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == schema_text()
