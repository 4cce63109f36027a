/* The executor's compiled CPU kernels, float32. First, paged attention: every new token of a
 * step (decode rows and prompts alike) attends over its sequence's context straight from the
 * paged KV cache, with no gathered copy of it. Then the elementwise work of a decoder layer,
 * fused, greedy sampling, and the linear layers' GEMM.
 *
 * Layouts (all contiguous):
 *   query, out        [tokens, num_heads, head_dim]: each sequence's new tokens in a run
 *                     (query's rows may lie further apart: query_stride floats, so that the
 *                     q/k/v projection's output is read in place)
 *   k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim], float32 or bfloat16
 *                     (kv_bf16: half the bytes to read; attention still computes in float32)
 *   block_tables      [num_seqs, max_blocks] int64
 *   query_start       [num_seqs + 1] int64 (where each sequence's tokens start in query)
 *   seq_lens          [num_seqs] int64 (context length, this step's tokens included)
 *
 * A work item (work_items) is a tile of a prompt's rows for one kv head, or a decode row's
 * sequence; it walks the context a span of blocks at a time with an online softmax, each
 * span's K/V read while it is in cache. Items are shared out by OpenMP. The library links
 * libgomp.so.1 by name and is loaded after torch, so it runs on torch's own OpenMP threads:
 * no second pool competing for the cores.
 *
 * Written with GCC vector extensions, 8 floats wide (one AVX2 register), so head_dim must be
 * a multiple of 8. Scores of eight tokens are accumulated side by side (eight independent FMA
 * chains), and exp runs on 8 scores at a time. Built by executor_svc/cpu_kernels.py with
 * -O3 -march=native -fopenmp.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADS 64
#define MAX_BLOCK 256
#define MAX_VECS 32 /* head_dim / 8 */

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads */
typedef uint16_t h8u __attribute__((vector_size(16), aligned(2))); /* 8 bfloat16, unaligned */
typedef int32_t w8 __attribute__((vector_size(32)));

/* Eight K/V values from element i of a cache of float32 or (bf16) bfloat16 values, as float32:
 * a bfloat16 is the top half of the float32 with the same bits. */
static inline __attribute__((always_inline)) v8 load_kv(const void *cache, int64_t i,
                                                        const int bf16) {
    if (!bf16) return *(const v8u *)((const float *)cache + i);
    return (v8)(__builtin_convertvector(*(const h8u *)((const uint16_t *)cache + i), w8) << 16);
}

/* float32 to bfloat16 as torch rounds it: to nearest, ties to even; NaN to 0x7fc0. */
static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
typedef int32_t i8 __attribute__((vector_size(32)));

