"""``concur engine``: a simulated vLLM server driven by the engine model in scaled wall-clock time.

Modules: :mod:`~concur.sim.server.app` (the aiohttp app and server),
:mod:`~concur.sim.server.driver` (the engine loop), :mod:`~concur.sim.server.clock`
(scaled time), :mod:`~concur.sim.server.tokenizer` and
:mod:`~concur.sim.server.prompt` (tokens and the chat template),
:mod:`~concur.sim.server.protocol` (OpenAI shapes), :mod:`~concur.sim.server.metrics`
(vLLM's ``/metrics``), :mod:`~concur.sim.server.faults` (fault injection),
:mod:`~concur.sim.server.cli` (the command).
"""
