/*
 * lowbit CPU LUT kernel: y = x W^T for weights stored as b-bit codes (b = 2, 3, 4)
 * through a lookup table, with activations quantized to int8 per block of 32 and
 * integer dot products on AVX-512 VNNI (vpdpbusd).
 *
 * Plain C (no Python or torch headers), built by setup.py as a shared library
 * and called through ctypes (lowbit/kernels/cpu_lut.py documents the layouts and
 * the numerics; keep the two in step). Every AVX-512 function carries a target
 * attribute, so the file compiles with plain -O3 anywhere; callers must check
 * lowbit_lut_cpu_supported() first.
 *
 * Weight layout (built by cpu_lut.prepare): tiles of 16 output rows, blocks of 32
 * input columns; one tile-block is `bits` vectors of 64 bytes:
 *   vector v (v = 0..7) holds codes for k = 4v..4v+3 of the block; byte p of it is
 *   row p/4, column 4v + p%4 (so a 32-bit lane of vpdpbusd is one row, 4 columns).
 *   2 bits: plane j (j = 0,1) byte p = sum_t code(v=4j+t)[p] << 2t
 *   4 bits: plane j (j = 0..3) byte p = code(v=2j)[p] | code(v=2j+1)[p] << 4
 *   3 bits: planes 0,1 hold the low 2 bits as in the 2-bit layout, plane 2 byte p
 *           bit t = bit 2 of code(v=t)[p].
 * Scales [tiles][groups][16] float32; offsets the same or NULL; zero points (used when
 * offsets is NULL) [tiles][groups][16] uint8, meaning offset = -(zero * scale), or NULL.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#include "pool.h"

#define TILE_N 16
#define BLOCK_K 32
#define BC_MAX 8 /* activation rows per pass over a tile (register budget) */
#ifndef BC_LIMIT_3
#define BC_LIMIT_3 6 /* 3-bit unpacking needs more registers: 8 rows spill (measured) */
#endif
#ifndef BC_LIMIT_4
#define BC_LIMIT_4 8
#endif
#define CHUNK_TILES 4 /* tiles per unit of work handed to a thread */

#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

int lowbit_lut_abi_version(void) { return 4; }

int lowbit_lut_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
}

/* One row of activations -> int8 codes per block of 32 (zero padded to kpad),
 * block scales d = amax / 127, and per-group sums sum_b d_b * sum(xq_b).
 *   id = d ? 1/d : 0;  xq = clamp(round_half_even(x * id), -127, 127)            */
TARGET static void quantize_row(const float *x, int64_t K, int64_t kpad, int64_t bpg,
                                int8_t *xq, float *xd, float *xg) {
    const int64_t nblk = kpad / BLOCK_K;
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    float gsum = 0.0f;
    for (int64_t b = 0; b < nblk; b++) {
        int64_t k0 = b * BLOCK_K;
        int64_t left = K - k0;
        __mmask16 m0 = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
        int64_t left1 = left - 16;
        __mmask16 m1 = left1 >= 16 ? 0xFFFF : (left1 <= 0 ? 0 : (__mmask16)((1u << left1) - 1));
        __m512 a = _mm512_maskz_loadu_ps(m0, x + k0);
        __m512 c = _mm512_maskz_loadu_ps(m1, x + k0 + 16);
        __m512 amax = _mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, c));
        float m = _mm512_reduce_max_ps(amax);
        float d = m / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        __m512 idv = _mm512_set1_ps(id);
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, idv)); /* MXCSR default: nearest even */
        __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, idv));
        qa = _mm512_min_epi32(_mm512_max_epi32(qa, lo), hi);
        qc = _mm512_min_epi32(_mm512_max_epi32(qc, lo), hi);
        _mm_storeu_si128((__m128i *)(xq + k0), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(xq + k0 + 16), _mm512_cvtepi32_epi8(qc));
        int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
        xd[b] = d;
        gsum += d * (float)s;
        if ((b + 1) % bpg == 0) {
            xg[b / bpg] = gsum;
            gsum = 0.0f;
        }
    }
}

