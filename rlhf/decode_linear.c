/* y = x W^T (+ bias) in float32 with AVX-512, for the sampler's products: decode steps (a few rows)
 * and prefills. Built and loaded by rlhf/decode_linear.py, which says why and what it measured.
 *
 * W is packed as blocks of 16 output columns, [ceil(N / 16)][K][16] (zero columns past N), so a
 * thread streams its blocks from memory in order. Three blocks (48 columns) are multiplied with 8
 * rows of x at a time: 24 accumulators, and per input k three weight loads and eight broadcasts
 * for 24 FMAs, so the FMAs, not the loads, set the pace. K is summed in segments (bounds[0] = 0 <
 * ... < bounds[segments] = K), each from zero with one FMA per k in order, and the segments' sums
 * are added in order: the caller picks the segments that give oneDNN's own sums. */
#include <immintrin.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define TILE_ROWS 8
#define BLOCKS_PER_GROUP 3
/* bytes ahead of the weight being read that are fetched into the cache: the products start cold
 * on every call and read each weight once, so the hardware's prefetcher alone leaves the FMAs
 * waiting (on the 2-core Xeon a decode step's products 46 -> 34 ms; a non-temporal hint: slower) */
#define PREFETCH_BYTES 4096

int rlhf_decode_linear(const float *x, long x_row_stride, const float *packed, const float *bias,
                       float *y, long y_row_stride, int rows, int k_size, int n_size,
                       const int *bounds, int segments, int threads)
{
    int tiles = (rows + TILE_ROWS - 1) / TILE_ROWS, blocks = (n_size + 15) / 16;
    int groups = (blocks + BLOCKS_PER_GROUP - 1) / BLOCKS_PER_GROUP;
    /* x transposed per tile of 8 rows, [tiles][K][8]: the 8 values one k multiplies are adjacent
     * (rows past the last are zero; their sums are not stored) */
    size_t tile_floats = (size_t)k_size * TILE_ROWS;
    float *x_tiles = aligned_alloc(64, ((tiles * tile_floats * sizeof(float) + 63) / 64) * 64);
    if (x_tiles == NULL)
        return 1;
    memset(x_tiles, 0, tiles * tile_floats * sizeof(float));
    for (int r = 0; r < rows; r++) {
        const float *source = x + (size_t)r * x_row_stride;
        float *target = x_tiles + (size_t)(r / TILE_ROWS) * tile_floats + r % TILE_ROWS;
        for (int k = 0; k < k_size; k++)
            target[(size_t)k * TILE_ROWS] = source[k];
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int group = 0; group < groups; group++) {
        int first = group * BLOCKS_PER_GROUP;
        int in_group = blocks - first < BLOCKS_PER_GROUP ? blocks - first : BLOCKS_PER_GROUP;
        /* a short last group multiplies its first block again in the missing places, never stored */
        const float *w0 = packed + (size_t)first * k_size * 16;
        const float *w1 = in_group > 1 ? w0 + (size_t)k_size * 16 : w0;
        const float *w2 = in_group > 2 ? w0 + (size_t)2 * k_size * 16 : w0;
        for (int tile = 0; tile < tiles; tile++) {
            const float *x_tile = x_tiles + (size_t)tile * tile_floats;
            __m512 total[3 * TILE_ROWS];
            for (int segment = 0; segment < segments; segment++) {
                __m512 sums[3 * TILE_ROWS];
                for (int i = 0; i < 3 * TILE_ROWS; i++)
                    sums[i] = _mm512_setzero_ps();
                for (int k = bounds[segment]; k < bounds[segment + 1]; k++) {
                    size_t at = (size_t)k * 16;
                    _mm_prefetch((const char *)(w0 + at) + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w1 + at) + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w2 + at) + PREFETCH_BYTES, _MM_HINT_T0);
                    __m512 v0 = _mm512_loadu_ps(w0 + at), v1 = _mm512_loadu_ps(w1 + at), v2 = _mm512_loadu_ps(w2 + at);
                    const float *xk = x_tile + (size_t)k * TILE_ROWS;
                    for (int i = 0; i < TILE_ROWS; i++) {
                        __m512 xi = _mm512_set1_ps(xk[i]);
                        sums[i] = _mm512_fmadd_ps(xi, v0, sums[i]);
                        sums[TILE_ROWS + i] = _mm512_fmadd_ps(xi, v1, sums[TILE_ROWS + i]);
                        sums[2 * TILE_ROWS + i] = _mm512_fmadd_ps(xi, v2, sums[2 * TILE_ROWS + i]);
                    }
                }
                for (int i = 0; i < 3 * TILE_ROWS; i++)
                    total[i] = segment == 0 ? sums[i] : _mm512_add_ps(total[i], sums[i]);
            }
            int tile_rows = rows - tile * TILE_ROWS < TILE_ROWS ? rows - tile * TILE_ROWS : TILE_ROWS;
            for (int j = 0; j < in_group; j++) {
                int block = first + j, columns = n_size - block * 16 < 16 ? n_size - block * 16 : 16;
                __mmask16 column_mask = (__mmask16)((1u << columns) - 1);
                __m512 bias_vector = bias ? _mm512_maskz_loadu_ps(column_mask, bias + block * 16) : _mm512_setzero_ps();
                for (int m = 0; m < tile_rows; m++) {
                    __m512 out = total[j * TILE_ROWS + m];
                    if (bias)
                        out = _mm512_add_ps(out, bias_vector);
                    _mm512_mask_storeu_ps(y + (size_t)(tile * TILE_ROWS + m) * y_row_stride + block * 16, column_mask, out);
                }
            }
        }
    }
    free(x_tiles);
    return 0;
}
