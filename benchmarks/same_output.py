"""Byte-for-byte comparison of the engine's output before and after a change (a check, not a timing).

Run: .venv/bin/python benchmarks/same_output.py --against <git ref> [--records N] [--streams a,b]

For each benchmark stream (``benchmarks/streams.py``) and each rule set (the single-subpattern
default rules the benchmark uses, and every default rule), the file is replayed
(``shared.replay.replay()``, fixed clock) by this working tree and by a temporary worktree checked
out at ``--against``; the snapshot lines must be equal byte for byte. Prints one line per case and
exits 1 on any difference. Used to show that performance work changed no output.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import streams  # noqa: E402

# Run inside a tree (cwd): replay the file with the chosen rule set, snapshot lines to stdout.
CHILD = """
import io, sys
from datetime import datetime, timezone
sys.path.insert(0, ".")
from shared.replay import replay
from shared.rules import default_rules_dir, load_rules
rules = load_rules([default_rules_dir()])
if sys.argv[2] == "single":
    rules = [r for r in rules if not r.sequence]
sink = io.BytesIO()
replay([sys.argv[1]], rules, out=sink, err=io.StringIO(), clock=lambda: datetime(2026, 11, 28, tzinfo=timezone.utc))
sys.stdout.buffer.write(sink.getvalue())
"""


def output(tree: Path, path: Path, rule_set: str) -> bytes:
    return subprocess.run([sys.executable, "-c", CHILD, str(path), rule_set], cwd=tree, check=True, capture_output=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", required=True, help="git ref whose output this tree must reproduce")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--streams", default="alert-dense,seed-match,non-alert-real")
    args = parser.parse_args()
    different = 0
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "tree"
        git = ["git", "worktree"]
        subprocess.run([*git, "add", "--detach", str(other), args.against], cwd=ROOT, check=True, capture_output=True)
        try:
            for kind in args.streams.split(","):
                path = Path(tmp) / f"{kind}.jsonl"
                path.write_bytes(streams.build(kind, args.records))
                for rule_set in ("single", "all"):
                    mine, theirs = output(ROOT, path, rule_set), output(other, path, rule_set)
                    same = mine == theirs
                    different += not same
                    digest, lines = hashlib.sha256(mine).hexdigest()[:16], mine.count(b"\n")
                    verdict = "identical" if same else "DIFFERENT"
                    print(f"{kind:<15} {rule_set:<6} {lines:>7} snapshots  sha256 {digest}  {verdict}")
        finally:
            subprocess.run([*git, "remove", "--force", str(other)], cwd=ROOT, check=False, capture_output=True)
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
