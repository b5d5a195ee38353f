"""vLLM's own V1 scheduler and KV cache manager behind the runner's engine interface.

:class:`VllmEngine` builds vLLM's real ``Scheduler`` (and through it the
``KVCacheManager`` and ``BlockPool``) on the CPU with no GPU and no weights, the way
vLLM's own unit tests do (``tests/v1/core/utils.py``): a ``VllmConfig`` whose
``ModelConfig`` reads a ``config.json`` written to a temporary directory for the
model preset's shape, ``skip_tokenizer_init=True``, a ``CacheConfig`` with
``num_gpu_blocks`` set from the :class:`~concur.sim.engine_config.EngineSpec`'s KV
capacity, and a one-group ``KVCacheConfig``. Each :meth:`VllmEngine.step` calls
``schedule()`` and then ``update_from_output()`` with the token the trace says the
model produced for every request whose sequence is fully computed, so prefix-cache
hits, evictions and preemptions are vLLM's own. The step lasts what the built-in
engine's roofline :class:`~concur.sim.steptime.StepTimeModel` says for the
scheduled tokens and their contexts.

Token ids are concrete and deterministic: the ``i``-th token of the virtual
segment ``key`` (see :mod:`concur.sim.blocks`) is a stable hash of ``(key, i)``
reduced into the vocabulary, so an agent that re-sends its context sends the same
leading ids, and the tokens fed back as request ``rid``'s outputs are exactly those
of :func:`~concur.sim.blocks.output_segment` ``(rid, n)``, which the agent's next
prompt carries.

The engine signal is what vLLM's Prometheus logger would export: the gauges
(``kv_cache_usage``, running, waiting) and the prefix-cache counters come from the
scheduler's own ``SchedulerStats`` (``make_stats``), the preemption counter from the
``PREEMPTED`` events in the scheduler's outputs (``vllm:num_preemptions``).

Needs the ``vllm`` extra (``pip install 'concur[vllm]'``; see docs/vllm.md).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from concur.adapters.signal import EngineSignal
from concur.sim.blocks import TokenSeq, VirtualSegment, output_key
from concur.sim.engine import EngineConfig, EngineRequest, EngineStats, StepResult
from concur.sim.engine_config import EngineSpec
from concur.sim.scheduler import FinishedRequest
from concur.sim.steptime import get_model

__all__ = [
    "MODEL_SHAPES",
    "ModelShape",
    "TokenIds",
    "VllmEngine",
    "import_vllm",
    "model_config_json",
]

_ENV_DEFAULTS = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Set (unless already set) before vLLM is imported: CPU platform, quiet logs, no
network."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What ``config.json`` must say for vLLM to size one token's KV."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int


MODEL_SHAPES: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape(4096, 32, 32, 8, 128, 128256, 14336),
    "qwen3-8b": ModelShape(4096, 36, 32, 8, 128, 151936, 12288),
    "qwen3-32b": ModelShape(5120, 64, 64, 8, 128, 151936, 25600),
    # MLA's latent KV (512 + 64 rope dims per layer) as one 288-dim KV head: K and V
    # together hold the same 576 values per layer and token.
    "deepseek-v3": ModelShape(7168, 61, 128, 1, 288, 129280, 18432),
}
"""Model presets (:data:`concur.sim.steptime.MODELS`) as Llama-architecture shapes.
The scheduler never runs the model, so the architecture only has to be one vLLM
knows; the KV shape matches the preset's ``kv_bytes_per_token``."""


def _shape(model: str) -> ModelShape:
    name = get_model(model).name
    try:
        return MODEL_SHAPES[name]
    except KeyError:
        raise ValueError(
            f"--engine vllm has no config.json shape for model {model!r}: choose one of "
            f"{', '.join(sorted(MODEL_SHAPES))}"
        ) from None


def model_config_json(model: str, max_model_len: int) -> dict[str, Any]:
    """The Hugging Face ``config.json`` written for ``model``'s shape."""
    s = _shape(model)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "intermediate_size": s.intermediate_size,
        "vocab_size": s.vocab_size,
        "max_position_embeddings": max_model_len,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    }


# --------------------------------------------------------------------- token ids

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    z = x * _MIX1
    z ^= z >> np.uint64(30)
    z *= _MIX2
    z ^= z >> np.uint64(27)
    z *= _MIX1
    z ^= z >> np.uint64(31)
    return z


