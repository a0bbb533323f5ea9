"""flaxdet: a weight-compatible JAX/Flax port of visdet (MMDetection 3.x fork).

Importing ``flaxdet`` is cheap: it does not import JAX. The config layer
(:mod:`flaxdet.config`) is pure Python and is shared with the PyTorch
reference (:mod:`flaxdet_reference`).
"""

__version__ = "0.1.0"
