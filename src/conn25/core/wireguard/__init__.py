"""WireGuard, as its whitepaper specifies it, without I/O: keys, the wire messages, the
Noise_IKpsk2 handshake, cookies under load, the per-peer timers and a reference transport.

Everything takes `now` (a monotonic second count) and, for TAI64N timestamps, wall-clock
seconds, as arguments; randomness comes from callables that tests may replace.
"""
