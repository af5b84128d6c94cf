"""coverage: techniques and tactics of enabled rules, and a Navigator layer the Navigator accepts."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from shared.__main__ import main
from shared.coverage import covered, navigator_layer
from shared.rules import default_rules_dir, load_rules


def test_coverage_lists_only_enabled_rules(tmp_path: Path) -> None:
    for path in default_rules_dir().glob("PH_RULE_MS_DefEndpoint_Alert_Exec_*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    masq = tmp_path / "PH_RULE_MS_DefEndpoint_Alert_Exec_Masq.yaml"
    masq.write_text(masq.read_text().replace("enabled: true", "enabled: false"))
    techniques, tactics = covered(load_rules([tmp_path]))
    assert sorted(techniques) == ["T1059.001", "T1105"]  # T1036.004 (Masquerading) is disabled
    assert techniques["T1105"] == ("Ingress Tool Transfer", ["PH_RULE_MS_DefEndpoint_Alert_Exec_IngressToolTrans"])
    assert "TA0005" not in tactics


def test_layer_follows_the_navigator_layer_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer_file = tmp_path / "layer.json"
    assert main(["coverage", "--layer", str(layer_file)]) == 0
    out = capsys.readouterr().out
    assert "T1053.002 Scheduled Task/Job: At (Windows): PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity" in out
    layer = json.loads(layer_file.read_text())
    assert layer["domain"] == "enterprise-attack" and layer["versions"]["layer"] == "4.5"
    assert isinstance(layer["name"], str) and layer["name"]
    ids = [t["techniqueID"] for t in layer["techniques"]]
    assert "T1053.002" in ids and len(ids) == len(set(ids))
    for entry in layer["techniques"]:
        assert entry["score"] == len(entry["comment"].split(", ")) >= 1
        assert entry["score"] <= layer["gradient"]["maxValue"]
    assert layer == navigator_layer(load_rules([default_rules_dir()]))


@pytest.mark.parametrize(
    "argv",
    [
        ["coverage", "--layer", "{tmp}/missing/dir/layer.json"],
        ["test-rules", "--junit", "{tmp}/missing/dir/junit.xml", "--test", "two tenants"],
        ["import", "fortisiem", "tests/data/fortisiem/expectRule.xml", "--out", "{tmp}/file"],
        pytest.param(
            ["import", "sigma", "tests/data/sigma/proc_creation_win_certutil_download.yml", "--out", "{tmp}/file"],
            marks=pytest.mark.skipif(find_spec("sigma") is None, reason="pySigma needs Python >= 3.11"),
        ),
    ],
)
def test_an_unwritable_output_is_one_error_line_and_exit_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    (tmp_path / "file").write_text("a file where a folder is expected")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "Traceback" not in "\n".join(err)
