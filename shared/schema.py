"""JSON Schema of rule files, generated from the pydantic model (``schema/rule.schema.json``).

Editors use it through the ``# yaml-language-server: $schema=...`` line at the top of each rule
file; ``tests/test_schema.py`` fails when the committed file differs from the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rules import RuleModel

MODELINE_PREFIX = "# yaml-language-server: $schema="


def rule_schema() -> dict[str, Any]:
    schema = RuleModel.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(rule_schema(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def default_schema_path() -> Path:
    return Path(__file__).resolve().parent.parent / "schema" / "rule.schema.json"
