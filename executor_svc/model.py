"""Our paged implementation of the Llama family (Llama, Mistral, Qwen2, SmolLM), and its loader.

The numerics follow transformers' own modeling code op for op (RoPE tables in float32, RMSNorm in
float32), so greedy outputs match ``generate``; attention goes through the paged KV cache instead.
The layers call the ops bound when the model loads (``backends.layer_ops``) and the attention
backend that built the step's metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from pagedserve.executor_svc.attention import AttentionMetadata
from pagedserve.executor_svc.autotune import Tuner
from pagedserve.executor_svc.backends import layer_ops
from pagedserve.executor_svc.backends.cpu import FusedDecoder
from pagedserve.executor_svc.backends.tuned import tuned_ops
from pagedserve.executor_svc.layer_ops import LayerOps, PackedLinear, pack_linears
from pagedserve.executor_svc.model_config import ModelConfig
from pagedserve.executor_svc.parallel import TensorParallel
from pagedserve.executor_svc.rope import RotaryEmbedding, StepRope


class RMSNorm(nn.Module):
    """The pre-norm layer's residual add and RMSNorm, through ``LayerOps.add_rms_norm``."""

    def __init__(self, size: int, eps: float, ops: LayerOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.add_rms_norm = ops.add_rms_norm

    def forward(self, x: Tensor | None, residual: Tensor) -> tuple[Tensor, Tensor]:
        """The norm of ``residual + x`` (``residual`` alone when ``x`` is None), and the sum."""
        return self.add_rms_norm(x, residual, self.weight, self.eps)


class MergedLinear(nn.Linear):
    """One matmul for checkpoint projections that read the same input (q/k/v, gate/up);
    ``parts`` maps each projection's checkpoint name to its output size, in output order."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts
        self.sizes = list(parts.values())

    def shards(self, param: Tensor) -> dict[str, Tensor]:
        """Each projection's rows of ``param`` (weight or bias), as views."""
        return dict(zip(self.parts, param.split(self.sizes)))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None):
        super().__init__()
        self.tp = tp
        self.num_heads = config.num_heads
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        parts = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.qkv_proj = MergedLinear(config.hidden_size, parts, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_proj_bias)
        self.scale = config.head_dim ** -0.5

    def forward(self, x: Tensor, rope: StepRope, meta: AttentionMetadata,
                kv_cache: tuple[Tensor, Tensor]) -> Tensor:
        backend = meta.backend
        q, k, v = backend.rope_write_kv(self.qkv_proj(x), self.num_heads, rope, kv_cache, meta)
        out = backend.attend(q, k, v, *kv_cache, meta, self.scale)
        return _reduce(self.o_proj(out.flatten(1)), self.tp)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None, ops: LayerOps):
        super().__init__()
        self.tp = tp
        size = config.intermediate_size
        parts = {"gate_proj": size, "up_proj": size}
        self.gate_up_proj = MergedLinear(config.hidden_size, parts, bias=False)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=False)
        self.silu_mul = ops.silu_mul

    def forward(self, x: Tensor) -> Tensor:
        return _reduce(self.down_proj(self.silu_mul(self.gate_up_proj(x))), self.tp)


def _reduce(partial: Tensor, tp: TensorParallel | None) -> Tensor:
    """A row-parallel projection's output: each rank's partial sum, summed over the ranks."""
    return partial if tp is None else tp.all_reduce(partial)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None, ops: LayerOps):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = MLP(config, tp, ops)

    def forward(self, x: Tensor, residual: Tensor | None, rope: StepRope,
                meta: AttentionMetadata, kv_cache: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """This layer's MLP output and the residual stream it has not been added to yet (the
        next norm adds it): ``x`` is the last layer's MLP output, or the embeddings with
        ``residual`` None."""
        if residual is None:
            hidden, residual = self.input_layernorm(None, x)
        else:
            hidden, residual = self.input_layernorm(x, residual)
        hidden = self.self_attn(hidden, rope, meta, kv_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None, ops: LayerOps):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, tp, ops)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)


