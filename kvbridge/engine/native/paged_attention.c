/* Paged attention, bfloat16, CPU: each query row against the K/V of the first lens[b] tokens
 * of its request, read in place from the cache (no gather into a padded copy).
 *
 * A decode step has one row per request; a prompt (chunk) has one row per new token, each with
 * its own length (its position + 1), so its causal mask is just that length. A query row is
 * computed the same way whatever the other rows are: a prompt token gets the bits it would get
 * as a decode step, so chunked or cached prompts, recomputed (preempted) requests and decodes
 * agree to the bit.
 *
 * Layout (kv_cache.py): one layer's cache is (num_blocks, 2, nkv, bs, hd); token t of a
 * request is row t % bs of block tables[table_row(b)][t / bs]. Queries come scaled,
 * (B, nkv, g, hd), the g query heads that share a KV head next to each other; the output has
 * the same shape.
 *
 * Arithmetic: bf16 inputs widened to float32; scores, softmax and the weighted sum of V in
 * float32; one rounding, to bf16 (nearest even), at the end. Each (row, KV head) is computed
 * alone, in a fixed order, so a row's output never depends on its batch.
 *
 * Scores: where the process turned AMX tiles on (linear.c) and the shape allows (head dim 64
 * or 128, block size a multiple of 16), on tiles (``scores_amx``) for decode rows and prompts
 * alike; else in AVX-512 BF16 lanes (decode: one key at a time; prompt: K transposed, the same
 * sums). The two give other bits, so one rule picks for both paths. On the 2-core test VM
 * the tiles took a decode step's attention (16 rows of 92-432 tokens, the default model's 30
 * layers) from 5.8-6.3 to 4.2-4.9 ms; what is left is mostly waiting for K and V from memory
 * (hence K prefetched two blocks ahead), and the weighted sum of V.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "bf16.h"

/* a . b in 16 float32 lanes, summed in a fixed tree: vectorizes without reassociation */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float part[16] = {0};
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
        for (int j = 0; j < 16; j++) part[j] += a[d + j] * b[d + j];
    for (int j = 0; d + j < n; j++) part[j] += a[d + j] * b[d + j];
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) part[j] += part[j + w];
    return part[0];
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1

static inline __m512 exp_nonpos16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = exp_poly16(r);
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* Scores s[0..L) (max mx) → exp(s - mx) in place; returns their sum. */
static inline float softmax_row(float *si, int64_t L, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 tot = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) {
        __m512 e = exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(si + t), m));
        _mm512_storeu_ps(si + t, e);
        tot = _mm512_add_ps(tot, e);
    }
    if (t < L) {
        const __mmask16 mask = (__mmask16)((1u << (L - t)) - 1u);
        __m512 e = exp_nonpos16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, si + t), m));
        e = _mm512_maskz_mov_ps(mask, e);
        _mm512_mask_storeu_ps(si + t, mask, e);
        tot = _mm512_add_ps(tot, e);
    }
    return sum16(tot);
}

/* acc (nv registers of 16 floats) / sum → bf16 */
static inline void store_row(uint16_t *o, const __m512 *acc, int64_t nv, float sum) {
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int64_t c = 0; c < nv; c++)
        _mm256_storeu_si256((__m256i *)(o + c * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[c], inv)));
}

/* The largest of s[0..L) (L >= 1); max is exact, so its order does not matter. */
static inline float row_max(const float *si, int64_t L) {
    __m512 m = _mm512_set1_ps(-__builtin_inff());
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(si + t));
    if (t < L) {
        const __mmask16 mask = (__mmask16)((1u << (L - t)) - 1u);
        m = _mm512_mask_max_ps(m, mask, m, _mm512_maskz_loadu_ps(mask, si + t));
    }
    return _mm512_reduce_max_ps(m);
}

/* Ask for ``bytes`` at ``p`` (one head's K or V in one block, a few KiB) to be brought into
 * the cache before they are read. A decode row's blocks lie anywhere in the KV region, so
 * the hardware prefetcher, which follows a stream within a page, cannot run ahead of the
 * next block; this pulls it in while the current one is computed. Always inlined: the hint
 * must be a constant where _mm_prefetch is expanded (else GCC drops the prefetch). */
static inline __attribute__((always_inline)) void prefetch_span(const uint16_t *p, int64_t bytes, int hint) {
    const char *c = (const char *)p;
    if (hint == 0)
        for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
    else
        for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
}

