/* The element-wise parts of a decoder layer in bfloat16, one call each instead of 5-10 torch
 * ops (each ~5 us on a CPU, ~35 a layer: ~5 ms of a 25 ms decode step of the default model).
 *
 * Roundings follow torch's bf16 ops (compute in float32, round to bf16 where torch stores a
 * tensor), and every row is computed alone in a fixed order: the same bits in any batch.
 * Calls of fewer than PARALLEL_FROM values (bf16.h) run on one thread.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* AVX-512: rows in stretches of 16 lanes, each lane doing to one value what the scalar code
 * does, in the same order, so the bits are the scalar code's (a NaN's payload aside). GCC
 * vectorizes the scalar code only 8 lanes wide, and RoPE's two halves not at all. For 1024
 * rows of the default model on 2 threads, RMSNorm with its add went from 220-234 to 155-159
 * us and RoPE with the cache store from 354-367 to 230-237 us; a prompt step of the engine
 * benchmark took ~5% less. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define ELEMENTWISE_AVX512 1

/* f32_to_bf16 of 16 lanes (nearest even, NaN kept a NaN; subnormals kept, unlike vcvtneps2bf16) */
static inline __m256i bf16x16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

/* round_bf16 of 16 lanes */
static inline __m512 round16(__m512 f) { return widen16_bits(bf16x16(f)); }

/* rmsnorm_bf16's row, D a multiple of 16 */
static inline void rmsnorm_row16(const uint16_t *row, const uint16_t *add, uint16_t *sum, const uint16_t *w, uint16_t *o,
                                 int64_t D, float eps) {
    if (add) {
        for (int64_t d = 0; d < D; d += 16)
            _mm256_storeu_si256((__m256i *)(sum + d), bf16x16(_mm512_add_ps(widen16(row + d), widen16(add + d))));
        row = sum;
    }
    __m512 part = _mm512_setzero_ps(); /* sum_squares' 16 partial sums (v * v is exact: FMA or not) */
    for (int64_t d = 0; d < D; d += 16) {
        const __m512 v = widen16(row + d);
        part = _mm512_fmadd_ps(v, v, part);
    }
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(sum16(part) / (float)D + eps));
    for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256((__m256i *)(o + d), bf16x16(_mm512_mul_ps(widen16(w + d), round16(_mm512_mul_ps(widen16(row + d), r)))));
}

/* rotate_head's values i.. i+15 and half + i.. (as bf16 bits, in *lo and *hi) */
static inline void rotate16(const uint16_t *src, const uint16_t *c, const uint16_t *s, int64_t half, int64_t i,
                            __m256i *lo, __m256i *hi) {
    const __m512 a = widen16(src + i), b = widen16(src + half + i);
    *lo = bf16x16(_mm512_add_ps(round16(_mm512_mul_ps(a, widen16(c + i))), round16(_mm512_mul_ps(b, widen16(s + i)))));
    *hi = bf16x16(_mm512_add_ps(round16(_mm512_mul_ps(b, widen16(c + half + i))), round16(_mm512_mul_ps(a, widen16(s + half + i)))));
}
#endif

/* sum of squares, 16 float32 lanes then a fixed tree */
static inline float sum_squares(const uint16_t *x, int64_t n) {
    float part[16] = {0};
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
        for (int j = 0; j < 16; j++) {
            const float v = bf16_to_f32(x[d + j]);
            part[j] += v * v;
        }
    for (int j = 0; d + j < n; j++) {
        const float v = bf16_to_f32(x[d + j]);
        part[j] += v * v;
    }
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) part[j] += part[j + w];
    return part[0];
}

/* out = w * bf16(x * rsqrt(mean(x^2) + eps)) per row of D (transformers' LlamaRMSNorm).
 * With ``add``: x is first replaced by bf16(x + add), written to ``sum`` (the residual). */
void rmsnorm_bf16(const uint16_t *x, const uint16_t *add, uint16_t *sum, const uint16_t *w, uint16_t *out, int64_t T,
                  int64_t D, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (T * D >= PARALLEL_FROM) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *row = x + t * D;
#ifdef ELEMENTWISE_AVX512
        if (D % 16 == 0) {
            rmsnorm_row16(row, add ? add + t * D : 0, add ? sum + t * D : 0, w, out + t * D, D, eps);
            continue;
        }
#endif
        if (add) {
            uint16_t *s = sum + t * D;
            const uint16_t *a = add + t * D;
            for (int64_t d = 0; d < D; d++) s[d] = f32_to_bf16(bf16_to_f32(row[d]) + bf16_to_f32(a[d]));
            row = s;
        }
        const float r = 1.0f / sqrtf(sum_squares(row, D) / (float)D + eps);
        uint16_t *o = out + t * D;
        for (int64_t d = 0; d < D; d++) o[d] = f32_to_bf16(bf16_to_f32(w[d]) * round_bf16(bf16_to_f32(row[d]) * r));
    }
}