class PagedLlamaForCausalLM(nn.Module):
    """A Llama-family decoder whose attention reads and writes the paged KV cache, computed by
    ``ops`` (and by the attention backend of each step's metadata).

    Parameter names mirror the HF checkpoint's, except that q/k/v and gate/up are merged.
    Under tensor parallelism (``tp``) ``config`` is this rank's share (``ModelConfig.sharded``):
    q/k/v and gate/up hold its rows (column-parallel), o_proj and down_proj its columns
    (row-parallel, summed over the ranks); norms, embedding and LM head are whole on every rank.
    """

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, ops: LayerOps,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.config = config
        self.rope = rope
        self.ops = ops
        self.tp = tp
        self.model = LlamaModel(config, tp, ops)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.packed_head: PackedLinear | None = None  # see prepack
        # The decoder stack in one kernel call, bound to a KV cache by its model runner.
        self.stack: FusedDecoder | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The weights' and activations' dtype."""
        return self.model.embed_tokens.weight.dtype

    def prepack(self) -> int:
        """On CPU, prepack every projection and the LM head for the ops' GEMM where it has
        one (``LayerOps.pack_linear``); returns how many matrices were packed. A tied head
        gets its own packed copy: the embedding keeps the dense table."""
        count = pack_linears(self, self.ops)
        needs_head = self.tp is None or self.tp.is_driver  # only rank 0 samples
        if count and self.config.tie_word_embeddings and needs_head:
            self.packed_head = self.ops.pack_linear(self.model.embed_tokens.weight, None)
            count += 1
        return count

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Hidden states ``[T, hidden]`` of the step's new tokens (all sequences packed in batch
        order); their K/V are written to ``kv_caches`` (one (K, V) pair per layer) on the way.
        In one kernel call where ``stack`` serves the step."""
        if self.stack is not None and self.stack.serves(len(input_ids), meta, kv_caches):
            return self.stack(input_ids, positions, meta)
        x = self.model.embed_tokens(input_ids)
        rope = StepRope(self.rope, positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, meta, kv_cache)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Logits ``[N, vocab]`` of the given hidden states, in the model's dtype (a bf16
        model's head rounds them to bf16 either way): the greedy kernel reads them as they
        are, and whatever computes on them in float32 widens them (``.float()``), so that a
        greedy step does not write and read a float32 copy of them all."""
        if self.packed_head is not None:
            return self.packed_head(hidden)
        if not self.config.tie_word_embeddings:
            return self.lm_head(hidden)
        return F.linear(hidden, self.model.embed_tokens.weight)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               prepack: bool = True, tp: TensorParallel | None = None,
               tuner: Tuner | None = None, ops: LayerOps | None = None) -> PagedLlamaForCausalLM:
    """Build our paged model for the HF checkpoint in ``model_dir`` (config.json + safetensors,
    possibly sharded) with weights in ``dtype`` on ``device``, in eval mode, its layer ops
    bound for them; on CPU its GEMMs are prepacked unless ``prepack`` is False, and with a
    ``tuner`` each op and GEMM is the fastest measured here (``backends.tuned``). With
    ``tp``, this rank's share of it. ``ops`` forces the layer ops (tests: the Triton kernels'
    on CPU tensors, in triton's interpreter)."""
    config = ModelConfig.from_model_dir(model_dir)
    rope = RotaryEmbedding(config, device)
    if tp is not None:
        config = config.sharded(tp.size)
    tune = tuner is not None and torch.device(device).type == "cpu"
    if ops is None:
        ops = tuned_ops(tuner, config, dtype) if tune else layer_ops(dtype, device)
    with torch.device("meta"):
        model = PagedLlamaForCausalLM(config, rope, ops, tp)
    # Allocate without initialising: every weight is loaded below.
    model = model.to(dtype).to_empty(device=device)
    load_weights(model, Path(model_dir))
    model.eval()
    if prepack and torch.device(device).type == "cpu":
        model.prepack()
    return model


def load_weights(model: PagedLlamaForCausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor into its (slice of a) parameter; a missing or unexpected tensor
    is a ``ValueError`` naming it."""
    targets = _weight_targets(model)
    tensor_files = {}  # checkpoint tensor name -> file; all checked before anything is loaded
    for file in _checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            names = [name for name in f.keys() if not _ignored(name, model.config)]
        tensor_files.update(dict.fromkeys(names, file))
    _check_names(set(tensor_files), set(targets), model_dir)
    rank, size = (0, 1) if model.tp is None else (model.tp.rank, model.tp.size)
    for file in sorted(set(tensor_files.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in targets:
                    _copy(targets[name], _shard(f.get_tensor(name), targets[name], name, rank,
                                                size), name)


def _shard(src: Tensor, dst: Tensor, name: str, rank: int, size: int) -> Tensor:
    """This rank's part of a checkpoint tensor: the slice along the one dimension the rank
    holds a share of (rows of column-parallel, columns of row-parallel projections). A
    row-parallel bias is added once, by rank 0, to the sum over the ranks."""
    if size > 1 and name.endswith(("o_proj.bias", "down_proj.bias")):
        return src if rank == 0 else torch.zeros_like(src)
    if src.shape == dst.shape:
        return src
    split = [d for d in range(src.dim()) if src.shape[d] != dst.shape[d]]
    if len(split) != 1 or src.shape[split[0]] != dst.shape[split[0]] * size:
        return src  # not a share: _copy names the mismatch
    part = dst.shape[split[0]]
    return src.narrow(split[0], rank * part, part)


def _weight_targets(model: nn.Module) -> dict[str, Tensor]:
    """Checkpoint tensor name -> the parameter data (or rows of it) that tensor loads into."""
    targets = {}
    for module_name, module in model.named_modules():
        for kind, param in module.named_parameters(recurse=False):
            if isinstance(module, MergedLinear):
                prefix = module_name.rpartition(".")[0]
                for part, rows in module.shards(param.data).items():
                    targets[f"{prefix}.{part}.{kind}"] = rows
            else:
                targets[f"{module_name}.{kind}"] = param.data
    return targets


def _ignored(name: str, config: ModelConfig) -> bool:
    # Old checkpoints carry the RoPE buffer; tied ones may still carry a copy of the embedding.
    tied_head = config.tie_word_embeddings and name == "lm_head.weight"
    return name.endswith("rotary_emb.inv_freq") or tied_head


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({model_dir / name for name in weight_map.values()})
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def _check_names(found: set[str], expected: set[str], model_dir: Path) -> None:
    mismatches = (("missing", expected - found), ("unexpected", found - expected))
    problems = [f"{what}: {', '.join(sorted(names)[:8])}{' ...' if len(names) > 8 else ''}"
                for what, names in mismatches if names]
    if problems:
        raise ValueError(f"checkpoint in {model_dir} does not match the model; "
                         + "; ".join(problems))


def _copy(dst: Tensor, src: Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"tensor {name} has shape {tuple(src.shape)} in the checkpoint, "
                         f"the model expects {tuple(dst.shape)}")
    dst.copy_(src)