static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline float hsum(v8 x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* The sums of eight vectors' lanes, as the lanes of one: three rounds of pairwise shuffles
 * and adds, where eight separate horizontal sums take three times the instructions.
 * __builtin_shufflevector needs GCC 12 or clang; older compilers sum lane by lane. */
#if defined(__clang__) || __GNUC__ >= 12
static inline v8 pair_sums(v8 x, v8 y, int round) {
    switch (round) { /* each lane ends up with the sum of two of x's or y's partial sums */
    case 0:
        return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
    case 1:
        return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    default:
        return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

static inline v8 hsum8(const v8 a[8]) {
    const v8 s01 = pair_sums(a[0], a[1], 0), s23 = pair_sums(a[2], a[3], 0);
    const v8 s45 = pair_sums(a[4], a[5], 0), s67 = pair_sums(a[6], a[7], 0);
    return pair_sums(pair_sums(s01, s23, 1), pair_sums(s45, s67, 1), 2);
}
#else
static inline v8 hsum8(const v8 a[8]) {
    return (v8){hsum(a[0]), hsum(a[1]), hsum(a[2]), hsum(a[3]),
                hsum(a[4]), hsum(a[5]), hsum(a[6]), hsum(a[7])};
}
#endif

/* exp for x <= 0 (scores minus their running max): Cody-Waite reduction to r in
 * [-ln2/2, ln2/2], a degree-6 polynomial, then 2^n through the exponent bits. Below -87 it
 * returns about 1e-38 instead of 0, far under float32 resolution of a sum that holds 1. */
static inline v8 exp8(v8 x) {
    const v8 lo = splat(-87.0f);
    const i8 below = x < lo; /* all ones where true */
    x = (v8)(((i8)lo & below) | ((i8)x & ~below));
    const v8 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8 n = (x * splat(1.44269504088896341f) + magic) - magic;
    v8 r = x - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    v8 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
    return p * (v8)bits;
}

typedef struct {
    const float *query;
    const void *k_cache, *v_cache; /* float32, or bfloat16 (kv_bf16) */
    const int64_t *block_tables, *query_start, *seq_lens;
    float *out;
    int64_t query_stride, num_heads, num_kv_heads, head_dim, block_size, max_blocks, kv_bf16;
    float scale;
} Work;

/* Query rows q0 ... q0 + rows - 1 of sequence `seq` (of its query_len new tokens), their
 * query heads that read kv heads g0 ... g1 - 1 (each kv head serves `group` query heads). Row
 * i sits at position seq_len - query_len + q0 + i and attends to the context up to and
 * including itself. The context is taken a few blocks at a time (up to SPAN slots): for each
 * kv head in turn, each row's query heads score the span, take one online-softmax step over
 * it, and add its values; the span's K/V rows come from memory for the first of them and
 * from L1/L2 for the others. Block tables scatter blocks, so the hardware prefetcher cannot
 * guess where the next span's lie: they are fetched meanwhile. Where an item reads every kv
 * head (a decode row), a block's K (and V) is one contiguous run, and fetching its first slot
 * is enough for the hardware to follow on through the rest (fetching every slot cost 13% of
 * the compute and gained nothing); one kv head's slices of a block are not contiguous, so
 * there every slot's are fetched. `vecs` (head_dim / 8) is a
 * constant where attend_any dispatches on it, so that a head's output (vecs vectors) is
 * summed in registers. A bfloat16 cache (bf16) is read either in place, each value widened
 * where it is used, or (widen) widened once per span and kv head into float32 buffers that all
 * of that kv head's query heads and rows then read: a bfloat16 load takes three instructions
 * where a float32 one folds into its FMA. */
#define SPAN 32
#define WIDEN_FLOATS 8192 /* a span of one kv head's K (and V), widened: 32 KiB each */

/* K and V of kv head g over the span's slots up to span_end (in whole groups of 8: every slot
 * a row may score), widened to float32 into kw and vw ([slot in span][head_dim]). */
static inline __attribute__((always_inline)) void widen_span(const Work *w, const int64_t *table,
                                                             int64_t first, int64_t span_end,
                                                             int64_t g, const int64_t vecs,
                                                             float *kw, float *vw) {
    const int64_t bs = w->block_size, hd = vecs * 8, row = w->num_kv_heads * hd;
    for (int64_t b = first; b * bs < span_end; b++) {
        const int64_t n = span_end - b * bs < bs ? span_end - b * bs : bs;
        const int64_t n8 = (n + 7) / 8 * 8 < bs ? (n + 7) / 8 * 8 : bs;
        const int64_t at = (table[b] * bs * w->num_kv_heads + g) * hd;
        float *kb = kw + (b - first) * bs * hd, *vb = vw + (b - first) * bs * hd;
        for (int64_t j = 0; j < n8; j++)
            for (int64_t c = 0; c < vecs; c++) {
                *(v8u *)(kb + j * hd + c * 8) = load_kv(w->k_cache, at + j * row + c * 8, 1);
                *(v8u *)(vb + j * hd + c * 8) = load_kv(w->v_cache, at + j * row + c * 8, 1);
            }
    }
}

static inline __attribute__((always_inline)) void attend(const Work *w, int64_t seq, int64_t q0,
                                                         int64_t rows, int64_t g0, int64_t g1,
                                                         const int64_t vecs, const int bf16,
                                                         const int widen) {
    const int64_t kvh = w->num_kv_heads, hd = vecs * 8, bs = w->block_size;
    const int64_t group = w->num_heads / kvh, heads = (g1 - g0) * group, h0 = g0 * group;
    const int64_t seq_len = w->seq_lens[seq], first_token = w->query_start[seq] + q0;
    const int64_t first_pos = seq_len - (w->query_start[seq + 1] - w->query_start[seq]) + q0;
    const int64_t len = first_pos + rows; /* the last row's context */
    const int64_t row = kvh * hd; /* values between consecutive slots of a block */
    const int64_t line = bf16 ? 32 : 16; /* values in a 64-byte cache line */
    const char *k_bytes = w->k_cache, *v_bytes = w->v_cache;
    const int64_t span_blocks = bs >= SPAN ? 1 : SPAN / bs;
    const int64_t *table = w->block_tables + seq * w->max_blocks;
    v8 q[rows * heads][vecs], acc[rows * heads][vecs]; /* [row * heads + head] */
    float max[rows * heads], sum[rows * heads];
    float scores[MAX_BLOCK + SPAN + 8] __attribute__((aligned(32)));
    /* widened K and V of the span for one kv head: [slot in span][hd] */
    float kw[widen ? span_blocks * bs * hd : 1] __attribute__((aligned(32)));
    float vw[widen ? span_blocks * bs * hd : 1] __attribute__((aligned(32)));
    const int64_t stride = widen ? hd : row; /* values between slots where K/V are read */
    const int in_place_bf16 = bf16 && !widen;
#define kv_at(b, g) ((table[b] * bs * kvh + (g)) * hd) /* block b's slot 0, kv head g */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            const float *qs = w->query + (first_token + r) * w->query_stride + (h0 + h) * hd;
            for (int64_t c = 0; c < vecs; c++) {
                q[r * heads + h][c] = *(const v8u *)(qs + c * 8) * splat(w->scale);
                acc[r * heads + h][c] = splat(0.0f);
            }
            max[r * heads + h] = -INFINITY;
            sum[r * heads + h] = 0.0f;
        }
    for (int64_t first = 0; first * bs < len; first += span_blocks) {
        const int64_t span_stop = (first + span_blocks) * bs;
        const int64_t span_end = len < span_stop ? len : span_stop;
        for (int64_t b = first + span_blocks; b < first + 2 * span_blocks && b * bs < len; b++) {
            const int64_t n = g1 - g0 == kvh ? 1 : len - b * bs < bs ? len - b * bs : bs;
            const int64_t kv = (table[b] * bs * kvh + g0) * hd;
            for (int64_t j = 0; j < n; j++)
                for (int64_t f = 0; f < (g1 - g0) * hd; f += line) {
                    const int64_t at = (kv + j * row + f) * (bf16 ? 2 : 4);
                    __builtin_prefetch(k_bytes + at);
                    __builtin_prefetch(v_bytes + at);
                }
        }
        for (int64_t g = g0; g < g1; g++) {
            if (widen) widen_span(w, table, first, span_end, g, vecs, kw, vw);
            for (int64_t r = 0; r < rows; r++) {
                /* Row r sees slots up to its own position: the span's first m of them. */
                const int64_t end = span_end < first_pos + r + 1 ? span_end : first_pos + r + 1;
                if (end <= first * bs) continue;
                const int64_t m = end - first * bs, padded = (m + 7) & ~7;
                for (int64_t h = (g - g0) * group; h < (g - g0 + 1) * group; h++) {
                    const int64_t i = r * heads + h;
                    for (int64_t b = first; b * bs < end; b++) {
                        const int64_t k = widen ? (b - first) * bs * hd : kv_at(b, g);
                        const void *kc = widen ? (const void *)kw : w->k_cache;
                        const int64_t n = end - b * bs < bs ? end - b * bs : bs;
                        float *s = scores + (b - first) * bs;
                        int64_t j = 0; /* slots past n: scored, then masked */
                        for (; j + 8 <= bs && j < n; j += 8) {
                            v8 a[8];
                            for (int t = 0; t < 8; t++) a[t] = splat(0.0f);
                            for (int64_t c = 0; c < vecs; c++) {
                                const v8 qc = q[i][c];
                                for (int t = 0; t < 8; t++)
                                    a[t] += qc * load_kv(kc, k + (j + t) * stride + c * 8,
                                                         in_place_bf16);
                            }
                            *(v8u *)(s + j) = hsum8(a);
                        }
                        for (; j < n; j++) { /* blocks whose size is not a multiple of 8 */
                            v8 a = splat(0.0f);
                            for (int64_t c = 0; c < vecs; c++)
                                a += q[i][c] * load_kv(kc, k + j * stride + c * 8, in_place_bf16);
                            s[j] = hsum(a);
                        }
                    }
                    for (int64_t j = m; j < padded; j++) scores[j] = -INFINITY;
                    v8 top = splat(-INFINITY);
                    for (int64_t j = 0; j < padded; j += 8) {
                        const v8 sj = *(const v8 *)(scores + j);
                        const i8 above = sj > top;
                        top = (v8)(((i8)sj & above) | ((i8)top & ~above));
                    }
                    float span_max = top[0];
                    for (int t = 1; t < 8; t++) span_max = top[t] > span_max ? top[t] : span_max;
                    const float new_max = span_max > max[i] ? span_max : max[i];
                    const float correction = expf(max[i] - new_max); /* 0 on the first span */
                    v8 sums = splat(0.0f);
                    for (int64_t j = 0; j < padded; j += 8) {
                        const v8 p = exp8(*(v8 *)(scores + j) - splat(new_max)); /* 0 if masked */
                        sums += p;
                        *(v8 *)(scores + j) = p;
                    }
                    sum[i] = sum[i] * correction + hsum(sums);
                    max[i] = new_max;
                    v8 o[MAX_VECS];
                    for (int64_t c = 0; c < vecs; c++) o[c] = acc[i][c] * splat(correction);
                    for (int64_t b = first; b * bs < end; b++) {
                        const int64_t v = widen ? (b - first) * bs * hd : kv_at(b, g);
                        const void *vc = widen ? (const void *)vw : w->v_cache;
                        const int64_t n = end - b * bs < bs ? end - b * bs : bs;
                        const float *p = scores + (b - first) * bs;
                        for (int64_t j = 0; j < n; j++) {
                            const v8 pj = splat(p[j]);
                            for (int64_t c = 0; c < vecs; c++)
                                o[c] += pj * load_kv(vc, v + j * stride + c * 8, in_place_bf16);
                        }
                    }
                    for (int64_t c = 0; c < vecs; c++) acc[i][c] = o[c];
                }
            }
        }
    }
#undef kv_at
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            float *out = w->out + ((first_token + r) * w->num_heads + h0 + h) * hd;
            const v8 inv = splat(1.0f / sum[r * heads + h]);
            for (int64_t c = 0; c < vecs; c++)
                *(v8u *)(out + c * 8) = acc[r * heads + h][c] * inv;
        }
}

/* attend with head_dim a constant for the common sizes, and a variable for others. */
static inline __attribute__((always_inline)) void attend_dims(const Work *w,
                                                              const int64_t item[5],
                                                              const int bf16, const int widen) {
    const int64_t seq = item[0], q0 = item[1], rows = item[2], g0 = item[3], g1 = item[4];
    switch (w->head_dim) {
    case 64: attend(w, seq, q0, rows, g0, g1, 8, bf16, widen); break;
    case 128: attend(w, seq, q0, rows, g0, g1, 16, bf16, widen); break;
    case 32: attend(w, seq, q0, rows, g0, g1, 4, bf16, widen); break;
    case 16: attend(w, seq, q0, rows, g0, g1, 2, bf16, widen); break;
    default: attend(w, seq, q0, rows, g0, g1, w->head_dim / 8, bf16, widen);
    }
}

/* ... and how the cache is read a constant too: float32 in place; bfloat16 widened a span at
 * a time where a span of one kv head fits WIDEN_FLOATS, else in place. */
static void attend_any(const Work *w, const int64_t item[5]) {
    const int64_t span_slots = w->block_size >= SPAN ? w->block_size : SPAN;
    if (!w->kv_bf16)
        attend_dims(w, item, 0, 0);
    else if (span_slots * w->head_dim <= WIDEN_FLOATS)
        attend_dims(w, item, 1, 1);
    else
        attend_dims(w, item, 1, 0);
}

/* Rows of one prompt per work item: they share each span's K/V in L1. Fewer where their
 * queries and sums (2 x rows x group x head_dim floats, on the stack) would pass 128 KiB. */
#define QUERY_TILE 16
#define TILE_FLOATS 16384

/* The work items (seq, q0, rows, g0, g1) of a step, into `items` (or only counted, when it is
 * NULL); returns how many. Prompts come first, their later (longer) tiles first, so that the
 * dynamic schedule ends on small items. A prompt's tile takes one kv head at a time; a decode
 * row takes its whole sequence, whose blocks' K/V rows are then read whole, unless there are
 * too few of them to keep every thread busy: then one kv head too. */
static void put_item(int64_t (*items)[5], int64_t at, int64_t seq, int64_t q0, int64_t rows,
                     int64_t g0, int64_t g1) {
    if (!items) return; /* only counting */
    items[at][0] = seq, items[at][1] = q0, items[at][2] = rows;
    items[at][3] = g0, items[at][4] = g1;
}

static int64_t work_items(const int64_t *query_start, int64_t num_seqs, int64_t num_kv_heads,
                          int64_t group_floats, int64_t num_threads, int64_t (*items)[5]) {
    int64_t tile = TILE_FLOATS / group_floats;
    tile = tile < 1 ? 1 : tile > QUERY_TILE ? QUERY_TILE : tile;
    int64_t count = 0, decodes = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t query_len = query_start[s + 1] - query_start[s];
        if (query_len == 1) {
            decodes++;
            continue;
        }
        for (int64_t q0 = (query_len - 1) / tile * tile; q0 >= 0; q0 -= tile) {
            const int64_t rows = query_len - q0 < tile ? query_len - q0 : tile;
            for (int64_t g = 0; g < num_kv_heads; g++)
                put_item(items, count++, s, q0, rows, g, g + 1);
        }
    }
    const int split = decodes < 4 * num_threads; /* one kv head per item */
    for (int64_t s = 0; s < num_seqs; s++) {
        if (query_start[s + 1] - query_start[s] != 1) continue;
        if (!split) put_item(items, count++, s, 0, 1, 0, num_kv_heads);
        for (int64_t g = 0; split && g < num_kv_heads; g++)
            put_item(items, count++, s, 0, 1, g, g + 1);
    }
    return count;
}

