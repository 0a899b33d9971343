"""A tiny preset for tests and smoke runs: very narrow network, small crops, a few steps.

COMMAND:
    python -m dermseg_jax.train --config=dermseg_jax/configs/tiny.py --workdir=/tmp/tiny \
        --config.data.synthetic_cache=/tmp/tiny_data
"""

import ml_collections

from dermseg_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the tiny configuration."""
    config = default.get_config()
    config.model.width = 0.0625
    config.data.synthetic_num_train = 8
    config.data.synthetic_num_val = 4
    config.data.synthetic_num_test = 2
    config.data.synthetic_image_size = 96
    config.data.resize_shorter = 96
    config.data.crop_size = 80
    config.data.eval_size = 96
    config.data.shuffle_buffer = 8
    config.train.batch_size = 4
    config.train.num_epochs = 2
    config.train.log_every_steps = 2
    config.eval.batch_size = 4
    config.eval.every_steps = 0
    config.checkpoint.every_steps = 2
    return config
