"""The engine: scheduling, the step loop over instances, request outputs."""
