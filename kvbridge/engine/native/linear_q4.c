/* Products of a few rows (a decode step) with weights read as GGUF Q4_1 codes, on AMX tiles.
 *
 * A decode step streams every weight from memory once; in bfloat16 that is 2 bytes a weight,
 * and on a 2-core VM at ~21 GB/s the default model's layers (212 MB) alone take ~8.5 ms of a
 * ~21 ms step. Its GGUF holds those weights as Q4_1: 32 weights share a float16 scale d and
 * minimum m, each weight a 4-bit code q, and the loader's bfloat16 weight is
 * bf16(float(d) * q + float(m)) (weights.py: an exact product, one rounding of the sum, then
 * one to bfloat16 at nearest even). This kernel keeps the codes (0.625 bytes a weight) and
 * rebuilds each AMX B tile of linear.c's packing from them just before it is used: the same
 * bfloat16 values in the same places, so linear_amx.c's sums in linear_amx.c's order, and a
 * row gets the same bits here as there, alone or in any batch. ``q4_1_matches`` checks at
 * load that every rebuilt tile equals the packed bfloat16 one (else the layer keeps those).
 *
 * Packing: for each block of 16 outputs and each 32 inputs (one Q4_1 block of each output),
 * one "tile" of 320 bytes: 16 rows of 16 bytes of codes, then the 16 scales and the 16
 * minimums (float16). Row p of the B tile holds, for the 16 outputs j, the bfloat16 weights
 * of inputs 2p and 2p + 1 side by side (element 2j + s); byte i of code row p holds in its low
 * half the code of element i (outputs 0-7) and in its high half that of element 16 + i
 * (outputs 8-15). So a row of codes widens to 16 lanes whose low and high halves are the two
 * halves of the B row: two FMAs with the scales and minimums laid out to match, one
 * conversion of the 32 floats to bfloat16 in the tile's order.
 */
#include <stdint.h>
#include <string.h>

#define Q4_TILE 320 /* bytes of one packed tile: 256 of codes, 32 of scales, 32 of minimums */

/* Bytes of the packed codes of an (N, K) Q4_1 weight. */
int64_t q4_1_packed_bytes(int64_t N, int64_t K) { return (N + 15) / 16 * (K / 32) * Q4_TILE; }

/* GGUF Q4_1 blocks (N rows of K/32 blocks of 20 bytes: d, m as float16, then 16 bytes whose
 * low halves are codes 0-15 and high halves codes 16-31) -> the packing above; outputs past N
 * get d = m = 0 (weight 0, like linear.c's padding). Returns 1 when K is not a multiple of 32. */
int q4_1_pack(const uint8_t *raw, int64_t N, int64_t K, uint8_t *out) {
    if (K % 32 || N <= 0) return 1;
    const int64_t kt = K / 32, nb = (N + 15) / 16;
    memset(out, 0, (size_t)q4_1_packed_bytes(N, K));
    for (int64_t b = 0; b < nb; b++)
        for (int64_t t = 0; t < kt; t++) {
            uint8_t *o = out + (b * kt + t) * Q4_TILE;
            for (int j = 0; j < 16 && 16 * b + j < N; j++) {
                const uint8_t *blk = raw + ((16 * b + j) * kt + t) * 20;
                memcpy(o + 256 + 2 * j, blk, 2);
                memcpy(o + 288 + 2 * j, blk + 2, 2);
                for (int k = 0; k < 32; k++) {
                    int q = k < 16 ? blk[4 + k] & 15 : blk[4 + k - 16] >> 4;
                    int i = 2 * (j % 8) + k % 2;
                    o[16 * (k / 2) + i] |= (uint8_t)(j < 8 ? q : q << 4);
                }
            }
        }
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

/* One packed tile -> its 16 x 32 bfloat16 B tile (1 KB at buf). */
static inline void unpack_tile(const uint8_t *t, uint16_t *buf) {
    const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t + 256)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t + 288)));
    const __m512 dlo = _mm512_permutexvar_ps(lo_idx, d), dhi = _mm512_permutexvar_ps(hi_idx, d);
    const __m512 mlo = _mm512_permutexvar_ps(lo_idx, m), mhi = _mm512_permutexvar_ps(hi_idx, m);
    const __m512i low4 = _mm512_set1_epi32(15);
    for (int p = 0; p < 16; p++) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(t + 16 * p)));
        /* d * q is exact in float32 (11 by 4 bits): the FMA rounds once, as d * q + m does */
        __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low4)), dlo, mlo);
        __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), dhi, mhi);
        _mm512_store_si512(buf + 32 * p, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* How many tiles of ``q4`` differ from the same tiles of linear.c's packing ``w`` of the same
 * (N, K) weight: 0 when the codes give exactly the packed bfloat16 weights. */
int64_t q4_1_matches(const uint8_t *q4, const uint16_t *w, int64_t N, int64_t K) {
    const int64_t kt = K / 32, nb = (N + 15) / 16;
    uint16_t buf[512] __attribute__((aligned(64)));
    int64_t bad = 0;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t t = 0; t < kt; t++) {
            unpack_tile(q4 + (b * kt + t) * Q4_TILE, buf);
            bad += memcmp(buf, w + b * K * 16 + t * 512, sizeof buf) != 0;
        }
    return bad;
}

