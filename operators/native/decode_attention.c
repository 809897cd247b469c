/* Decode attention over a static KV cache, read in place: one new query per row, attending over
 * the first lens[b] positions of its slot's keys and values (float32, [S, Hkv, L, D]).
 *
 * Why C: a compiled CPU decode step cannot take a view of a slot chosen by a tensor, so torch
 * gathered each row's keys and values into a masked copy before two batched matmuls: ~3x the
 * bytes the cache holds (95 us a layer for the gather at 1,024 positions of SmolLM2 on a 2-core
 * AVX2 EPYC, 77 us for each matmul). Here each position's key and value are read once, for all
 * the query heads that share them (grouped-query attention), and positions past a row's length
 * are never touched, so garbage (even NaN) there cannot reach the result.
 *
 * Work is split into tasks of CHUNK positions of one row and kv head, so two threads share even
 * a single row; each task keeps a running maximum, its sum of exponentials and its weighted sum
 * of values (the usual split softmax), and a second pass merges the chunks of each query head.
 *
 * In a decode step the cache comes from memory, not from the core's caches (30 layers of it), and
 * a task used to wait for its keys, compute, then wait for its values: while it scores the first
 * query head it now prefetches the chunk's values, while it scores the second the next chunk's
 * keys. SmolLM2's shape at 1,024 positions, 30 caches in turn, 2 threads on a 2-core AVX2 EPYC
 * (2026-11-30, one process, alternating): 209 -> 165 us a call; Llama-3-8B's at 4,096 within the
 * noise (4.0-4.7 ms both ways, ~8 GB/s of the memory's ~17).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vectors.h"

#define CHUNK 128 /* positions per task */

/* Ask the memory for rows [p, p + 4) of `ahead` (rows of D floats), if any, while the core
 * computes: see attend_chunk. */
static inline void prefetch_rows(const float* ahead, int64_t p, int64_t D) {
    if (!ahead) return;
    for (int64_t i = p * D; i < (p + 4) * D; i += 16) __builtin_prefetch(ahead + i);
}

/* scores[p] = scale * q . k[p] for n positions: four positions at a time, so that four
 * independent chains of additions keep the core busy (one chain waits on each addition). The
 * same positions of `ahead` (if not NULL) are prefetched along the way. */
static void score_chunk(const float* q, int64_t D, const float* k, int64_t n, float scale,
                        const float* ahead, float* scores) {
    int64_t p = 0;
    for (; p + 4 <= n; p += 4) {
        prefetch_rows(ahead, p, D);
        vf a0 = (vf){0}, a1 = (vf){0}, a2 = (vf){0}, a3 = (vf){0};
        for (int64_t d = 0; d < D; d += VL) {
            const vf x = load(q + d);
            a0 += x * load(k + p * D + d);
            a1 += x * load(k + (p + 1) * D + d);
            a2 += x * load(k + (p + 2) * D + d);
            a3 += x * load(k + (p + 3) * D + d);
        }
        scores[p] = sum(a0) * scale;
        scores[p + 1] = sum(a1) * scale;
        scores[p + 2] = sum(a2) * scale;
        scores[p + 3] = sum(a3) * scale;
    }
    for (; p < n; p++) {
        vf a = (vf){0};
        for (int64_t d = 0; d < D; d += VL) a += load(q + d) * load(k + p * D + d);
        scores[p] = sum(a) * scale;
    }
}

/* acc [G, D] = sum over p of weights[g, p] * v[p] (weights [G, n]): position by position, so
 * each value row streams in once, in order, for all G heads; the G x D sums stay in the core's
 * first-level cache. For chunks too large for that cache (see weigh_values). */
static void weigh_streaming(const float* weights, const float* v, int64_t n, int64_t G,
                            int64_t D, float* acc) {
    memset(acc, 0, (size_t)(G * D) * sizeof(float));
    for (int64_t p = 0; p < n; p++)
        for (int64_t g = 0; g < G; g++) {
            const float w = weights[g * n + p];
            for (int64_t d = 0; d < D; d += VL) {
                const vf total = load(acc + g * D + d) + w * load(v + p * D + d);
                memcpy(acc + g * D + d, &total, sizeof total);
            }
        }
}

/* acc [G, D] = sum over p of weights[g, p] * v[p] (weights [G, n]), GB heads and NV vectors of
 * D at a time: their GB x NV sums stay in registers while the positions stream by (the chunk's
 * values come from the core's cache after the first pass). */
