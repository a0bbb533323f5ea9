"""Pure JAX detection ops: boxes, anchors, NMS, RoIAlign, mask pasting (static shapes, jit-able)."""