/* Unpack vector v of a tile-block (compile-time BITS and v after inlining). */
INLINE TARGET __m512i unpack(const int BITS, const __m512i *P, const int v) {
    const __m512i m3 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi8(4), m15 = _mm512_set1_epi8(15);
    if (BITS == 2) {
        return _mm512_and_si512(_mm512_srli_epi16(P[v >> 2], 2 * (v & 3)), m3);
    } else if (BITS == 4) {
        return _mm512_and_si512(_mm512_srli_epi16(P[v >> 1], 4 * (v & 1)), m15);
    } else {
        __m512i low = _mm512_and_si512(_mm512_srli_epi16(P[v >> 2], 2 * (v & 3)), m3);
        __m512i h = v <= 2 ? _mm512_slli_epi16(P[2], 2 - v) : _mm512_srli_epi16(P[2], v - 2);
        return _mm512_ternarylogic_epi32(low, h, m4, 0xF8); /* low | (h & 4) */
    }
}

INLINE int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One tile of 16 rows against BC activation rows. */
INLINE TARGET void tile_kernel(const int BC, const int BITS, const int TBL, const uint8_t *wt,
                               const float *st, const float *ot, const uint8_t *zt, __m512i tbl,
                               const int8_t *xq,
                               int64_t kpad, const float *xd, const float *xg, int64_t ng,
                               int64_t bpg, float gamma, float *y, int64_t N, __mmask16 omask) {
    const int64_t nblk = kpad / BLOCK_K;
    __m512 acc[BC_MAX];
    for (int i = 0; i < BC; i++) acc[i] = _mm512_setzero_ps();
    const __m512i *wp = (const __m512i *)wt;
    const __m512 gv = _mm512_set1_ps(gamma);
    for (int64_t g = 0; g < ng; g++) {
        __m512 f[BC_MAX];
        for (int i = 0; i < BC; i++) f[i] = _mm512_setzero_ps();
        for (int64_t blk = g * bpg; blk < (g + 1) * bpg; blk++) {
            __m512i P[4];
            for (int j = 0; j < BITS; j++) P[j] = _mm512_loadu_si512(wp + j);
            wp += BITS;
            __m512i s[BC_MAX];
            for (int i = 0; i < BC; i++) s[i] = _mm512_setzero_si512();
            const int8_t *xb = xq + blk * BLOCK_K;
            for (int v = 0; v < 8; v++) {
                __m512i w = unpack(BITS, P, v);
                if (TBL) w = _mm512_shuffle_epi8(tbl, w);
                for (int i = 0; i < BC; i++)
                    s[i] = _mm512_dpbusd_epi32(s[i], w, _mm512_set1_epi32(load_i32(xb + i * kpad + 4 * v)));
            }
            for (int i = 0; i < BC; i++)
                f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), _mm512_set1_ps(xd[i * nblk + blk]), f[i]);
        }
        const __m512 sv = _mm512_loadu_ps(st + g * TILE_N);
        for (int i = 0; i < BC; i++) {
            __m512 xgv = _mm512_set1_ps(xg[i * ng + g]);
            acc[i] = _mm512_fmadd_ps(sv, _mm512_fmadd_ps(gv, xgv, f[i]), acc[i]);
            if (ot) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(ot + g * TILE_N), xgv, acc[i]);
            if (zt) { /* acc - (z * s) * X: the same roundings as a float offset -(z * s) */
                __m128i zb = _mm_loadu_si128((const __m128i *)(zt + g * TILE_N));
                __m512 zs = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)), sv);
                acc[i] = _mm512_fnmadd_ps(zs, xgv, acc[i]);
            }
        }
    }
    for (int i = 0; i < BC; i++) _mm512_mask_storeu_ps(y + i * N, omask, acc[i]);
}

#define TILE_ARGS wt, st, ot, zt, tbl, xq, kpad, xd, xg, ng, bpg, gamma, y, N, omask
#define BC_CASES(BITS, TBL)                                          \
    switch (bc) {                                                    \
    case 1: tile_kernel(1, BITS, TBL, TILE_ARGS); break;             \
    case 2: tile_kernel(2, BITS, TBL, TILE_ARGS); break;             \
    case 3: tile_kernel(3, BITS, TBL, TILE_ARGS); break;             \
    case 4: tile_kernel(4, BITS, TBL, TILE_ARGS); break;             \
    case 5: tile_kernel(5, BITS, TBL, TILE_ARGS); break;             \
    case 6: tile_kernel(6, BITS, TBL, TILE_ARGS); break;             \
    case 7: tile_kernel(7, BITS, TBL, TILE_ARGS); break;             \
    default: tile_kernel(8, BITS, TBL, TILE_ARGS); break;            \
    }

