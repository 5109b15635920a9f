"""Throwaway network namespaces: the tailnet of ``conn25d demo``, of the
end-to-end tests and of the benchmarks. Only documentation and reserved
addresses; nothing here reaches the host's own network.
"""