/* out[w] lane l = dword w of r[l], for w, l < 16: a 16 x 16 transpose of dwords in four
 * rounds of shuffles (pairs, quads, 128-bit lanes twice). */
static inline void transpose16(const __m512i r[16], __m512i out[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* t[2p]: rows 2p,2p+1 at dwords {0,1} of each 128-bit lane; t[2p+1]: at dwords {2,3} */
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);     /* rows i..i+3, dword 0 of each lane */
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]); /* dword 1 */
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]); /* dword 2 */
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]); /* dword 3 */
    }
    /* u[4a + d]: rows 4a..4a+3 of dwords d, 4+d, 8+d, 12+d (one per 128-bit lane) */
    for (int d = 0; d < 4; d++) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[d], u[4 + d], 0x88);      /* dwords d, 8+d: rows 0-3, 4-7 */
        const __m512i v1 = _mm512_shuffle_i32x4(u[d], u[4 + d], 0xdd);      /* dwords 4+d, 12+d */
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + d], u[12 + d], 0x88); /* rows 8-11, 12-15 */
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + d], u[12 + d], 0xdd);
        out[d] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        out[8 + d] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        out[4 + d] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        out[12 + d] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
}

/* dst[w * 16 + l] = dword w of r[l] */
static inline void transpose16_store(const __m512i r[16], uint32_t *dst) {
    __m512i out[16];
    transpose16(r, out);
    for (int w = 0; w < 16; w++) _mm512_storeu_si512(dst + w * 16, out[w]);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "amx.h"
#define HAVE_AMX_SCORES 1
int linear_bf16_available(void); /* linear.c: 2 once this process turned the AMX tiles on */

/* Tiles of a score step: C (tmm0 or tmm7) = the 16 keys at k (A: 16 rows of HD dims, HD * 2
 * bytes apart, 32 dims a step in tmm1 and tmm6 by turns) times the query tiles in tmm2.. */
#define SCORE_TILE(C, k, HD)                                                    \
    do {                                                                        \
        _tile_zero(C);                                                          \
        _tile_loadd(1, (k), (HD) * 2);                                          \
        _tile_dpbf16ps(C, 1, 2);                                                \
        _tile_loadd(6, (k) + 32, (HD) * 2);                                     \
        _tile_dpbf16ps(C, 6, 3);                                                \
        if ((HD) == 128) {                                                      \
            _tile_loadd(1, (k) + 64, (HD) * 2);                                 \
            _tile_dpbf16ps(C, 1, 4);                                            \
            _tile_loadd(6, (k) + 96, (HD) * 2);                                 \
            _tile_dpbf16ps(C, 6, 5);                                            \
        }                                                                       \
    } while (0)

/* Scores on AMX tiles, the same for a decode row and a prompt's rows: query vector v < nv is
 * at q + (v / g) * qrow + (v % g) * HD and reads the first lens[v / g] keys of KV head h; its
 * scores go to s + v * ls. Per 16 vectors, their dims transposed into pairs once (B tiles: row w
 * holds dims 2w, 2w + 1 of each vector, HD / 32 tiles); per 16 keys, their rows straight from
 * the cache as A tiles (bs a multiple of 16, so the 16 lie in one block), C[key][vector]
 * transposed in registers. A score is one C element: the products of its 32 dim pairs a step
 * added in order, step after step (TDPBF16PS: exact bf16 products, float32 sums, denormals
 * flushed); its bits depend on its query and key alone, not on the tile's other rows and
 * columns. Keys past a vector's length are computed (stale cache rows: any bits) and never
 * stored. configure(16, 16) must be on: every tile 16 rows x 64 bytes. */
static inline __attribute__((always_inline)) void scores_amx(const int HD, const uint16_t *q, int64_t qrow, int64_t nv,
                                                              int64_t g, const int64_t *lens, const uint16_t *kv,
                                                              const int64_t *table, int64_t bs, int64_t h,
                                                              int64_t nkv, int64_t block_elems, float *s, int64_t ls) {
    const int bs_shift = __builtin_ctzll((unsigned long long)bs);
    const int64_t bs_mask = bs - 1, span = bs * HD * 2, k_at = h * bs * HD, v_at = (nkv + h) * bs * HD;
    uint32_t qt[HD / 32][256] __attribute__((aligned(64)));
    float c[2][256] __attribute__((aligned(64))); /* C of even and odd key tiles */
    for (int64_t v0 = 0; v0 < nv; v0 += 16) {
        const int64_t n = nv - v0 < 16 ? nv - v0 : 16;
        int64_t L = 0;
        for (int64_t v = v0; v < v0 + n; v++) L = lens[v / g] > L ? lens[v / g] : L;
        for (int k = 0; k < HD / 32; k++) {
            __m512i r[16];
            for (int64_t l = 0; l < 16; l++)
                r[l] = l < n ? _mm512_loadu_si512(q + ((v0 + l) / g) * qrow + ((v0 + l) % g) * HD + 32 * k)
                             : _mm512_setzero_si512();
            transpose16_store(r, qt[k]);
        }
        MEMORY_BARRIER();
        _tile_loadd(2, qt[0], 64);
        _tile_loadd(3, qt[1], 64);
        if (HD == 128) {
            _tile_loadd(4, qt[HD / 32 - 2], 64);
            _tile_loadd(5, qt[HD / 32 - 1], 64);
        }
        const int64_t blocks = (L + bs - 1) >> bs_shift;
        if (blocks) prefetch_span(kv + table[0] * block_elems + k_at, span, 0);
        if (blocks > 1) prefetch_span(kv + table[1] * block_elems + k_at, span, 0);
        /* tile j's products are issued before tile j - 1's C is read back: the C store and
         * the loads that follow it are a tile apart */
        for (int64_t t = 0; t < L + 16; t += 16) {
            if (t < L) {
                const int64_t j = t >> bs_shift;
                if ((t & bs_mask) == 0) { /* K two blocks ahead to L1, this block's V to L2 */
                    if (j + 2 < blocks) prefetch_span(kv + table[j + 2] * block_elems + k_at, span, 0);
                    prefetch_span(kv + table[j] * block_elems + v_at, span, 1);
                }
                const uint16_t *k = kv + table[j] * block_elems + k_at + (t & bs_mask) * HD;
                if ((t >> 4) & 1) {
                    SCORE_TILE(7, k, HD);
                    _tile_stored(7, c[1], 64);
                } else {
                    SCORE_TILE(0, k, HD);
                    _tile_stored(0, c[0], 64);
                }
            }
            MEMORY_BARRIER();
            if (t == 0) continue;
            const int64_t t0 = t - 16;
            const float *cj = c[(t0 >> 4) & 1];
            __m512i r[16], out[16];
            for (int l = 0; l < 16; l++) r[l] = _mm512_load_si512(cj + 16 * l);
            transpose16(r, out);
            for (int64_t v = 0; v < n; v++) {
                const int64_t left = lens[(v0 + v) / g] - t0;
                if (left > 0)
                    _mm512_mask_storeu_ps(s + (v0 + v) * ls + t0, left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u),
                                          _mm512_castsi512_ps(out[v]));
            }
        }
    }
}
#endif

