/* Paged attention on the CPU: every new token of a step (decode rows and prompts alike)
 * attends over its sequence's context straight from the paged KV cache, with no gathered copy
 * of it. (A decoder layer's elementwise work is in layer.c, the linear layers in gemm.c.)
 *
 * Layouts (all contiguous):
 *   query, out        [tokens, num_heads, head_dim]: each sequence's new tokens in a run
 *                     (query's rows may lie further apart: query_stride values, so that the
 *                     q/k/v projection's output is read in place); float32 or (act_bf16)
 *                     bfloat16: read and written once per head and work item, so their dtype
 *                     is tested there, not made a constant
 *   k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim] (row layout), float32
 *                     or bfloat16 (kv_bf16: half the bytes to read; attention still computes
 *                     in float32); a bf16 model's bf16 cache in pair layout where
 *                     kv_pair_layout says so (same bytes per block, see attend_dp)
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
 * Written with vec.h's 8-float vectors, so head_dim must be a multiple of 8. Scores of eight
 * tokens are accumulated side by side (eight independent FMA chains), and exp runs on 8 scores
 * at a time. Where the build has AVX512_BF16, a bf16 model over a bf16 cache (head_dim a
 * multiple of 32) takes attend_dp instead: bf16 dot products for both of attention's
 * products.
 */
#include "kernels.h"
#include "vec.h"

#define MAX_HEADS 64
#define MAX_BLOCK 256
#define MAX_VECS 32 /* head_dim / 8 */

typedef struct {
    const void *query;
    const void *k_cache, *v_cache; /* float32, or bfloat16 (kv_bf16) */
    const int64_t *block_tables, *query_start, *seq_lens;
    void *out;
    int64_t query_stride, num_heads, num_kv_heads, head_dim, block_size, max_blocks, kv_bf16;
    int64_t act_bf16; /* query and out bfloat16 */
    float scale;
    int amx; /* attend_amx serves (a bf16 model over a pair-layout cache, AMX lent) */
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
                *(v8u *)(kb + j * hd + c * 8) = load8(w->k_cache, at + j * row + c * 8, 1);
                *(v8u *)(vb + j * hd + c * 8) = load8(w->v_cache, at + j * row + c * 8, 1);
            }
    }
}

/* One online-softmax step over a span's scores (m of them, masked up to padded, a multiple
 * of 8): the scores become their exps against the new running max, *max and *sum are
 * updated, and the factor that rescales the sums of earlier spans is returned (0 on the
 * first span). */
static inline __attribute__((always_inline)) float softmax_step(float *scores, int64_t m,
                                                                int64_t padded, float *max,
                                                                float *sum) {
    for (int64_t j = m; j < padded; j++) scores[j] = -INFINITY;
    v8 top = splat(-INFINITY);
    for (int64_t j = 0; j < padded; j += 8) {
        const v8 sj = *(const v8 *)(scores + j);
        const i8 above = sj > top;
        top = (v8)(((i8)sj & above) | ((i8)top & ~above));
    }
    float span_max = top[0];
    for (int t = 1; t < 8; t++) span_max = top[t] > span_max ? top[t] : span_max;
    const float new_max = span_max > *max ? span_max : *max;
    const float correction = expf(*max - new_max);
    v8 sums = splat(0.0f);
    for (int64_t j = 0; j < padded; j += 8) {
        const v8 p = exp8(*(v8 *)(scores + j) - splat(new_max)); /* 0 if masked */
        sums += p;
        *(v8 *)(scores + j) = p;
    }
    *sum = *sum * correction + hsum(sums);
    *max = new_max;
    return correction;
}

/* The lines of a span's K and V, fetched a few at a time while the span before it is worked
 * on, into L2 (prefetcht1): fetched all at once, they stalled the core as soon as its miss
 * buffers were full, so that the work waited for memory instead of going on beside it, and
 * into L1 they evicted the span being worked on (BENCHMARKS.md, "Decode attention at the
 * memory's pace"). Each slot's lines of the item's kv heads are `bytes` long from `offset` in
 * its cache row. */
typedef struct {
    const char *k, *v;
    const int64_t *table;
    int64_t block_size, len, row_bytes, offset, bytes;
    int64_t b, end, j, f; /* the next block, the block to stop at, slot and byte in it */
} Fetch;

static inline __attribute__((always_inline)) void fetch_some(Fetch *p, int64_t lines) {
    for (; lines > 0 && p->b < p->end; lines--) {
        const int64_t at = (p->table[p->b] * p->block_size + p->j) * p->row_bytes + p->offset;
        __builtin_prefetch(p->k + at + p->f, 0, 2);
        __builtin_prefetch(p->v + at + p->f, 0, 2);
        if ((p->f += 64) < p->bytes) continue;
        p->f = 0;
        if (++p->j < p->block_size && p->b * p->block_size + p->j < p->len) continue;
        p->j = 0;
        p->b++;
    }
}

/* The context work item `item` (seq, q0, rows, g0, g1) reads: up to its last row's position. */
static inline int64_t item_len(const Work *w, const int64_t *item) {
    const int64_t seq = item[0];
    return w->seq_lens[seq] - (w->query_start[seq + 1] - w->query_start[seq]) + item[1] +
           item[2];
}

