"""Benchmarks: tools around the network and the trainer, not part of them (``minivln bench``).

* :mod:`minivln.bench.model`: per-step / per-episode latency of presets and checkpoints on each backend
  (``minivln bench model``), synthetic episodes; :mod:`minivln.bench.episodes`: real R2R episodes with
  the agent (``--episodes real``); :mod:`minivln.bench.common`: the models, machine and commit;
* :mod:`minivln.bench.gemm`: fp32 matrix-product GFLOP/s of the machine (``minivln bench gemm``);
* :mod:`minivln.bench.figure`: success rate vs latency, the Fig. 1 picture (``minivln bench figure``);
* :mod:`minivln.bench.train`: training iterations per second (``minivln bench train``).
"""