/* A decode row's scores in AVX-512 BF16 lanes, one key at a time: s[i * L + t] for its g query
 * heads at qb, prefetching the next block's K to L1 and this block's V to L2 for the pass over V. */
static inline __attribute__((always_inline)) void scores_lanes(const int64_t hd, const uint16_t *qb, const uint16_t *kv,
                                                               const int64_t *table, int64_t L, float *s, int64_t g,
                                                               int64_t bs, int64_t h, int64_t nkv, int64_t block_elems) {
    const int64_t nq = hd / 32; /* 32 bf16 pairs per dpbf16 */
    const int bs_shift = __builtin_ctzll((unsigned long long)bs); /* bs is a power of two */
    const int64_t bs_mask = bs - 1;
    const int64_t span = bs * hd * 2, blocks = (L + bs - 1) >> bs_shift; /* one head's K (or V) in a block */
    const int64_t k_at = h * bs * hd, v_at = (nkv + h) * bs * hd;
    if (blocks) prefetch_span(kv + table[0] * block_elems + k_at, span, 0);
    for (int64_t t = 0; t < L; t++) {
        if ((t & bs_mask) == 0) {
            const int64_t j = t >> bs_shift;
            if (j + 1 < blocks) prefetch_span(kv + table[j + 1] * block_elems + k_at, span, 0);
            prefetch_span(kv + table[j] * block_elems + v_at, span, 1);
        }
        const uint16_t *k = kv + table[t >> bs_shift] * block_elems + k_at + (t & bs_mask) * hd;
        __m512bh kc[8];
        for (int64_t c = 0; c < nq; c++) kc[c] = (__m512bh)_mm512_loadu_si512(k + c * 32);
        for (int64_t i = 0; i < g; i++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < nq; c++)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb + i * hd + c * 32), kc[c]);
            s[i * L + t] = sum16(acc);
        }
    }
}

