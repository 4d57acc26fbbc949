"""Benchmarks: tools around the network and the trainer, not part of them (``minivln bench``).

* :mod:`minivln.bench.model`: per-step / per-episode latency of model presets (``minivln bench model``);
* :mod:`minivln.bench.train`: training iterations per second (``minivln bench train``).
"""
