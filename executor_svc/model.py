"""Our paged implementation of the Llama family (Llama, Mistral, Qwen2, SmolLM), and its loader.

The numerics follow transformers' own modeling code op for op (RoPE tables in float32, RMSNorm in
float32), so greedy outputs match ``generate``; attention goes through the paged KV cache instead.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.attention import AttentionMetadata
from pagedserve.executor_svc.cpu import PackedLinear, pack_linears
from pagedserve.executor_svc.parallel import TensorParallel, check_divisible

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# RoPE types whose frequencies do not depend on the sequence length, so one table serves all steps.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """The shape of a Llama-family checkpoint, read from config.json as transformers reads it."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    max_position_embeddings: int
    sliding_window: int | None  # None: every layer attends to the whole context
    torch_dtype: torch.dtype  # the dtype the checkpoint was saved in
    rope_type: str
    hf_config: PretrainedConfig = field(repr=False)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Parse and validate ``model_dir/config.json``; an unsupported model is a ValueError."""
        hf = AutoConfig.from_pretrained(model_dir)
        architecture = (getattr(hf, "architectures", None) or ["<none>"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {architecture!r} in {model_dir}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        num_kv_heads = hf.num_key_value_heads or hf.num_attention_heads
        _check_supported(hf, num_kv_heads)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            architecture=architecture,
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            num_heads=hf.num_attention_heads,
            num_kv_heads=num_kv_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            vocab_size=hf.vocab_size,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=architecture == "Qwen2ForCausalLM" or attention_bias,
            o_proj_bias=attention_bias,
            max_position_embeddings=hf.max_position_embeddings,
            sliding_window=_sliding_window(hf),
            torch_dtype=_as_dtype(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)),
            rope_type=hf.rope_parameters["rope_type"],
            hf_config=hf,
        )

    def sharded(self, size: int) -> ModelConfig:
        """The shape one of ``size`` tensor-parallel ranks holds: its share of the query
        heads, KV heads and MLP columns (a ``ValueError`` when they do not divide)."""
        check_divisible(self.num_heads, self.num_kv_heads, self.intermediate_size, size)
        return dataclasses.replace(self, num_heads=self.num_heads // size,
                                   num_kv_heads=self.num_kv_heads // size,
                                   intermediate_size=self.intermediate_size // size)

    @property
    def max_model_len(self) -> int:
        """Longest context this model serves exactly: past a sliding window our full attention
        would see tokens the model's own attention does not."""
        window = self.sliding_window or self.max_position_embeddings
        return min(self.max_position_embeddings, window)


def _check_supported(hf: PretrainedConfig, num_kv_heads: int) -> None:
    if hf.num_attention_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads ({hf.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads})")
    if hf.hidden_act != "silu":
        raise ValueError(f"unsupported hidden_act {hf.hidden_act!r}; only 'silu' is supported")
    if getattr(hf, "mlp_bias", False):
        raise ValueError("unsupported mlp_bias=True; only bias-free MLPs are supported")
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r} (its frequencies depend on the "
                         f"sequence length); supported: {', '.join(STATIC_ROPE_TYPES)}")


def _sliding_window(hf: PretrainedConfig) -> int | None:
    # Qwen2 lists which layers slide (none without use_sliding_window); Mistral slides in all.
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(hf, "sliding_window", None)


def _as_dtype(value) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).removeprefix("torch."))


class RotaryEmbedding:
    """cos/sin of every position up to ``max_position_embeddings``, built once in float32 exactly as
    transformers' rotary embedding builds them for each step, then looked up by position."""

    def __init__(self, config: ModelConfig, device: torch.device | str):
        if config.rope_type == "default":
            init = LlamaRotaryEmbedding.compute_default_rope_parameters
        else:
            init = ROPE_INIT_FUNCTIONS[config.rope_type]
        inv_freq, scaling = init(config.hf_config)
        if inv_freq.numel() * 2 != config.head_dim:
            raise ValueError(f"RoPE covers {inv_freq.numel() * 2} of {config.head_dim} head dims; "
                             "partial rotary embeddings are not supported")
        positions = torch.arange(config.max_position_embeddings, device=device).float()
        freqs = positions[:, None] * inv_freq.to(device)[None, :]
        self.cos = freqs.cos() * scaling
        self.sin = freqs.sin() * scaling

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos[positions], self.sin[positions]
        return torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)


