/* y = x W^T (+ bias) in float32 with AVX-512 or AVX2, for the sampler's products: decode steps (a
 * few rows) and prefills. Built and loaded by rlhf/decode_linear.py, which says why and what it
 * measured; built with -mavx512f the AVX-512 code below, else (-mavx2 -mfma) the AVX2 code.
 *
 * W is packed as blocks of LANES output columns (one vector register: 16 with AVX-512, 8 with
 * AVX2), [ceil(N / LANES)][K][LANES] (zero columns past N), so a thread streams its blocks from
 * memory in order. Three blocks are multiplied with TILE_ROWS rows of x at a time (AVX-512: 8 rows
 * x 48 columns, 24 accumulators, three weight loads and eight broadcasts per 24 FMAs; AVX2 with its
 * 16 registers: 4 rows x 24 columns, 12 accumulators, three loads and four broadcasts per 12 FMAs),
 * so the FMAs, not the loads, set the pace. K is summed in segments (bounds[0] = 0 < ... <
 * bounds[segments] = K), each from zero with one FMA per k in order, and the segments' sums are
 * added in order: the caller picks the segments that give oneDNN's own sums. */
#include <immintrin.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
/* one register holds 16 float32 columns; 32 registers: 8 rows x 3 blocks = 24 accumulators */
#define LANES 16
#define TILE_ROWS 8
typedef __m512 vector;
#define vector_zero _mm512_setzero_ps
#define vector_load _mm512_loadu_ps
#define vector_broadcast _mm512_set1_ps
#define vector_fma _mm512_fmadd_ps
#define vector_add _mm512_add_ps
#else
/* AVX2: 8 columns per register, 16 registers: 4 rows x 3 blocks = 12 accumulators, three weights
 * and a broadcast */
#define LANES 8
#define TILE_ROWS 4
typedef __m256 vector;
#define vector_zero _mm256_setzero_ps
#define vector_load _mm256_loadu_ps
#define vector_broadcast _mm256_set1_ps
#define vector_fma _mm256_fmadd_ps
#define vector_add _mm256_add_ps
#endif
#define BLOCKS_PER_GROUP 3

/* the first ``columns`` of a block (columns < LANES only for the last block of a weight) */
static inline vector load_columns(const float *source, int columns)
{
#ifdef __AVX512F__
    return _mm512_maskz_loadu_ps((__mmask16)((1u << columns) - 1), source);
#else
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(source, _mm256_cmpgt_epi32(_mm256_set1_epi32(columns), lane));
#endif
}

static inline void store_columns(float *target, vector value, int columns)
{
#ifdef __AVX512F__
    _mm512_mask_storeu_ps(target, (__mmask16)((1u << columns) - 1), value);
#else
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(target, _mm256_cmpgt_epi32(_mm256_set1_epi32(columns), lane), value);
#endif
}

/* the columns per packed block this build was made for (the packing must match) */
int rlhf_decode_lanes(void) { return LANES; }
/* bytes ahead of the weight being read that are fetched into the cache: the products start cold
 * on every call and read each weight once, so the hardware's prefetcher alone leaves the FMAs
 * waiting (on the 2-core Xeon a decode step's products 46 -> 34 ms; a non-temporal hint: slower) */
#define PREFETCH_BYTES 4096

/* One tile's sums: ``tile_rows`` rows of x (the tile's first ones) times a group's three blocks,
 * into total[block * TILE_ROWS + row]. Inlined with a constant ``tile_rows`` (see multiply_tile),
 * so each row count gets its own unrolled loop: a last tile of fewer rows multiplies only those
 * (until 2026-12-08 every tile multiplied all TILE_ROWS, zero rows included; 10 rows cost 16). */
static inline __attribute__((always_inline)) void multiply_rows(
    const float *x_tile, const float *w0, const float *w1, const float *w2, const int *bounds, int segments,
    vector *total, const int tile_rows)
{
    for (int segment = 0; segment < segments; segment++) {
        vector sums[3 * TILE_ROWS];
        for (int i = 0; i < 3 * TILE_ROWS; i++)
            sums[i] = vector_zero();
        for (int k = bounds[segment]; k < bounds[segment + 1]; k++) {
            size_t at = (size_t)k * LANES;
            _mm_prefetch((const char *)(w0 + at) + PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + at) + PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)(w2 + at) + PREFETCH_BYTES, _MM_HINT_T0);
            vector v0 = vector_load(w0 + at), v1 = vector_load(w1 + at), v2 = vector_load(w2 + at);
            const float *xk = x_tile + (size_t)k * TILE_ROWS;
            for (int i = 0; i < tile_rows; i++) {
                vector xi = vector_broadcast(xk[i]);
                sums[i] = vector_fma(xi, v0, sums[i]);
                sums[TILE_ROWS + i] = vector_fma(xi, v1, sums[TILE_ROWS + i]);
                sums[2 * TILE_ROWS + i] = vector_fma(xi, v2, sums[2 * TILE_ROWS + i]);
            }
        }
        for (int j = 0; j < 3; j++)
            for (int i = 0; i < tile_rows; i++)
                total[j * TILE_ROWS + i] = segment == 0 ? sums[j * TILE_ROWS + i]
                                                        : vector_add(total[j * TILE_ROWS + i], sums[j * TILE_ROWS + i]);
    }
}

#define ROWS_CASE(count) \
    case count: multiply_rows(x_tile, w0, w1, w2, bounds, segments, total, count); break;

static void multiply_tile(const float *x_tile, const float *w0, const float *w1, const float *w2, const int *bounds,
                          int segments, vector *total, int tile_rows)
{
    switch (tile_rows) {
    ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
#if TILE_ROWS > 4
    ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
#endif
    }
}

int rlhf_decode_linear(const float *x, long x_row_stride, const float *packed, const float *bias,
                       float *y, long y_row_stride, int rows, int k_size, int n_size,
                       const int *bounds, int segments, int threads)
{
    int tiles = (rows + TILE_ROWS - 1) / TILE_ROWS, blocks = (n_size + LANES - 1) / LANES;
    int groups = (blocks + BLOCKS_PER_GROUP - 1) / BLOCKS_PER_GROUP;
    /* x transposed per tile of rows, [tiles][K][TILE_ROWS]: the values one k multiplies are
     * adjacent (rows past the last are zero, and a last tile multiplies only its own) */
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
        const float *w0 = packed + (size_t)first * k_size * LANES;
        const float *w1 = in_group > 1 ? w0 + (size_t)k_size * LANES : w0;
        const float *w2 = in_group > 2 ? w0 + (size_t)2 * k_size * LANES : w0;
        for (int tile = 0; tile < tiles; tile++) {
            const float *x_tile = x_tiles + (size_t)tile * tile_floats;
            int tile_rows = rows - tile * TILE_ROWS < TILE_ROWS ? rows - tile * TILE_ROWS : TILE_ROWS;
            vector total[3 * TILE_ROWS];
            multiply_tile(x_tile, w0, w1, w2, bounds, segments, total, tile_rows);
            for (int j = 0; j < in_group; j++) {
                int block = first + j, columns = n_size - block * LANES < LANES ? n_size - block * LANES : LANES;
                vector bias_vector = bias ? load_columns(bias + block * LANES, columns) : vector_zero();
                for (int m = 0; m < tile_rows; m++) {
                    vector out = total[j * TILE_ROWS + m];
                    if (bias)
                        out = vector_add(out, bias_vector);
                    store_columns(y + (size_t)(tile * TILE_ROWS + m) * y_row_stride + block * LANES, out, columns);
                }
            }
        }
    }
    free(x_tiles);
    return 0;
}
