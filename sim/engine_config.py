"""A picklable description of a simulated engine: model, GPU, parallelism, capacity."""

from __future__ import annotations

from dataclasses import dataclass

from concur.sim.engine import EngineConfig, engine_config


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What ``--model --gpu --tp --kv-tokens`` say; :meth:`build` makes the config."""

    model: str = "qwen3-32b"
    gpu: str = "h100"
    tp: int = 2
    kv_capacity_tokens: int | None = None
    """KV capacity in tokens; derived from GPU memory when ``None``."""
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    def build(self) -> EngineConfig:
        return engine_config(
            self.model,
            self.gpu,
            self.tp,
            self.kv_capacity_tokens,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )

    def describe(self) -> str:
        cap = self.build().kv_capacity_tokens
        return f"{self.model} on {self.tp} x {self.gpu}, KV capacity {cap:,} tokens"
