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
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
static inline v16 ld16(const float *p) { v16 v; memcpy(&v, p, 64); return v; }
static inline void st16(float *p, v16 v) { memcpy(p, &v, 64); }

/* 16 int8 weights as 16 floats (GCC scalarises the generic conversion: AVX-512 does it in two instructions) */
static inline v16 cvt16(const int8_t *q) {
#ifdef __AVX512F__
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
#else
    typedef int8_t i8x16 __attribute__((vector_size(16)));
    typedef int32_t i32x16 __attribute__((vector_size(64)));
    i8x16 b;
    memcpy(&b, q, 16);
    return __builtin_convertvector(__builtin_convertvector(b, i32x16), v16);
#endif
}

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
                    float *out) {
    const int group = hq / hkv;
    int max_ctx = 0;
    for (int b = 0; b < num_seqs; b++)
        if (context_lens[b] > max_ctx) max_ctx = context_lens[b];
    /* scores [hq, max_ctx], then one token's K or V row for all KV heads converted from bf16 */
    float *scores = malloc(sizeof(float) * ((size_t)max_ctx * hq + (size_t)hkv * d));
    if (!scores) return -1;
    float *tmp = scores + (size_t)max_ctx * hq;
    const long token_stride = (long)hkv * d, block_stride = (long)block_size * token_stride;

    /* one sequence at a time, token by token: a token's rows for all KV heads are contiguous, and a block's
     * tokens follow each other, so the cache is read in long sequential runs */
    for (int b = 0; b < num_seqs; b++) {
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

/* fs_lowbit_gemm: y[M, N] = x[M, K] @ W^T for a weight kept as int8 q and per-32-input fp32 scale d and
 * offset m, in panels of 16 output columns: q [NP][K][16], dm [NP][K/32][2][16]; w = d * q + m, which the
 * packer (cpu_kernels.pack_lowbit) verified equals the fp32 weight bit for bit (an fp16 d times an 8-bit q
 * is exact in fp32), so these are the fp32 model's products, read from 1.25 bytes a weight instead of 4.
 * The inputs are transposed in chunks of 16 rows; up to 16 rows accumulate in registers per panel, so each
 * weight is converted once per 16 rows. Panels are shared out over the OpenMP threads (torch's pool). */
/* One panel (16 output columns) for R rows whose inputs are transposed (xt[k * 16 + r]). The weights come
 * from the int8 panel (converted here: one input chunk) or from `tile`, the panel already converted to fp32
 * (several chunks: the conversion, which takes the FP pipes like a multiply-add, is then done once). */
#define PANEL(R)                                                                                  \
    static void panel_##R(const float *xt, int K, const int8_t *qp, const float *s, const float *tile, \
                          float *y, int N, int col0, int cols) {                                  \
        v16 acc[R];                                                                               \
        for (int r = 0; r < R; r++) acc[r] = (v16){0};                                            \
        if (tile) {                                                                               \
            for (int k = 0; k < K; k++) {                                                         \
                const v16 w = ld16(tile + k * 16);                                                \
                const float *xk = xt + k * 16;                                                    \
                for (int r = 0; r < R; r++) acc[r] += xk[r] * w;                                  \
            }                                                                                     \
        } else {                                                                                  \
            for (int b = 0; b < K / 32; b++) {                                                    \
                const v16 d = ld16(s + b * 32), m = ld16(s + b * 32 + 16);                        \
                for (int k = b * 32; k < b * 32 + 32; k++) {                                      \
                    const v16 w = d * cvt16(qp + k * 16) + m;                                     \
                    const float *xk = xt + k * 16;                                                \
                    for (int r = 0; r < R; r++) acc[r] += xk[r] * w;                              \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < R; r++) {                                                             \
            float out[16];                                                                        \
            st16(out, acc[r]);                                                                    \
            memcpy(y + (long)r * N + col0, out, sizeof(float) * cols);                            \
        }                                                                                         \
    }
PANEL(16)
PANEL(8)
PANEL(4)
PANEL(2)
PANEL(1)

int fs_lowbit_gemm(const float *x, int M, int K, const int8_t *q, const float *dm, int NP, float *y, int N) {
    const int chunks = (M + 15) / 16;
    float *xt = calloc((size_t)chunks * K * 16, sizeof(float));  /* xt[chunk][k][16], zero padded */
    if (!xt) return -1;
    for (int r = 0; r < M; r++)
        for (int k = 0; k < K; k++) xt[((long)(r / 16) * K + k) * 16 + r % 16] = x[(long)r * K + k];
    int failed = 0;
#pragma omp parallel
    {
        float *tile = chunks > 1 ? malloc(sizeof(float) * 16 * (size_t)K) : NULL;
        if (chunks > 1 && !tile) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int p = 0; p < NP; p++) {
            if (chunks > 1 && !tile) continue;
            const int8_t *qp = q + (long)p * K * 16;
            const float *s = dm + (long)p * (K / 32) * 32;
            const int cols = N - p * 16 < 16 ? N - p * 16 : 16;
            if (tile)
                for (int b = 0; b < K / 32; b++) {
                    const v16 d = ld16(s + b * 32), m = ld16(s + b * 32 + 16);
                    for (int k = b * 32; k < b * 32 + 32; k++) st16(tile + k * 16, d * cvt16(qp + k * 16) + m);
                }
            for (int c = 0; c < chunks; c++) {
                const float *xc = xt + (long)c * K * 16;
                float *yc = y + (long)c * 16 * N;
                const int rows = M - c * 16 < 16 ? M - c * 16 : 16;
                if (rows == 16) {
                    panel_16(xc, K, qp, s, tile, yc, N, p * 16, cols);
                    continue;
                }
                /* a partial chunk, 8, 4, 2 and 1 rows at a time: rows r0.. start at xc + r0 */
                for (int step = 8, r0 = 0; step >= 1; step /= 2)
                    for (; rows - r0 >= step; r0 += step) {
                        const float *xs = xc + r0;
                        float *ys = yc + (long)r0 * N;
                        if (step == 8) panel_8(xs, K, qp, s, tile, ys, N, p * 16, cols);
                        else if (step == 4) panel_4(xs, K, qp, s, tile, ys, N, p * 16, cols);
                        else if (step == 2) panel_2(xs, K, qp, s, tile, ys, N, p * 16, cols);
                        else panel_1(xs, K, qp, s, tile, ys, N, p * 16, cols);
                    }
            }
        }
        free(tile);
    }
    free(xt);
    return failed ? -1 : 0;
}
