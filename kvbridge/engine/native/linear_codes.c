/* Products of a few rows (a decode step) with weights read as their GGUF codes, on AMX tiles.
 *
 * A decode step streams every weight from memory once; in bfloat16 that is 2 bytes a weight,
 * and on a 2-core VM at ~21 GB/s the default model's layers (212 MB) alone take ~8.5 ms of a
 * ~21 ms step. Its GGUF holds them as Q4_1 (32 weights share a float16 scale d and minimum m,
 * each weight a 4-bit code q; 0.625 bytes a weight) and its output head as Q8_0 (a float16
 * scale d, each weight an int8 q; 1.0625 bytes). The loader's bfloat16 weight is
 * bf16(float(d) * q + float(m)), resp. bf16(float(d) * q) (weights.py: an exact product, one
 * rounding of the sum, one to bfloat16 at nearest even). This kernel keeps the codes and
 * rebuilds each AMX B tile of linear.c's packing from them just before it is used: the same
 * bfloat16 values in the same places, so linear_amx.c's sums in linear_amx.c's order, and a
 * row gets the same bits here as there, alone or in any batch. ``codes_matches`` checks at
 * load that every rebuilt tile equals the packed bfloat16 one (else the layer keeps those).
 *
 * Packing: for each block of 16 outputs and each 32 inputs (one GGUF block of each output),
 * one tile: 16 rows of codes, then the 16 scales (and for Q4_1 the 16 minimums) as float16.
 * Row p of the B tile holds, for the 16 outputs j, the bfloat16 weights of inputs 2p and
 * 2p + 1 side by side (element 2j + s). A Q8_0 code row is those 32 int8 in that order; a
 * Q4_1 one is 16 bytes, byte i holding in its low half the code of element i (outputs 0-7) and
 * in its high half that of element 16 + i (outputs 8-15). Either way a row widens to two sets
 * of 16 lanes, the B row's two halves: a multiply (Q4_1: an FMA) each with the scales (and
 * minimums) laid out to match, one conversion of the 32 floats to bfloat16 in the tile's order.
 *
 * Rebuilding, not the memory, bounds this kernel (Q4_1 codes came at ~10 GB/s, where the
 * packed bfloat16 weights stream at 25-30), so it is laid out for the rebuild: a Q4_1 code
 * becomes a float by a vpermps lookup (no mask, no conversion); step t + 1's tiles are rebuilt
 * while step t's products run, so no tile load waits for stores just made; the codes are
 * prefetched three steps ahead. The default model's decode products at 16 rows, 2 threads,
 * on the 2-core test VM (each one-step variant alternated in one process): layers 7.5 ->
 * 6.1 ms, head 1.62 -> 1.48 ms; at 1 row 7.0 -> 5.6 ms, at 32 rows 8.0 -> 7.3 ms.
 *
 * ``kind`` is the ggml type id: 3 (Q4_1) or 8 (Q8_0).
 */
#include <stdint.h>
#include <string.h>

#define Q4_1 3
#define Q8_0 8
#define Q4_TILE 320 /* bytes of a packed Q4_1 tile: 256 of codes, 32 of scales, 32 of minimums */
#define Q8_TILE 544 /* of a Q8_0 tile: 512 of codes, 32 of scales */

static int64_t tile_bytes(int kind) { return kind == Q4_1 ? Q4_TILE : kind == Q8_0 ? Q8_TILE : 0; }

/* Bytes of the packed codes of an (N, K) weight of ``kind``; 0 for a kind not taken. */
int64_t codes_packed_bytes(int kind, int64_t N, int64_t K) { return (N + 15) / 16 * (K / 32) * tile_bytes(kind); }

/* GGUF blocks of an (N, K) weight (N rows of K/32 blocks: Q4_1 20 bytes, d and m as float16
 * then 16 bytes whose low halves are codes 0-15 and high halves codes 16-31; Q8_0 34 bytes, d
 * then 32 int8) -> the packing above; outputs past N get d = m = 0 (weight 0, like linear.c's
 * padding). Returns 1 for a kind not taken or K not a multiple of 32. */
