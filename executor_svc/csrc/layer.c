/* The elementwise work of a decoder layer, fused: one pass over each row instead of the five
 * to ten torch operators (each a pass over memory and a dispatch from Python) it takes unfused;
 * and greedy sampling. Rows are tokens; tensors are contiguous [tokens, width] unless said
 * otherwise. Activations are float32 or, with act_bf16, bfloat16 (as a bf16 model's): the math
 * is float32 either way, and a bfloat16 result is rounded as torch rounds it. Any width is
 * served: 8 values at a time, then one by one. Small batches run on the calling thread. Each
 * kernel is an inline function with the dtype a constant, called once per dtype, so that the
 * float32 code has no test of it in its loops. */
#include "kernels.h"
#include "vec.h"

/* residual += x (where x is given), then out = weight * residual / sqrt(mean(residual^2) + eps):
 * the residual add and RMSNorm of a pre-norm decoder layer. In bfloat16 every step rounds as a
 * bf16 model's operators do: the sum written back, the normalised row, and its product with
 * the (bfloat16) weight. */
#ifdef __AVX512F__
/* Sixteen values of the residual from element i, x added first where given (the sum
 * rounded and written back). */
static inline __attribute__((always_inline)) v16 added16(void *r, const void *x, int64_t i,
                                                         const int bf16) {
    const v16 ri = load16(r, i, bf16);
    if (!x) return ri;
    if (!bf16) {
        const v16 sum = ri + load16(x, i, 0);
        store16(r, i, sum, 0);
        return sum;
    }
    const h16 sum = to_bf16x16(ri + load16(x, i, 1)); /* rounded once, stored and read back */
    *(h16u *)((uint16_t *)r + i) = sum;
    return widen16(sum);
}
#endif

static inline __attribute__((always_inline)) void add_rms_norm_row(
    void *r, const void *x, const void *weight, void *o, int64_t hidden, float eps,
    const int bf16) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef __AVX512F__
    /* 16 values at a time and four sums (one sum's chain of adds set the pace), then the
     * 8-wide steps below for what is left */
    const int64_t body16 = hidden & ~(int64_t)15;
    v16 sq0 = {0}, sq1 = {0}, sq2 = {0}, sq3 = {0};
    for (; i + 64 <= body16; i += 64) {
        const v16 r0 = added16(r, x, i, bf16), r1 = added16(r, x, i + 16, bf16);
        const v16 r2 = added16(r, x, i + 32, bf16), r3 = added16(r, x, i + 48, bf16);
        sq0 += r0 * r0, sq1 += r1 * r1, sq2 += r2 * r2, sq3 += r3 * r3;
    }
    for (; i < body16; i += 16) {
        const v16 ri = added16(r, x, i, bf16);
        sq0 += ri * ri;
    }
    sum = _mm512_reduce_add_ps((__m512)((sq0 + sq1) + (sq2 + sq3)));
#endif
    const int64_t body = hidden & ~(int64_t)7;
    v8 squares = splat(0.0f);
    for (; i < body; i += 8) {
        v8 ri = load8(r, i, bf16);
        if (x) {
            ri = round8(ri + load8(x, i, bf16), bf16);
            store8(r, i, ri, bf16);
        }
        squares += ri * ri;
    }
    sum += hsum(squares);
    for (i = body; i < hidden; i++) {
        float ri = load1(r, i, bf16);
        if (x) {
            ri = round1(ri + load1(x, i, bf16), bf16);
            store1(r, i, ri, bf16);
        }
        sum += ri * ri;
    }
    const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
    i = 0;
#ifdef __AVX512F__
    const v16 by = (v16)_mm512_set1_ps(inv);
    for (; i < body16; i += 16)
        store16(o, i, load16(weight, i, bf16) * round16(load16(r, i, bf16) * by, bf16), bf16);
#endif
    for (; i < body; i += 8)
        store8(o, i, load8(weight, i, bf16) * round8(load8(r, i, bf16) * splat(inv), bf16), bf16);
    for (i = body; i < hidden; i++)
        store1(o, i, load1(weight, i, bf16) * round1(load1(r, i, bf16) * inv, bf16), bf16);
}

/* Two passes of vector work per row: a team of two pays for itself from a quarter of the
 * usual size, a 28-row step of 576 values (bfloat16, Zen 4: 32 rows 13.8 -> 9.3 us, 64 rows
 * 25.7 -> 15.5 us; at 16 rows the same). */
