# The declaration layer of conn25._fastpath (sources in src/_fastpath): one
# .pxd per concern, each declaring its constants, structs and the functions other concerns call
# (the per-packet helpers as `cdef inline`, bodies included). See the top of
# _fastpath.pyx for why they are included here rather than cimported.
#
# Prefixes: c25_ shared types (types.pxd), cs_ checksums, pk_ parsing, nat_
# NAT and fragment tracking, icmp_ ICMP replies, ft_ the flow table, tb_ the
# mapping tables, ss_ WireGuard sessions, aead_/rw_ transport crypto and
# replay windows, wire_ the overlay's WireGuard messages, co_ software GRO
# into the TUN, sg_ TSO/USO super-packets from the TUN split, dp_ the
# per-packet decisions, fs_ saved flows, pump_ the pump threads, cv_
# Python-argument converters. A name with a leading underscore is private to
# its file.
#
# Order: a file's types come after those it uses.

include "types.pxd"
include "checksum.pxd"
include "packet.pxd"
include "nat.pxd"
include "icmp.pxd"
include "flowtable.pxd"
include "aead.pxd"
cdef struct TablesC         # forward: session.pxd names it, tables.pxd defines it
include "session.pxd"
include "tables.pxd"
include "wire.pxd"
include "coalesce.pxd"
include "segment.pxd"
include "datapath.pxd"
include "flowsave.pxd"
include "pump.pxd"
include "convert.pxd"