/* A cursor over the first span (span_blocks blocks) of work item `item` (NULL: none) in a
 * cache of `elem`-byte values. */
static inline Fetch item_fetch(const Work *w, const int64_t *item, int64_t span_blocks,
                               int64_t elem) {
    if (!item) return (Fetch){0};
    const int64_t seq = item[0], hd = w->head_dim, bs = w->block_size, len = item_len(w, item);
    const int64_t blocks = (len + bs - 1) / bs;
    return (Fetch){w->k_cache, w->v_cache, w->block_tables + seq * w->max_blocks, bs, len,
                   w->num_kv_heads * hd * elem, item[3] * hd * elem,
                   (item[4] - item[3]) * hd * elem, 0, span_blocks < blocks ? span_blocks : blocks,
                   0, 0};
}

/* The Fetch of kv heads g0 ... g1 - 1 of sequence seq's first len slots over a pair-layout
 * cache: each block's tiles of those kv heads are one run (kv heads g0 ... g1 - 1 of a block
 * lie together), taken as one slot per block. */
static inline Fetch tiles_fetch(const Work *w, int64_t seq, int64_t g0, int64_t g1, int64_t len,
                                int64_t span_blocks) {
    const int64_t tile_bytes = w->block_size * w->head_dim * 2;
    const int64_t blocks = (len + w->block_size - 1) / w->block_size;
    return (Fetch){w->k_cache, w->v_cache, w->block_tables + seq * w->max_blocks, 1, blocks,
                   w->num_kv_heads * tile_bytes, g0 * tile_bytes, (g1 - g0) * tile_bytes, 0,
                   span_blocks < blocks ? span_blocks : blocks, 0, 0};
}

/* The Fetch of work item `item` (NULL: none) over a pair-layout cache. */
static inline Fetch item_fetch_tiles(const Work *w, const int64_t *item, int64_t span_blocks) {
    if (!item) return (Fetch){0};
    return tiles_fetch(w, item[0], item[3], item[4], item_len(w, item), span_blocks);
}

/* At the start of the span at block `first`: fetch what is left of it, aim at the next span
 * (past the item's last, at the first span of `then`, the item this thread likely takes
 * next), and return how many lines to fetch at each of the span's `chunks` pieces of work.
 * An empty cursor ((Fetch){0}: no item next, taken over from `then` at an earlier span) has
 * nothing to fetch. */
static inline __attribute__((always_inline)) int64_t fetch_next_span(Fetch *p, int64_t first,
                                                                     int64_t span_blocks,
                                                                     int64_t chunks,
                                                                     const Fetch *then) {
    fetch_some(p, INT64_MAX);
    if (!p->block_size) return 0;
    const int64_t blocks = (p->len + p->block_size - 1) / p->block_size;
    p->end = first + 2 * span_blocks < blocks ? first + 2 * span_blocks : blocks;
    if (p->b >= p->end) *p = *then;
    return ((p->end - p->b) * p->block_size * p->bytes / 64 + chunks - 1) / chunks;
}

static inline __attribute__((always_inline)) void attend(const Work *w, int64_t seq, int64_t q0,
                                                         int64_t rows, int64_t g0, int64_t g1,
                                                         const int64_t vecs, const int bf16,
                                                         const int widen, const int64_t *next) {
    const int64_t kvh = w->num_kv_heads, hd = vecs * 8, bs = w->block_size;
    const int64_t group = w->num_heads / kvh, heads = (g1 - g0) * group, h0 = g0 * group;
    const int64_t seq_len = w->seq_lens[seq], first_token = w->query_start[seq] + q0;
    const int64_t first_pos = seq_len - (w->query_start[seq + 1] - w->query_start[seq]) + q0;
    const int64_t len = first_pos + rows; /* the last row's context */
    const int64_t row = kvh * hd; /* values between consecutive slots of a block */
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
            const int64_t qs = (first_token + r) * w->query_stride + (h0 + h) * hd;
            for (int64_t c = 0; c < vecs; c++) {
                q[r * heads + h][c] = load8(w->query, qs + c * 8, w->act_bf16) * splat(w->scale);
                acc[r * heads + h][c] = splat(0.0f);
            }
            max[r * heads + h] = -INFINITY;
            sum[r * heads + h] = 0.0f;
        }
    const int64_t item[5] = {seq, q0, rows, g0, g1};
    Fetch ahead = item_fetch(w, item, span_blocks, bf16 ? 2 : 4); /* fetched at once, below */
    const Fetch then = item_fetch(w, next, span_blocks, bf16 ? 2 : 4);
    for (int64_t first = 0; first * bs < len; first += span_blocks) {
        const int64_t span_stop = (first + span_blocks) * bs;
        const int64_t span_end = len < span_stop ? len : span_stop;
        /* the next span, a share at each block of this span that a head scores */
        const int64_t blocks_here = (span_end - 1) / bs - first + 1;
        const int64_t share = fetch_next_span(&ahead, first, span_blocks,
                                              (g1 - g0) * group * rows * blocks_here, &then);
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
                        fetch_some(&ahead, share);
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
                                    a[t] += qc * load8(kc, k + (j + t) * stride + c * 8,
                                                         in_place_bf16);
                            }
                            *(v8u *)(s + j) = hsum8(a);
                        }
                        for (; j < n; j++) { /* blocks whose size is not a multiple of 8 */
                            v8 a = splat(0.0f);
                            for (int64_t c = 0; c < vecs; c++)
                                a += q[i][c] * load8(kc, k + j * stride + c * 8, in_place_bf16);
                            s[j] = hsum(a);
                        }
                    }
                    const float correction = softmax_step(scores, m, padded, &max[i], &sum[i]);
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
                                o[c] += pj * load8(vc, v + j * stride + c * 8, in_place_bf16);
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
            const int64_t out = ((first_token + r) * w->num_heads + h0 + h) * hd;
            const v8 inv = splat(1.0f / sum[r * heads + h]);
            for (int64_t c = 0; c < vecs; c++)
                store8(w->out, out + c * 8, acc[r * heads + h][c] * inv, w->act_bf16);
        }
}