/* Attention of every new token of a step over its sequence's context in the paged cache,
 * causal within the step's own tokens, whose K/V must be in the cache already. Sequence s
 * has tokens query_start[s] ... query_start[s + 1] - 1 of query and out and a context of
 * seq_lens[s] tokens, this step's included. Returns 0; -1 for shapes it does not serve (the
 * caller checks them first) or a query longer than its context; -2 when out of memory. */
int paged_attention_f32(const float *query, int64_t query_stride, const void *k_cache,
                        const void *v_cache, int64_t kv_bf16, const int64_t *block_tables,
                        const int64_t *query_start, const int64_t *seq_lens, float *out,
                        int64_t num_seqs, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                        int64_t max_blocks, float scale, int64_t num_threads) {
    if (num_kv_heads < 1 || num_heads % num_kv_heads || num_heads > MAX_HEADS ||
        head_dim % 8 || head_dim / 8 > MAX_VECS || block_size > MAX_BLOCK || num_threads < 1 ||
        query_stride < num_heads * head_dim)
        return -1;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t query_len = query_start[s + 1] - query_start[s];
        if (query_len < 1 || query_len > seq_lens[s] || seq_lens[s] > max_blocks * block_size)
            return -1;
    }
    const int64_t group_floats = num_heads / num_kv_heads * head_dim;
    const int64_t count =
        work_items(query_start, num_seqs, num_kv_heads, group_floats, num_threads, NULL);
    int64_t(*items)[5] = malloc((size_t)(count ? count : 1) * sizeof *items);
    if (!items) return -2;
    work_items(query_start, num_seqs, num_kv_heads, group_floats, num_threads, items);
    const Work w = {query, k_cache, v_cache, block_tables, query_start, seq_lens, out,
                    query_stride, num_heads, num_kv_heads, head_dim, block_size, max_blocks,
                    kv_bf16 != 0, scale};
