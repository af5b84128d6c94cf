"""``replay`` pauses the cyclic garbage collector: sound only because it makes no reference cycles."""

from __future__ import annotations

import functools
import gc
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from benchmarks import streams
from shared.engine import BatchResult, Engine, Stats
from shared.replay import replay
from shared.rules import default_rules_dir, load_rules

SEED_ID = "PH_RULE_MS_DefEndpoint_Alert_Persist_TaskSchedulerActivity"


def _garbage_cycles_of(fn: Callable[[], object]) -> list[str]:
    """Types of the objects ``fn`` left in reference cycles (what only the cyclic collector frees)."""
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        fn()
        gc.collect()
        return sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()


@pytest.mark.parametrize("output", ["json", "table"])
def test_a_replay_leaves_no_reference_cycles_so_pausing_the_collector_loses_no_memory(tmp_path: Path, output: str) -> None:
    """``replay`` pauses the cyclic collector (see ``_fewer_collections``): sound only while what it
    drops is freed by reference counting. Alerts, evidence, other tables, rejections, every default
    rule (sequences, absences, the join), in both output modes and with --explain."""
    path = tmp_path / "mixed.jsonl"
    lines = [
        *streams.alert_dense(0, 300),
        *streams.seed_match(0, 300),
        *streams.non_alert(0, 300),
        b"{not json",
        b'{"category":"AdvancedHunting-AlertInfo","properties":{}}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rules = load_rules([default_rules_dir()])
    summaries: list[Any] = []

    def run(explain: bool) -> None:
        summaries.append(replay([str(path)], rules, out=io.BytesIO(), err=io.StringIO(), output=output, explain=explain))

    for explain in (False, True):
        assert _garbage_cycles_of(functools.partial(run, explain)) == []
        assert summaries[-1].rejected == 2 and summaries[-1].stats.counts["incidents_created"] > 100


def test_the_collector_is_paused_while_replaying_and_restored_after(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(streams.seed_match(0, 3)) + b"\n")
    seen: list[bool] = []
    rules = [r for r in load_rules([default_rules_dir()]) if r.id == SEED_ID]

    def process(self: Engine, batch: object) -> BatchResult:
        seen.append(gc.isenabled())
        return BatchResult([], Stats())

    with mock.patch.object(Engine, "process", autospec=True, side_effect=process):
        replay([str(path)], rules, out=io.BytesIO(), err=io.StringIO())
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:  # a caller that paused it itself finds it paused after
        replay([str(path)], rules, out=io.BytesIO(), err=io.StringIO())
        assert not gc.isenabled()
    finally:
        gc.enable()
