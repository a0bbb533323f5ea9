"""flaxdet_reference: a compact PyTorch mirror of the visdet modules flaxdet ports.

Installed under the import name ``flaxdet_reference`` (folder ``reference/``) so it
cannot collide with other packages. Module classes, constructor arguments,
attribute names (hence state_dict keys) and numerics follow visdet (commit
f72e8d1); RoIAlign and NMS are torchvision's, as in visdet. It is the oracle the
parity suite runs flaxdet against, and it is itself checked against outputs
recorded from the real visdet (``../shared/goldens``).
"""
from flaxdet_reference.models import build_detector, load_detector  # noqa: F401
