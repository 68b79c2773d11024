/* fleetserve's CPU kernels, built at first use by cpu_kernels.py with the machine's C compiler and called
 * through ctypes (which releases the GIL). fp32 math throughout.
 *
 * Threads: a small pool of its own (fs_pool_*), not OpenMP. A kernel call shares its work out as items that
 * the calling thread and the helpers claim one chunk at a time; the caller starts at once and never waits for
 * a helper that has not claimed anything, so a helper that is asleep or descheduled (another busy process on
 * the machine) costs nothing but its share. Helpers spin a little after each job (the next kernel of a
 * decode step comes within microseconds; waking a sleeping thread costs tens of microseconds in a VM) and
 * then sleep. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
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


/* ---- the thread pool ---- */

typedef void (*fs_task)(void *ctx, int begin, int end);

#define MAX_HELPERS 63
/* work = job id << 32 | next unclaimed item: one word, so an item is never claimed under the wrong job */
#define JOB(w) ((uint32_t)((w) >> 32))
#define ITEM(w) ((uint32_t)(w))

static struct {
    int helpers;   /* threads besides the caller */
    long spin_ns;  /* how long an idle helper spins before it sleeps */
    pthread_t threads[MAX_HELPERS];
    /* a job's description, by job parity: a helper still reading job J's slot never sees job J + 1 write it,
     * and job J + 2 cannot start until every helper registered in J + 1 has left (see fs_parallel_for) */
    struct { fs_task fn; void *ctx; int n, grain; } slot[2];
    _Atomic uint64_t work;
    _Atomic int active;    /* helpers registered in the current job */
    _Atomic int sleeping;
    _Atomic int stop;
    uint32_t job;          /* the last job published (written by the caller holding `caller`) */
    pthread_mutex_t caller, lock;
    pthread_cond_t wake;
} pool = {.caller = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void run_claims(uint32_t job) {
    const fs_task fn = pool.slot[job & 1].fn;
    void *ctx = pool.slot[job & 1].ctx;
    const uint32_t n = (uint32_t)pool.slot[job & 1].n, grain = (uint32_t)pool.slot[job & 1].grain;
    uint64_t w = atomic_load(&pool.work);
    while (JOB(w) == job && ITEM(w) < n) {
        const uint32_t end = ITEM(w) + grain < n ? ITEM(w) + grain : n;
        if (atomic_compare_exchange_weak(&pool.work, &w, ((uint64_t)job << 32) | end)) {
            fn(ctx, (int)ITEM(w), (int)end);
            w = atomic_load(&pool.work);
        }
    }
}

static long elapsed_ns(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* Waits until a job after `seen` is published (or the pool stops): spins for up to spin_ns, yielding its core
 * to any other thread that wants it, then sleeps (docs/perf.md: with a decode step in one call, spinning 200 us
 * and sleeping at once are within a few percent of each other, idle or beside a busy process). */
static void idle_wait(uint32_t seen) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 1;; i++) {
        if (JOB(atomic_load(&pool.work)) != seen || atomic_load(&pool.stop)) return;
        cpu_relax();
        if (i & 63) continue;
        sched_yield();
        if (elapsed_ns(&t0) > pool.spin_ns) break;
    }
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add(&pool.sleeping, 1);
    while (JOB(atomic_load(&pool.work)) == seen && !atomic_load(&pool.stop)) pthread_cond_wait(&pool.wake, &pool.lock);
    atomic_fetch_sub(&pool.sleeping, 1);
    pthread_mutex_unlock(&pool.lock);
}

static void *helper_main(void *arg) {
    (void)arg;
    uint32_t seen = JOB(atomic_load(&pool.work));
    while (!atomic_load(&pool.stop)) {
        const uint32_t job = JOB(atomic_load(&pool.work));
        if (job == seen) {
            idle_wait(seen);
            continue;
        }
        /* register, then check the job is still the current one: the caller waits for registered helpers,
         * and one that registered too late sees the next job id here and reads nothing of this one */
        atomic_fetch_add(&pool.active, 1);
        if (JOB(atomic_load(&pool.work)) == job) {
            seen = job;
            run_claims(job);
        }
        atomic_fetch_sub(&pool.active, 1);
    }
    return NULL;
}