/* One (row, KV head): hd a multiple of 32, at most 8 query heads a group, hd <= 256. Inlined
 * with hd a constant (64, 128) where it can be, so that the accumulators of the weighted sum
 * of V stay in registers: it takes HP heads a pass (each pass reads V again), as many as 16
 * registers hold. */
static inline __attribute__((always_inline)) void
task_avx512(const int64_t hd, const uint16_t *qb, const uint16_t *kv, const int64_t *table, int64_t L, uint16_t *ob,
            float *s, int64_t g, int64_t bs, int64_t h, int64_t nkv, int64_t block_elems, int amx) {
    const int bs_shift = __builtin_ctzll((unsigned long long)bs); /* bs is a power of two */
    const int64_t bs_mask = bs - 1;
    const int64_t span = bs * hd * 2, blocks = (L + bs - 1) >> bs_shift; /* one head's V in a block */
    const int64_t v_at = (nkv + h) * bs * hd;
#ifdef HAVE_AMX_SCORES
    if (amx) /* hd 64 or 128, bs a multiple of 16 */
        scores_amx(hd == 128 ? 128 : 64, qb, 0, g, g, &L, kv, table, bs, h, nkv, block_elems, s, L);
    else
#endif
        scores_lanes(hd, qb, kv, table, L, s, g, bs, h, nkv, block_elems);
    float sum[8];
    for (int64_t i = 0; i < g; i++) sum[i] = softmax_row(s + i * L, L, row_max(s + i * L, L));
    const int64_t nv = hd / 16; /* 16 floats a register */
    enum { HP_MAX = 4 };
    const int64_t hp = nv <= 4 ? 4 : nv <= 8 ? 2 : 1; /* heads a pass: hp * nv <= 16 registers */
    for (int64_t i0 = 0; i0 < g; i0 += hp) {
        const int64_t np = g - i0 < hp ? g - i0 : hp;
        __m512 acc[HP_MAX][16];
        for (int64_t j = 0; j < hp; j++)
            for (int64_t c = 0; c < nv; c++) acc[j][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < L; t++) {
            if ((t & bs_mask) == 0 && (t >> bs_shift) + 1 < blocks)
                prefetch_span(kv + table[(t >> bs_shift) + 1] * block_elems + v_at, span, 0);
            const uint16_t *v = kv + table[t >> bs_shift] * block_elems + v_at + (t & bs_mask) * hd;
            __m512 p[HP_MAX];
            for (int64_t j = 0; j < hp; j++) p[j] = _mm512_set1_ps(j < np ? s[(i0 + j) * L + t] : 0.0f);
            for (int64_t c = 0; c < nv; c++) {
                const __m512 vc = widen16(v + c * 16);
                for (int64_t j = 0; j < hp; j++) acc[j][c] = _mm512_fmadd_ps(p[j], vc, acc[j][c]);
            }
        }
        for (int64_t j = 0; j < np; j++) store_row(ob + (i0 + j) * hd, acc[j], nv, sum[i0 + j]);
    }
}

/* NP heads' weighted sums of V (their scores s, NP rows of L, and V widened to float32, vf)
 * in one pass over V, each head's sum in order of t; NP and HD constants where inlined.
 * restrict: __m512 may alias any float, so without it GCC stored all NP * HD / 16 accumulators
 * to the stack on every key (a store-bound loop, twice the FMAs' time; the four prompt steps
 * of the engine bench's 16 prompts 0.70-0.74 -> 0.65 s) */
static inline __attribute__((always_inline)) void weighted_v(const int NP, const int HD, const float *restrict s, int64_t L,
                                                             int64_t ls, const float *restrict vf, uint16_t *o, const float *sum) {
    __m512 a[4][HD / 16];
    for (int j = 0; j < NP; j++)
        for (int c = 0; c < HD / 16; c++) a[j][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t++) {
        __m512 p[4];
        for (int j = 0; j < NP; j++) p[j] = _mm512_set1_ps(s[j * ls + t]);
        for (int c = 0; c < HD / 16; c++) {
            const __m512 v = _mm512_loadu_ps(vf + t * HD + c * 16);
            for (int j = 0; j < NP; j++) a[j][c] = _mm512_fmadd_ps(p[j], v, a[j][c]);
        }
    }
    for (int j = 0; j < NP; j++) store_row(o + j * HD, a[j], HD / 16, sum[j]);
}

