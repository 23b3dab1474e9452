/* llama.cpp's CPU flash attention (GGML_OP_FLASH_ATTN_EXT over an F16 K/V cache), bit for
 * bit, for one sequence: PARALLAX_NUMERICS=ggml's attention.
 *
 * The arithmetic is that of ggml-cpu's ops.cpp (llama-cpp-python 0.3.36's ggml), per build:
 * this file's avx512 / avx512vnni variants equal ggml's AVX-512 build (-march=native on an
 * AVX-512 CPU without AVX512-FP16), its avx2 / avxvnni variants ggml's AVX2+FMA+F16C build, its
 * generic variant ggml's plain-C fallbacks (scalar loops, libm's expf everywhere; a plain x86-64
 * ggml build would take an SSE2 vector expf in the tiled softmax instead: not reproduced).
 * ggml picks one of three algorithms (ggml_compute_forward_flash_attn_ext_f16):
 *
 * - one_chunk (the ubatch has < 64 query rows): per query row, Q rounded to fp16, each attended
 *   key's score by ggml_vec_dot_f16 (fp32 lanes and accumulators, the build's register count
 *   and reduction order, the sum in double then float), times scale, plus the mask (0), and an
 *   online softmax whose V accumulator is FP16: every scale (ggml_vec_scale_f16) and
 *   multiply-add (ggml_vec_mad_f16, fused on FMA builds) is rounded to fp16 when stored. The
 *   running sum is S = S*ms + vs (fused on FMA builds: GCC contracts it; seen in the library's
 *   disassembly), expf from libm. Output: fp16 accumulator to fp32, times 1/S. Masked keys are
 *   skipped (`continue`), so only keys 0..pos[t] take part.
 * - tiled (>= 64 query rows, ggml_compute_forward_flash_attn_ext_tiled): fp32 Q and K, KV
 *   tiles of 64 keys starting at key 0. Per tile and row: scores by simd_gemm (one fused
 *   multiply-add chain over the head dimension per score, from 0), times scale, plus the mask
 *   (-inf for masked keys and keys past S), row max, M = fmaxf(M, max) (when it grows, the fp32
 *   accumulator and S are scaled by expf(Mold - M)), ggml_vec_soft_max_f32 (the build's vector
 *   expf and lane sums, added in double; S += that sum, rounded to float), then the accumulator
 *   += p * V by one fused chain over the tile's keys (simd_gemm). A tile in which all of a
 *   row's keys are masked changes nothing for that row, so a row's result does not depend on
 *   which rows ggml grouped into its Q tiles (threads, chunking): rows are independent here.
 *   Keys past S in the last tile are masked, as ggml's padded cache positions are.
 * - split-KV decode (one query row and a padded KV length n_kv >= 512; llama.cpp pads the KV
 *   length to a multiple of 256, so decode steps past 256 cached positions take it): ggml
 *   splits keys 0..n_kv-1 into one chunk per thread, runs one_chunk on each (fp16
 *   accumulators, unnormalised) and merges them in chunk order
 *   (ggml_flash_attn_ext_reduce_partials); the result depends on llama.cpp's thread count.
 *   Reproduced by parallax_ggml_attention_kv_f32 given n_kv and that thread count (llama.cpp's
 *   n_threads, the decode one); n_kv 0 runs one_chunk instead.
 *
 * K and V arrive as fp32 holding fp16 values exactly (the cache's values), so ggml's fp16 loads
 * (vcvtph2ps) are plain fp32 loads here. Single-threaded; no OpenMP, no vector math library
 * (expf must stay libm's scalar expf, the function ggml calls).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"   /* round_to_half; isa.h's immintrin.h on the x86 variants */
#include "ggml_expf.h"

#define FA_TILE 64      /* GGML_FA_TILE_Q = GGML_FA_TILE_KV */
#define FA_MAX_D 1024   /* head dimensions this file takes */

/* a*b + c as ggml's build computes it: fused where the build has FMA (intrinsics, and GCC's
 * contraction of the scalar loops), two roundings otherwise. */
#if defined(__FMA__)
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* ---- one_chunk pieces (vec.cpp / vec.h) ---------------------------------------------------- */

/* ggml_vec_dot_f16(n, x, y): x, y fp16 values as fp32. The AVX-512 build: 4 accumulators of
 * 16 lanes (GGML_F16_STEP 64), the AVX2 build: 4 of 8 (step 32); acc0+acc2, acc1+acc3, then
 * their sum, then the lanes; the leftovers and the total in double. */
