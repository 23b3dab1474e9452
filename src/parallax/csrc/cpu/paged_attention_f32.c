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
 * Work: items of (sequence, up to QCHUNK of its new tokens, KV head), the costliest first
 * (query-key pairs), taken in turn by the threads. The G query heads of a KV head share
 * each K and V row read. An item with fewer (token, query head) rows than a vector has lanes
 * (a decode token) runs token by token: rounds of KEYS keys, the lanes of 16 (8) keys'
 * products summed at once by a tree of shuffles, one online-softmax update per round, the
 * next block's keys prefetched (a sequence's blocks lie anywhere, where the hardware
 * prefetchers lose the stream). Longer ones (prefill chunks) run as tiles of up to TROWS
 * rows held in the lanes of vectors, so scores, softmax and p.V are all lane-wise, block by
 * block with an online softmax (attend_tile).
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

#define KEYS 128  /* keys scored per round of a decode row's online softmax (a multiple of bs) */
#define MAX_D 256
#define MAX_G 16
#define QCHUNK 16  /* query tokens per work item: long prefills spread over threads */
#define TROWS 64   /* (token, query head) rows of a prefill tile, a multiple of every width */
#define SUBK 16    /* keys per step of a prefill tile (a block longer than this in steps) */
/* Below these amounts of work a loop runs on the calling thread alone: a decode step's
 * cache write (a few rows) and short-context attention take microseconds, less than
 * waking the OpenMP team (tens of microseconds when its threads sleep between regions,
 * which libgomp makes them do when a process has more team threads than cores). */
#define MIN_PARALLEL_ROWS 256        /* new (token, KV head) rows to write */
#define MIN_PARALLEL_MACS (1L << 20) /* query-key pairs x head dim to attend */

#define INLINE static inline __attribute__((always_inline))

/* The lanes of a . b (n a multiple of the width), unreduced. */
INLINE vf dotv(const float* a, const float* b, int n) {
    vf acc = vload(a) * vload(b);
    for (int i = PARALLAX_VW; i < n; i += PARALLAX_VW) acc += vload(a + i) * vload(b + i);
    return acc;
}

static inline void rotate(const float* x, const float* cos, const float* sin, float scale,
                          float* out, int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        out[i] = (a * cos[i] - b * sin[i]) * scale;
        out[i + h] = (b * cos[i] + a * sin[i]) * scale;
    }
}

/* Every cache line of n floats from p on its way into the cache: the blocks of a sequence
 * lie anywhere in the cache, so the hardware prefetchers lose the stream at each block. */
static inline void prefetch(const float* p, int n) {
    for (int i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 3);
}

/* Sums of the lanes of PARALLAX_VW vectors at once: lane i of the result is the sum of
 * a[ORDER(i)] (a transposing tree of shuffles and adds, far fewer than one reduction each). */
#if PARALLAX_VW == 16
#define ORDER(i) (4 * ((i) % 4) + (i) / 4)
/* Macros, not functions: clang wants the shuffles' immediates as constants where written. */
#define HALF_SUMS(a, b, lo, hi) \
    _mm512_add_ps(_mm512_shuffle_f32x4(a, b, lo), _mm512_shuffle_f32x4(a, b, hi))
#define PAIR_SUMS(a, b, lo, hi) _mm512_add_ps(_mm512_shuffle_ps(a, b, lo), _mm512_shuffle_ps(a, b, hi))
INLINE vf sum_lanes(const vf* a) {
    __m512 q[4];
    for (int j = 0; j < 4; j++)   /* 128-bit lane L of q[j]: 4 partial sums of a[4j + L] */
        q[j] = HALF_SUMS(HALF_SUMS((__m512)a[4 * j], (__m512)a[4 * j + 1], 0x44, 0xEE),
                         HALF_SUMS((__m512)a[4 * j + 2], (__m512)a[4 * j + 3], 0x44, 0xEE),
                         0x88, 0xDD);
    /* lane 4L + j: the sum of a[4j + L], i.e. of the key ORDER(4L + j) put there */
    return (vf)PAIR_SUMS(PAIR_SUMS(q[0], q[1], 0x44, 0xEE), PAIR_SUMS(q[2], q[3], 0x44, 0xEE),
                         0x88, 0xDD);
}
#elif PARALLAX_VW == 8
#define ORDER(i) (i)
INLINE vf sum_lanes(const vf* a) {
    __m256 x = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a[0], (__m256)a[1]),
                              _mm256_hadd_ps((__m256)a[2], (__m256)a[3]));
    __m256 y = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a[4], (__m256)a[5]),
                              _mm256_hadd_ps((__m256)a[6], (__m256)a[7]));
    return (vf)_mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20),
                             _mm256_permute2f128_ps(x, y, 0x31));
}
#endif