#define WEIGH_BLOCK(GB, NV)                                                                    \
    static void weigh_##GB##_##NV(const float* weights, const float* v, int64_t n, int64_t D,  \
                                  float* acc) {                                               \
        for (int64_t d = 0; d < D; d += NV * VL) {                                            \
            vf a[GB][NV];                                                                     \
            for (int g = 0; g < GB; g++)                                                      \
                for (int j = 0; j < NV; j++) a[g][j] = (vf){0};                               \
            for (int64_t p = 0; p < n; p++) {                                                 \
                vf x[NV];                                                                     \
                for (int j = 0; j < NV; j++) x[j] = load(v + p * D + d + j * VL);             \
                for (int g = 0; g < GB; g++) {                                                \
                    const float w = weights[g * n + p];                                       \
                    for (int j = 0; j < NV; j++) a[g][j] += w * x[j];                         \
                }                                                                             \
            }                                                                                 \
            for (int g = 0; g < GB; g++)                                                      \
                for (int j = 0; j < NV; j++)                                                  \
                    memcpy(acc + g * D + d + j * VL, &a[g][j], sizeof a[g][j]);               \
        }                                                                                     \
    }
#define WEIGH_BLOCKS(NV) \
    WEIGH_BLOCK(1, NV) WEIGH_BLOCK(2, NV) WEIGH_BLOCK(3, NV) WEIGH_BLOCK(4, NV)
WEIGH_BLOCKS(1)
WEIGH_BLOCKS(2)

typedef void (*weigh_fn)(const float*, const float*, int64_t, int64_t, float*);
static const weigh_fn weigh_kernels[2][5] = {
    {0, weigh_1_1, weigh_2_1, weigh_3_1, weigh_4_1},
    {0, weigh_1_2, weigh_2_2, weigh_3_2, weigh_4_2},
};

/* The sums of a task (see weigh_streaming). When the chunk's values fit the first-level cache
 * (D <= 64: 32 KB), blocks of sums in registers, the values re-read from that cache once per
 * block: SmolLM2's (D 64) 1.2x faster on a 2-core AVX2 EPYC (2026-11-30); Llama-3-8B's (D 128)
 * 1.1x slower at 4,096 positions, so those keep streaming. */
static void weigh_values(const float* weights, const float* v, int64_t n, int64_t G, int64_t D,
                         float* acc) {
    if (CHUNK * D * (int64_t)sizeof(float) > 32 * 1024) {
        weigh_streaming(weights, v, n, G, D, acc);
        return;
    }
    const weigh_fn* kernels = weigh_kernels[D % (2 * VL) == 0];
    for (int64_t g = 0; g < G; g += 4) {
        const int64_t heads = G - g < 4 ? G - g : 4;
        kernels[heads](weights + g * n, v, n, D, acc + g * D);
    }
}

/* exp(x) of a vector of x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2 / 2,
 * e^r by a polynomial of degree 7, and 2^n written into the exponent bits. Within 1 ulp of expf
 * (every float in [-87, 0] checked); 0 below -87 (where e^x leaves float's normal range). expf
 * one value at a time took a third of this kernel's time (SmolLM2 at 1,024 positions, 2-core
 * AVX2 EPYC, 2026-11-30). */
