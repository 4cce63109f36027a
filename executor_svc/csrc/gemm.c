#include "kernels.h"
#include "vec.h"
#include <omp.h>

/* Linear layers: out[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]), float32 math and sums; x and out
 * float32 or bfloat16, each on its own (a bf16 model's LM head takes bfloat16 hidden states and
 * gives float32 logits).
 *
 * The weight is packed once, at load (cpu_gemm.pack_weight): panels of GEMM_NR output columns
 * (two vectors of GEMM_VW floats), each [k][GEMM_NR] (the last panel zero-padded; see load_w
 * for the order of a row's columns), stored as float32 or as bfloat16 where every weight is a
 * bfloat16 value (then the widening to float32 is exact, and it halves the bytes a decode step
 * streams from memory). Each call copies x into panels of at most GEMM_MR rows, [k][GEMM_MR],
 * so that the inner loop reads both operands front to back (a bfloat16 x is widened
 * there, exactly). A GEMM_MR x GEMM_NR tile of out
 * lives in 2 x GEMM_MR registers while the k loop runs: per k, two loads of w, GEMM_MR
 * broadcasts of x and 2 x GEMM_MR FMAs. k is walked in slices (at most GEMM_KC float32 rows of
 * 16 columns' width, 24 KiB) so that a panel's slice stays in L1 while every row panel of a
 * chunk of GEMM_MC rows passes over it; the threads share out (chunk, column panel) pairs,
 * each thread a run of them, and while a slice's tiles run they fetch the thread's next slice
 * into L2 (Ahead).
 * A bfloat16 out is summed in a float32 tile of the chunk's rows over every slice, and rounded
 * once, as torch rounds, when the last slice is added.
 *
 * The vector width follows the build: 16 floats where AVX-512 is compiled in (32 registers:
 * a 12 x 32 tile, 24 accumulators), else 8 (16 registers: 6 x 16, 12 accumulators).
 * -DGEMM_VW=16 forces the wide tile on any build, so that it is tested on machines without
 * AVX-512 too.
 *
 * Under 16-float vectors a bfloat16 panel holds k in pairs instead (GEMM_PAIRS; k padded to
 * even with a zero row): row pair kk holds column i's two weights at 2i and 2i + 1, so that
 * where the build has AVX512_BF16 and x is bfloat16 too (a bf16 model) the tile multiplies
 * through vdpbf16ps, 32 products per instruction where a float32 FMA makes 16: x's rows are
 * copied as pairs of bfloat16 (one 32-bit value per row and k pair, broadcast), and each
 * instruction adds both products of a pair to a float32 sum. The products of two bfloat16
 * values are exact in float32, so the sums are float32 sums of the same terms, in pairs, as
 * torch's bf16 GEMM sums them; only denormal terms are flushed to zero. A float32 x (a bf16
 * checkpoint served in float32) reads the same panels with float32 FMAs: one load per pair of
 * k, a shift for the even k's weights and a mask for the odd k's. */

#ifndef GEMM_VW
#ifdef __AVX512F__
#define GEMM_VW 16
#else
#define GEMM_VW 8
#endif
#endif
#define GEMM_MR (GEMM_VW == 16 ? 12 : 6)
#define GEMM_NR (2 * GEMM_VW)
#define GEMM_KC (384 * 16 / GEMM_NR)
#define GEMM_MC 72

#define GEMM_PAIRS (GEMM_VW == 16)
#if GEMM_PAIRS && defined(__AVX512BF16__) && (defined(__clang__) || __GNUC__ >= 12)
#include <immintrin.h>
#define GEMM_DOTS 1
#else
#define GEMM_DOTS 0
#endif

typedef float vg __attribute__((vector_size(4 * GEMM_VW)));
typedef float vgu __attribute__((vector_size(4 * GEMM_VW), aligned(4)));
typedef int32_t ig __attribute__((vector_size(4 * GEMM_VW)));
typedef int32_t igu __attribute__((vector_size(4 * GEMM_VW), aligned(2)));