/* sc[g * KEYS + r] = q[g] . k[r] for r < n keys D apart (one KV head of one block). */
INLINE void row_scores(const float q[][MAX_D], int G, const float* k, int n, int D, float* sc) {
    int r = 0;
#ifdef ORDER
    for (; r + PARALLAX_VW <= n; r += PARALLAX_VW)
        for (int g = 0; g < G; g++) {
            vf a[PARALLAX_VW];
            for (int i = 0; i < PARALLAX_VW; i++)
                a[i] = dotv(q[g], k + (size_t)(r + ORDER(i)) * D, D);
            vstore(sc + g * KEYS + r, sum_lanes(a));
        }
#endif
    for (; r < n; r++)
        for (int g = 0; g < G; g++) sc[g * KEYS + r] = vsum(dotv(q[g], k + (size_t)r * D, D));
}

/* acc (D) = acc * corr + sum_j p[j] * v[j] over n rows D apart: up to PV_VECS vectors of
 * acc in registers at a time, so the keys' multiply-adds are independent chains. */
#define PV_VECS (PARALLAX_VW >= 16 ? 16 : 8)
INLINE void pv(float* acc, float corr, const float* p, const float* v, int n, int D) {
    for (int i0 = 0; i0 < D; i0 += PV_VECS * PARALLAX_VW) {
        int nv = (D - i0) / PARALLAX_VW < PV_VECS ? (D - i0) / PARALLAX_VW : PV_VECS;
        vf a[PV_VECS];
        for (int c = 0; c < nv; c++) a[c] = vload(acc + i0 + c * PARALLAX_VW) * corr;
        for (int j = 0; j < n; j++)
            for (int c = 0; c < nv; c++)
                a[c] += p[j] * vload(v + (size_t)j * D + i0 + c * PARALLAX_VW);
        for (int c = 0; c < nv; c++) vstore(acc + i0 + c * PARALLAX_VW, a[c]);
    }
}

/* Gemma 2's soft-capping of scores: s -> c * tanh(s / c), over rows of n, `stride` apart.
 * Out of line: the uncapped loops around its call stay as tight as without it. */
static __attribute__((noinline)) void cap_scores(float* s, int rows, int n, int stride,
                                                 float c) {
    float inv = 1.f / c;
    for (int g = 0; g < rows; g++)
        for (int j = 0; j < n; j++) s[(size_t)g * stride + j] = c * tanhf(s[(size_t)g * stride + j] * inv);
}

/* The first position a token at position pos attends to. */
static inline int first_key(int pos, int window) {
    return window > 0 && pos + 1 > window ? pos + 1 - window : 0;
}

/* What every work item reads. */
typedef struct {
    const float *q, *cos, *sin, *k_cache, *v_cache;
    const int32_t *block_tables, *context_lens, *qsl;
    float* out;
    long q_stride;
    int max_blocks, Hq, Hk, G, bs, window;
    float scale, softcap;
} Args;

/* One KV head's rows of block `i` of a sequence's table. */
#define HEAD_ROWS(cache, table, i) \
    ((cache) + ((size_t)(table)[i] * a->Hk + h) * a->bs * D)

/* Decode rows (few new tokens): query token t of sequence b over KV head h's G query heads.
 * Rounds of KEYS keys: scores of every key of the round (each K row read once for the G
 * heads, lanes summed 16 keys at a time), one online-softmax update per head, then p.V
 * (V rows from the cache lines prefetched while the round was scored). */