static float dot_f16(const float* x, const float* y, int n) {
    double sumf = 0.0;
    int i = 0;
#if defined(__AVX512F__)
    const int np = n & ~63;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16 * j),
                                     _mm512_loadu_ps(y + i + 16 * j), acc[j]);
    acc[0] = _mm512_add_ps(acc[0], acc[2]);
    acc[1] = _mm512_add_ps(acc[1], acc[3]);
    acc[0] = _mm512_add_ps(acc[0], acc[1]);
    sumf = (double)_mm512_reduce_add_ps(acc[0]);
#elif defined(__AVX2__) && defined(__FMA__)
    const int np = n & ~31;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (; i < np; i += 32)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * j),
                                     _mm256_loadu_ps(y + i + 8 * j), acc[j]);
    acc[0] = _mm256_add_ps(acc[0], acc[2]);
    acc[1] = _mm256_add_ps(acc[1], acc[3]);
    acc[0] = _mm256_add_ps(acc[0], acc[1]);
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(acc[0]), _mm256_extractf128_ps(acc[0], 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    sumf = (double)_mm_cvtss_f32(_mm_hadd_ps(t1, t1));
#endif
    for (; i < n; i++) sumf += (double)(x[i] * y[i]);   /* fp16 * fp16: exact in fp32 */
    return (float)sumf;
}

/* ggml_vec_scale_f16: y = fp16(y * v), element by element in every build. */
static void scale_f16(float* y, int n, float v) {
    int i = 0;
#if defined(__AVX512F__)
    const __m512 vv = _mm512_set1_ps(v);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm512_cvtps_ph(
                                    _mm512_mul_ps(_mm512_loadu_ps(y + i), vv), 0)));
#elif defined(__AVX2__) && defined(__F16C__)
    const __m256 vv = _mm256_set1_ps(v);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm256_cvtps_ph(
                                    _mm256_mul_ps(_mm256_loadu_ps(y + i), vv), 0)));
#endif
    for (; i < n; i++) y[i] = round_to_half(y[i] * v);
}

/* ggml_vec_mad_f16: y = fp16(x*v + y) (fused on FMA builds), element by element. */
static void mad_f16(float* y, const float* x, int n, float v) {
    int i = 0;
#if defined(__AVX512F__)
    const __m512 vv = _mm512_set1_ps(v);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm512_cvtps_ph(
            _mm512_fmadd_ps(_mm512_loadu_ps(x + i), vv, _mm512_loadu_ps(y + i)), 0)));
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    const __m256 vv = _mm256_set1_ps(v);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm256_cvtps_ph(
            _mm256_fmadd_ps(_mm256_loadu_ps(x + i), vv, _mm256_loadu_ps(y + i)), 0)));
#endif
    for (; i < n; i++) y[i] = round_to_half(MADD(x[i], v, y[i]));
}

/* ggml_compute_forward_flash_attn_ext_f16_one_chunk's online softmax over keys ic0..ic1 of k /
 * v (rows `ks` floats apart) for one query row qh (already fp16 values): acc[D] gets the
 * unnormalised FP16 accumulator (as fp32), *M and *S the running max and sum. */
static void keys_one_chunk(const float* qh, const float* k, const float* v, size_t ks, int ic0,
                           int ic1, int D, float scale, float* acc, float* M_out, float* S_out) {
    memset(acc, 0, (size_t)D * sizeof(float));
    float S = 0.0f, M = -INFINITY;
    for (int ic = ic0; ic <= ic1; ic++) {
        float s = dot_f16(k + ic * ks, qh, D);
        s = s * scale;
        s += 0.0f;   /* the mask of an attended key */
        float ms = 1.0f, vs = 1.0f;
        if (s > M) {
            const float Mold = M;
            M = s;
            ms = expf(Mold - M);
            scale_f16(acc, D, ms);
        } else {
            vs = expf(s - M);
        }
        mad_f16(acc, v + ic * ks, D, vs);
        S = MADD(S, ms, vs);
    }
    *M_out = M;
    *S_out = S;
}

/* One query row by one_chunk: keys 0..last; qh, acc: D floats of scratch. */
static void row_one_chunk(const float* q, const float* k, const float* v, size_t ks, int last,
                          int D, float scale, float* out, float* qh, float* acc) {
    for (int d = 0; d < D; d++) qh[d] = round_to_half(q[d]);   /* ggml_cpu_fp32_to_fp16 */
    float M, S;
    keys_one_chunk(qh, k, v, ks, 0, last, D, scale, acc, &M, &S);
    const float S_inv = S == 0.0f ? 0.0f : 1.0f / S;
    for (int d = 0; d < D; d++) out[d] = acc[d] * S_inv;   /* ggml_vec_scale_f32 */
}

/* One query row by the split-KV decode path: keys 0..n_kv-1 in n_threads chunks of
 * ceil(n_kv / n_threads) (keys past `last` masked), each by one_chunk, merged in chunk order by
 * ggml_flash_attn_ext_reduce_partials (acc = acc*so + part*sn and S likewise, fused on FMA
 * builds as GCC contracts them). qh, part, acc: D floats of scratch. */
