import os
import sys

# Keep torch/XLA thread pools small: CI has 2 cores and pytest-xdist runs 2 workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