#pragma omp parallel for schedule(dynamic) num_threads(num_threads)
    for (int64_t i = 0; i < count; i++) attend_any(&w, items[i]);
    free(items);
    return 0;
}

/* ---- The elementwise work of a decoder layer, fused: one pass over each row instead of the
 * five to ten torch operators (each a pass over memory and a dispatch from Python) it takes
 * unfused. Rows are tokens; tensors are contiguous [tokens, width] unless said otherwise. Any
 * width is served: 8 floats at a time, then one by one. Small batches run on the calling
 * thread: forking the team would cost more than the work. */

#define PARALLEL_MIN_FLOATS 65536

/* residual += x (where x is given), then out = weight * residual / sqrt(mean(residual^2) + eps):
 * the residual add and RMSNorm of a pre-norm decoder layer. */
int add_rms_norm_f32(float *residual, const float *x, const float *weight, float *out,
                     int64_t tokens, int64_t hidden, float eps, int64_t num_threads) {
    if (num_threads < 1) return -1;
    const int64_t body = hidden & ~(int64_t)7;
#pragma omp parallel for num_threads(num_threads) if (tokens * hidden >= PARALLEL_MIN_FLOATS)
    for (int64_t t = 0; t < tokens; t++) {
        float *r = residual + t * hidden, *o = out + t * hidden;
        const float *xt = x ? x + t * hidden : NULL;
        v8 squares = splat(0.0f);
        for (int64_t i = 0; i < body; i += 8) {
            v8 ri = *(v8u *)(r + i);
            if (xt) *(v8u *)(r + i) = ri += *(const v8u *)(xt + i);
            squares += ri * ri;
        }
        float sum = hsum(squares);
        for (int64_t i = body; i < hidden; i++) {
            if (xt) r[i] += xt[i];
            sum += r[i] * r[i];
        }
        const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; i++) o[i] = weight[i] * (r[i] * inv);
    }
    return 0;
}

