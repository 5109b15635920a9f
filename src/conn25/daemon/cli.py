"""The ``conn25d`` command line: one function per subcommand.

A new subcommand adds an ``_add_NAME`` function that declares its arguments
and sets ``func`` to the function that runs it and returns the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..core import dnsconfig, tailnet
from ..core.wireguard import keys as wgkeys
from .tailnetfile import load_file
from .tun import MAX_QUEUES, check_queues

if TYPE_CHECKING:
    from .node import NodeOptions

EXIT_OK = 0
EXIT_INVALID = 1  # the input was read but is wrong
EXIT_USAGE = 2  # bad arguments or an unreadable file (argparse also uses 2)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a tailnet file (HuJSON policy plus nodes) without starting anything.
    Exit status: 0 when valid, 1 when invalid (every error is printed to stderr, one a
    line, with its place in the file), 2 when the file cannot be read."""
    path: str = args.file
    try:
        t = load_file(path)
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


def _command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    func: Callable[[argparse.Namespace], int],
    summary: str,
) -> argparse.ArgumentParser:
    """The subcommand that runs ``func``: named after it (``cmd_up`` is "up"), with
    ``summary`` in the list of commands and its docstring as its --help description."""
    p = subparsers.add_parser(func.__name__.removeprefix("cmd_"), help=summary,
                              description=" ".join((func.__doc__ or "").split()))
    p.set_defaults(func=func)
    return p


