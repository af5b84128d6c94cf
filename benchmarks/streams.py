"""Benchmark streams of Defender streaming records (JSON lines), every record distinct.

Each stream is a function ``rows(start, count)`` yielding encoded lines for record numbers
``start .. start+count-1``: a record depends only on its number, so a 1 GB file is written in pieces
without repeating any record, and every benchmark reads exactly the same bytes.

* ``non-alert``: 99 % rows of non-alert tables (synthetic columns), 1 % AlertInfo.
* ``non-alert-real``: the same mix built from the real streaming samples in
  ``../shared/samples/real`` (their columns and sizes; ids, hashes and times varied per record).
* ``alert-dense``: 100 % AlertInfo rows, categories and techniques mixed so that most default rules
  see matches; alert ids repeat within the window, so groups grow and incidents update.
* ``seed-match``: 100 % AlertInfo rows of the seed rule (Persistence, T1053.005) over 5,000 groups.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples" / "real"
TABLES = ["DeviceProcessEvents", "DeviceNetworkEvents", "DeviceFileEvents", "DeviceRegistryEvents", "DeviceLogonEvents"]
CATEGORIES = ["Persistence", "Execution", "CredentialAccess", "Discovery", "SuspiciousActivity", "DefenseEvasion"]
TECHNIQUES = [
    '["Scheduled Task/Job (T1053)","Scheduled Task (T1053.005)"]',
    '["PowerShell (T1059.001)"]',
    '["Masquerading (T1036)"]',
    '["Ingress Tool Transfer (T1105)"]',
    '["OS Credential Dumping (T1003)","LSASS Memory (T1003.001)"]',
    '["System Network Configuration Discovery (T1016)"]',
    '["Valid Accounts (T1078)"]',
    "",
]

Rows = Callable[[int, int], Iterator[bytes]]


def _ts(i: int, step_ms: int = 37) -> str:
    return (T0 + timedelta(milliseconds=i * step_ms)).isoformat().replace("+00:00", "Z")


def _alert(i: int, alert_id: str, category: str, techniques: str, tenant: str, ts: str) -> bytes:
    props = {
        "Timestamp": ts,
        "AlertId": alert_id,
        "Title": f"Suspicious {category} activity",
        "Category": category,
        "Severity": "High",
        "ServiceSource": "Microsoft Defender for Endpoint",
        "DetectionSource": "EDR",
        "AttackTechniques": techniques,
        "MachineGroup": None,
        "Seq": i,  # keeps every record distinct
    }
    rec = {
        "time": ts,
        "tenantId": tenant,
        "operationName": "Publish",
        "category": "AdvancedHunting-AlertInfo",
        "properties": props,
    }
    return orjson.dumps(rec)


def non_alert(start: int, count: int) -> Iterator[bytes]:
    for i in range(start, start + count):
        ts = _ts(i)
        tenant = f"tenant-{i % 5}"
        if i % 100 == 0:
            rnd = random.Random(i)
            yield _alert(i, f"da{i // 300}_{rnd.randint(1, 3)}", "Persistence", rnd.choice(TECHNIQUES[:3]), tenant, ts)
            continue
        props = {
            "Timestamp": ts,
            "DeviceId": f"{i * 2654435761 % (1 << 160):040x}",
            "DeviceName": f"host-{i % 977}.contoso.local",
            "ActionType": "ProcessCreated",
            "FileName": "svchost.exe",
            "FolderPath": "C:\\Windows\\System32\\svchost.exe",
            "SHA256": f"{i * 0x9E3779B97F4A7C15 % (1 << 256):064x}",
            "ProcessCommandLine": "svchost.exe -k netsvcs -p -s Schedule",
            "AccountName": "system",
            "AccountDomain": "nt authority",
            "InitiatingProcessFileName": "services.exe",
            "InitiatingProcessCommandLine": "services.exe",
            "InitiatingProcessAccountName": "system",
            "ReportId": i,
            "AdditionalFields": '{"ProcessStartKey":1234}',
            "MachineGroup": None,
        }
        rec = {
            "time": ts,
            "tenantId": tenant,
            "operationName": "Publish",
            "category": f"AdvancedHunting-{TABLES[i % len(TABLES)]}",
            "properties": props,
        }
        yield orjson.dumps(rec)


def _real_templates() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    for path in sorted(SAMPLES.glob("streaming-api__*")):
        text = path.read_text()
        try:
            doc = orjson.loads(text)
            records.extend(doc if isinstance(doc, list) else [doc])
        except orjson.JSONDecodeError:
            records.extend(orjson.loads(line) for line in text.splitlines() if line.strip())
    records = [r for r in records if isinstance(r, dict) and str(r.get("category", "")).startswith("AdvancedHunting-")]
    alerts = [r for r in records if r["category"] == "AdvancedHunting-AlertInfo"]
    others = [r for r in records if r["category"] != "AdvancedHunting-AlertInfo"]
    if not alerts or not others:
        raise SystemExit(f"no streaming samples under {SAMPLES}")
    return others, alerts


_HEX_KEYS = ("SHA1", "SHA256", "MD5", "DeviceId", "BehaviorId", "AlertId")


def non_alert_real(start: int, count: int) -> Iterator[bytes]:
    others, alerts = _real_templates()
    for i in range(start, start + count):
        rnd = random.Random(i)
        template = alerts[i % len(alerts)] if i % 100 == 0 else others[i % len(others)]
        props = dict(template["properties"])
        for key in _HEX_KEYS:
            value = props.get(key)
            if isinstance(value, str) and value:
                if key == "AlertId" and i % 100 == 0:
                    props[key] = f"da{i // 300}_{rnd.randint(1, 3)}"
                else:
                    props[key] = f"{rnd.getrandbits(4 * len(value)):0{len(value)}x}"[: len(value)]
        props["Timestamp"] = _ts(i)
        yield orjson.dumps({**template, "time": _ts(i), "properties": props})


def alert_dense(start: int, count: int) -> Iterator[bytes]:
    for i in range(start, start + count):
        rnd = random.Random(i)
        category = CATEGORIES[i % len(CATEGORIES)]
        techniques = TECHNIQUES[(i // 7) % len(TECHNIQUES)]
        # ~1.7 events per alert id: groups are opened and updated, ids keep coming (bounded per window).
        alert_id = f"da{(i * 3) // 5}_{rnd.randint(1, 9)}"
        yield _alert(i, alert_id, category, techniques, f"tenant-{i % 7}", _ts(i, 3))


def seed_match(start: int, count: int) -> Iterator[bytes]:
    for i in range(start, start + count):
        yield _alert(i, f"da{i % 5000}", "Persistence", TECHNIQUES[0], f"tenant-{i % 3}", _ts(i, 3))


STREAMS: dict[str, Rows] = {
    "non-alert": non_alert,
    "non-alert-real": non_alert_real,
    "alert-dense": alert_dense,
    "seed-match": seed_match,
}


def build(kind: str, count: int) -> bytes:
    return b"\n".join(STREAMS[kind](0, count)) + b"\n"


def write_file(path: Path, kind: str, megabytes: int) -> int:
    """Write ``megabytes`` of distinct records of a stream; returns the record count."""
    rows = STREAMS[kind]
    written = number = 0
    with path.open("wb") as f:
        while written < megabytes * 1_000_000:
            chunk = b"\n".join(rows(number, 10_000)) + b"\n"
            f.write(chunk)
            written += len(chunk)
            number += 10_000
    return number