/* Rotary embedding of each token's query and key heads, in place in the q/k/v projection's
 * output (row: num_heads query heads, then num_kv_heads key heads, then as many value heads,
 * head_dim floats each; rows row_stride floats apart), rotate-half layout: cos and sin are
 * [num_positions, head_dim / 2]. Then each token's keys and values are copied to its cache slot
 * (caches [num_slots, num_kv_heads, head_dim], float32 or, with kv_bf16, bfloat16 rounded as
 * torch rounds); slot -1 stores nothing. Returns 0, -1 for
 * arguments it does not serve, 1 for a position past the tables, 2 for a slot past the caches
 * (nothing is written then). */
int rope_write_kv_f32(float *qkv, int64_t row_stride, const float *cos, const float *sin,
                      int64_t num_positions, const int64_t *positions, void *k_cache,
                      void *v_cache, int64_t kv_bf16, const int64_t *slots, int64_t num_slots,
                      int64_t tokens,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t num_threads) {
    const int64_t half = head_dim / 2, kv_width = num_kv_heads * head_dim;
    const int64_t rotated = num_heads + num_kv_heads;
    if (head_dim % 2 || num_threads < 1 || row_stride < (rotated + num_kv_heads) * head_dim)
        return -1;
    for (int64_t t = 0; t < tokens; t++) {
        if (positions[t] < 0 || positions[t] >= num_positions) return 1;
        if (slots[t] < -1 || slots[t] >= num_slots) return 2;
    }
#pragma omp parallel for num_threads(num_threads) \
    if (tokens * rotated * head_dim >= PARALLEL_MIN_FLOATS)
    for (int64_t t = 0; t < tokens; t++) {
        float *row = qkv + t * row_stride;
        const float *c = cos + positions[t] * half, *s = sin + positions[t] * half;
        for (int64_t h = 0; h < rotated; h++) {
            float *restrict lo = row + h * head_dim, *restrict hi = lo + half;
            for (int64_t i = 0; i < half; i++) {
                const float a = lo[i], b = hi[i];
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[i] + a * s[i];
            }
        }
        if (slots[t] >= 0 && kv_bf16) {
            uint16_t *k = (uint16_t *)k_cache + slots[t] * kv_width;
            uint16_t *v = (uint16_t *)v_cache + slots[t] * kv_width;
            for (int64_t i = 0; i < kv_width; i++) {
                k[i] = to_bf16(row[num_heads * head_dim + i]);
                v[i] = to_bf16(row[rotated * head_dim + i]);
            }
        } else if (slots[t] >= 0) {
            memcpy((float *)k_cache + slots[t] * kv_width, row + num_heads * head_dim,
                   kv_width * sizeof(float));
            memcpy((float *)v_cache + slots[t] * kv_width, row + rotated * head_dim,
                   kv_width * sizeof(float));
        }
    }
    return 0;
}

