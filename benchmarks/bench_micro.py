"""Two engine micro-figures (printed, not a test): compiled seed-predicate evaluations per second,
and memory per open group of a COUNT(*) rule in the in-memory store.

Run: .venv/bin/python benchmarks/bench_micro.py
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import streams
from shared.engine import Engine, utc_now
from shared.normalize import NormalizedEvent, Normalizer
from shared.rules import default_rules_dir, load_rules
from shared.state import MemoryStateStore

SEED = "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity"


def predicate_rate() -> float:
    """The seed rule's compiled query over a mix of normalized events (best of 3, CPU time)."""
    seed = next(r for r in load_rules([default_rules_dir()]) if r.id == SEED)
    normalizer = Normalizer()
    sample = [normalizer.normalize(orjson.loads(line), "b", streams.T0) for line in streams.non_alert(0, 20_000)]
    events = [e.attrs for e in sample[::7] if isinstance(e, NormalizedEvent)]
    events += [{"eventType": "M365Defender-Alert-Persistence", "attackTechniqueId": ("T1053.005", "T1053")}] * 500
    events += [{"eventType": "MS-Defender-Endpoint-Alert-Execution", "attackTechniqueId": ("T1059.001", "T1059")}] * 500
    matches = seed.query.matches
    reps = max(1, 2_000_000 // len(events))
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(reps):
            for e in events:
                matches(e)
        best = min(best, time.process_time() - start)
    return reps * len(events) / best


def bytes_per_open_group(n_groups: int = 20_000) -> float:
    """Traced allocations of the engine and store after opening ``n_groups`` groups, per group."""
    seed = next(r for r in load_rules([default_rules_dir()]) if r.id == SEED)
    normalizer = Normalizer()
    events = [
        normalizer.normalize(
            {
                "eventType": "M365Defender-Alert-Persistence",
                "alertName": "Suspicious Task Scheduler activity",
                "alertIdStr": f"da638700000000{i:06d}_-1111111111",
                "tenantId": "0b1f6c2e-5a3d-4e8f-9c7b-1d2e3f4a5b6c",
                "attackTechniqueId": "T1053.005",
                "eventId": str(i),
                "eventTime": streams.T0.isoformat(),
            },
            "m",
            streams.T0,
        )
        for i in range(n_groups)
    ]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    store = MemoryStateStore()
    engine = Engine([seed], store, utc_now)
    for i in range(0, n_groups, 1000):
        engine.process(events[i : i + 1000])  # type: ignore[arg-type]
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / len(store)


def main() -> None:
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    figures = {"predicate_evals_per_s": round(predicate_rate()), "bytes_per_open_group": round(bytes_per_open_group())}
    print(f"seed predicate        : {figures['predicate_evals_per_s']:>12,} evaluations per CPU second (best of 3)")
    print(f"memory per open group : {figures['bytes_per_open_group']:>12,} bytes (COUNT(*) rule, in-memory store)")
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