/* Rows r of one request and one KV head (a prompt's tokens), the same arithmetic as
 * task_avx512 for each, but each K and V read once for all the rows. Scores: with ``amx``,
 * scores_amx for all n * g query vectors at once (s: n * g rows of Lmax); else in lanes, K
 * transposed by tiles of 16 keys (kt: for each pair of dims w, 16 keys' pair w side by side),
 * so that one dpbf16 with the query's pair w broadcast gives lane w's partial dot for 16 keys
 * at once, summed in sum16's tree across registers (s: g rows of L, row by row). V widened
 * to float32 once (vf). HD: 64 or 128 (a constant here, so the accumulators stay in registers). */
static inline __attribute__((always_inline)) void
run_avx512(const int HD, const uint16_t *q, const int64_t *lens, int64_t n, const uint16_t *kv, const int64_t *table,
           uint16_t *out, float *s, uint32_t *kt, float *vf, int64_t g, int64_t bs, int64_t h, int64_t nkv,
           int64_t block_elems, int amx) {
    const int W = HD / 2; /* dword pairs of a row */
    const int bs_shift = __builtin_ctzll((unsigned long long)bs);
    const int64_t bs_mask = bs - 1;
    int64_t Lmax = 0;
    for (int64_t r = 0; r < n; r++) Lmax = lens[r] > Lmax ? lens[r] : Lmax;
    const int64_t tiles = (Lmax + 15) / 16;
    for (int64_t j = 0; j < tiles; j++) {
        uint32_t *kj = kt + j * W * 16;
        for (int q16 = 0; q16 < W / 16 && !amx; q16++) { /* the lanes' K tiles: pairs q16*16 .. +15 of the 16 keys */
            __m512i r[16];
            for (int64_t l = 0; l < 16; l++) {
                const int64_t t = j * 16 + l;
                r[l] = t < Lmax ? _mm512_loadu_si512(kv + table[t >> bs_shift] * block_elems + (h * bs + (t & bs_mask)) * HD + q16 * 32)
                                : _mm512_setzero_si512();
            }
            transpose16_store(r, kj + q16 * 16 * 16);
        }
        for (int64_t l = 0; l < 16 && j * 16 + l < Lmax; l++) {
            const int64_t t = j * 16 + l;
            const uint16_t *v = kv + table[t >> bs_shift] * block_elems + ((nkv + h) * bs + (t & bs_mask)) * HD;
            for (int c = 0; c < HD / 16; c++) _mm512_storeu_ps(vf + t * HD + c * 16, widen16(v + c * 16));
        }
    }
#ifdef HAVE_AMX_SCORES
    if (amx)
        scores_amx(HD, q, nkv * g * HD, n * g, g, lens, kv, table, bs, h, nkv, block_elems, s, Lmax);
#endif
    for (int64_t r = 0; r < n; r++) {
        const int64_t L = lens[r], ls = amx ? Lmax : L; /* row r's g rows of scores, ls apart */
        float *sr = amx ? s + r * g * Lmax : s;
        float sum[8];
        for (int64_t i = 0; i < g; i++) {
            float *si = sr + i * ls;
            if (amx) {
                sum[i] = softmax_row(si, L, row_max(si, L));
                continue;
            }
            const uint32_t *qw = (const uint32_t *)(q + (r * nkv * g + i) * HD);
            __m512 mxv = _mm512_set1_ps(-__builtin_inff());
            for (int64_t j = 0; j * 16 < L; j++) {
                const uint32_t *kj = kt + j * W * 16;
                __m512 a[16];
                for (int w = 0; w < 16; w++) a[w] = _mm512_setzero_ps();
                for (int c = 0; c < W / 16; c++) /* dpbf16 chunk c of 32 dims: lane w is pair c*16+w */
                    for (int w = 0; w < 16; w++)
                        a[w] = _mm512_dpbf16_ps(a[w], (__m512bh)_mm512_set1_epi32((int)qw[c * 16 + w]),
                                                (__m512bh)_mm512_loadu_si512(kj + (c * 16 + w) * 16));
                for (int w = 0; w < 8; w++) a[w] = _mm512_add_ps(a[w], a[w + 8]);
                for (int w = 0; w < 4; w++) a[w] = _mm512_add_ps(a[w], a[w + 4]);
                for (int w = 0; w < 2; w++) a[w] = _mm512_add_ps(a[w], a[w + 2]);
                const __m512 dot = _mm512_add_ps(a[0], a[1]);
                const int64_t left = L - j * 16;
                const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
                _mm512_mask_storeu_ps(si + j * 16, mask, dot);
                mxv = _mm512_mask_max_ps(mxv, mask, mxv, dot);
            }
            sum[i] = softmax_row(si, L, _mm512_reduce_max_ps(mxv));
        }
        /* the weighted sum of V: each load of V feeds every head of a pass (up to 4 at hd 64,
         * 2 at 128: their accumulators fill 16 registers); each head's sum is in order of t */
        const int64_t hp = HD == 64 ? 4 : 2;
        for (int64_t i0 = 0; i0 < g; i0 += hp) {
            const int64_t np = g - i0 < hp ? g - i0 : hp;
            const float *si = sr + i0 * ls;
            uint16_t *o = out + (r * nkv * g + i0) * HD;
            if (np == 4) weighted_v(4, HD, si, L, ls, vf, o, sum + i0);
            else if (np == 3) weighted_v(3, HD, si, L, ls, vf, o, sum + i0);
            else if (np == 2) weighted_v(2, HD, si, L, ls, vf, o, sum + i0);
            else weighted_v(1, HD, si, L, ls, vf, o, sum + i0);
        }
    }
}
#endif

