/* x [M, K] (float32) times the transpose of a weight [N, K] kept in GGUF blocks of 32 weights
 * (Q4_1 or Q8_0, laid out as in operators/linear.py).
 *
 * A few rows (a decode batch, up to DOT_ROWS): each program unpacks a block once into float
 * registers and takes its dot products with up to 8 rows, so the unpacking is shared by the
 * batch; inductor's loop for the same expression unpacks once per row. More rows (prefill):
 * the weight is unpacked PANEL output columns (two vectors) at a time into a panel that stays
 * in the core's cache, and a register-blocked kernel multiplies it with 6 rows at a time, so the
 * unpacked weight never goes through memory (dequantizing it first and calling an fp32 matmul
 * writes and reads it there: slower than a matmul of an fp32 weight, where this is faster).
 * Numbers in operators/native/__init__.py.
 *
 * The unpacked weight is exact: the product of a 4- or 8-bit integer and a float16 scale fits
 * in a float32 mantissa, so d*q + m rounds once whether or not the compiler fuses it, exactly
 * as dequantizing in numpy or torch. Only the order of the float sums differs from a matmul of
 * the dequantized weight.
 *
 * The dot kernels also take plain float32 weights (`dense_matmul`): decode of an fp32 model
 * streams them faster than torch's GEMV does.
 *
 * GCC/Clang vector extensions keep it portable; vectors.h says how wide a vector is.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

/* float16 scales: the compiler's _Float16 where it has one (GCC >= 12 on x86, Clang), else
 * the bits converted by hand (GCC 11, still common), once per block of 32 weights */
#ifdef __FLT16_MAX__
typedef _Float16 half;
static inline float to_float(half h) { return (float)h; }
#else
typedef uint16_t half;
static inline float to_float(half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        const float value = (float)man * 5.9604644775390625e-8f;
        return sign ? -value : value;
    }
    const uint32_t bits = sign | (exp == 0x1fu ? 0x7f800000u : (exp + 112u) << 23) | man << 13;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}
#endif

#define BLOCK 32
#define DOT_ROWS 32 /* at most this many rows take the dot-product kernels; more, the panels */
#define TILE_ROWS 6 /* rows per register tile of the panel kernel (12 accumulators) */

#define VECTORS (BLOCK / VL) /* vectors per block of 32 weights */
#define PANEL (2 * VL)       /* output columns per unpacked panel: two vectors */
/* vector accumulators of a dot kernel, all rows together: half the registers (AVX-512 has 32,
 * AVX2 16), leaving the rest for a block's weights */
#define ACCUMULATORS (VL == 16 ? 16 : 8)

typedef int32_t vi __attribute__((vector_size(VL * 4)));
/* byte vectors, for loads from any address */
typedef uint8_t vbytes_any __attribute__((vector_size(VL), aligned(1), may_alias));
typedef int8_t vsbytes_any __attribute__((vector_size(VL), aligned(1), may_alias));

/* VL bytes from p, as VL int32 lanes. GCC 12 widens a byte vector (__builtin_convertvector) one
 * byte at a time through general registers, on AVX2 and AVX-512 alike; the intrinsics are one
 * instruction. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vi widen_u8(const uint8_t* p) {
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
}
static inline vi widen_s8(const int8_t* p) {
    return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline vi widen_u8(const uint8_t* p) {
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
}
static inline vi widen_s8(const int8_t* p) {
    return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
}
#else
static inline vi widen_u8(const uint8_t* p) {
    return __builtin_convertvector(*(const vbytes_any*)p, vi);
}
static inline vi widen_s8(const int8_t* p) {
    return __builtin_convertvector(*(const vsbytes_any*)p, vi);
}
#endif

/* The 32 weights of block b of one weight row, as VECTORS vectors: w[v] holds weights
 * v * VL .. v * VL + VL - 1. Q4_1 keeps weights 0-15 in the low nibbles of its 16 bytes and
 * 16-31 in the high ones. */
static inline void q4_1_block(const uint8_t* packed, const half* scales, const half* mins,
                              int64_t b, vf* w) {
    const float d = to_float(scales[b]), m = to_float(mins[b]);
    for (int v = 0; v < VECTORS / 2; v++) {
        const vi bytes = widen_u8(packed + b * (BLOCK / 2) + v * VL);
        w[v] = __builtin_convertvector(bytes & 15, vf) * d + m;
        w[v + VECTORS / 2] = __builtin_convertvector(bytes >> 4, vf) * d + m;
    }
}

static inline void q8_0_block(const int8_t* packed, const half* scales, int64_t b, vf* w) {
    const float d = to_float(scales[b]);
    for (int v = 0; v < VECTORS; v++)
        w[v] = __builtin_convertvector(widen_s8(packed + b * BLOCK + v * VL), vf) * d;
}

/* out[r * N] = x[r] . w for R rows of x and one weight row w (R known at compile time, so the
 * accumulators stay in registers). A row has A accumulators, so that R x A fill ACCUMULATORS:
 * enough independent chains of additions for one row, a single one each for 8 rows on AVX2. */