INLINE void attend_row(const Args* a, int b, int h, int t, int D) {
    int G = a->G, bs = a->bs, h2 = D / 2;
    int pos = a->context_lens[b] - (a->qsl[b + 1] - t);    /* causal: keys [lo, pos] */
    int lo = first_key(pos, a->window), keys = pos + 1;
    const int32_t* table = a->block_tables + (size_t)b * a->max_blocks;
    float qr[MAX_G][MAX_D], acc[MAX_G][MAX_D], sc[MAX_G][KEYS], mx[MAX_G], denom[MAX_G];
    for (int g = 0; g < G; g++) {
        rotate(a->q + t * a->q_stride + (size_t)(h * G + g) * D, a->cos + (size_t)t * h2,
               a->sin + (size_t)t * h2, a->scale, qr[g], D);
        for (int i = 0; i < D; i++) acc[g][i] = 0.f;
        mx[g] = -INFINITY;
        denom[g] = 0.f;
    }
    /* Rounds of KEYS keys from the block holding lo; the slots of that block before lo get
     * no score (-inf, after the cap) and are not read. */
    int a0 = lo - lo % bs, last = (keys - 1) / bs;
    prefetch(HEAD_ROWS(a->k_cache, table, a0 / bs), bs * D);
    for (int j0 = a0; j0 < keys; j0 += KEYS) {
        int n = keys - j0 < KEYS ? keys - j0 : KEYS;
        int skip = j0 == a0 ? lo - a0 : 0;           /* < bs */
        for (int j = 0; j < n; j += bs) {
            int blk = (j0 + j) / bs, m = n - j < bs ? n - j : bs;
            int r0 = j == 0 ? skip : 0;
            if (blk < last) prefetch(HEAD_ROWS(a->k_cache, table, blk + 1), bs * D);
            prefetch(HEAD_ROWS(a->v_cache, table, blk) + (size_t)r0 * D, (m - r0) * D);
            row_scores((const float(*)[MAX_D])qr, G,
                       HEAD_ROWS(a->k_cache, table, blk) + (size_t)r0 * D, m - r0, D,
                       &sc[0][j + r0]);
        }
        if (a->softcap > 0.f) cap_scores(&sc[0][0], G, n, KEYS, a->softcap);
        for (int g = 0; g < G; g++)
            for (int r = 0; r < skip; r++) sc[g][r] = -INFINITY;
        for (int g = 0; g < G; g++) {
            float corr = softmax_round(sc[g], n, &mx[g], &denom[g]);
            for (int j = 0; j < n; j += bs) {
                int m = n - j < bs ? n - j : bs, r0 = j == 0 ? skip : 0;
                pv(acc[g], j == 0 ? corr : 1.f, sc[g] + j + r0,
                   HEAD_ROWS(a->v_cache, table, (j0 + j) / bs) + (size_t)r0 * D, m - r0, D);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float* o = a->out + ((size_t)t * a->Hq + h * G + g) * D;
        float inv = 1.f / denom[g];
        for (int i = 0; i < D; i++) o[i] = acc[g][i] * inv;
    }
}

/* Prefill tiles: rows are (token, query head) pairs, the lanes of a vector, so every step
 * is vertical: scores S[key][row] = sum_d Qt[d][row] * k[key][d] (k broadcast), the
 * online softmax per lane, O^T[d][row] += sum_key P[key][row] * v[key][d]. NV vectors of
 * rows at a time, 4 keys (scores) or 4 dims (p.V) per pass: 4 NV accumulators. */
#define MAX_NV (PARALLAX_VW >= 16 ? 4 : 2)   /* accumulators within the 32 / 16 registers */

INLINE void tile_scores(const float* Qt, int RP, const float* k, int n, int D, float* S,
                        const int NV) {
    int r = 0;
    for (; r + 4 <= n; r += 4) {
        vf s0[MAX_NV], s1[MAX_NV], s2[MAX_NV], s3[MAX_NV];
        for (int v = 0; v < NV; v++) s0[v] = s1[v] = s2[v] = s3[v] = vzero();
        const float* k0 = k + (size_t)r * D;
        for (int d = 0; d < D; d++) {
            float x0 = k0[d], x1 = k0[D + d], x2 = k0[2 * D + d], x3 = k0[3 * D + d];
            for (int v = 0; v < NV; v++) {
                vf qv = vload(Qt + (size_t)d * RP + v * PARALLAX_VW);
                s0[v] += qv * x0; s1[v] += qv * x1; s2[v] += qv * x2; s3[v] += qv * x3;
            }
        }
        for (int v = 0; v < NV; v++) {
            vstore(S + (size_t)r * RP + v * PARALLAX_VW, s0[v]);
            vstore(S + (size_t)(r + 1) * RP + v * PARALLAX_VW, s1[v]);
            vstore(S + (size_t)(r + 2) * RP + v * PARALLAX_VW, s2[v]);
            vstore(S + (size_t)(r + 3) * RP + v * PARALLAX_VW, s3[v]);
        }
    }
    for (; r < n; r++) {
        vf s0[MAX_NV];
        for (int v = 0; v < NV; v++) s0[v] = vzero();
        for (int d = 0; d < D; d++) {
            float x = k[(size_t)r * D + d];
            for (int v = 0; v < NV; v++) s0[v] += vload(Qt + (size_t)d * RP + v * PARALLAX_VW) * x;
        }
        for (int v = 0; v < NV; v++) vstore(S + (size_t)r * RP + v * PARALLAX_VW, s0[v]);
    }
}

INLINE void tile_pv(float* Ot, int RP, const float* corr, const float* P, const float* vr,
                    int n, int D, const int NV) {
    for (int d = 0; d < D; d += 4) {
        vf o0[MAX_NV], o1[MAX_NV], o2[MAX_NV], o3[MAX_NV];
        for (int v = 0; v < NV; v++) {
            vf c = vload(corr + v * PARALLAX_VW);
            o0[v] = vload(Ot + (size_t)d * RP + v * PARALLAX_VW) * c;
            o1[v] = vload(Ot + (size_t)(d + 1) * RP + v * PARALLAX_VW) * c;
            o2[v] = vload(Ot + (size_t)(d + 2) * RP + v * PARALLAX_VW) * c;
            o3[v] = vload(Ot + (size_t)(d + 3) * RP + v * PARALLAX_VW) * c;
        }
        for (int r = 0; r < n; r++) {
            const float* x = vr + (size_t)r * D + d;
            float x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
            for (int v = 0; v < NV; v++) {
                vf p = vload(P + (size_t)r * RP + v * PARALLAX_VW);
                o0[v] += p * x0; o1[v] += p * x1; o2[v] += p * x2; o3[v] += p * x3;
            }
        }
        for (int v = 0; v < NV; v++) {
            vstore(Ot + (size_t)d * RP + v * PARALLAX_VW, o0[v]);
            vstore(Ot + (size_t)(d + 1) * RP + v * PARALLAX_VW, o1[v]);
            vstore(Ot + (size_t)(d + 2) * RP + v * PARALLAX_VW, o2[v]);
            vstore(Ot + (size_t)(d + 3) * RP + v * PARALLAX_VW, o3[v]);
        }
    }
}

/* The strips of at most MAX_NV row vectors of a tile, each with its accumulators in
 * registers (NV a constant in each call). */
#define STRIPS(CALL)                                                               \
    for (int v0 = 0; v0 < RP / PARALLAX_VW; v0 += MAX_NV) {                        \
        int nv_ = RP / PARALLAX_VW - v0 < MAX_NV ? RP / PARALLAX_VW - v0 : MAX_NV; \
        int o_ = v0 * PARALLAX_VW;                                                 \
        if (nv_ == 1) CALL(1);                                                     \
        else if (nv_ == 2) CALL(2);                                                \
        else if (MAX_NV > 2 && nv_ == 3) CALL(3);                                  \
        else CALL(MAX_NV);                                                         \
    }

/* Tokens [t0, t0 + nt) of sequence b (nt * G <= TROWS) over KV head h. */
INLINE void attend_tile(const Args* a, int b, int h, int t0, int nt, int D) {
    int G = a->G, bs = a->bs, h2 = D / 2, R = nt * G;
    int RP = (R + PARALLAX_VW - 1) / PARALLAX_VW * PARALLAX_VW;
    int p0 = a->context_lens[b] - (a->qsl[b + 1] - t0), p1 = p0 + nt - 1;   /* positions */
    const int32_t* table = a->block_tables + (size_t)b * a->max_blocks;
    float Qt[MAX_D * TROWS], Ot[MAX_D * TROWS], S[SUBK * TROWS];
    float mx[TROWS], ms[TROWS], corr[TROWS], denom[TROWS];
    int rpos[TROWS], rlo[TROWS];
    for (int i = 0; i < RP; i++) {
        int tt = i < R ? i / G : nt - 1;                 /* padding rows: the last token's */
        rpos[i] = p0 + tt;
        rlo[i] = first_key(rpos[i], a->window);
        mx[i] = -INFINITY;
        denom[i] = 0.f;
        float qr[MAX_D];
        if (i < R) {
            int t = t0 + tt;
            rotate(a->q + t * a->q_stride + (size_t)(h * G + i % G) * D, a->cos + (size_t)t * h2,
                   a->sin + (size_t)t * h2, a->scale, qr, D);
        } else {
            for (int d = 0; d < D; d++) qr[d] = 0.f;
        }
        for (int d = 0; d < D; d++) {
            Qt[(size_t)d * RP + i] = qr[d];
            Ot[(size_t)d * RP + i] = 0.f;
        }
    }
    int lo = rlo[0], lo1 = rlo[RP - 1];       /* keys [lo, p1]; all rows see [lo1, p0] */
    for (int blk = lo / bs; blk <= p1 / bs; blk++) {
        const float* kb = HEAD_ROWS(a->k_cache, table, blk);
        const float* vb = HEAD_ROWS(a->v_cache, table, blk);
        if (blk < p1 / bs) {
            prefetch(HEAD_ROWS(a->k_cache, table, blk + 1), bs * D);
            prefetch(HEAD_ROWS(a->v_cache, table, blk + 1), bs * D);
        }
        int k0 = blk * bs > lo ? blk * bs : lo;             /* keys [k0, k1) of this block */
        int k1 = (blk + 1) * bs < p1 + 1 ? (blk + 1) * bs : p1 + 1;
        for (int s0 = k0; s0 < k1; s0 += SUBK) {
            int n = k1 - s0 < SUBK ? k1 - s0 : SUBK;
            const float* kr = kb + (size_t)(s0 - blk * bs) * D;
            const float* vr = vb + (size_t)(s0 - blk * bs) * D;
#define SCORES(NV) tile_scores(Qt + o_, RP, kr, n, D, S + o_, NV)
            STRIPS(SCORES)
#undef SCORES
            if (a->softcap > 0.f) cap_scores(S, n, RP, RP, a->softcap);
            if (s0 + n - 1 > p0 || s0 < lo1)              /* some rows do not see some keys */
                for (int r = 0; r < n; r++)
                    for (int i = 0; i < RP; i++)
                        if (s0 + r > rpos[i] || s0 + r < rlo[i]) S[(size_t)r * RP + i] = -INFINITY;
            /* The online softmax, lane-wise: a row that has seen only masked keys keeps
             * max -inf and contributes exp(-inf) = 0. */
            for (int r = 0; r < n; r++)
                for (int i = 0; i < RP; i++) {
                    float s = S[(size_t)r * RP + i];
                    ms[i] = r == 0 ? (s > mx[i] ? s : mx[i]) : (s > ms[i] ? s : ms[i]);
                }
            #pragma omp simd
            for (int i = 0; i < RP; i++) {
                float m = ms[i] == -INFINITY ? 0.f : ms[i];
                corr[i] = expf(mx[i] - m);
                mx[i] = ms[i];
                ms[i] = m;
                denom[i] *= corr[i];
            }
            for (int r = 0; r < n; r++) {
                float* p = S + (size_t)r * RP;
                #pragma omp simd
                for (int i = 0; i < RP; i++) {
                    p[i] = expf(p[i] - ms[i]);
                    denom[i] += p[i];
                }
            }
#define PV(NV) tile_pv(Ot + o_, RP, corr + o_, S + o_, vr, n, D, NV)
            STRIPS(PV)
#undef PV
        }
    }
    for (int i = 0; i < R; i++) {
        float* o = a->out + ((size_t)(t0 + i / G) * a->Hq + h * G + i % G) * D;
        float inv = 1.f / denom[i];
        for (int d = 0; d < D; d++) o[d] = Ot[(size_t)d * RP + i] * inv;
    }
}

/* Work item: sequence b's query tokens [c0, c1) over KV head h; cost ~ query-key pairs. */
typedef struct { int b, c0, c1, h; long cost; } Item;

static int by_cost(const void* x, const void* y) {
    long a = ((const Item*)x)->cost, b = ((const Item*)y)->cost;
    return a < b ? 1 : a > b ? -1 : 0;
}

/* Item `it` with D a constant where it is a common head dim (unrolled inner loops). */
INLINE void run_item(const Args* a, const Item* it, int D) {
    int tile = TROWS / a->G;   /* tokens per tile */
    if ((it->c1 - it->c0) * a->G < PARALLAX_VW) {   /* too few rows to fill a vector: rows */
        for (int t = it->c0; t < it->c1; t++) attend_row(a, it->b, it->h, t, D);
        return;
    }
    for (int t = it->c0; t < it->c1; t += tile)
        attend_tile(a, it->b, it->h, t, it->c1 - t < tile ? it->c1 - t : tile, D);
}

static void run_item_any(const Args* a, const Item* it, int D) {
    if (D == 64) run_item(a, it, 64);
    else if (D == 128) run_item(a, it, 128);
    else run_item(a, it, D);
}

enum { OK = 0, BAD_SLOT = -1, BAD_LENGTH = -2, BAD_BLOCK = -3, BAD_QUERY = -4, BAD_SHAPE = -5 };

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
               1.f, k_cache + row, D);
        const float* vn = v + t * v_stride + (size_t)h * D;
        for (int i = 0; i < D; i++) v_cache[row + i] = vn[i];
    }

    /* 2. Work items (sequence, chunk of its queries, KV head), the costliest first, so
     * that the threads taking them in turn end together. */
    int n_items = 0;
    long macs = 0;
    for (int b = 0; b < B; b++) {
        n_items += (qsl[b + 1] - qsl[b] + QCHUNK - 1) / QCHUNK * Hk;
        int len = context_lens[b];
        macs += (long)(qsl[b + 1] - qsl[b]) * (window > 0 && window < len ? window : len) * Hq * D;
    }
    (void)macs;
    Item few[256];
    Item* items = n_items <= 256 ? few : malloc(sizeof(Item) * (size_t)n_items);
    if (!items) return BAD_SHAPE;
    int w = 0;
    for (int b = 0; b < B; b++)
        for (int c = qsl[b]; c < qsl[b + 1]; c += QCHUNK) {
            int c1 = c + QCHUNK < qsl[b + 1] ? c + QCHUNK : qsl[b + 1];
            int mid = context_lens[b] - (qsl[b + 1] - (c + c1) / 2);   /* middle position */
            long cost = (long)(c1 - c) * (mid + 1 - first_key(mid, window));
            for (int h = 0; h < Hk; h++) items[w++] = (Item){b, c, c1, h, cost};
        }
    if (n_items > 1) qsort(items, (size_t)n_items, sizeof(Item), by_cost);
    Args a = {q, cos, sin, k_cache, v_cache, block_tables, context_lens, qsl, out, q_stride,
              max_blocks, Hq, Hk, G, bs, window, scale, softcap};

    #pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) \
        if (macs >= MIN_PARALLEL_MACS)
    for (int it = 0; it < n_items; it++) run_item_any(&a, &items[it], D);
    if (items != few) free(items);
    return OK;
}
