"""Benchmark of the replay engine path against honest floors (printed figures, not a test).

Run: .venv/bin/python benchmarks/bench_engine.py [--records N] [--runs N] [--streams a,b] [--scaling]
     .venv/bin/python benchmarks/bench_engine.py --big-file-mb 1000 [--big-stream alert-dense]

For each stream of ``benchmarks/streams.py`` (every record distinct), in one run and interleaved
(floor, engine, baseline, floor, engine, baseline, ...) so that machine load hits every side alike,
best of ``--runs``:

* floor: parse-and-discard, ``orjson.loads`` of every line of the same file, nothing kept;
* engine: ``shared.replay.replay()`` on the file (pre-parse filter, normalizer, rules, in-memory
  store, snapshots encoded to an in-memory sink): the path of ``python -m shared replay``;
* baseline: ``benchmarks/baseline.py``, a hand-written dict+deque loop for the default rules,
  whose final incidents must equal the engine's (checked, printed).

``--scaling`` adds the rules-scaling curve on the alert-dense stream (10, 100, 1,000 rules: the
default rules plus generated rules of the same shape, interleaved). ``--big-file-mb`` replays a file
of distinct records through ``python -m shared replay`` and samples the child's peak RSS.
The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import baseline, streams  # noqa: E402
from shared.dispatch import Dispatch  # noqa: E402
from shared.engine import Engine, utc_now  # noqa: E402
from shared.normalize import Normalizer, iter_paths  # noqa: E402
from shared.replay import replay  # noqa: E402
from shared.rules import Rule, default_rules_dir, load_rules, parse_rule_text  # noqa: E402
from shared.state import MemoryStateStore  # noqa: E402

_WORK: list[Path] = []


def work_file(name: str) -> Path:
    """A file in this run's own temporary directory (made on first use, deleted at exit), so that
    two runs at once never read or overwrite each other's files."""
    if not _WORK:
        tmp = tempfile.TemporaryDirectory(prefix="bench-engine-")
        atexit.register(tmp.cleanup)
        _WORK.append(Path(tmp.name))
    return _WORK[0] / name


EXTRA_CATEGORIES = ["Collection", "Exfiltration", "Impact", "LateralMovement", "CommandAndControl", "InitialAccess"]