static inline vf exp_nonpositive(vf x) {
    typedef int32_t vmask __attribute__((vector_size(VL * 4)));
    const vmask under = x < -87.0f; /* all ones where e^x is taken as 0 */
    x = (vf)((vmask)x & ~under);    /* those lanes computed at 0, then cleared */
    const vf rounder = (vf){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (x * 1.44269504f + rounder) - rounder;
    const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    vf y = (vf){0} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const vmask scale = (__builtin_convertvector(n, vmask) + 127) << 23;
    return (vf)((vmask)(y * (vf)scale) & ~under);
}

/* One task: G query heads q [G, D] against n positions of keys/values k, v [n, D]. Writes each
 * head's maximum score, its sum of exp(score - maximum) and the values weighted by those
 * exponentials (acc [G, D]); `scores` is room for G * n floats. The chunk's keys come from
 * memory for the first head and from the core's cache for the others. */
static void attend_chunk(const float* q, int64_t G, int64_t D, const float* k, const float* v,
                         int64_t n, const float* next_k, float scale, float* scores,
                         float* maxima, float* sums, float* acc) {
    for (int64_t g = 0; g < G; g++) {
        float* mine = scores + g * n;
        score_chunk(q + g * D, D, k, n, scale, g == 0 ? v : g == 1 ? next_k : NULL, mine);
        float top = mine[0], total = 0.0f;
        for (int64_t p = 1; p < n; p++) top = mine[p] > top ? mine[p] : top;
        int64_t p = 0;
        for (; p + VL <= n; p += VL) {
            const vf e = exp_nonpositive(load(mine + p) - top);
            memcpy(mine + p, &e, sizeof e);
            total += sum(e);
        }
        for (; p < n; p++) total += mine[p] = expf(mine[p] - top);
        maxima[g] = top;
        sums[g] = total;
    }
    weigh_values(scores, v, n, G, D, acc);
}

/* out [B, Hq, D] = softmax(scale * q k^T) v for each row b over positions [0, lens[b]) of slot
 * slots[b]; query head h reads kv head h / (Hq / Hkv). All arrays contiguous float32 (slots and
 * lens int64). Returns 0; -1 when D is not a multiple of the vector width or Hq of Hkv; -2 for
 * a slot outside [0, S) or a length outside [1, L]; -3 when scratch memory ran out. */
int decode_attention(const float* q, int64_t B, int64_t Hq, int64_t D, const float* k_cache,
                     const float* v_cache, int64_t S, int64_t Hkv, int64_t L,
                     const int64_t* slots, const int64_t* lens, float scale, float* out,
                     int threads) {
    if (D % VL || Hkv <= 0 || Hq % Hkv) return -1;
    const int64_t G = Hq / Hkv;
    int64_t tasks = 0;
    for (int64_t b = 0; b < B; b++) {
        if (slots[b] < 0 || slots[b] >= S || lens[b] < 1 || lens[b] > L) return -2;
        tasks += Hkv * ((lens[b] + CHUNK - 1) / CHUNK);
    }
    /* per task: scores [G, CHUNK], maxima [G], sums [G], acc [G, D] */
    const int64_t stride = G * (CHUNK + 2 + D);
    float* scratch = malloc((size_t)(tasks > 0 ? tasks : 1) * stride * sizeof(float));
    if (!scratch) return -3;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t b = 0, first = 0, chunks = (lens[0] + CHUNK - 1) / CHUNK;
            while (t >= first + Hkv * chunks) { /* the row this task belongs to */
                first += Hkv * chunks;
                b++;
                chunks = (lens[b] + CHUNK - 1) / CHUNK;
            }
            const int64_t h = (t - first) / chunks, start = (t - first) % chunks * CHUNK;
            const int64_t n = lens[b] - start < CHUNK ? lens[b] - start : CHUNK;
            const int64_t at = ((slots[b] * Hkv + h) * L + start) * D;
            float* mine = scratch + t * stride;
            const float* next_k = start + n < lens[b] ? k_cache + at + n * D : NULL;
            attend_chunk(q + (b * Hq + h * G) * D, G, D, k_cache + at, v_cache + at, n, next_k,
                         scale, mine, mine + G * CHUNK, mine + G * (CHUNK + 1),
                         mine + G * (CHUNK + 2));
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * Hq; i++) { /* merge the chunks of row b, query head i % Hq */
            const int64_t b = i / Hq, h = i % Hq / G, g = i % G;
            int64_t first = 0;
            for (int64_t r = 0; r < b; r++) first += Hkv * ((lens[r] + CHUNK - 1) / CHUNK);
            const int64_t chunks = (lens[b] + CHUNK - 1) / CHUNK;
            const float* part = scratch + (first + h * chunks) * stride;
            float top = -INFINITY, total = 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                const float m = part[c * stride + G * CHUNK + g];
                top = m > top ? m : top;
            }
            float* o = out + i * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                const float* chunk = part + c * stride;
                const float factor = expf(chunk[G * CHUNK + g] - top);
                total += chunk[G * (CHUNK + 1) + g] * factor;
                for (int64_t d = 0; d < D; d++) o[d] += chunk[G * (CHUNK + 2) + g * D + d] * factor;
            }
            for (int64_t d = 0; d < D; d++) o[d] /= total;
        }
    }
    free(scratch);
    return 0;
}
