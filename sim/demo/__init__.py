"""``concur demo``: a simulated vLLM, an agent swarm, with and without concur."""
