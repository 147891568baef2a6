/* Linear layers in bfloat16 on CPU: y = x W^T (+ b), for any number of rows.
 *
 * Weights are packed once (see native/__init__.py, pack_linear_weight): (ceil(N/16), K/2, 16, 2)
 * bf16, the 16 outputs of a block side by side for each pair of inputs, so that one 64-byte
 * load feeds 16 outputs of a row through one vdpbf16ps; the last block is padded with zeros.
 *
 * Arithmetic: each output has one float32 accumulator that takes the K/2 input pairs in
 * order (vdpbf16ps: two exact bf16 products added in turn, nearest even), then the float32
 * bias, then one rounding to bf16 (nearest even). Nothing depends on the number of rows, the
 * tile or the thread: a row gives the same bits alone as in any batch, at 1 row as at 2000.
 *
 * Tiles of rows x 16-output blocks keep their accumulators in registers: 4x4 for up to 4 rows,
 * 8x4 for up to 16 (a decode step: the weights stream once, each load used by up to 8 rows;
 * rows 9-16 take a second 8-row tile over the same blocks while they are in cache), 6x4 for
 * more (a prompt: blocks of 8 x 16 outputs whose weights stay in L2 while all rows pass).
 * 6x4 against the 12x2 before it (24 accumulators each; 10 loads per 24 vdpbf16ps instead
 * of 14), one thread, full tiles, the default model's shapes: 201-206 -> 215-223 GFLOP/s,
 * where vdpbf16ps alone gives 234 on that core.
 * Threads split output blocks (up to 16 rows) or (block group, row tile) pairs (more rows).
 * 8x4 against 8x2 and 12x2, the default model's products streamed from memory on a 2-core
 * Zen 4 VM: 8 rows 11.9 -> 11.2 ms, 12 rows 14.6 -> 12.4 ms, 16 rows 17.9 -> 16.0 ms.
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

/* One tile's products; ROWS is the tile's row count, ``rows`` or the constant MR (a full tile) */
#define TILE_FN(FN, MR, NB, ROWS)                                                                      \
    static void FN(const uint16_t *x, int64_t K, const uint16_t *w, int64_t wstride, const float *bias,  \
                   uint16_t *y, int64_t N, int64_t n0, int64_t rows) {                                 \
        (void)rows;                                                                                    \
        __m512 acc[MR][NB];                                                                            \
        for (int m = 0; m < MR; m++)                                                                   \
            for (int b = 0; b < NB; b++) acc[m][b] = _mm512_setzero_ps();                              \
        for (int64_t p = 0; p < K / 2; p++) {                                                          \
            __m512bh wv[NB];                                                                           \
            for (int b = 0; b < NB; b++) wv[b] = (__m512bh)_mm512_loadu_si512(w + b * wstride + p * 32); \
            for (int m = 0; m < MR; m++) {                                                             \
                if (m >= (ROWS)) break;                                                                \
                __m512bh xv = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + m * K + 2 * p));      \
                for (int b = 0; b < NB; b++) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xv, wv[b]);       \
            }                                                                                          \
        }                                                                                              \
        for (int b = 0; b < NB; b++) {                                                                 \
            int64_t n = n0 + 16 * b;                                                                   \
            __m512 bv = bias ? _mm512_loadu_ps(bias + n) : _mm512_setzero_ps();                        \
            __mmask16 mask = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);      \
            for (int m = 0; m < MR && m < (ROWS); m++) {                                               \
                __m256i out = (__m256i)_mm512_cvtneps_pbh(bias ? _mm512_add_ps(acc[m][b], bv) : acc[m][b]); \
                _mm256_mask_storeu_epi16(y + m * N + n, mask, out);                                    \
            }                                                                                          \
        }                                                                                              \
    }

/* A full tile (every tile of a prompt but its last) runs a copy compiled with its row count
 * known: with ``rows`` in the loop, GCC kept tests, flags and accumulator spills in it; without,
 * the loop is the loads, the broadcasts and the vdpbf16ps alone. Same sums in the same order,
 * so the same bits. The default model's products, one thread, 732 rows: 771 -> 712 ms; 186 rows
 * 193 -> 179 ms (the library and its copy alternated in one process). */