/* x in every lane, as one broadcast (from memory where x is read there). Not (vg){0} + x: the
 * compiler must keep that addition (-0.0 + 0.0 is +0.0), an FP add and a register broadcast
 * per row and k on the vector pipes the FMAs need (the AVX2 build's tile ran at 68% of the
 * FMA rate). */
static inline vg gsplat(float x) {
#if GEMM_VW == 16
    return (vg){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
    return (vg){x, x, x, x, x, x, x, x};
#endif
}

/* A tile's share of the weight bytes its thread needs next (the next slice of the panel, or
 * the next panel's first), fetched into L2 a line at a time as its k loop runs: `lines` lines
 * from `at` over `steps` steps of the loop. The panels stream from memory in the order the
 * threads take them; with the next slice on its way while the tiles of this one run, a
 * chunk's first tile no longer waits on memory while the others wait on nothing. */
typedef struct {
    const char *at;
    int64_t lines, steps, credit;
} Ahead;

static inline __attribute__((always_inline)) void fetch_due(Ahead *f) {
    for (f->credit += f->lines; f->credit >= f->steps; f->credit -= f->steps, f->at += 64)
        __builtin_prefetch(f->at, 0, 2);
}

/* The output columns of one weight panel, whether a bfloat16 panel holds k in pairs (both
 * read by cpu_kernels.pack_weight), and whether a bf16 model's GEMM runs on bf16 dot products
 * (read by the tests, which check each build's choice). */
int64_t gemm_columns(void) { return GEMM_NR; }
int64_t gemm_bf16_pairs(void) { return GEMM_PAIRS; }
int64_t gemm_bf16_products(void) { return GEMM_DOTS; }

/* How a call's operands are laid out: a float32 panel, a bfloat16 one of interleaved columns
 * (8-float builds), a bfloat16 one of k pairs with float32 x rows, or with bfloat16 pairs of
 * x (vdpbf16ps). */
enum { W_F32, W_BF16, W_PAIRS, W_DOTS };

/* Row kk of a weight panel: its GEMM_NR columns as two vectors, the first and the second
 * GEMM_VW columns. A bfloat16 panel stores each row interleaved, column i at 2i and column
 * GEMM_VW + i at 2i + 1: a bfloat16 is the top half of a float32, so one load holds both
 * vectors, a shift makes the first and a mask the second. */
static inline __attribute__((always_inline)) void load_w(const void *w, int64_t kk, int bf16,
                                                         vg *w0, vg *w1) {
    if (bf16) {
        const ig pair = *(const igu *)((const uint16_t *)w + kk * GEMM_NR);
        *w0 = (vg)(pair << 16);
        *w1 = (vg)(pair & (int32_t)0xffff0000u);
    } else {
        *w0 = *(const vgu *)((const float *)w + kk * GEMM_NR);
        *w1 = *(const vgu *)((const float *)w + kk * GEMM_NR + GEMM_VW);
    }
}

/* acc's rows += x's values at one k (a row of a float32 row panel) times that k's weights. */
static inline __attribute__((always_inline)) void fma_rows(int rows, vg acc[][2], const float *a,
                                                           vg w0, vg w1) {
    for (int r = 0; r < rows; r++) {
        const vg ar = gsplat(a[r]);
        acc[r][0] += ar * w0;
        acc[r][1] += ar * w1;
    }
}

/* One tile: `rows` (<= GEMM_MR) rows of x's panel `a` times one weight panel's slice `w`, over
 * kc (even for the paired kinds); the result is stored to (first slice) or added to `out`'s
 * rows x cols. `init` (GEMM_NR floats, or NULL) starts the sums: the bias, on the first
 * slice. */
static inline __attribute__((always_inline)) void gemm_tile(
    int rows, int kind, const float *a, const void *w, int64_t kc, const float *init,
    float *out, int64_t ldo, int cols, int first, Ahead ahead) {
    vg acc[GEMM_MR][2];
    for (int r = 0; r < rows; r++) {
        acc[r][0] = init ? *(const vgu *)init : gsplat(0.0f);
        acc[r][1] = init ? *(const vgu *)(init + GEMM_VW) : gsplat(0.0f);
    }
    const uint16_t *wh = (const uint16_t *)w;
    if (kind == W_DOTS) {
#if GEMM_DOTS
        const uint32_t *pairs = (const uint32_t *)a;
#pragma GCC unroll 2
        for (int64_t kk = 0; kk < kc / 2; kk++) {
            fetch_due(&ahead);
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wh + 2 * kk * GEMM_NR);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wh + (2 * kk + 1) * GEMM_NR);
            for (int r = 0; r < rows; r++) {
                const __m512bh ar = (__m512bh)_mm512_set1_epi32((int)pairs[kk * GEMM_MR + r]);
                acc[r][0] = (vg)_mm512_dpbf16_ps((__m512)acc[r][0], ar, w0);
                acc[r][1] = (vg)_mm512_dpbf16_ps((__m512)acc[r][1], ar, w1);
            }
        }
#endif
    } else if (kind == W_PAIRS) {
#pragma GCC unroll 2
        for (int64_t kk = 0; kk < kc; kk += 2) {
            fetch_due(&ahead);
            const ig p0 = *(const igu *)(wh + kk * GEMM_NR);
            const ig p1 = *(const igu *)(wh + kk * GEMM_NR + GEMM_NR);
            fma_rows(rows, acc, a + kk * GEMM_MR, (vg)(p0 << 16), (vg)(p1 << 16));
            fma_rows(rows, acc, a + (kk + 1) * GEMM_MR, (vg)(p0 & (int32_t)0xffff0000u),
                     (vg)(p1 & (int32_t)0xffff0000u));
        }
    } else {
#pragma GCC unroll 4
        for (int64_t kk = 0; kk < kc; kk++) {
            fetch_due(&ahead);
            vg w0, w1;
            load_w(w, kk, kind == W_BF16, &w0, &w1);
            fma_rows(rows, acc, a + kk * GEMM_MR, w0, w1);
        }
    }
    for (int r = 0; r < rows; r++) {
        float *o = out + r * ldo;
        if (cols == GEMM_NR) {
            if (!first) acc[r][0] += *(vgu *)o, acc[r][1] += *(vgu *)(o + GEMM_VW);
            *(vgu *)o = acc[r][0], *(vgu *)(o + GEMM_VW) = acc[r][1];
        } else {
            for (int c = 0; c < cols; c++)
                o[c] = (first ? 0.0f : o[c]) + acc[r][c / GEMM_VW][c % GEMM_VW];
        }
    }
}