static inline float silu_scalar(float g) { return g / (1.0f + expf(-g)); }

/* out = silu(gate) * up, where each row of gate_up is [gate | up], inter floats each; out is
 * [tokens, inter]. sigmoid(g) is taken through e = exp(-|g|) (1 / (1 + e) for g >= 0, else
 * e / (1 + e)), so exp8 only ever sees x <= 0. */
int silu_mul_f32(const float *gate_up, float *out, int64_t tokens, int64_t inter,
                 int64_t num_threads) {
    if (num_threads < 1) return -1;
    const int64_t body = inter & ~(int64_t)7;
#pragma omp parallel for num_threads(num_threads) if (tokens * inter >= PARALLEL_MIN_FLOATS)
    for (int64_t t = 0; t < tokens; t++) {
        const float *gate = gate_up + t * 2 * inter, *up = gate + inter;
        float *o = out + t * inter;
        for (int64_t i = 0; i < body; i += 8) {
            const v8 g = *(const v8u *)(gate + i);
            const i8 negative = g < splat(0.0f);
            const v8 e = exp8((v8)((i8)g | (i8)splat(-0.0f))); /* exp(-|g|) */
            const v8 numerator = (v8)(((i8)e & negative) | ((i8)splat(1.0f) & ~negative));
            *(v8u *)(o + i) = g * (numerator / (splat(1.0f) + e)) * *(const v8u *)(up + i);
        }
        for (int64_t i = body; i < inter; i++) o[i] = silu_scalar(gate[i]) * up[i];
    }
    return 0;
}

/* Greedy sampling of each row of logits ([rows, vocab]): the index of its largest logit (the
 * first one on ties, and the first NaN where there is one, as torch.argmax) and that token's
 * log-probability, -log(sum(exp(logits - max))). One pass finds the maximum and where it first
 * is (per lane, then across lanes); a second sums, while the row is still in cache. */
