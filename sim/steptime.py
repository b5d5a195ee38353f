"""Roofline step time and KV capacity for model/GPU presets.

One engine step reads every weight once and the KV cache of every scheduled
request's context, and does ``2 x active_params`` FLOPs per scheduled token:

    duration = max((weight_bytes + kv_bytes_read) / (bandwidth x eff_bw),
                   2 x active_params x tokens / (flops x eff_flops)) + overhead

With tensor parallelism of degree ``tp`` each GPU holds ``1/tp`` of the weights
and its share of every token's KV (GQA shards KV heads across GPUs, up to the
number of KV heads; MLA's latent KV is replicated on every GPU), and the GPUs
work in parallel with efficiency ``tp_efficiency``. Attention FLOPs, MoE expert
load imbalance and communication are not modelled apart from that factor.

Pure functions over frozen dataclasses; look presets up by case-insensitive
name (``"qwen3-32b"``, ``"H100"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

__all__ = [
    "GPUS",
    "MODELS",
    "GpuSpec",
    "MeasuredStepTime",
    "ModelSpec",
    "StepTime",
    "StepTimeModel",
    "build_step_time",
    "get_gpu",
    "get_model",
    "kv_capacity_tokens",
]

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the roofline needs to know about a model."""

    name: str
    num_layers: int
    total_params: float
    """All parameters (what must sit in GPU memory)."""
    active_params: float
    """Parameters used per token (== total for dense models, less for MoE)."""
    kv_bytes_per_token: int
    """KV cache bytes of one token over all layers, unsharded."""
    bytes_per_param: float = 2.0
    num_kv_heads: int | None = None
    """KV heads (GQA); None for MLA, whose latent KV is replicated under TP."""
    head_dim: int | None = None

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_param

    def kv_shards(self, tp: int) -> int:
        """Over how many GPUs one token's KV is split at tensor parallelism ``tp``."""
        if self.num_kv_heads is None:
            return 1
        return max(1, min(tp, self.num_kv_heads))

    @classmethod
    def gqa(
        cls,
        name: str,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        params: float,
        active_params: float | None = None,
        bytes_per_param: float = 2.0,
        kv_dtype_bytes: int = 2,
    ) -> ModelSpec:
        """A model with grouped-query attention: K and V per layer and KV head."""
        return cls(
            name=name,
            num_layers=num_layers,
            total_params=params,
            active_params=params if active_params is None else active_params,
            kv_bytes_per_token=2 * num_layers * num_kv_heads * head_dim * kv_dtype_bytes,
            bytes_per_param=bytes_per_param,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
        )

    @classmethod
    def mla(
        cls,
        name: str,
        *,
        num_layers: int,
        kv_lora_rank: int,
        rope_head_dim: int,
        params: float,
        active_params: float,
        bytes_per_param: float = 1.0,
        kv_dtype_bytes: int = 2,
    ) -> ModelSpec:
        """A model with multi-head latent attention (DeepSeek): one latent
        vector plus the rope key per layer and token."""
        return cls(
            name=name,
            num_layers=num_layers,
            total_params=params,
            active_params=active_params,
            kv_bytes_per_token=(kv_lora_rank + rope_head_dim) * num_layers * kv_dtype_bytes,
            bytes_per_param=bytes_per_param,
        )


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    memory_bytes: float
    bandwidth: float
    """HBM bandwidth, bytes/s."""
    flops: float
    """Dense bf16 tensor FLOP/s."""


MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "llama-3-8b": ModelSpec.gqa(
            "llama-3-8b", num_layers=32, num_kv_heads=8, head_dim=128, params=8.03e9
        ),
        "qwen3-8b": ModelSpec.gqa(
            "qwen3-8b", num_layers=36, num_kv_heads=8, head_dim=128, params=8.19e9
        ),
        "qwen3-32b": ModelSpec.gqa(
            "qwen3-32b", num_layers=64, num_kv_heads=8, head_dim=128, params=32.8e9
        ),
        "deepseek-v3": ModelSpec.mla(
            "deepseek-v3",
            num_layers=61,
            kv_lora_rank=512,
            rope_head_dim=64,
            params=671e9,
            active_params=37e9,
            bytes_per_param=1.0,
        ),
    }
)
"""Model presets: Llama-3-8B 128 KiB/token, Qwen3-8B 144 KiB, Qwen3-32B 256 KiB
(bf16 KV and weights); DeepSeek-V3 fp8 weights, MLA KV 70,272 bytes/token."""

