/* A bf16 model's linear layers on AMX tiles (Intel's Advanced Matrix Extensions, AMX-BF16):
 * out[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]), x bfloat16, float32 sums, out float32 or
 * bfloat16 (rounded once, as torch rounds), for gemm.c's linear where the build has AMX.
 *
 * The weights are packed for it (cpu_kernels.pack_weight, WEIGHT_AMX): per panel of 32 output
 * columns, its two halves of 16 one after the other, each [k / 2][16][2], which is AMX's
 * layout for a tile's second operand: 16 rows of k pairs by 16 columns' pairs is one tile,
 * 1 KiB read front to back. (gemm.c's panels, [k / 2][32][2], hold the same tiles at a
 * stride of 128 bytes: a gate/up block then reads half of each line of two panels, and L1
 * holds half as many of its weights; SmolLM2's gate/up projection of 2048 rows ran 1.32x
 * slower.) x's rows are the first operand as they lie, 32 k values of up to 16 rows per tile,
 * so x is not copied.
 * One block is up to 32 rows by one panel: four float32 accumulator tiles (two rows of tiles,
 * two of columns), two x tiles and two weight tiles, the eight the unit has. Per 32 k:
 * two or four tile products (TDPBF16PS, 16 x 16 x 32 products each), which sum each pair of
 * k in float32 as vdpbf16ps does; every row's sums are the same for any count of rows (a
 * token's output does not depend on the step that computed it).
 *
 * Work is dealt like gemm.c's: chunks of rows by panels, each thread an even run of (chunk,
 * panel) pairs, so that a panel stays in L1 while its chunk's blocks pass over it, and the
 * chunk's x in L2 while its panels pass. Where a unit's weights (64 bytes per k) fit in L1
 * beside the rest and a chunk has more than one block, x's tiles are loaded with the
 * streaming hint (tileloaddt1), so that they do not evict the weights the chunk's next block
 * reads again (SmolLM2's 576-wide x: q/k/v, o and gate/up 1.13-1.17x faster at 512 and 2048
 * rows). A chunk holds as many rows as fill AMX_X_BYTES with x (the chunks of a call evened
 * out, in whole blocks): every chunk reads the panels it crosses from L3 or memory again, so
 * the fewer the better while x stays in L2.
 *
 * A gate/up projection (silu: gate's n / 2 columns first, then up's) can end in SiLU-mul
 * instead: a block's two columns of tiles are then a half of gate's panel and the same half of
 * up's, and its store writes silu(gate) * up of them, each rounded as the separate kernels
 * round (the projection's output to bf16, then silu_mul's), so the output is theirs bit for
 * bit; on 16 lanes (silu_mul16), which made the projection 1.2x faster than on 8. The
 * projection's output (twice the MLP's width) is never written and read back.
 * The k dimension must be a multiple of 32 (a whole tile; every projection of the Llama-family
 * models served here); gemm.c's bf16 dot products serve the others.
 *
 * Linux lends the tiles' 8 KiB of state to a process that asks (arch_prctl): gemm_amx asks
 * once, and where it is refused (an old kernel, a hypervisor that hides AMX) the build's
 * other paths serve. */
#include "kernels.h"
#include "vec.h"

#if KERNELS_AMX
#include "amx.h"
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_X_BYTES (768 * 1024) /* of the 2 MiB of L2 that every AMX core has */
#define AMX_W_BYTES (40 * 1024) /* of the 48 KiB of L1 data that every AMX core has */
/* The chunks of more blocks than this fetch the next panel (see block). SmolLM2's projections
 * of 30 layers from memory without the fetches, against with them: 1-128 rows 0.89-0.99x the
 * time, 192 and 256 rows 1.03x; with this bound, 16 / 32 / 64 rows 0.92 / 0.93 / 0.95x, 256
 * the same (Xeon, 2 cores). */
#define AMX_FETCH_BLOCKS 4

int64_t gemm_amx(void) {
    static int state; /* 0: not asked yet; 1: granted; -1: refused */
    if (!__atomic_load_n(&state, __ATOMIC_ACQUIRE)) { /* a race asks twice: harmless */
        const long refused = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
        __atomic_store_n(&state, refused ? -1 : 1, __ATOMIC_RELEASE);
    }
    return state == 1;
}

/* Tiles 0-3: sums (rows 0-15 x columns 0-15, x 16-31; rows 16-31 x the same); 4, 5: x's
 * rows 0-15 and 16-31; 6, 7: the panel's columns 0-15 and 16-31. `rows` (1-32) is the
 * block's. */