#if defined(__AVX512BF16__) && (defined(__clang__) || __GNUC__ >= 12)
/* A bf16 model over a bf16 cache in pair layout (kv_pair_layout), where the CPU has
 * AVX512_BF16: both products through vdpbf16ps, which multiplies pairs of bf16 values and adds
 * both products to a float32 lane (32 multiplies per instruction, twice the float32 FMA's),
 * reading the cache in place. In pair layout each block holds, per kv head, a tile of K as
 * [head_dim / 2][block_size][2] (dimensions 2d and 2d + 1 of each slot together) and one of
 * V as [block_size / 2][head_dim][2] (slots 2j and 2j + 1 of each dimension together):
 *   Scores: one load holds a dimension pair of 16 slots, against that pair of the query
 *   broadcast: 16 scores accumulate in 16 lanes, with no horizontal sums (in the row layout
 *   they cost as much as the products: BENCHMARKS.md, "Attention in pair layout"). The
 *   products of two bf16 values are exact in float32, so the scores are as exact as the
 *   float32 path's.
 *   Values: one load holds 16 dimensions of a pair of slots, against the pair of their
 *   probabilities rounded to bf16 (as torch's bf16 flash attention rounds them for its
 *   second product); the lanes hold the dimensions in order.
 * Each load of K and V serves up to DP_HEADS query heads of its kv head at once. Softmax and
 * sums stay float32. */
#include <immintrin.h>
#define HAVE_ATTEND_DP 1


/* Slots per span here: four times SPAN, since what a span costs beside its products (the
 * softmax's max, rescaling and bookkeeping per query head) is a large share of a decode row's
 * work at SPAN, and a span of one kv head's K and V (128 slots x 64 dims x 2 bytes, twice)
 * still sits in L2 while each of its query heads reads it. */
#define DP_SPAN 128
#define DP_SLOTS (MAX_BLOCK > DP_SPAN ? MAX_BLOCK : DP_SPAN)

/* One online-softmax step (softmax_step's) on 16 lanes, for both products on bf16: of a
 * span's m scores (read up to padded, a multiple of 16), scaled by `scale` first, their exps
 * against the new running max rounded to bf16 into probs (0 from m to padded, so that a pair
 * or chunk past the context adds nothing); *max and *sum (of the float32 exps) updated.
 * Returns the factor that rescales the sums of earlier spans. scores is overwritten. */
static inline __attribute__((always_inline)) float softmax_probs16(
    float *scores, uint16_t *probs, int64_t m, int64_t padded, float scale, float *max,
    float *sum) {
#define SEEN(j) (j >= m ? 0 : m - j >= 16 ? 0xffff : (__mmask16)((1u << (m - j)) - 1))
    v16 top = (v16)_mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < padded; j += 16) {
        const v16 sj = (v16)_mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), SEEN(j),
                                               _mm512_load_ps(scores + j)) * scale;
        *(v16 *)(scores + j) = sj;
        top = (v16)_mm512_max_ps((__m512)top, (__m512)sj);
    }
    const float span_max = _mm512_reduce_max_ps((__m512)top);
    const float new_max = span_max > *max ? span_max : *max;
    const float correction = expf(*max - new_max);
    v16 sums = (v16)_mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) { /* masked: 0 exactly (exp16 gives ~1e-38) */
        const __m512 p = _mm512_maskz_mov_ps(SEEN(j), (__m512)exp16(*(v16 *)(scores + j) -
                                                                    new_max));
        sums += (v16)p;
        _mm256_store_si256((__m256i *)(probs + j), (__m256i)_mm512_cvtneps_pbh(p));
    }
#undef SEEN
    *sum = *sum * correction + _mm512_reduce_add_ps((__m512)sums);
    *max = new_max;
    return correction;
}

/* Query heads scored and summed together against each load of a kv head's K and V: at most
 * this many (4 x head_dim / 16 sums in registers for head_dim 64). */
#define DP_HEADS 4