int codes_pack(int kind, const uint8_t *raw, int64_t N, int64_t K, uint8_t *out) {
    const int64_t tb = tile_bytes(kind), kt = K / 32, nb = (N + 15) / 16, bb = kind == Q4_1 ? 20 : 34;
    if (!tb || K % 32 || N <= 0) return 1;
    memset(out, 0, (size_t)codes_packed_bytes(kind, N, K));
    for (int64_t b = 0; b < nb; b++)
        for (int64_t t = 0; t < kt; t++) {
            uint8_t *o = out + (b * kt + t) * tb, *scales = o + tb - (kind == Q4_1 ? 64 : 32);
            for (int j = 0; j < 16 && 16 * b + j < N; j++) {
                const uint8_t *blk = raw + ((16 * b + j) * kt + t) * bb;
                memcpy(scales + 2 * j, blk, 2);
                if (kind == Q8_0) {
                    for (int k = 0; k < 32; k++) o[32 * (k / 2) + 2 * j + k % 2] = blk[2 + k];
                    continue;
                }
                memcpy(scales + 32 + 2 * j, blk + 2, 2);
                for (int k = 0; k < 32; k++) {
                    int q = k < 16 ? blk[4 + k] & 15 : blk[4 + k - 16] >> 4;
                    o[16 * (k / 2) + 2 * (j % 8) + k % 2] |= (uint8_t)(j < 8 ? q : q << 4);
                }
            }
        }
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

/* The 16 float16 at h as floats, laid out for the B row's low half (outputs 0-7, each twice)
 * and its high half (outputs 8-15). */
static inline void halves(const uint8_t *h, __m512 *lo, __m512 *hi) {
    const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
    *lo = _mm512_permutexvar_ps(lo_idx, v);
    *hi = _mm512_permutexvar_ps(_mm512_add_epi32(lo_idx, _mm512_set1_epi32(8)), v);
}

/* One packed Q4_1 tile -> its 16 x 32 bfloat16 B tile (1 KB at buf). */
static inline void unpack_q4_1(const uint8_t *t, uint16_t *buf) {
    __m512 dlo, dhi, mlo, mhi;
    halves(t + 256, &dlo, &dhi);
    halves(t + 288, &mlo, &mhi);
    const __m512 q = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int p = 0; p < 16; p++) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(t + 16 * p)));
        /* a code as a float: the lane of q its low 4 bits pick (vpermps reads no more of it);
         * d * q is exact in float32 (11 by 4 bits): the FMA rounds once, as d * q + m does */
        __m512 lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, q), dlo, mlo);
        __m512 hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), q), dhi, mhi);
        _mm512_store_si512(buf + 32 * p, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* One packed Q8_0 tile -> its B tile. */
static inline void unpack_q8_0(const uint8_t *t, uint16_t *buf) {
    __m512 dlo, dhi;
    halves(t + 512, &dlo, &dhi);
    for (int p = 0; p < 16; p++) {
        /* d * q is exact in float32 (11 by 8 bits) */
        __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(t + 32 * p)))), dlo);
        __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(t + 32 * p + 16)))), dhi);
        _mm512_store_si512(buf + 32 * p, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

static inline void unpack(int kind, const uint8_t *t, uint16_t *buf) {
    if (kind == Q4_1)
        unpack_q4_1(t, buf);
    else
        unpack_q8_0(t, buf);
}

/* How many tiles of ``codes`` differ from the same tiles of linear.c's packing ``w`` of the
 * same (N, K) weight: 0 when the codes give exactly the packed bfloat16 weights. */
int64_t codes_matches(int kind, const uint8_t *codes, const uint16_t *w, int64_t N, int64_t K) {
    const int64_t kt = K / 32, nb = (N + 15) / 16, tb = tile_bytes(kind);
    uint16_t buf[512] __attribute__((aligned(64)));
    int64_t bad = 0;
    if (!tb) return nb * kt;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t t = 0; t < kt; t++) {
            unpack(kind, codes + (b * kt + t) * tb, buf);
            bad += memcmp(buf, w + b * K * 16 + t * 512, sizeof buf) != 0;
        }
    return bad;
}

