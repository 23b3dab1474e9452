/* Paged attention for a flat batch of mixed prefill and decode tokens, fp32, CPU.
 *
 * The twin of reference.paged_attention_with_kvcache: rotate q and the new k, write the new
 * k and v into their cache slots, then let every new token attend causally to its
 * sequence's cached tokens through the sequence's block table (GQA: query heads h*G ..
 * h*G+G-1 share KV head h). Built with the other csrc/cpu files by parallax/ops/cpu.py.
 *
 * Layouts (token-major inputs, block-major caches):
 *   q (T, Hq, D) rows q_stride apart; k, v (T, Hk, D) rows k_stride / v_stride apart;
 *   cos, sin (T, D/2); k_cache, v_cache (N, Hk, bs, D) contiguous, so one KV head's keys of
 *   one block are bs contiguous rows; slot s is row s % bs of block s / bs;
 *   slot_mapping (T,) int64; block_tables (B, max_blocks) int32; context_lens (B,) int32
 *   (tokens in the cache after this step, new ones included); query_start_loc (B+1,) int32:
 *   sequence b's new tokens are q[query_start_loc[b] : query_start_loc[b+1]], the last
 *   ones of its context; out (T, Hq, D) contiguous.
 *   window > 0: a token at position p attends only to positions (p - window, p] (sliding
 *   window; blocks wholly before the window of a sequence's first new token are never read,
 *   so their block-table entries may be anything, e.g. -1 once the engine freed them).
 *   softcap > 0: the scaled scores s become softcap * tanh(s / softcap) (Gemma 2).
 *
 * Every length, slot and block id is checked before anything is written: the function
 * returns a negative code (ops/cpu.py turns it into an error) instead of writing outside
 * the cache.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "isa.h"

#if defined(PARALLAX_MVEC) && !defined(__clang__)   /* as in decode_f32.c */
float expf(float) __attribute__((simd("notinbranch")));
#endif

#include "softmax.h"

static inline float dot(const float* a, const float* b, int n) {
    vf acc = vzero();
    int i = 0;
    for (; i + PARALLAX_VW <= n; i += PARALLAX_VW) acc += vload(a + i) * vload(b + i);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void rotate(const float* x, const float* cos, const float* sin, float* out, int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        out[i] = a * cos[i] - b * sin[i];
        out[i + h] = b * cos[i] + a * sin[i];
    }
}

/* acc (D) = acc * corr + sum_j p[j] * v[j] over n rows D apart; D % 16 == 0. */
static void pv(float* acc, float corr, const float* p, const float* v, int n, int D) {
    for (int i0 = 0; i0 < D; i0 += PARALLAX_VW) {
        vf a = vload(acc + i0) * corr;
        for (int j = 0; j < n; j++) a += p[j] * vload(v + (size_t)j * D + i0);
        vstore(acc + i0, a);
    }
}

#define KEYS 128   /* keys scored per round of the online softmax (a multiple of bs) */
#define MAX_D 256
#define MAX_G 16

/* Gemma 2's soft-capping of a round's scores: s -> c * tanh(s / c). Out of line: the
 * uncapped loop around its call stays as tight as without it. */
static __attribute__((noinline)) void cap_scores(float sc[][KEYS], int G, int n, float c) {
    float inv = 1.f / c;
    for (int g = 0; g < G; g++)
        for (int j = 0; j < n; j++) sc[g][j] = c * tanhf(sc[g][j] * inv);
}
#define QCHUNK 16  /* query tokens per work item: long prefills spread over threads */
/* Below these amounts of work a loop runs on the calling thread alone: a decode step's
 * cache write (a few rows) and short-context attention take microseconds, less than
 * waking the OpenMP team (tens of microseconds when its threads sleep between regions,
 * which libgomp makes them do when a process has more team threads than cores). */
#define MIN_PARALLEL_ROWS 256        /* new (token, KV head) rows to write */
#define MIN_PARALLEL_MACS (1L << 20) /* query-key pairs x head dim to attend */

enum { OK = 0, BAD_SLOT = -1, BAD_LENGTH = -2, BAD_BLOCK = -3, BAD_QUERY = -4, BAD_SHAPE = -5 };

/* The first position a token at position pos attends to. */
static inline int first_key(int pos, int window) {
    return window > 0 && pos + 1 > window ? pos + 1 - window : 0;
}

static int check(const int64_t* slot_mapping, const int32_t* block_tables, int max_blocks,
                 const int32_t* context_lens, const int32_t* qsl, int T, int B, int N, int bs,
                 int G, int D, int window) {
    if (D % 16 || D > MAX_D || G < 1 || G > MAX_G || bs < 1 || KEYS % bs) return BAD_SHAPE;
    if (qsl[0] != 0 || qsl[B] != T) return BAD_QUERY;
    long capacity = (long)N * bs;
    for (int t = 0; t < T; t++)
        if (slot_mapping[t] < 0 || slot_mapping[t] >= capacity) return BAD_SLOT;
    for (int b = 0; b < B; b++) {
        int n = qsl[b + 1] - qsl[b], len = context_lens[b];
        if (n < 1) return BAD_QUERY;
        if (len < n) return BAD_LENGTH;
        int nb = (len + bs - 1) / bs;
        if (nb > max_blocks) return BAD_LENGTH;
        for (int i = first_key(len - n, window) / bs; i < nb; i++) {   /* blocks read */
            int32_t blk = block_tables[(size_t)b * max_blocks + i];
            if (blk < 0 || blk >= N) return BAD_BLOCK;
        }
    }
    return OK;
}

