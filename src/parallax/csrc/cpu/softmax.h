/* One round of the online softmax shared by the decode and paged attention kernels.
 *
 * Include after <math.h> and the optional vector expf declaration (PARALLAX_MVEC), so the
 * exp loop below is vectorised the same way in both files.
 */
#ifndef PARALLAX_CPU_SOFTMAX_H
#define PARALLAX_CPU_SOFTMAX_H

#include <math.h>

/* s[0..n) holds a round's scores; they become exp(s - new max). The running max *mx and
 * denominator *denom are updated; returns exp(old max - new max), the factor the output
 * accumulated so far must be scaled by (0 on the first round, when *mx is -inf). */
static inline float softmax_round(float* s, int n, float* mx, float* denom) {
    float m = *mx, sum = 0.f;
    #pragma omp simd reduction(max:m)
    for (int j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    float corr = expf(*mx - m);
    #pragma omp simd reduction(+:sum)
    for (int j = 0; j < n; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    *denom = *denom * corr + sum;
    *mx = m;
    return corr;
}

#endif
