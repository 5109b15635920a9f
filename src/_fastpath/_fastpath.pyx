# cython: language_level=3
"""conn25d datapath, compiled.

One extension module (``conn25._fastpath``) so that per-packet helpers are
inlined C calls rather than cross-module calls. Each concern lives in its own
include file; this file only stitches them together. The Python-facing
surface is documented in ``conn25.fastpath``.
"""

include "types.pxi"
include "checksum.pxi"
include "packet.pxi"
include "nat.pxi"
include "icmp.pxi"
include "flowtable.pxi"
include "tables.pxi"
include "datapath.pxi"
include "flowsave.pxi"
include "pump.pxi"
include "dpapi.pxi"