/* bf16(bf16(silu(x)) * u) of one value */
static inline uint16_t silu_mul1(uint16_t g, uint16_t u) {
    const float x = bf16_to_f32(g);
    /* exp(-|x|): no overflow either side; 0 where float32's exp underflows, as torch's */
    const float e = fabsf(x) > 87.0f ? 0.0f : exp_nonpos(-fabsf(x));
    const float silu = x >= 0.0f ? x / (1.0f + e) : x * e / (1.0f + e);
    return f32_to_bf16(round_bf16(silu) * bf16_to_f32(u));
}

#ifdef ELEMENTWISE_AVX512
/* exp_nonpos (bf16.h) on 16 lanes, the same operations in the same order. Not paged_attention.c's
 * exp_nonpos16: that one rounds x * log2(e) to float32 before taking the nearest integer and
 * adds r + 1 before the last FMA, so its last bit may differ from exp_nonpos's (attention
 * keeps its own bits; here the lanes must give the element-wise path's). */
static inline __m512 exp_nonpos_x16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic), magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = exp_poly16(r);
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* bf16(silu(x)) of 16 values: silu_mul1's first rounding, the same operations in lanes */
static inline __m256i silu16(__m512 x) {
    const __m512 ax = _mm512_abs_ps(x);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(87.0f), _CMP_LE_OQ) |
                                             _mm512_cmp_ps_mask(ax, ax, _CMP_UNORD_Q),
                                         exp_nonpos_x16(_mm512_sub_ps(_mm512_setzero_ps(), ax)));
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NGE_UQ); /* not x >= 0 */
    const __m512 num = _mm512_mask_mul_ps(x, neg, x, e);
    return bf16x16(_mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}

/* bf16(silu(g)) for every bf16 gate g, by silu16 when the library loads (~40 us; one spare
 * entry, as a 4-byte gather of the last one reads two). A gate is one of 65536 values, so the
 * lanes look up its rounded SiLU instead of computing it: ~55 vector operations per 16 values
 * were the bound, and the gates a layer sees hit a few KB of the table (silu_mul of 1024 rows
 * of the default model, 2 threads: 0.51-0.52 -> 0.30 ms; 16 rows 11.2 -> 7.7 us). */
static uint16_t silu_table[65536 + 1];

__attribute__((constructor)) static void fill_silu_table(void) {
    for (int32_t g = 0; g < 65536; g += 16) {
        const __m512i bits = _mm512_add_epi32(_mm512_set1_epi32(g), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        _mm256_storeu_si256((__m256i *)(silu_table + g), silu16(_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16))));
    }
}

/* silu_mul1 of 16 values, the first rounding looked up */
static inline void silu_mul16(const uint16_t *g, const uint16_t *u, uint16_t *o) {
    const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)g));
    const __m512i sr = _mm512_slli_epi32(_mm512_i32gather_epi32(idx, (const void *)silu_table, 2), 16);
    _mm256_storeu_si256((__m256i *)o, bf16x16(_mm512_mul_ps(_mm512_castsi512_ps(sr), widen16(u))));
}
#endif

/* out (T, I) = bf16(bf16(silu(gate)) * up), gate|up side by side in gu (T, 2I); the AVX-512
 * lanes give what silu_mul1 does, 16 at a time: the same bits for all 65536 bf16 gates
 * (checked against it), where GCC vectorized silu_mul1 only 8 lanes wide (the gate|up of 1024
 * rows of the default model, 2 threads: 0.88 -> 0.53 ms; the table above then took it lower) */
void silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t T, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (T * I >= PARALLEL_FROM) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *g = gu + t * 2 * I, *u = g + I;
        uint16_t *o = out + t * I;
        int64_t i = 0;
#ifdef ELEMENTWISE_AVX512
        for (; i + 16 <= I; i += 16) silu_mul16(g + i, u + i, o + i);
#endif
        for (; i < I; i++) o[i] = silu_mul1(g[i], u[i]);
    }
}

