"""Tests of the training configs: they load, derived fields follow overrides, the thesis recipe
is the notebook's, and every config builds its model and optimizer."""

import jax
import jax.numpy as jnp
import pytest

from dermseg_jax import models, optim
from dermseg_jax.configs import default, isic2018, thesis, tiny

ALL = {"default": default, "thesis": thesis, "isic2018": isic2018, "tiny": tiny}


@pytest.mark.parametrize("name", sorted(ALL))
def test_config_has_all_sections_and_builds(name):
    config = ALL[name].get_config()
    for section in ("model", "data", "loss", "optim", "train", "eval", "checkpoint"):
        assert section in config, section
    assert "init_from" in config
    models.create_model(config.model)  # Raises on a missing model field.
    optim.create_optimizer(
        config.optim,
        steps_per_epoch=config.train.steps_per_epoch,
        num_train_steps=config.train.num_train_steps,
    )
    assert config.train.num_train_steps == config.train.num_epochs * config.train.steps_per_epoch
    assert config.train.batch_size > 0 and config.train.num_train_steps > 0


def test_derived_fields_follow_overrides():
    config = default.get_config()
    config.train.batch_size = 4
    assert config.train.steps_per_epoch == config.data.synthetic_num_train // 4
    assert config.optim.warmup_steps == config.train.steps_per_epoch
    # Overriding a derived field must not write through to its source.
    config.optim.warmup_steps = 3
    assert config.train.steps_per_epoch == config.data.synthetic_num_train // 4
    assert thesis.get_config().train.steps_per_epoch == 67


def test_thesis_config_is_the_notebook():
    config = thesis.get_config()
    assert config.train.batch_size == 24
    assert config.train.num_train_steps == 50 * 67
    assert config.optim.lr_l1 == 0 and config.optim.lr_l2 == 0
    assert config.optim.lr_l3 == 1e-5
    assert config.optim.lr_aspp == config.optim.lr_decoder == 1e-3
    assert config.optim.optimizer == "adam" and config.optim.weight_decay == 1e-6
    assert config.optim.schedule == "thesis_step"
    assert (config.optim.step_size, config.optim.step_gamma) == (5, 0.95)
    assert config.model.bn_momentum == pytest.approx(0.992)
    assert config.model.width == 1.0 and tuple(config.model.aspp_rates) == (2, 3, 4)
    assert config.loss.name == "thesis_focal" and config.loss.gamma == 2
    assert tuple(config.loss.class_weights) == (0.0047, 0.225, 0.264, 0.02, 0.348, 0.136)
    data = config.data
    assert (data.crop_size, data.resize_shorter) == (128, 256)
    assert data.resize_method == "thesis_nearest" and data.normalization == "thesis_wrap"
    assert tuple(data.color_jitter) == (0.05,) * 4


def test_thesis_config_validates_every_epoch_and_documents_its_commands():
    config = thesis.get_config()
    # The notebook validates (and freezes its BatchNorm statistics) after every epoch.
    assert config.eval.every_steps == config.train.steps_per_epoch == 67
    config.train.steps_per_epoch = 10
    assert config.eval.every_steps == 10
    doc = thesis.__doc__
    assert "--format=isic2017-thesis" in doc and "--shorter_side=0" in doc
    # The notebook tested its last epoch; a converted checkpoint needs the thesis' data/eval.
    assert "evaluate --workdir=runs/thesis --checkpoint=latest" in doc
    assert "evaluate --workdir=models/thesis --config=dermseg_jax/configs/thesis.py" in doc


def test_thesis_learning_rate_steps_per_batch():
    config = thesis.get_config()
    schedule_fn = optim.create_schedule_fn(
        config.optim,
        steps_per_epoch=config.train.steps_per_epoch,
        num_train_steps=config.train.num_train_steps,
    )
    # StepLR(5, 0.95) after every batch: x0.95 every 5 batches, ~5e-8 after 1000 batches.
    assert float(schedule_fn(jnp.asarray(4))) == pytest.approx(1.0)
    assert float(schedule_fn(jnp.asarray(5))) == pytest.approx(0.95)
    assert 1e-3 * float(schedule_fn(jnp.asarray(1000))) == pytest.approx(1e-3 * 0.95**200)


def test_kernels_and_dtype_default_to_auto_where_it_pays():
    config = default.get_config()
    assert (config.model.kernels, config.model.dtype) == ("auto", "float32")
    assert "dtype" not in config.train  # one compute-dtype field: model.dtype
    # ISIC 2018 (the GPU recipe): bfloat16 compute on GPU/TPU, float32 on the CPU.
    isic = isic2018.get_config().model
    assert models.create_model(isic, platform="cuda").dtype == "bfloat16"
    assert models.create_model(isic, platform="cpu").dtype == "float32"


def test_default_fixes_the_defects():
    config = default.get_config()
    assert config.data.data_dir is None
    assert config.optim.schedule != "thesis_step"
    assert config.data.resize_method == "bilinear" and config.data.normalization != "thesis_wrap"
    assert not config.eval.thesis_protocol and config.data.eval_lesion_crop != "mask"
    assert not config.train.freeze_bn_stats_after_first_eval
    assert jax.tree.leaves(config.model.aspp_rates)


def test_configs_live_in_the_package_not_under_a_top_level_name(tmp_path):
    """Issue 14.11: installing the project must not claim the module name `configs`, which a
    user's own code may use; the configs are `dermseg_jax.configs` and load by path too."""
    import subprocess
    import sys

    (tmp_path / "configs.py").write_text("USER = True\n")  # a user's own module of that name
    code = (
        "import configs, dermseg_jax.configs.thesis as t, dermseg_jax.train as tr;"
        "print(configs.USER, t.get_config().model.width, tr._DEFAULT_CONFIG.endswith("
        "'dermseg_jax/configs/default.py'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "1.0", "True"]


def test_isic2018_recipe_keeps_what_the_ablation_measured():
    # docs/ablation_isic2018.md: each of these raised the official score; the loss did not.
    config = isic2018.get_config()
    assert config.optim.encoder_lr_without_init == 1e-3
    assert config.data.get("eval_padding", "edge") == "edge"
    assert config.eval.inference == "tiles" and config.eval.fit_thresholds
    assert config.model.presence_head and config.model.head == "sigmoid"
    assert config.eval.tta and config.loss.name == "bce_dice"
