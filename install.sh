#!/usr/bin/env bash
# Install conn25d and everything it needs on a Debian (or Ubuntu) machine, as root:
# the system packages, a virtual environment in $CONN25D_PREFIX (default /opt/conn25d)
# holding the package with its compiled Cython datapath, the `conn25d` command in
# /usr/local/bin, the systemd unit conn25d@.service (not enabled), bash completion and
# the man page conn25d(8). Run it again at any time: it only adds what is missing.
#
#   ./install.sh          the daemon and its runtime tools
#   ./install.sh --dev    also the test and benchmark tools (pytest, hypothesis, scapy, ruff, mypy,
#                         wireguard-go, wg, dnsperf, libsodium, systemd-analyze, man, strace,
#                         an unpacked systemd-resolved)
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (it installs system packages)" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
prefix=${CONN25D_PREFIX:-/opt/conn25d}
python=${PYTHON:-python3}

# dnsmasq-base: the binary without a system service; iperf3, curl, iputils-ping for
# the end-to-end tests and the benchmarks; nftables and iproute2 for the connector;
# libssl-dev: OpenSSL's headers and libcrypto to link against, which the Cython
# datapath uses for WireGuard's per-packet encryption (ChaCha20-Poly1305);
# bash-completion loads conn25d's completion in interactive shells.
packages=(python3 python3-venv python3-dev gcc libssl-dev iproute2 nftables dnsmasq-base
          iperf3 curl iputils-ping procps ca-certificates bash-completion)
# --dev: wireguard-go and wg, the userspace-tunnel reference of bench/net.py (without
# --no-install-recommends, wireguard-tools would pull in a kernel image); dnsperf, the
# DNS load generator of bench/control.py; libsodium-dev, the other library that
# bench/aead_cost.c measures the per-packet encryption of; systemd for systemd-analyze,
# which checks the unit; man-db and groff-base render the man page in the tests; strace
# slows one system call of wireguard-go in a test, to hold a start-up race open.
# systemd is also the private library of systemd-resolved (unpacked below, never started:
# PID 1 stays what it is), which runs with dbus-daemon in the --accept-dns test.
[ "$dev" = 1 ] && packages+=(wireguard-go wireguard-tools dnsperf libsodium-dev systemd man-db
                             groff-base dbus-daemon strace)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

if [ ! -x "$prefix/bin/python" ]; then
  "$python" -m venv "$prefix"
fi
"$prefix/bin/python" -m pip install -q --upgrade pip
# docs: the libraries that generate the completion and the man page.
extra="[docs]"
[ "$dev" = 1 ] && extra="[docs,test]"
# Not editable: this builds the wheel, Cython extension included, exactly as users get it.
"$prefix/bin/python" -m pip install -q "$here$extra"
# --dev: systemd-resolved of the installed systemd's version, unpacked into
# $prefix/lib/systemd-resolved, not installed: its package would turn this machine's
# /etc/resolv.conf into a symlink to its stub. conn25.lab.resolved runs it in a
# mount namespace of a test's own.
resolved_dir="$prefix/lib/systemd-resolved"
if [ "$dev" = 1 ]; then
  version=$(dpkg-query -W -f='${Version}' systemd)
  if [ "$(cat "$resolved_dir/VERSION" 2>/dev/null)" != "$version" ]; then
    tmp=$(mktemp -d)
    # As root: apt's own download user may not write into a directory of root's.
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "systemd-resolved=$version")
    rm -rf "$resolved_dir"
    mkdir -p "$resolved_dir"
    dpkg-deb -x "$tmp"/systemd-resolved_*.deb "$resolved_dir"
    echo "$version" > "$resolved_dir/VERSION"
    rm -rf "$tmp"
  fi
fi

ln -sf "$prefix/bin/conn25d" /usr/local/bin/conn25d
"$here/packaging/install-files" "$prefix/bin/python"
echo "conn25d installed in $prefix ($("$prefix/bin/conn25d" --version 2>/dev/null || echo '?'))"