int parallax_paged_attention_kv_f32(
        const float* q, long q_stride, const float* k, long k_stride, const float* v,
        long v_stride, const float* cos, const float* sin, float* k_cache, float* v_cache,
        const int64_t* slot_mapping, const int32_t* block_tables, int max_blocks,
        const int32_t* context_lens, const int32_t* qsl, float* out, int T, int B, int Hq,
        int Hk, int D, int N, int bs, float scale, int window, float softcap, int num_threads) {
    int G = Hq / Hk, h2 = D / 2;
    (void)num_threads;   /* unused where OpenMP is off (as is macs below) */
    if (Hk < 1 || Hq % Hk) return BAD_SHAPE;
    int err = check(slot_mapping, block_tables, max_blocks, context_lens, qsl, T, B, N, bs, G, D,
                    window);
    if (err) return err;

    /* 1. The new keys (rotated) and values into their slots. */
    #pragma omp parallel for schedule(static) num_threads(num_threads) \
        if (T * Hk >= MIN_PARALLEL_ROWS)
    for (int item = 0; item < T * Hk; item++) {
        int t = item / Hk, h = item % Hk;
        long s = slot_mapping[t];
        size_t row = (((size_t)(s / bs) * Hk + h) * bs + s % bs) * D;
        rotate(k + t * k_stride + (size_t)h * D, cos + (size_t)t * h2, sin + (size_t)t * h2,
               k_cache + row, D);
        const float* vn = v + t * v_stride + (size_t)h * D;
        for (int i = 0; i < D; i++) v_cache[row + i] = vn[i];
    }

    /* 2. Work items (sequence, KV head, chunk of its queries). */
    int n_items = 0;
    long macs = 0;
    for (int b = 0; b < B; b++) {
        n_items += (qsl[b + 1] - qsl[b] + QCHUNK - 1) / QCHUNK * Hk;
        int len = context_lens[b];
        macs += (long)(qsl[b + 1] - qsl[b]) * (window > 0 && window < len ? window : len) * Hq * D;
    }
    (void)macs;
    int* items = malloc(sizeof(int) * 3 * (size_t)(n_items > 0 ? n_items : 1));
    if (!items) return BAD_SHAPE;
    int w = 0;
    for (int b = 0; b < B; b++)
        for (int c = qsl[b]; c < qsl[b + 1]; c += QCHUNK)
            for (int h = 0; h < Hk; h++) {
                items[3 * w] = b; items[3 * w + 1] = c; items[3 * w + 2] = h; w++;
            }

    #pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) \
        if (macs >= MIN_PARALLEL_MACS)
    for (int it = 0; it < n_items; it++) {
        int b = items[3 * it], c0 = items[3 * it + 1], h = items[3 * it + 2];
        int q_end = qsl[b + 1], len = context_lens[b];
        int first_pos = len - (q_end - qsl[b]);          /* position of the first new token */
        int c1 = c0 + QCHUNK < q_end ? c0 + QCHUNK : q_end;
        const int32_t* table = block_tables + (size_t)b * max_blocks;
        float qr[MAX_G][MAX_D], acc[MAX_G][MAX_D], sc[MAX_G][KEYS], mx[MAX_G], denom[MAX_G];
        for (int t = c0; t < c1; t++) {
            int pos = first_pos + (t - qsl[b]);           /* causal: keys [lo, pos] */
            int lo = first_key(pos, window), keys = pos + 1;
            const float* cb = cos + (size_t)t * h2;
            const float* sb = sin + (size_t)t * h2;
            for (int g = 0; g < G; g++) {
                rotate(q + t * q_stride + (size_t)(h * G + g) * D, cb, sb, qr[g], D);
                for (int i = 0; i < D; i++) acc[g][i] = 0.f;
                mx[g] = -INFINITY;
                denom[g] = 0.f;
            }
            /* Rounds of KEYS keys from the block holding lo, block by block as without a
             * window; the slots of that block before lo get no score (-inf, after the cap)
             * and are not read. */
            int a0 = lo - lo % bs;
            for (int j0 = a0; j0 < keys; j0 += KEYS) {
                int n = keys - j0 < KEYS ? keys - j0 : KEYS;
                int skip = j0 == a0 ? lo - a0 : 0;           /* < bs */
                for (int j = 0; j < n; j += bs) {
                    int pos = j0 + j, m = n - j < bs ? n - j : bs;
                    int r0 = j == 0 ? skip : 0;
                    const float* kb = k_cache + ((size_t)table[pos / bs] * Hk + h) * bs * D;
                    for (int r = r0; r < m; r++)
                        for (int g = 0; g < G; g++)
                            sc[g][j + r] = dot(qr[g], kb + (size_t)r * D, D) * scale;
                }
                if (softcap > 0.f) cap_scores(sc, G, n, softcap);
                for (int g = 0; g < G; g++)
                    for (int r = 0; r < skip; r++) sc[g][r] = -INFINITY;
                for (int g = 0; g < G; g++) {
                    float corr = softmax_round(sc[g], n, &mx[g], &denom[g]);
                    for (int j = 0; j < n; j += bs) {
                        int pos = j0 + j, m = n - j < bs ? n - j : bs;
                        int r0 = j == 0 ? skip : 0;
                        const float* vb = v_cache + ((size_t)table[pos / bs] * Hk + h) * bs * D;
                        pv(acc[g], j == 0 ? corr : 1.f, sc[g] + j + r0, vb + (size_t)r0 * D,
                           m - r0, D);
                    }
                }
            }
            for (int g = 0; g < G; g++) {
                float* o = out + ((size_t)t * Hq + h * G + g) * D;
                float inv = 1.f / denom[g];
                for (int i = 0; i < D; i++) o[i] = acc[g][i] * inv;
            }
        }
    }
    free(items);
    return OK;
}