static void row_split_kv(const float* q, const float* k, const float* v, size_t ks, int last,
                         int n_kv, int n_threads, int D, float scale, float* out, float* qh,
                         float* part, float* acc) {
    for (int d = 0; d < D; d++) qh[d] = round_to_half(q[d]);
    const int chunk = (n_kv + n_threads - 1) / n_threads;
    float M = -INFINITY, S = 0.0f;
    memset(acc, 0, (size_t)D * sizeof(float));
    for (int c = 0; c < n_threads; c++) {
        const int ic0 = c * chunk;
        if (ic0 >= n_kv) continue;
        const int ic1 = ic0 + chunk - 1 < last ? ic0 + chunk - 1 : last;
        float Mc, Sc;
        keys_one_chunk(qh, k, v, ks, ic0, ic1, D, scale, part, &Mc, &Sc);
        if (Sc == 0.0f) continue;
        const float Mnew = fmaxf(M, Mc);
        const float so = expf(M - Mnew), sn = expf(Mc - Mnew);
        for (int d = 0; d < D; d++) acc[d] = MADD(acc[d], so, part[d] * sn);
        S = MADD(S, so, Sc * sn);
        M = Mnew;
    }
    if (S != 0.0f) {
        const float S_inv = 1.0f / S;
        for (int d = 0; d < D; d++) acc[d] *= S_inv;
    }
    memcpy(out, acc, (size_t)D * sizeof(float));
}

/* ---- tiled pieces (vec.h's ggml_v_expf, vec.cpp's ggml_vec_soft_max_f32) ----------------- */

/* ggml_vec_soft_max_f32: y = exp(x - max) (vector expf in lanes, libm's for the rest); returns
 * the sum of y: each vector's lanes summed in fp32, the vectors and the rest in double. */
static double soft_max(int n, float* y, const float* x, float max) {
    int i = 0;
    double sum = 0.0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    for (; i + 15 < n; i += 16) {
        const __m512 val = v_expf(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(max)));
        _mm512_storeu_ps(y + i, val);
        sum += (double)_mm512_reduce_add_ps(val);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; i + 7 < n; i += 8) {
        const __m256 val = v_expf(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(max)));
        _mm256_storeu_ps(y + i, val);
        __m128 val2 = _mm_add_ps(_mm256_extractf128_ps(val, 1), _mm256_castps256_ps128(val));
        val2 = _mm_add_ps(val2, _mm_movehl_ps(val2, val2));
        val2 = _mm_add_ss(val2, _mm_movehdup_ps(val2));
        sum += (double)_mm_cvtss_f32(val2);
    }
#endif
    for (; i < n; i++) {
        const float val = expf(x[i] - max);
        sum += (double)val;
        y[i] = val;
    }
    return sum;
}

/* One query row by ggml_compute_forward_flash_attn_ext_tiled: keys 0..last (< S). kt: K
 * transposed per tile of 64 keys ((S+63)/64 tiles of D x 64 floats, zero past S); v rows `ks`
 * floats apart; kq: 64 floats, acc: D floats of scratch. */
static void row_tiled(const float* q, const float* kt, const float* v, size_t ks, int last,
                      int S_len, int D, float scale, float* out, float* kq, float* acc) {
    memset(acc, 0, (size_t)D * sizeof(float));
    float S = 0.0f, M = -INFINITY;
    for (int ic = 0; ic <= last; ic += FA_TILE) {   /* later tiles: all masked, skipped */
        const int kv_tile = S_len - ic < FA_TILE ? S_len - ic : FA_TILE;
        const float* kd = kt + (size_t)ic * D;      /* this tile's D x 64 block */
        /* simd_gemm: KQ[j] = one fused chain over the head dimension, from 0 */
        for (int j = 0; j < FA_TILE; j++) kq[j] = 0.0f;
        for (int d = 0; d < D; d++) {
            const float qd = q[d];
            const float* kr = kd + (size_t)d * FA_TILE;
            for (int j = 0; j < FA_TILE; j++) kq[j] = MADD(qd, kr[j], kq[j]);
        }
        for (int j = 0; j < FA_TILE; j++) kq[j] *= scale;
        /* the mask: 0 for keys 0..last, -inf after (and for the padding past S) */
        for (int j = 0; j < FA_TILE; j++) kq[j] += ic + j <= last ? 0.0f : -INFINITY;
        float tile_max = -INFINITY;   /* ggml_vec_max_f32 */
        for (int j = 0; j < FA_TILE; j++) tile_max = tile_max > kq[j] ? tile_max : kq[j];
        if (tile_max == -INFINITY) continue;
        const float Mold = M, Mnew = fmaxf(Mold, tile_max);
        if (Mnew > Mold) {
            const float ms = expf(Mold - Mnew);
            for (int d = 0; d < D; d++) acc[d] *= ms;
            S *= ms;
        }
        M = Mnew;
        S += soft_max(FA_TILE, kq, kq, Mnew);   /* float += double: rounded once */
        /* simd_gemm: acc[d] += p_j * V[j][d], one fused chain over the tile's keys */
        for (int j = 0; j < kv_tile; j++) {
            const float p = kq[j];
            const float* vr = v + (size_t)(ic + j) * ks;
            for (int d = 0; d < D; d++) acc[d] = MADD(p, vr[d], acc[d]);
        }
    }
    const float S_inv = S == 0.0f ? 0.0f : 1.0f / S;
    for (int d = 0; d < D; d++) out[d] = acc[d] * S_inv;
}