#define ROWS_KERNEL(FMT, R, UNPACK)                                                            \
    static void FMT##_rows_##R(const float* x, int64_t K, const void* packed,                 \
                               const half* scales, const half* mins, float* out,               \
                               int64_t N) {                                                   \
        enum { A = ACCUMULATORS / R >= VECTORS ? VECTORS : ACCUMULATORS / R };                 \
        vf acc[R][A];                                                                         \
        for (int r = 0; r < R; r++)                                                           \
            for (int a = 0; a < A; a++) acc[r][a] = (vf){0};                                  \
        for (int64_t b = 0; b < K / BLOCK; b++) {                                             \
            vf w[VECTORS];                                                                    \
            UNPACK;                                                                           \
            for (int v = 0; v < VECTORS; v++)                                                 \
                for (int r = 0; r < R; r++)                                                   \
                    acc[r][v % A] += w[v] * load(x + r * K + b * BLOCK + v * VL);             \
        }                                                                                     \
        for (int r = 0; r < R; r++) {                                                         \
            vf total = acc[r][0];                                                             \
            for (int a = 1; a < A; a++) total += acc[r][a];                                   \
            out[r * N] = sum(total);                                                          \
        }                                                                                     \
        (void)scales, (void)mins;                                                             \
    }

typedef void (*rows_fn)(const float*, int64_t, const void*, const half*, const half*,
                        float*, int64_t);

/* One format's kernels for 1, 2, 4 and 8 rows, and FMT##_kernels[R]: the one for R rows. */
#define ROWS_KERNELS(FMT, UNPACK)                                                              \
    ROWS_KERNEL(FMT, 1, UNPACK)                                                                \
    ROWS_KERNEL(FMT, 2, UNPACK)                                                                \
    ROWS_KERNEL(FMT, 4, UNPACK)                                                                \
    ROWS_KERNEL(FMT, 8, UNPACK)                                                                \
    static const rows_fn FMT##_kernels[] = {0, FMT##_rows_1, FMT##_rows_2, 0,                  \
                                            FMT##_rows_4, 0, 0, 0, FMT##_rows_8};

#define Q4_1 q4_1_block((const uint8_t*)packed, scales, mins, b, w)
#define Q8_0 q8_0_block((const int8_t*)packed, scales, b, w)
/* a plain float32 weight (bits 32): nothing to unpack, the same dot products */
#define F32 \
    for (int v = 0; v < VECTORS; v++) w[v] = load((const float*)packed + b * BLOCK + v * VL)
ROWS_KERNELS(q4_1, Q4_1)
ROWS_KERNELS(q8_0, Q8_0)
ROWS_KERNELS(f32, F32)

/* The dot kernels for a weight of `bits` (4: Q4_1, 8: Q8_0, 32: float32). */
static const rows_fn* kernels_for(int bits) {
    return bits == 4 ? q4_1_kernels : bits == 8 ? q8_0_kernels : f32_kernels;
}

/* One weight row's operands: packed bytes, scales and (Q4_1) mins of row `row`. */
typedef struct {
    const char* packed;
    const half* scales;
    const half* mins;
} weight_row;

static inline weight_row row_at(const void* packed, const half* scales, const half* mins,
                                int64_t K, int bits, int64_t row) {
    const int64_t blocks = K / BLOCK, bytes = blocks * BLOCK * bits / 8;
    weight_row w = {(const char*)packed + row * bytes, bits == 32 ? 0 : scales + row * blocks,
                    bits == 4 ? mins + row * blocks : 0};
    return w;
}

/* Dot products: every weight row n against the M rows, blocks unpacked once per 8 rows. */
static void dot_rows(const float* x, int64_t M, int64_t K, const void* packed,
                     const half* scales, const half* mins, int64_t N, int bits, float* out,
                     int threads) {
    const rows_fn* kernels = kernels_for(bits);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const weight_row w = row_at(packed, scales, mins, K, bits, n);
        for (int64_t r = 0; r < M;) {
            const int64_t left = M - r;
            const int R = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            kernels[R](x + r * K, K, w.packed, w.scales, w.mins, out + r * N + n, N);
            r += R;
        }
    }
}

/* panel[k * PANEL + j] = W[n0 + j, k] for j < cols, 0 for the columns past N. */
static void unpack_panel(const void* packed, const half* scales, const half* mins,
                         int64_t K, int bits, int64_t n0, int64_t cols, float* panel) {
    for (int64_t j = 0; j < PANEL; j++) {
        if (j >= cols) {
            for (int64_t k = 0; k < K; k++) panel[k * PANEL + j] = 0.0f;
            continue;
        }
        const weight_row row = row_at(packed, scales, mins, K, bits, n0 + j);
        for (int64_t b = 0; b < K / BLOCK; b++) {
            vf w[VECTORS];
            if (bits == 4)
                q4_1_block((const uint8_t*)row.packed, row.scales, row.mins, b, w);
            else
                q8_0_block((const int8_t*)row.packed, row.scales, b, w);
            float* column = panel + b * BLOCK * PANEL + j;
            for (int v = 0; v < VECTORS; v++)
                for (int i = 0; i < VL; i++) column[(v * VL + i) * PANEL] = w[v][i];
        }
    }
}

