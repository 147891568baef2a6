/* What linear_amx.c and linear_codes.c share: the tile configuration of a block of up to 32
 * rows x 32 outputs, its products and its store. Include only where __AMX_TILE__, __AMX_BF16__ and
 * __AVX512BF16__ are defined. */
#ifndef KVBRIDGE_AMX_H
#define KVBRIDGE_AMX_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* GCC's tile load and store intrinsics are asm statements that do not tell the compiler they
 * read or write memory: a buffer tile-stored and then read in C (or written in C and then
 * tile-loaded) needs this between the two, else the C side may be moved or dropped (a buffer
 * written in C only for tile loads was, in a trial). */
#define MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* tmm0..3: C (row tile i, output block j) at 2*i + j; tmm4, tmm5: A of row tiles 0, 1; tmm6, tmm7: B */
static inline void configure(int r0, int r1) {
    struct tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
    for (int t = 0; t < 8; t++) {
        c.rows[t] = (uint8_t)rows[t];
        c.colsb[t] = rows[t] ? 64 : 0;
    }
    _tile_loadconfig(&c);
}

/* Zero the C tiles of a block: output blocks nb (1 or 2), a second row tile when r1 */
static inline void zero_block(int nb, int r1) {
    _tile_zero(0);
    if (nb > 1) _tile_zero(1);
    if (r1) {
        _tile_zero(2);
        if (nb > 1) _tile_zero(3);
    }
}

/* One 32-input step of a block: x's rows (xs bytes apart; x1 the second row tile's) against
 * the B tiles at b0 and b1 (64-byte rows), added into the C tiles */
static inline void block_step(const uint16_t *x, const uint16_t *x1, int64_t xs, const uint16_t *b0,
                              const uint16_t *b1, int nb, int r1) {
    _tile_loadd(4, x, xs);
    _tile_loadd(6, b0, 64);
    if (r1) _tile_loadd(5, x1, xs);
    _tile_dpbf16ps(0, 4, 6);
    if (r1) _tile_dpbf16ps(2, 5, 6);
    if (nb > 1) {
        _tile_loadd(7, b1, 64);
        _tile_dpbf16ps(1, 4, 7);
        if (r1) _tile_dpbf16ps(3, 5, 7);
    }
}

/* A block's C tiles, stored to memory and rounded into y one block later. Rounded right after
 * the tile stores, the core waited for the block's last products before it could start on them,
 * with the tiles idle meanwhile; one block later, the rounding runs while the next block's
 * products are under way. A thread sets y = NULL before its loop and calls finish_block after
 * it, for the last one. */
struct pending_block {
    float c[32][32];
    uint16_t *y;
    const float *bias;
    int64_t N, b;
    int nb, rows;
};

/* The pending block's sums (rows 0..rows of output blocks b.. (nb)) plus the bias, rounded to bf16, into y */
static inline void finish_block(struct pending_block *p) {
    if (!p->y) return;
    MEMORY_BARRIER(); /* the tile stores of stash_block wrote c */
    float(*c)[32] = p->c;
    uint16_t *y = p->y;
    const float *bias = p->bias;
    const int64_t N = p->N, b = p->b;
    const int nb = p->nb, rows = p->rows;
    if (nb == 2 && N - 16 * b >= 32) { /* a row's 32 outputs: one conversion, one store */
        int64_t n = 16 * b;
        __m512 b0 = bias ? _mm512_loadu_ps(bias + n) : _mm512_setzero_ps();
        __m512 b1 = bias ? _mm512_loadu_ps(bias + n + 16) : _mm512_setzero_ps();
        for (int m = 0; m < rows; m++) {
            __m512 lo = _mm512_loadu_ps(&c[m][0]), hi = _mm512_loadu_ps(&c[m][16]);
            if (bias) lo = _mm512_add_ps(lo, b0), hi = _mm512_add_ps(hi, b1);
            _mm512_storeu_si512(y + m * N + n, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    } else {
        for (int j = 0; j < nb; j++) {
            int64_t n = 16 * (b + j);
            __m512 bv = bias ? _mm512_loadu_ps(bias + n) : _mm512_setzero_ps();
            __mmask16 mask = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
            for (int m = 0; m < rows; m++) {
                __m512 acc = _mm512_loadu_ps(&c[m][16 * j]);
                __m256i out = (__m256i)_mm512_cvtneps_pbh(bias ? _mm512_add_ps(acc, bv) : acc);
                _mm256_mask_storeu_epi16(y + m * N + n, mask, out);
            }
        }
    }
    MEMORY_BARRIER(); /* c is read before the next tile stores overwrite it */
    p->y = NULL;
}

/* After a block's products are issued: round the pending block, then store this block's C tiles
 * (rows 0..rows of output blocks b.. (nb), for y) in its place */
static inline void stash_block(struct pending_block *p, uint16_t *y, int64_t N, const float *bias, int64_t b,
                               int nb, int rows) {
    finish_block(p);
    _tile_stored(0, &p->c[0][0], 128);
    if (nb > 1) _tile_stored(1, &p->c[0][16], 128);
    if (rows > 16) {
        _tile_stored(2, &p->c[16][0], 128);
        if (nb > 1) _tile_stored(3, &p->c[16][16], 128);
    }
    p->y = y, p->bias = bias, p->N = N, p->b = b, p->nb = nb, p->rows = rows;
}

#endif
