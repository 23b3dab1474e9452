/* GGUF block-weight matmuls with 8-bit activations, as llama.cpp computes them on the CPU:
 * y (M, N) = x (M, K) @ W^T, x and y fp32, W in its GGUF blocks of 32 (q8_0_f32.c has the
 * layouts; Q4_1: 20 bytes, fp16 d, fp16 m, 16 bytes of nibbles; weight = q * d + m) or
 * K-quant super-blocks of 256 (Q4_K, Q6_K: layouts below, 8 sub-blocks of 32 each).
 *
 * Each row of x is first quantized once per call, block by block (32 values), as ggml's
 * quantize_row_q8_0 does on x86 (its AVX/AVX2 path, what llama.cpp's CPU matmuls run):
 *   dx = fp16(amax / 127) (the block's fp16 scale, rounded to nearest even and used as
 *   that fp16 value), qx = rint(x * (127 / amax)) in [-127, 127] (0 where amax is 0),
 * the torch twin ops/reference.py:quantize_q8 bit for bit. A block's product is then an
 * integer dot product of 32 weight codes with 32 activation codes, scaled once by both
 * scales in fp32:
 *   Q8_0: d * dx * sum(q * qx)
 *   Q4_0: d * dx * (sum(q * qx) - 8 * sum(qx))      q: the 4-bit code, 0..15
 *   Q4_1: d * dx * sum(q * qx) + m * sx
 * where Q4_1's x blocks are ggml's block_q8_1 (its x86 quantize_row_q8_1, llama.cpp's
 * vec_dot_type for Q4_1): the same codes and dx, plus sx = fp16((amax / 127) * sum(qx)), the
 * scale taken in fp32 before rounding (qrow.ms; not dx * sum(qx)). So the result equals
 * the twin (reference.linear_q8_values) and ggml's dot up to fp32 summation order. x86 (avx2 and avx512 builds): 256-bit integer dots, one block a vector,
 * vpmaddubsw (unsigned x signed bytes) + vpmaddwd; Q8_0's signed weights go through the
 * sign trick (|q| times qx with q's sign), which keeps every pair sum within int16. The
 * generic build: plain C loops the compiler vectorizes.
 *
 * K-quants take x as ggml's block_q8_K instead (quantize_row_k; tile4_k below).
 *
 * With VNNI (avx512vnni, avxvnni builds) the byte dot products are one vpdpbusd.
 *
 * Decode (Q8_0, Q4_0, Q4_1; up to ROW_KERNEL_M rows of x): row kernels stream each thread's
 * contiguous range of weight rows front to back (row_q; 512-bit row_q512 with AVX512-VNNI).
 * Otherwise tiles: NN weight rows x MM rows of x, each weight block unpacked once per tile;
 * blocks of weight rows are split over OpenMP threads. K must be a multiple of 32
 * (K-quants: 256).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "isa.h"

#define QK 32

/* One row of x as 8-bit blocks: codes, scale and code sum per block. */
typedef struct {
    const int8_t* q;      /* K codes */
    const float* d;       /* K / 32 scales (Q8_K: K / 256) */
    const int32_t* s;     /* K / 32 sums of the codes */
    const float* ms;      /* Q8_1: K / 32 fp16(d * sum) as fp32 (block_q8_1's s) */
    const int16_t* bs;    /* Q8_K: K / 16 sums of the codes (block_q8_K's bsums) */
    const int8_t* qn;     /* the codes in nibble order (Q4 formats, AVX512-VNNI; else q) */
} qrow;

/* Nibble order: per group of 4 blocks, the first halves (elements 0-15) of the 4 blocks,
 * then their second halves, so that one 64-byte vector of a Q4 weight's low nibbles (or
 * high nibbles) of 4 blocks lines up with 64 codes of x; blocks past the last whole group
 * stay as they are. */
static __attribute__((unused)) void nibble_order(const int8_t* q, int nb, int8_t* out) {
    int b = 0;
    for (; b + 4 <= nb; b += 4)
        for (int j = 0; j < 4; j++) {
            memcpy(out + (size_t)b * QK + 16 * j, q + (size_t)(b + j) * QK, 16);
            memcpy(out + (size_t)b * QK + 64 + 16 * j, q + (size_t)(b + j) * QK + 16, 16);
        }
    memcpy(out + (size_t)b * QK, q + (size_t)b * QK, (size_t)(nb - b) * QK);
}

/* ggml's block_q8_0 / block_q8_1 rule (x86 quantize_row_q8_0 / _q8_1) for one row; ms, where
 * not NULL, gets block_q8_1's s: fp16(d * sum), d = amax / 127 in fp32 (not its fp16). */
static void quantize_row(const float* x, int K, int8_t* q, float* d, int32_t* s, float* ms) {
    for (int b = 0; b < K / QK; b++) {
        const float* xb = x + (size_t)b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) {   /* fmaxf's NaN rule, but vectorized (not a libm call) */
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < QK; i++) {
            int v = (int)rintf(xb[i] * id);
            q[(size_t)b * QK + i] = (int8_t)v;
            sum += v;
        }
        d[b] = round_to_half(amax / 127.0f);   /* the fp16 d of ggml's block_q8_0 */
        s[b] = sum;
        if (ms != NULL) ms[b] = round_to_half(amax / 127.0f * (float)sum);
    }
}

#define QKK 256

/* ggml's block_q8_K rule (quantize_row_q8_K_ref, what its x86 build runs) for one row, per
 * super-block of 256: max = the first x of largest |x|, iscale = -127 / max, code =
 * min(127, round-half-even(iscale * x)), d = 1 / iscale (fp32; negative where max > 0),
 * bs = the codes' sums per 16; an all-zero block: d 0, codes 0 (sums 0). */
