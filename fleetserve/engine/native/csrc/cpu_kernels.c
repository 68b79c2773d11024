/* fleetserve's CPU kernels, built at first use by cpu_kernels.py with the machine's C compiler and called
 * through ctypes (which releases the GIL). fp32 math throughout.
 *
 * fs_paged_decode: decode attention over the paged KV cache: one query token per sequence reads its blocks in
 * place (no gathered copy), the query heads that share a KV head are scored together, fp32 math.
 * Layouts (all contiguous):
 *   q, out        [B, Hq, D] float32
 *   k/v cache     [num_blocks, block_size, Hkv, D] float32 or bfloat16 (kv_bf16 = 1)
 *   block_tables  [B, bt_stride] int32;  context_lens [B] int32 (tokens in the cache, the new one included)
 * window > 0 keeps the last `window` tokens (sliding-window attention). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* row of D values at a cache slot, as float32 (into tmp when the cache is bf16) */
static inline const float *kv_row(const void *cache, int kv_bf16, long offset, int d, float *tmp) {
    if (!kv_bf16) return (const float *)cache + offset;
    const uint16_t *src = (const uint16_t *)cache + offset;
#pragma omp simd
    for (int i = 0; i < d; i++) tmp[i] = bf16_to_f32(src[i]);
    return tmp;
}

int fs_paged_decode(const float *q, const void *k_cache, const void *v_cache, int kv_bf16,
                    const int32_t *block_tables, int bt_stride, const int32_t *context_lens,
                    int num_seqs, int hq, int hkv, int d, int block_size, float scale, int window,
                    float *out, int seq_begin, int seq_end) {
    const int group = hq / hkv;
    int max_ctx = 0;
    for (int b = seq_begin; b < seq_end; b++)
        if (context_lens[b] > max_ctx) max_ctx = context_lens[b];
    /* scores [hq, max_ctx], then one token's K or V row for all KV heads converted from bf16 */
    float *scores = malloc(sizeof(float) * ((size_t)max_ctx * hq + (size_t)hkv * d));
    if (!scores) return -1;
    float *tmp = scores + (size_t)max_ctx * hq;
    const long token_stride = (long)hkv * d, block_stride = (long)block_size * token_stride;

    /* one sequence at a time, token by token: a token's rows for all KV heads are contiguous, and a block's
     * tokens follow each other, so the cache is read in long sequential runs */
    for (int b = seq_begin; b < seq_end; b++) {
        const int ctx = context_lens[b];
        const int start = (window > 0 && ctx > window) ? ctx - window : 0;
        const int n = ctx - start;
        const int32_t *table = block_tables + (long)b * bt_stride;
        const float *qb = q + (long)b * hq * d;
        float *ob = out + (long)b * hq * d;
        for (int t = 0; t < n; t++) {  /* scores: q . k, each query head against its KV head */
            const int pos = start + t;
            const long off = (long)table[pos / block_size] * block_stride + (long)(pos % block_size) * token_stride;
            const float *k = kv_row(k_cache, kv_bf16, off, hkv * d, tmp);
            for (int j = 0; j < hq; j++) {
                const float *qj = qb + (long)j * d, *kj = k + (long)(j / group) * d;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < d; i++) acc += qj[i] * kj[i];
                scores[(long)j * n + t] = acc * scale;
            }
        }
        for (int j = 0; j < hq; j++) {  /* softmax, normalised at the end */
            float *s = scores + (long)j * n, m = s[0], sum = 0.f;  /* n >= 1; every value stays finite */
            for (int t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
            for (int t = 0; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
            const float inv = 1.f / sum;
            for (int t = 0; t < n; t++) s[t] *= inv;
        }
        memset(ob, 0, sizeof(float) * hq * d);
        for (int t = 0; t < n; t++) {  /* out = p . v */
            const int pos = start + t;
            const long off = (long)table[pos / block_size] * block_stride + (long)(pos % block_size) * token_stride;
            const float *v = kv_row(v_cache, kv_bf16, off, hkv * d, tmp);
            for (int j = 0; j < hq; j++) {
                const float p = scores[(long)j * n + t], *vj = v + (long)(j / group) * d;
                float *oj = ob + (long)j * d;
#pragma omp simd
                for (int i = 0; i < d; i++) oj[i] += p * vj[i];
            }
        }
    }
    free(scores);
    return 0;
}

/* The small per-layer ops of a decode step, one call each instead of several torch ops (at batch 16 each
 * torch op costs more in dispatch than in arithmetic). They follow the reference's formulas. */

/* out = w * (x / sqrt(mean(x^2) + eps)), row by row; x, out [rows, dim] */
void fs_rms_norm(const float *x, const float *w, float *out, int rows, int dim, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * dim;
        float *outr = out + (long)r * dim;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < dim; i++) sum += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(sum / dim + eps);
#pragma omp simd
        for (int i = 0; i < dim; i++) outr[i] = w[i] * (xr[i] * inv);
    }
}

/* out = silu(gate) * up, where each row of gate_up is [gate (inter), up (inter)]; out [rows, inter] */
void fs_silu_mul(const float *gate_up, float *out, int rows, int inter) {
    for (int r = 0; r < rows; r++) {
        const float *g = gate_up + (long)r * 2 * inter, *u = g + inter;
        float *o = out + (long)r * inter;
#pragma omp simd
        for (int i = 0; i < inter; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* Rotary embedding in place, rotate_half layout: for each row, `heads` vectors of d values starting at the
 * row (rows are row_stride apart), rotated by that row's cos/sin [rows, d] */
void fs_rope(float *x, long row_stride, int rows, int heads, int d, const float *cos, const float *sin) {
    const int half = d / 2;
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (long)r * d, *s = sin + (long)r * d;
        for (int h = 0; h < heads; h++) {
            float *v = x + r * row_stride + (long)h * d;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}