class StepRope:
    """One step's rotary angles: the fused CPU kernel reads ``table`` at ``positions`` itself;
    the torch path's per-token cos/sin are computed the first time a layer asks."""

    def __init__(self, table: RotaryEmbedding, positions: Tensor, dtype: torch.dtype):
        self.table, self.positions, self.dtype = table, positions, dtype

    @functools.cached_property
    def per_token(self) -> tuple[Tensor, Tensor]:
        """cos and sin ``[T, head_dim]`` of each token, in the activations' dtype."""
        return self.table(self.positions, self.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ([T, heads, head_dim]) by its tokens' angles (rotate-half layout, as HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, x: Tensor | None, residual: Tensor) -> tuple[Tensor, Tensor]:
        """The pre-norm layer's residual add and norm: ``residual + x`` (``residual`` alone
        when ``x`` is None) and its norm, fused in one pass where the CPU kernels serve. There
        the sum is written into ``residual``."""
        if cpu_kernels.fuses(residual):
            return cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps), residual
        if x is not None:
            residual = residual + x
        return self(residual), residual


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
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        parts = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.qkv_sizes = list(parts.values())
        self.qkv_proj = MergedLinear(config.hidden_size, parts, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_proj_bias)
        self.scale = config.head_dim ** -0.5

    def forward(self, x: Tensor, rope: StepRope, meta: AttentionMetadata,
                kv_cache: tuple[Tensor, Tensor]) -> Tensor:
        qkv = self.qkv_proj(x)
        if cpu_kernels.fuses(qkv) and meta.backend.name == "torch":
            q, k, v = cpu_kernels.rope_write_kv(
                qkv, self.num_heads, self.num_kv_heads, rope.table.cos, rope.table.sin,
                rope.positions, *kv_cache, meta.slot_mapping)
        else:
            q, k, v = qkv.split(self.qkv_sizes, -1)
            q = apply_rope(q.view(-1, self.num_heads, self.head_dim), *rope.per_token)
            k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), *rope.per_token)
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            meta.backend.write_kv(k, v, *kv_cache, meta.slot_mapping)
        out = meta.backend.attend(q, k, v, *kv_cache, meta, self.scale)
        return _reduce(self.o_proj(out.flatten(1)), self.tp)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None):
        super().__init__()
        self.tp = tp
        size = config.intermediate_size
        parts = {"gate_proj": size, "up_proj": size}
        self.gate_up_proj = MergedLinear(config.hidden_size, parts, bias=False)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_kernels.fuses(gate_up):
            return _reduce(self.down_proj(cpu_kernels.silu_mul(gate_up)), self.tp)
        gate, up = gate_up.chunk(2, -1)
        return _reduce(self.down_proj(F.silu(gate) * up), self.tp)


def _reduce(partial: Tensor, tp: TensorParallel | None) -> Tensor:
    """A row-parallel projection's output: each rank's partial sum, summed over the ranks."""
    return partial if tp is None else tp.all_reduce(partial)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x: Tensor, residual: Tensor | None, rope: StepRope,
                meta: AttentionMetadata, kv_cache: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """This layer's MLP output and the residual stream it has not been added to yet (the
        next norm adds it): ``x`` is the last layer's MLP output, or the embeddings with
        ``residual`` None."""
        if residual is None:
            hidden, residual = self.input_layernorm.add_forward(None, x)
        else:
            hidden, residual = self.input_layernorm.add_forward(x, residual)
        hidden = self.self_attn(hidden, rope, meta, kv_cache)
        hidden, residual = self.post_attention_layernorm.add_forward(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class PagedLlamaForCausalLM(nn.Module):
    """A Llama-family decoder whose attention reads and writes the paged KV cache.

    Parameter names mirror the HF checkpoint's, except that q/k/v and gate/up are merged.
    Under tensor parallelism (``tp``) ``config`` is this rank's share (``ModelConfig.sharded``):
    q/k/v and gate/up hold its rows (column-parallel), o_proj and down_proj its columns
    (row-parallel, summed over the ranks); norms, embedding and LM head are whole on every rank.
    """

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.config = config
        self.rope = rope
        self.tp = tp
        self.model = LlamaModel(config, tp)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.packed_head: PackedLinear | None = None  # see prepack

    def prepack(self) -> int:
        """On CPU, prepack every projection and the LM head for oneDNN's GEMM where it
        serves the dtype (``pagedserve.executor_svc.cpu``); returns how many matrices were packed. A
        tied head gets its own packed copy: the embedding keeps the dense table."""
        count = pack_linears(self)
        needs_head = self.tp is None or self.tp.is_driver  # only rank 0 samples
        if count and self.config.tie_word_embeddings and needs_head:
            self.packed_head = PackedLinear(self.model.embed_tokens.weight, None, batch_hint=32)
            count += 1
        return count

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Hidden states ``[T, hidden]`` of the step's new tokens (all sequences packed in batch
        order); their K/V are written to ``kv_caches`` (one (K, V) pair per layer) on the way."""
        x = self.model.embed_tokens(input_ids)
        rope = StepRope(self.rope, positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, meta, kv_cache)
        return self.model.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Float32 logits ``[N, vocab]`` of the given hidden states."""
        if self.packed_head is not None:
            return self.packed_head(hidden).float()
        if not self.config.tie_word_embeddings:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.model.embed_tokens.weight).float()


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               prepack: bool = True, tp: TensorParallel | None = None) -> PagedLlamaForCausalLM:
    """Build our paged model for the HF checkpoint in ``model_dir`` (config.json + safetensors,
    possibly sharded) with weights in ``dtype`` on ``device``, in eval mode; on CPU its
    GEMMs are prepacked unless ``prepack`` is False. With ``tp``, this rank's share of it."""
    config = ModelConfig.from_model_dir(model_dir)
    rope = RotaryEmbedding(config, device)
    if tp is not None:
        config = config.sharded(tp.size)
    with torch.device("meta"):
        model = PagedLlamaForCausalLM(config, rope, tp)
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