/* The tile with its row count and operands' kind as constants, so that its loops unroll
 * and its sums stay in registers. */
static void gemm_tile_any(int rows, int kind, const float *a, const void *w, int64_t kc,
                          const float *init, float *out, int64_t ldo, int cols, int first,
                          Ahead ahead) {
#define KIND(R, K) gemm_tile(R, K, a, w, kc, init, out, ldo, cols, first, ahead)
#define TILE(R)                                                                            \
    case R:                                                                                \
        switch (kind) {                                                                    \
        case W_F32: KIND(R, W_F32); break;                                                 \
        case W_BF16: KIND(R, W_BF16); break;                                               \
        case W_PAIRS: KIND(R, W_PAIRS); break;                                             \
        default: KIND(R, W_DOTS);                                                          \
        }                                                                                  \
        break;
    switch (rows) {
        TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
#if GEMM_MR > 6
        TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
#endif
    }
#undef TILE
#undef KIND
}

/* Rows first ... first + rows - 1 of x (k values each; float32 or bfloat16), as float32 into
 * a row panel [kp][GEMM_MR], zero past `rows` and past k. */
static inline __attribute__((always_inline)) void pack_rows(const void *x, int64_t first,
                                                            int64_t rows, int64_t k, int64_t kp,
                                                            float *a, const int bf16) {
    for (int64_t kk = 0; kk < kp; kk++)
        for (int64_t r = 0; r < GEMM_MR; r++)
            a[kk * GEMM_MR + r] =
                r < rows && kk < k ? load1(x, (first + r) * k + kk, bf16) : 0.0f;
}

