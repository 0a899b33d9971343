"""Shared pytest set-up.

torchvision must be imported before TensorFlow: in one process, `import tensorflow` followed by
`import torchvision` crashes (segmentation fault in torchvision's custom-op library). Importing
them here, before any test module, fixes the order for the whole session.
"""

import os

# Hide GPUs from TensorFlow and keep JAX on the CPU for tests.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401