#define TILE(MR, NB)                                                                                   \
    TILE_FN(tile_full_##MR##x##NB, MR, NB, MR)                                                         \
    TILE_FN(tile_part_##MR##x##NB, MR, NB, rows)                                                       \
    static void tile_##MR##x##NB(const uint16_t *x, int64_t K, const uint16_t *w, int64_t wstride,     \
                                 const float *bias, uint16_t *y, int64_t N, int64_t n0, int64_t rows) { \
        (rows == MR ? tile_full_##MR##x##NB : tile_part_##MR##x##NB)(x, K, w, wstride, bias, y, N, n0, rows); \
    }

TILE(4, 4)
TILE(4, 1)
TILE(8, 4)
TILE(8, 1)
TILE(6, 4)
TILE(6, 1)

/* rows m0.. (at most MR) against output blocks b0..b0+nb-1, in tiles of NB blocks then one */
#define SPAN(MR, NB)                                                                                   \
    static void span_##MR(const uint16_t *x, int64_t K, const uint16_t *w, const float *bias,          \
                          uint16_t *y, int64_t N, int64_t b0, int64_t nb, int64_t rows) {              \
        const int64_t wstride = K * 16;                                                                \
        int64_t b = b0;                                                                                \
        for (; b + NB <= b0 + nb; b += NB) tile_##MR##x##NB(x, K, w + b * wstride, wstride, bias, y, N, 16 * b, rows); \
        for (; b < b0 + nb; b++) tile_##MR##x1(x, K, w + b * wstride, wstride, bias, y, N, 16 * b, rows); \
    }

SPAN(4, 4)
SPAN(8, 4)
SPAN(6, 4)

int linear_amx_enable(void);
int linear_bf16_amx(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M, int64_t N,
                    int64_t K, int nthreads);

int linear_codes_amx(int kind, const uint16_t *x, const uint8_t *codes, const float *bias, uint16_t *y, int64_t M,
                     int64_t N, int64_t K, int nthreads);
#define CODED_MAX_ROWS 32
int linear_bf16(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M, int64_t N,
                int64_t K, int nthreads);

static int amx_on; /* linear_amx.c's tiles run every layer whose K is a multiple of 32 */

/* 1: AVX512-BF16 tiles; 2: AMX tiles (after linear_bf16_use_amx) */
int linear_bf16_available(void) { return amx_on ? 2 : 1; }

/* Turn the AMX tiles on (asks the kernel for them) or off; returns whether they are on. Set
 * once, before any product: the two kinds of tiles give different bits. */
int linear_bf16_use_amx(int on) { return amx_on = on && linear_amx_enable(); }

/* linear_bf16 where the weight also has GGUF codes (linear_codes.c; NULL: none) of ``kind``:
 * up to CODED_MAX_ROWS rows run on them where AMX tiles are on (same bits, fewer bytes). */
int linear_bf16_coded(const uint16_t *x, const uint16_t *w, const uint8_t *codes, int kind, const float *bias,
                      uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (codes && amx_on && K % 32 == 0 && M > 0 && M <= CODED_MAX_ROWS && N > 0)
        return linear_codes_amx(kind, x, codes, bias, y, M, N, K, nthreads);
    return linear_bf16(x, w, bias, y, M, N, K, nthreads);
}

int linear_bf16(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M, int64_t N,
                int64_t K, int nthreads) {
    if (K % 2 || M < 0 || N <= 0) return 1;
    if (amx_on && K % 32 == 0) return linear_bf16_amx(x, w, bias, y, M, N, K, nthreads);
    const int64_t nblocks = (N + 15) / 16;
    if (M <= 16) {
        const int64_t NB = 4, groups = (nblocks + NB - 1) / NB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            int64_t b0 = g * NB, nb = nblocks - b0 < NB ? nblocks - b0 : NB;
            if (M <= 4) {
                span_4(x, K, w, bias, y, N, b0, nb, M);
            } else {
                span_8(x, K, w, bias, y, N, b0, nb, M < 8 ? M : 8);
                if (M > 8) span_8(x + 8 * K, K, w, bias, y + 8 * N, N, b0, nb, M - 8);
            }
        }
        return 0;
    }
    const int64_t CH = 8, MR = 6;
    const int64_t chunks = (nblocks + CH - 1) / CH, tiles = (M + MR - 1) / MR;
    /* dynamic: a prefill worker shares its cores with a decode worker on a small machine, and a
     * thread whose core is taken should not hold back the rest (each tile's sums stay the same) */
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t b0 = c * CH, nb = nblocks - b0 < CH ? nblocks - b0 : CH;
            int64_t m0 = t * MR, rows = M - m0 < MR ? M - m0 : MR;
            span_6(x + m0 * K, K, w, bias, y + m0 * N, N, b0, nb, rows);
        }
    return 0;
}

#else /* no AVX512-BF16: the engine keeps oneDNN's or torch's products */

int linear_bf16_available(void) { return 0; }

int linear_bf16_use_amx(int on) { return (void)on, 0; }

int linear_bf16(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M, int64_t N,
                int64_t K, int nthreads) {
    (void)x, (void)w, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return 2;
}

int linear_bf16_coded(const uint16_t *x, const uint16_t *w, const uint8_t *codes, int kind, const float *bias,
                      uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    (void)codes, (void)kind;
    return linear_bf16(x, w, bias, y, M, N, K, nthreads);
}

#endif
