/* Paged-attention decode for the CPU, float32: one query token per sequence attends to its
 * context straight from the block KV cache, without gathering the blocks into a padded copy.
 *
 * Layouts (all contiguous):
 *   q, out        [num_seqs, num_heads, head_dim]
 *   k_cache/v_... [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables  [num_seqs, max_blocks] int64
 *   context_lens  [num_seqs] int64
 *
 * Work items are (sequence, kv head) pairs; the query heads that share a kv head are done together
 * so each K/V row is read once. Items run on OpenMP threads: loaded into a process that already
 * holds PyTorch's libgomp, this library uses the same runtime and thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16

typedef struct {
    const float *q, *k_cache, *v_cache;
    const int64_t *block_tables, *context_lens;
    float *out;
    int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
    float scale;
} Args;

/* exp for x <= 0 (softmax after subtracting the max), vectorisable, relative error < 2e-7. */
static inline float exp_nonpositive(float x) {
    if (x < -87.0f) return 0.0f;
    const float t = x * 1.44269504088896341f; /* x / ln 2 */
    const float n = floorf(t);
    const float f = (t - n) * 0.69314718055994531f; /* in [0, ln 2) */
    /* e^f by its Taylor series to degree 7 on [0, ln 2). */
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    return ldexpf(p, (int)n);
}

static inline __attribute__((always_inline)) void attend(const Args *a, int64_t item, float *scores, float *acc, int64_t d) {
    const int64_t kvh = a->num_kv_heads, bs = a->block_size;
    const int64_t group = a->num_heads / kvh;
    const int64_t n = item / kvh, h = item % kvh;
    const int64_t len = a->context_lens[n];
    const int64_t *table = a->block_tables + n * a->max_blocks;
    const float *q = a->q + (n * a->num_heads + h * group) * d;
    const int64_t row_stride = kvh * d;

    for (int64_t start = 0; start < len; start += bs) {
        const float *block = a->k_cache + table[start / bs] * bs * row_stride + h * d;
        const int64_t rows = len - start < bs ? len - start : bs;
        for (int64_t r = 0; r < rows; r++) {
            const float *k = block + r * row_stride;
            for (int64_t g = 0; g < group; g++) {
                const float *qg = q + g * d;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < d; i++) s += qg[i] * k[i];
                scores[g * len + start + r] = s * a->scale;
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * len;
        float top = -INFINITY;
        for (int64_t t = 0; t < len; t++) top = sg[t] > top ? sg[t] : top;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < len; t++) {
            sg[t] = exp_nonpositive(sg[t] - top);
            total += sg[t];
        }
        const float inv = 1.0f / total;
#pragma omp simd
        for (int64_t t = 0; t < len; t++) sg[t] *= inv;
    }
    memset(acc, 0, (size_t)(group * d) * sizeof(float));
    for (int64_t start = 0; start < len; start += bs) {
        const float *block = a->v_cache + table[start / bs] * bs * row_stride + h * d;
        const int64_t rows = len - start < bs ? len - start : bs;
        for (int64_t r = 0; r < rows; r++) {
            const float *v = block + r * row_stride;
            for (int64_t g = 0; g < group; g++) {
                const float p = scores[g * len + start + r];
                float *ag = acc + g * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) ag[i] += p * v[i];
            }
        }
    }
    memcpy(a->out + (n * a->num_heads + h * group) * d, acc, (size_t)(group * d) * sizeof(float));
}

/* Returns 0 on success, 1 if scratch memory could not be had, 2 for a bad shape. */
int flowserve_paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, const int64_t *context_lens,
                               float *out, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                               int64_t max_blocks, float scale, int64_t num_threads) {
    const Args a = {q,         k_cache,      v_cache,  block_tables, context_lens, out, num_heads,
                    num_kv_heads, head_dim, block_size, max_blocks,  scale};
    const int64_t group = num_heads / num_kv_heads;
    if (group < 1 || group > MAX_GROUP || num_heads % num_kv_heads != 0) return 2;
    int64_t longest = 1;
    for (int64_t n = 0; n < num_seqs; n++) longest = context_lens[n] > longest ? context_lens[n] : longest;
    const int64_t items = num_seqs * num_kv_heads;
    int status = 0;
#pragma omp parallel num_threads((int)(num_threads < 1 ? 1 : num_threads)) reduction(| : status)
    {
        float *scores = malloc((size_t)(group * longest) * sizeof(float));
        float *acc = malloc((size_t)(group * head_dim) * sizeof(float));
        if (scores == NULL || acc == NULL) {
            status |= 1;
        } else {
#pragma omp for schedule(dynamic, 4)
            for (int64_t item = 0; item < items; item++) {
                /* Specialised copies for the common head sizes let the compiler unroll fully. */
                if (head_dim == 64) {
                    attend(&a, item, scores, acc, 64);
                } else if (head_dim == 128) {
                    attend(&a, item, scores, acc, 128);
                } else {
                    attend(&a, item, scores, acc, head_dim);
                }
            }
        }
        free(scores);
        free(acc);
    }
    return status;
}