static void after_fork_in_child(void) {  /* the helpers do not exist in a forked child: it runs alone */
    pool.helpers = 0;
    atomic_store(&pool.active, 0);
    atomic_store(&pool.sleeping, 0);
    pthread_mutex_init(&pool.caller, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
}

/* Starts threads - 1 helpers (once; later calls change only the spin time). Returns the helpers running. */
int fs_pool_start(int threads, long spin_us) {
    pthread_mutex_lock(&pool.caller);
    pool.spin_ns = spin_us * 1000;
    if (pool.helpers == 0 && threads > 1) {
        static int atfork_set;
        if (!atfork_set) atfork_set = !pthread_atfork(NULL, NULL, after_fork_in_child);
        atomic_store(&pool.stop, 0);
        int want = threads - 1 < MAX_HELPERS ? threads - 1 : MAX_HELPERS;
        while (pool.helpers < want && !pthread_create(&pool.threads[pool.helpers], NULL, helper_main, NULL))
            pool.helpers++;
    }
    pthread_mutex_unlock(&pool.caller);
    return pool.helpers;
}

/* Stops and joins the helpers (tests; a process that exits needs no call). */
void fs_pool_stop(void) {
    pthread_mutex_lock(&pool.caller);
    atomic_store(&pool.stop, 1);
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    for (int i = 0; i < pool.helpers; i++) pthread_join(pool.threads[i], NULL);
    pool.helpers = 0;
    pthread_mutex_unlock(&pool.caller);
}

/* fn(ctx, begin, end) over [0, n) in chunks of `grain` items, on the caller and the helpers. Items must be
 * independent. A second caller while one is running (two engines in one process) runs its job alone. */
static void fs_parallel_for(fs_task fn, void *ctx, int n, int grain) {
    if (grain < 1) grain = 1;
    if (pool.helpers == 0 || n <= grain || pthread_mutex_trylock(&pool.caller) != 0) {
        fn(ctx, 0, n);
        return;
    }
    const uint32_t job = ++pool.job;
    pool.slot[job & 1].fn = fn;
    pool.slot[job & 1].ctx = ctx;
    pool.slot[job & 1].n = n;
    pool.slot[job & 1].grain = grain;
    atomic_store(&pool.work, (uint64_t)job << 32);
    if (atomic_load(&pool.sleeping)) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run_claims(job);
    for (int i = 1; atomic_load(&pool.active); i++)  /* helpers finishing the chunks they claimed */
        if (i & 63) cpu_relax();
        else sched_yield();  /* one was descheduled mid-chunk: let it have a core */
    pthread_mutex_unlock(&pool.caller);
}

/* A per-thread scratch buffer, grown as needed and freed when its thread exits. */
struct scratch { float *buf; size_t cap; };
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void scratch_free(void *p) {
    free(((struct scratch *)p)->buf);
    free(p);
}
static void scratch_key_create(void) { pthread_key_create(&scratch_key, scratch_free); }

static float *scratch(size_t floats) {
    pthread_once(&scratch_once, scratch_key_create);
    struct scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof *s))) return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (floats > s->cap) {
        float *grown = realloc(s->buf, floats * sizeof(float));
        if (!grown) return NULL;
        s->buf = grown;
        s->cap = floats;
    }
    return s->buf;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does (values are finite) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* ---- paged decode attention ----
 * One query token per sequence reads its blocks in place (no gathered copy); the query heads that share a
 * KV head are scored together. Layouts (all contiguous):
 *   q [B, Hq, D] float32, sequences q_stride apart;  out [B, Hq, D] float32
 *   k_new, v_new  [B, Hkv, D] float32, sequences k_stride / v_stride apart, or NULL
 *   k/v cache     [num_blocks, block_size, Hkv, D] float32 or bfloat16 (kv_bf16 = 1)
 *   block_tables  [B, bt_stride] int32;  context_lens [B] int32 (tokens in the cache, the new one included)
 * With k_new/v_new the new token's K and V are first written to the cache at its slot (the last position).
 * window > 0 keeps the last `window` tokens (sliding-window attention). Sequences are the pool's items. */

