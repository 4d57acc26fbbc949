"""Deployment: the network exported to ONNX and run by ONNX Runtime (fp32 and int8).

* :mod:`minivln.deploy.export`: ``minivln export CHECKPOINT --out DIR`` (graphs of the tensor-only
  entry points of :mod:`minivln.model.tensor_modes`, int8 variant, manifest, parity check);
* :mod:`minivln.deploy.runtime`: :class:`~minivln.deploy.runtime.OnnxRuntimeDUET`, the exported
  graphs behind the torch model's calling convention (a drop-in for the agent);
* :mod:`minivln.deploy.backends`: the backend registry (``torch``, ``onnxruntime``,
  ``onnxruntime-int8``) of ``minivln navigate --backend``.

Needs the optional extra: ``pip install -e '.[deploy]'`` (onnx, onnxruntime).  See docs/deploy.md.
Nothing below this package (model, training) imports it.
"""