static void quantize_row_k(const float* x, int K, int8_t* q, float* d, int16_t* bs) {
    for (int b = 0; b < K / QKK; b++) {
        const float* xb = x + (size_t)b * QKK;
        int8_t* qb = q + (size_t)b * QKK;
        int16_t* sb = bs + (size_t)b * (QKK / 16);
        float amax = 0.0f;
        for (int i = 0; i < QKK; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        if (amax == 0.0f) {
            d[b] = 0.0f;
            memset(qb, 0, QKK);
            memset(sb, 0, sizeof(int16_t) * (QKK / 16));
            continue;
        }
        int i0 = 0;
        while (fabsf(xb[i0]) != amax) i0++;   /* ggml keeps the first of equal |x| */
        float iscale = -127.0f / xb[i0];
        for (int i = 0; i < QKK; i++) {
            int v = (int)rintf(iscale * xb[i]);
            qb[i] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < QKK / 16; j++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += qb[16 * j + i];
            sb[j] = (int16_t)sum;
        }
        d[b] = 1.0f / iscale;
    }
}

enum { FMT_Q8_0, FMT_Q4_0, FMT_Q4_1, FMT_Q4_K, FMT_Q6_K };
/* Bytes per block of 32 (Q8_0, Q4_0, Q4_1) or per super-block of 256 (Q4_K, Q6_K). */
static const int BLOCK_BYTES[] = {34, 18, 20, 144, 210};
static const int BLOCK_ELEMS[] = {32, 32, 32, 256, 256};

#if defined(__AVX2__)
#include <immintrin.h>

typedef __m256i wcodes;   /* a block's 32 weight codes, unsigned for Q4 (|q| for Q8_0) */

static inline wcodes load_codes(int fmt, const uint8_t* blk) {
    if (fmt == FMT_Q8_0) return _mm256_loadu_si256((const __m256i*)(blk + 2));
    __m128i lo = _mm_loadu_si128((const __m128i*)(blk + (fmt == FMT_Q4_1 ? 4 : 2)));
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

/* 8 int32 partial sums of w . qx over one block. */
static inline __m256i block_dot(int fmt, wcodes w, __m256i qx) {
    __m256i u = w, s = qx;
    if (fmt == FMT_Q8_0) {      /* signed x signed: |w| (unsigned) times qx with w's sign */
        u = _mm256_sign_epi8(w, w);
        s = _mm256_sign_epi8(qx, w);
    }
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)   /* one instruction, no int16 step */
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

typedef __m256 facc;
static inline facc facc_zero(void) { return _mm256_setzero_ps(); }

/* acc += (w . qx) * scale, with Q4_0's -8 * sum(qx) spread over the 8 lanes (sx each). */
static inline facc block_fma(int fmt, facc acc, wcodes w, __m256i qx, int32_t sx, float scale) {
    __m256i p = block_dot(fmt, w, qx);
    if (fmt == FMT_Q4_0) p = _mm256_sub_epi32(p, _mm256_set1_epi32(sx));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc);
}

static inline __m256i load_qx(const int8_t* q) { return _mm256_loadu_si256((const __m256i*)q); }

#else   /* generic */

typedef struct { uint8_t v[QK]; int8_t sgn[QK]; } wcodes;
typedef float facc;
typedef const int8_t* qxvec;

static inline wcodes load_codes(int fmt, const uint8_t* blk) {
    wcodes w;
    if (fmt == FMT_Q8_0) {
        memcpy(w.sgn, blk + 2, QK);
    } else {
        const uint8_t* p = blk + (fmt == FMT_Q4_1 ? 4 : 2);
        for (int i = 0; i < QK / 2; i++) {
            w.v[i] = p[i] & 15;
            w.v[i + QK / 2] = p[i] >> 4;
        }
    }
    return w;
}

static inline facc facc_zero(void) { return 0.0f; }
static inline float hsum(facc v) { return v; }
static inline qxvec load_qx(const int8_t* q) { return q; }

static inline facc block_fma(int fmt, facc acc, wcodes w, qxvec qx, int32_t sx, float scale) {
    int32_t p = 0;
    if (fmt == FMT_Q8_0)
        for (int i = 0; i < QK; i++) p += (int32_t)w.sgn[i] * qx[i];
    else
        for (int i = 0; i < QK; i++) p += (int32_t)w.v[i] * qx[i];
    if (fmt == FMT_Q4_0) p -= 8 * sx;
    return acc + (float)p * scale;
}
#endif

/* NN weight rows (row_bytes apart) times MM quantized rows of x -> y[m * N + r]. */
static inline __attribute__((always_inline)) void tile(int fmt, int NN, int MM, const qrow* xr,
                                                       int nb, const uint8_t* w,
                                                       size_t row_bytes, float* y, int N) {
    facc acc[4][4];
    float mterm[4][4];
    int bb = BLOCK_BYTES[fmt];
    for (int m = 0; m < MM; m++)
        for (int r = 0; r < NN; r++) {
            acc[m][r] = facc_zero();
            mterm[m][r] = 0.0f;
        }
    for (int b = 0; b < nb; b++) {
        wcodes wc[4];
        float d[4], mw[4];
        for (int r = 0; r < NN; r++) {
            const uint8_t* blk = w + (size_t)r * row_bytes + (size_t)b * bb;
            wc[r] = load_codes(fmt, blk);
            d[r] = half_to_float(blk);
            mw[r] = fmt == FMT_Q4_1 ? half_to_float(blk + 2) : 0.0f;
        }
        for (int m = 0; m < MM; m++) {
            float dx = xr[m].d[b];
            int32_t sx = xr[m].s[b];
            __typeof__(load_qx(xr[m].q)) qx = load_qx(xr[m].q + (size_t)b * QK);
            for (int r = 0; r < NN; r++) {
                acc[m][r] = block_fma(fmt, acc[m][r], wc[r], qx, sx, d[r] * dx);
                if (fmt == FMT_Q4_1) mterm[m][r] += mw[r] * xr[m].ms[b];
            }
        }
    }
    for (int m = 0; m < MM; m++)
        for (int r = 0; r < NN; r++) y[(size_t)m * N + r] = hsum(acc[m][r]) + mterm[m][r];
}

#if defined(__AVX2__)
/* The 4-weight-row tile on x86: the 4 rows' int32 partial sums of a block are folded into
 * one vector by two vphaddd (lanes: rows 0-3 of the low half, rows 0-3 of the high half), so
 * one conversion and one fma (by the 4 rows' scales times dx) serve 4 rows, and only MM
 * accumulators are live. Same values as tile(); the two halves are added at the end. */
static inline __attribute__((always_inline)) void tile4(int fmt, int MM, const qrow* xr, int nb,
                                                        const uint8_t* w, size_t row_bytes,
                                                        float* y, int N) {
    __m256 acc[4];
    int bb = BLOCK_BYTES[fmt];
    for (int m = 0; m < MM; m++) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t* blk = w + (size_t)b * bb;
        wcodes wc[4];
        uint16_t h[4], hm[4];
        for (int r = 0; r < 4; r++) {
            wc[r] = load_codes(fmt, blk + (size_t)r * row_bytes);
            /* the next tile's rows: without, Q8_0 streams ~5 GB/s from DRAM, with ~9 */
            _mm_prefetch((const char*)(blk + (size_t)(r + 4) * row_bytes), _MM_HINT_T0);
            memcpy(&h[r], blk + (size_t)r * row_bytes, 2);
            if (fmt == FMT_Q4_1) memcpy(&hm[r], blk + (size_t)r * row_bytes + 2, 2);
        }
        __m128 d4 = _mm_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2],
                                                (short)h[3], 0, 0, 0, 0));
        __m256 d8 = _mm256_set_m128(d4, d4);
        __m256 m8 = _mm256_setzero_ps();
        if (fmt == FMT_Q4_1) {
            __m128 m4 = _mm_cvtph_ps(_mm_setr_epi16((short)hm[0], (short)hm[1], (short)hm[2],
                                                    (short)hm[3], 0, 0, 0, 0));
            m8 = _mm256_set_m128(m4, m4);
        }
        for (int m = 0; m < MM; m++) {
            __m256i qx = load_qx(xr[m].q + (size_t)b * QK);
            __m256i p01 = _mm256_hadd_epi32(block_dot(fmt, wc[0], qx), block_dot(fmt, wc[1], qx));
            __m256i p23 = _mm256_hadd_epi32(block_dot(fmt, wc[2], qx), block_dot(fmt, wc[3], qx));
            __m256i p = _mm256_hadd_epi32(p01, p23);
            if (fmt == FMT_Q4_0) p = _mm256_sub_epi32(p, _mm256_set1_epi32(4 * xr[m].s[b]));
            float dx = xr[m].d[b];
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                     _mm256_mul_ps(d8, _mm256_set1_ps(dx)), acc[m]);
            if (fmt == FMT_Q4_1)   /* m * fp16(dx * sum(qx)), half in each half of the vector */
                acc[m] = _mm256_fmadd_ps(m8, _mm256_set1_ps(0.5f * xr[m].ms[b]), acc[m]);
        }
    }
    for (int m = 0; m < MM; m++)
        _mm_storeu_ps(y + (size_t)m * N, _mm_add_ps(_mm256_castps256_ps128(acc[m]),
                                                    _mm256_extractf128_ps(acc[m], 1)));
}
#endif