static inline __m512bh pair_at(const uint16_t *probs) {
    uint32_t pair;
    memcpy(&pair, probs, sizeof pair);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

/* scores[x][0 ... m) (rounded up to 16) = the dot products of query heads x < nh (their
 * dimension pairs q[x]) with the span's K slots, kv head tiles ks[b] per block. Four chains
 * per head (pairs is a multiple of 16): with three heads, two chains each left the products'
 * latency (6 cycles on Zen 4) exposed. */
static inline __attribute__((always_inline)) void dp_scores(
    const int nh, const int64_t pairs, const uint32_t *const q[], const uint16_t *const ks[],
    int64_t bs, int64_t m, float (*scores)[DP_SLOTS + 16], Fetch *ahead, int64_t share) {
    for (int64_t c0 = 0, b = 0; c0 < m; b++)
        for (int64_t t0 = 0; t0 < bs && c0 < m; t0 += 16, c0 += 16) {
            fetch_some(ahead, share);
            const uint16_t *k = ks[b] + t0 * 2;
            __m512 s[DP_HEADS][4];
            for (int x = 0; x < nh; x++)
                for (int c = 0; c < 4; c++) s[x][c] = _mm512_setzero_ps();
            for (int64_t p = 0; p < pairs; p += 4)
                for (int c = 0; c < 4; c++) {
                    const __m512bh kc = (__m512bh)_mm512_loadu_si512(k + (p + c) * bs * 2);
                    for (int x = 0; x < nh; x++)
                        s[x][c] = _mm512_dpbf16_ps(
                            s[x][c], (__m512bh)_mm512_set1_epi32((int)q[x][p + c]), kc);
                }
            for (int x = 0; x < nh; x++)
                *(v16 *)(scores[x] + c0) =
                    ((v16)s[x][0] + (v16)s[x][1]) + ((v16)s[x][2] + (v16)s[x][3]);
        }
}

/* acc[x] (head_dim / 16 sums each, dimensions in order) += the probabilities probs[x] of the
 * span's m slots times their V rows, V tiles vs[b] per block: a pair of slots per load. */
static inline __attribute__((always_inline)) void dp_values(
    const int nh, const int64_t zs, const uint16_t *const vs[], int64_t bs, int64_t m,
    uint16_t (*probs)[DP_SLOTS + 16], __m512 *const acc[]) {
    __m512 o[DP_HEADS][2 * zs];
    for (int x = 0; x < nh; x++)
        for (int64_t z = 0; z < 2 * zs; z++) o[x][z] = acc[x][z];
    for (int64_t j = 0, b = 0; j < m; b++)
        for (int64_t t = 0; t < bs && j < m; t += 2, j += 2) {
            const uint16_t *v = vs[b] + t * 32 * zs;
            const __mmask32 both = j + 1 < m ? 0xffffffffu : 0x55555555u;
            __m512bh p[DP_HEADS];
            for (int x = 0; x < nh; x++) p[x] = pair_at(probs[x] + j);
            for (int64_t z = 0; z < 2 * zs; z++) {
                const __m512bh vv =
                    (__m512bh)_mm512_maskz_mov_epi16(both, _mm512_loadu_si512(v + 32 * z));
                for (int x = 0; x < nh; x++) o[x][z] = _mm512_dpbf16_ps(o[x][z], vv, p[x]);
            }
        }
    for (int x = 0; x < nh; x++)
        for (int64_t z = 0; z < 2 * zs; z++) acc[x][z] = o[x][z];
}

/* One span of one query row for nh query heads of a kv head (q, acc, max and sum from the
 * first): their scores, an online-softmax step each, their values. */
static inline __attribute__((always_inline)) void dp_heads(
    const int nh, const int64_t zs, const uint32_t *const q[], __m512 *const acc[], float *max,
    float *sum, const uint16_t *const ks[], const uint16_t *const vs[], int64_t bs, int64_t m,
    float scale, float (*scores)[DP_SLOTS + 16], uint16_t (*probs)[DP_SLOTS + 16],
    Fetch *ahead, int64_t share) {
    const int64_t padded = (m + 15) & ~15;
    dp_scores(nh, 16 * zs, q, ks, bs, m, scores, ahead, share);
    for (int x = 0; x < nh; x++) {
        const float correction =
            softmax_probs16(scores[x], probs[x], m, padded, scale, &max[x], &sum[x]);
        const __m512 by = _mm512_set1_ps(correction);
        for (int64_t z = 0; z < 2 * zs; z++) acc[x][z] = _mm512_mul_ps(acc[x][z], by);
    }
    dp_values(nh, zs, vs, bs, m, probs, acc);
}

/* attend for a bf16 model over a bf16 cache in pair layout (kv_pair_layout), with head_dim =
 * 32 * zs: the same items, spans and online softmax; the query heads of a kv head in bundles
 * of up to DP_HEADS. */
static inline __attribute__((always_inline)) void attend_dp(const Work *w, int64_t seq,
                                                            int64_t q0, int64_t rows, int64_t g0,
                                                            int64_t g1, const int64_t zs,
                                                            const int64_t *next) {
    const int64_t kvh = w->num_kv_heads, hd = zs * 32, bs = w->block_size, pairs = hd / 2;
    const int64_t group = w->num_heads / kvh, heads = (g1 - g0) * group, h0 = g0 * group;
    const int64_t seq_len = w->seq_lens[seq], first_token = w->query_start[seq] + q0;
    const int64_t first_pos = seq_len - (w->query_start[seq + 1] - w->query_start[seq]) + q0;
    const int64_t len = first_pos + rows;
    const int64_t tile = bs * hd; /* one kv head's K (or V) in one block */
    const uint16_t *kc = w->k_cache, *vc = w->v_cache;
    const int64_t span_blocks = bs >= DP_SPAN ? 1 : DP_SPAN / bs;
    const int64_t *table = w->block_tables + seq * w->max_blocks;
    uint32_t q[rows * heads][pairs];
    __m512 acc[rows * heads][2 * zs];
    float max[rows * heads], sum[rows * heads];
    float scores[DP_HEADS][DP_SLOTS + 16] __attribute__((aligned(64)));
    uint16_t probs[DP_HEADS][DP_SLOTS + 16] __attribute__((aligned(64)));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            memcpy(q[r * heads + h], (const uint16_t *)w->query +
                   (first_token + r) * w->query_stride + (h0 + h) * hd, hd * 2);
            for (int64_t z = 0; z < 2 * zs; z++) acc[r * heads + h][z] = _mm512_setzero_ps();
            max[r * heads + h] = -INFINITY;
            sum[r * heads + h] = 0.0f;
        }
    const int64_t item[5] = {seq, q0, rows, g0, g1};
    Fetch ahead = item_fetch_tiles(w, item, span_blocks); /* fetched at once, below */
    const Fetch then = item_fetch_tiles(w, next, span_blocks);
    for (int64_t first = 0; first * bs < len; first += span_blocks) {
        const int64_t span_stop = (first + span_blocks) * bs;
        const int64_t span_end = len < span_stop ? len : span_stop;
        const int64_t chunks_here = (span_end - first * bs + 15) / 16;
        const int64_t share = fetch_next_span(&ahead, first, span_blocks,
                                              (g1 - g0) * rows * chunks_here, &then);
        for (int64_t g = g0; g < g1; g++) {
            const uint16_t *ks[DP_SLOTS / 16], *vs[DP_SLOTS / 16];
            for (int64_t b = 0; b < span_blocks && (first + b) * bs < span_end; b++) {
                ks[b] = kc + (table[first + b] * kvh + g) * tile;
                vs[b] = vc + (table[first + b] * kvh + g) * tile;
            }
            for (int64_t r = 0; r < rows; r++) {
                const int64_t end = span_end < first_pos + r + 1 ? span_end : first_pos + r + 1;
                if (end <= first * bs) continue;
                const int64_t m = end - first * bs;
                for (int64_t hs = (g - g0) * group; hs < (g - g0 + 1) * group; hs += DP_HEADS) {
                    const int64_t he = hs + DP_HEADS < (g - g0 + 1) * group ? hs + DP_HEADS
                                                                         : (g - g0 + 1) * group;
                    const int64_t i0 = r * heads + hs, nh = he - hs;
                    const uint32_t *qs[DP_HEADS];
                    __m512 *accs[DP_HEADS];
                    for (int x = 0; x < nh; x++) qs[x] = q[i0 + x], accs[x] = acc[i0 + x];
                    /* the count of heads a constant, so that their sums stay in registers */
#define HEADS(n) dp_heads(n, zs, qs, accs, max + i0, sum + i0, ks, vs, bs, m, w->scale, \
                          scores, probs, &ahead, share)
                    switch (nh) {
                    case 1: HEADS(1); break;
                    case 2: HEADS(2); break;
                    case 3: HEADS(3); break;
                    default: HEADS(4);
                    }
#undef HEADS
                }
            }
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t i = r * heads + h, out = ((first_token + r) * w->num_heads + h0 + h) * hd;
            const v16 inv = (v16)_mm512_set1_ps(1.0f / sum[i]);
            for (int64_t z = 0; z < 2 * zs; z++) {
                const v16 d = (v16)acc[i][z] * inv;
                store8(w->out, out + 16 * z, __builtin_shufflevector(d, d, 0, 1, 2, 3, 4, 5, 6, 7),
                       1);
                store8(w->out, out + 16 * z + 8,
                       __builtin_shufflevector(d, d, 8, 9, 10, 11, 12, 13, 14, 15), 1);
            }
        }
}
#endif

