/* y = x W^T (+ bias) in float32 for a few rows, with AVX-512: the sampler's decode products.
 * Built and loaded by rlhf/decode_linear.py, which says why and what it measured.
 *
 * W is packed as blocks of 16 output columns, [ceil(N / 16)][K][16] (zero columns past N), so a
 * thread streams its blocks from memory in order. Each block is multiplied with 16 rows of x at a
 * time: 16 accumulators of 16 columns, one FMA per row and input k. K is summed in segments
 * (bounds[0] = 0 < ... < bounds[segments] = K), each from zero in the order of k, and the
 * segments' sums are added in order: the caller picks the segments that give oneDNN's own sums. */
#include <immintrin.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* bytes ahead of the weight being read that are fetched into the cache: the products start cold
 * on every call and read each weight once, so the streamer alone leaves the FMAs waiting */
#define PREFETCH_BYTES 4096

int rlhf_decode_linear(const float *x, long x_row_stride, const float *packed, const float *bias,
                       float *y, long y_row_stride, int rows, int k_size, int n_size,
                       const int *bounds, int segments, int threads)
{
    int tiles = (rows + 15) / 16, blocks = (n_size + 15) / 16;
    /* x transposed per tile of 16 rows, [tiles][K][16]: the 16 values one k multiplies sit in
     * one cache line (rows past the last are zero; their sums are not stored) */
    float *x_tiles = aligned_alloc(64, (size_t)tiles * k_size * 16 * sizeof(float));
    if (x_tiles == NULL)
        return 1;
    memset(x_tiles, 0, (size_t)tiles * k_size * 16 * sizeof(float));
    for (int r = 0; r < rows; r++) {
        const float *source = x + (size_t)r * x_row_stride;
        float *target = x_tiles + (size_t)(r / 16) * k_size * 16 + r % 16;
        for (int k = 0; k < k_size; k++)
            target[(size_t)k * 16] = source[k];
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int block = 0; block < blocks; block++) {
        const float *w = packed + (size_t)block * k_size * 16;
        int columns = n_size - block * 16 < 16 ? n_size - block * 16 : 16;
        __mmask16 column_mask = (__mmask16)((1u << columns) - 1);
        __m512 bias_vector = bias ? _mm512_maskz_loadu_ps(column_mask, bias + block * 16) : _mm512_setzero_ps();
        for (int tile = 0; tile < tiles; tile++) {
            const float *x_tile = x_tiles + (size_t)tile * k_size * 16;
            __m512 total[16];
            for (int segment = 0; segment < segments; segment++) {
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0,
                       a8 = a0, a9 = a0, a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
                for (int k = bounds[segment]; k < bounds[segment + 1]; k++) {
                    _mm_prefetch((const char *)(w + (size_t)k * 16) + PREFETCH_BYTES, _MM_HINT_T0);
                    __m512 weights = _mm512_loadu_ps(w + (size_t)k * 16);
                    const float *xk = x_tile + (size_t)k * 16;
#define ROW(i) a##i = _mm512_fmadd_ps(_mm512_set1_ps(xk[i]), weights, a##i);
                    ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7)
                    ROW(8) ROW(9) ROW(10) ROW(11) ROW(12) ROW(13) ROW(14) ROW(15)
#undef ROW
                }
                __m512 sums[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
                for (int m = 0; m < 16; m++)
                    total[m] = segment == 0 ? sums[m] : _mm512_add_ps(total[m], sums[m]);
            }
            int tile_rows = rows - tile * 16 < 16 ? rows - tile * 16 : 16;
            for (int m = 0; m < tile_rows; m++) {
                __m512 out = bias ? _mm512_add_ps(total[m], bias_vector) : total[m];
                _mm512_mask_storeu_ps(y + (size_t)(tile * 16 + m) * y_row_stride + block * 16, column_mask, out);
            }
        }
    }
    free(x_tiles);
    return 0;
}