static void configure(int rows, int *configured) {
    if (*configured == rows) return;
    const int top = rows < 16 ? rows : 16, bottom = rows - top;
    TileConfig cfg = {.palette = 1};
    tile_shape(&cfg, 0, top, 64);
    tile_shape(&cfg, 1, top, 64);
    tile_shape(&cfg, 2, bottom, 64);
    tile_shape(&cfg, 3, bottom, 64);
    tile_shape(&cfg, 4, top, 64);
    tile_shape(&cfg, 5, bottom, 64);
    tile_shape(&cfg, 6, 16, 64);
    tile_shape(&cfg, 7, 16, 64);
    _tile_loadconfig(&cfg);
    *configured = rows;
}

/* Lines from ... to - 1 of the 32 (2 KiB) that hold k0 ... k0 + 31 of panel `next`. */
static inline __attribute__((always_inline)) void fetch_next(const char *next, int64_t k0,
                                                          int from, int to) {
    for (int line = from; line < to; line++)
        __builtin_prefetch(next + k0 * 64 + line * 64, 0, 2);
}

/* A block's sums waiting to be stored (+ bias) to out's rows x cols at `out` (row stride n),
 * `done` rows of them stored so far; where up_bias is set (silu), 16 columns of
 * silu(gate + bias) * (up + up_bias) instead. The next block stores them a few rows at each of
 * its 32 k: stored after the block, they ran alone while the tile unit idled (a 2048-row
 * gate/up projection 10%, a 32-row one 18% slower). */
typedef struct {
    const float *sums, *bias, *up_bias;
    void *out;
    int64_t n;
    int rows, cols, out_bf16, silu, done;
} Pending;

/* Row r of a pending gate/up block: silu(gate) * up of its 16 columns, in bfloat16. */
static inline void store_silu_row(const Pending *p, int r) {
    v16 gate = *(const v16 *)(p->sums + r * 32), up = *(const v16 *)(p->sums + r * 32 + 16);
    if (p->bias) {
        gate += (v16)_mm512_loadu_ps(p->bias);
        up += (v16)_mm512_loadu_ps(p->up_bias);
    }
    store16((uint16_t *)p->out + r * p->n, 0, silu_mul16(round16(gate, 1), round16(up, 1)), 1);
}

/* Stores the pending rows up to `upto`, 16 columns at a time (a bfloat16 out rounded by
 * vcvtneps2bf16, as torch rounds). */
static inline void store_rows(Pending *p, int upto) {
    if (upto > p->rows) upto = p->rows;
    const float *sums = p->sums, *bias = p->bias;
    void *out = p->out;
    const int64_t n = p->n;
    const int cols = p->cols, out_bf16 = p->out_bf16;
    if (p->silu) {
        for (int r = p->done; r < upto; r++) store_silu_row(p, r);
        p->done = upto;
        return;
    }
    for (int half = 0; half < 2 && half * 16 < cols; half++) {
        const int c = half * 16, width = cols - c < 16 ? cols - c : 16;
        const __mmask16 mask = (__mmask16)((1u << width) - 1);
        const __m512 add = bias ? _mm512_maskz_loadu_ps(mask, bias + c) : _mm512_setzero_ps();
        for (int r = p->done; r < upto; r++) {
            const __m512 v = _mm512_add_ps(_mm512_load_ps(sums + r * 32 + c), add);
            if (out_bf16)
                _mm256_mask_storeu_epi16((uint16_t *)out + r * n + c, mask,
                                         (__m256i)_mm512_cvtneps_pbh(v));
            else
                _mm512_mask_storeu_ps((float *)out + r * n + c, mask, v);
        }
    }
    p->done = upto;
}

/* One block: `rows` (1-32) rows of x from `x` (row stride k) times two columns of weight tiles
 * over all of k, w0's and w1's (each 16 columns: a panel's two halves, or a half of gate's
 * and the same half of up's), x's tiles loaded with the streaming hint where `stream` is set,
 * the float32 sums to `sums` ([32][w0's 16 | w1's 16]), while the block before's (`pending`)
 * are stored.
 * `next` (or NULL) is the panel the thread takes next: as each 32 k of this one are
 * multiplied, lines from ... to - 1 of the same 2 KiB of it are fetched into L2 (the chunk's
 * blocks each a share), so that the weights stream from memory without a wait at each
 * panel's start. Only for chunks of more than AMX_FETCH_BLOCKS blocks: a thread's panels lie
 * one after another in memory, and at fewer rows (a decode step) the L2's own prefetcher
 * streams them faster than software fetches, each of which holds one of the core's few miss
 * buffers until its line arrives. */
