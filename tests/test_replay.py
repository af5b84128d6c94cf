"""The replay command end to end: exit codes, messages, stdin, samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
SEED = "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity"


def replay(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "shared", "replay", *args], cwd=REPO, input=stdin, capture_output=True, timeout=300
    )


def snapshots(result: subprocess.CompletedProcess[bytes]) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_real_samples_run_clean_and_fire_no_seed_incident(samples: Path) -> None:
    files = sorted(str(p) for p in samples.iterdir() if p.suffix != ".md")
    result = replay(*files)
    assert result.returncode == 0, result.stderr.decode()
    assert not [s for s in snapshots(result) if s["ruleId"] == SEED]
    err = result.stderr.decode()
    assert "records read: 18, rejected: 0" in err
    assert "Traceback" not in err


def test_demo_alerts_fire_the_seed_rule_in_every_wire_format() -> None:
    result = replay(*sorted(str(p) for p in (REPO / "samples" / "demo").glob("*.json*")))
    assert result.returncode == 0
    seed = [s for s in snapshots(result) if s["ruleId"] == SEED]
    formats = {e["format"] for s in seed for e in s["triggerEvents"]}
    assert formats == {"graph", "streaming", "mde", "normalized"}
    folded = next(s for s in seed if s["attributes"]["alertIdStr"] == "da638700000000000001_-1111111111")
    assert folded["attributes"]["incidentCount"] == 2  # two versions of one Graph alert, one incident


def test_rejected_records_are_listed_with_position_and_exit_1(tmp_path: Path) -> None:
    good = orjson.dumps(
        {"eventType": "M365Defender-Alert-Persistence", "attackTechniqueId": "T1053", "alertIdStr": "a", "eventId": "1"}
    )
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + b"\n{broken\n" + b'{"no": "format"}\n')
    result = replay(str(path))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"{path}:2: not JSON" in err and f"{path}:3: record of no known format" in err
    assert len(snapshots(result)) == 1


def test_stdin_is_read_with_a_dash() -> None:
    rec = {"eventType": "M365Defender-Alert-Persistence", "attackTechniqueId": ["T1053.005"], "alertIdStr": "x", "tenantId": "t"}
    result = replay("-", stdin=orjson.dumps(rec) + b"\n")
    assert result.returncode == 0 and snapshots(result)[0]["attributes"]["alertIdStr"] == "x"


def test_usage_errors_exit_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    missing = replay(str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and missing.stderr.decode().strip() == f"error: no such file: {tmp_path / 'nope.json'}"
    bad_rules = tmp_path / "rules"
    bad_rules.mkdir()
    (bad_rules / "r.yaml").write_text("id: X\n")
    invalid = replay("--rules", str(bad_rules), str(REPO / "samples" / "demo" / "normalized.jsonl"))
    assert invalid.returncode == 2
    lines = invalid.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid rules:") and "r.yaml" in lines[0]
    usage = replay()
    assert usage.returncode == 2 and b"Traceback" not in usage.stderr


def test_replaying_the_same_input_twice_gives_the_same_incident_revisions() -> None:
    files = sorted(str(p) for p in (REPO / "samples" / "demo").glob("*.json*"))
    first = {(s["incidentId"], s["revision"]) for s in snapshots(replay(*files))}
    second = {(s["incidentId"], s["revision"]) for s in snapshots(replay(*files))}
    assert first == second and first


def test_a_file_starting_with_a_utf8_byte_order_mark_reads_like_the_same_file_without(tmp_path: Path) -> None:
    # PowerShell's Out-File and Notepad write UTF-8 with a BOM; the alerts are the same alerts
    for source in sorted((REPO / "samples" / "demo").glob("*.json*")):
        with_bom = tmp_path / source.name
        with_bom.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
        plain, marked = replay(str(source)), replay(str(with_bom))
        assert marked.returncode == plain.returncode == 0, marked.stderr.decode()

        def essentials(result: subprocess.CompletedProcess[bytes]) -> list[tuple[object, ...]]:
            return [(s["incidentId"], s["revision"], s["attributes"], s["entities"]) for s in snapshots(result)]

        assert essentials(marked) == essentials(plain) != []
