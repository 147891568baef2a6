/* A whole decoder layer of a Llama-family model in one call (bfloat16, CPU).
 *
 * models/llama.py runs a layer as ~16 Python-level calls (modules, ctypes, torch's allocator
 * and an add): ~100 us a layer, ~3 ms of a decode step of the default model's 30 layers,
 * whose kernels take ~12-15 ms. Here the same kernels run in the same order on the same
 * inputs, so every output has the same bits:
 *
 *   n = RMSNorm(x)                         rmsnorm_bf16
 *   q = RoPE(q) * scale; K, V -> cache     linear_bf16 (q|k|v), rope_store_bf16
 *   o = Attention(q, cache)                paged_attention_bf16
 *   h = x + o Wo;  m = RMSNorm(h)          linear_bf16, rmsnorm_bf16 (with the add)
 *   x = h + Wdown (silu(m Wg) * m Wu)      linear_bf16 (gate|up), silu_mul_bf16, linear_bf16, add
 *
 * (each linear_bf16 through linear_bf16_coded: a few rows on the weight's GGUF codes where it has them)
 */
#include <stdint.h>

#include "bf16.h"

int linear_bf16_coded(const uint16_t *x, const uint16_t *w, const uint8_t *codes, int kind, const float *bias,
                      uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads);
int paged_attention_bf16(const uint16_t *q, const uint16_t *kv, const int64_t *tables, const int64_t *lens,
                         const int64_t *row_table, uint16_t *out, float *scratch, int64_t B, int64_t nkv, int64_t g,
                         int64_t hd, int64_t bs, int64_t width, int64_t max_len, int num_threads);
void rmsnorm_bf16(const uint16_t *x, const uint16_t *add, uint16_t *sum, const uint16_t *w, uint16_t *out, int64_t T,
                  int64_t D, float eps, int nthreads);
void silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t T, int64_t I, int nthreads);
void rope_store_bf16(const uint16_t *qkv, int64_t stride, const uint16_t *cos, const uint16_t *sin, int64_t T,
                     int64_t nh, int64_t nkv, int64_t hd, float scale, uint16_t *q_out, uint16_t *cache,
                     const int64_t *rows, int nthreads);

/* One layer's weights, fixed at load (NativeLayers in models/native_layers.py mirrors it). */
struct layer_weights {
    const uint16_t *norm_in, *norm_post; /* (D) */
    const uint16_t *qkv, *o, *gate_up, *down; /* packed for linear_bf16 */
    const float *qkv_bias; /* NULL: none */
    const uint8_t *qkv_codes, *o_codes, *gate_up_codes, *down_codes; /* their GGUF codes (linear_codes.c), or NULL */
    int32_t qkv_kind, o_kind, gate_up_kind, down_kind; /* the codes' ggml types */
};

/* The model's shapes and one step's inputs, shared by every layer of the step. */
struct layer_step {
    int64_t D, nh, nkv, hd, I; /* hidden, query heads, KV heads, head dim, MLP width */
    float eps, scale;
    int64_t T; /* rows (tokens) of the step */
    const uint16_t *cos, *sin; /* (T, hd): Rotary.tables */
    const int64_t *rows; /* (T * 2 * nkv): cache rows of the new K|V (attention.write_kv) */
    const int64_t *tables, *lens, *row_table; /* paged_attention_bf16's */
    int64_t bs, width, max_len;
    uint16_t *work; /* layer_work_elems(...) bf16 values */
    float *scratch; /* paged_attention_bf16's, for nthreads */
    int nthreads;
};

/* bf16 values of work space a layer needs for T rows. */
int64_t layer_work_elems(int64_t T, int64_t D, int64_t nh, int64_t nkv, int64_t hd, int64_t I) {
    return T * (4 * D + (nh + 2 * nkv) * hd + 2 * nh * hd + 3 * I);
}

/* x (T, D) in place: x becomes the layer's output. kv: this layer's cache. Returns 0; or 1
 * when a product refuses its shape, 2 when attention does, 3 when attention is out of memory
 * (the layer is then half done: the step must fail). */
int decoder_layer_bf16(const struct layer_weights *w, const struct layer_step *s, uint16_t *x, uint16_t *kv) {
    const int64_t T = s->T, D = s->D, I = s->I, hd = s->hd, nq = s->nh * hd;
    const int64_t nqkv = (s->nh + 2 * s->nkv) * hd;
    uint16_t *n = s->work, *qkv = n + T * D, *q = qkv + T * nqkv, *o = q + T * nq, *a = o + T * nq;
    uint16_t *h = a + T * D, *m = h + T * D, *gu = m + T * D, *act = gu + T * 2 * I;
    int rc;
    rmsnorm_bf16(x, 0, 0, w->norm_in, n, T, D, s->eps, s->nthreads);
    if (linear_bf16_coded(n, w->qkv, w->qkv_codes, w->qkv_kind, w->qkv_bias, qkv, T, nqkv, D, s->nthreads)) return 1;
    rope_store_bf16(qkv, nqkv, s->cos, s->sin, T, s->nh, s->nkv, hd, s->scale, q, kv, s->rows, s->nthreads);
    rc = paged_attention_bf16(q, kv, s->tables, s->lens, s->row_table, o, s->scratch, T, s->nkv, s->nh / s->nkv, hd,
                              s->bs, s->width, s->max_len, s->nthreads);
    if (rc) return rc == -2 ? 3 : 2;
    if (linear_bf16_coded(o, w->o, w->o_codes, w->o_kind, 0, a, T, D, nq, s->nthreads)) return 1;
    rmsnorm_bf16(x, a, h, w->norm_post, m, T, D, s->eps, s->nthreads);
    if (linear_bf16_coded(m, w->gate_up, w->gate_up_codes, w->gate_up_kind, 0, gu, T, 2 * I, D, s->nthreads)) return 1;
    silu_mul_bf16(gu, act, T, I, s->nthreads);
    if (linear_bf16_coded(act, w->down, w->down_codes, w->down_kind, 0, a, T, D, I, s->nthreads)) return 1;
    for (int64_t i = 0; i < T * D; i++) x[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(a[i])); /* torch's bf16 add */
    return 0;
}