class TokenIds:
    """Concrete token ids for virtual segments: token ``i`` of key ``k`` is
    ``splitmix64(blake2b(k) + i x golden) mod vocab``, the same in every process.

    Ids are generated once per key (grown on demand) and kept, so re-sent context
    costs a slice and a concatenation."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self._ids: dict[str, np.ndarray] = {}

    def _grow(self, key: str, length: int) -> np.ndarray:
        have = self._ids.get(key)
        if have is not None and len(have) >= length:
            return have
        size = max(length, 2 * len(have)) if have is not None else length
        seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        with np.errstate(over="ignore"):
            pos = np.arange(size, dtype=np.uint64) * _GOLDEN + np.uint64(seed)
            ids = (_splitmix(pos) % np.uint64(self.vocab_size)).astype(np.int64)
        self._ids[key] = ids
        return ids

    def segment(self, key: str, length: int) -> np.ndarray:
        """The first ``length`` ids of virtual segment ``key``."""
        return self._grow(key, length)[:length]

    def token(self, key: str, index: int) -> int:
        """Id ``index`` of virtual segment ``key``."""
        return int(self._grow(key, index + 1)[index])

    def of(self, seq: TokenSeq) -> list[int]:
        """All ids of ``seq``, in order."""
        parts: list[np.ndarray] = []
        for seg in seq.segments:
            if isinstance(seg, VirtualSegment):
                parts.append(self.segment(seg.key, seg.length))
            else:
                parts.append(np.asarray(seg, dtype=np.int64))
        if not parts:
            return []
        ids: list[int] = np.concatenate(parts).tolist()
        return ids

    def forget(self, key: str) -> None:
        """Drop the ids kept for ``key``."""
        self._ids.pop(key, None)


def _fast_block_hash(obj: object) -> bytes:
    """vLLM's prefix-cache hash function, swapped for Python's ``hash``: block
    contents and parents are hashable tuples/bytes, and the choice of hash does
    not change which blocks hit (SHA-256 would only cost time here)."""
    return hash(obj).to_bytes(8, "big", signed=True)


# ------------------------------------------------------------------ bookkeeping


@dataclass(slots=True)
class _Track:
    """What the engine records about one live request, beside vLLM's ``Request``."""

    request_id: str
    prompt_tokens: int
    known_prefix: int
    arrival_time: float
    out_key: str
    running: bool = False
    num_output: int = 0
    computed: int = 0
    high_water: int = 0
    preemptions: int = 0
    cached_first: int = -1
    prefill_tokens: int = 0
    recomputed_tokens: int = 0
    first_scheduled_time: float = -1.0
    first_token_time: float = -1.0
    first_token_step: int = -1


@dataclass(slots=True)
class _Counters:
    steps: int = 0
    busy_time: float = 0.0
    scheduled_tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    recomputed_tokens: int = 0
    output_tokens: int = 0
    scheduler_preemptions: int = 0
    evicted_blocks: int = 0
    added: int = 0
    finished: int = 0
    aborted: int = 0
    # As vLLM's Prometheus logger accumulates them:
    prom_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0


# ----------------------------------------------------------------------- engine


