/* What WireGuard's transport encryption costs per packet: ChaCha20-Poly1305 (RFC 8439) with
 * WireGuard's nonce (4 zero bytes, the counter little-endian) and no associated data, sealed
 * and opened in place, one thread, as the pumps do it. OpenSSL libcrypto's EVP interface in
 * the ways aead.pxi could use it, against libsodium. Results and the choice: bench/NOTES.md,
 * "Transport encryption: OpenSSL or libsodium".
 *
 *   apt-get install -y libssl-dev libsodium-dev
 *   cc -O2 -o /tmp/aead_cost bench/aead_cost.c -lcrypto -lsodium && /tmp/aead_cost [seconds]
 *
 * Each row runs for `seconds` (default 0.5) per payload size and prints the best of three
 * runs in ns per packet and Gbit/s of payload. Every variant's output is checked against the
 * others' first, so the figures are for code that computes the same bytes.
 */
#include <openssl/evp.h>
#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TAG 16
static uint8_t key[32];

static void nonce_of(uint8_t iv[12], uint64_t counter)
{
	memset(iv, 0, 4);
	for (int i = 0; i < 8; i++)
		iv[4 + i] = (uint8_t)(counter >> (8 * i));
}

static EVP_CIPHER_CTX *ctx;

/* One seal as the pumps do it, with what EVP_CipherInit_ex is given on every call varied:
 * the variants below. NULL leaves that part of the context as it was. */
static int ossl_seal_with(const EVP_CIPHER *cipher, const uint8_t *k, uint64_t counter,
			  uint8_t *buf, int n)
{
	uint8_t iv[12];
	int outl, fin;
	nonce_of(iv, counter);
	if (EVP_CipherInit_ex(ctx, cipher, NULL, k, iv, 1) != 1)
		return -1;
	if (EVP_CipherUpdate(ctx, buf, &outl, buf, n) != 1 ||
	    EVP_CipherFinal_ex(ctx, buf + outl, &fin) != 1)
		return -1;
	return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG, buf + n) == 1 ? 0 : -1;
}

/* The cipher given on every call, as a first reading of the EVP manual suggests. In OpenSSL 3
 * that re-creates the provider's context each time (and EVP_chacha20_poly1305() is a fetch
 * from the global, locked store). */
static int ossl_seal_full(uint64_t counter, uint8_t *buf, int n)
{
	return ossl_seal_with(EVP_chacha20_poly1305(), key, counter, buf, n);
}

/* The cipher set once when the context is made; every call sets only key and nonce. This is
 * what aead.pxi does. */
static int ossl_seal(uint64_t counter, uint8_t *buf, int n)
{
	return ossl_seal_with(NULL, key, counter, buf, n);
}

/* The key left in place, only the nonce set: what a per-keypair context would save. */
static int ossl_seal_ivonly(uint64_t counter, uint8_t *buf, int n)
{
	return ossl_seal_with(NULL, NULL, counter, buf, n);
}

static int ossl_open(uint64_t counter, uint8_t *buf, int n)
{
	uint8_t iv[12];
	int outl, fin;
	nonce_of(iv, counter);
	if (EVP_CipherInit_ex(ctx, NULL, NULL, key, iv, 0) != 1 ||
	    EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG, buf + n - TAG) != 1 ||
	    EVP_CipherUpdate(ctx, buf, &outl, buf, n - TAG) != 1 ||
	    EVP_CipherFinal_ex(ctx, buf + outl, &fin) != 1)
		return -1;
	return n - TAG;
}

/* libsodium's combined form writes ciphertext then tag, in place when c == m. */
static int sodium_seal(uint64_t counter, uint8_t *buf, int n)
{
	uint8_t iv[12];
	unsigned long long clen;
	nonce_of(iv, counter);
	return crypto_aead_chacha20poly1305_ietf_encrypt(buf, &clen, buf, n, NULL, 0, NULL, iv, key);
}

static int sodium_open(uint64_t counter, uint8_t *buf, int n)
{
	uint8_t iv[12];
	unsigned long long mlen;
	nonce_of(iv, counter);
	if (crypto_aead_chacha20poly1305_ietf_decrypt(buf, &mlen, NULL, buf, n, NULL, 0, iv, key))
		return -1;
	return (int)mlen;
}

