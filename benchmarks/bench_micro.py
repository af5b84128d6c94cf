"""Engine micro-figures (printed, not a test): compiled seed-predicate evaluations per second,
memory per open group of a COUNT(*) rule in the in-memory store, and that store's own CPU cost per
group (save of a new state; load and save back) on the states of an alert-dense and a seed-match replay.

Run: .venv/bin/python benchmarks/bench_micro.py
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import streams
from shared.engine import Engine, utc_now
from shared.normalize import NormalizedEvent, Normalizer
from shared.rules import Rule, default_rules_dir, load_rules
from shared.state import LIVE_STATES, Change, MemoryStateStore

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


def bytes_per_open_group(n_groups: int = 40_000) -> float:
    """What one more open group costs: traced allocations of the engine and store after opening
    ``2 * n_groups`` groups minus those after ``n_groups``, per group. Both counts are beyond the
    states the store keeps as objects (``LIVE_STATES``, 20,000), so this is the packed form; the
    difference leaves out fixed costs such as those objects and the interpreter's table of interned
    strings, which the keys' churn makes it rebuild (1-2 MB, which alone would add 48 to 94 bytes
    to a figure divided by 20,000)."""
    return (traced_bytes(2 * n_groups) - traced_bytes(n_groups)) / n_groups


def traced_bytes(n_groups: int) -> int:
    """Traced allocations of the engine and store after opening ``n_groups`` groups."""
    seed = next(r for r in load_rules([default_rules_dir()]) if r.id == SEED)
    normalizer = Normalizer()
    lines = [
        orjson.dumps(
            {
                "eventType": "M365Defender-Alert-Persistence",
                "alertName": "Suspicious Task Scheduler activity",
                "alertIdStr": f"da638700000000{i:06d}_-1111111111",
                "tenantId": "0b1f6c2e-5a3d-4e8f-9c7b-1d2e3f4a5b6c",
                "attackTechniqueId": "T1053.005",
                "eventId": str(i),
                "eventTime": streams.T0.isoformat(),
            }
        )
        for i in range(n_groups)
    ]
    normalizer.normalize(orjson.loads(lines[0]), "m", streams.T0)  # its caches warm before the trace
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    store = MemoryStateStore()
    engine = Engine([seed], store, utc_now)
    # Batches of 1,000 lines parsed and normalized in the trace and released once processed, as in a
    # replay: what stays is what the open groups keep, the values of their keys included.
    for i in range(0, n_groups, 1000):
        batch = [normalizer.normalize(orjson.loads(line), "m", streams.T0) for line in lines[i : i + 1000]]
        engine.process(batch)  # type: ignore[arg-type]
        del batch
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(store) == n_groups
    return sum(s.size_diff for s in after.compare_to(before, "filename"))


def store_speed(kind: str, live_limit: int, records: int = 20_000, runs: int = 3) -> dict[str, float]:
    """The in-memory store's own cost, CPU microseconds per group (best of ``runs``): saving every
    state a replay of ``records`` records of the stream ``kind`` leaves as new, then loading and
    saving each back (a batch that touches the group and emits nothing), in batches of 1,000, with
    ``live_limit`` states kept as objects (0: every state packed)."""
    every_rule = load_rules([default_rules_dir()])
    source = MemoryStateStore()
    replay_lines(streams.build(kind, records), [r for r in every_rule if not r.sequence], source)
    keys = source.held_keys()
    states = [source.load([k], 0)[k].state for k in keys]
    batches = [(keys[i : i + 1000], states[i : i + 1000]) for i in range(0, len(keys), 1000)]
    expires = 2**62
    best = {"save_new_us": float("inf"), "load_save_us": float("inf")}
    for _ in range(runs):
        store = MemoryStateStore(live_limit=live_limit)
        gc.collect()
        gc.disable()  # the states held here would make the collector's passes dominate
        start = time.process_time()
        for ks, sts in batches:
            store.save([Change(k, s, None, expires) for k, s in zip(ks, sts, strict=True)])
        middle = time.process_time()
        for ks, _sts in batches:
            loaded = store.load(ks, 0)
            store.save([Change(k, loaded[k].state, loaded[k].token, expires) for k in ks])
        end = time.process_time()
        gc.enable()
        best["save_new_us"] = min(best["save_new_us"], (middle - start) / len(keys) * 1e6)
        best["load_save_us"] = min(best["load_save_us"], (end - middle) / len(keys) * 1e6)
    return {**best, "groups": len(keys)}


def replay_lines(data: bytes, rules: list[Rule], store: MemoryStateStore) -> None:
    normalizer = Normalizer()
    engine = Engine(rules, store, lambda: streams.T0 + timedelta(days=30))
    lines = data.splitlines()
    for i in range(0, len(lines), 1000):
        events = [normalizer.normalize(orjson.loads(line), "s", streams.T0) for line in lines[i : i + 1000]]
        engine.process([e for e in events if isinstance(e, NormalizedEvent)])


def main() -> None:
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    figures: dict[str, object] = {
        "predicate_evals_per_s": round(predicate_rate()),
        "bytes_per_open_group": round(bytes_per_open_group()),
    }
    print(f"seed predicate        : {figures['predicate_evals_per_s']:>12,} evaluations per CPU second (best of 3)")
    print(f"memory per open group : {figures['bytes_per_open_group']:>12,} bytes (COUNT(*) rule, in-memory store)")
    for kind in ("alert-dense", "seed-match"):
        for tier, live_limit in (("objects", LIVE_STATES), ("packed", 0)):
            speed = store_speed(kind, live_limit)
            figures[f"store_{kind}_{tier}"] = speed
            print(
                f"in-memory store, {kind:<11}, {tier:<7}: save new {speed['save_new_us']:5.1f} us,"
                f" load + save {speed['load_save_us']:5.1f} us per group (CPU, best of 3; {speed['groups']:,} groups)"
            )
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