#if KERNELS_AMX && defined(HAVE_ATTEND_DP)
/* A bf16 model over a bf16 cache in pair layout where the CPU has AMX tiles (and the OS lends
 * them: gemm_amx): both of attention's products on tiles, for prompts and decode rows alike.
 * The pair layout's tiles are AMX's second operand as they lie: a block's K tile of a kv head
 * ([head_dim / 2][block_size][2]) read 16 dimension pairs by 16 slots at a time, its V tile
 * ([block_size / 2][head_dim][2]) 8 slot pairs by 16 dimensions. The first operand is up to
 * 16 query vectors at a constant stride: one head's rows of a prompt's tile, or a decode
 * row's query heads of one kv head. Per span (DP_SPAN slots, as attend_dp's): their scores
 * (a tile of 16 slots per TDPBF16PS over 32 dimensions), the same online-softmax step as
 * attend_dp on each vector's scores in float32, the probabilities rounded to bf16, and the
 * sums (float32, in memory between spans, rescaled there) loaded into a tile that adds the
 * probabilities times V, 16 slots and 16 dimensions per product. A tile product's rows are
 * each computed alone and a vector's spans are the same whatever its tile holds beside it,
 * so a token's output is the same in a prompt as in a decode step (a recomputed sequence's
 * hidden states are those it had). Tiles: 0-1 two chunks' scores, 2 queries, 4-5 their K;
 * then 0-3 the sums of 64 dimensions, 6 probabilities, 7 V. */
