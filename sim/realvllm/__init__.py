"""A real vLLM server (its CPU build) with a small model made on this machine.

:func:`~concur.sim.realvllm.model.ensure_model` makes the model,
:class:`~concur.sim.realvllm.server.VllmServer` starts and stops the server; the
tests marked ``vllm``, ``bench/real_engine.py`` and ``concur engine --vllm`` use them.
"""

from concur.sim.realvllm.server import (
    BLOCK_SIZE,
    VllmServer,
    VllmServerConfig,
    VllmStartError,
    find_vllm_python,
    make_model,
)

__all__ = [
    "BLOCK_SIZE",
    "VllmServer",
    "VllmServerConfig",
    "VllmStartError",
    "find_vllm_python",
    "make_model",
]