#define NORM_PARALLEL_MIN_FLOATS (PARALLEL_MIN_FLOATS / 4)

/* residual, x, weight and out all float32, or (act_bf16) all bfloat16. */
int add_rms_norm(void *residual, const void *x, const void *weight, void *out, int64_t act_bf16,
                 int64_t tokens, int64_t hidden, float eps, int64_t num_threads) {
    if (num_threads < 1) return -1;
    const int64_t elem = act_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) if (tokens * hidden >= NORM_PARALLEL_MIN_FLOATS)
    for (int64_t t = 0; t < tokens; t++) {
        char *r = (char *)residual + t * hidden * elem, *o = (char *)out + t * hidden * elem;
        const char *xt = x ? (const char *)x + t * hidden * elem : NULL;
        if (act_bf16) add_rms_norm_row(r, xt, weight, o, hidden, eps, 1);
        else add_rms_norm_row(r, xt, weight, o, hidden, eps, 0);
    }
    return 0;
}

/* Rotary embedding of each token's query and key heads, in place in the q/k/v projection's
 * output (row: num_heads query heads, then num_kv_heads key heads, then as many value heads,
 * head_dim values each; rows row_stride values apart; float32, or bfloat16 with act_bf16,
 * rotated in float32 and rounded once), rotate-half layout: cos and sin are float32
 * [num_positions, head_dim / 2]. Then each token's keys and values are copied to its cache
 * slot (caches [num_slots, num_kv_heads, head_dim] in row layout, float32 or, with kv_bf16,
 * bfloat16 rounded as torch rounds; in pair layout where kv_pair_layout says so, blocks of
 * block_size slots); slot -1 stores nothing. Returns 0, -1 for arguments it does not serve, 1
 * for a position past the tables, 2 for a slot past the caches (nothing is written then). */
static inline __attribute__((always_inline)) void rope_row(void *row, const float *c,
                                                           const float *s, int64_t heads,
                                                           int64_t head_dim, const int bf16) {
    const int64_t half = head_dim / 2, body = half & ~(int64_t)7;
    for (int64_t h = 0; h < heads; h++) {
        const int64_t lo = h * head_dim, hi = lo + half;
        for (int64_t i = 0; i < body; i += 8) {
            const v8 a = load8(row, lo + i, bf16), b = load8(row, hi + i, bf16);
            const v8 ci = *(const v8u *)(c + i), si = *(const v8u *)(s + i);
            store8(row, lo + i, a * ci - b * si, bf16);
            store8(row, hi + i, b * ci + a * si, bf16);
        }
        for (int64_t i = body; i < half; i++) {
            const float a = load1(row, lo + i, bf16), b = load1(row, hi + i, bf16);
            store1(row, lo + i, a * c[i] - b * s[i], bf16);
            store1(row, hi + i, b * c[i] + a * s[i], bf16);
        }
    }
}

/* Where slot `slot`'s keys (*k) and values (*v) of kv head g lie in caches in pair layout
 * (attention.c, attend_dp): per kv head, K's dimensions 2d and 2d + 1 together in the tile's
 * row d / 2 ... of block_size pairs, V's values beside those of the slot's pair partner (slots
 * 2j and 2j + 1): the key's pair d at k[2 * d * block_size], the value's d at v[2 * d]. */
static inline void pair_slot(void *k_cache, void *v_cache, int64_t slot, int64_t g,
                             int64_t block_size, int64_t num_kv_heads, int64_t head_dim,
                             uint16_t **k, uint16_t **v) {
    const int64_t block = slot / block_size, j = slot % block_size;
    const int64_t at = (block * num_kv_heads + g) * block_size * head_dim;
    *k = (uint16_t *)k_cache + at + 2 * j;
    *v = (uint16_t *)v_cache + at + (j / 2) * 2 * head_dim + j % 2;
}

/* A token's bf16 keys and values (num_kv_heads x head_dim each) into slot `slot` of caches in
 * pair layout. */