int greedy_f32(const float *logits, int64_t rows, int64_t vocab, int64_t *token_ids,
               float *logprobs, int64_t num_threads) {
    if (vocab < 1 || num_threads < 1) return -1;
    const int64_t body = vocab & ~(int64_t)7;
#pragma omp parallel for num_threads(num_threads) if (rows * vocab >= PARALLEL_MIN_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * vocab;
        v8 best = splat(-INFINITY);
        i8 where = {0, 1, 2, 3, 4, 5, 6, 7}, lanes = where, nan = {0};
        for (int64_t i = 0; i < body; i += 8) {
            const v8 xi = *(const v8u *)(x + i);
            const i8 above = xi > best;
            nan |= xi != xi;
            best = (v8)(((i8)xi & above) | ((i8)best & ~above));
            where = ((lanes + (int32_t)i) & above) | (where & ~above);
        }
        float max = body ? best[0] : x[0];
        int64_t token = body ? where[0] : 0;
        for (int i = 1; i < 8 && body; i++)
            if (best[i] > max || (best[i] == max && where[i] < token)) max = best[i], token = where[i];
        for (int64_t i = body; i < vocab; i++)
            if (x[i] > max) max = x[i], token = i;
        int any_nan = 0;
        for (int i = 0; i < 8; i++) any_nan |= nan[i];
        for (int64_t i = body; i < vocab; i++) any_nan |= isnan(x[i]);
        if (any_nan || max == INFINITY) { /* torch's log_softmax gives NaN for these rows */
            for (int64_t i = 0; i < vocab && any_nan; i++)
                if (isnan(x[i])) token = i, any_nan = 0;
            token_ids[r] = token;
            logprobs[r] = NAN;
            continue;
        }
        v8 sums = splat(0.0f);
        for (int64_t i = 0; i < body; i += 8) sums += exp8(*(const v8u *)(x + i) - splat(max));
        float sum = hsum(sums);
        for (int64_t i = body; i < vocab; i++) sum += expf(x[i] - max);
        token_ids[r] = token;
        logprobs[r] = -logf(sum);
    }
    return 0;
}

/* ---- Linear layers: out[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]), float32 math and sums.
 *
 * The weight is packed once, at load (cpu_kernels.pack_weight): panels of GEMM_NR = 16 output
 * columns, each [k][16] (the last panel zero-padded; see load_w for the order of a row's
 * columns), stored as float32 or as bfloat16 where
 * every weight is a bfloat16 value (then the widening to float32 is exact, and it halves the
 * bytes a decode step streams from memory). Each call copies x into panels of at most GEMM_MR
 * = 6 rows, [k][6], so that the inner loop reads both operands front to back. A 6 x 16 tile of out
 * lives in 12 registers while the k loop runs: per k, two loads of w, six broadcasts of x
 * and twelve FMAs. k is walked in slices (at most GEMM_KC float32 rows, or twice as many
 * bfloat16 ones: 24 KiB) so that a panel's slice stays in L1 while every row panel of a chunk
 * of GEMM_MC rows passes over it; the threads share out
 * (chunk, column panel) pairs. */

#define GEMM_MR 6
#define GEMM_NR 16
#define GEMM_KC 384
#define GEMM_MC 72

typedef int32_t i8u __attribute__((vector_size(32), aligned(2)));

/* Row kk of a weight panel: its 16 columns as two vectors, columns 0-7 and 8-15. A bfloat16
 * panel stores each row interleaved, column i at 2i and column 8 + i at 2i + 1: a bfloat16 is
 * the top half of a float32, so one 32-byte load holds both vectors, a shift makes the first
 * and a mask the second. */
static inline __attribute__((always_inline)) void load_w(const void *w, int64_t kk, int bf16,
                                                         v8 *w0, v8 *w1) {
    if (bf16) {
        const i8 pair = *(const i8u *)((const uint16_t *)w + kk * GEMM_NR);
        *w0 = (v8)(pair << 16);
        *w1 = (v8)(pair & (int32_t)0xffff0000u);
    } else {
        *w0 = *(const v8u *)((const float *)w + kk * GEMM_NR);
        *w1 = *(const v8u *)((const float *)w + kk * GEMM_NR + 8);
    }
}

/* One tile: `rows` (<= 6) rows of x's panel `a` times one weight panel's slice `w`, over kc;
 * the result is stored to (first slice) or added to `out`'s rows x cols. `init` (16 floats,
 * or NULL) starts the sums: the bias, on the first slice. */