/* q (T, Hq, D) f32, in ggml's head-dim order (the caller permutes); k, v (S, Hk, D) f32 that
 * hold fp16 values exactly (the cache's values); pos (T) int32: query row t attends keys
 * 0..pos[t] (causal; every other key is masked); out (T, Hq, D) f32. GQA: q head h reads kv
 * head h / (Hq / Hk). scale: the softmax scale (1/sqrt(D) here). step_rows: how many query rows
 * llama.cpp's call had (its ubatch's token count), which picks its algorithm (one_chunk below
 * 64 rows, the tiled path from 64 rows; see ggml_compute_forward_flash_attn_ext_f16).
 * n_kv: llama.cpp's padded KV length (llama_kv_cache::get_n_kv: min(n_ctx, max(256, S rounded
 * up to 256)) for one sequence), n_threads: its thread count; with step_rows == 1 and
 * n_kv >= 512 they select and shape its split-KV decode path. n_kv = 0: never split.
 * Returns 0, or -1 when D is not supported (1..1024), the head counts do not divide, n_kv is
 * below S (but not 0), n_threads < 1, or scratch memory cannot be had. */
int parallax_ggml_attention_kv_f32(const float* q, const float* k, const float* v, float* out,
                                   const int32_t* pos, int T, int S, int Hq, int Hk, int D,
                                   float scale, int step_rows, int n_kv, int n_threads) {
    if (D < 1 || D > FA_MAX_D || Hq < 1 || Hk < 1 || Hq % Hk != 0 || T < 0 || S < 0 ||
        (n_kv != 0 && n_kv < S) || n_threads < 1)
        return -1;
    const int group = Hq / Hk;
    const size_t ks = (size_t)Hk * D;   /* floats from one key to the next */
    const int tiled = step_rows >= FA_TILE;
    const int split = step_rows == 1 && T == 1 && n_kv >= 512;
    const int ntiles = (S + FA_TILE - 1) / FA_TILE;
    const size_t kt_size = tiled ? (size_t)Hk * ntiles * FA_TILE * D : 0;
    float* scratch = malloc(((size_t)3 * D + FA_TILE + kt_size) * sizeof(float));
    if (!scratch) return -1;
    float* a = scratch;               /* D */
    float* b = a + D;                 /* D or 64 */
    float* c = b + D + FA_TILE;       /* D */
    float* kt = c + D;                /* tiled: per kv head, K transposed per tile */
    if (tiled) {
        for (int g = 0; g < Hk; g++) {
            float* ktg = kt + (size_t)g * ntiles * FA_TILE * D;
            memset(ktg, 0, (size_t)ntiles * FA_TILE * D * sizeof(float));
            for (int s = 0; s < S; s++) {
                const float* kr = k + s * ks + (size_t)g * D;
                float* blk = ktg + (size_t)(s / FA_TILE) * FA_TILE * D + s % FA_TILE;
                for (int d = 0; d < D; d++) blk[(size_t)d * FA_TILE] = kr[d];
            }
        }
    }
    for (int t = 0; t < T; t++) {
        const int last = pos[t] < S - 1 ? pos[t] : S - 1;   /* -1: nothing attended, out 0 */
        for (int h = 0; h < Hq; h++) {
            const int g = h / group;
            const float* qr = q + ((size_t)t * Hq + h) * D;
            const float* kg = k + (size_t)g * D;
            const float* vg = v + (size_t)g * D;
            float* o = out + ((size_t)t * Hq + h) * D;
            if (tiled)
                row_tiled(qr, kt + (size_t)g * ntiles * FA_TILE * D, vg, ks, last, S, D, scale, o,
                          b, a);
            else if (split)
                row_split_kv(qr, kg, vg, ks, last, n_kv, n_threads, D, scale, o, b, c, a);
            else
                row_one_chunk(qr, kg, vg, ks, last, D, scale, o, b, a);
        }
    }
    free(scratch);
    return 0;
}
