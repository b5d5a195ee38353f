"""The engines the demo runs its two halves on, each cold for its half.

:class:`SimRig` starts a fresh ``concur engine`` (a simulated vLLM) per half;
:class:`VllmRig` starts one real vLLM (its CPU build, serving the tiny model
made by :mod:`concur.sim.realvllm`) and empties its prefix cache between the
halves (``POST /reset_prefix_cache``: vLLM's cached blocks are all that carries
over from one run to the next; its counters keep counting, and the demo counts
what they grew by).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from concur.sim.demo.orchestrate import start_engine
from concur.sim.procs import Child, ChildFailed, Supervisor, free_port

if TYPE_CHECKING:
    from concur.sim.demo.scenario import Scenario
    from concur.sim.realvllm.server import VllmServer

__all__ = ["Rig", "SimRig", "VllmRig"]


class Rig(Protocol):
    simulated: bool
    """The engine's clock is simulated (``concur engine --speed``), not real."""
    model: str | None
    """The model name to send (``None``: the first of ``/v1/models``)."""

    def describe(self) -> str: ...

    def cold(self, sup: Supervisor, name: str) -> str:
        """The base URL of an engine with an empty prefix cache."""
        ...

    def close(self) -> None: ...


class SimRig:
    """A fresh ``concur engine`` for every half (the previous one is stopped)."""

    simulated = True
    model: str | None = None

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self._child: Child | None = None
        self._sup: Supervisor | None = None

    def describe(self) -> str:
        return self.scenario.engine_spec().describe()

    def cold(self, sup: Supervisor, name: str) -> str:
        if self._child is not None:
            sup.stop(self._child)
        self._sup = sup
        self._child, url = start_engine(sup, name, self.scenario.engine_args(free_port()))
        return url

    def close(self) -> None:
        if self._child is not None and self._sup is not None:
            self._sup.stop(self._child)
        self._child = None


class VllmRig:
    """One real vLLM server; its prefix cache is emptied before each half."""

    simulated = False

    def __init__(self, kv_tokens: int) -> None:
        from concur.sim.realvllm.server import VllmServerConfig, kv_blocks_for, make_model

        self.config = VllmServerConfig(model=make_model(), kv_blocks=kv_blocks_for(kv_tokens))
        self.model: str | None = self.config.served_model_name
        self._server: VllmServer | None = None

    def describe(self) -> str:
        return (
            f"vLLM 0.32 (CPU build) serving {self.config.served_model_name} (2 layers, random "
            f"weights), {self.config.capacity_tokens:,} tokens of KV cache"
        )

    def cold(self, sup: Supervisor, name: str) -> str:
        from concur.sim.realvllm.server import VllmServer

        if self._server is None:
            self._server = VllmServer(self.config, log_path=sup.log_dir / "vllm.log")
            self._server.start()
        elif not self._server.reset_prefix_cache():
            raise ChildFailed(
                "vLLM refused POST /reset_prefix_cache (requests still running?); its log "
                f"({self._server.log_path}) ends with:\n{self._server.log_tail()}"
            )
        return self._server.url

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = None