/* out[r, 0:cols] = x[r] @ panel for R rows: 2 x R vector accumulators across the panel's
 * columns, one broadcast of x per row and step of k. */
#define TILE_KERNEL(R)                                                                         \
    static void tile_##R(const float* x, int64_t K, const float* panel, float* out, int64_t N,   \
                         int64_t cols) {                                                       \
        vf low[R], high[R];                                                                    \
        for (int r = 0; r < R; r++) low[r] = high[r] = (vf){0};                                \
        for (int64_t k = 0; k < K; k++) {                                                      \
            const vf w0 = load(panel + k * PANEL), w1 = load(panel + k * PANEL + VL);             \
            for (int r = 0; r < R; r++) {                                                      \
                const float xr = x[r * K + k];                                                 \
                low[r] += w0 * xr;                                                             \
                high[r] += w1 * xr;                                                            \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int j = 0; j < cols; j++) out[r * N + j] = j < VL ? low[r][j] : high[r][j - VL]; \
    }
TILE_KERNEL(1)
TILE_KERNEL(2)
TILE_KERNEL(3)
TILE_KERNEL(4)
TILE_KERNEL(5)
TILE_KERNEL(6)

typedef void (*tile_fn)(const float*, int64_t, const float*, float*, int64_t, int64_t);
static const tile_fn TILES[] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6};

/* Panels: each thread unpacks PANEL output columns at a time and multiplies them with all rows.
 * Returns -1 when a thread's panel buffer cannot be allocated. */
static int panel_rows(const float* x, int64_t M, int64_t K, const void* packed,
                      const half* scales, const half* mins, int64_t N, int bits,
                      float* out, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float* panel = aligned_alloc(64, (size_t)(K * PANEL * sizeof(float) + 63) / 64 * 64);
        failed = panel == 0;
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += PANEL) {
            if (!panel) continue;
            const int64_t cols = N - n0 < PANEL ? N - n0 : PANEL;
            unpack_panel(packed, scales, mins, K, bits, n0, cols, panel);
            for (int64_t r = 0; r < M; r += TILE_ROWS) {
                const int R = M - r < TILE_ROWS ? (int)(M - r) : TILE_ROWS;
                TILES[R](x + r * K, K, panel, out + r * N + n0, N, cols);
            }
        }
        free(panel);
    }
    return failed ? -1 : 0;
}

/* out [M, N] = x [M, K] @ W.T; bits 4 (Q4_1: packed uint8 [N, K/32, 16], scales and mins
 * float16 [N, K/32]) or 8 (Q8_0: packed int8 [N, K/32, 32], scales float16 [N, K/32], mins
 * unused). All arrays contiguous. Runs on `threads` OpenMP threads (torch's own runtime).
 * Returns 0, or -1 for a bad format and -2 when memory for the panels ran out. */
int block_matmul(const float* x, int64_t M, int64_t K, const void* packed,
                 const half* scales, const half* mins, int64_t N, int bits, float* out,
                 int threads) {
    if ((bits != 4 && bits != 8) || K % BLOCK) return -1;
    if (M <= DOT_ROWS) {
        dot_rows(x, M, K, packed, scales, mins, N, bits, out, threads);
        return 0;
    }
    return panel_rows(x, M, K, packed, scales, mins, N, bits, out, threads) ? -2 : 0;
}

/* out [M, N] = x [M, K] @ W.T for a float32 weight W [N, K] (contiguous), through the dot
 * kernels: for decode batches (a few rows), where torch's GEMV streamed 11-17 GB/s of weights on
 * a 2-core EPYC and these 26-33 (numbers in operators/native/__init__.py). Returns 0, or -1
 * when K is not a multiple of 32. */
int dense_matmul(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* out,
                 int threads) {
    if (K % BLOCK) return -1;
    dot_rows(x, M, K, w, 0, 0, N, 32, out, threads);
    return 0;
}

/* out [P, N]: row p is x[p] [K] times the transpose of expert experts[p]'s weight [N, K], for
 * weights of E experts stacked as [E, N, ...] in the layouts above: a decode token's k experts
 * (P = tokens x k), read in place. Returns -1 for a bad format or an expert id outside [0, E). */
int block_matmul_experts(const float* x, int64_t P, int64_t K, const int64_t* experts, int64_t E,
                         const void* packed, const half* scales, const half* mins,
                         int64_t N, int bits, float* out, int threads) {
    if ((bits != 4 && bits != 8) || K % BLOCK) return -1;
    for (int64_t p = 0; p < P; p++)
        if (experts[p] < 0 || experts[p] >= E) return -1;
    const rows_fn one_row = kernels_for(bits)[1];
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < P * N; i++) {
        const int64_t p = i / N, n = i % N;
        const weight_row w = row_at(packed, scales, mins, K, bits, experts[p] * N + n);
        one_row(x + p * K, K, w.packed, w.scales, w.mins, out + i, N);
    }
    return 0;
}