static inline void block(const uint16_t *x, int64_t k, int rows, const uint16_t *w0,
                         const uint16_t *w1, const char *next, int from, int to, int stream,
                         float *sums, Pending *pending) {
    const int per_step = (pending->rows * 32 + k - 1) / k; /* rows stored per 32 k */
    const int64_t stride = k * (int64_t)sizeof(uint16_t);
    const int two = rows > 16; /* a second row of tiles: rows 16-31 */
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k0 = 0; k0 < k; k0 += 32) {
        if (next) fetch_next(next, k0, from, to);
        /* each load just before the first product that needs it, so that the loads overlap
         * the products before them */
        if (stream) _tile_stream_loadd(4, x + k0, stride);
        else _tile_loadd(4, x + k0, stride);
        _tile_loadd(6, w0 + k0 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, w1 + k0 * 16, 64);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
            if (stream) _tile_stream_loadd(5, x + 16 * k + k0, stride);
            else _tile_loadd(5, x + 16 * k + k0, stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        if (pending->done < pending->rows) store_rows(pending, pending->done + per_step);
    }
    store_rows(pending, pending->rows);
    if (two) {
        _tile_stored(2, sums + 16 * 32, 128);
        _tile_stored(3, sums + 16 * 32 + 16, 128);
    }
    _tile_stored(0, sums, 128);
    _tile_stored(1, sums + 16, 128);
}

int linear_amx(const uint16_t *x, const uint16_t *packed, const float *bias, void *out,
               int64_t out_bf16, int64_t m, int64_t n, int64_t k, int64_t silu,
               int64_t num_threads) {
    if (m < 0 || n < 1 || k < 32 || k % 32 || num_threads < 1 || !gemm_amx()) return -1;
    if (silu && (n % 64 || !out_bf16)) return -1; /* gate's and up's panels: whole ones */
    if (m == 0) return 0;
    /* Unit j, the columns of a block: panel j (its 32 outputs), or (silu) a half of gate's
     * panel j / 2 and the same half of up's (16 outputs): as many units as panels. */
    const int64_t most = AMX_X_BYTES / (k * (int64_t)sizeof(uint16_t)) / 32 * 32;
    const int64_t chunks = most ? (m + most - 1) / most : (m + 31) / 32;
    const int64_t mc = ((m + chunks - 1) / chunks + 31) / 32 * 32; /* a chunk's rows */
    const int64_t panels = (n + 31) / 32, up = panels / 2;
    const int64_t out_n = silu ? n / 2 : n, width = silu ? 16 : 32, elem = out_bf16 ? 2 : 4;
    const int parallel = m * n * k >= 4 * PARALLEL_MIN_FLOATS;
    /* x's tiles pass once per panel where a chunk has blocks to share the panel; a chunk of
     * one block (a decode step) keeps its x in L1 for every panel instead */
    const int stream = k * 64 <= AMX_W_BYTES && m > 32;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        float sums[2][32 * 32] __attribute__((aligned(64))); /* a block's, the one before's */
        Pending pending = {0};
        int configured = 0, which = 0;
        /* Chunks by panels in order, each thread an even share of the blocks: a last chunk
         * of fewer rows counts for less. */
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t blocks = (m + 31) / 32;
        const int64_t from = blocks * panels * me / team, to = blocks * panels * (me + 1) / team;
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t r0 = c * mc, r1 = r0 + mc < m ? r0 + mc : m;
            const int64_t chunk_blocks = (r1 - r0 + 31) / 32;
            for (int64_t j = 0; j < panels; j++) {
                const int64_t before = r0 / 32 * panels + j * chunk_blocks;
                if (before < from || before >= to) continue;
                const int64_t panel = silu ? j / 2 : j, half = silu ? j % 2 : 0;
                const uint16_t *w0 = packed + panel * k * 32 + half * k * 16;
                const uint16_t *w1 = silu ? packed + (up + panel) * k * 32 + half * k * 16
                                          : w0 + k * 16;
                /* the panel the next unit reads first: gate's next, then (silu) up's next */
                const int64_t ahead = silu ? (half ? up : 0) + panel + 1 : j + 1;
                const char *next = chunk_blocks > AMX_FETCH_BLOCKS && panel + 1 < (silu ? up
                                                                                  : panels)
                                       ? (const char *)(packed + ahead * k * 32) : NULL;
                const int cols = out_n - j * width < width ? (int)(out_n - j * width) : width;
                const float *unit_bias = bias ? bias + j * width : NULL;
                for (int64_t r = r0; r < r1; r += 32) {
                    const int rows = r1 - r < 32 ? (int)(r1 - r) : 32;
                    configure(rows, &configured);
                    /* the chunk's blocks share the fetching of the next panel (fetched by
                     * the first block alone, it left memory idle while the others ran) */
                    const int part = (int)((r - r0) / 32), parts = (int)chunk_blocks;
                    block(x + r * k, k, rows, w0, w1, next, part * 32 / parts,
                          (part + 1) * 32 / parts, stream, sums[which], &pending);
                    pending = (Pending){sums[which], unit_bias,
                                        silu && bias ? unit_bias + out_n : NULL,
                                        (char *)out + (r * out_n + j * width) * elem, out_n,
                                        rows, cols, (int)out_bf16, (int)silu, 0};
                    which ^= 1;
                }
            }
        }
        store_rows(&pending, pending.rows);
        if (configured) _tile_release();
    }
    return 0;
}
#else
int64_t gemm_amx(void) { return 0; }
#endif
