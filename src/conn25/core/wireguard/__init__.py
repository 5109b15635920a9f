"""WireGuard, as its whitepaper specifies it, without I/O.

keys        X25519 keys in WireGuard's base64 format (`wg genkey`/`wg pubkey` compatible)
messages    the four wire messages; decoders raise MessageError on anything malformed
noise       the primitives (BLAKE2s, HMAC-BLAKE2s KDF, ChaCha20-/XChaCha20-Poly1305, TAI64N)
handshake   Noise_IKpsk2 as pure functions; a completed handshake yields a Keypair
cookie      mac1, mac2 and cookie replies
ratelimit   handshakes per source address under load
transport   the reference transport: counter nonces, padding, the replay window
peer        one peer's state machine: both roles, sessions, timers (`tick`, `deadline`)
device      a node: its peers and the dispatch of received datagrams

Everything takes `now` (monotonic seconds) and, where a TAI64N timestamp is made, `wall`
(Unix seconds); randomness comes from callables (peer.Randomness) tests may replace. Every
refused datagram raises errors.Rejected.
"""