#define MAX_G 16
#define MAX_HD 256

/* One (row, KV head), any shape up to MAX_G and MAX_HD, scalar code the compiler vectorizes. */
static void task_portable(const uint16_t *qb, const uint16_t *kv, const int64_t *table, int64_t L, uint16_t *ob,
                          float *s, int64_t g, int64_t hd, int64_t bs, int64_t h, int64_t nkv, int64_t block_elems) {
    const int bs_shift = __builtin_ctzll((unsigned long long)bs);
    float qf[MAX_G][MAX_HD], acc[MAX_G][MAX_HD], kf[MAX_HD];
    float mx[MAX_G], sum[MAX_G];
    for (int64_t i = 0; i < g; i++) {
        for (int64_t d = 0; d < hd; d++) qf[i][d] = bf16_to_f32(qb[i * hd + d]);
        mx[i] = -__builtin_inff();
    }
    for (int64_t t = 0; t < L; t++) {
        const uint16_t *k = kv + table[t >> bs_shift] * block_elems + (h * bs + (t & (bs - 1))) * hd;
        for (int64_t d = 0; d < hd; d++) kf[d] = bf16_to_f32(k[d]);
        for (int64_t i = 0; i < g; i++) {
            const float dot = dot_f32(qf[i], kf, hd);
            s[i * L + t] = dot;
            if (dot > mx[i]) mx[i] = dot;
        }
    }
    for (int64_t i = 0; i < g; i++) {
        float *si = s + i * L;
        float m = mx[i], total = 0.0f;
        for (int64_t t = 0; t < L; t++) {
            si[t] = exp_nonpos(si[t] - m);
            total += si[t];
        }
        sum[i] = total;
        for (int64_t d = 0; d < hd; d++) acc[i][d] = 0.0f;
    }
    for (int64_t t = 0; t < L; t++) {
        const uint16_t *v = kv + table[t >> bs_shift] * block_elems + ((nkv + h) * bs + (t & (bs - 1))) * hd;
        for (int64_t d = 0; d < hd; d++) kf[d] = bf16_to_f32(v[d]);
        for (int64_t i = 0; i < g; i++) {
            const float p = s[i * L + t];
            for (int64_t d = 0; d < hd; d++) acc[i][d] += p * kf[d];
        }
    }
    for (int64_t i = 0; i < g; i++) {
        const float inv = 1.0f / sum[i];
        for (int64_t d = 0; d < hd; d++) ob[i * hd + d] = f32_to_bf16(acc[i][d] * inv);
    }
}

#define RUN 32 /* rows of one request that the prompt path takes at a time */

/* Floats of scratch each thread needs: scores (RUN * g rows of max_len on AMX tiles, else g),
 * then for the prompt path K transposed by tiles and V widened (``run_avx512``). */
#define SCORE_ROWS(g) (RUN * (g))
int64_t paged_attention_scratch(int64_t g, int64_t hd, int64_t max_len) {
    return SCORE_ROWS(g) * max_len + (max_len + 15) / 16 * 16 * (hd / 2) + max_len * hd;
}

