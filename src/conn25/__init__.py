"""conn25d: domain-based app connectors (the "Connectors 2025" design).

The rooms of the package:

* ``conn25.core``: what decides. Sans-IO: no socket, no thread, no clock
  (time comes in as ``now``), no trio and no compiled datapath; tested
  without root.
* ``conn25.fastpath``: the one Python module in front of the compiled
  per-packet datapath ``conn25._fastpath`` (typed by ``_fastpath.pyi``).
* ``conn25.daemon``: the trio shell that runs a node: it drives the core,
  the datapath and the system (TUN, routes, nftables), serves the peer API,
  DNS and the local API, and is the ``conn25d`` command.
* ``conn25.lab``: throwaway network namespaces for the demo, the tests and
  the benchmarks.
"""

__version__ = "0.1.0"