/* row of D values at a cache slot, as float32 (into tmp when the cache is bf16) */
static inline const float *kv_row(const void *cache, int kv_bf16, long offset, int d, float *tmp) {
    if (!kv_bf16) return (const float *)cache + offset;
    const uint16_t *src = (const uint16_t *)cache + offset;
#pragma omp simd
    for (int i = 0; i < d; i++) tmp[i] = bf16_to_f32(src[i]);
    return tmp;
}

struct decode_job {
    const float *q, *k_new, *v_new;
    long q_stride, k_stride, v_stride;
    void *k_cache, *v_cache;
    const int32_t *block_tables, *context_lens;
    int kv_bf16, bt_stride, hq, hkv, d, block_size, window, max_ctx;
    float scale;
    float *out;
    _Atomic int failed;
};

static void store_row(void *cache, int kv_bf16, long offset, const float *src, int n) {
    if (!kv_bf16) {
        memcpy((float *)cache + offset, src, sizeof(float) * n);
        return;
    }
    uint16_t *dst = (uint16_t *)cache + offset;
    for (int i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

/* where position `pos` of a sequence (block table `table`) starts in a [blocks, block_size, Hkv, D] cache */
static inline long slot_offset(const int32_t *table, int pos, int block_size, long token_stride) {
    return ((long)table[pos / block_size] * block_size + pos % block_size) * token_stride;
}

static void decode_task(void *ctx, int begin, int end) {
    const struct decode_job *a = ctx;
    const int hq = a->hq, hkv = a->hkv, d = a->d, group = hq / hkv, block_size = a->block_size;
    /* scores [hq, max_ctx], then one token's K or V row for all KV heads converted from bf16 */
    float *scores = scratch((size_t)a->max_ctx * hq + (size_t)hkv * d);
    if (!scores) {
        atomic_store(&((struct decode_job *)ctx)->failed, 1);
        return;
    }
    float *tmp = scores + (size_t)a->max_ctx * hq;
    const long token_stride = (long)hkv * d;
    /* token by token: a token's rows for all KV heads are contiguous, and a block's tokens follow each
     * other, so the cache is read in long sequential runs */
    for (int b = begin; b < end; b++) {
        const int ctx_len = a->context_lens[b];
        const int start = (a->window > 0 && ctx_len > a->window) ? ctx_len - a->window : 0;
        const int n = ctx_len - start;
        const int32_t *table = a->block_tables + (long)b * a->bt_stride;
        const float *qb = a->q + (long)b * a->q_stride;
        float *ob = a->out + (long)b * hq * d;
        if (a->k_new) {
            const int pos = ctx_len - 1;
            const long off = slot_offset(table, pos, block_size, token_stride);
            store_row(a->k_cache, a->kv_bf16, off, a->k_new + (long)b * a->k_stride, hkv * d);
            store_row(a->v_cache, a->kv_bf16, off, a->v_new + (long)b * a->v_stride, hkv * d);
        }
        for (int t = 0; t < n; t++) {  /* scores: q . k, each query head against its KV head */
            const int pos = start + t;
            const long off = slot_offset(table, pos, block_size, token_stride);
            const float *k = kv_row(a->k_cache, a->kv_bf16, off, hkv * d, tmp);
            for (int j = 0; j < hq; j++) {
                const float *qj = qb + (long)j * d, *kj = k + (long)(j / group) * d;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < d; i++) acc += qj[i] * kj[i];
                scores[(long)j * n + t] = acc * a->scale;
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
            const long off = slot_offset(table, pos, block_size, token_stride);
            const float *v = kv_row(a->v_cache, a->kv_bf16, off, hkv * d, tmp);
            for (int j = 0; j < hq; j++) {
                const float p = scores[(long)j * n + t], *vj = v + (long)(j / group) * d;
                float *oj = ob + (long)j * d;
#pragma omp simd
                for (int i = 0; i < d; i++) oj[i] += p * vj[i];
            }
        }
    }
}

int fs_paged_decode(const float *q, long q_stride, const float *k_new, long k_stride, const float *v_new, long v_stride,
                    void *k_cache, void *v_cache,
                    int kv_bf16, const int32_t *block_tables, int bt_stride, const int32_t *context_lens,
                    int num_seqs, int hq, int hkv, int d, int block_size, float scale, int window, float *out) {
    struct decode_job job = {q, k_new, v_new, q_stride, k_stride, v_stride, k_cache, v_cache, block_tables, context_lens, kv_bf16, bt_stride,
                             hq, hkv, d, block_size, window, 0, scale, out, 0};
    for (int b = 0; b < num_seqs; b++)
        if (context_lens[b] > job.max_ctx) job.max_ctx = context_lens[b];
    fs_parallel_for(decode_task, &job, num_seqs, 1);
    return atomic_load(&job.failed) ? -1 : 0;
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

/* ---- fs_lowbit_gemm ----
 * y[M, N] = x[M, K] @ W^T for a weight kept as int8 q and per-32-input fp32 scale d and offset m, in panels
 * of 16 output columns: q [NP][K][16], dm [NP][K/32][2][16]; w = d * q + m, which the packer
 * (cpu_kernels.pack_lowbit) verified equals the fp32 weight bit for bit (an fp16 d times an 8-bit q is exact
 * in fp32), so these are the fp32 model's products, read from 1.25 bytes a weight instead of 4.
 * The inputs are transposed in chunks of 16 rows; up to 16 rows accumulate in registers per panel, so each
 * weight is converted once per 16 rows. Panels are the pool's items. */

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

struct gemm_job {
    const float *xt;  /* [chunks][K][16] */
    int M, K, N;
    const int8_t *q;
    const float *dm;
    float *y;
    _Atomic int failed;
};

static void gemm_task(void *ctx, int begin, int end) {
    const struct gemm_job *g = ctx;
    const int M = g->M, K = g->K, N = g->N, chunks = (M + 15) / 16;
    float *tile = NULL;
    if (chunks > 1 && !(tile = scratch((size_t)16 * K))) {
        atomic_store(&((struct gemm_job *)ctx)->failed, 1);
        return;
    }
    for (int p = begin; p < end; p++) {
        const int8_t *qp = g->q + (long)p * K * 16;
        const float *s = g->dm + (long)p * (K / 32) * 32;
        const int cols = N - p * 16 < 16 ? N - p * 16 : 16;
        if (tile)
            for (int b = 0; b < K / 32; b++) {
                const v16 d = ld16(s + b * 32), m = ld16(s + b * 32 + 16);
                for (int k = b * 32; k < b * 32 + 32; k++) st16(tile + k * 16, d * cvt16(qp + k * 16) + m);
            }
        for (int c = 0; c < chunks; c++) {
            const float *xc = g->xt + (long)c * K * 16;
            float *yc = g->y + (long)c * 16 * N;
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
}

struct transpose_job { const float *x; float *xt; int M, K; };

/* x [M, K] -> xt[chunk][k][16] for chunks [begin, end) of 16 rows; lanes past M are left unread */
static void transpose_task(void *ctx, int begin, int end) {
    const struct transpose_job *t = ctx;
    const int K = t->K;
    for (int c = begin; c < end; c++) {  /* 16 sequential reads, one sequential write */
        const int rows = t->M - c * 16 < 16 ? t->M - c * 16 : 16;
        const float *xc = t->x + (long)c * 16 * K;
        float *dst = t->xt + (long)c * K * 16;
        for (int k = 0; k < K; k++)
            for (int r = 0; r < rows; r++) dst[(long)k * 16 + r] = xc[(long)r * K + k];
    }
}

int fs_lowbit_gemm(const float *x, int M, int K, const int8_t *q, const float *dm, int NP, float *y, int N) {
    const int chunks = (M + 15) / 16;
    float *xt = malloc(sizeof(float) * (size_t)chunks * K * 16);
    if (!xt) return -1;
    struct transpose_job tj = {x, xt, M, K};
    fs_parallel_for(transpose_task, &tj, chunks, 1);  /* one chunk (a decode step) runs on the caller alone */
    struct gemm_job job = {xt, M, K, N, q, dm, y, 0};
    /* one input chunk: ~16 claims a thread (the last claim leaves little idle); more: a panel is a claim */
    fs_parallel_for(gemm_task, &job, NP, chunks > 1 ? 1 : NP / (16 * (pool.helpers + 1)));
    free(xt);
    return atomic_load(&job.failed) ? -1 : 0;
}

/* ---- fs_decode_layers: every decoder layer of a pure decode step in one call ----
 * For an fp32 Llama-family model whose linear weights are all exactly low-bit: the same kernels, in the same
 * order and with the same fp32 operations as the layer-by-layer path (model.py), so the results are
 * bit-identical to it; only the ~15 Python-level ops a layer costs (dispatch, allocation: ~15% of a batch-16
 * decode step) are gone. x [M, hidden] is the residual stream, updated in place. */

struct fs_lowbit { const int8_t *q; const float *dm; const float *bias; int N, K, NP; };
struct fs_layer { const float *input_norm, *post_norm; struct fs_lowbit qkv, o, gate_up, down; };
struct fs_decode_step {
    int num_layers, M, hidden, hq, hkv, d, inter, block_size, bt_stride, window, kv_bf16;
    float eps, scale;
    const struct fs_layer *layers;
    void *const *k_caches, *const *v_caches;
    const int32_t *block_tables, *context_lens;
    const float *cos, *sin;  /* [M, d] */
    float *x;
};

static int linear(const struct fs_lowbit *w, const float *x, int M, float *y) {
    if (fs_lowbit_gemm(x, M, w->K, w->q, w->dm, w->NP, y, w->N)) return -1;
    if (w->bias)
        for (int r = 0; r < M; r++)
            for (int n = 0; n < w->N; n++) y[(long)r * w->N + n] += w->bias[n];
    return 0;
}

static void add_(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] = x[i] + y[i];
}

int fs_decode_layers(const struct fs_decode_step *s) {
    const int M = s->M, H = s->hidden, d = s->d, qkv_n = (s->hq + 2 * s->hkv) * d;
    float *work = malloc(sizeof(float) * (size_t)M * (2 * H + qkv_n + s->hq * d + 3 * s->inter));
    if (!work) return -1;
    float *h = work, *out = h + (long)M * H, *qkv = out + (long)M * H, *attn = qkv + (long)M * qkv_n,
          *gate_up = attn + (long)M * s->hq * d, *act = gate_up + (long)M * 2 * s->inter;
    int rc = 0;
    for (int l = 0; l < s->num_layers; l++) {
        const struct fs_layer *L = &s->layers[l];
        fs_rms_norm(s->x, L->input_norm, h, M, H, s->eps);
        if ((rc = linear(&L->qkv, h, M, qkv))) break;
        fs_rope(qkv, qkv_n, M, s->hq + s->hkv, d, s->cos, s->sin);
        if ((rc = fs_paged_decode(qkv, qkv_n, qkv + s->hq * d, qkv_n, qkv + (s->hq + s->hkv) * d, qkv_n,
                                  s->k_caches[l], s->v_caches[l], s->kv_bf16, s->block_tables, s->bt_stride,
                                  s->context_lens, M, s->hq, s->hkv, d, s->block_size, s->scale, s->window, attn)))
            break;
        if ((rc = linear(&L->o, attn, M, out))) break;
        add_(s->x, out, (long)M * H);
        fs_rms_norm(s->x, L->post_norm, h, M, H, s->eps);
        if ((rc = linear(&L->gate_up, h, M, gate_up))) break;
        fs_silu_mul(gate_up, act, M, s->inter);
        if ((rc = linear(&L->down, act, M, out))) break;
        add_(s->x, out, (long)M * H);
    }
    free(work);
    return rc;
}