#else

int64_t q4_1_matches(const uint8_t *q4, const uint16_t *w, int64_t N, int64_t K) {
    (void)q4, (void)w;
    return (N + 15) / 16 * (K / 32); /* cannot rebuild them here: none matches */
}

#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "amx.h"

/* rows 0.. (r0 + r1) against output blocks b, b+1 (nb = 1 or 2), B tiles rebuilt from codes;
 * linear_amx.c's block() with its B tiles from memory */
static void block_q4(const uint16_t *x, int64_t K, const uint8_t *q4, const float *bias, uint16_t *y, int64_t N,
                     int64_t b, int nb, int r0, int r1) {
    uint16_t buf[2][2][512] __attribute__((aligned(64))); /* [k step parity][output block] */
    const int64_t xs = K * 2, kt = K / 32;
    const uint8_t *t0 = q4 + b * kt * Q4_TILE, *t1 = t0 + kt * Q4_TILE;
    const uint16_t *x1 = x + 16 * K;
    _tile_zero(0);
    if (nb > 1) _tile_zero(1);
    if (r1) {
        _tile_zero(2);
        if (nb > 1) _tile_zero(3);
    }
    for (int64_t t = 0; t < kt; t++) {
        uint16_t(*B)[512] = buf[t & 1];
        MEMORY_BARRIER(); /* the tile loads of two steps ago read this buffer first */
        unpack_tile(t0 + t * Q4_TILE, B[0]);
        if (nb > 1) unpack_tile(t1 + t * Q4_TILE, B[1]);
        MEMORY_BARRIER();
        _tile_loadd(4, x + 32 * t, xs);
        _tile_loadd(6, B[0], 64);
        if (r1) _tile_loadd(5, x1 + 32 * t, xs);
        _tile_dpbf16ps(0, 4, 6);
        if (r1) _tile_dpbf16ps(2, 5, 6);
        if (nb > 1) {
            _tile_loadd(7, B[1], 64);
            _tile_dpbf16ps(1, 4, 7);
            if (r1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    store_block(y, N, bias, b, nb, r0 + r1);
}

/* linear_bf16_amx's products for M <= 32 rows, the weights as q4_1_pack made them. Returns 0;
 * 1 for a shape it does not take; 2 without AMX (the caller made sure tiles are on). */
int linear_q4_1_amx(const uint16_t *x, const uint8_t *q4, const float *bias, uint16_t *y, int64_t M, int64_t N,
                    int64_t K, int nthreads) {
    if (K % 32 || M < 0 || M > 32 || N <= 0) return 1;
    if (M == 0) return 0;
    const int64_t nblocks = (N + 15) / 16, pairs = (nblocks + 1) / 2;
    const int r0 = M < 16 ? (int)M : 16, r1 = (int)M - r0;
#pragma omp parallel num_threads(nthreads)
    {
        configure(r0, r1);
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < pairs; p++)
            block_q4(x, K, q4, bias, y, N, 2 * p, 2 * p + 1 < nblocks ? 2 : 1, r0, r1);
        _tile_release();
    }
    return 0;
}

#else

int linear_q4_1_amx(const uint16_t *x, const uint8_t *q4, const float *bias, uint16_t *y, int64_t M, int64_t N,
                    int64_t K, int nthreads) {
    (void)x, (void)q4, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return 2;
}

#endif