#include "amx.h"
#define AMX_VECTORS 16


static void amx_configure(int vectors, int *configured) {
    if (*configured == vectors) return;
    TileConfig config = {.palette = 1};
    for (int t = 0; t < 4; t++) tile_shape(&config, t, vectors, 64);
    tile_shape(&config, 4, 16, 64);
    tile_shape(&config, 5, 16, 64);
    tile_shape(&config, 6, vectors, 32);
    tile_shape(&config, 7, 8, 64);
    _tile_loadconfig(&config);
    *configured = vectors;
}

/* V of the 16 slots from `slot` of a span whose context ends n slots in (a partial last
 * chunk): its pair rows with the slots past the context zeroed, into `zeroed` ([8][head_dim]
 * [2]), so that a stale value there (0 x NaN) cannot reach the sums. */
static const uint16_t *amx_tail_values(const uint16_t *v, int64_t slot, int64_t n, int64_t hd,
                                       uint16_t *zeroed) {
    for (int64_t j = 0; j < 16; j++) /* slot j of the chunk: row j / 2, element j % 2 */
        for (int64_t d = 0; d < hd; d++)
            zeroed[(j / 2 * hd + d) * 2 + j % 2] = slot + j < n ? v[(j / 2 * hd + d) * 2 + j % 2]
                                                                : 0;
    return zeroed;
}

/* `vectors` (1-16) query vectors of kv head g of sequence seq (block table `table`): vector
 * i at q + i * q_stride, seeing the context's first limit[i] slots; its output to out + i *
 * o_stride. While a span runs, the next one's K and V are fetched, and while the last runs,
 * `then`'s (the next call's first span). */
static void amx_vectors(const Work *w, int64_t seq, const int64_t *table, int64_t g,
                        int vectors, const uint16_t *q, int64_t q_stride, const int64_t *limit,
                        uint16_t *out, int64_t o_stride, Fetch then, int *configured) {
    const int64_t hd = w->head_dim, bs = w->block_size, tile = bs * hd, kvh = w->num_kv_heads;
    const int64_t span_blocks = bs >= DP_SPAN ? 1 : DP_SPAN / bs;
    const uint16_t *kc = w->k_cache, *vc = w->v_cache;
    float sums[AMX_VECTORS * MAX_VECS * 8] __attribute__((aligned(64)));
    float scores[AMX_VECTORS][DP_SLOTS] __attribute__((aligned(64)));
    uint16_t probs[AMX_VECTORS][DP_SLOTS] __attribute__((aligned(64)));
    uint16_t zeroed[16 * MAX_VECS * 8];
    float max[AMX_VECTORS], sum[AMX_VECTORS];
    int64_t len = 0;
    for (int i = 0; i < vectors; i++) {
        len = limit[i] > len ? limit[i] : len;
        max[i] = -INFINITY, sum[i] = 0.0f;
        memset(sums + i * hd, 0, hd * sizeof(float));
    }
    amx_configure(vectors, configured);
    /* the first span: fetched already (the call before's `then`), or now, at once */
    Fetch ahead = tiles_fetch(w, seq, g, g + 1, len, span_blocks);
    for (int64_t first = 0; first * bs < len; first += span_blocks) {
        const int64_t span_stop = (first + span_blocks) * bs;
        const int64_t n = (len < span_stop ? len : span_stop) - first * bs; /* the span's */
        const int64_t padded = (n + 15) & ~15;
        /* The next span's lines a few at a time, at each piece of work: each product of
         * the scores (per 32 slots, per 32 dimensions) and of the values (per 16 slots).
         * Fetched only beside the values, each burst filled the miss buffers and stalled
         * the core (a bf16 model's decode 2.6% and a prompt of 500 11% slower). */
        const int64_t share = fetch_next_span(&ahead, first, span_blocks,
                                              (padded + 31) / 32 * ((hd + 31) / 32) +
                                                  padded / 16,
                                              &then);
        for (int64_t slot = 0; slot < padded; slot += 32) { /* two chunks, two sums' tiles */
            const int two = slot + 16 < padded;
            const uint16_t *k0 = kc + (table[first + slot / bs] * kvh + g) * tile + slot % bs * 2;
            const uint16_t *k1 = two ? kc + (table[first + (slot + 16) / bs] * kvh + g) * tile +
                                           (slot + 16) % bs * 2
                                     : k0;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t d = 0; d < hd; d += 32) {
                fetch_some(&ahead, share);
                _tile_loadd(2, q + d, q_stride * 2);
                _tile_loadd(4, k0 + d / 2 * bs * 2, bs * 4);
                _tile_dpbf16ps(0, 2, 4);
                if (two) {
                    _tile_loadd(5, k1 + d / 2 * bs * 2, bs * 4);
                    _tile_dpbf16ps(1, 2, 5);
                }
            }
            _tile_stored(0, scores[0] + slot, DP_SLOTS * 4);
            if (two) _tile_stored(1, scores[0] + slot + 16, DP_SLOTS * 4);
        }
        for (int i = 0; i < vectors; i++) {
            const int64_t seen = limit[i] - first * bs < n ? limit[i] - first * bs : n;
            if (seen <= 0) { /* a prompt's earlier row: this span is past it */
                memset(probs[i], 0, padded * sizeof(uint16_t));
                continue;
            }
            const float correction =
                softmax_probs16(scores[i], probs[i], seen, padded, w->scale, &max[i], &sum[i]);
            for (int64_t d = 0; d < hd; d += 16)
                *(v16 *)(sums + i * hd + d) *= correction;
        }
        const uint16_t *tail = NULL; /* the last chunk's V, where the context ends inside it */
        if (n < padded) {
            const int64_t slot = padded - 16, b = first + slot / bs;
            tail = amx_tail_values(vc + (table[b] * kvh + g) * tile +
                                   slot % bs / 2 * hd * 2, slot, n, hd, zeroed);
        }
        for (int64_t d = 0; d < hd; d += 64) { /* up to 4 x 16 dimensions' sums at once */
            const int64_t parts = (hd - d) / 16 < 4 ? (hd - d) / 16 : 4;
            _tile_loadd(0, sums + d, hd * 4);
            if (parts > 1) _tile_loadd(1, sums + d + 16, hd * 4);
            if (parts > 2) _tile_loadd(2, sums + d + 32, hd * 4);
            if (parts > 3) _tile_loadd(3, sums + d + 48, hd * 4);
            for (int64_t slot = 0; slot < padded; slot += 16) {
                const int64_t b = first + slot / bs;
                const uint16_t *v = (tail && slot == padded - 16 ? tail
                    : vc + (table[b] * kvh + g) * tile + slot % bs / 2 * hd * 2) + d * 2;
                if (d == 0) fetch_some(&ahead, share);
                _tile_loadd(6, probs[0] + slot, DP_SLOTS * 2);
                _tile_loadd(7, v, hd * 4);
                _tile_dpbf16ps(0, 6, 7);
                if (parts > 1) {
                    _tile_loadd(7, v + 32, hd * 4);
                    _tile_dpbf16ps(1, 6, 7);
                }
                if (parts > 2) {
                    _tile_loadd(7, v + 64, hd * 4);
                    _tile_dpbf16ps(2, 6, 7);
                }
                if (parts > 3) {
                    _tile_loadd(7, v + 96, hd * 4);
                    _tile_dpbf16ps(3, 6, 7);
                }
            }
            _tile_stored(0, sums + d, hd * 4);
            if (parts > 1) _tile_stored(1, sums + d + 16, hd * 4);
            if (parts > 2) _tile_stored(2, sums + d + 32, hd * 4);
            if (parts > 3) _tile_stored(3, sums + d + 48, hd * 4);
        }
    }
    for (int i = 0; i < vectors; i++) {
        const v8 inv = splat(1.0f / sum[i]);
        for (int64_t d = 0; d < hd; d += 8)
            store8(out + i * o_stride, d, *(const v8 *)(sums + i * hd + d) * inv, 1);
    }
}

