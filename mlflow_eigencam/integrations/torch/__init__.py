"""The PyTorch adapter, one idea per module (users import :mod:`mlflow_eigencam.pytorch`):

* :mod:`.monitor`: :class:`~.monitor.EigenCAMMonitor`, capture blocks, pinned samples;
* :mod:`.layers`: the target layer: resolved by name, or auto-detected; token folding;
* :mod:`.detection`: torchvision detectors: boxes, and the padded canvas their maps cover;
* :mod:`.batches`: a batch -> ``(images, labels)``; tensors -> numpy (any torch adapter);
* :mod:`._model`: the discipline about the user's model (flags, RNG, wrappers, ranks, copies).
"""