def _add_check(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _command(subparsers, cmd_check, "validate a tailnet file")
    p.add_argument("file", metavar="FILE", help="the tailnet file, e.g. tailnet.hujson")


def cmd_genkey(args: argparse.Namespace) -> int:
    """Print a new random private key (X25519, base64), like 'wg genkey'. Keep it secret:
    e.g. 'umask 077; conn25d genkey > private.key'. 'conn25d pubkey' gives its public key
    for the tailnet file's nodes[].publicKey."""
    print(wgkeys.encode(wgkeys.generate_private()))
    return EXIT_OK


def _add_genkey(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _command(subparsers, cmd_genkey, "print a new private key")


def cmd_pubkey(args: argparse.Namespace) -> int:
    """Read a private key (base64) on stdin and print its public key, like 'wg pubkey':
    e.g. 'conn25d pubkey < private.key'. Exit status 1, with one line on stderr that
    never shows the input, when it is not a key."""
    data = sys.stdin.buffer.read()
    try:
        # Only trailing space is allowed, as wg allows it, so both tools accept the same input.
        public = wgkeys.public_from_private(wgkeys.decode_file(data))
    except ValueError as e:  # wgkeys' messages never quote the key
        print(f"conn25d: stdin: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(wgkeys.encode(public))
    return EXIT_OK


def _add_pubkey(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _command(subparsers, cmd_pubkey, "print the public key of a private key read on stdin")


def _address_option(default_port: int) -> Callable[[str], tuple[str, int]]:
    def parse(text: str) -> tuple[str, int]:
        from ..core.tailnet import parse_endpoint

        try:
            return parse_endpoint(text.strip(), default_port)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an address (IP, IP:PORT or [IPv6]:PORT)") from None
    return parse


def _address_list(text: str) -> tuple[tuple[str, int], ...]:
    return tuple(_address_option(53)(part) for part in text.split(",") if part.strip())


def _dns_allow(text: str) -> tuple[str, ...]:
    from .dns_server import parse_dns_allow

    try:
        return tuple(str(net) for net in parse_dns_allow(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tun_queues(text: str) -> int:
    try:
        return check_queues(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of TUN queues (1-{MAX_QUEUES})") from None


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def cmd_up(args: argparse.Namespace) -> int:
    """Run this node of the tailnet in the foreground until SIGINT or SIGTERM, then
    remove everything it set up and exit 0. SIGHUP (or a change of the file) re-reads
    the tailnet file; a bad file is logged and the running configuration stays. The
    node's private key is made on the first start; until the tailnet file holds its
    public key, up exits 1 saying which key to put where."""
    import trio

    from . import logsetup
    from .node import NodeError, NodeOptions, serve
    from .system import SystemSetupError

    logsetup.configure(args.log_level)  # without timestamps of its own into the journal
    tags = None
    if args.advertise_tags is not None:
        tags = tuple(t.strip() for t in args.advertise_tags.split(",") if t.strip())
    options = NodeOptions(
        tailnet=args.tailnet, hostname=args.hostname,
        advertise_connector=args.advertise_connector, advertise_tags=tags,
        state_dir=args.state_dir, tun_name=args.tun_name, mtu=args.mtu,
        tun_offload=args.tun_offload, tun_queues=args.tun_queues,
        dns_listen=args.dns_listen, upstream_dns=args.upstream_dns,
        dns_allow=args.dns_allow, private_key=args.private_key,
        accept_dns=args.accept_dns, resolv_conf=args.resolv_conf,
    )
    if (status := _check_private_key(options)) is not None:
        return status
    failures: list[BaseException] = []
    try:
        trio.run(serve, options)
    except* (NodeError, SystemSetupError, OSError) as group:
        failures = _leaves(group)
    for e in failures:
        hint = " (conn25d up needs root)" if os.geteuid() != 0 and str(e).startswith(
            "cannot") else ""
        print(f"conn25d: {e}{hint}", file=sys.stderr)
    return EXIT_INVALID if failures else EXIT_OK


def _check_private_key(options: NodeOptions) -> int | None:
    """Read (or make) the node's private key and hold its public key against the tailnet
    file's entry for this node; the exit status when up must stop there, else None.
    Prints at most one line, and never the private key."""
    import logging

    from . import keyfile

    path = options.private_key_path
    try:
        private, created = keyfile.node_key(path, options.tailnet, options.hostname)
    except keyfile.KeyFileError as e:
        hint = " (conn25d up needs root)" if os.geteuid() != 0 and str(e).startswith(
            "cannot") else ""
        print(f"conn25d: {e}{hint}", file=sys.stderr)
        return EXIT_INVALID
    public = wgkeys.encode(wgkeys.public_from_private(private))
    if created:
        logging.getLogger("conn25d").info("made a new private key %s (public key %s)",
                                          path, public)
    return None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _add_up(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _command(subparsers, cmd_up, "run a node in the foreground")
    p.add_argument("--tailnet", required=True, metavar="FILE", help="the tailnet file")
    p.add_argument("--hostname", required=True, metavar="NAME",
                   help="this node's name in the tailnet file")
    p.add_argument("--advertise-connector", action="store_true",
                   help="act as a connector for the apps whose connector tags this node carries")
    p.add_argument("--advertise-tags", metavar="TAGS",
                   help="comma-separated tags; must match the node's tags in the file")
    p.add_argument("--state-dir", metavar="DIR",
                   help="assignments and the local API socket (default /var/lib/conn25d/NAME)")
    p.add_argument("--private-key", metavar="FILE",
                   help="this node's WireGuard private key, as 'wg genkey' writes it (default "
                   "STATE_DIR/private.key, made mode 0600 when missing)")
    p.add_argument("--tun-name", default="conn25", metavar="IFNAME",
                   help="the TUN device (default conn25)")
    p.add_argument("--mtu", type=int, default=1420, help="MTU of the TUN device (default 1420)")
    p.add_argument("--tun-offload", type=_boolean, nargs="?", const=True, default=True,
                   metavar="BOOL",
                   help="let the kernel hand the TUN TCP/UDP super-packets (TSO, USO), split "
                   "by the datapath; falls back to fewer, then none, where the kernel refuses "
                   "(default on; --tun-offload=false reads packet by packet)")
    p.add_argument("--tun-queues", type=_tun_queues, default=1, metavar="N",
                   help=f"queues of the TUN device (1-{MAX_QUEUES}), each with its own pair of "
                   "pump threads and overlay socket, so more cores carry more flows (default 1)")
    p.add_argument("--dns-listen", type=_address_option(53), default=("100.100.100.100", 53),
                   metavar="ADDR", help="DNS server address (default 100.100.100.100:53)")
    p.add_argument("--upstream-dns", type=_address_list, metavar="ADDR[,ADDR]",
                   help="resolvers for non-app names (default: the system's, from "
                   "/etc/resolv.conf as it was before --accept-dns)")
    p.add_argument("--accept-dns", type=_boolean, nargs="?", const=True, default=None,
                   metavar="BOOL",
                   help="point the system's DNS at the DNS server while the node runs, and "
                   "put it back on exit (default: on when the node sees apps; "
                   "--accept-dns=false leaves the system's DNS alone)")
    p.add_argument("--resolv-conf", default=dnsconfig.RESOLV_CONF, metavar="FILE",
                   help="the resolver configuration --accept-dns manages and the default "
                   "upstreams come from (default /etc/resolv.conf)")
    p.add_argument("--dns-allow", type=_dns_allow, default=(), metavar="CIDR[,CIDR]",
                   help="networks besides this host whose DNS queries the DNS server answers "
                   "(default: none; never other nodes unless named here)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="(default info)")


def _socket_path(args: argparse.Namespace) -> str | None:
    from .node import SOCKET_NAME, STATE_ROOT

    if args.state_dir:
        return str(Path(args.state_dir) / SOCKET_NAME)
    if args.hostname:
        return str(STATE_ROOT / args.hostname / SOCKET_NAME)
    found = sorted(STATE_ROOT.glob(f"*/{SOCKET_NAME}"))
    return str(found[0]) if len(found) == 1 else None


def cmd_status(args: argparse.Namespace) -> int:
    """Show the running node's apps, domains and assignments (magic, transit, real,
    expiry, active flows), pool use, connector peers and mappings, and counters."""
    import json

    import trio

    from .http import request_unix
    from .status import render_table

    path = _socket_path(args)
    if path is None:
        print("conn25d: no single running node found under /var/lib/conn25d; "
              "give --state-dir or --hostname", file=sys.stderr)
        return EXIT_USAGE
    try:
        status, body = trio.run(lambda: request_unix(path, "GET", "/status", timeout=5))
    except (OSError, trio.TooSlowError) as e:
        print(f"conn25d: cannot reach the node at {path}: {e}", file=sys.stderr)
        return EXIT_INVALID
    if status != 200:
        print(f"conn25d: {path} answered HTTP {status}", file=sys.stderr)
        return EXIT_INVALID
    doc = json.loads(body)
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else render_table(doc))
    return EXIT_OK


def _add_status(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _command(subparsers, cmd_status,
                 "show a running node's state: apps, assignments, WireGuard peers, counters")
    p.add_argument("--json", action="store_true", help="print the JSON document")
    p.add_argument("--state-dir", metavar="DIR", help="the node's --state-dir")
    p.add_argument("--hostname", metavar="NAME", help="find the node by name instead")


def cmd_demo(args: argparse.Namespace) -> int:
    """As root: build a client, a connector and an 'internet' (DNS and web server) in
    network namespaces, start the nodes, resolve an app domain on the client, fetch a
    page through the connector, print what happened, and remove everything."""
    from ..lab.demo import run_demo

    return run_demo()


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _command(subparsers, cmd_demo, "show conn25d working, in throwaway network namespaces (root)")


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
    _add_demo(subparsers)
    _add_up(subparsers)
    _add_status(subparsers)
    _add_check(subparsers)
    _add_genkey(subparsers)
    _add_pubkey(subparsers)
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
