"""Benchmark of the engine path (printed figures, not a test).

Run: .venv/bin/python benchmarks/bench_engine.py [--records N]

Reports, side by side in one run on a generated stream of Defender streaming records (99% non-alert
tables, 1% AlertInfo, a third of those T1053):
  * records/s through replay's engine path (normalize + prefilter + rules + in-memory store) vs
    orjson.loads alone on the same bytes (target: ratio >= 0.5);
  * compiled seed-predicate evaluations/s (target: >= 1,000,000);
  * memory per open group for a COUNT(*) rule (target: < 1 KiB).
The last line is JSON with the figures.
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import sys
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.engine import Engine, utc_now
from shared.normalize import NormalizedEvent, Normalizer, iter_file
from shared.replay import replay
from shared.rules import default_rules_dir, load_rules
from shared.state import MemoryStateStore

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
TABLES = ["DeviceProcessEvents", "DeviceNetworkEvents", "DeviceFileEvents", "DeviceRegistryEvents", "DeviceLogonEvents"]


def generate(n: int, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    lines = []
    for i in range(n):
        ts = (T0 + timedelta(milliseconds=i * 37)).isoformat().replace("+00:00", "Z")
        tenant = f"tenant-{i % 5}"
        if i % 100 == 0:
            techniques = rnd.choice(
                ['["Scheduled Task/Job (T1053)","Scheduled Task (T1053.005)"]', '["PowerShell (T1059.001)"]', '""']
            )
            props = {
                "Timestamp": ts,
                "AlertId": f"da{i // 300}_{rnd.randint(1, 3)}",
                "Title": "Suspicious Task Scheduler activity",
                "Category": "Persistence",
                "Severity": "High",
                "ServiceSource": "Microsoft Defender for Endpoint",
                "DetectionSource": "EDR",
                "AttackTechniques": techniques,
                "MachineGroup": None,
            }
            rec = {
                "time": ts,
                "tenantId": tenant,
                "operationName": "Publish",
                "category": "AdvancedHunting-AlertInfo",
                "properties": props,
            }
        else:
            props = {
                "Timestamp": ts,
                "DeviceId": f"{i:040x}",
                "DeviceName": f"host-{i % 977}.contoso.local",
                "ActionType": "ProcessCreated",
                "FileName": "svchost.exe",
                "FolderPath": "C:\\Windows\\System32\\svchost.exe",
                "SHA256": f"{i:064x}",
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
        lines.append(orjson.dumps(rec))
    return b"\n".join(lines) + b"\n"


def best_of(runs: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def big_file(megabytes: int) -> None:
    """Replay a large JSON-lines file through `python -m shared replay` and report the child's peak RSS."""
    import subprocess

    path = Path(f"/tmp/bench-big-{megabytes}mb.jsonl")
    chunk = generate(20_000, seed=11)
    if not path.exists() or path.stat().st_size < megabytes * 1_000_000:
        with path.open("wb") as f:
            written = 0
            while written < megabytes * 1_000_000:
                f.write(chunk)
                written += len(chunk)
    start = time.perf_counter()
    # Sample the child's own RSS from /proc: ru_maxrss of a child also counts the parent's pages at fork.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared", "replay", str(path)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak_kb = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        peak_kb = max(peak_kb, int(line.split()[1]))
        except OSError:
            break
        time.sleep(0.05)
    stderr = proc.stderr.read() if proc.stderr else b""
    elapsed = time.perf_counter() - start
    peak_mb = peak_kb / 1024
    result = subprocess.CompletedProcess(proc.args, proc.returncode, b"", stderr)
    summary = result.stderr.decode().splitlines()[0] if result.stderr else ""
    figures = {
        "file_mb": round(path.stat().st_size / 1e6),
        "seconds": round(elapsed, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "exit": result.returncode,
        "summary": summary,
    }
    print(f"replay of {figures['file_mb']} MB: {figures['seconds']} s, peak RSS {figures['peak_rss_mb']} MB ({summary})")
    print(orjson.dumps(figures).decode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--big-file-mb", type=int, default=0, help="replay a JSON-lines file this big (MB); report peak RSS")
    args = parser.parse_args()
    if args.big_file_mb:
        big_file(args.big_file_mb)
        return
    rules = load_rules([default_rules_dir()])
    data = generate(args.records)
    lines = data.splitlines()
    print(f"stream: {args.records} records, {len(data) / 1e6:.1f} MB, {len(rules)} rules", file=sys.stderr)

    t_parse = best_of(3, lambda: [orjson.loads(line) for line in lines])
    incidents = io.BytesIO()

    def run_replay() -> None:
        incidents.seek(0)
        incidents.truncate()
        path = Path("/dev/stdin")  # unused: replay reads from the in-memory stream below
        del path
        engine = Engine(rules, MemoryStateStore(), utc_now)
        normalizer = Normalizer(prefilter=engine.could_match)
        batch: list[NormalizedEvent] = []
        for item in iter_file(normalizer, io.BytesIO(data), "bench", utc_now):
            if type(item) is NormalizedEvent:
                batch.append(item)
                if len(batch) >= 1000:
                    for snap in engine.process(batch).incidents:
                        incidents.write(orjson.dumps(snap) + b"\n")
                    batch.clear()
        for snap in engine.process(batch).incidents:
            incidents.write(orjson.dumps(snap) + b"\n")

    t_engine = best_of(3, run_replay)
    n_incidents = incidents.getvalue().count(b"\n")

    # The same path through the public replay() function, reading a real file, for reference.
    tmp = Path(f"/tmp/bench-stream-{args.records}.jsonl")
    tmp.write_bytes(data)
    sink = io.BytesIO()
    start = time.perf_counter()
    summary = replay([str(tmp)], rules, out=sink, err=io.StringIO())
    t_replay_file = time.perf_counter() - start

    # Compiled predicate: the seed rule over a mix of normalized events.
    seed = next(r for r in rules if r.id == "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity")
    normalizer = Normalizer()
    sample = [normalizer.normalize(orjson.loads(line), "b", T0) for line in lines[:20000:7]]
    events = [e.attrs for e in sample if isinstance(e, NormalizedEvent)]
    events += [{"eventType": "M365Defender-Alert-Persistence", "attackTechniqueId": ("T1053.005", "T1053")}] * 500
    events += [{"eventType": "MS-Defender-Endpoint-Alert-Execution", "attackTechniqueId": ("T1059.001", "T1059")}] * 500
    matches = seed.query.matches
    reps = max(1, 2_000_000 // len(events))

    def evaluate() -> None:
        for _ in range(reps):
            for e in events:
                matches(e)

    t_pred = best_of(3, evaluate)
    evals_per_s = reps * len(events) / t_pred

    # Memory per open group (COUNT(*) rule): 20,000 groups, one event each, in the in-memory store.
    n_groups = 20_000
    group_events = []
    for i in range(n_groups):
        e = normalizer.normalize(
            {
                "eventType": "M365Defender-Alert-Persistence",
                "alertName": "Suspicious Task Scheduler activity",
                "alertIdStr": f"da638700000000{i:06d}_-1111111111",
                "tenantId": "0b1f6c2e-5a3d-4e8f-9c7b-1d2e3f4a5b6c",
                "attackTechniqueId": "T1053.005",
                "eventId": str(i),
                "eventTime": T0.isoformat(),
            },
            "m",
            T0,
        )
        group_events.append(e)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    store = MemoryStateStore()
    engine = Engine([seed], store, utc_now)
    for i in range(0, n_groups, 1000):
        engine.process(group_events[i : i + 1000])  # type: ignore[arg-type]
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    per_group = used / len(store)

    figures = {
        "records": args.records,
        "orjson_records_per_s": round(args.records / t_parse),
        "engine_records_per_s": round(args.records / t_engine),
        "engine_to_orjson_ratio": round(t_parse / t_engine, 3),
        "replay_file_records_per_s": round(summary.records / t_replay_file),
        "incidents": n_incidents,
        "predicate_evals_per_s": round(evals_per_s),
        "bytes_per_open_group": round(per_group),
        "targets": {"engine_to_orjson_ratio": 0.5, "predicate_evals_per_s": 1_000_000, "bytes_per_open_group": 1024},
    }
    print(f"orjson.loads alone      : {figures['orjson_records_per_s']:>12,} records/s")
    print(
        f"replay engine path      : {figures['engine_records_per_s']:>12,} records/s  (ratio {figures['engine_to_orjson_ratio']})"
    )
    print(f"replay() from a file    : {figures['replay_file_records_per_s']:>12,} records/s")
    print(f"seed predicate          : {figures['predicate_evals_per_s']:>12,} evaluations/s")
    print(f"memory per open group   : {figures['bytes_per_open_group']:>12,} bytes (COUNT(*) rule, in-memory store)")
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
