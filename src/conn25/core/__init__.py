"""The sans-IO core: configuration and policy, pools and assignments, DNS
mapping and caching, the connector's tables, peer API messages, limits.

Everything here decides and nothing here does I/O: no socket, thread, clock,
trio, netlink or compiled datapath (a test holds every module to that). Time
is passed in as ``now``; the daemon drives these objects.
"""
