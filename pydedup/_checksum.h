/* The page checksum: what the trees are keyed by and what tells a page
 * written since the last pass. It need not resist an attacker (equal
 * checksums are always followed by a byte comparison), only spread pages
 * over the trees' buckets and be cheap: after the zero test it is most of
 * the time a pass spends reading a page that is not zero.
 *
 * A page is read as 64-bit words; word i goes to lane i % 8, whose sum
 * grows by lo * hi + word, where lo and hi are the 32-bit halves of the
 * word XORed with a fixed random key word (4 KiB of key: the
 * multiply-and-add hash of UMAC's NH, with the word itself added so that
 * no word is lost to a zero factor). A 32-by-32-bit multiply to 64 bits
 * is one vector instruction on every x86-64 CPU (pmuludq), so 8 lanes are
 * two AVX2 registers or four SSE2 ones; the lanes are mixed and folded
 * into one word after each 4 KiB. Every version computes the same sums:
 * the checksum is the same on every CPU, as a store shared by processes
 * needs (tests/test_checksum.py compares them).
 *
 * It replaces python-xxhash's XXH3, which pydedup took through a symbol
 * that package's extension module happens to export, not an API of it.
 * That build is SSE2 only; on AVX2 this hashes a page in L1 1.45x as fast.
 * A page the scan hashes comes from memory, though (the zero test reads
 * its first line only), where both read at the speed of memory
 * (benchmarks/checksum.py). */
#ifndef PYDEDUP_CHECKSUM_H
#define PYDEDUP_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PD_KEY_WORDS 512                 /* one 4 KiB page's words */
#define PD_LANES 8

static uint64_t pd_key[PD_KEY_WORDS] __attribute__((aligned(64)));

