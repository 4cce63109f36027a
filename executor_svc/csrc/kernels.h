/* The kernels each source exports, as the others call them (decoder.c runs a whole decoder
 * stack through them); each source includes this, so that a definition and its callers cannot
 * disagree. Python declares the same signatures for ctypes (executor_svc/cpu_kernels.py). */
#ifndef PAGEDSERVE_KERNELS_H
#define PAGEDSERVE_KERNELS_H
#include <stdint.h>

/* Whether this build has AMX-BF16 tiles (gemm_amx.c): the amx build's flags. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define KERNELS_AMX 1
#else
#define KERNELS_AMX 0
#endif

int add_rms_norm(void *residual, const void *x, const void *weight, void *out, int64_t act_bf16,
                 int64_t tokens, int64_t hidden, float eps, int64_t num_threads);
int rope_write_kv(void *qkv, int64_t row_stride, int64_t act_bf16, const float *cos,
                  const float *sin, int64_t num_positions, const int64_t *positions,
                  void *k_cache, void *v_cache, int64_t kv_bf16, const int64_t *slots,
                  int64_t num_slots, int64_t block_size, int64_t tokens, int64_t num_heads,
                  int64_t num_kv_heads, int64_t head_dim, int64_t num_threads);
int silu_mul(const void *gate_up, void *out, int64_t act_bf16, int64_t tokens, int64_t inter,
             int64_t num_threads);
/* linear's weight_bf16: 0 float32 panels, 1 bfloat16 panels, WEIGHT_AMX bfloat16 panels in
 * gemm_amx.c's halves, which only linear_amx reads (a bf16 x, k a multiple of 32): -1 else. */
#define WEIGHT_AMX 2
int linear(const void *x, int64_t x_bf16, const void *packed, int64_t weight_bf16,
           const float *bias, void *out, int64_t out_bf16, int64_t m, int64_t n, int64_t k,
           int64_t num_threads);
/* A gate/up projection (gate's inter columns first) and SiLU-mul: out ([m, inter]) =
 * silu(gate) * up of x @ w^T (+ bias), as linear into gate_up ([m, 2 inter], scratch) and
 * silu_mul from it compute it, bit for bit; in one pass, gate_up not written, where inter is
 * a multiple of gemm_columns() (whole weight panels of gate and of up). */
int linear_silu_mul(const void *x, const void *packed, int64_t weight_bf16, const float *bias,
                    void *gate_up, void *out, int64_t act_bf16, int64_t m, int64_t inter,
                    int64_t k, int64_t num_threads);
/* 1 where this build runs a bf16 model's GEMM on AMX tiles and the OS lends them (asked
 * once); then linear_amx serves linear's bf16 x over WEIGHT_AMX panels (k a multiple of 32),
 * and (silu) linear_silu_mul's where inter is too (-1 for arguments it does not serve). */
int64_t gemm_amx(void);
int linear_amx(const uint16_t *x, const uint16_t *packed, const float *bias, void *out,
               int64_t out_bf16, int64_t m, int64_t n, int64_t k, int64_t silu,
               int64_t num_threads);
int paged_attention(const void *query, int64_t query_stride, int64_t act_bf16,
                    const void *k_cache, const void *v_cache, int64_t kv_bf16,
                    const int64_t *block_tables, const int64_t *query_start,
                    const int64_t *seq_lens, void *out, int64_t num_seqs, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                    int64_t max_blocks, float scale, int64_t num_threads);
int64_t kv_pair_layout(int64_t act_bf16, int64_t kv_bf16, int64_t head_dim, int64_t block_size);

#endif
