/* bfloat16 <-> float32 and exp for the native kernels (scalar, vectorizable by the compiler). */
#ifndef KVBRIDGE_BF16_H
#define KVBRIDGE_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 (scores minus their max), vectorizable: 2^n * p(r), Cephes' expf
 * polynomial, within 2 ulp of expf over the range softmax uses; below -87 it is 0. */
static inline float exp_nonpos(float x) {
    if (x < -87.0f) x = -87.0f;
    /* round to nearest even by adding and removing 1.5 * 2^23 (|x * log2 e| < 2^22): vectorizes, unlike roundevenf */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* float32 rounded to bfloat16 and back: what a bf16 tensor op stores */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* Element-wise calls (elementwise.c) of fewer values run on one thread. A decode step of 16
 * rows of the default model is above it (16 x 576 = 9216 values): its OpenMP threads spin
 * between the products anyway, and splitting the element-wise work between the two cores of a
 * 2-core VM took a median 16-row decode step from 19.1-19.7 to 18.6-19.2 ms (2^15 before:
 * every decode row count ran them on one thread). */
#define PARALLEL_FROM (1 << 12)

#ifdef __AVX512F__
#include <immintrin.h>

/* 16 bf16 values (their bits) widened to float32 (exact) */
static inline __m512 widen16_bits(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

/* 16 bf16 values at x widened to float32 */
static inline __m512 widen16(const uint16_t *x) { return widen16_bits(_mm256_loadu_si256((const __m256i *)x)); }

/* The sum of 16 lanes in a fixed tree (lanes i and i+8, then i+4, i+2, i+1): the order of
 * the scalar kernels' 16 partial sums, and the one paged_attention.c's prompt path, which keeps
 * each lane of 16 keys in its own register, repeats; _mm512_reduce_add_ps may use another. */
#ifdef __AVX512DQ__
static inline float sum16(__m512 a) {
    __m256 w = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1));
    __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x)); /* lanes 0+2, 1+3 */
    return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
}
#endif

/* exp_nonpos's polynomial in r on 16 lanes, up to its last step (which the callers take in
 * their own order): Cephes' coefficients, one FMA each */
static inline __m512 exp_poly16(__m512 r) {
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    return _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
}
#endif

#endif