/* splitmix64's output function: every bit of x moves every bit out. */
static inline uint64_t pd_mix64(uint64_t x)
{
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t pd_fold(uint64_t *acc, size_t size)
{
    uint64_t h = size;
    for (int l = 0; l < PD_LANES; l++)
        h = pd_mix64(h ^ acc[l]);
    return h;
}

static inline void pd_mix_lanes(uint64_t *acc)
{
    for (int l = 0; l < PD_LANES; l++)
        acc[l] = pd_mix64(acc[l]);
}

/* Any size that is a multiple of 64 bytes (a page is). */
static uint64_t pd_checksum_portable(const void *data, size_t size)
{
    const uint64_t *w = (const uint64_t *)data;
    uint64_t acc[PD_LANES] = {0};
    size_t n = size / 8;
    for (size_t block = 0; block < n; block += PD_KEY_WORDS) {
        size_t len = n - block < PD_KEY_WORDS ? n - block : PD_KEY_WORDS;
        for (size_t i = 0; i < len; i++) {
            uint64_t word = w[block + i], x = word ^ pd_key[i];
            acc[i % PD_LANES] += (x & 0xffffffffu) * (x >> 32) + word;
        }
        pd_mix_lanes(acc);
    }
    return pd_fold(acc, size);
}

#if defined(__x86_64__)
/* One 16-byte step of the sums: two words into their two lanes. */
static inline __m128i pd_step_sse2(__m128i acc, const __m128i *w, const __m128i *k)
{
    __m128i word = _mm_loadu_si128(w), x = _mm_xor_si128(word, _mm_load_si128(k));
    return _mm_add_epi64(acc, _mm_add_epi64(_mm_mul_epu32(x, _mm_srli_epi64(x, 32)), word));
}

static uint64_t pd_checksum_sse2(const void *data, size_t size)
{
    const __m128i *w = (const __m128i *)data, *k = (const __m128i *)pd_key;
    uint64_t acc[PD_LANES] = {0};
    size_t n = size / 16;
    for (size_t block = 0; block < n; block += PD_KEY_WORDS / 2) {
        size_t len = n - block < PD_KEY_WORDS / 2 ? n - block : PD_KEY_WORDS / 2;
        const __m128i *in = w + block;
        __m128i a0 = _mm_loadu_si128((const __m128i *)acc), a1 = _mm_loadu_si128((const __m128i *)acc + 1);
        __m128i a2 = _mm_loadu_si128((const __m128i *)acc + 2), a3 = _mm_loadu_si128((const __m128i *)acc + 3);
        for (size_t i = 0; i < len; i += 4) {
            a0 = pd_step_sse2(a0, in + i, k + i);
            a1 = pd_step_sse2(a1, in + i + 1, k + i + 1);
            a2 = pd_step_sse2(a2, in + i + 2, k + i + 2);
            a3 = pd_step_sse2(a3, in + i + 3, k + i + 3);
        }
        _mm_storeu_si128((__m128i *)acc, a0);
        _mm_storeu_si128((__m128i *)acc + 1, a1);
        _mm_storeu_si128((__m128i *)acc + 2, a2);
        _mm_storeu_si128((__m128i *)acc + 3, a3);
        pd_mix_lanes(acc);
    }
    return pd_fold(acc, size);
}

__attribute__((target("avx2")))
static uint64_t pd_checksum_avx2(const void *data, size_t size)
{
    const __m256i *w = (const __m256i *)data, *k = (const __m256i *)pd_key;
    uint64_t acc[PD_LANES] = {0};
    size_t n = size / 32;
    for (size_t block = 0; block < n; block += PD_KEY_WORDS / 4) {
        size_t len = n - block < PD_KEY_WORDS / 4 ? n - block : PD_KEY_WORDS / 4;
        __m256i a0 = _mm256_loadu_si256((const __m256i *)acc);
        __m256i a1 = _mm256_loadu_si256((const __m256i *)acc + 1);
        for (size_t i = 0; i < len; i += 2) {
            __m256i w0 = _mm256_loadu_si256(w + block + i), w1 = _mm256_loadu_si256(w + block + i + 1);
            __m256i x0 = _mm256_xor_si256(w0, _mm256_load_si256(k + i));
            __m256i x1 = _mm256_xor_si256(w1, _mm256_load_si256(k + i + 1));
            a0 = _mm256_add_epi64(a0, _mm256_add_epi64(_mm256_mul_epu32(x0, _mm256_srli_epi64(x0, 32)), w0));
            a1 = _mm256_add_epi64(a1, _mm256_add_epi64(_mm256_mul_epu32(x1, _mm256_srli_epi64(x1, 32)), w1));
        }
        _mm256_storeu_si256((__m256i *)acc, a0);
        _mm256_storeu_si256((__m256i *)acc + 1, a1);
        pd_mix_lanes(acc);
    }
    return pd_fold(acc, size);
}
#endif

typedef uint64_t (*pd_checksum_fn)(const void *data, size_t size);

typedef struct {
    const char *name;
    pd_checksum_fn fn;
} pd_checksum_version;

/* The versions this CPU runs, fastest first; a NULL name after the last. */
static const pd_checksum_version *pd_checksum_versions(void)
{
    static pd_checksum_version versions[4];
    int n = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        versions[n++] = (pd_checksum_version){"avx2", pd_checksum_avx2};
    versions[n++] = (pd_checksum_version){"sse2", pd_checksum_sse2};
#endif
    versions[n++] = (pd_checksum_version){"portable", pd_checksum_portable};
    versions[n] = (pd_checksum_version){NULL, NULL};
    return versions;
}

static pd_checksum_fn pd_checksum_best = pd_checksum_portable;

/* When the module loads: the key (splitmix64 from a fixed seed, the same in
 * every process) and the fastest version. */
__attribute__((constructor))
static void pd_checksum_init(void)
{
    uint64_t state = 0x7064656475700001ULL;
    for (int i = 0; i < PD_KEY_WORDS; i++) {
        state += 0x9e3779b97f4a7c15ULL;
        pd_key[i] = pd_mix64(state);
    }
    pd_checksum_best = pd_checksum_versions()[0].fn;
}

/* The checksum of a page (size a multiple of 64 bytes). */
static inline uint64_t pd_page_checksum(const void *page, size_t size)
{
    return pd_checksum_best(page, size);
}

#endif
