"""The ``conn25d`` command line: one function per subcommand.

A new subcommand adds an ``_add_NAME`` function that declares its arguments
and sets ``func`` to the function that runs it and returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import __version__, tailnet

EXIT_OK = 0
EXIT_INVALID = 1  # the input was read but is wrong
EXIT_USAGE = 2  # bad arguments or an unreadable file (argparse also uses 2)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a tailnet file without starting anything."""
    path: str = args.file
    try:
        t = tailnet.load_file(path)
    except OSError as e:
        print(f"conn25d: cannot read {path}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except tailnet.TailnetError as e:
        # load_file already starts every error with the file name.
        for error in e.errors:
            print(error, file=sys.stderr)
        return EXIT_INVALID
    apps = {app.name for attr in t.node_attrs for app in attr.apps}
    print(f"{path}: valid ({_plural(len(t.nodes), 'node')}, {_plural(len(apps), 'app')})")
    return EXIT_OK


def _add_check(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate a tailnet file",
        description="Validate a tailnet file (HuJSON policy plus nodes) without starting "
        "anything. Exit status: 0 when valid, 1 when invalid (every error is printed to "
        "stderr, one a line, with its place in the file), 2 when the file cannot be read.",
    )
    p.add_argument("file", metavar="FILE", help="the tailnet file, e.g. tailnet.hujson")
    p.set_defaults(func=cmd_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conn25d",
        description="Domain-based app connectors for a tailnet: traffic to an app's domains "
        "leaves through a connector node, via magic IPs in DNS answers and transit IPs "
        "agreed with the connector.",
        epilog="Run 'conn25d COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_check(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``conn25d`` with ``argv`` (default: the process arguments); the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: return, don't exit
        return e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
