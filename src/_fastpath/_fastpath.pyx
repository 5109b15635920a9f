# cython: language_level=3
"""conn25d datapath, compiled.

One extension module (``conn25._fastpath``) so that per-packet helpers are
inlined C calls rather than calls across modules. The Python-facing surface
is documented in ``conn25.fastpath`` and typed in ``conn25/_fastpath.pyi``.
"""

# How the files fit (uvloop's layout):
#
# * includes/*.pxd: C headers (pthread, sockets, poll/epoll/eventfd, atomics)
#   that Cython's libc/posix packages lack, and OpenSSL's EVP cipher calls;
#   cimported where used.
# * <concern>.pxd: the declarations of one concern (prefix per concern, see
#   the module's .pxd). They are `include`d into src/conn25/_fastpath.pxd,
#   this module's own .pxd, not cimported one by one: a cimported .pxd names
#   another module, and Cython would then look for its non-inline functions
#   in that module's C-API at import time. Included into this module's .pxd
#   they declare this module's functions, and every call stays a direct C
#   call (the inline ones are inlined). The module's .pxd sits in the conn25
#   package because Cython finds it by the module's name, conn25._fastpath.
#   A side effect: Cython lists the declared functions in __pyx_capi__.
# * <concern>.pxi: the implementations, included below. Every declaration is
#   in scope from the module's .pxd, so their order here does not matter,
#   and each file cimports the C functions it uses itself.
# * convert.pxi: the one set of Python-argument converters (cv_).
# * testing.pxi: test probes, all named _test_* / _Test*, outside the API.

include "types.pxi"
include "convert.pxi"
include "checksum.pxi"
include "aead.pxi"
include "packet.pxi"
include "nat.pxi"
include "icmp.pxi"
include "flowtable.pxi"
include "tables.pxi"
include "session.pxi"
include "coalesce.pxi"
include "segment.pxi"
include "datapath.pxi"
include "flowsave.pxi"
include "pump.pxi"
include "dpapi.pxi"
include "testing.pxi"
