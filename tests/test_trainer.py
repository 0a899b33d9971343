"""Tests of `dermseg_jax.trainer` and `dermseg_jax.optim`: the optimizer (groups, freezing, torch
Adam semantics, schedules), the train step on the real (narrow) network, 1-device vs 4-device
equality and a 2-process run. Device and process set-ups run this file as a subprocess script
(`python tests/test_trainer.py <mode> ...`), since they must be fixed before JAX starts."""

import functools
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from dermseg_jax import checkpointing, optim, sharding, train_loop, trainer  # noqa: E402
from dermseg_jax.configs import default, thesis, tiny  # noqa: E402
from dermseg_jax.errors import UserError  # noqa: E402
from dermseg_jax.models.inception_v3 import L1_LAYERS, L2_LAYERS, L3_LAYERS  # noqa: E402


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _fake_params() -> dict:
    """A params tree with the model's group names (l1, l2, l3, aspp, decoder)."""
    encoder = {name: {"kernel": jnp.ones((3, 2))} for name in L1_LAYERS + L2_LAYERS + L3_LAYERS}
    return {
        "encoder": encoder,
        "aspp": {"conv": {"kernel": jnp.ones((4,))}},
        "decoder": {"conv": {"kernel": jnp.ones((5,))}},
    }


def _random_batch(n: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((n, size, size, 3), np.float32),
        "label": rng.integers(0, 6, (n, size, size)).astype(np.int32),
        "structures": rng.integers(0, 2, (n, size, size, 5)).astype(np.uint8),
        "valid": np.ones((n, size, size), np.float32),
    }


def test_frozen_groups_get_no_update_and_no_adam_state():
    optim_cfg = thesis.get_config().optim  # l1, l2 frozen.
    tx = optim.create_optimizer(optim_cfg, steps_per_epoch=67, num_train_steps=3350)
    params = _fake_params()
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    for name in L1_LAYERS + L2_LAYERS:
        np.testing.assert_array_equal(new["encoder"][name]["kernel"], 1.0)
    for name in L3_LAYERS:
        np.testing.assert_allclose(new["encoder"][name]["kernel"], 1 - 1e-5, rtol=1e-6)
    np.testing.assert_allclose(new["decoder"]["conv"]["kernel"], 1 - 1e-3, rtol=1e-6)
    # Adam moments (mu, nu) exist for the trainable leaves only.
    trainable = sum(6 for _ in L3_LAYERS) + 4 + 5
    moment_sizes = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert moment_sizes == 2 * trainable