TARGET static void run_tile(int bits, int use_tbl, int bc, const uint8_t *wt, const float *st,
                            const float *ot, const uint8_t *zt, __m512i tbl, const int8_t *xq,
                            int64_t kpad,
                            const float *xd, const float *xg, int64_t ng, int64_t bpg, float gamma,
                            float *y, int64_t N, __mmask16 omask) {
    if (bits == 2) {
        if (use_tbl) { BC_CASES(2, 1) } else { BC_CASES(2, 0) }
    } else if (bits == 3) {
        if (use_tbl) { BC_CASES(3, 1) } else { BC_CASES(3, 0) }
    } else {
        if (use_tbl) { BC_CASES(4, 1) } else { BC_CASES(4, 0) }
    }
}

/* Quantize activations only (exposed so tests can compare them with the torch twin).
 * x [B, K] float32; xq [B, kpad] int8; xd [B, kpad/32]; xg [B, kpad/group]. */
TARGET static void quantize_rows(const float *x, int64_t B, int64_t K, int64_t kpad,
                                  int64_t group, int8_t *xq, float *xd, float *xg) {
    for (int64_t b = 0; b < B; b++)
        quantize_row(x + b * K, K, kpad, group / BLOCK_K, xq + b * kpad, xd + b * (kpad / BLOCK_K),
                     xg + b * (kpad / group));
}

int lowbit_lut_quantize_activations(const float *x, int64_t B, int64_t K, int64_t kpad,
                                    int64_t group, int8_t *xq, float *xd, float *xg) {
    if (!lowbit_lut_cpu_supported()) return -1;
    if (kpad % BLOCK_K || group % BLOCK_K || kpad % group || K > kpad) return -2;
    quantize_rows(x, B, K, kpad, group, xq, xd, xg);
    return 0;
}

/* y [B, N] = x [B, K] W^T, see the file comment for the weight layout.
 *   kpad: K rounded up to 32 (the codes are padded; padded activations are 0)
 *   group: columns per scale group (multiple of 32, divides kpad)
 *   table: 16 bytes, code -> unsigned integer weight (NULL: the code itself)
 *   gamma: w = scale * (table[code] + gamma) + offset  (offset = -(zero * scale) with zeros)
 * Returns 0, or a negative number on bad arguments / unsupported CPU / no memory. */
typedef struct {
    const uint8_t *w;
    const float *scale, *offset;
    const uint8_t *zeros;
    const int8_t *xq;
    const float *xd, *xg;
    const uint8_t *table;
    float *y;
    int64_t B, N, kpad, ng, bpg, ntiles;
    int bits;
    float gamma;
} job_t;

TARGET static void run_chunk(void *arg, int64_t chunk) {
    const job_t *j = (const job_t *)arg;
    const int64_t nblk = j->kpad / BLOCK_K, ng = j->ng;
    const size_t tile_bytes = (size_t)nblk * 64 * j->bits;
    __m512i tbl = _mm512_setzero_si512();
    if (j->table) tbl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)j->table));
    const int64_t t1 = (chunk + 1) * CHUNK_TILES < j->ntiles ? (chunk + 1) * CHUNK_TILES : j->ntiles;
    for (int64_t t = chunk * CHUNK_TILES; t < t1; t++) {
        const int64_t n0 = t * TILE_N;
        const int64_t rows = j->N - n0 < TILE_N ? j->N - n0 : TILE_N;
        const __mmask16 omask = rows == TILE_N ? 0xFFFF : (__mmask16)((1u << rows) - 1);
        const uint8_t *wt = j->w + t * tile_bytes;
        const float *st = j->scale + t * ng * TILE_N;
        const float *ot = j->offset ? j->offset + t * ng * TILE_N : NULL;
        const uint8_t *zt = j->zeros ? j->zeros + t * ng * TILE_N : NULL;
        /* the batch in passes of at most `limit` rows, balanced (8 rows at limit 6: 4 + 4) */
        const int limit = j->bits == 3 ? BC_LIMIT_3 : j->bits == 4 ? BC_LIMIT_4 : BC_MAX;
        const int64_t passes = (j->B + limit - 1) / limit;
        for (int64_t pass = 0, b0 = 0; pass < passes; pass++) {
            int bc = (int)(j->B / passes + (pass < j->B % passes));
            run_tile(j->bits, j->table != NULL, bc, wt, st, ot, zt, tbl, j->xq + b0 * j->kpad, j->kpad,
                     j->xd + b0 * nblk, j->xg + b0 * ng, ng, j->bpg, j->gamma, j->y + b0 * j->N + n0,
                     j->N, omask);
            b0 += bc;
        }
    }
}