/* Returns 0, or -1 when a shape is beyond what this kernel was written for.
 * row_table: (B,) which row of ``tables`` each query row reads (NULL: row b reads table b);
 * scratch: num_threads * paged_attention_scratch(g, hd, max_len) floats. */
int paged_attention_bf16(const uint16_t *q, const uint16_t *kv, const int64_t *tables, const int64_t *lens,
                         const int64_t *row_table, uint16_t *out, float *scratch, int64_t B, int64_t nkv, int64_t g,
                         int64_t hd, int64_t bs, int64_t width, int64_t max_len, int num_threads) {
    if (g > MAX_G || hd > MAX_HD || g < 1 || hd < 1 || bs < 1 || (bs & (bs - 1))) return -1;
    const int64_t block_elems = 2 * nkv * bs * hd; /* one block of one layer, K and V */
    const int64_t per_thread = paged_attention_scratch(g, hd, max_len);
    /* AMX tiles for the scores where this process turned them on (the products' tiles), for
     * the shapes both the decode and the prompt path take: one rule, so the two give the same bits */
    int amx = 0;
#ifdef HAVE_AMX_SCORES
    amx = linear_bf16_available() == 2 && bs % 16 == 0 && (hd == 64 || hd == 128) && g <= 8;
#endif
    /* runs: consecutive rows that read the same table (a prompt's tokens), at most RUN rows */
    int64_t *starts = malloc((size_t)(B + 1) * sizeof *starts);
    if (!starts) return -2;
    int64_t runs = 0;
    for (int64_t b = 0; b < B;) {
        int64_t e = b + 1;
        while (e < B && e - b < RUN && row_table && row_table[e] == row_table[b]) e++;
        starts[runs++] = b;
        b = e;
    }
    starts[runs] = B;
    /* dynamic: a prompt's rows grow longer one by one, and a thread whose core is busy with
     * another process should not hold back the rest */
#pragma omp parallel num_threads(num_threads)
    {
#ifdef HAVE_AMX_SCORES
    if (amx) configure(16, 16);
#endif
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t u = 0; u < runs; u++) {
        for (int64_t h = 0; h < nkv; h++) {
            const int64_t b0 = starts[u], n = starts[u + 1] - b0;
            const int64_t *table = tables + (row_table ? row_table[b0] : b0) * width;
            float *s = scratch + (int64_t)omp_get_thread_num() * per_thread;
#ifdef HAVE_AVX512_BF16
            if (n > 1 && (hd == 64 || hd == 128) && g <= 8) {
                uint32_t *kt = (uint32_t *)(s + SCORE_ROWS(g) * max_len);
                float *vf = (float *)kt + (max_len + 15) / 16 * 16 * (hd / 2);
                const uint16_t *qr = q + (b0 * nkv + h) * g * hd;
                uint16_t *orow = out + (b0 * nkv + h) * g * hd;
                if (hd == 64)
                    run_avx512(64, qr, lens + b0, n, kv, table, orow, s, kt, vf, g, bs, h, nkv, block_elems, amx);
                else
                    run_avx512(128, qr, lens + b0, n, kv, table, orow, s, kt, vf, g, bs, h, nkv, block_elems, amx);
                continue;
            }
#endif
            for (int64_t b = b0; b < b0 + n; b++) {
                const uint16_t *qb = q + (b * nkv + h) * g * hd;
                uint16_t *ob = out + (b * nkv + h) * g * hd;
#ifdef HAVE_AVX512_BF16
                if (hd % 32 == 0 && g <= 8) { /* 64 and 128 as constants: accumulators in registers */
                    if (hd == 64) task_avx512(64, qb, kv, table, lens[b], ob, s, g, bs, h, nkv, block_elems, amx);
                    else if (hd == 128) task_avx512(128, qb, kv, table, lens[b], ob, s, g, bs, h, nkv, block_elems, amx);
                    else task_avx512(hd, qb, kv, table, lens[b], ob, s, g, bs, h, nkv, block_elems, 0);
                    continue;
                }
#endif
                task_portable(qb, kv, table, lens[b], ob, s, g, hd, bs, h, nkv, block_elems);
            }
        }
    }
#ifdef HAVE_AMX_SCORES
    if (amx) _tile_release();
#endif
    }
    free(starts);
    return 0;
}