def test_all_groups_frozen_is_an_error():
    optim_cfg = thesis.get_config().optim
    for group in optim.GROUPS:
        optim_cfg[f"lr_{group}"] = 0.0
    with pytest.raises(ValueError, match="every parameter group is frozen"):
        optim.create_optimizer(optim_cfg, steps_per_epoch=1, num_train_steps=1)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_weight_decay_matches_torch(optimizer):
    import torch

    optim_cfg = ml_collections.ConfigDict(default.get_config().optim.to_dict())
    optim_cfg.update(optimizer=optimizer, schedule="constant", warmup_steps=0, weight_decay=0.1)
    tx = optim.create_optimizer(optim_cfg, steps_per_epoch=1, num_train_steps=10)
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(5).astype(np.float32)
    grads = rng.standard_normal((4, 5)).astype(np.float32)
    params = {"decoder": {"w": jnp.asarray(w0)}}
    opt_state = tx.init(params)
    w = torch.tensor(w0, requires_grad=True)
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    torch_opt = cls([w], lr=1e-3, weight_decay=0.1)
    for g in grads:
        updates, opt_state = tx.update({"decoder": {"w": jnp.asarray(g)}}, opt_state, params)
        params = optax.apply_updates(params, updates)
        w.grad = torch.tensor(g)
        torch_opt.step()
    np.testing.assert_allclose(params["decoder"]["w"], w.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_schedules():
    optim_cfg = default.get_config().optim
    optim_cfg.update(schedule="step_per_epoch", warmup_steps=0, step_size=2, step_gamma=0.5)
    fn = optim.create_schedule_fn(optim_cfg, steps_per_epoch=10, num_train_steps=100)
    assert [float(fn(s)) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    optim_cfg.update(schedule="warmup_cosine", warmup_steps=10)
    fn = optim.create_schedule_fn(optim_cfg, steps_per_epoch=10, num_train_steps=110)
    assert float(fn(0)) == pytest.approx(0.1)
    assert float(fn(10)) == pytest.approx(1.0)
    assert float(fn(60)) == pytest.approx(0.5)
    assert float(fn(110)) == pytest.approx(0.0, abs=1e-6)
    optim_cfg.schedule = "cosine_typo"
    with pytest.raises(ValueError, match="cosine_typo"):
        optim.create_schedule_fn(optim_cfg, steps_per_epoch=10, num_train_steps=110)


def test_train_step_on_the_real_network_freezes_groups_and_updates_batch_stats():
    config = tiny.get_config()
    config.optim.lr_l1 = 0.0
    config.optim.lr_l2 = None
    mesh = sharding.make_mesh()
    size = config.data.crop_size
    with jax.set_mesh(mesh):
        state = trainer.create_train_state(config, jax.random.key(0), mesh)
        before = jax.device_get((state.params, state.batch_stats))
        step_fn = jax.jit(
            functools.partial(trainer.train_step, loss_cfg=config.loss, class_weights=None),
            donate_argnums=0,
        )
        state, metrics = step_fn(state, sharding.shard_batch(_random_batch(2, size), mesh))
        assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
        assert jax.tree.leaves(state.params)[0].dtype == jnp.float32
    params, stats = jax.device_get((state.params, state.batch_stats))

    def changed(x, y) -> bool:
        pairs = zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
        return any(not np.array_equal(a, b) for a, b in pairs)

    for name in L1_LAYERS + L2_LAYERS:
        assert not changed(before[0]["encoder"][name], params["encoder"][name]), name
    assert changed(before[0]["encoder"]["Mixed_5d"], params["encoder"]["Mixed_5d"])
    assert changed(before[0]["decoder"], params["decoder"])
    # BatchNorm statistics move even in frozen blocks (as in the thesis: frozen != eval mode).
    assert changed(before[1]["encoder"][L1_LAYERS[0]], stats["encoder"][L1_LAYERS[0]])


def test_frozen_groups_are_not_differentiated():
    config = tiny.get_config()
    config.optim.lr_l1 = 0.0
    config.optim.lr_l2 = None
    frozen = optim.frozen_groups(config.optim)
    assert frozen == ("l1", "l2")
    mesh = sharding.make_mesh()
    batch = sharding.shard_batch(_random_batch(2, config.data.crop_size), mesh)
    with jax.set_mesh(mesh):
        state = trainer.create_train_state(config, jax.random.key(0), mesh)
        step = functools.partial(
            trainer.train_step, loss_cfg=config.loss, class_weights=None, frozen_groups=frozen
        )
        hlo = jax.jit(step).lower(state, batch).compile().as_text()
        _, metrics = jax.jit(step)(state, batch)
        _, all_metrics = jax.jit(functools.partial(step, frozen_groups=()))(state, batch)
    # No backward operation of a frozen stem layer is left in the compiled step ...
    backward = "transpose(jvp(InceptionUNet))/encoder/"
    for name in L1_LAYERS + L2_LAYERS:
        assert backward + name + "/" not in hlo, name
    assert backward + "Mixed_5d/" in hlo
    # ... and the gradient norm counts the trainable groups only.
    assert 0 < float(metrics["grad_norm"]) < float(all_metrics["grad_norm"])
    np.testing.assert_allclose(metrics["loss"], all_metrics["loss"], rtol=1e-6)


def test_check_finite_names_the_step():
    train_loop.check_finite([{"loss": 1.0}, {"loss": 2.0}], first_step=5)
    with pytest.raises(
        train_loop.TrainingDiverged, match="Non-finite loss at step 6 \\(in steps 5..7\\)"
    ):
        train_loop.check_finite([{"loss": 1.0}, {"loss": np.nan}, {"loss": 1.0}], first_step=5)


@pytest.fixture(scope="module")
def tiny_state():
    config = tiny.get_config()
    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
        state = trainer.create_train_state(config, jax.random.key(0), mesh)
    return config, mesh, state


def _save(workdir, state, steps, keep=5):
    manager = checkpointing.create_checkpoint_manager(workdir, keep=keep)
    for step in steps:
        tree = trainer.state_to_checkpoint(state.replace(step=jnp.int32(step)))
        checkpointing.save_train_state(manager, step, tree)
    checkpointing.wait_for_saves(manager)
    manager.close()


def test_resume_takes_the_newest_readable_and_sets_the_damaged_aside(tiny_state, tmp_path):
    from test_loading import corrupt

    config, mesh, state = tiny_state
    _save(tmp_path, state, [1, 2])
    corrupt(tmp_path / "checkpoints" / "2")
    manager = checkpointing.create_checkpoint_manager(tmp_path, keep=5)
    with jax.set_mesh(mesh):
        resumed = trainer.resume_train_state(config, manager, mesh)
    assert int(resumed.step) == 1 and manager.all_steps() == [1]
    manager.close()
    (aside,) = (tmp_path / "damaged_checkpoints").iterdir()
    assert aside.name.startswith("2-") and (aside / "default").is_dir()


def test_resume_with_another_model_names_the_changed_field(tiny_state, tmp_path):
    config, mesh, state = tiny_state
    checkpointing.save_run_config(tmp_path, config)
    _save(tmp_path, state, [1])
    wider = tiny.get_config()
    wider.model.width = 0.125
    manager = checkpointing.create_checkpoint_manager(tmp_path)
    with pytest.raises(UserError, match="model.width 0.0625 -> 0.125: .* does not fit"):
        trainer.resume_train_state(wider, manager, mesh)
    manager.close()


def test_a_failed_validation_still_saves_its_step(tiny_state, tmp_path):
    config, mesh, state = tiny_state
    manager = checkpointing.create_checkpoint_manager(tmp_path)
    loop = train_loop._Loop(config, config.data, str(tmp_path), mesh, manager, stop=None)

    def failing(state):
        raise RuntimeError("validation broke")

    with pytest.raises(RuntimeError, match="validation broke"):
        loop._save_and_evaluate(state, 4, failing, eval_now=True)
    checkpointing.wait_for_saves(manager)
    assert manager.all_steps() == [4] and manager.best_step() is None
    manager.close()
    loop.writer.close()


def test_a_non_finite_state_is_never_saved(tiny_state, tmp_path):
    config, mesh, state = tiny_state
    manager = checkpointing.create_checkpoint_manager(tmp_path)
    loop = train_loop._Loop(config, config.data, str(tmp_path), mesh, manager, stop=None)
    loop.checked = 2
    loop._check_finite(state, {"loss": jnp.float32(1.0)}, 3)
    assert loop.checked == 3
    broken = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    with pytest.raises(
        train_loop.TrainingDiverged, match=r"at step 5 \(first in steps 4..5\); not saved"
    ):
        loop._check_finite(broken, {"loss": jnp.float32(1.0)}, 5)
    with pytest.raises(train_loop.TrainingDiverged, match="at step 6"):
        loop._check_finite(state, {"loss": jnp.float32(jnp.inf)}, 6)
    manager.close()
    loop.writer.close()


def _script(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_one_device_equals_four_devices(tmp_path):
    procs = {
        n: _script(
            "one_step",
            str(tmp_path / f"{n}.npz"),
            env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"},
        )
        for n in (1, 4)
    }
    for proc in procs.values():
        _wait(proc)
    one, four = np.load(tmp_path / "1.npz"), np.load(tmp_path / "4.npz")
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    assert set(one.files) == set(four.files)
    for key in set(one.files) - {"devices"}:
        np.testing.assert_allclose(one[key], four[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_two_processes_end_with_identical_parameters(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [
        _script(
            "two_process",
            str(i),
            port,
            str(tmp_path / "run"),
            str(tmp_path / "data"),
            str(tmp_path / f"p{i}.npz"),
        )
        for i in range(2)
    ]
    for proc in procs:
        _wait(proc)
    p0, p1 = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "p1.npz")
    assert int(p0["processes"]) == 2 and int(p0["step"]) == int(p1["step"]) > 0
    for key in p0.files:
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
    assert (tmp_path / "run" / "checkpoints" / str(int(p0["step"]))).is_dir()


def _one_step(out_path: str) -> None:
    config = tiny.get_config()
    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
        state = trainer.create_train_state(config, jax.random.key(0), mesh)
        # Plain SGD: Adam's first step is ~lr * sign(grad), which flips for gradients near 0
        # under a different reduction order; SGD shows the gradient itself.
        tx = optax.sgd(0.1)
        state = state.replace(tx=tx, opt_state=tx.init(state.params))
        step_fn = jax.jit(
            functools.partial(trainer.train_step, loss_cfg=config.loss, class_weights=None),
            donate_argnums=0,
        )
        batch = sharding.shard_batch(_random_batch(4, config.data.crop_size), mesh)
        state, metrics = step_fn(state, batch)
        out = {"params" + k: v for k, v in _flat(state.params).items()}
        out.update({"batch_stats" + k: v for k, v in _flat(state.batch_stats).items()})
        out["loss"] = np.asarray(metrics["loss"])
    np.savez(out_path, devices=jax.device_count(), **out)


def _two_process(process_id: str, port: str, workdir: str, cache: str, out_path: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(process_id)
    )
    config = tiny.get_config()
    config.data.synthetic_cache = cache
    config.train.num_epochs = 1
    config.checkpoint.every_steps = 1
    state, result = train_loop.train_and_evaluate(
        config, workdir, evaluate_fn=lambda state: {"jaccard/mean": 0.0}
    )
    params = {"params" + k: v for k, v in _flat(state.params).items()}
    np.savez(out_path, processes=jax.process_count(), step=result["step"], **params)


if __name__ == "__main__":
    {"one_step": _one_step, "two_process": _two_process}[sys.argv[1]](*sys.argv[2:])


def test_a_random_encoder_trains_at_encoder_lr_without_init():
    from dermseg_jax.configs import isic2018

    config = isic2018.get_config()
    assert config.init_from is None and config.optim.encoder_lr_without_init == 1e-3
    assert optim.apply_encoder_lr_without_init(config)
    assert [config.optim[f"lr_{g}"] for g in ("l1", "l2", "l3")] == [1e-3] * 3
    pretrained = isic2018.get_config()
    pretrained.init_from = "models/inception_v3_imagenet"
    assert not optim.apply_encoder_lr_without_init(pretrained)
    assert [pretrained.optim[f"lr_{g}"] for g in ("l1", "l2", "l3")] == [1e-5, 1e-5, 1e-4]
    for off in (None, 0.0):  # the recipe before issue 17
        before = isic2018.get_config()
        before.optim.encoder_lr_without_init = off
        assert not optim.apply_encoder_lr_without_init(before)
        assert before.optim.lr_l1 == 1e-5