/* Work item `item` on tiles: a prompt's rows head by head, a decode row its query heads of
 * each kv head together; each call fetches the next one's first span, the last one that of
 * `next` (the item this thread likely takes next; NULL: none). */
static void attend_amx(const Work *w, const int64_t item[5], const int64_t *next,
                       int *configured) {
    const int64_t seq = item[0], q0 = item[1], rows = item[2], g0 = item[3], g1 = item[4];
    const int64_t hd = w->head_dim, group = w->num_heads / w->num_kv_heads;
    const int64_t first_token = w->query_start[seq] + q0;
    const int64_t first_pos =
        w->seq_lens[seq] - (w->query_start[seq + 1] - w->query_start[seq]) + q0;
    const int64_t *table = w->block_tables + seq * w->max_blocks;
    const uint16_t *query = (const uint16_t *)w->query + first_token * w->query_stride;
    uint16_t *out = (uint16_t *)w->out + first_token * w->num_heads * hd;
    const int64_t span_blocks = w->block_size >= DP_SPAN ? 1 : DP_SPAN / w->block_size;
    const Fetch after = next ? tiles_fetch(w, next[0], next[3], next[3] + 1, item_len(w, next),
                                           span_blocks)
                             : (Fetch){0};

    int64_t limit[AMX_VECTORS];
    for (int64_t g = g0; g < g1; g++) {
        const Fetch then = g + 1 < g1 ? tiles_fetch(w, seq, g + 1, g + 2, first_pos + rows,
                                                    span_blocks)
                                      : after;
        if (rows == 1) {
            for (int i = 0; i < AMX_VECTORS; i++) limit[i] = first_pos + 1;
            for (int64_t h = g * group; h < (g + 1) * group; h += AMX_VECTORS) {
                const int64_t vectors = (g + 1) * group - h < AMX_VECTORS ? (g + 1) * group - h
                                                                          : AMX_VECTORS;
                amx_vectors(w, seq, table, g, (int)vectors, query + h * hd, hd, limit,
                            out + h * hd, hd, then, configured);
            }
            continue;
        }
        for (int64_t h = g * group; h < (g + 1) * group; h++)
            for (int64_t r = 0; r < rows; r += AMX_VECTORS) {
                const int64_t vectors = rows - r < AMX_VECTORS ? rows - r : AMX_VECTORS;
                for (int64_t i = 0; i < vectors; i++) limit[i] = first_pos + r + i + 1;
                amx_vectors(w, seq, table, g, (int)vectors, query + r * w->query_stride + h * hd,
                            w->query_stride, limit, out + r * w->num_heads * hd + h * hd,
                            w->num_heads * hd, then, configured);
            }
    }
}
#endif