static void write_pairs(const char *keys, const char *values, void *k_cache, void *v_cache,
                        int64_t slot, int64_t block_size, int64_t num_kv_heads,
                        int64_t head_dim) {
    for (int64_t g = 0; g < num_kv_heads; g++) {
        uint16_t *k, *v;
        pair_slot(k_cache, v_cache, slot, g, block_size, num_kv_heads, head_dim, &k, &v);
        const char *key = keys + g * head_dim * 2;
        const uint16_t *value = (const uint16_t *)values + g * head_dim;
        for (int64_t d = 0; d < head_dim / 2; d++) memcpy(k + 2 * d * block_size, key + 4 * d, 4);
        for (int64_t d = 0; d < head_dim; d++) v[2 * d] = value[d];
    }
}

/* Fetches for writing the cache lines write_pairs will write for slot `slot`: a key's 4 bytes
 * per dimension pair are each on a line of their own (SmolLM2: 32 lines a kv head, where the
 * values take 4), and in a decode step each token's lines are in another block, cold: written
 * one token after another, every store waited for its line. */
static void fetch_pairs(void *k_cache, void *v_cache, int64_t slot, int64_t block_size,
                        int64_t num_kv_heads, int64_t head_dim) {
    for (int64_t g = 0; g < num_kv_heads; g++) {
        uint16_t *k, *v;
        pair_slot(k_cache, v_cache, slot, g, block_size, num_kv_heads, head_dim, &k, &v);
        for (int64_t d = 0; d < head_dim / 2; d++) __builtin_prefetch(k + 2 * d * block_size, 1);
        for (int64_t d = 0; d < 2 * head_dim; d += 32) __builtin_prefetch(v + d, 1);
    }
}

int rope_write_kv(void *qkv, int64_t row_stride, int64_t act_bf16, const float *cos,
                  const float *sin, int64_t num_positions, const int64_t *positions,
                  void *k_cache, void *v_cache, int64_t kv_bf16, const int64_t *slots,
                  int64_t num_slots, int64_t block_size, int64_t tokens, int64_t num_heads,
                  int64_t num_kv_heads, int64_t head_dim, int64_t num_threads) {
    const int64_t half = head_dim / 2, kv_width = num_kv_heads * head_dim;
    const int64_t rotated = num_heads + num_kv_heads;
    const int64_t elem = act_bf16 ? 2 : 4, kv_elem = kv_bf16 ? 2 : 4;
    if (head_dim % 2 || num_threads < 1 || row_stride < (rotated + num_kv_heads) * head_dim ||
        block_size < 1 || num_slots % block_size)
        return -1;
    const int pairs = (int)kv_pair_layout(act_bf16, kv_bf16, head_dim, block_size);
    for (int64_t t = 0; t < tokens; t++) {
        if (positions[t] < 0 || positions[t] >= num_positions) return 1;
        if (slots[t] < -1 || slots[t] >= num_slots) return 2;
    }
    /* Threads from 8 tokens, however little rotating they do: a decode step's writes each
     * wait on a cold line (fetch_pairs), and two threads wait on twice as many at once. The
     * next token's lines are fetched where it writes to another block than this one (a
     * prompt's tokens share their block's lines). */
#pragma omp parallel for num_threads(num_threads) \
    if (tokens * rotated * head_dim >= PARALLEL_MIN_FLOATS || tokens >= 8)
    for (int64_t t = 0; t < tokens; t++) {
        if (pairs && t + 1 < tokens && slots[t + 1] >= 0 &&
            slots[t + 1] / block_size != slots[t] / block_size)
            fetch_pairs(k_cache, v_cache, slots[t + 1], block_size, num_kv_heads, head_dim);
        char *row = (char *)qkv + t * row_stride * elem;
        const float *c = cos + positions[t] * half, *s = sin + positions[t] * half;
        if (act_bf16) rope_row(row, c, s, rotated, head_dim, 1);
        else rope_row(row, c, s, rotated, head_dim, 0);
        if (slots[t] < 0) continue;
        const char *keys = row + num_heads * head_dim * elem;
        const char *values = row + rotated * head_dim * elem;
        if (pairs) {
            write_pairs(keys, values, k_cache, v_cache, slots[t], block_size, num_kv_heads,
                        head_dim);
            continue;
        }
        char *k = (char *)k_cache + slots[t] * kv_width * kv_elem;
        char *v = (char *)v_cache + slots[t] * kv_width * kv_elem;
        if (act_bf16 == kv_bf16) {
            memcpy(k, keys, kv_width * kv_elem);
            memcpy(v, values, kv_width * kv_elem);
        } else {
            for (int64_t i = 0; i < kv_width; i++) {
                store1(k, i, load1(keys, i, act_bf16), kv_bf16);
                store1(v, i, load1(values, i, act_bf16), kv_bf16);
            }
        }
    }
    return 0;
}

