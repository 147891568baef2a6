/* linear_bf16 on CPUs with AMX (Intel Sapphire Rapids and later): the same products with
 * AMX tiles, used for every row count of a layer once the process turned them on.
 *
 * The weights are the ones linear.c packs, (ceil(N/16), K/2, 16, 2) bf16: 16 consecutive input
 * pairs of a block of 16 outputs are 16 rows of 64 bytes, one AMX B tile as they lie. A tile of
 * 16 rows x 32 inputs of x is an A tile; C tiles hold 16 x 16 float32 sums.
 *
 * Arithmetic: each output is one C-tile element that takes the K/32 tile products in order
 * (TDPBF16PS: exact bf16 products, float32 sums, denormals flushed), then the float32 bias,
 * then one rounding to bf16 (nearest even). A row's sums never depend on the other rows of its
 * tile, on the tile's row count or on the thread, so a row gives the same bits alone as in
 * any batch. They are not the bits of linear.c's AVX512-BF16 tiles (another order inside each
 * 32-input step), so a process uses one or the other for all its products of a layer.
 *
 * Why: on a 2-core Sapphire Rapids-class VM, vdpbf16ps runs at ~0.6 per cycle (~105 GFLOP/s a
 * core), a tenth of what the tiles give; oneDNN's AMX products are fast but give a row other
 * bits in a batch of 33 or more rows than alone.
 *
 * Blocks: 32 rows (two A tiles) x 32 outputs (two B tiles), four C tiles; fewer rows or one
 * output block where the matrix ends. K must be a multiple of 32 (else linear.c's tiles run).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#include "amx.h"

/* rows m0.. (r0 + r1 of them, r1 > 0 only when r0 == 16) against output blocks b, b+1 (nb = 1 or 2);
 * the sums wait in pend until the next block's products are issued */
static void block(const uint16_t *x, int64_t K, const uint16_t *w, const float *bias, uint16_t *y, int64_t N,
                  int64_t b, int nb, int r0, int r1, struct pending_block *pend) {
    const int64_t xs = K * 2, wstride = K * 16; /* bytes between rows of x; bf16 values between blocks */
    const uint16_t *w0 = w + b * wstride, *w1 = w0 + wstride, *x1 = x + 16 * K;
    zero_block(nb, r1);
    for (int64_t k = 0; k < K; k += 32) block_step(x + k, x1 + k, xs, w0 + k * 16, w1 + k * 16, nb, r1);
    stash_block(pend, y, N, bias, b, nb, r0 + r1);
}

int linear_amx_enable(void) {
    unsigned long bits = 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) return 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bits) || !(bits & (1ul << XFEATURE_XTILEDATA))) return 0;
    return 1;
}

int linear_bf16_amx(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M, int64_t N,
                    int64_t K, int nthreads) {
    if (K % 32 || M < 0 || N <= 0) return 1;
    if (M == 0) return 0;
    const int64_t nblocks = (N + 15) / 16, pairs = (nblocks + 1) / 2, tiles = (M + 31) / 32;
    /* A prompt's work item: 32 rows against a chunk of CH pairs of output blocks, whose weights
     * (CH * 64 * K bytes) stay in L2 while the row tiles take turns. ~768 KB (CH = 21 for K = 576,
     * 8 for K = 1536) where it was 4 pairs (128 outputs), each chunk read from memory or L3 for
     * fewer rows: with amx.h's rounding a block later, the default model's products of 1024 rows
     * went from 94 to 83 ms on 2 threads. */
    const int64_t fit = (768 << 10) / (64 * K), CH = fit > 1 ? fit : 1;
    const int64_t chunks = (pairs + CH - 1) / CH;
    const int64_t items = M <= 32 ? pairs : chunks * tiles;
#pragma omp parallel num_threads(nthreads)
    {
        int cr0 = -1, cr1 = -1;
        struct pending_block pend __attribute__((aligned(64)));
        pend.y = NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            int64_t p0 = M <= 32 ? i : (i / tiles) * CH, np = M <= 32 ? 1 : (pairs - p0 < CH ? pairs - p0 : CH);
            int64_t m0 = M <= 32 ? 0 : (i % tiles) * 32, rows = M - m0 < 32 ? M - m0 : 32;
            int r0 = rows < 16 ? (int)rows : 16, r1 = (int)rows - r0;
            if (r0 != cr0 || r1 != cr1) configure(cr0 = r0, cr1 = r1);
            for (int64_t p = p0; p < p0 + np; p++) {
                int nb = 2 * p + 1 < nblocks ? 2 : 1;
                block(x + m0 * K, K, w, bias, y + m0 * N, N, 2 * p, nb, r0, r1, &pend);
            }
        }
        finish_block(&pend);
        if (cr0 >= 0) _tile_release();
    }
    return 0;
}

#else /* no AMX: linear.c's tiles run */

int linear_amx_enable(void) { return 0; }

int linear_bf16_amx(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M, int64_t N,
                    int64_t K, int nthreads) {
    (void)x, (void)w, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return 2;
}

#endif
