"""Cluster simulator: the real gManager policy over a calibrated step-time model.

`cluster.simulate(SimConfig(...), CostModel.from_json(...), trace)` runs one cluster in one mode;
`lockstep.simulate_lockstep` runs it as the engine does, every instance on the engine's own
scheduler; `report.metrics` turns a result into throughput, latency and rejection numbers.
`python -m infinite_llm.sim` compares pooled and static over several cluster sizes and
`python -m infinite_llm.sim.trace` writes a workload. (Nothing is imported here, so that
`python -m infinite_llm.sim.trace` runs its module only once.)
"""