def interleaved(runs: int, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Best CPU time of each function over ``runs`` rounds, the functions alternating within a round.

    CPU time of this process (``time.process_time``), not wall time: the machine is shared, and
    other processes' load would otherwise land on whichever side happened to run at the time.
    Wall times are kept in ``WALL`` for the JSON line.
    """
    best = {name: float("inf") for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            gc.collect()
            start, wall = time.process_time(), time.perf_counter()
            child_cpu = fn()  # a function running a child process returns the child's CPU time
            cpu = child_cpu if isinstance(child_cpu, float) else time.process_time() - start
            best[name] = min(best[name], cpu)
            WALL[name] = min(WALL.get(name, float("inf")), time.perf_counter() - wall)
    return best


WALL: dict[str, float] = {}


def final_incidents(lines: bytes) -> dict[str, tuple[Any, ...]]:
    """Highest revision per incident id: what a consumer keeps."""
    latest: dict[str, dict[str, Any]] = {}
    for line in lines.splitlines():
        snap = orjson.loads(line)
        if snap["revision"] >= latest.get(snap["incidentId"], {"revision": 0})["revision"]:
            latest[snap["incidentId"]] = snap
    return {
        k: (
            s["ruleId"],
            s["revision"],
            s["triggerCount"],
            orjson.dumps(s["attributes"], option=orjson.OPT_SORT_KEYS),
            s["firstSeen"],
            s["lastSeen"],
        )
        for k, s in latest.items()
    }


def floor(path: Path) -> None:
    loads = orjson.loads
    with path.open("rb") as f:
        for line in f:
            loads(line)


def engine_run(path: Path, rules: list[Rule], sink: io.BytesIO) -> None:
    sink.seek(0)
    sink.truncate()
    replay([str(path)], rules, out=sink, err=io.StringIO())


def engine_unfiltered(path: Path, rules: list[Rule], sink: io.BytesIO) -> None:
    """The engine path with the pre-parse filter switched off (every line parsed by orjson)."""
    original = Normalizer.line_filter
    Normalizer.line_filter = lambda self: None  # type: ignore[method-assign, assignment, return-value]
    try:
        engine_run(path, rules, sink)
    finally:
        Normalizer.line_filter = original  # type: ignore[method-assign]


def input_run(path: Path, rules: list[Rule]) -> None:
    """The input path alone: reading, the pre-parse filter and normalizing the rows it keeps (no engine)."""
    engine = Engine(rules, MemoryStateStore())
    normalizer = Normalizer(prefilter=engine.could_match, evidence_columns=bool(engine.evidence_rules))  # as replay() does
    for _ in iter_paths(normalizer, [str(path)], utc_now):
        pass


def brute_force_run(path: Path, rules: list[Rule], sink: io.BytesIO) -> None:
    """The engine path testing every rule against every event (the rule index switched off)."""
    original = Dispatch.matching
    Dispatch.matching = lambda self, attrs: [r for r in self.rules if r.query.matches(attrs)]  # type: ignore[method-assign]
    try:
        engine_run(path, rules, sink)
    finally:
        Dispatch.matching = original  # type: ignore[method-assign]


def baseline_run(path: Path, rules: list[Rule], sink: io.BytesIO) -> None:
    sink.seek(0)
    sink.truncate()
    baseline.run(str(path), rules, sink)


class Bytewax:
    """``benchmarks/bytewax_flow.py`` in the benchmark virtualenv: its CPU time (user + system, every
    thread of the child) minus the same child's time on an empty file (interpreter and Bytewax start)."""

    def __init__(self, python: str, rules: list[Rule]) -> None:
        self.python = python
        self.specs = work_file("bytewax-specs.json")
        self.specs.write_bytes(orjson.dumps([spec.data() for spec in baseline.specs_of(rules)]))
        empty = work_file("bytewax-empty.jsonl")
        empty.write_bytes(b"")
        self.startup = min(self._cpu(empty, work_file("bytewax-empty-out.jsonl")) for _ in range(3))

    def _cpu(self, source: Path, sink: Path) -> float:
        proc = subprocess.Popen(
            [self.python, str(ROOT / "benchmarks" / "bytewax_flow.py"), str(self.specs), str(source), str(sink)]
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise RuntimeError(f"bytewax flow exited {proc.returncode}")
        return float(usage.ru_utime + usage.ru_stime)

    def run(self, source: Path, sink: Path) -> float:
        return max(1e-6, self._cpu(source, sink) - self.startup)


def stream_file(kind: str, records: int) -> Path:
    path = work_file(f"{kind}-{records}.jsonl")
    path.write_bytes(streams.build(kind, records))
    return path


def bench_stream(
    kind: str, records: int, runs: int, rules: list[Rule], every_rule: list[Rule] | None, bytewax: Bytewax | None = None
) -> dict[str, Any]:
    path = stream_file(kind, records)
    bytewax_out = work_file(f"bytewax-{kind}-out.jsonl")
    WALL.clear()
    engine_out, base_out, all_out = io.BytesIO(), io.BytesIO(), io.BytesIO()
    fns: dict[str, Callable[[], Any]] = {
        "floor": lambda: floor(path),
        "engine": lambda: engine_run(path, rules, engine_out),
        "baseline": lambda: baseline_run(path, rules, base_out),
    }
    if bytewax is not None:
        fns["bytewax"] = lambda: bytewax.run(path, bytewax_out)
    if every_rule is not None:
        fns["all_rules"] = lambda: engine_run(path, every_rule, all_out)
    if kind.startswith("non-alert"):  # what the pre-parse filter buys: the same engine parsing every line
        fns["unfiltered"] = lambda: engine_unfiltered(path, rules, io.BytesIO())
        fns["input"] = lambda: input_run(path, rules)  # how much of the engine path is input
    best = interleaved(runs, fns)
    engine_final = final_incidents(engine_out.getvalue())
    same = engine_final == final_incidents(base_out.getvalue())
    rate = {name: records / t for name, t in best.items()}
    extra: dict[str, Any] = {"all_rules_per_s": round(rate["all_rules"])} if every_rule is not None else {}
    if bytewax is not None:
        extra["bytewax_per_s"] = round(rate["bytewax"])
        extra["engine_vs_bytewax"] = round(rate["engine"] / rate["bytewax"], 2)
        extra["bytewax_identical"] = engine_final == final_incidents(bytewax_out.read_bytes())
    if "unfiltered" in rate:
        extra["unfiltered_per_s"] = round(rate["unfiltered"])
        extra["unfiltered_vs_floor"] = round(rate["unfiltered"] / rate["floor"], 2)
        extra["input_per_s"] = round(rate["input"])
        extra["input_vs_floor"] = round(rate["input"] / rate["floor"], 2)
    return {
        **extra,
        "stream": kind,
        "records": records,
        "mb": round(path.stat().st_size / 1e6, 1),
        "floor_per_s": round(rate["floor"]),
        "engine_per_s": round(rate["engine"]),
        "baseline_per_s": round(rate["baseline"]),
        "engine_vs_floor": round(rate["engine"] / rate["floor"], 2),
        "engine_vs_baseline": round(rate["engine"] / rate["baseline"], 2),
        "incidents": len(engine_final),
        "snapshots": engine_out.getvalue().count(b"\n"),
        "identical_to_baseline": same,
        "wall_per_s": {name: round(records / WALL[name]) for name in best if name != "bytewax"},
    }


def generated_rules(count: int) -> list[Rule]:
    """Rules of the default rules' shape: one event type (or any M365 alert) and one technique."""
    categories = streams.CATEGORIES + EXTRA_CATEGORIES
    out = []
    for i in range(count):
        technique = f"T{1000 + (i * 37) % 600}"
        category = categories[i % len(categories)]
        rule = {
            "id": f"PH_RULE_BENCH_{i:04d}",
            "name": f"generated {category} {technique}",
            "severity": 5,
            "category": "Security",
            "timeWindow": 300,
            "subpatterns": [
                {
                    "name": "a",
                    "query": f'(eventType = "MS-Defender-Endpoint-Alert-{category}" OR eventType CONTAIN "M365Defender-Alert")'
                    f' AND attackTechniqueId = "{technique}"',
                    "groupBy": ["alertName", "alertIdStr", "tenantId"],
                    "aggregateConstraint": "COUNT(*) >= 1",
                }
            ],
            "incidentAttributes": {"alertName": "a.alertName", "alertIdStr": "a.alertIdStr", "tenantId": "a.tenantId"},
        }
        out.append(parse_rule_text(orjson.dumps(rule).decode()))
    return out


def bench_scaling(records: int, runs: int, rules: list[Rule]) -> list[dict[str, Any]]:
    path = stream_file("alert-dense", records)
    sets = {n: rules + generated_rules(n - len(rules)) for n in (10, 100, 1000)}
    sinks = {n: io.BytesIO() for n in sets}

    def run_rules(n: int) -> Callable[[], Any]:
        return lambda: engine_run(path, sets[n], sinks[n])

    fns = {str(n): run_rules(n) for n in sets}
    fns["1000 brute force"] = lambda: brute_force_run(path, sets[1000], io.BytesIO())
    best = interleaved(runs, fns)
    base = records / best["10"]
    brute = {"rules": "1000 (every rule tested, no index)", "records_per_s": round(records / best["1000 brute force"])}
    brute["vs_10_rules"] = round(records / best["1000 brute force"] / base, 2)
    return [brute] + [
        {
            "rules": n,
            "records_per_s": round(records / best[str(n)]),
            "vs_10_rules": round(records / best[str(n)] / base, 2),
            "snapshots": sinks[n].getvalue().count(b"\n"),
        }
        for n in sets
    ]


def big_file(megabytes: int, kind: str) -> dict[str, Any]:
    """Replay a file of distinct records through ``python -m shared replay``; sample the child's RSS."""
    path = work_file(f"big-{kind}-{megabytes}mb.jsonl")
    streams.write_file(path, kind, megabytes)
    start = time.perf_counter()
    # The child's own RSS from /proc: ru_maxrss of a child also counts the parent's pages at fork.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared", "replay", str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak_kb = 0
    incidents = 0
    assert proc.stdout is not None
    import threading

    def count_lines() -> None:
        nonlocal incidents
        for _ in proc.stdout:  # type: ignore[union-attr]
            incidents += 1

    reader = threading.Thread(target=count_lines)
    reader.start()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        peak_kb = max(peak_kb, int(line.split()[1]))
        except OSError:
            break
        time.sleep(0.05)
    reader.join()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    return {
        "stream": kind,
        "file_mb": round(path.stat().st_size / 1e6),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "snapshots": incidents,
        "exit": proc.returncode,
        "summary": " | ".join(stderr.splitlines()[:2]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5, help="rounds; the best of them is kept")
    parser.add_argument("--streams", default=",".join(streams.STREAMS))
    parser.add_argument("--scaling", action="store_true", help="rules-scaling curve on the alert-dense stream")
    parser.add_argument("--scaling-records", type=int, default=20_000)
    parser.add_argument("--all-rules", action="store_true", help="also run the engine with every default rule")
    parser.add_argument("--big-file-mb", type=int, default=0, help="replay a file of distinct records this big")
    parser.add_argument("--big-stream", default="alert-dense", choices=list(streams.STREAMS))
    parser.add_argument("--bytewax", metavar="PYTHON", help="also run benchmarks/bytewax_flow.py with this interpreter")
    args = parser.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    figures: dict[str, Any] = {"runs": args.runs}
    if args.big_file_mb:
        big = big_file(args.big_file_mb, args.big_stream)
        print(
            f"replay of {big['file_mb']} MB ({big['stream']}): {big['seconds']} s, peak RSS {big['peak_rss_mb']} MB, "
            f"{big['snapshots']} snapshots, exit {big['exit']} ({big['summary']})"
        )
        print(orjson.dumps({"big_file": big}).decode())
        return
    every_rule = load_rules([default_rules_dir()])
    # The baseline writes out the single-subpattern default rules; the multi-subpattern ones have no
    # hand-written twin, so they run only with --all-rules (engine column "all rules").
    rules = [r for r in every_rule if not r.sequence]
    extra = every_rule if args.all_rules else None
    print(
        f"{len(rules)} single-subpattern default rules"
        + (f" (all {len(every_rule)} default rules in 'all rules')" if extra else "")
        + f"; best of {args.runs} interleaved rounds; records per CPU second of this process"
    )
    print(f"{'stream':<16}{'floor':>11}{'engine':>11}{'baseline':>11}{'eng/floor':>10}{'eng/base':>9}  incidents, identical")
    bytewax = Bytewax(args.bytewax, rules) if args.bytewax else None
    if bytewax is not None:
        print(f"bytewax: {args.bytewax} (child CPU time minus its {bytewax.startup:.2f} s start on an empty file)")
    results = []
    for kind in args.streams.split(","):
        r = bench_stream(kind, args.records, args.runs, rules, extra, bytewax)
        results.append(r)
        print(
            f"{kind:<16}{r['floor_per_s']:>11,}{r['engine_per_s']:>11,}{r['baseline_per_s']:>11,}"
            f"{r['engine_vs_floor']:>10}{r['engine_vs_baseline']:>9}  {r['incidents']:,}, {r['identical_to_baseline']}"
            + (f"; all rules {r['all_rules_per_s']:,}/s" if extra else "")
            + (
                f"; bytewax {r['bytewax_per_s']:,}/s (engine/bytewax {r['engine_vs_bytewax']}, "
                f"identical {r['bytewax_identical']})"
                if bytewax
                else ""
            )
            + (
                f"; without pre-parse filter {r['unfiltered_per_s']:,}/s ({r['unfiltered_vs_floor']})"
                f"; input alone (read, filter, normalize) {r['input_per_s']:,}/s ({r['input_vs_floor']})"
                if "unfiltered_per_s" in r
                else ""
            )
        )
    figures["streams"] = results
    if args.scaling:
        curve = bench_scaling(args.scaling_records, args.runs, rules)
        figures["scaling"] = curve
        for point in curve:
            print(
                f"alert-dense, {point['rules']!s:>5} rules: {point['records_per_s']:>9,} records/s "
                f"({point['vs_10_rules']}x the 10-rule rate)"
            )
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
