"""Framework integrations: the only modules that import torch, lightning, tensorflow or keras.

Each is imported only when used (``mlflow_eigencam.pytorch``, ``.lightning``, ``.keras``).
"""