static int linear_impl(const float *x, int64_t B, int64_t K, int64_t kpad, const uint8_t *w,
                       int64_t N, int bits, int64_t group, const uint8_t *table, float gamma,
                       const float *scale, const float *offset, const uint8_t *zeros, float *y,
                       int nthreads) {
    const int64_t nblk = kpad / BLOCK_K, ng = kpad / group, bpg = group / BLOCK_K;
    const int64_t ntiles = (N + TILE_N - 1) / TILE_N;
    size_t xq_bytes = ((size_t)(B * kpad) + 63) & ~(size_t)63;
    size_t xd_bytes = ((size_t)(B * nblk * 4) + 63) & ~(size_t)63;
    size_t xg_bytes = ((size_t)(B * ng * 4) + 63) & ~(size_t)63;
    uint8_t *ws = aligned_alloc(64, xq_bytes + xd_bytes + xg_bytes);
    if (!ws) return -3;
    int8_t *xq = (int8_t *)ws;
    float *xd = (float *)(ws + xq_bytes);
    float *xg = (float *)(ws + xq_bytes + xd_bytes);
    quantize_rows(x, B, K, kpad, group, xq, xd, xg);
    job_t job = {w, scale, offset, zeros, xq, xd, xg, table, y, B, N, kpad, ng, bpg, ntiles, bits, gamma};
    lowbit_parallel_for(run_chunk, &job, (ntiles + CHUNK_TILES - 1) / CHUNK_TILES, nthreads);
    free(ws);
    return 0;
}

int lowbit_lut_linear(const float *x, int64_t B, int64_t K, int64_t kpad, const uint8_t *w,
                      int64_t N, int bits, int64_t group, const uint8_t *table, float gamma,
                      const float *scale, const float *offset, const uint8_t *zeros, float *y,
                      int nthreads) {
    if (!lowbit_lut_cpu_supported()) return -1;
    if (bits < 2 || bits > 4 || kpad % BLOCK_K || group % BLOCK_K || kpad % group || K > kpad ||
        B < 1 || N < 1)
        return -2;
    if (offset && zeros) return -2;
    return linear_impl(x, B, K, kpad, w, N, bits, group, table, gamma, scale, offset, zeros, y,
                       nthreads);
}

/* Memory-bandwidth probe for benchmarks: stream-read `bytes` bytes (a multiple of 64)
 * through the same thread pool as the kernel, 1 MiB per chunk, and add them up as
 * 64-bit integers (one add per 64 bytes, far below the load rate). */
typedef struct {
    const uint8_t *p;
    int64_t bytes;
    int64_t *sums;
} probe_t;

#define PROBE_CHUNK (1 << 20)

TARGET static void probe_chunk(void *arg, int64_t chunk) {
    const probe_t *j = (const probe_t *)arg;
    const int64_t a = chunk * PROBE_CHUNK;
    const int64_t b = a + PROBE_CHUNK < j->bytes ? a + PROBE_CHUNK : j->bytes;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = a;
    for (; i + 256 <= b; i += 256) {
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(j->p + i));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(j->p + i + 64));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(j->p + i + 128));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(j->p + i + 192));
    }
    for (; i + 64 <= b; i += 64) s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(j->p + i));
    j->sums[chunk] = _mm512_reduce_add_epi64(
        _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
}

/* Returns the integer sum (so the reads cannot be optimized away), or 0 when unsupported. */
int64_t lowbit_lut_read_probe(const void *p, int64_t bytes, int nthreads) {
    if (!lowbit_lut_cpu_supported() || bytes <= 0) return 0;
    const int64_t chunks = (bytes + PROBE_CHUNK - 1) / PROBE_CHUNK;
    int64_t *sums = calloc((size_t)chunks, sizeof(int64_t));
    if (!sums) return 0;
    probe_t job = {(const uint8_t *)p, bytes, sums};
    lowbit_parallel_for(probe_chunk, &job, chunks, nthreads);
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; c++) total += sums[c];
    free(sums);
    return total;
}
