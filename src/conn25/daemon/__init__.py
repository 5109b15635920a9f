"""The trio shell that runs a node: ``node`` wires the core, the datapath
(``conn25.fastpath``) and the system set-up; the servers (peer API, DNS,
local API), the registration sender and the ``conn25d`` command live beside
it. Every decision it needs is asked of ``conn25.core``.

A component takes the node through a small Protocol declared in its own
module (``registration.RegistrarNode``, ``peerapi_server.PeerAPINode``,
``status.StatusSource``), never the whole node; only ``dataplane`` writes the
datapath's tables.
"""
