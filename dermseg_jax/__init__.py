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


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Loads a model for inference.

    Args:
        path: a model directory (`model_config.json` + `variables/`, written by
            `checkpointing.save_model`, e.g. by `python -m dermseg_jax.convert`), or a training
            workdir (`config.json` + `checkpoints/`: its best checkpoint, else the latest).

    Returns:
        (model, variables): the `InceptionUNet` and its {'params', 'batch_stats'}.

    Raises:
        FileNotFoundError: if `path` is not a model directory.
        ValueError: if it holds encoder weights only (use them as a training `init_from`).
    """
    from dermseg_jax import checkpointing

    if checkpointing.is_model_dir(path):
        model_cfg, variables = checkpointing.load_model(path)
        if model_cfg.get("encoder_only", False):
            raise ValueError(
                f"{path} holds encoder weights only (converted from torchvision); use it as a "
                "training init_from, not for inference."
            )
        return create_model(model_cfg), variables
    if checkpointing.is_training_workdir(path):
        model_cfg, variables = checkpointing.load_training_variables(path, which="best")
        return create_model(model_cfg), variables
    raise FileNotFoundError(
        f"{path} is neither a model directory (model_config.json + variables/) nor a training "
        "workdir (config.json + checkpoints/)."
    )