#if defined(__AVX2__)
/* The fp16 at byte `off` of 4 consecutive blocks (bb bytes apart) as 4 fp32. */
static inline __m128 halves4(const uint8_t* blk, int bb, int off) {
    uint16_t h[4];
    for (int j = 0; j < 4; j++) memcpy(&h[j], blk + (size_t)j * bb + off, 2);
    return _mm_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3],
                                       0, 0, 0, 0));
}

/* Blocks [b, nb) of a weight row one at a time (the row kernels' last nb % 4 blocks, x in
 * natural order) into acc[m] (lanes) and, Q4_1's m * ms (qrow), mtail[m]. */
static inline __attribute__((always_inline)) void tail_blocks(int fmt, int MM, const qrow* xr,
                                                              int b, int nb, const uint8_t* w,
                                                              __m256* acc, float* mtail) {
    int bb = BLOCK_BYTES[fmt];
    for (; b < nb; b++) {
        const uint8_t* blk = w + (size_t)b * bb;
        wcodes wc = load_codes(fmt, blk);
        float d = half_to_float(blk), mw = fmt == FMT_Q4_1 ? half_to_float(blk + 2) : 0.0f;
        for (int m = 0; m < MM; m++) {
            float dx = xr[m].d[b];
            int32_t sx = xr[m].s[b];
            acc[m] = block_fma(fmt, acc[m], wc, load_qx(xr[m].q + (size_t)b * QK), sx, d * dx);
            if (fmt == FMT_Q4_1) mtail[m] += mw * xr[m].ms[b];
        }
    }
}

/* One weight row by MM quantized rows of x, for few rows of x (decode): the row is read
 * front to back, so each thread streams one contiguous range of weight rows (what the
 * hardware prefetcher follows best: ~2x tile4's GB/s on Q8_0 from DRAM; software prefetch
 * on top measured slower), 4 blocks at a time. The 4 blocks' int32 partial sums
 * are folded into one vector by two vphaddd as in tile4 (lanes: blocks 0-3 of the low half,
 * blocks 0-3 of the high half), so one conversion and one fma (by the 4 blocks' weight
 * scales times the 4 dx, both loaded as vectors) serve 4 blocks. Same values as tile(). */
static inline __attribute__((always_inline, unused)) void row_q(int fmt, int MM, const qrow* xr,
                                                                int nb, const uint8_t* w,
                                                                __m256* out) {
    __m256 acc[4];
    __m128 mt[4];
    float mtail[4];
    int bb = BLOCK_BYTES[fmt];
    for (int m = 0; m < MM; m++) {
        acc[m] = _mm256_setzero_ps();
        mt[m] = _mm_setzero_ps();
        mtail[m] = 0.0f;
    }
    int b = 0;
    for (; b + 4 <= nb; b += 4) {
        const uint8_t* blk = w + (size_t)b * bb;
        wcodes wc[4];
        for (int j = 0; j < 4; j++) wc[j] = load_codes(fmt, blk + (size_t)j * bb);
        __m128 d4 = halves4(blk, bb, 0);
        __m128 m4 = fmt == FMT_Q4_1 ? halves4(blk, bb, 2) : _mm_setzero_ps();
        for (int m = 0; m < MM; m++) {
            const int8_t* q = xr[m].q + (size_t)b * QK;
            __m256i p01 = _mm256_hadd_epi32(block_dot(fmt, wc[0], load_qx(q)),
                                            block_dot(fmt, wc[1], load_qx(q + QK)));
            __m256i p23 = _mm256_hadd_epi32(block_dot(fmt, wc[2], load_qx(q + 2 * QK)),
                                            block_dot(fmt, wc[3], load_qx(q + 3 * QK)));
            __m256i p = _mm256_hadd_epi32(p01, p23);
            __m128i sx = _mm_loadu_si128((const __m128i*)(xr[m].s + b));
            if (fmt == FMT_Q4_0) {   /* -8 * sum(qx): half in each half of the vector */
                __m128i s4 = _mm_slli_epi32(sx, 2);
                p = _mm256_sub_epi32(p, _mm256_set_m128i(s4, s4));
            }
            __m128 dx = _mm_loadu_ps(xr[m].d + b);
            __m128 sc = _mm_mul_ps(d4, dx);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set_m128(sc, sc), acc[m]);
            if (fmt == FMT_Q4_1)   /* m * fp16(dx * sum(qx)) */
                mt[m] = _mm_fmadd_ps(m4, _mm_loadu_ps(xr[m].ms + b), mt[m]);
        }
    }
    tail_blocks(fmt, MM, xr, b, nb, w, acc, mtail);
    for (int m = 0; m < MM; m++)   /* every lane adds to the row's sum */
        out[m] = _mm256_add_ps(acc[m], _mm256_insertf128_ps(
            _mm256_setzero_ps(), _mm_add_ss(mt[m], _mm_set_ss(mtail[m])), 0));
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define ROW_512 1
/* row_q in 512-bit vectors with vpdpbusd (unsigned x signed bytes, 4 per int32 lane), 4
 * blocks per step:
 *   Q8_0: 2 blocks a vector; the signed codes as unsigned w + 128 (one xor), so the dot is
 *         sum(w * qx) + 128 * sum(qx): the second term is taken out in fp32 below;
 *   Q4_0, Q4_1: the 4 blocks' low nibbles in one vector and their high nibbles in another,
 *         against x in nibble order (qrow.qn): lanes 4j..4j+3 hold block j.
 * The per-block scales are spread over their lanes by one vpermps. The x-only terms of a
 * block, d * dx * sum(qx) times -128 (Q8_0) or -8 (Q4_0), and Q4_1's m * ms (qrow),
 * collect in a 4-lane accumulator: one fma per 4 blocks. */