_MODEL_ALIASES = {"llama3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b", "dsv3": "deepseek-v3"}

GPUS: Mapping[str, GpuSpec] = MappingProxyType(
    {
        "h100": GpuSpec("h100", memory_bytes=81559 * MIB, bandwidth=3.35e12, flops=989e12),
        "h200": GpuSpec("h200", memory_bytes=143771 * MIB, bandwidth=4.8e12, flops=989e12),
        "a100": GpuSpec("a100", memory_bytes=81920 * MIB, bandwidth=2.04e12, flops=312e12),
    }
)
"""GPU presets (SXM parts; memory as ``nvidia-smi`` reports it: H100 80 GB,
H200 141 GB, A100 80 GB)."""


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def get_model(name: str | ModelSpec) -> ModelSpec:
    """A model preset by case-insensitive name (a ModelSpec passes through)."""
    if isinstance(name, ModelSpec):
        return name
    key = _norm(name)
    key = _MODEL_ALIASES.get(key, key)
    try:
        return MODELS[key]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}"
        ) from None


def get_gpu(name: str | GpuSpec) -> GpuSpec:
    """A GPU preset by case-insensitive name (a GpuSpec passes through)."""
    if isinstance(name, GpuSpec):
        return name
    key = _norm(name)
    try:
        return GPUS[key]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}: choose one of {', '.join(sorted(GPUS))}") from None


def _check_tp(tp: int) -> None:
    if not (isinstance(tp, int) and tp >= 1):
        raise ValueError(f"tp (tensor-parallel degree) must be an integer >= 1, got {tp!r}")