/* The same rows of a bfloat16 x as pairs of k, [kp / 2][GEMM_MR]: k 2i in the low half of
 * pair i, 2i + 1 in the high half (zero past k), as the weight panels hold them. */
static void pack_pairs(const uint16_t *x, int64_t first, int64_t rows, int64_t k, int64_t kp,
                       uint32_t *a) {
    const int64_t whole = k / 2; /* pairs of two values of x; one more of k's last if k is odd */
    for (int64_t r = 0; r < GEMM_MR; r++) {
        const uint16_t *row = x + (first + r) * k;
        for (int64_t kk = 0; kk < whole; kk++) {
            uint32_t pair = 0;
            if (r < rows) memcpy(&pair, row + 2 * kk, sizeof pair);
            a[kk * GEMM_MR + r] = pair;
        }
        if (whole < kp / 2) a[whole * GEMM_MR + r] = r < rows ? row[k - 1] : 0;
    }
}

/* A chunk's rows of gate's column panel (`gate`) and of up's same columns (`up`), each
 * [rows][GEMM_NR] sums: silu(gate) * up to those rows and columns of out (row stride ldo),
 * each sum first rounded as linear stores it, and the result as silu_mul rounds its own. */
static void store_silu_mul(const float *gate, const float *up, int64_t rows, void *out,
                           int64_t ldo, const int bf16) {
    for (int64_t r = 0; r < rows; r++) {
        int c = 0;
#ifdef __AVX512F__ /* 16 lanes (silu_mul16: the same values) */
        for (; c < GEMM_NR; c += 16)
            store16(out, r * ldo + c,
                    silu_mul16(round16((v16)_mm512_loadu_ps(gate + r * GEMM_NR + c), bf16),
                               round16((v16)_mm512_loadu_ps(up + r * GEMM_NR + c), bf16)),
                    bf16);
#endif
        for (; c < GEMM_NR; c += 8)
            store8(out, r * ldo + c,
                   silu_mul8(round8(*(const v8u *)(gate + r * GEMM_NR + c), bf16),
                             round8(*(const v8u *)(up + r * GEMM_NR + c), bf16)), bf16);
    }
}

/* linear, or (silu) a gate/up projection ending in SiLU-mul: gate's n / 2 columns are column
 * panels 0 .. panels / 2 - 1 and up's the rest (n a multiple of 2 x GEMM_NR), and each thread
 * computes gate's panel i and up's panel i for a chunk's rows one after the other, then
 * stores silu(gate) * up of them to out ([m, n / 2]); gate_up is never written.
 * Returns 0, -1 for arguments it does not serve, -2 when the row panels cannot be allocated. */
