"""Fast scale-out on a node (docs/scaling.md): the data-plane half of DeepServe's scale-up.

launcher.py (the agent's one call: fork -> warm pod -> cold) · dram_cache.py (load-ready weights
in shared memory, LRU within a budget) · pool.py + pod.py (model-agnostic warm pods) · fork.py +
zygote.py (a per-model process that forks instances over shared weight pages) · handles.py (what
a launch returns) · runtime.py (serving inside a started process) · protocol.py (control
messages) · memory.py (PSS/USS from smaps_rollup) · errors.py

Importing this package, the launcher, the pool or the handles does not import torch.
"""