def kv_capacity_tokens(
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    tp: int = 1,
    *,
    gpu_memory_utilization: float = 0.9,
    activation_bytes_per_gpu: float = 2 * GIB,
) -> int:
    """KV cache capacity in tokens, as vLLM would size it: per GPU,
    ``memory x gpu_memory_utilization - weights / tp - activation overhead``,
    divided by that GPU's share of one token's KV."""
    m = get_model(model)
    g = get_gpu(gpu)
    _check_tp(tp)
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(
            f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}"
        )
    free = g.memory_bytes * gpu_memory_utilization - m.weight_bytes / tp - activation_bytes_per_gpu
    per_gpu_kv = m.kv_bytes_per_token / m.kv_shards(tp)
    tokens = int(free // per_gpu_kv) if free > 0 else 0
    if tokens <= 0:
        raise ValueError(
            f"{m.name} does not fit on {tp} x {g.name}: "
            f"{m.weight_bytes / tp / GIB:.1f} GiB of weights per GPU leave no room for KV "
            f"at gpu_memory_utilization={gpu_memory_utilization}; raise tp"
        )
    return tokens


class StepTime(Protocol):
    """How long one engine step takes, from what the scheduler put in it."""

    @property
    def name(self) -> str: ...

    def duration(
        self,
        scheduled_tokens: int,
        context_tokens: int,
        prefill_pairs: int = 0,
        prefill_context: int = 0,
        num_seqs: int | None = None,
    ) -> float:
        """Seconds for a step computing ``scheduled_tokens`` tokens whose requests
        attend over ``context_tokens`` tokens in all; ``prefill_pairs`` and
        ``prefill_context`` are the prefill chunks' attention pairs and their part of
        the context (0 for a pure decode step), ``num_seqs`` the requests in the batch
        (``None``: one per scheduled token, as in a pure decode step)."""
        ...


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """Per-GPU roofline constants; :meth:`duration` is the step time."""

    weight_bytes: float
    """Weight bytes each GPU reads per step."""
    kv_bytes_per_token: float
    """KV bytes each GPU reads per context token."""
    bandwidth: float
    """Effective bytes/s per GPU (efficiencies applied)."""
    flops_per_token: float
    """FLOPs each GPU spends per scheduled token."""
    flops: float
    """Effective FLOP/s per GPU (efficiencies applied)."""
    overhead_s: float = 0.002
    """Fixed per-step cost (scheduling, launch, sampling)."""
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.flops <= 0:
            raise ValueError("StepTimeModel: bandwidth and flops must be > 0")
        if self.overhead_s < 0:
            raise ValueError(f"StepTimeModel: overhead_s must be >= 0, got {self.overhead_s}")

    def duration(
        self,
        scheduled_tokens: int,
        context_tokens: int,
        prefill_pairs: int = 0,
        prefill_context: int = 0,
        num_seqs: int | None = None,
    ) -> float:
        """Seconds for a step computing ``scheduled_tokens`` tokens whose
        requests attend over ``context_tokens`` tokens in total (the roofline reads
        that KV once; the other arguments of :class:`StepTime` do not enter it)."""
        if scheduled_tokens <= 0:
            return 0.0
        t_mem = (self.weight_bytes + context_tokens * self.kv_bytes_per_token) / self.bandwidth
        t_cmp = scheduled_tokens * self.flops_per_token / self.flops
        return (t_mem if t_mem > t_cmp else t_cmp) + self.overhead_s


def build_step_time(
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    tp: int = 1,
    *,
    bandwidth_efficiency: float = 0.8,
    flops_efficiency: float = 0.5,
    tp_efficiency: float = 0.9,
    overhead_s: float = 0.002,
) -> StepTimeModel:
    """The roofline of ``model`` on ``tp`` x ``gpu``. ``tp_efficiency`` scales
    bandwidth and FLOP/s when ``tp > 1`` (communication, imbalance)."""
    m = get_model(model)
    g = get_gpu(gpu)
    _check_tp(tp)
    for label, value in (
        ("bandwidth_efficiency", bandwidth_efficiency),
        ("flops_efficiency", flops_efficiency),
        ("tp_efficiency", tp_efficiency),
    ):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{label} must be in (0, 1], got {value!r}")
    scale = tp_efficiency if tp > 1 else 1.0
    return StepTimeModel(
        weight_bytes=m.weight_bytes / tp,
        kv_bytes_per_token=m.kv_bytes_per_token / m.kv_shards(tp),
        bandwidth=g.bandwidth * bandwidth_efficiency * scale,
        flops_per_token=2.0 * m.active_params / tp,
        flops=g.flops * flops_efficiency * scale,
        overhead_s=overhead_s,
        name=f"{m.name}@{tp}x{g.name}",
    )


@dataclass(frozen=True, slots=True)
class MeasuredStepTime:
    """A step time fitted to a running engine (``bench/engine_costs.py``), not a roofline.

    The engine's part is ``base + per_token x scheduled + per_seq x sequences +
    per_pair x prefill pairs + per_kv x decode context``: on a CPU the costs add up
    (no bandwidth/compute overlap to take a maximum of), attention is quadratic in a
    prefill (pairs of query and key tokens) and linear in the context for a decode
    token. The serving stack around the engine (detokenizing, streaming, proxy and
    client) handles every sequence's new token at ``frontend_per_seq_s`` each, in
    parallel with the engine: a step lasts the longer of the two.
    """

    base_s: float
    per_token_s: float
    per_seq_s: float
    per_pair_s: float
    per_kv_s: float
    frontend_per_seq_s: float = 0.0
    name: str = "measured"

    def __post_init__(self) -> None:
        for label in (
            "base_s",
            "per_token_s",
            "per_seq_s",
            "per_pair_s",
            "per_kv_s",
            "frontend_per_seq_s",
        ):
            if getattr(self, label) < 0:
                raise ValueError(f"MeasuredStepTime.{label} must be >= 0")

    def duration(
        self,
        scheduled_tokens: int,
        context_tokens: int,
        prefill_pairs: int = 0,
        prefill_context: int = 0,
        num_seqs: int | None = None,
    ) -> float:
        if scheduled_tokens <= 0:
            return 0.0
        seqs = scheduled_tokens if num_seqs is None else num_seqs
        engine = (
            self.base_s
            + self.per_token_s * scheduled_tokens
            + self.per_seq_s * seqs
            + self.per_pair_s * prefill_pairs
            + self.per_kv_s * (context_tokens - prefill_context)
        )
        frontend = self.frontend_per_seq_s * seqs
        return engine if engine > frontend else frontend
