# C declarations the datapath cimports: libc/posix/Linux headers that Cython's
# own libc/posix packages do not cover, and a few inline atomics. Declarations
# only: cimporting them adds no module to import at run time.