typedef int (*fn)(uint64_t, uint8_t *, int);

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint8_t buf[8192 + TAG], sealed[8192 + TAG];

/* ns per packet, best of three runs of `seconds`. For an opener, every call opens a fresh
 * copy of one sealed packet (the copy is timed too: memcpy of <= 8 KiB, ~1 % at most). */
static double cost(fn f, int n, int open, double seconds)
{
	double best = 1e30;
	for (int run = 0; run < 3; run++) {
		long iters = 0;
		double t0 = now(), t;
		do {
			for (int i = 0; i < 256; i++) {
				if (open) {
					memcpy(buf, sealed, n + TAG);
					if (f(7, buf, n + TAG) != n)
						abort();
				} else if (f(iters + i, buf, n) != 0) {
					abort();
				}
			}
			iters += 256;
			t = now() - t0;
		} while (t < seconds);
		if (t / iters < best)
			best = t / iters;
	}
	return best * 1e9;
}

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 0.5;
	static const int sizes[] = {64, 1400, 8192};
	static const struct { const char *name; fn f; int open; } rows[] = {
		{"openssl seal, cipher per call", ossl_seal_full, 0},
		{"openssl seal (aead.pxi)", ossl_seal, 0},
		{"openssl seal, nonce only", ossl_seal_ivonly, 0},
		{"libsodium seal", sodium_seal, 0},
		{"openssl open (aead.pxi)", ossl_open, 1},
		{"libsodium open", sodium_open, 1},
	};
	if (sodium_init() < 0 || !(ctx = EVP_CIPHER_CTX_new()) ||
	    EVP_CipherInit_ex(ctx, EVP_chacha20_poly1305(), NULL, NULL, NULL, 1) != 1)
		return 1;
	randombytes_buf(key, sizeof key);

	/* Same bytes from every sealer, and both openers accept them. */
	for (int s = 0; s < 3; s++) {
		int n = sizes[s];
		uint8_t ref[8192 + TAG], tmp[8192 + TAG];
		randombytes_buf(ref, n);
		memcpy(sealed, ref, n);
		if (sodium_seal(7, sealed, n))
			return 1;
		for (int r = 0; r < 3; r++) {
			memcpy(tmp, ref, n);
			if (rows[r].f(7, tmp, n) || memcmp(tmp, sealed, n + TAG)) {
				fprintf(stderr, "%s disagrees with libsodium at %d bytes\n", rows[r].name, n);
				return 1;
			}
		}
		/* The key set by "nonce only" must still be ours: it ran after ossl_seal above. */
		for (int r = 4; r < 6; r++) {
			memcpy(tmp, sealed, n + TAG);
			if (rows[r].f(7, tmp, n + TAG) != n || memcmp(tmp, ref, n)) {
				fprintf(stderr, "%s fails at %d bytes\n", rows[r].name, n);
				return 1;
			}
			tmp[0] ^= 1;
			if (rows[r].f(7, tmp, n + TAG) != -1) {
				fprintf(stderr, "%s accepts a forgery at %d bytes\n", rows[r].name, n);
				return 1;
			}
		}
	}

	printf("%s, libsodium %s, %.2f s per run\n\n", OpenSSL_version(OPENSSL_VERSION),
	       sodium_version_string(), seconds);
	printf("| %-30s |", "ns per packet (Gbit/s)");
	for (int s = 0; s < 3; s++)
		printf(" %11d B |", sizes[s]);
	printf("\n|%s|", "--------------------------------");
	for (int s = 0; s < 3; s++)
		printf("%s|", "--------------:");
	printf("\n");
	for (unsigned r = 0; r < sizeof rows / sizeof rows[0]; r++) {
		printf("| %-30s |", rows[r].name);
		for (int s = 0; s < 3; s++) {
			int n = sizes[s];
			if (rows[r].open) {
				memcpy(sealed, buf, n);
				if (ossl_seal(7, sealed, n))
					return 1;
			} else if (rows[r].f == ossl_seal_ivonly) {
				ossl_seal(0, buf, 0); /* the key in the context is ours */
			}
			double ns = cost(rows[r].f, n, rows[r].open, seconds);
			printf(" %5.0f (%5.1f) |", ns, n * 8 / ns);
		}
		printf("\n");
	}
	return 0;
}