/* One head of hd rotated from src into dst (may be src): x*cos + (x2, x1)*sin, each product
 * and the sum rounded to bf16, as torch computes it. cos and sin: the token's hd values. */
static inline void rotate_head(const uint16_t *src, uint16_t *dst, const uint16_t *c, const uint16_t *s, int64_t hd) {
    const int64_t half = hd / 2;
#ifdef ELEMENTWISE_AVX512
    if (half % 16 == 0) {
        for (int64_t i = 0; i < half; i += 16) { /* both halves read before either is written */
            __m256i lo, hi;
            rotate16(src, c, s, half, i, &lo, &hi);
            _mm256_storeu_si256((__m256i *)(dst + i), lo);
            _mm256_storeu_si256((__m256i *)(dst + half + i), hi);
        }
        return;
    }
#endif
    float a[512];
    for (int64_t i = 0; i < hd; i++) a[i] = bf16_to_f32(src[i]);
    for (int64_t i = 0; i < half; i++)
        dst[i] = f32_to_bf16(round_bf16(a[i] * bf16_to_f32(c[i])) + round_bf16(a[i + half] * bf16_to_f32(s[i])));
    for (int64_t i = half; i < hd; i++)
        dst[i] = f32_to_bf16(round_bf16(a[i] * bf16_to_f32(c[i])) + round_bf16(a[i - half] * bf16_to_f32(s[i])));
}

/* RoPE in place on H heads of hd per token; row t starts at x + t * stride. cos and sin
 * (T, hd) bf16, sin's first half negated (models/llama.py, Rotary). hd <= 512. */
void rope_bf16(uint16_t *x, int64_t stride, const uint16_t *cos, const uint16_t *sin, int64_t T, int64_t H,
               int64_t hd, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (T * H * hd >= PARALLEL_FROM) schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) rotate_head(x + t * stride + h * hd, x + t * stride + h * hd, cos + t * hd, sin + t * hd, hd);
}

/* A step's fused q|k|v rows (row t at qkv + t * stride: nh q heads, nkv k heads, nkv v heads)
 * into what attention reads: q rotated, then times ``scale`` (rounded to bf16 after each, as
 * torch's rope and ``q * scale`` round), into q_out (T, nh * hd); k rotated and v as it is
 * into the paged cache, head j of K|V of token t at row rows[t * 2 * nkv + j] (rows of hd
 * values, as attention.py's ``write_kv`` stores them). qkv is left as it was. hd <= 512. */
void rope_store_bf16(const uint16_t *qkv, int64_t stride, const uint16_t *cos, const uint16_t *sin, int64_t T,
                     int64_t nh, int64_t nkv, int64_t hd, float scale, uint16_t *q_out, uint16_t *cache,
                     const int64_t *rows, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (T * (nh + 2 * nkv) * hd >= PARALLEL_FROM) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *row = qkv + t * stride, *c = cos + t * hd, *s = sin + t * hd;
        uint16_t *q = q_out + t * nh * hd;
        for (int64_t h = 0; h < nh * hd; h += hd) {
#ifdef ELEMENTWISE_AVX512
            if (hd % 32 == 0) {
                const __m512 sc = _mm512_set1_ps(scale);
                for (int64_t i = 0; i < hd / 2; i += 16) {
                    __m256i lo, hi;
                    rotate16(row + h, c, s, hd / 2, i, &lo, &hi);
                    _mm256_storeu_si256((__m256i *)(q + h + i), bf16x16(_mm512_mul_ps(widen16_bits(lo), sc)));
                    _mm256_storeu_si256((__m256i *)(q + h + hd / 2 + i), bf16x16(_mm512_mul_ps(widen16_bits(hi), sc)));
                }
                continue;
            }
#endif
            rotate_head(row + h, q + h, c, s, hd);
            for (int64_t i = h; i < h + hd; i++) q[i] = f32_to_bf16(bf16_to_f32(q[i]) * scale);
        }
        const int64_t *r = rows + t * 2 * nkv;
        for (int64_t j = 0; j < nkv; j++) {
            rotate_head(row + (nh + j) * hd, cache + r[j] * hd, c, s, hd);
            const uint16_t *v = row + (nh + nkv + j) * hd;
            uint16_t *dst = cache + r[nkv + j] * hd;
            for (int64_t i = 0; i < hd; i++) dst[i] = v[i];
        }
    }
}