static inline __attribute__((always_inline)) void row_q512(int fmt, int MM, const qrow* xr,
                                                           int nb, const uint8_t* w,
                                                           __m256* out) {
    __m512 acc[4], acc2[4];
    __m128 accx[4];
    float tail[4];
    int bb = BLOCK_BYTES[fmt];
    for (int m = 0; m < MM; m++) {
        acc[m] = acc2[m] = _mm512_setzero_ps();
        accx[m] = _mm_setzero_ps();
        tail[m] = 0.0f;
    }
    const __m512i lo4 = _mm512_set1_epi8(15);
    const __m512i by8 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i by4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    int b = 0;
    for (; b + 4 <= nb; b += 4) {
        const uint8_t* blk = w + (size_t)b * bb;
        __m512i w0, w1 = _mm512_setzero_si512();
        if (fmt == FMT_Q8_0) {
            const __m512i x80 = _mm512_set1_epi8((char)0x80);
            w0 = _mm512_inserti64x4(_mm512_castsi256_si512(
                     _mm256_loadu_si256((const __m256i*)(blk + 2))),
                     _mm256_loadu_si256((const __m256i*)(blk + bb + 2)), 1);
            w1 = _mm512_inserti64x4(_mm512_castsi256_si512(
                     _mm256_loadu_si256((const __m256i*)(blk + 2 * bb + 2))),
                     _mm256_loadu_si256((const __m256i*)(blk + 3 * bb + 2)), 1);
            w0 = _mm512_xor_si512(w0, x80);
            w1 = _mm512_xor_si512(w1, x80);
        } else {
            int off = fmt == FMT_Q4_1 ? 4 : 2;
            __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(blk + off)));
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(blk + bb + off)), 1);
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(blk + 2 * bb + off)), 2);
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(blk + 3 * bb + off)), 3);
            w0 = _mm512_and_si512(v, lo4);
            w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
        }
        __m128 d4 = halves4(blk, bb, 0);
        __m128 e4 = fmt == FMT_Q4_1 ? halves4(blk, bb, 2) : d4;   /* x-only term's factor */
        for (int m = 0; m < MM; m++) {
            __m128 dx = _mm_loadu_ps(xr[m].d + b);
            __m512 sc = _mm512_castps128_ps512(_mm_mul_ps(d4, dx));
            __m128 dsx = fmt == FMT_Q4_1 ? _mm_loadu_ps(xr[m].ms + b) : _mm_mul_ps(
                dx, _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i*)(xr[m].s + b))));
            accx[m] = _mm_fmadd_ps(e4, dsx, accx[m]);
            if (fmt == FMT_Q8_0) {
                const int8_t* q = xr[m].q + (size_t)b * QK;
                __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0,
                                                 _mm512_loadu_si512((const void*)q));
                __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1,
                                                 _mm512_loadu_si512((const void*)(q + 64)));
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_permutexvar_ps(by8, sc),
                                         acc[m]);
                __m512 sc23 = _mm512_castps128_ps512(_mm_movehl_ps(_mm512_castps512_ps128(sc),
                                                                   _mm512_castps512_ps128(sc)));
                acc2[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1),
                                          _mm512_permutexvar_ps(by8, sc23), acc2[m]);
            } else {
                const int8_t* q = xr[m].qn + (size_t)b * QK;
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0,
                                                _mm512_loadu_si512((const void*)q));
                p = _mm512_dpbusd_epi32(p, w1, _mm512_loadu_si512((const void*)(q + 64)));
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(by4, sc),
                                         acc[m]);
            }
        }
    }
    /* the last nb % 4 blocks: as row_q (x in natural order) */
    __m256 acct[4];
    for (int m = 0; m < MM; m++) acct[m] = _mm256_setzero_ps();
    tail_blocks(fmt, MM, xr, b, nb, w, acct, tail);
    __m128 xf = _mm_set1_ps(fmt == FMT_Q8_0 ? -128.0f : fmt == FMT_Q4_0 ? -8.0f : 1.0f);
    for (int m = 0; m < MM; m++) {   /* every lane adds to the row's sum */
        __m512 a = _mm512_add_ps(acc[m], acc2[m]);
        __m256 v = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
        __m128 x = _mm_fmadd_ps(xf, accx[m], _mm_set_ss(tail[m]));
        out[m] = _mm256_add_ps(_mm256_add_ps(v, acct[m]),
                               _mm256_insertf128_ps(_mm256_setzero_ps(), x, 0));
    }
}
#define ROW_KERNEL row_q512
#else
#define ROW_KERNEL row_q
#endif

/* Up to 8 weight rows (row_bytes apart), one after the other, by MM rows of x: each row's
 * lanes are summed with the other rows' (vphaddd tree), so the horizontal sums, a long
 * dependent chain, are paid once per 8 rows instead of once per row. */
static inline __attribute__((always_inline)) void rows8(int fmt, int MM, const qrow* xr, int nb,
                                                        const uint8_t* w, size_t row_bytes,
                                                        int rows, float* y, int N) {
    __m256 a[4][8];
    for (int r = 0; r < 8; r++) {
        __m256 out[4];
        if (r < rows) ROW_KERNEL(fmt, MM, xr, nb, w + (size_t)r * row_bytes, out);
        for (int m = 0; m < MM; m++) a[m][r] = r < rows ? out[m] : _mm256_setzero_ps();
    }
    for (int m = 0; m < MM; m++) {
        __m256 t0 = _mm256_hadd_ps(a[m][0], a[m][1]), t1 = _mm256_hadd_ps(a[m][2], a[m][3]);
        __m256 t2 = _mm256_hadd_ps(a[m][4], a[m][5]), t3 = _mm256_hadd_ps(a[m][6], a[m][7]);
        __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
        /* u0: rows 0-3 over the low lanes, then over the high lanes; u1: rows 4-7 */
        __m256 v = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                 _mm256_permute2f128_ps(u0, u1, 0x31));
        if (rows == 8) {
            _mm256_storeu_ps(y + (size_t)m * N, v);
        } else {
            float t[8];
            _mm256_storeu_ps(t, v);
            memcpy(y + (size_t)m * N, t, sizeof(float) * (size_t)rows);
        }
    }
}

