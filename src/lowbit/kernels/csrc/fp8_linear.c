/*
 * lowbit CPU FP8 kernel: y = x W^T with W stored as FP8 (E4M3 or E5M2) bytes, one float32
 * scale per output row, float32 activations. Weights are read once per call at one byte
 * each and widened in registers; nothing is dequantized to memory.
 *
 * Widening without a table: an FP8 byte moved into the top of a 16-bit lane is an IEEE
 * half-precision number (F16C's vcvtph2ps then gives float32 exactly):
 *   E5M2 (1-5-2, bias 15) is the upper byte of a float16: h = b << 8, value = v.
 *   E4M3 (1-4-3, bias 7):   h = sign(b) << 15 | (b & 0x7f) << 7, a float16 with exponent
 *                            field 0EEEE, so value = v * 2**-8 for normal and subnormal
 *                            codes alike (float16 subnormals cover E4M3's); the 2**8 is
 *                            folded into the row scale by the caller.
 * The only E4M3 code this maps wrongly is NaN (0x7f / 0xff), which lowbit never stores
 * (its FP8 rounding saturates).
 *
 * Loop: tiles of 4 output rows x 2 activation rows, 32 weights per step: 32 bytes -> 32
 * halves -> two vectors of 16 floats, one FMA per activation row and vector, 16
 * independent accumulators. Each row sum is reduced once, then multiplied by the row
 * scale. Rows are split over the thread pool (pool.c) in chunks of 16; larger batches
 * re-read a tile's 4 weight rows from L1 once per pair of activation rows.
 *
 * Plain C (no Python or torch headers), built into the same shared library as
 * lut_linear.c by setup.py and called through ctypes (lowbit/kernels/cpu_fp8.py).
 */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#include "pool.h"

#define FP8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
#define FP8_ROWS_PER_CHUNK 16
#define FP8_R 4  /* output rows per tile (their weights share each activation load) */
#define FP8_BC 2 /* activation rows per tile: 4 x 2 x 2 = 16 accumulators (register budget) */

int lowbit_fp8_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
}

typedef struct {
    const float *x;
    const uint8_t *w;
    const float *scale;
    float *y;
    int64_t B, K, N;
    int e4m3;
} fp8_job_t;

/* 32 FP8 bytes (masked) -> float16 bit patterns in 32 lanes */
FP8_TARGET static inline __m512i widen(const uint8_t *p, __mmask32 m, int e4m3) {
    __m512i h = _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, p)), 8);
    if (!e4m3) return h;
    const __m512i sign = _mm512_set1_epi16((short)0x8000), mag = _mm512_set1_epi16(0x7f00);
    return _mm512_or_si512(_mm512_and_si512(h, sign), _mm512_srli_epi16(_mm512_and_si512(h, mag), 1));
}

/* R output rows x BC activation rows, accumulated in R*BC*2 independent registers (enough
 * chains to hide the FMA latency at batch 1); R and BC are constants at every call site, so
 * the loops unroll and the accumulators stay in registers. */
FP8_TARGET __attribute__((always_inline)) static inline void fp8_tile(const fp8_job_t *j, int64_t n, int64_t b0,
                                                                      const int R, const int BC) {
    const int64_t K = j->K, kfull = K & ~(int64_t)31;
    const int rest = (int)(K - kfull);
    const float *xb = j->x + b0 * K;
    __m512 acc[FP8_R][FP8_BC][2];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < BC; b++) acc[r][b][0] = acc[r][b][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kfull; k += 32) {
        __m512 xv[FP8_BC][2];
        for (int b = 0; b < BC; b++) {
            xv[b][0] = _mm512_loadu_ps(xb + b * K + k);
            xv[b][1] = _mm512_loadu_ps(xb + b * K + k + 16);
        }
        for (int r = 0; r < R; r++) {
            const __m512i h = widen(j->w + (n + r) * K + k, 0xffffffffu, j->e4m3);
            const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
            const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
            for (int b = 0; b < BC; b++) {
                acc[r][b][0] = _mm512_fmadd_ps(xv[b][0], lo, acc[r][b][0]);
                acc[r][b][1] = _mm512_fmadd_ps(xv[b][1], hi, acc[r][b][1]);
            }
        }
    }
    if (rest) {
        const __mmask32 m = (__mmask32)((UINT64_C(1) << rest) - 1);
        const __mmask16 mlo = (__mmask16)(m & 0xffff), mhi = (__mmask16)(m >> 16);
        __m512 xv[FP8_BC][2];
        for (int b = 0; b < BC; b++) {
            xv[b][0] = _mm512_maskz_loadu_ps(mlo, xb + b * K + kfull);
            xv[b][1] = _mm512_maskz_loadu_ps(mhi, xb + b * K + kfull + 16);
        }
        for (int r = 0; r < R; r++) {
            const __m512i h = widen(j->w + (n + r) * K + kfull, m, j->e4m3);
            const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
            const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
            for (int b = 0; b < BC; b++) {
                acc[r][b][0] = _mm512_fmadd_ps(xv[b][0], lo, acc[r][b][0]);
                acc[r][b][1] = _mm512_fmadd_ps(xv[b][1], hi, acc[r][b][1]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < BC; b++)
            j->y[(b0 + b) * j->N + n + r] =
                _mm512_reduce_add_ps(_mm512_add_ps(acc[r][b][0], acc[r][b][1])) * j->scale[n + r];
}

#define FP8_TILE_CASE(R, BC) \
    if (rc == R && bc == BC) { fp8_tile(j, n, b0, R, BC); continue; }

FP8_TARGET static void fp8_rows(void *arg, int64_t chunk) {
    const fp8_job_t *j = (const fp8_job_t *)arg;
    const int64_t n0 = chunk * FP8_ROWS_PER_CHUNK;
    const int64_t n1 = n0 + FP8_ROWS_PER_CHUNK < j->N ? n0 + FP8_ROWS_PER_CHUNK : j->N;
    for (int64_t n = n0; n < n1; n += FP8_R) {
        const int rc = (int)(n1 - n < FP8_R ? n1 - n : FP8_R);
        for (int64_t b0 = 0; b0 < j->B; b0 += FP8_BC) {
            const int bc = (int)(j->B - b0 < FP8_BC ? j->B - b0 : FP8_BC);
            FP8_TILE_CASE(4, 2)
            FP8_TILE_CASE(4, 1)
            FP8_TILE_CASE(3, 2)
            FP8_TILE_CASE(3, 1)
            FP8_TILE_CASE(2, 2)
            FP8_TILE_CASE(2, 1)
            FP8_TILE_CASE(1, 2)
            FP8_TILE_CASE(1, 1)
        }
    }
}

/* x [B, K] float32, w [N, K] FP8 bytes, scale [N] float32 (E4M3: already times 2**8),
 * y [B, N] float32. Returns 0, -1 (CPU lacks AVX-512 BW/VL or F16C), -2 (bad sizes). */
int lowbit_fp8_linear(const float *x, int64_t B, int64_t K, const uint8_t *w, int64_t N,
                      const float *scale, int e4m3, float *y, int nthreads) {
    if (!lowbit_fp8_cpu_supported()) return -1;
    if (B < 1 || K < 1 || N < 1) return -2;
    fp8_job_t job = {x, w, scale, y, B, K, N, e4m3 != 0};
    lowbit_parallel_for(fp8_rows, &job, (N + FP8_ROWS_PER_CHUNK - 1) / FP8_ROWS_PER_CHUNK, nthreads);
    return 0;
}