/* out = silu(gate) * up (vec.h's silu_mul8, or its 16 lanes in AVX-512 builds), where each
 * row of gate_up is [gate | up], inter values each; out is [tokens, inter]. */
static inline __attribute__((always_inline)) void silu_mul_row(const void *gate, const void *up,
                                                               void *o, int64_t inter,
                                                               const int bf16) {
    const int64_t body = inter & ~(int64_t)7;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= body; i += 16)
        store16(o, i, silu_mul16(load16(gate, i, bf16), load16(up, i, bf16)), bf16);
#endif
    for (; i < body; i += 8)
        store8(o, i, silu_mul8(load8(gate, i, bf16), load8(up, i, bf16)), bf16);
    for (i = body; i < inter; i++) {
        const float g = load1(gate, i, bf16);
        store1(o, i, g / (1.0f + expf(-g)) * load1(up, i, bf16), bf16);
    }
}

/* An exp and a division per value: about ten times a norm's work per value, so a team pays
 * for itself from an eighth of the norm's size (a 32-token decode step's 49k values). */
#define SILU_PARALLEL_MIN_FLOATS (PARALLEL_MIN_FLOATS / 8)

int silu_mul(const void *gate_up, void *out, int64_t act_bf16, int64_t tokens, int64_t inter,
             int64_t num_threads) {
    if (num_threads < 1) return -1;
    const int64_t elem = act_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) if (tokens * inter >= SILU_PARALLEL_MIN_FLOATS)
    for (int64_t t = 0; t < tokens; t++) {
        const char *gate = (const char *)gate_up + t * 2 * inter * elem;
        const char *up = gate + inter * elem;
        char *o = (char *)out + t * inter * elem;
        if (act_bf16) silu_mul_row(gate, up, o, inter, 1);
        else silu_mul_row(gate, up, o, inter, 0);
    }
    return 0;
}

/* Greedy sampling of each row of logits ([rows, vocab], float32 or bfloat16): the index of its
 * largest logit (the first one on ties, and the first NaN where there is one, as torch.argmax)
 * and that token's log-probability, -log(sum(exp(logits - max))). One pass finds the maximum
 * and where it first is (per lane, then across lanes); a second sums, while the row is still
 * in cache. Both passes take GREEDY_LANES values at a time: 16 where the build has AVX-512
 * (two chains of 16 in the first pass, so that a compare does not wait for the last one's
 * blend), else 8; past the last whole vector, one at a time. */
#ifdef __AVX512F__
#define GREEDY_LANES 16

/* One vector of 16 values from index i into a chain's running maxima and their indices. */
static inline __attribute__((always_inline)) void top_step(v16 x, int64_t i, __m512i lanes,
                                                           __m512 *best, __m512i *where,
                                                           __mmask16 *nan) {
    const __m512 xi = (__m512)x;
    const __mmask16 above = _mm512_cmp_ps_mask(xi, *best, _CMP_GT_OQ);
    *nan |= _mm512_cmp_ps_mask(xi, xi, _CMP_UNORD_Q);
    *best = _mm512_mask_mov_ps(*best, above, xi);
    *where = _mm512_mask_mov_epi32(*where, above,
                                   _mm512_add_epi32(lanes, _mm512_set1_epi32((int)i)));
}

/* The largest of x's first `body` values (a multiple of 32 or not: a last vector of 16 runs
 * alone), where it first is, and whether any is NaN. */
static inline __attribute__((always_inline)) void greedy_top(const void *x, int64_t body,
                                                             float *max, int64_t *token,
                                                             int *any_nan, const int bf16) {
    __m512 best[2] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i where[2] = {lanes, _mm512_add_epi32(lanes, _mm512_set1_epi32(16))};
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 32 <= body; i += 32) {
        top_step(load16(x, i, bf16), i, lanes, &best[0], &where[0], &nan);
        top_step(load16(x, i + 16, bf16), i + 16, lanes, &best[1], &where[1], &nan);
    }
    if (i < body) top_step(load16(x, i, bf16), i, lanes, &best[0], &where[0], &nan);
    float top = -INFINITY;
    int64_t at = 0;
    for (int c = 0; c < 2; c++) {
        float b[16];
        int32_t w[16];
        _mm512_storeu_ps(b, best[c]);
        _mm512_storeu_si512(w, where[c]);
        for (int l = 0; l < 16; l++)
            if (w[l] < body && (b[l] > top || (b[l] == top && w[l] < at))) top = b[l], at = w[l];
    }
    *max = top, *token = at, *any_nan = nan != 0;
}

