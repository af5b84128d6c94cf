"""The default single-subpattern rules as a Bytewax dataflow (benchmark only; Bytewax is not a product
dependency and runs in its own virtualenv, ``.venv-bench``, made by ``scripts/bench.sh``).

Run: .venv-bench/bin/python benchmarks/bytewax_flow.py SPECS.json INPUT.jsonl OUTPUT.jsonl

The same semantics as ``benchmarks/baseline.py`` (its parsing, group keys and window step are reused,
so the comparison is about the dataflow runtime, not the rule logic): a flat_map from each line to
(group key, event) per matching rule, one ``stateful_map`` per group holding the window and the
incident, and one compact snapshot line per trigger (a streaming system emits as it goes; the
benchmark keeps each incident's highest revision and compares it with the engine's). One worker
(``run_main``), so each group sees its events in file order.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bytewax.operators as op
from bytewax.connectors.files import FileSink, FileSource
from bytewax.dataflow import Dataflow
from bytewax.testing import run_main

from benchmarks.baseline import Group, Spec, group_values, parse_alert, snapshot, step

Event = tuple[int, tuple[str, ...], tuple[str, ...], int, int]  # spec index, values, norm, time, identity


def build(specs: list[Spec], source: Path, sink: Path) -> Dataflow:
    def matches(line: str) -> list[tuple[str, Event]]:
        if '"AdvancedHunting-AlertInfo"' not in line:
            return []
        parsed = parse_alert(line)
        if parsed is None:
            return []
        et, tset, t, ident, attrs = parsed
        out = []
        for i, spec in enumerate(specs):
            if spec.cond(et, tset):
                values, norm = group_values(spec, attrs)
                out.append((f"{i}\x1f" + "\x1f".join(norm), (i, values, norm, t, ident)))
        return out

    def correlate(group: Group | None, event: Event) -> tuple[Group, str | None]:
        i, values, norm, t, ident = event
        if group is None:
            group = Group(values)
        action = step(group, specs[i], norm, t, ident)
        return group, (orjson.dumps(snapshot(specs[i], group, action)).decode() if action else None)

    flow = Dataflow("defender_rules")
    lines = op.input("lines", flow, FileSource(source, batch_size=1000))
    keyed = op.flat_map("match", lines, matches)
    emitted = op.stateful_map("window", keyed, correlate)
    snapshots = op.filter_map_value("triggers", emitted, lambda s: s)
    op.output("snapshots", snapshots, FileSink(sink))
    return flow


def main(argv: list[str]) -> None:
    specs_path, source, sink = (Path(a) for a in argv)
    data: list[dict[str, Any]] = orjson.loads(specs_path.read_bytes())
    sink.write_bytes(b"")
    run_main(build([Spec.of(d) for d in data], source, sink))


if __name__ == "__main__":
    main(sys.argv[1:])
