"""A bare datapath node for the pump tests: run inside a namespace by the test.

Opens a TUN device, gives it addresses and routes (pyroute2), binds the UDP
socket, installs the tables and each peer's WireGuard keypair (the test made
both ends: tests/wgsessions.py) from a JSON description (argv[1]),
starts the pumps, prints "ready", and runs until stdin closes, printing its
counters as JSON for each "counters" line it reads meanwhile (a test waits
on them rather than sleeping); then prints its counters, events and TUN
offload mode as JSON
and exits, removing nothing but what dies with it (the TUN device goes with
its fd).
"""

import ipaddress
import json
import socket
import sys

from pyroute2 import IPRoute

from conn25.core.iprange import IPRange
from conn25.daemon.tun import OFFLOAD_OFF, open_tun, set_offload
from conn25.fastpath import Datapath, monotonic_ms


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # "vnet_hdr": virtio-net headers (coalesced writes), as the daemon opens its TUN;
    # "tun_offload": TSO/USO super-packets on reads too (the daemon's --tun-offload).
    offload = cfg.get("tun_offload", False)
    vnet = cfg.get("vnet_hdr", False) or offload
    fd, name = open_tun(cfg["tun"], vnet_hdr=vnet)
    mode = set_offload(fd) if offload else OFFLOAD_OFF
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        for a in cfg["addresses"]:
            ip = ipaddress.ip_address(a)
            ipr.addr("add", index=idx, address=a, prefixlen=ip.max_prefixlen)
        ipr.link("set", index=idx, state="up", mtu=1400)
        for r in cfg["routes"]:
            ipr.route("add", dst=r, oif=idx)
    dp = Datapath(client=cfg.get("client", False), connector=cfg.get("connector", False))
    dp.tables.set_local([ipaddress.ip_address(a) for a in cfg["addresses"]])
    for peer in cfg["peers"]:
        endpoint = peer.get("endpoint")
        dp.tables.set_peer(peer["id"], endpoint and ipaddress.ip_address(endpoint), peer["port"],
                           [ipaddress.ip_address(a) for a in peer["overlay"]])
        if "keypair" in peer:
            kp = peer["keypair"]
            # Created now: the node's clock is the pumps' (a keypair's age is checked).
            dp.install_keypair(peer["id"], local_index=kp["local_index"],
                               remote_index=kp["remote_index"],
                               send_key=bytes.fromhex(kp["send_key"]),
                               receive_key=bytes.fromhex(kp["receive_key"]),
                               initiator=kp["initiator"], created_ms=monotonic_ms(),
                               as_next=False)
    for magic, transit, peer in cfg.get("magic", []):
        dp.tables.set_magic(ipaddress.ip_address(magic), ipaddress.ip_address(transit))
        dp.tables.set_route(ipaddress.ip_address(transit), peer)
    dp.tables.set_magic_ranges([IPRange.parse(r) for r in cfg.get("magic_ranges", [])])
    for peer_id, transit, real in cfg.get("transit", []):
        dp.tables.set_transit(peer_id, ipaddress.ip_address(transit), ipaddress.ip_address(real))
    dp.tables.set_transit_ranges([IPRange.parse(r) for r in cfg.get("transit_ranges", [])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((cfg["listen"], cfg["port"]))
    dp.start(fd, sock, vnet_hdr=vnet, sockbuf=cfg.get("sockbuf", 4 << 20))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "counters":
            print(json.dumps(dp.counters()), flush=True)
    dp.stop()
    events = [(e.kind.value, e.role.value) for e in dp.read_events()]
    print(json.dumps({"counters": dp.counters(), "events": events, "offload": mode}),
          flush=True)


if __name__ == "__main__":
    main()