#else

int64_t codes_matches(int kind, const uint8_t *codes, const uint16_t *w, int64_t N, int64_t K) {
    (void)kind, (void)codes, (void)w;
    return (N + 15) / 16 * (K / 32); /* cannot rebuild them here: none matches */
}

#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "amx.h"

/* rows 0.. (r0 + r1) against output blocks b, b+1 (nb = 1 or 2), B tiles rebuilt from codes;
 * linear_amx.c's block() with its B tiles from memory */
static inline void block_codes(int kind, const uint16_t *x, int64_t K, const uint8_t *codes, const float *bias,
                               uint16_t *y, int64_t N, int64_t b, int nb, int r0, int r1,
                               struct pending_block *pend) {
    uint16_t buf[2][2][512] __attribute__((aligned(64))); /* [k step parity][output block] */
    const int64_t xs = K * 2, kt = K / 32, tb = tile_bytes(kind);
    const uint8_t *t0 = codes + b * kt * tb, *t1 = t0 + kt * tb;
    const uint16_t *x1 = x + 16 * K;
    zero_block(nb, r1);
    unpack(kind, t0, buf[0][0]);
    if (nb > 1) unpack(kind, t1, buf[0][1]);
    for (int64_t t = 0; t < kt; t++) {
        /* step t's tiles, rebuilt one step ago: their stores are out of the store buffer, so
         * the tile loads need not wait for them (a tile load right after them did) */
        MEMORY_BARRIER();
        block_step(x + 32 * t, x1 + 32 * t, xs, buf[t & 1][0], buf[t & 1][1], nb, r1);
        MEMORY_BARRIER(); /* step t + 1's go where step t - 1's were loaded from */
        if (t + 3 < kt) /* the codes of step t + 3 into L1, 1-2 KB ahead of their use */
            for (int64_t l = 0; l < tb; l += 64) {
                _mm_prefetch((const char *)(t0 + (t + 3) * tb + l), _MM_HINT_T0);
                if (nb > 1) _mm_prefetch((const char *)(t1 + (t + 3) * tb + l), _MM_HINT_T0);
            }
        if (t + 1 < kt) {
            unpack(kind, t0 + (t + 1) * tb, buf[(t + 1) & 1][0]);
            if (nb > 1) unpack(kind, t1 + (t + 1) * tb, buf[(t + 1) & 1][1]);
        }
    }
    stash_block(pend, y, N, bias, b, nb, r0 + r1);
}

/* linear_bf16_amx's products for M <= 32 rows, the weights as codes_pack made them. Returns 0;
 * 1 for a shape or kind it does not take; 2 without AMX (the caller made sure tiles are on). */
int linear_codes_amx(int kind, const uint16_t *x, const uint8_t *codes, const float *bias, uint16_t *y, int64_t M,
                     int64_t N, int64_t K, int nthreads) {
    if (!tile_bytes(kind) || K % 32 || M < 0 || M > 32 || N <= 0) return 1;
    if (M == 0) return 0;
    const int64_t nblocks = (N + 15) / 16, pairs = (nblocks + 1) / 2;
    const int r0 = M < 16 ? (int)M : 16, r1 = (int)M - r0;
#pragma omp parallel num_threads(nthreads)
    {
        struct pending_block pend __attribute__((aligned(64)));
        pend.y = NULL;
        configure(r0, r1);
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < pairs; p++) {
            int nb = 2 * p + 1 < nblocks ? 2 : 1;
            if (kind == Q4_1) /* two copies, each with its unpacking inlined */
                block_codes(Q4_1, x, K, codes, bias, y, N, 2 * p, nb, r0, r1, &pend);
            else
                block_codes(Q8_0, x, K, codes, bias, y, N, 2 * p, nb, r0, r1, &pend);
        }
        finish_block(&pend);
        _tile_release();
    }
    return 0;
}

#else

int linear_codes_amx(int kind, const uint16_t *x, const uint8_t *codes, const float *bias, uint16_t *y, int64_t M,
                     int64_t N, int64_t K, int nthreads) {
    (void)kind, (void)x, (void)codes, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return 2;
}

#endif
