/* Paged decode attention, bfloat16, CPU: one new query token per request against the K/V
 * of its blocks, read in place from the cache (no gather into a padded copy).
 *
 * Layout (kv_cache.py): one layer's cache is (num_blocks, 2, nkv, bs, hd); token t of a
 * request is row t % bs of block tables[t / bs]. Queries come scaled, (B, nkv, g, hd), the
 * g query heads that share a KV head next to each other; the output has the same shape.
 *
 * Arithmetic: bf16 inputs widened to float32; scores, softmax and the weighted sum of V in
 * float32; one rounding, to bf16 (nearest even), at the end. Each (request, KV head) is
 * computed alone, in a fixed order, so a request's output never depends on its batch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* One (request, KV head): hd a multiple of 32, at most 8 query heads a group, hd <= 256. */
static void task_avx512(const uint16_t *qb, const uint16_t *kv, const int64_t *table, int64_t L, uint16_t *ob,
                        float *s, int64_t g, int64_t hd, int64_t bs, int64_t h, int64_t nkv, int64_t block_elems) {
    const int64_t nq = hd / 32; /* 32 bf16 pairs per dpbf16 */
    const int bs_shift = __builtin_ctzll((unsigned long long)bs); /* bs is a power of two */
    const int64_t bs_mask = bs - 1;
    __m512bh qv[8][8];
    float mx[8];
    for (int64_t i = 0; i < g; i++) {
        for (int64_t c = 0; c < nq; c++) qv[i][c] = (__m512bh)_mm512_loadu_si512(qb + i * hd + c * 32);
        mx[i] = -__builtin_inff();
    }
    for (int64_t t = 0; t < L; t++) {
        const uint16_t *k = kv + table[t >> bs_shift] * block_elems + (h * bs + (t & bs_mask)) * hd;
        __m512bh kc[8];
        for (int64_t c = 0; c < nq; c++) kc[c] = (__m512bh)_mm512_loadu_si512(k + c * 32);
        for (int64_t i = 0; i < g; i++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < nq; c++) acc = _mm512_dpbf16_ps(acc, qv[i][c], kc[c]);
            const float dot = _mm512_reduce_add_ps(acc);
            s[i * L + t] = dot;
            if (dot > mx[i]) mx[i] = dot;
        }
    }
    float sum[8];
    for (int64_t i = 0; i < g; i++) {
        float *si = s + i * L;
        const __m512 m = _mm512_set1_ps(mx[i]);
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
        sum[i] = _mm512_reduce_add_ps(tot);
    }
    const int64_t nv = hd / 16; /* 16 floats a register */
    __m512 acc[8][16];
    for (int64_t i = 0; i < g; i++)
        for (int64_t c = 0; c < nv; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t++) {
        const uint16_t *v = kv + table[t >> bs_shift] * block_elems + ((nkv + h) * bs + (t & bs_mask)) * hd;
        __m512 vf[16];
        for (int64_t c = 0; c < nv; c++)
            vf[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + c * 16))), 16));
        for (int64_t i = 0; i < g; i++) {
            const __m512 p = _mm512_set1_ps(s[i * L + t]);
            for (int64_t c = 0; c < nv; c++) acc[i][c] = _mm512_fmadd_ps(p, vf[c], acc[i][c]);
        }
    }
    for (int64_t i = 0; i < g; i++) {
        const __m512 inv = _mm512_set1_ps(1.0f / sum[i]);
        for (int64_t c = 0; c < nv; c++) {
            __m512 o = _mm512_mul_ps(acc[i][c], inv);
            _mm256_storeu_si256((__m256i *)(ob + i * hd + c * 16), (__m256i)_mm512_cvtneps_pbh(o));
        }
    }
}
#endif

#define MAX_G 16
#define MAX_HD 256

/* Returns 0, or -1 when a shape is beyond what this kernel was written for. */
int paged_decode_bf16(const uint16_t *q, const uint16_t *kv, const int64_t *tables, const int64_t *lens,
                      uint16_t *out, float *scratch, int64_t B, int64_t nkv, int64_t g, int64_t hd, int64_t bs,
                      int64_t width, int64_t max_len, int num_threads) {
    if (g > MAX_G || hd > MAX_HD || g < 1 || hd < 1 || bs < 1 || (bs & (bs - 1))) return -1;
    const int bs_shift = __builtin_ctzll((unsigned long long)bs);
    const int64_t block_elems = 2 * nkv * bs * hd; /* one block of one layer, K and V */
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < nkv; h++) {
            const int64_t L = lens[b];
            float *s = scratch + (b * nkv + h) * g * max_len; /* (g, L) scores, then weights */
#ifdef HAVE_AVX512_BF16
            if (hd % 32 == 0 && g <= 8) {
                task_avx512(q + (b * nkv + h) * g * hd, kv, tables + b * width, L, out + (b * nkv + h) * g * hd, s, g,
                            hd, bs, h, nkv, block_elems);
                continue;
            }
#endif
            float qf[MAX_G][MAX_HD], acc[MAX_G][MAX_HD], kf[MAX_HD];
            float mx[MAX_G], sum[MAX_G];
            const uint16_t *qb = q + (b * nkv + h) * g * hd;
            for (int64_t i = 0; i < g; i++) {
                for (int64_t d = 0; d < hd; d++) qf[i][d] = bf16_to_f32(qb[i * hd + d]);
                mx[i] = -__builtin_inff();
            }
            for (int64_t t = 0; t < L; t++) {
                const uint16_t *k = kv + tables[b * width + (t >> bs_shift)] * block_elems + (h * bs + (t & (bs - 1))) * hd;
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
                const uint16_t *v = kv + tables[b * width + (t >> bs_shift)] * block_elems + ((nkv + h) * bs + (t & (bs - 1))) * hd;
                for (int64_t d = 0; d < hd; d++) kf[d] = bf16_to_f32(v[d]);
                for (int64_t i = 0; i < g; i++) {
                    const float p = s[i * L + t];
                    for (int64_t d = 0; d < hd; d++) acc[i][d] += p * kf[d];
                }
            }
            uint16_t *ob = out + (b * nkv + h) * g * hd;
            for (int64_t i = 0; i < g; i++) {
                const float inv = 1.0f / sum[i];
                for (int64_t d = 0; d < hd; d++) ob[i * hd + d] = f32_to_bf16(acc[i][d] * inv);
            }
        }
    }
    return 0;
}