def import_vllm() -> Any:
    """vLLM's modules the engine uses, imported with the CPU/offline defaults."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    vllm_logger = logging.getLogger("vllm")
    if vllm_logger.level == logging.NOTSET:
        # vLLM's warnings about the CPU platform (no Triton, block size) are noise here.
        vllm_logger.setLevel(logging.ERROR)
    try:
        torch = importlib.import_module("torch")
        from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine import EngineCoreEventType
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            KVCacheConfig,
            KVCacheGroupSpec,
        )
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request, RequestStatus
        from vllm.v1.structured_output import StructuredOutputManager
    except ImportError as exc:
        raise RuntimeError(
            f"--engine vllm needs the vllm extra and a CPU build of torch ({exc}); see "
            "docs/vllm.md. If the error names torchvision or torchaudio, uninstall them: "
            "pip uninstall -y torchvision torchaudio torchcodec"
        ) from exc
    return _Vllm(
        torch=torch,
        CacheConfig=CacheConfig,
        ModelConfig=ModelConfig,
        SchedulerConfig=SchedulerConfig,
        VllmConfig=VllmConfig,
        SamplingParams=SamplingParams,
        get_request_block_hasher=get_request_block_hasher,
        init_none_hash=init_none_hash,
        Scheduler=Scheduler,
        EngineCoreEventType=EngineCoreEventType,
        FullAttentionSpec=FullAttentionSpec,
        KVCacheConfig=KVCacheConfig,
        KVCacheGroupSpec=KVCacheGroupSpec,
        ModelRunnerOutput=ModelRunnerOutput,
        Request=Request,
        RequestStatus=RequestStatus,
        StructuredOutputManager=StructuredOutputManager,
    )


@dataclass(frozen=True, slots=True)
class _Vllm:
    torch: Any
    CacheConfig: Any
    ModelConfig: Any
    SchedulerConfig: Any
    VllmConfig: Any
    SamplingParams: Any
    get_request_block_hasher: Any
    init_none_hash: Any
    Scheduler: Any
    EngineCoreEventType: Any
    FullAttentionSpec: Any
    KVCacheConfig: Any
    KVCacheGroupSpec: Any
    ModelRunnerOutput: Any
    Request: Any
    RequestStatus: Any
    StructuredOutputManager: Any


class VllmEngine:
    """vLLM's V1 scheduler on a virtual clock (one engine, FCFS, chunked prefill,
    prefix caching, recompute preemption, full-sequence admission reservation:
    vLLM's defaults)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.config: EngineConfig = spec.build()
        cfg = self.config
        self._v = v = import_vllm()
        self.block_size = cfg.block_size
        self.num_blocks = cfg.num_blocks
        # vLLM refuses a max_model_len the KV cache cannot hold; so does the runner.
        self.max_model_len = cfg.num_blocks * cfg.block_size
        shape = _shape(spec.model)
        self.token_ids = TokenIds(shape.vocab_size)
        self.vllm_config = self._vllm_config(v)
        layers = [f"model.layers.{i}.self_attn.attn" for i in range(shape.num_layers)]
        kv_heads = max(1, shape.num_kv_heads // max(1, min(spec.tp, shape.num_kv_heads)))
        kv_spec = v.FullAttentionSpec(
            block_size=cfg.block_size,
            num_kv_heads=kv_heads,
            head_size=shape.head_dim,
            dtype=v.torch.bfloat16,
        )
        self.kv_cache_config = v.KVCacheConfig(
            num_blocks=cfg.num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[v.KVCacheGroupSpec(layers, kv_spec)],
        )
        self.scheduler: Any = v.Scheduler(
            vllm_config=self.vllm_config,
            kv_cache_config=self.kv_cache_config,
            structured_output_manager=v.StructuredOutputManager(self.vllm_config),
            block_size=cfg.block_size,
            log_stats=True,
        )
        v.init_none_hash(_fast_block_hash)
        self._hasher = v.get_request_block_hasher(cfg.block_size, _fast_block_hash)
        self._preempted_event = v.EngineCoreEventType.PREEMPTED
        self._step_time = cfg.step_time
        self._tracks: dict[str, _Track] = {}
        self._c = _Counters()
        self._count_evictions()

    def _vllm_config(self, v: _Vllm) -> Any:
        cfg = self.config
        with tempfile.TemporaryDirectory(prefix="concur-vllm-model-") as tmp:
            Path(tmp, "config.json").write_text(
                json.dumps(model_config_json(self.spec.model, self.max_model_len))
            )
            model_config = v.ModelConfig(
                model=tmp,
                skip_tokenizer_init=True,
                dtype="bfloat16",
                max_model_len=self.max_model_len,
                seed=0,
            )
        scheduler_config = v.SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
            long_prefill_token_threshold=0,
            scheduler_reserve_full_isl=cfg.reserve_full_isl,
            watermark=cfg.watermark,
            policy=cfg.scheduling_policy,
        )
        cache_config = v.CacheConfig(
            block_size=cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching
        )
        vllm_config = v.VllmConfig(
            model_config=model_config,
            scheduler_config=scheduler_config,
            cache_config=cache_config,
        )
        vllm_config.cache_config.num_gpu_blocks = cfg.num_blocks
        return vllm_config

    def _count_evictions(self) -> None:
        """Count cached blocks whose content is dropped on reuse (vLLM has no
        counter for it outside its sampled KV-cache metrics)."""
        pool = self.scheduler.kv_cache_manager.block_pool
        evict: Callable[[Any], bool] = pool._maybe_evict_cached_block
        counters = self._c

        def counting(block: Any) -> bool:
            evicted = evict(block)
            if evicted:
                counters.evicted_blocks += 1
            return evicted

        pool._maybe_evict_cached_block = counting

    # -- requests ------------------------------------------------------------

    def add_request(self, req: EngineRequest, now: float) -> None:
        """Queue a request (in the order of the scheduling policy). Raises ValueError if it
        can never fit."""
        rid = req.request_id
        if rid in self._tracks:
            raise ValueError(f"request id {rid!r} is already in the engine")
        n = len(req.prompt)
        if n < 1:
            raise ValueError(f"request {rid!r}: empty prompt")
        if req.max_tokens < 1:
            raise ValueError(f"request {rid!r}: max_tokens must be >= 1, got {req.max_tokens}")
        bs = self.block_size
        need = -(-(n + req.max_tokens - 1) // bs)
        usable = self.num_blocks - 1
        if need > usable:
            raise ValueError(
                f"request {rid!r}: prompt {n} + max_tokens {req.max_tokens} tokens need "
                f"{need} KV blocks but the engine has {usable}; give the engine more KV "
                f"capacity or send shorter requests"
            )
        v = self._v
        request = v.Request(
            request_id=rid,
            prompt_token_ids=self.token_ids.of(req.prompt),
            sampling_params=v.SamplingParams(max_tokens=req.max_tokens, ignore_eos=True),
            pooling_params=None,
            arrival_time=now,
            priority=req.priority,
            block_hasher=self._hasher if self.config.enable_prefix_caching else None,
        )
        self.scheduler.add_request(request)
        self._tracks[rid] = _Track(
            request_id=rid,
            prompt_tokens=n,
            known_prefix=req.known_prefix_tokens,
            arrival_time=now,
            out_key=output_key(rid),
        )
        self._c.added += 1

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request; False if it is not in the engine."""
        if self._tracks.pop(request_id, None) is None:
            return False
        self.scheduler.finish_requests(request_id, self._v.RequestStatus.FINISHED_ABORTED)
        self._c.aborted += 1
        return True

    def has_work(self) -> bool:
        return bool(self.scheduler.get_num_unfinished_requests() > 0)

    # -- stepping ------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """``schedule()`` + ``update_from_output()`` for one step starting at ``now``;
        the step lasts ``result.duration`` (roofline), as in the built-in engine."""
        sched = self.scheduler
        c = self._c
        out = sched.schedule()
        index = c.steps
        tracks = self._tracks
        preempted: list[str] = []
        for rid in out.preempted_req_ids:
            t = tracks.get(rid)
            if t is None:
                continue
            preempted.append(rid)
            t.high_water = max(t.high_water, t.computed)
            t.computed = 0
            t.running = False
            t.preemptions += 1
        c.scheduler_preemptions += len(preempted)

        admitted: list[str] = []
        req_ids: list[str] = []
        sampled: list[list[int]] = []
        prefill = decode = context = recomputed = 0
        pairs = prefill_context = 0
        requests = sched.requests
        for rid, n in out.num_scheduled_tokens.items():
            r = requests[rid]
            t = tracks[rid]
            end = int(r.num_computed_tokens)
            start = end - n
            ntok = int(r.num_tokens)
            num_out = len(r.output_token_ids)
            if not t.running:
                t.running = True
                admitted.append(rid)
                if t.preemptions == 0:
                    t.cached_first = start
                    t.first_scheduled_time = now
            context += end
            if n == 1 and num_out and end == ntok:
                decode += 1
            else:
                prefill += n
                pairs += n * start + n * (n + 1) // 2
                prefill_context += end
                t.prefill_tokens += n
                limit = max(t.known_prefix, t.high_water)
                if limit > start:
                    rec = min(end, limit) - start
                    t.recomputed_tokens += rec
                    recomputed += rec
            t.computed = end
            req_ids.append(rid)
            # The model runner returns a token only for a fully computed sequence
            # (a partial prefill chunk samples nothing).
            sampled.append([self.token_ids.token(t.out_key, num_out)] if end >= ntok else [])

        scheduled = int(out.total_num_scheduled_tokens)
        duration = self._step_time.duration(
            scheduled, context, pairs, prefill_context, len(out.num_scheduled_tokens)
        )
        if scheduled:
            c.steps += 1
            c.busy_time += duration
            c.scheduled_tokens += scheduled
        c.prefill_tokens += prefill
        c.decode_tokens += decode
        c.recomputed_tokens += recomputed

        runner_output = self._v.ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
            sampled_token_ids=sampled,
        )
        engine_outputs = sched.update_from_output(out, runner_output)
        end_time = now + duration
        outputs: dict[str, int] = {}
        finished: list[FinishedRequest] = []
        for eco in engine_outputs.values():
            for o in eco.outputs:
                self._count_events(o.events)
                rid = o.request_id
                t = tracks.get(rid)
                if t is None:
                    continue
                if o.new_token_ids:
                    outputs[rid] = len(o.new_token_ids)
                    t.num_output += len(o.new_token_ids)
                    if t.first_token_step < 0:
                        t.first_token_step = index
                        t.first_token_time = end_time
                if o.finish_reason is not None:
                    finished.append(self._finish(t, end_time))
            if eco.scheduler_stats is not None:
                self._absorb(eco.scheduler_stats)
        c.output_tokens += sum(outputs.values())
        c.finished += len(finished)
        return StepResult(
            start=now,
            duration=duration,
            step_index=index,
            scheduled_tokens=scheduled,
            prefill_tokens=prefill,
            decode_tokens=decode,
            num_requests=len(req_ids),
            outputs=outputs,
            finished=tuple(finished),
            preempted=tuple(preempted),
            admitted=tuple(admitted),
            recomputed_tokens=recomputed,
            context_tokens=context,
        )

    def _finish(self, t: _Track, now: float) -> FinishedRequest:
        del self._tracks[t.request_id]
        self.token_ids.forget(t.out_key)
        num_out = t.num_output
        return FinishedRequest(
            request_id=t.request_id,
            prompt_tokens=t.prompt_tokens,
            output_tokens=num_out,
            cached_tokens=max(t.cached_first, 0),
            prefill_tokens=t.prefill_tokens,
            recomputed_tokens=t.recomputed_tokens,
            preemptions=t.preemptions,
            arrival_time=t.arrival_time,
            first_scheduled_time=t.first_scheduled_time,
            first_token_time=t.first_token_time,
            first_token_step=t.first_token_step,
            finish_time=now,
            kv_tokens=t.prompt_tokens + num_out - 1,
        )

    def _count_events(self, events: Sequence[Any] | None) -> None:
        if events:
            kind = self._preempted_event
            self._c.prom_preemptions += sum(1 for e in events if e.type == kind)

    def _absorb(self, stats: Any) -> None:
        """Add one ``SchedulerStats``' prefix-cache figures to the counters, as
        ``PrometheusStatLogger.record`` does."""
        p = stats.prefix_cache_stats
        c = self._c
        c.prefix_queries += int(p.queries)
        c.prefix_hits += int(p.hits)
        c.preempted_queries += int(p.preempted_queries)
        c.preempted_hits += int(p.preempted_hits)

    # -- observation ---------------------------------------------------------

    def scheduler_stats(self) -> Any:
        """A fresh ``SchedulerStats`` from vLLM (its prefix-cache figures are
        drained into this engine's counters, so none are lost)."""
        stats = self.scheduler.make_stats()
        self._absorb(stats)
        return stats

    def signal(self, now: float) -> EngineSignal:
        """What vLLM's ``/metrics`` would say now."""
        s = self.scheduler_stats()
        c = self._c
        return EngineSignal(
            timestamp=now,
            kv_usage=float(s.kv_cache_usage),
            running=int(s.num_running_reqs),
            waiting=int(s.num_waiting_reqs) + int(s.num_skipped_waiting_reqs),
            preemptions_total=float(c.prom_preemptions),
            prefix_hits_total=float(c.prefix_hits),
            prefix_queries_total=float(c.prefix_queries),
            kv_capacity_tokens=self.num_blocks * self.block_size,
            engines=1,
        )

    @property
    def stats(self) -> EngineStats:
        c = self._c
        return EngineStats(
            steps=c.steps,
            busy_time=c.busy_time,
            scheduled_tokens=c.scheduled_tokens,
            prefill_tokens=c.prefill_tokens,
            decode_tokens=c.decode_tokens,
            cached_tokens=c.prefix_hits + c.preempted_hits,
            recomputed_tokens=c.recomputed_tokens,
            output_tokens=c.output_tokens,
            preemptions=c.scheduler_preemptions,
            evicted_blocks=c.evicted_blocks,
            prefix_queries=c.prefix_queries,
            prefix_hits=c.prefix_hits,
            requests_added=c.added,
            requests_finished=c.finished,
            requests_aborted=c.aborted,
        )