static int gemm(const void *x, int64_t x_bf16, const void *packed, int64_t weight_bf16,
                const float *bias, void *out, int64_t out_bf16, int64_t m, int64_t n, int64_t k,
                const int silu, int64_t num_threads) {
    if (m < 0 || n < 1 || k < 1 || num_threads < 1) return -1;
    if (silu && n % (2 * GEMM_NR)) return -1;
    if (m == 0) return 0;
    const int64_t row_panels = (m + GEMM_MR - 1) / GEMM_MR, panels = (n + GEMM_NR - 1) / GEMM_NR;
    /* The column panels in the order a chunk's rows pass over them, and the units of work
     * the threads share out: a panel, or (silu) gate's and up's panels i together. */
    const int64_t half = panels / 2, units = silu ? half : panels;
#define panel_at(q) (silu ? (q) / 2 + (q) % 2 * half : (q))
    /* Rows are dealt evenly over the panels (32 rows: 6, 6, 5, 5, 5, 5, not 6 x 5 + 2): a
     * tile of few rows leaves the FMA units waiting on its few sums. */
    const int64_t base = m / row_panels, extra = m % row_panels;
    const int64_t chunk = GEMM_MC / GEMM_MR, chunks = (row_panels + chunk - 1) / chunk;
    const size_t elem = weight_bf16 ? sizeof(uint16_t) : sizeof(float);
    const int kind = !weight_bf16 ? W_F32 : !GEMM_PAIRS ? W_BF16 : GEMM_DOTS && x_bf16 ? W_DOTS
                                                                                   : W_PAIRS;
#if KERNELS_AMX
    if (weight_bf16 == WEIGHT_AMX && kind == W_DOTS)
        return linear_amx(x, packed, bias, out, out_bf16, m, n, k, silu, num_threads);
#endif
    if (weight_bf16 == WEIGHT_AMX) return -1;
    const int paired = kind == W_PAIRS || kind == W_DOTS;
    const int64_t kp = paired ? k + k % 2 : k; /* the panels' rows */
    const int64_t kc_limit = GEMM_KC * sizeof(float) / elem;
    const int64_t slices = (kp + kc_limit - 1) / kc_limit;
    const int64_t kc_max = ((kp + slices - 1) / slices + paired) & ~(int64_t)paired;
    /* a row panel is [kp][GEMM_MR] floats, or half of that in pairs of bfloat16 */
    const int64_t a_rows = kind == W_DOTS ? kp / 2 : kp;
    float *a = malloc((size_t)(row_panels * GEMM_MR * a_rows) * sizeof(float));
    if (!a) return -2;
    const int parallel = m * n * k >= 4 * PARALLEL_MIN_FLOATS;
    const char *w_end = (const char *)packed + panels * kp * GEMM_NR * elem;
#define row_of(p) ((p) * base + ((p) < extra ? (p) : extra)) /* row panel p's first row */
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < row_panels; p++) {
            const int64_t rows = base + (p < extra);
            float *panel = a + p * a_rows * GEMM_MR;
            if (kind == W_DOTS) pack_pairs(x, row_of(p), rows, k, kp, (uint32_t *)panel);
            else if (x_bf16) pack_rows(x, row_of(p), rows, k, kp, panel, 1);
            else pack_rows(x, row_of(p), rows, k, kp, panel, 0);
        }
        /* The (chunk, unit) pairs in order, each thread a run of them holding an even
         * share of the row panels x units: a last chunk of fewer row panels
         * counts for less (256 rows, 22 row panels, chunks of 6: an even count of pairs
         * gave one thread 12 row panels' work and the other 10). */
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        float gate[silu ? GEMM_MC * GEMM_NR : 1]; /* silu: gate's sums, while up's run */
        const int64_t from = row_panels * units * me / team;
        const int64_t to = row_panels * units * (me + 1) / team;
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t p_end = (c + 1) * chunk < row_panels ? (c + 1) * chunk : row_panels;
            const int64_t tiles = p_end - c * chunk; /* the chunk's row panels */
            for (int64_t q = 0; q < panels; q++) {
                const int64_t work_before = c * chunk * units + (silu ? q / 2 : q) * tiles;
                if (work_before < from || work_before >= to) continue;
                const int64_t j = panel_at(q);
                const int cols = n - j * GEMM_NR < GEMM_NR ? (int)(n - j * GEMM_NR) : GEMM_NR;
                float init[GEMM_NR] = {0};
                for (int i = 0; bias && i < cols; i++) init[i] = bias[j * GEMM_NR + i];
                /* the chunk's rows x cols, where they are not summed in out itself */
                float sums[out_bf16 || silu ? GEMM_MC * GEMM_NR : 1];
                float *o = silu && q % 2 == 0 ? gate
                           : out_bf16 || silu ? sums : (float *)out + j * GEMM_NR;
                const int64_t ldo = out_bf16 || silu ? GEMM_NR : n;
                const int64_t r0 = out_bf16 || silu ? row_of(c * chunk) : 0;
                for (int64_t k0 = 0; k0 < kp; k0 += kc_max) {
                    const int64_t kc = kp - k0 < kc_max ? kp - k0 : kc_max;
                    const char *w = (const char *)packed + (j * kp + k0) * GEMM_NR * elem;
                    const int64_t a0 = kind == W_DOTS ? k0 / 2 : k0;
                    /* the next kc_max rows of panels, shared out over this slice's tiles
                     * (this panel's next slice, or the next panel's first); a lone tile (up
                     * to GEMM_MR rows) reads its slice once, a stream the hardware's
                     * prefetcher follows by itself (fetching too, 1 and 4 rows ran 6%
                     * slower) */
                    const char *next = k0 + kc < kp ? w + kc * GEMM_NR * elem
                                       : q + 1 < panels
                                           ? (const char *)packed +
                                                 panel_at(q + 1) * kp * GEMM_NR * elem
                                           : w_end;
                    const int64_t next_bytes = next + kc_max * GEMM_NR * elem <= w_end
                                                   ? kc_max * GEMM_NR * (int64_t)elem
                                                   : w_end - next;
                    const int64_t steps = kind == W_DOTS ? kc / 2 : kc;
                    const int64_t share = tiles > 1 ? (next_bytes / 64 + tiles - 1) / tiles : 0;
                    for (int64_t p = c * chunk; p < p_end; p++)
                        gemm_tile_any((int)(base + (p < extra)), kind,
                                      a + (p * a_rows + a0) * GEMM_MR, w, kc,
                                      k0 == 0 && bias ? init : NULL,
                                      o + (row_of(p) - r0) * ldo, ldo, cols, k0 == 0,
                                      (Ahead){next + (p - c * chunk) * share * 64, share, steps,
                                              0});
                }
                if (silu && q % 2)
                    store_silu_mul(gate, sums, row_of(p_end) - r0,
                                   (char *)out + (r0 * half + q / 2) * GEMM_NR * (out_bf16 ? 2 : 4),
                                   n / 2, (int)out_bf16);
                else if (!silu)
                    for (int64_t r = r0; out_bf16 && r < row_of(p_end); r++)
                        for (int i = 0; i < cols; i++)
                            store1(out, r * n + j * GEMM_NR + i, o[(r - r0) * GEMM_NR + i], 1);
            }
        }
    }
#undef row_of
#undef panel_at
    free(a);
    return 0;
}

int linear(const void *x, int64_t x_bf16, const void *packed, int64_t weight_bf16,
           const float *bias, void *out, int64_t out_bf16, int64_t m, int64_t n, int64_t k,
           int64_t num_threads) {
    return gemm(x, x_bf16, packed, weight_bf16, bias, out, out_bf16, m, n, k, 0,
                num_threads);
}

int linear_silu_mul(const void *x, const void *packed, int64_t weight_bf16, const float *bias,
                    void *gate_up, void *out, int64_t act_bf16, int64_t m, int64_t inter,
                    int64_t k, int64_t num_threads) {
    if (inter % GEMM_NR == 0) /* whole panels of gate and of up: in one pass */
        return gemm(x, act_bf16, packed, weight_bf16, bias, out, act_bf16, m, 2 * inter, k, 1,
                    num_threads);
    const int status = linear(x, act_bf16, packed, weight_bf16, bias, gate_up, act_bf16, m,
                              2 * inter, k, num_threads);
    return status ? status : silu_mul(gate_up, out, act_bf16, m, inter, num_threads);
}
