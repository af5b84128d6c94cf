"""Command line: ``python -m shared {validate,test-rules,replay} ...``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import RuleSetError
from .normalize import FORMATS
from .rules import default_rules_dir, load_rules


def _rule_paths(values: list[str] | None) -> list[Path]:
    return [Path(v) for v in values] if values else [default_rules_dir()]


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        rules = load_rules(_rule_paths(args.paths))
    except RuleSetError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"{len(exc.errors)} invalid rule file(s)", file=sys.stderr)
        return 1
    for rule in rules:
        print(f"ok {rule.path} ({rule.id})")
    return 0


def cmd_test_rules(args: argparse.Namespace) -> int:
    from .ruletests import run_rule_tests

    try:
        rules = load_rules(_rule_paths(args.paths))
    except RuleSetError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 2
    results = run_rule_tests(rules)
    for result in results:
        print(result.line())
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay

    try:
        rules = load_rules(_rule_paths(args.rules))
    except RuleSetError as exc:
        more = f" (+{len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""
        print(f"error: invalid rules: {exc.errors[0]}{more}", file=sys.stderr)
        return 2
    missing = [f for f in args.files if f != "-" and not os.path.isfile(f)]
    if missing:
        print(f"error: no such file: {missing[0]}", file=sys.stderr)
        return 2
    forward = None
    if args.forward:
        from .errors import SettingsError
        from .webhook import Forwarder, MemoryDeliveryLog, WebhookTarget

        secret = os.environ.get("WEBHOOK_SECRET")
        target = WebhookTarget.model_validate(
            {"url": args.forward, "secret": secret, "allow_http": True, "retries": 2, "backoff_s": 0.2}
        )
        try:
            forward = Forwarder([target], MemoryDeliveryLog())
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    summary = replay(
        args.files, rules, fmt=args.format, out=sys.stdout.buffer, err=sys.stderr, progress=sys.stderr.isatty(), forward=forward
    )
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 1 if summary.rejected else 0


def cmd_receiver(args: argparse.Namespace) -> int:
    from .receiver import main as receiver_main

    return receiver_main(args.host, args.port, args.secret_env)


def cmd_send(args: argparse.Namespace) -> int:
    from .graph import eventhub_publisher
    from .send import make_producer, send

    missing = [f for f in args.files if f != "-" and not os.path.isfile(f)]
    if missing:
        print(f"error: no such file: {missing[0]}", file=sys.stderr)
        return 2
    connection = os.environ.get(args.connection_env) if args.connection_env else None
    if not connection and not args.namespace:
        print(f"error: set ${args.connection_env} to an Event Hubs connection string, or pass --namespace", file=sys.stderr)
        return 2
    producer = make_producer(connection, args.namespace, args.hub)
    with producer:
        counts = send(args.files, eventhub_publisher(producer), fmt=args.format, progress=sys.stderr.isatty())
    print(f"read {counts['read']}, sent {counts['sent']}, rejected {counts['rejected']}", file=sys.stderr)
    return 1 if counts["rejected"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared", description="defender-correlator commands")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check rule files and print every error")
    p.add_argument("paths", nargs="*", help="rule files or folders (default: the shipped rules/)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("test-rules", help="run the test cases carried by rule files")
    p.add_argument("paths", nargs="*", help="rule files or folders (default: the shipped rules/)")
    p.set_defaults(func=cmd_test_rules)

    p = sub.add_parser("replay", help="run the rules over alert files; incidents as JSON lines on stdout")
    p.add_argument("files", nargs="+", help="alert files in any supported format ('-' for stdin)")
    p.add_argument("--rules", action="append", help="rule file or folder (repeatable; default: rules/)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="force a wire format (default: detect per record)")
    p.add_argument("--forward", metavar="URL", help="also POST each incident, signed with $WEBHOOK_SECRET, to this webhook")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("send", help="publish alert files to an Event Hub (partition key = tenant)")
    p.add_argument("files", nargs="+", help="alert files in any supported format ('-' for stdin)")
    p.add_argument("--hub", required=True, help="Event Hub name")
    p.add_argument("--namespace", help="Event Hubs namespace (uses DefaultAzureCredential)")
    p.add_argument(
        "--connection-env",
        default="EVENTHUB_CONNECTION_STRING",
        help="environment variable holding a connection string (default: EVENTHUB_CONNECTION_STRING)",
    )
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("receiver", help="a local webhook receiver that verifies signatures and prints incidents")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8787)
    p.add_argument("--secret-env", default="WEBHOOK_SECRET", help="environment variable holding the shared secret")
    p.set_defaults(func=cmd_receiver)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors already
        return int(exc.code or 0)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