/* Row kernels for 1..4 rows of x, per format (the 32-element formats only). */
typedef void (*row_fn)(const qrow*, int, const uint8_t*, size_t, int, float*, int);
#define ROW_FN(F, MM)                                                                        \
static void row_##F##_##MM(const qrow* xr, int nb, const uint8_t* w, size_t row_bytes,     \
                           int rows, float* y, int N) {                                      \
    rows8(FMT_##F, MM, xr, nb, w, row_bytes, rows, y, N);                                    \
}
#define ROWS(F)                                                                              \
ROW_FN(F, 1) ROW_FN(F, 2) ROW_FN(F, 3) ROW_FN(F, 4)                                          \
static const row_fn ROWS_##F[4] = {row_##F##_1, row_##F##_2, row_##F##_3, row_##F##_4};
ROWS(Q8_0)
ROWS(Q4_0)
ROWS(Q4_1)
#endif

/* ---- K-quants: super-blocks of 256 = 8 sub-blocks of 32, against ggml's block_q8_K (one
 * fp32 scale dx per 256, quantize_row_k), as its vec_dot_q4_K_q8_K / _q6_K_q8_K compute:
 * per super-block an exact int32 sum of the scaled sub-block dots, scaled once in fp32.
 * Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc[8] and mins m[8], 128
 *   bytes of nibbles (sub-block j: bytes 32 * (j / 2).., low nibble for even j, high for
 *   odd); weight = d * sc[j] * q - dmin * m[j]. Per super-block:
 *     d * dx * sum_j sc[j] * (q_j . qx_j)  -  dmin * dx * sum_j m[j] * sum(qx_j)
 * Q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one per
 *   16 weights), fp16 d; weight = d * scales[i / 16] * (q - 32), q in 0..63. Per super-block:
 *     d * dx * (sum_i scales[i] * (q_i . qx_i) - 32 * sum_i scales[i] * bsum_i)   (i: 16 weights)
 *   the -32 taken through the bsums in int32, so the codes stay unsigned (vpdpbusd /
 *   vpmaddubsw) and the sum is exact.
 * Layouts as gguf-py's gguf.quants (the twins' oracle). */

/* Q4_K's 6-bit scales sc[0..7] and mins m[0..7] (bytes, j = 0 lowest) from its 12 bytes:
 * sub-blocks 0-3 keep 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 take 4 bits from
 * bytes 8-11 and the top 2 bits of bytes 0-3 (scales) or 4-7 (mins). */
static inline void q4_k_scales_mins(const uint8_t* s12, uint64_t* sc, uint64_t* mn) {
    uint32_t a, b, c;
    memcpy(&a, s12, 4);
    memcpy(&b, s12 + 4, 4);
    memcpy(&c, s12 + 8, 4);
    uint32_t sc_hi = (c & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4);
    uint32_t mn_hi = ((c >> 4) & 0x0f0f0f0fu) | (((b >> 6) & 0x03030303u) << 4);
    *sc = (a & 0x3f3f3f3fu) | (uint64_t)sc_hi << 32;
    *mn = (b & 0x3f3f3f3fu) | (uint64_t)mn_hi << 32;
}

static const int D_AT[] = {0, 0, 0, 0, 208};   /* byte offset of a super-block's fp16 d */

#if defined(__AVX2__)
/* Sub-block j of a super-block as 32 unsigned codes (Q4_K 0..15, Q6_K 0..63: q, not q - 32). */
static inline __m256i k_codes(int fmt, const uint8_t* sb, int j) {
    if (fmt == FMT_Q4_K) {
        __m256i q = _mm256_loadu_si256((const __m256i*)(sb + 16 + 32 * (j >> 1)));
        if (j & 1) q = _mm256_srli_epi16(q, 4);
        return _mm256_and_si256(q, _mm256_set1_epi8(15));
    }
    int h = j >> 2, t = j & 3;
    __m256i lo = _mm256_loadu_si256((const __m256i*)(sb + h * 64 + (t & 1) * 32));
    if (t >= 2) lo = _mm256_srli_epi16(lo, 4);
    __m256i hi = _mm256_loadu_si256((const __m256i*)(sb + 128 + h * 32));
    hi = _mm256_srl_epi16(hi, _mm_cvtsi32_si128(2 * t));
    return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi8(15)),
                           _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4));
}

/* 4 rows' 8 int32 lanes r[0..3] -> cols[c] (c = 0..7): lane i = r[i] lane c (128 bits). */
static inline void transpose4x8(const __m256i* r, __m128i* cols) {
    __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpacklo_epi32(r[2], r[3]);
    __m256i t2 = _mm256_unpackhi_epi32(r[0], r[1]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    __m256i u[4] = {_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1),
                    _mm256_unpacklo_epi64(t2, t3), _mm256_unpackhi_epi64(t2, t3)};
    for (int i = 0; i < 4; i++) {
        cols[i] = _mm256_castsi256_si128(u[i]);
        cols[i + 4] = _mm256_extracti128_si256(u[i], 1);
    }
}

/* Sum of 4 rows' 8 int32 lanes each, folded by two vphaddd: lanes 0-3 rows 0-3 (of lanes
 * 0-3 of each), lanes 4-7 rows 0-3 (of lanes 4-7); a row's total is its two lanes' sum. */
static inline __m256i fold4(__m256i a, __m256i b, __m256i c, __m256i d) {
    return _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
}

/* The fp16 at byte `off` of 4 rows' super-blocks (row pointers s[0..3]) as 4 fp32. */
static inline __m128 halves_rows(const uint8_t* const* s, int off) {
    uint16_t h[4];
    for (int r = 0; r < 4; r++) memcpy(&h[r], s[r] + off, 2);
    return _mm_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3],
                                       0, 0, 0, 0));
}

/* `rows` (1-4) weight rows (row_bytes apart) by MM rows of x (block_q8_K), nsb super-blocks:
 * y[m * N + r]. Per sub-block j the 4 rows' byte dots are folded into one vector (fold4:
 * lanes row r, first / second 16 weights), multiplied by the rows' scales of j as int32
 * (one vpmulld), and summed over the super-block in int32; one conversion and one fma by the
 * rows' d times dx per super-block. Rows past `rows` repeat the last one (not stored). */
