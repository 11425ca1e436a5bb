"""One instance's side of a step: its scheduler, its model runner (eager, CUDA graphs,
launch-ahead), KV migration, and the thread count of CPU steps."""
