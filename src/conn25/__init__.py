"""conn25d: domain-based app connectors (the "Connectors 2025" design).

The modules directly in this package are the sans-IO core: they read no
clock, open no socket and start no thread; time is always passed in as
``now`` (seconds, wall clock, as a float). The compiled datapath is
``conn25._fastpath`` behind ``conn25.fastpath``.
"""

__version__ = "0.1.0"
