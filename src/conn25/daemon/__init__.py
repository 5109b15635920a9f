"""The trio shell that runs a node: ``node`` wires the core, the datapath
(``conn25.fastpath``) and the system set-up; the servers (peer API, DNS,
local API), the registration sender and the ``conn25d`` command live beside
it. Every decision it needs is asked of ``conn25.core``.
"""
