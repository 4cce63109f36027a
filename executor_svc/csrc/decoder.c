/* A Llama-family decoder stack's forward pass in one call: every layer's norms, projections,
 * RoPE + K/V write, attention and SiLU-mul through the kernels of the other sources, in the
 * order the Python model calls them (executor_svc/model.py), on the same buffers' values, so
 * that its outputs are theirs bit for bit. What it saves is the Python between the kernels:
 * nine calls per layer, each a module call, a ctypes conversion of up to eighteen arguments
 * and a new tensor; at one decode row they were a quarter of the step (BENCHMARKS.md,
 * "A decoder stack in one call"). Activations are float32 or (act_bf16) bfloat16 throughout. */
#include <stdlib.h>

#include "kernels.h"

typedef struct { /* a linear layer's weight, packed for gemm.c's linear */
    const void *panels;
    int64_t bf16; /* panels of bfloat16 weights */
    const float *bias; /* NULL: none */
} Linear;

typedef struct { /* one decoder layer's weights and KV cache */
    const void *input_norm, *post_norm; /* RMSNorm weights [hidden], in the activations' dtype */
    Linear qkv, o, gate_up, down; /* q/k/v and gate/up merged, gate's columns first */
    void *k_cache, *v_cache; /* [num_slots, num_kv_heads, head_dim] */
} Layer;

typedef struct { /* the model: its shapes, its layers, and what follows them */
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, inter;
    int64_t act_bf16, kv_bf16, block_size, num_slots, num_positions;
    float eps, scale; /* RMSNorm's epsilon; attention's 1 / sqrt(head_dim) */
    const float *cos, *sin; /* rotary tables [num_positions, head_dim / 2] */
    const void *final_norm;
    const Layer *layers;
} Decoder;

typedef struct { /* a step: its tokens, and its sequences as paged_attention reads them */
    int64_t tokens, num_seqs, max_blocks;
    const int64_t *positions, *slots; /* [tokens] */
    const int64_t *block_tables, *query_start, *seq_lens;
} Step;

/* Which kernel failed, for the caller's message. */
enum { FAILED_NORM = 1, FAILED_LINEAR, FAILED_ROPE, FAILED_ATTENTION, FAILED_MEMORY };

/* The stack's output for a step: residual holds the embeddings of the step's tokens ([tokens,
 * hidden]) and is summed into in place, as the Python model sums into its residual stream;
 * out ([tokens, hidden]) gets the final norm of the last residual sum. The step's keys and
 * values are written to every layer's cache on the way. Returns 0, or the failing kernel's
 * status (-2: no memory for the activations) with *failed naming the kernel; nothing after
 * it has run then. */
int decoder_forward(const Decoder *d, const Step *s, void *residual, void *out,
                    int64_t num_threads, int64_t *failed) {
    const int64_t t = s->tokens, hidden = d->hidden, bf16 = d->act_bf16;
    const int64_t q_width = d->num_heads * d->head_dim;
    const int64_t qkv_width = q_width + 2 * d->num_kv_heads * d->head_dim;
    const int64_t elem = bf16 ? 2 : 4;
    /* one allocation for every activation a layer makes; each is rewritten by every layer */
    char *normed = malloc((size_t)(t * (2 * hidden + qkv_width + q_width + 3 * d->inter) * elem));
    if (!normed) {
        *failed = FAILED_MEMORY;
        return -2;
    }
    char *qkv = normed + t * hidden * elem, *attended = qkv + t * qkv_width * elem;
    char *delta = attended + t * q_width * elem; /* attention's, then the MLP's, output */
    char *gate_up = delta + t * hidden * elem, *act = gate_up + 2 * t * d->inter * elem;
    int status = 0;
#define RUN(kernel, call)              \
    if ((status = (call)) != 0) {      \
        *failed = kernel;              \
        goto done;                     \
    }
    for (int64_t i = 0; i < d->num_layers; i++) {
        const Layer *l = &d->layers[i];
        /* the first layer's norm reads the embeddings alone, as the residual stream */
        RUN(FAILED_NORM, add_rms_norm(residual, i ? delta : NULL, l->input_norm, normed, bf16, t,
                                      hidden, d->eps, num_threads));
        RUN(FAILED_LINEAR, linear(normed, bf16, l->qkv.panels, l->qkv.bf16, l->qkv.bias, qkv,
                                  bf16, t, qkv_width, hidden, num_threads));
        RUN(FAILED_ROPE, rope_write_kv(qkv, qkv_width, bf16, d->cos, d->sin, d->num_positions,
                                       s->positions, l->k_cache, l->v_cache, d->kv_bf16,
                                       s->slots, d->num_slots, d->block_size, t, d->num_heads,
                                       d->num_kv_heads, d->head_dim, num_threads));
        RUN(FAILED_ATTENTION,
            paged_attention(qkv, qkv_width, bf16, l->k_cache, l->v_cache, d->kv_bf16,
                            s->block_tables, s->query_start, s->seq_lens, attended, s->num_seqs,
                            d->num_heads, d->num_kv_heads, d->head_dim, d->block_size,
                            s->max_blocks, d->scale, num_threads));
        RUN(FAILED_LINEAR, linear(attended, bf16, l->o.panels, l->o.bf16, l->o.bias, delta, bf16,
                                  t, hidden, q_width, num_threads));
        RUN(FAILED_NORM, add_rms_norm(residual, delta, l->post_norm, normed, bf16, t, hidden,
                                      d->eps, num_threads));
        RUN(FAILED_LINEAR, linear_silu_mul(normed, l->gate_up.panels, l->gate_up.bf16,
                                           l->gate_up.bias, gate_up, act, bf16, t, d->inter,
                                           hidden, num_threads));
        RUN(FAILED_LINEAR, linear(act, bf16, l->down.panels, l->down.bf16, l->down.bias, delta,
                                  bf16, t, hidden, d->inter, num_threads));
    }
    RUN(FAILED_NORM, add_rms_norm(residual, d->num_layers ? delta : NULL, d->final_norm, out,
                                  bf16, t, hidden, d->eps, num_threads));
#undef RUN
done:
    free(normed);
    return status;
}
