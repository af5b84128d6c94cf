"""Command line: ``python -m shared {validate,test-rules,replay,send,receiver,redrive} ...``.

Exit codes (documented in the README): 0 success; 1 some records rejected (the rest processed), an
invalid rule file or a failed rule test; 2 usage or input error (arguments, files, rules, settings);
3 could not connect (an endpoint unreachable or refusing our credentials, a port that cannot be
listened on); 4 some webhook deliveries failed (``replay --forward``). A user error prints one line
``error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from .errors import CorrelatorError, EndpointError, RuleSetError, StoreError
from .normalize import FORMATS
from .rules import default_rules_dir, load_rules, rule_files

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_CONNECT, EXIT_DELIVERY = 0, 1, 2, 3, 4


class CommandError(Exception):
    """A user-facing failure of a command: one line and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A usage error is one line (``--help`` shows the usage)."""
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}\n")


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be a number from 0 to 65535, not {text!r}")
    return int(text)


def _rule_paths(values: list[str] | None) -> list[Path]:
    return [Path(v) for v in values] if values else [default_rules_dir()]


def cmd_validate(args: argparse.Namespace) -> int:
    from .lint import lint_rules

    paths = _rule_paths(args.paths)
    empty = [p for p in paths if p.is_dir() and not rule_files(p)]
    for folder in empty:
        print(f"error: {folder}: no rule files (*.yaml, *.yml) in this folder", file=sys.stderr)
    try:
        rules = load_rules(paths)
    except RuleSetError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"{len({e.file for e in exc.errors})} invalid rule file(s)", file=sys.stderr)
        return 1
    if empty:
        return 1
    warnings = lint_rules(rules)
    for warning in warnings:
        print(warning, file=sys.stderr)
    for rule in rules:
        print(f"ok {rule.path} ({rule.id})")
    print(f"{len(rules)} rule(s) valid, {len(warnings)} warning(s)", file=sys.stderr)
    return 1 if warnings and args.strict else 0


def cmd_test_rules(args: argparse.Namespace) -> int:
    from . import ruletests as rt

    try:
        rules = load_rules(_rule_paths(args.paths))
    except RuleSetError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return rt.EXIT_INVALID
    selection = rt.Selection(rules=args.rule or (), tests=args.test or ())
    results = rt.run_rule_tests(rules, selection, min_tests=args.min_tests)
    if not args.min_tests:
        for rule in rules:
            if selection.rule(rule.id) and not rule.model.tests:
                print(f"warning: {rule.path}: rule {rule.id} has no test cases (--min-tests 1 fails such rules)", file=sys.stderr)
    if not results:
        what = "matched --rule/--test" if args.rule or args.test else "found (no rule carries test cases)"
        print(f"error: no rule test {what}", file=sys.stderr)
        return rt.EXIT_NOTHING_SELECTED
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    if args.json:
        print(rt.render_json(results))
    else:
        for result in results:
            print("\n".join(rt.render_text(result, color=color)))
    if args.junit:
        try:
            Path(args.junit).write_bytes(rt.render_junit(results))
        except OSError as exc:
            print(f"error: cannot write {args.junit} ({exc.strerror or exc})", file=sys.stderr)
            return rt.EXIT_INVALID
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed", file=sys.stderr if args.json else sys.stdout)
    return rt.EXIT_FAILED if failed else rt.EXIT_PASSED


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
        from .webhook import Forwarder, MemoryDeliveryLog, WebhookTarget

        secret = os.environ.get("WEBHOOK_SECRET")
        target = WebhookTarget.model_validate(
            {"url": args.forward, "secret": secret, "allow_http": True, "retries": 2, "backoff_s": 0.2}
        )
        forward = Forwarder([target], MemoryDeliveryLog())  # SettingsError: exit 2 via main()
    output = args.output or ("table" if sys.stdout.isatty() else "json")
    summary = replay(
        args.files,
        rules,
        fmt=args.format,
        out=sys.stdout.buffer,
        err=sys.stderr,
        progress=sys.stderr.isatty(),
        forward=forward,
        output=output,
        explain=args.explain,
        keep=bool(args.html),
    )
    _replay_report(args, summary, output)
    if summary.forward_failed:
        return EXIT_DELIVERY
    return 1 if summary.rejected else 0


def _replay_report(args: argparse.Namespace, summary: Any, output: str) -> None:
    """The table (stdout), the explanations and the summary (stderr), the HTML report (file)."""
    from . import views

    if output == "table":
        sys.stdout.write(views.render_table(summary.incidents.values()))
        if summary.incidents_omitted:
            sys.stdout.write(f"... {summary.incidents_omitted} more incident(s) not shown\n")
        sys.stdout.flush()
    lines = summary.lines()
    explained = summary.explain_lines() if args.explain else []
    for line in explained:
        print(line, file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    if args.html:
        from .html_report import render_html

        page = render_html(
            list(summary.incidents.values()),
            summary.alerts,
            summary=lines,
            explain=explained,
            omitted_incidents=summary.incidents_omitted,
        )
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"HTML report: {args.html}", file=sys.stderr)


def cmd_receiver(args: argparse.Namespace) -> int:
    from .receiver import main as receiver_main

    try:
        return receiver_main(args.host, args.port, args.secret_env)
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", EXIT_CONNECT) from None


def cmd_send(args: argparse.Namespace) -> int:
    from .send import make_producer, send_files

    missing = [f for f in args.files if f != "-" and not os.path.isfile(f)]
    if missing:
        print(f"error: no such file: {missing[0]}", file=sys.stderr)
        return 2
    connection = os.environ.get(args.connection_env) if args.connection_env else None
    if not connection and not args.namespace:
        print(f"error: set ${args.connection_env} to an Event Hubs connection string, or pass --namespace", file=sys.stderr)
        return 2
    producer = make_producer(connection, args.namespace, args.hub, connection_env=args.connection_env)
    counts = send_files(args.files, producer, fmt=args.format, progress=sys.stderr.isatty())
    print(f"read {counts['read']}, sent {counts['sent']}, rejected {counts['rejected']}", file=sys.stderr)
    return 1 if counts["rejected"] else 0


def cmd_import(args: argparse.Namespace) -> int:
    from .errors import RuleImportError
    from .importers.common import Imported, write_all

    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        print(f"error: no such file: {missing[0]}", file=sys.stderr)
        return 2
    items: list[Imported] = []
    failed_files = 0
    try:
        if args.kind == "fortisiem":
            from .importers.fortisiem import convert_file

            for name in args.files:
                try:
                    items += convert_file(Path(name))
                except RuleImportError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    failed_files += 1
        else:
            from .importers.sigma import convert_collection

            items = convert_collection(Path(f) for f in args.files)  # correlations name rules of other files
    except RuleImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        written = write_all(items, Path(args.out), force=args.force)
    except OSError as exc:
        print(f"error: cannot write rule files to {args.out} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    for result in written:
        for note in result.imported.notes:
            print(note, file=sys.stderr)
        state = "wrote" if result.written else "skipped"
        print(f"{state} {result.path}" + ("" if result.valid or not result.written else " (does not load; see the notes)"))
    bad = sum(not (w.valid and w.written) for w in written) + failed_files
    notes = sum(len(w.imported.notes) for w in written)
    print(f"imported {len(written)} rule(s) from {len(args.files)} file(s): {bad} problem(s), {notes} note(s)", file=sys.stderr)
    return 1 if bad else 0


def cmd_coverage(args: argparse.Namespace) -> int:
    import json

    from .coverage import coverage_lines, navigator_layer

    try:
        rules = load_rules(_rule_paths(args.paths))
    except RuleSetError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 2
    print("\n".join(coverage_lines(rules)))
    if args.layer:
        try:
            Path(args.layer).write_text(json.dumps(navigator_layer(rules), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write {args.layer} ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote ATT&CK Navigator layer {args.layer}", file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .schema import default_schema_path, schema_text

    text = schema_text()
    if args.write:
        target = Path(args.write) if args.write != "-" else default_schema_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m shared", description="defender-correlator commands")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "validate",
        help="check rule files and print every error and warning",
        epilog="exit status: 0 valid (warnings allowed), 1 an invalid file, a missing or empty folder, "
        "or (with --strict) a warning",
    )
    p.add_argument("paths", nargs="*", help="rule files or folders (default: the shipped rules/)")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "test-rules",
        help="run the test cases carried by rule files",
        epilog="exit status: 0 all passed, 1 a test failed (or a rule has fewer than --min-tests tests), "
        "2 a rule file is invalid or there is no test to run (nothing matched --rule/--test, or no rule has tests)",
    )
    p.add_argument("paths", nargs="*", help="rule files or folders (default: the shipped rules/)")
    p.add_argument("--rule", action="append", metavar="ID", help="only rules whose id matches (glob or substring; repeatable)")
    p.add_argument(
        "--test", action="append", metavar="NAME", help="only tests whose name matches (glob or substring; repeatable)"
    )
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    p.add_argument("--json", action="store_true", help="print results as JSON on stdout (summary on stderr)")
    p.add_argument("--min-tests", type=int, default=0, metavar="N", help="a rule with fewer than N tests fails")
    p.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the diff (default: on a terminal)"
    )
    p.set_defaults(func=cmd_test_rules)

    p = sub.add_parser(
        "import",
        help="convert FortiSIEM XML rule exports or Sigma rules into rule files (one per rule)",
        epilog="every element, modifier or field that could not be carried over is printed as "
        "'file: rule ID: element: kind: reason'; exit status: 0 all imported and loadable, "
        "1 a rule does not load or a file could not be read as that kind, 2 usage",
    )
    p.add_argument("kind", choices=("fortisiem", "sigma"))
    p.add_argument("files", nargs="+", help="FortiSIEM XML exports or Sigma YAML files")
    p.add_argument("--out", default=".", metavar="DIR", help="folder for the rule files (default: current folder)")
    p.add_argument("--force", action="store_true", help="overwrite existing rule files")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("coverage", help="ATT&CK tactics and techniques of the enabled rules; --layer writes a Navigator layer")
    p.add_argument("paths", nargs="*", help="rule files or folders (default: the shipped rules/)")
    p.add_argument("--layer", metavar="FILE", help="write a MITRE ATT&CK Navigator layer (JSON, layer format 4.5)")
    p.set_defaults(func=cmd_coverage)

    p = sub.add_parser("schema", help="print the JSON Schema of rule files (generated from the model)")
    p.add_argument("--write", nargs="?", const="-", metavar="FILE", help="write it (default: schema/rule.schema.json)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("replay", help="run the rules over alert files; incidents as JSON lines on stdout")
    p.add_argument("files", nargs="+", help="alert files in any supported format ('-' for stdin)")
    p.add_argument("--rules", action="append", help="rule file or folder (repeatable; default: rules/)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="force a wire format (default: detect per record)")
    p.add_argument("--forward", metavar="URL", help="also POST each incident, signed with $WEBHOOK_SECRET, to this webhook")
    p.add_argument(
        "--output",
        choices=("table", "json"),
        help="table: one line per incident at the end; json: snapshots as JSON lines (default: table on a terminal, else json)",
    )
    p.add_argument("--explain", action="store_true", help="list skipped, unmatched and rejected records with the reason")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report (incidents, timeline, evidence)")
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

    from .redrive import add_parser as add_redrive

    add_redrive(sub)

    p = sub.add_parser("receiver", help="a local webhook receiver that verifies signatures and prints incidents")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8787)
    p.add_argument("--secret-env", default="WEBHOOK_SECRET", help="environment variable holding the shared secret")
    p.set_defaults(func=cmd_receiver)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors already
        return int(exc.code or 0)
    try:
        code: int = args.func(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except (EndpointError, StoreError) as exc:  # an endpoint or the storage account unreachable
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONNECT
    except CorrelatorError as exc:  # settings, rules, records: the user's input
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file that cannot be read, a broken pipe
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or type(exc).__name__}{where}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not _is_remote_failure(exc):
            raise  # a bug: the traceback is what its report needs
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        print(f"error: could not connect ({type(exc).__name__}: {first})", file=sys.stderr)
        return EXIT_CONNECT
    return code


def _is_remote_failure(exc: Exception) -> bool:
    """An Azure SDK failure (storage, Event Hubs, identity) that no command caught itself."""
    from azure.core.exceptions import AzureError
    from azure.eventhub.exceptions import EventHubError

    return isinstance(exc, (AzureError, EventHubError))


if __name__ == "__main__":
    sys.exit(main())
