"""dermseg_jax: the thesis' Inception-v3 U-Net for dermoscopic structures, in JAX/Flax.

Public API: `create_model(model_cfg)`, `load_checkpoint(path) -> (model, variables)`, and the
label convention `CLASS_NAMES`, `STRUCTURE_NAMES`. Importing the package never imports
TensorFlow or PyTorch (torchvision must be imported before TensorFlow in a process).
"""

import os

import flax.linen as nn

from dermseg_jax.labels import CLASS_NAMES, STRUCTURE_NAMES
from dermseg_jax.models import create_model

__all__ = ["CLASS_NAMES", "STRUCTURE_NAMES", "create_model", "load_checkpoint"]


def load_checkpoint(
    path: str | os.PathLike, checkpoint: str | int = "best"
) -> tuple[nn.Module, dict]:
    """Loads a model for inference (`dermseg_jax.loading.load_run`).

    Args:
        path: a model directory (`model_config.json` + `variables/`, written by
            `checkpointing.save_model`, e.g. by `python -m dermseg_jax.convert`), or a training
            workdir (`config.json` + `checkpoints/`).
        checkpoint: for a training workdir: 'best' (the latest when no checkpoint was
            evaluated), 'latest' or a step number; a damaged best/latest falls back to the
            newest readable checkpoint.

    Returns:
        (model, variables): the `InceptionUNet` and its {'params', 'batch_stats'}, checked
        against the stored model config.

    Raises:
        dermseg_jax.errors.UserError: if `path` is neither kind of directory, holds encoder
            weights only, or its checkpoint is missing, damaged or does not fit its config.
    """
    from dermseg_jax import loading

    return loading.load_model(path, checkpoint=checkpoint)