static inline __attribute__((always_inline)) void tile4_k(int fmt, int MM, const qrow* xr,
                                                          int nsb, const uint8_t* w,
                                                          size_t row_bytes, int rows, float* y,
                                                          int N) {
    const uint8_t* wr[4];
    for (int r = 0; r < 4; r++) wr[r] = w + (size_t)(r < rows ? r : rows - 1) * row_bytes;
    int bb = BLOCK_BYTES[fmt];
    __m256 acc[4];
    __m128 accm[4];
    for (int m = 0; m < MM; m++) {
        acc[m] = _mm256_setzero_ps();
        accm[m] = _mm_setzero_ps();
    }
    for (int b = 0; b < nsb; b++) {
        const uint8_t* s[4];
        for (int r = 0; r < 4; r++) s[r] = wr[r] + (size_t)b * bb;
        __m256i sv[8];    /* sub-block j's scales: lanes rows 0-3 (first 16), rows 0-3 (last 16) */
        __m128i mn[4];    /* Q4_K: row r's 8 mins as int16 */
        __m256i sc16[4];  /* Q6_K: row r's 16 scales as int16 */
        if (fmt == FMT_Q4_K) {
            __m256i rs[4];
            __m128i cols[8];
            for (int r = 0; r < 4; r++) {
                uint64_t sc, mins;
                q4_k_scales_mins(s[r] + 4, &sc, &mins);
                rs[r] = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc));
                mn[r] = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mins));
            }
            transpose4x8(rs, cols);
            for (int j = 0; j < 8; j++) sv[j] = _mm256_set_m128i(cols[j], cols[j]);
        } else {
            __m256i lo[4], hi[4];
            __m128i clo[8], chi[8];
            for (int r = 0; r < 4; r++) {
                __m128i sc = _mm_loadu_si128((const __m128i*)(s[r] + 192));
                lo[r] = _mm256_cvtepi8_epi32(sc);
                hi[r] = _mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8));
                sc16[r] = _mm256_cvtepi8_epi16(sc);
            }
            transpose4x8(lo, clo);
            transpose4x8(hi, chi);
            for (int j = 0; j < 4; j++) {
                sv[j] = _mm256_set_m128i(clo[2 * j + 1], clo[2 * j]);
                sv[j + 4] = _mm256_set_m128i(chi[2 * j + 1], chi[2 * j]);
            }
        }
        __m256i isum[4];
        for (int m = 0; m < MM; m++) isum[m] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            __m256i wc[4];
            for (int r = 0; r < 4; r++) wc[r] = k_codes(fmt, s[r], j);
            for (int m = 0; m < MM; m++) {
                __m256i qx = load_qx(xr[m].q + (size_t)b * QKK + (size_t)j * QK);
                __m256i p = fold4(block_dot(FMT_Q4_1, wc[0], qx), block_dot(FMT_Q4_1, wc[1], qx),
                                  block_dot(FMT_Q4_1, wc[2], qx), block_dot(FMT_Q4_1, wc[3], qx));
                isum[m] = _mm256_add_epi32(isum[m], _mm256_mullo_epi32(p, sv[j]));
            }
        }
        __m128 d4 = halves_rows(s, D_AT[fmt]);
        __m128 dmin4 = fmt == FMT_Q4_K ? halves_rows(s, 2) : _mm_setzero_ps();
        for (int m = 0; m < MM; m++) {
            const int16_t* bs = xr[m].bs + (size_t)b * (QKK / 16);
            if (fmt == FMT_Q6_K) {   /* - 32 * sum_i scales[i] * bsum_i, in int32 */
                __m256i b16 = _mm256_loadu_si256((const __m256i*)bs);
                __m256i o = fold4(_mm256_madd_epi16(sc16[0], b16), _mm256_madd_epi16(sc16[1], b16),
                                  _mm256_madd_epi16(sc16[2], b16), _mm256_madd_epi16(sc16[3], b16));
                isum[m] = _mm256_sub_epi32(isum[m], _mm256_slli_epi32(o, 5));
            }
            float dx = xr[m].d[b];
            __m128 dd = _mm_mul_ps(d4, _mm_set1_ps(dx));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_set_m128(dd, dd), acc[m]);
            if (fmt == FMT_Q4_K) {   /* dmin * dx * sum_j m[j] * sum(qx_j) */
                __m128i s8 = _mm_hadd_epi16(_mm_loadu_si128((const __m128i*)bs),
                                            _mm_loadu_si128((const __m128i*)(bs + 8)));
                __m128i t01 = _mm_hadd_epi32(_mm_madd_epi16(mn[0], s8), _mm_madd_epi16(mn[1], s8));
                __m128i t23 = _mm_hadd_epi32(_mm_madd_epi16(mn[2], s8), _mm_madd_epi16(mn[3], s8));
                accm[m] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_hadd_epi32(t01, t23)),
                                       _mm_mul_ps(dmin4, _mm_set1_ps(dx)), accm[m]);
            }
        }
    }
    for (int m = 0; m < MM; m++) {
        float t[4];
        _mm_storeu_ps(t, _mm_sub_ps(_mm_add_ps(_mm256_castps256_ps128(acc[m]),
                                               _mm256_extractf128_ps(acc[m], 1)), accm[m]));
        memcpy(y + (size_t)m * N, t, sizeof(float) * (size_t)rows);
    }
}
#else
/* Sub-block j of a super-block as 32 codes (Q4_K 0..15, Q6_K q - 32). */
static inline void k_codes(int fmt, const uint8_t* sb, int j, int8_t* q) {
    if (fmt == FMT_Q4_K) {
        const uint8_t* p = sb + 16 + 32 * (j >> 1);
        for (int i = 0; i < QK; i++) q[i] = (int8_t)((j & 1) ? p[i] >> 4 : p[i] & 15);
        return;
    }
    int h = j >> 2, t = j & 3;
    const uint8_t* lo = sb + h * 64 + (t & 1) * 32;
    const uint8_t* hi = sb + 128 + h * 32;
    for (int i = 0; i < QK; i++)
        q[i] = (int8_t)((((t >= 2 ? lo[i] >> 4 : lo[i]) & 15) | (((hi[i] >> (2 * t)) & 3) << 4))
                        - 32);
}

/* As the x86 tile4_k, a weight row at a time: its super-block's codes and scales decoded
 * once, then per row of x the exact int32 sums and d * dx * sumi - dmin * dx * summ. */
static inline void tile4_k(int fmt, int MM, const qrow* xr, int nsb, const uint8_t* w,
                           size_t row_bytes, int rows, float* y, int N) {
    int bb = BLOCK_BYTES[fmt];
    for (int r = 0; r < rows; r++) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int b = 0; b < nsb; b++) {
            const uint8_t* sb = w + (size_t)r * row_bytes + (size_t)b * bb;
            int8_t q[QKK];
            int32_t sc[16], mins[8] = {0};
            for (int j = 0; j < 8; j++) k_codes(fmt, sb, j, q + j * QK);
            if (fmt == FMT_Q4_K) {
                uint64_t s8, m8;
                q4_k_scales_mins(sb + 4, &s8, &m8);
                for (int j = 0; j < 8; j++) {
                    sc[2 * j] = sc[2 * j + 1] = (int32_t)((s8 >> (8 * j)) & 63);
                    mins[j] = (int32_t)((m8 >> (8 * j)) & 63);
                }
            } else {
                for (int g = 0; g < 16; g++) sc[g] = ((const int8_t*)(sb + 192))[g];
            }
            float dw = half_to_float(sb + D_AT[fmt]);
            float dmw = fmt == FMT_Q4_K ? half_to_float(sb + 2) : 0.0f;
            for (int m = 0; m < MM; m++) {
                const int8_t* qx = xr[m].q + (size_t)b * QKK;
                const int16_t* bs = xr[m].bs + (size_t)b * (QKK / 16);
                int32_t sumi = 0, summ = 0;
                for (int g = 0; g < 16; g++) {
                    int32_t p = 0;
                    for (int i = 0; i < 16; i++) p += (int32_t)q[16 * g + i] * qx[16 * g + i];
                    sumi += sc[g] * p;
                }
                for (int j = 0; j < 8; j++) summ += mins[j] * (bs[2 * j] + bs[2 * j + 1]);
                float dx = xr[m].d[b];
                acc[m] += dw * dx * (float)sumi - dmw * dx * (float)summ;
            }
        }
        for (int m = 0; m < MM; m++) y[(size_t)m * N + r] = acc[m];
    }
}
#endif

