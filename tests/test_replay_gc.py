"""``replay`` pauses the cyclic garbage collector: sound only because it makes no reference cycles."""

from __future__ import annotations

import functools
import gc
import io
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from benchmarks import streams
from shared.engine import BatchResult, Engine, Stats
from shared.replay import replay
from shared.rules import default_rules_dir, load_rules
from shared.webhook import Forwarder, MemoryDeliveryLog, WebhookTarget

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


def _refused_url() -> str:
    """A loopback URL nothing listens on (the port was free a moment ago): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def test_forwarding_to_an_unreachable_webhook_leaves_no_pile_of_garbage_while_the_collector_is_paused(
    tmp_path: Path,
) -> None:
    """A refused connection leaves ~170 objects in reference cycles (requests' exception, traceback and
    frames): with the collector paused they piled up for 100 batches (a 20k-record replay of
    alert-dense records with an unreachable --forward peaked at 609 MB instead of 150 MB). What awaits
    the collector stays bounded, whatever makes it."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(streams.alert_dense(0, 1500)) + b"\n")
    target = WebhookTarget.model_validate(
        {"url": _refused_url(), "secret": "s" * 32, "allow_http": True, "retries": 0, "backoff_s": 0}
    )
    forwarder = Forwarder([target], MemoryDeliveryLog())
    pending: list[int] = []  # objects allocated and not freed since the last collection, at each forward
    handle = forwarder.handle

    def counting(body: bytes, **kwargs: Any) -> Any:
        pending.append(gc.get_count()[0])
        return handle(body, **kwargs)

    rules = load_rules([default_rules_dir()])
    with (
        mock.patch.object(forwarder, "handle", side_effect=counting),
        mock.patch("shared.replay.REPLAY_BATCH", 50),
        mock.patch("shared.replay.GC_YOUNG_LIMIT", 20_000),
        mock.patch("shared.webhook.log"),
    ):
        summary = replay([str(path)], rules, out=io.BytesIO(), err=io.StringIO(), forward=forwarder)
    assert summary.forward_failed > 500 and len(pending) == summary.forward_failed
    assert max(pending) < 20_000 + 10_000