/* attend with head_dim a constant for the common sizes, and a variable for others. */
static inline __attribute__((always_inline)) void attend_dims(const Work *w,
                                                              const int64_t item[5],
                                                              const int bf16, const int widen,
                                                              const int64_t *next) {
    const int64_t seq = item[0], q0 = item[1], rows = item[2], g0 = item[3], g1 = item[4];
    switch (w->head_dim) {
    case 64: attend(w, seq, q0, rows, g0, g1, 8, bf16, widen, next); break;
    case 128: attend(w, seq, q0, rows, g0, g1, 16, bf16, widen, next); break;
    case 32: attend(w, seq, q0, rows, g0, g1, 4, bf16, widen, next); break;
    case 16: attend(w, seq, q0, rows, g0, g1, 2, bf16, widen, next); break;
    default: attend(w, seq, q0, rows, g0, g1, w->head_dim / 8, bf16, widen, next);
    }
}

/* ... and how the cache is read a constant too: float32 in place; bfloat16 widened a span at
 * a time where a span of one kv head fits WIDEN_FLOATS, else in place. */
/* `next`: the item this thread likely takes after this one (NULL: none), fetched ahead. */
static void attend_any(const Work *w, const int64_t item[5], const int64_t *next,
                       int *configured) {
    const int64_t span_slots = w->block_size >= SPAN ? w->block_size : SPAN;
#if KERNELS_AMX && defined(HAVE_ATTEND_DP)
    if (w->amx) {
        attend_amx(w, item, next, configured);
        return;
    }
#else
    (void)configured;
#endif
#ifdef HAVE_ATTEND_DP
    if (kv_pair_layout(w->act_bf16, w->kv_bf16, w->head_dim, w->block_size)) {
        const int64_t seq = item[0], q0 = item[1], rows = item[2], g0 = item[3], g1 = item[4];
        switch (w->head_dim) {
        case 64: attend_dp(w, seq, q0, rows, g0, g1, 2, next); return;
        case 128: attend_dp(w, seq, q0, rows, g0, g1, 4, next); return;
        case 32: attend_dp(w, seq, q0, rows, g0, g1, 1, next); return;
        default: attend_dp(w, seq, q0, rows, g0, g1, w->head_dim / 32, next); return;
        }
    }
#endif
    if (!w->kv_bf16)
        attend_dims(w, item, 0, 0, next);
    else if (span_slots * w->head_dim <= WIDEN_FLOATS)
        attend_dims(w, item, 1, 1, next);
    else
        attend_dims(w, item, 1, 0, next);
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

/* 1 where the cache of a model computing in bf16 (act_bf16) or float32 is kept in pair layout
 * (see attend_dp), which rope_write_kv writes and paged_attention reads: a bf16 cache of a bf16
 * model, head_dim a multiple of 32 and blocks a multiple of 16 slots, in a build with
 * AVX512_BF16. Elsewhere it is in row layout: [block][slot][kv head][head_dim]. */
int64_t kv_pair_layout(int64_t act_bf16, int64_t kv_bf16, int64_t head_dim, int64_t block_size) {
#ifdef HAVE_ATTEND_DP
    return act_bf16 && kv_bf16 && head_dim % 32 == 0 && block_size % 16 == 0;
#else
    (void)act_bf16, (void)kv_bf16, (void)head_dim, (void)block_size;
    return 0;
#endif
}

/* 1 where a bf16 model's attention over a bf16 cache takes attend_dp (its probabilities
 * rounded to bf16 before they weigh the values), else 0. */
int64_t attention_bf16_products(void) {
#ifdef HAVE_ATTEND_DP
    return 1;
#else
    return 0;
#endif
}

/* Attention of every new token of a step over its sequence's context in the paged cache,
 * causal within the step's own tokens, whose K/V must be in the cache already. Sequence s
 * has tokens query_start[s] ... query_start[s + 1] - 1 of query and out and a context of
 * seq_lens[s] tokens, this step's included. Returns 0; -1 for shapes it does not serve (the
 * caller checks them first) or a query longer than its context; -2 when out of memory. */
int paged_attention(const void *query, int64_t query_stride, int64_t act_bf16,
                    const void *k_cache, const void *v_cache, int64_t kv_bf16,
                    const int64_t *block_tables, const int64_t *query_start,
                    const int64_t *seq_lens, void *out, int64_t num_seqs, int64_t num_heads,
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
                    kv_bf16 != 0, act_bf16 != 0, scale,
                    KERNELS_AMX && kv_pair_layout(act_bf16, kv_bf16, head_dim, block_size) &&
                        gemm_amx()};
#pragma omp parallel num_threads(num_threads)
    {
        int configured = 0; /* the tiles' shape this thread loaded (AMX), 0: none */
#pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < count; i++) /* the threads take items about in turn */
            attend_any(&w, items[i], i + num_threads < count ? items[i + num_threads] : NULL,
                       &configured);
#if KERNELS_AMX
        if (configured) _tile_release();
#endif
    }
    free(items);
    return 0;
}