#if defined(__AVX2__)
#define TILE_BODY(F, NN, MM)                                                                 \
    if (FMT_##F >= FMT_Q4_K) tile4_k(FMT_##F, MM, xr, nb / 8, w, row_bytes, NN, y, N);     \
    else if (NN == 4) tile4(FMT_##F, MM, xr, nb, w, row_bytes, y, N);                       \
    else tile(FMT_##F, NN, MM, xr, nb, w, row_bytes, y, N);
#else
#define TILE_BODY(F, NN, MM)                                                                 \
    if (FMT_##F >= FMT_Q4_K) tile4_k(FMT_##F, MM, xr, nb / 8, w, row_bytes, NN, y, N);     \
    else tile(FMT_##F, NN, MM, xr, nb, w, row_bytes, y, N);
#endif

/* One instantiation per (format, tile): constant NN, MM let the compiler keep the
 * accumulators in registers. */
#define TILE_FN(F, NN, MM)                                                                   \
static void tile_##F##_##NN##x##MM(const qrow* xr, int nb, const uint8_t* w,                \
                                   size_t row_bytes, float* y, int N) {                     \
    TILE_BODY(F, NN, MM)                                                                     \
}
typedef void (*tile_fn)(const qrow*, int, const uint8_t*, size_t, float*, int);
/* [rows of weight: 0 -> 4, 1 -> 1][rows of x - 1] */
#define TILES(F)                                                                             \
TILE_FN(F, 4, 1) TILE_FN(F, 4, 2) TILE_FN(F, 4, 3) TILE_FN(F, 4, 4)                          \
TILE_FN(F, 1, 1) TILE_FN(F, 1, 2) TILE_FN(F, 1, 3) TILE_FN(F, 1, 4)                          \
static const tile_fn TILES_##F[2][4] = {                                                     \
    {tile_##F##_4x1, tile_##F##_4x2, tile_##F##_4x3, tile_##F##_4x4},                        \
    {tile_##F##_1x1, tile_##F##_1x2, tile_##F##_1x3, tile_##F##_1x4}};
TILES(Q8_0)
TILES(Q4_0)
TILES(Q4_1)
TILES(Q4_K)
TILES(Q6_K)

/* Rows of x per tile (x86: MM accumulators; generic: 4 x MM scalars). */
#define RM 4

/* Rows of x up to which the row kernels (where the format has them) take the matmul:
 * past them the tiles' reuse of each x load over 4 weight rows wins (the weight is read
 * from cache several times per byte from memory); measured on an AVX-512 EPYC, 1 thread,
 * weights in cache: 256-bit rows 10-15% slower than tile4 at 4 and 8 rows, 512-bit VNNI
 * rows 0-25% faster at 8. */
#ifdef ROW_512
#define ROW_KERNEL_M 8
#define ROW_KERNEL_M_Q8_0 4   /* at 8 rows equal to the tiles at best, the LM head -20% */
#else
#define ROW_KERNEL_M 2
#define ROW_KERNEL_M_Q8_0 2
#endif

#if defined(__AVX2__)
#define ROWS_OR_NULL(F) ROWS_##F
#else
#define ROWS_OR_NULL(F) NULL
typedef void (*row_fn)(const qrow*, int, const uint8_t*, size_t, int, float*, int);
#endif

/* The activation blocks a format's dot takes, as ggml's vec_dot_type: Q8_0 for Q8_0 and
 * Q4_0, Q8_1 for Q4_1, Q8_K for the K-quants. */
enum { ACT_Q8_0, ACT_Q8_1, ACT_Q8_K };
static const int ACT_OF[] = {ACT_Q8_0, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K, ACT_Q8_K};

/* M rows of x as activation blocks of kind `act`, in one allocation (free(a->q)). */
typedef struct {
    int8_t* q;      /* (M, K) codes */
    float* d;       /* (M, nd) scales: nd = K / 32, Q8_K K / 256 */
    int32_t* s;     /* (M, K / 32) code sums (Q8_0, Q8_1) */
    float* ms;      /* (M, K / 32) Q8_1's fp16(d * sum) */
    int16_t* bs;    /* (M, K / 16) Q8_K's sums per 16 */
    int nd;
} qacts;

/* Returns 1 when out of memory. */
static int quantize_rows(int act, const float* x, int M, int K, qacts* a, int num_threads) {
    (void)num_threads;   /* unused when built without OpenMP */
    int nb = K / QK;
    size_t n = (size_t)M * K;
    a->nd = act == ACT_Q8_K ? K / QKK : nb;
    /* M * K is a multiple of 32: every array below stays aligned to its type */
    a->q = malloc(n + (size_t)M * nb * (2 * sizeof(float) + sizeof(int32_t))
                  + (size_t)M * (K / 16) * sizeof(int16_t));
    if (a->q == NULL) return 1;
    a->d = (float*)(a->q + n);
    a->s = (int32_t*)(a->d + (size_t)M * nb);
    a->ms = (float*)(a->s + (size_t)M * nb);
    a->bs = (int16_t*)(a->ms + (size_t)M * nb);
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (M > 1)
    for (int m = 0; m < M; m++) {
        if (act == ACT_Q8_K)
            quantize_row_k(x + (size_t)m * K, K, a->q + (size_t)m * K, a->d + (size_t)m * a->nd,
                           a->bs + (size_t)m * (K / 16));
        else
            quantize_row(x + (size_t)m * K, K, a->q + (size_t)m * K, a->d + (size_t)m * nb,
                         a->s + (size_t)m * nb, act == ACT_Q8_1 ? a->ms + (size_t)m * nb : NULL);
    }
    return 0;
}

/* xr[i] = quantized row m0 + i of x (codes qn: nibble order, or a->q), for up to RM rows;
 * returns how many. */
static inline int x_rows(qrow* xr, int m0, int M, int K, const qacts* a, const int8_t* qn) {
    int rows = M - m0 < RM ? M - m0 : RM, nb = K / QK;
    for (int i = 0; i < rows; i++) {
        xr[i].q = a->q + (size_t)(m0 + i) * K;
        xr[i].d = a->d + (size_t)(m0 + i) * a->nd;
        xr[i].s = a->s + (size_t)(m0 + i) * nb;
        xr[i].ms = a->ms + (size_t)(m0 + i) * nb;
        xr[i].bs = a->bs + (size_t)(m0 + i) * (K / 16);
        xr[i].qn = qn + (size_t)(m0 + i) * K;
    }
    return rows;
}

static int q8_linear(int fmt, const tile_fn (*tiles)[4], const row_fn* row_kernels,
                     const float* x, const uint8_t* w, float* y, int M, int N, int K,
                     int num_threads) {
    (void)num_threads;   /* unused when built without OpenMP */
    int nb = K / QK;
    size_t row_bytes = (size_t)(K / BLOCK_ELEMS[fmt]) * BLOCK_BYTES[fmt];
    qacts a;
    if (quantize_rows(ACT_OF[fmt], x, M, K, &a, num_threads)) return 1;
    int8_t* q = a.q;
    if (row_kernels != NULL && M <= (fmt == FMT_Q8_0 ? ROW_KERNEL_M_Q8_0 : ROW_KERNEL_M)) {
        int8_t* qn = q;
#ifdef ROW_512
        if (fmt != FMT_Q8_0) {
            qn = malloc((size_t)M * K);
            if (qn == NULL) {
                free(q);
                return 1;
            }
            for (int m = 0; m < M; m++)
                nibble_order(q + (size_t)m * K, nb, qn + (size_t)m * K);
        }
#endif
        /* static: each thread one contiguous range of weight rows, streamed in order */
        #pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int n = 0; n < N; n += 8)
            for (int m0 = 0; m0 < M; m0 += RM) {
                qrow xr[4];
                int rows = x_rows(xr, m0, M, K, &a, qn);
                row_kernels[rows - 1](xr, nb, w + (size_t)n * row_bytes, row_bytes,
                                      N - n < 8 ? N - n : 8, y + (size_t)m0 * N + n, N);
            }
        if (qn != q) free(qn);
        free(q);
        return 0;
    }
    int blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int blk = 0; blk < blocks; blk++) {
        int n0 = blk * 4;
        for (int m0 = 0; m0 < M; m0 += RM) {
            qrow xr[4];
            int rows = x_rows(xr, m0, M, K, &a, q);
            if (n0 + 4 <= N)
                tiles[0][rows - 1](xr, nb, w + (size_t)n0 * row_bytes, row_bytes,
                                   y + (size_t)m0 * N + n0, N);
            else
                for (int n = n0; n < N; n++)
                    tiles[1][rows - 1](xr, nb, w + (size_t)n * row_bytes, row_bytes,
                                       y + (size_t)m0 * N + n, N);
        }
    }
    free(q);
    return 0;
}

/* Q8_0 tiles in llama.cpp's order of arithmetic (PARALLAX_NUMERICS=ggml): tile() keeps
 * ggml's 8 int32 lanes of 4 products per block, one fma of each lane by d * dx per block
 * in block order, and ggml's horizontal sum at the end, which is what its
 * ggml_vec_dot_q8_0_q8_0 (one row of x) and llamafile's tinyBLAS_Q0_AVX (several) both
 * compute per output; the generic build's scalar loop is ggml's scalar fallback. tile4 and
 * the row kernels add the lanes in other orders (faster; equal up to fp32 rounding). */
#define EXACT_FN(NN, MM)                                                                     \
static void exact_Q8_0_##NN##x##MM(const qrow* xr, int nb, const uint8_t* w,                \
                                   size_t row_bytes, float* y, int N) {                     \
    tile(FMT_Q8_0, NN, MM, xr, nb, w, row_bytes, y, N);                                      \
}
EXACT_FN(4, 1) EXACT_FN(4, 2) EXACT_FN(4, 3) EXACT_FN(4, 4)
static const tile_fn EXACT_Q8_0[2][4] = {
    {exact_Q8_0_4x1, exact_Q8_0_4x2, exact_Q8_0_4x3, exact_Q8_0_4x4},
    {tile_Q8_0_1x1, tile_Q8_0_1x2, tile_Q8_0_1x3, tile_Q8_0_1x4}};

/* x (M, K) fp32 -> activation blocks of kind `act` (0: Q8_0, 1: Q8_1, 2: Q8_K) as the
 * *_linear_q8 kernels make them: codes q (M, K) int8, scales d (M, K/32; Q8_K K/256) fp32,
 * sums s (M, K/32) fp32: Q8_0 the code sums, Q8_1 block_q8_1's fp16 s; Q8_K (M, K/16) the
 * bsums. Exposed for the tests (the twins must agree bit for bit). Returns 1 when out of
 * memory, 2 for an unknown kind. */
int parallax_quantize_act_f32(const float* x, int act, int8_t* q, float* d, float* s, int M,
                              int K) {
    if (act < ACT_Q8_0 || act > ACT_Q8_K) return 2;
    qacts a;
    if (quantize_rows(act, x, M, K, &a, 1)) return 1;
    size_t nd = (size_t)M * a.nd, ns = (size_t)M * (act == ACT_Q8_K ? K / 16 : K / QK);
    memcpy(q, a.q, (size_t)M * K);
    memcpy(d, a.d, sizeof(float) * nd);
    for (size_t i = 0; i < ns; i++)
        s[i] = act == ACT_Q8_K ? (float)a.bs[i] : act == ACT_Q8_1 ? a.ms[i] : (float)a.s[i];
    free(a.q);
    return 0;
}

/* parallax_<fmt>_linear_q8(x, w, y, M, N, K, num_threads): w holds N rows of K / 32 blocks
 * (K-quants: K / 256 super-blocks) of the format. Returns 0, or 1 when out of memory. */
#define ENTRY(f, F, ROWS)                                                                    \
int parallax_##f##_linear_q8(const float* x, const uint8_t* w, float* y, int M, int N, int K, \
                             int num_threads) {                                              \
    return q8_linear(FMT_##F, TILES_##F, ROWS, x, w, y, M, N, K, num_threads);              \
}
ENTRY(q8_0, Q8_0, ROWS_OR_NULL(Q8_0))
ENTRY(q4_0, Q4_0, ROWS_OR_NULL(Q4_0))
ENTRY(q4_1, Q4_1, ROWS_OR_NULL(Q4_1))
ENTRY(q4_k, Q4_K, NULL)
ENTRY(q6_k, Q6_K, NULL)

/* parallax_q8_0_linear_ggml: parallax_q8_0_linear_q8 in llama.cpp's order (EXACT_Q8_0). */
int parallax_q8_0_linear_ggml(const float* x, const uint8_t* w, float* y, int M, int N, int K,
                              int num_threads) {
    return q8_linear(FMT_Q8_0, EXACT_Q8_0, NULL, x, w, y, M, N, K, num_threads);
}