static inline __attribute__((always_inline)) float greedy_sum(const void *x, int64_t body,
                                                              float max, const int bf16) {
    v16 even = {0}, odd = {0};
    int64_t i = 0;
    for (; i + 32 <= body; i += 32) {
        even += exp16(load16(x, i, bf16) - max);
        odd += exp16(load16(x, i + 16, bf16) - max);
    }
    if (i < body) even += exp16(load16(x, i, bf16) - max);
    return _mm512_reduce_add_ps((__m512)(even + odd));
}
#else
#define GREEDY_LANES 8

static inline __attribute__((always_inline)) void greedy_top(const void *x, int64_t body,
                                                             float *max, int64_t *token,
                                                             int *any_nan, const int bf16) {
    v8 best = splat(-INFINITY);
    i8 where = {0, 1, 2, 3, 4, 5, 6, 7}, lanes = where, nan = {0};
    for (int64_t i = 0; i < body; i += 8) {
        const v8 xi = load8(x, i, bf16);
        const i8 above = xi > best;
        nan |= xi != xi;
        best = (v8)(((i8)xi & above) | ((i8)best & ~above));
        where = ((lanes + (int32_t)i) & above) | (where & ~above);
    }
    float top = best[0];
    int64_t at = where[0];
    for (int i = 1; i < 8; i++)
        if (best[i] > top || (best[i] == top && where[i] < at)) top = best[i], at = where[i];
    int seen_nan = 0;
    for (int i = 0; i < 8; i++) seen_nan |= nan[i];
    *max = top, *token = at, *any_nan = seen_nan;
}

static inline __attribute__((always_inline)) float greedy_sum(const void *x, int64_t body,
                                                              float max, const int bf16) {
    v8 sums = splat(0.0f);
    for (int64_t i = 0; i < body; i += 8) sums += exp8(load8(x, i, bf16) - splat(max));
    return hsum(sums);
}
#endif

static inline __attribute__((always_inline)) void greedy_row(const void *x, int64_t vocab,
                                                             int64_t *token_id, float *logprob,
                                                             const int bf16) {
    const int64_t body = vocab & ~(int64_t)(GREEDY_LANES - 1);
    float max = load1(x, 0, bf16);
    int64_t token = 0;
    int any_nan = 0;
    if (body) greedy_top(x, body, &max, &token, &any_nan, bf16);
    for (int64_t i = body; i < vocab; i++)
        if (load1(x, i, bf16) > max) max = load1(x, i, bf16), token = i;
    for (int64_t i = body; i < vocab; i++) any_nan |= isnan(load1(x, i, bf16));
    if (any_nan || max == INFINITY) { /* torch's log_softmax gives NaN for these rows */
        for (int64_t i = 0; i < vocab && any_nan; i++)
            if (isnan(load1(x, i, bf16))) token = i, any_nan = 0;
        *token_id = token;
        *logprob = NAN;
        return;
    }
    float sum = body ? greedy_sum(x, body, max, bf16) : 0.0f;
    for (int64_t i = body; i < vocab; i++) sum += expf(load1(x, i, bf16) - max);
    *token_id = token;
    *logprob = -logf(sum);
}

int greedy(const void *logits, int64_t logits_bf16, int64_t rows, int64_t vocab,
           int64_t *token_ids, float *logprobs, int64_t num_threads) {
    if (vocab < 1 || num_threads < 1) return -1;
    const int64_t elem = logits_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) if (rows * vocab >= PARALLEL_MIN_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const char *x = (const char *)logits + r * vocab * elem;
        if (logits_bf16) greedy_row(x, vocab, token_ids + r, logprobs + r, 1);
        else greedy_row(x, vocab, token_ids + r, logprobs + r, 0);
    }
    return 0;
}
