/* What the C kernels share: a vector is one register of what -march=native targets (16
 * floats with AVX-512, 8 with AVX/AVX2, else 4: SSE, NEON); a wider vector type is not split into
 * registers by GCC but moved through the stack every step (16-float vectors on an AVX2 EPYC:
 * 9-12 GB/s, slower than torch's GEMV). */
#ifndef KTINJECT_VECTORS_H
#define KTINJECT_VECTORS_H

#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
/* the same, for loads from any address (plain vector loads, no alignment assumed) */
typedef float vf_any __attribute__((vector_size(VL * 4), aligned(1), may_alias));

static inline vf load(const float* p) { return *(const vf_any*)p; }

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR
#endif
#endif

/* The lanes added as a tree (halves, then quarters, ...), not as a chain: with shuffles where
 * the compiler has them (GCC >= 12, Clang; ~10% faster at 8 rows than a chain), else through an
 * array (on AVX-512 through the stack). */
static inline float sum(vf v) {
#ifdef HAVE_SHUFFLEVECTOR
    typedef float vf4 __attribute__((vector_size(16)));
#if VL >= 8
    typedef float vf8 __attribute__((vector_size(32)));
#endif
#if VL == 16
    const vf8 eighths = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                        __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif VL == 8
    const vf8 eighths = v;
#endif
#if VL >= 8
    const vf4 quarters = __builtin_shufflevector(eighths, eighths, 0, 1, 2, 3) +
                         __builtin_shufflevector(eighths, eighths, 4, 5, 6, 7);
#else
    const vf4 quarters = v;
#endif
    return (quarters[0] + quarters[2]) + (quarters[1] + quarters[3]);
#else
    float lanes[VL];
    memcpy(lanes, &v, sizeof lanes);
    for (int width = VL / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
    return lanes[0];
#endif
}

#endif