static inline __attribute__((always_inline)) void gemm_tile(
    int rows, int bf16, const float *a, const void *w, int64_t kc, const float *init,
    float *out, int64_t ldo, int cols, int first) {
    v8 acc[GEMM_MR][2];
    for (int r = 0; r < rows; r++) {
        acc[r][0] = init ? *(const v8u *)init : splat(0.0f);
        acc[r][1] = init ? *(const v8u *)(init + 8) : splat(0.0f);
    }
#pragma GCC unroll 4
    for (int64_t kk = 0; kk < kc; kk++) {
        v8 w0, w1;
        load_w(w, kk, bf16, &w0, &w1);
        for (int r = 0; r < rows; r++) {
            const v8 ar = splat(a[kk * GEMM_MR + r]);
            acc[r][0] += ar * w0;
            acc[r][1] += ar * w1;
        }
    }
    for (int r = 0; r < rows; r++) {
        float *o = out + r * ldo;
        if (cols == GEMM_NR) {
            if (!first) acc[r][0] += *(v8u *)o, acc[r][1] += *(v8u *)(o + 8);
            *(v8u *)o = acc[r][0], *(v8u *)(o + 8) = acc[r][1];
        } else {
            for (int c = 0; c < cols; c++)
                o[c] = (first ? 0.0f : o[c]) + acc[r][c / 8][c % 8];
        }
    }
}

/* The tile with its row count and weight type as constants, so that its loops unroll and
 * its sums stay in registers. */
static void gemm_tile_any(int rows, int bf16, const float *a, const void *w, int64_t kc,
                          const float *init, float *out, int64_t ldo, int cols, int first) {
#define TILE(R)                                                                            \
    case R:                                                                                \
        if (bf16) gemm_tile(R, 1, a, w, kc, init, out, ldo, cols, first);                 \
        else gemm_tile(R, 0, a, w, kc, init, out, ldo, cols, first);                      \
        break;
    switch (rows) { TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) }
#undef TILE
}

/* Returns 0, -1 for arguments it does not serve, -2 when the row panels cannot be allocated. */
int linear_f32(const float *x, const void *packed, int64_t weight_bf16, const float *bias,
               float *out, int64_t m, int64_t n, int64_t k, int64_t num_threads) {
    if (m < 0 || n < 1 || k < 1 || num_threads < 1) return -1;
    if (m == 0) return 0;
    const int64_t row_panels = (m + GEMM_MR - 1) / GEMM_MR, panels = (n + GEMM_NR - 1) / GEMM_NR;
    /* Rows are dealt evenly over the panels (32 rows: 6, 6, 5, 5, 5, 5, not 6 x 5 + 2): a
     * tile of few rows leaves the FMA units waiting on its few sums. */
    const int64_t base = m / row_panels, extra = m % row_panels;
    const int64_t chunk = GEMM_MC / GEMM_MR, chunks = (row_panels + chunk - 1) / chunk;
    const size_t elem = weight_bf16 ? sizeof(uint16_t) : sizeof(float);
    const int64_t kc_limit = GEMM_KC * sizeof(float) / elem;
    const int64_t slices = (k + kc_limit - 1) / kc_limit, kc_max = (k + slices - 1) / slices;
    float *a = malloc((size_t)(row_panels * GEMM_MR * k) * sizeof(float));
    if (!a) return -2;
    const int parallel = m * n * k >= 4 * PARALLEL_MIN_FLOATS;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < row_panels; p++) {
            const int64_t first = p * base + (p < extra ? p : extra), rows = base + (p < extra);
            for (int64_t kk = 0; kk < k; kk++)
                for (int64_t r = 0; r < GEMM_MR; r++)
                    a[(p * k + kk) * GEMM_MR + r] = r < rows ? x[(first + r) * k + kk] : 0.0f;
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t c = 0; c < chunks; c++)
            for (int64_t j = 0; j < panels; j++) {
                const int cols = n - j * GEMM_NR < GEMM_NR ? (int)(n - j * GEMM_NR) : GEMM_NR;
                float init[GEMM_NR] = {0};
                for (int i = 0; bias && i < cols; i++) init[i] = bias[j * GEMM_NR + i];
                const int64_t p_end = (c + 1) * chunk < row_panels ? (c + 1) * chunk : row_panels;
                for (int64_t k0 = 0; k0 < k; k0 += kc_max) {
                    const int64_t kc = k - k0 < kc_max ? k - k0 : kc_max;
                    const char *w = (const char *)packed + (j * k + k0) * GEMM_NR * elem;
                    for (int64_t p = c * chunk; p < p_end; p++) {
                        const int64_t first = p * base + (p < extra ? p : extra);
                        gemm_tile_any((int)(base + (p < extra)), (int)weight_bf16,
                                      a + (p * k + k0) * GEMM_MR, w, kc,
                                      k0 == 0 && bias ? init : NULL,
                                      out + first * n + j * GEMM_NR, n, cols, k0 == 0);
                    }
                }
            }
    }
    free(a);
    return 0;
}
