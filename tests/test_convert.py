"""PyTorch baseline <-> Flax: numeric parity, exact round trips, converter errors and the CLI."""

import argparse
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision

from dermseg_jax import checkpointing, load_checkpoint
from dermseg_jax import convert as convert_cli
from dermseg_jax.errors import UserError
from dermseg_jax.models import (
    InceptionUNet,
    InceptionV3Encoder,
    abstract_variables,
    convert_torch,
    count_params,
)
from dermseg_jax.models.torch_baseline import InceptionUNetTorch, count_torch_params
from dermseg_jax.models.unet import scaled

jax.config.update("jax_disable_most_optimizations", True)

THESIS_CFG = dict(head="softmax", width=1.0, aspp_rates=(2, 3, 4))
NARROW_CFG = dict(head="softmax", width=0.125, aspp_rates=(2, 3, 4))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dropout has no common random stream in both frameworks: the parity model has none, and the
# PyTorch model's Dropout2d is put in eval mode for training-mode comparisons.
PARITY_MODEL = InceptionUNet(dropout_rate=0.0, bn_momentum=0.992)
_eval_fn = jax.jit(functools.partial(PARITY_MODEL.apply, train=False))
_train_fn = jax.jit(functools.partial(PARITY_MODEL.apply, train=True, mutable=["batch_stats"]))


def randomise_batchnorm(net: torch.nn.Module, seed: int) -> None:
    """Random affine parameters and running statistics, so that BN conversion errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)


def train_without_dropout(net: torch.nn.Module) -> None:
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.eval()


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def thesis_pair():
    """Full-width PyTorch baseline with random weights and BN stats, and its conversion."""
    torch.manual_seed(0)
    net = InceptionUNetTorch(width=1.0, bn_momentum=0.008)
    randomise_batchnorm(net, seed=1)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return net, state, convert_torch.torch_to_flax(state, THESIS_CFG)


@pytest.mark.parametrize("size", [128, 256])
def test_flax_logits_and_running_stats_match_pytorch(thesis_pair, size):
    net, state, variables = thesis_pair
    net.load_state_dict(state)
    x = np.random.default_rng(size).uniform(size=(2, 3, size, size)).astype(np.float32)

    net.eval()
    with torch.no_grad():
        torch_eval = nchw_to_nhwc(net(torch.from_numpy(x)).numpy())
    flax_eval = np.asarray(_eval_fn(variables, nchw_to_nhwc(x)))
    assert flax_eval.shape == (2, size, size, 6)
    np.testing.assert_allclose(flax_eval, torch_eval, rtol=0, atol=1e-4)

    train_without_dropout(net)
    with torch.no_grad():
        torch_train = nchw_to_nhwc(net(torch.from_numpy(x)).numpy())
    flax_train, updates = _train_fn(variables, nchw_to_nhwc(x))
    np.testing.assert_allclose(np.asarray(flax_train), torch_train, rtol=0, atol=1e-4)

    # PyTorch (momentum 0.008) updated its running stats in place; Flax returns them.
    new_stats = convert_torch.flax_to_torch(
        {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    )
    torch_stats = net.state_dict()
    running = [k for k in new_stats if "running_" in k]
    assert len(running) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    for key in running:
        np.testing.assert_allclose(new_stats[key], torch_stats[key].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(new_stats["l7.7.running_var"], state["l7.7.running_var"].numpy())


def test_parameter_counts_match_pytorch(thesis_pair):
    net, _, variables = thesis_pair
    assert count_torch_params(net) == count_params(variables["params"]) == 47_674_770
    narrow = InceptionUNetTorch(width=0.25, head="sigmoid")
    cfg = dict(head="sigmoid", width=0.25, aspp_rates=(2, 3, 4))
    assert count_torch_params(narrow) == count_params(abstract_variables(cfg)["params"])


def test_flax_to_torch_to_flax_is_bitwise_exact(thesis_pair):
    net, state, _ = thesis_pair
    rng = np.random.default_rng(0)
    abstract = abstract_variables(THESIS_CFG)
    variables = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract
    )
    exported = convert_torch.flax_to_torch(variables)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    back = convert_torch.torch_to_flax(net.state_dict(), THESIS_CFG)
    flat_a = jax.tree_util.tree_leaves_with_path(variables)
    flat_b = jax.tree_util.tree_leaves_with_path(back)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    net.load_state_dict(state)


def test_detects_width_and_head():
    for width, head in [(0.125, "sigmoid"), (0.3, "softmax"), (1.0, "softmax")]:
        cfg = dict(head=head, width=width, aspp_rates=(2, 3))
        state = convert_torch.flax_to_torch(abstract_like_zeros(cfg))
        detected = convert_torch.detect_model_config(state)
        assert detected["head"] == head and detected["num_aspp_branches"] == 2
        assert all(scaled(c, detected["width"]) == scaled(c, width) for c in (256, 512, 704, 800))


def abstract_like_zeros(cfg):
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(cfg))


@pytest.fixture(scope="module")
def narrow_state():
    return convert_torch.flax_to_torch(abstract_like_zeros(NARROW_CFG))


def test_missing_unexpected_and_misshapen_keys_are_named(narrow_state):
    state = dict(narrow_state)
    del state["l5.3.weight"]
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    state["a2.0.weight"] = np.zeros((7, 192, 3, 3), np.float32)
    with pytest.raises(ValueError) as info:
        convert_torch.torch_to_flax(state, NARROW_CFG, source="ckpt.tar")
    message = str(info.value)
    assert "ckpt.tar" in message
    assert "missing keys (1): l5.3.weight" in message
    assert "unexpected keys (1): decoder.extra.weight" in message
    assert "a2.0.weight: file has (7, 192, 3, 3), model wants (32, 192, 3, 3)" in message


def test_wrong_width_or_branch_count_fails_clearly(narrow_state):
    with pytest.raises(ValueError, match="shape mismatch for a1.0.weight"):
        convert_torch.torch_to_flax(narrow_state, dict(NARROW_CFG, width=0.25))
    with pytest.raises(ValueError, match="3 ASPP branches .* ask for 2"):
        convert_torch.torch_to_flax(narrow_state, dict(NARROW_CFG, aspp_rates=(2, 3)))
    odd = dict(narrow_state, **{"l7.6.weight": np.zeros((4, 32, 1, 1), np.float32)})
    with pytest.raises(ValueError, match="4 outputs; expected 6"):
        convert_torch.detect_model_config(odd)
    with pytest.raises(ValueError, match="not a thesis-format state dict"):
        convert_torch.detect_model_config({"fc.weight": np.zeros((2, 2))})


def test_inception_alias_keys_are_ignored_or_used_for_a_missing_encoder(narrow_state):
    expected = convert_torch.torch_to_flax(narrow_state, NARROW_CFG)
    # As in the thesis' checkpoints: the whole torchvision network under `inception.*`.
    aliases = {f"inception.{k}": v for k, v in torchvision_state(aux_logits=True).items()}
    with_aliases = convert_torch.torch_to_flax({**narrow_state, **aliases}, NARROW_CFG)
    np.testing.assert_equal(with_aliases, expected)
    # Without l1/l2/l3 keys the encoder comes from `inception.*`.
    no_encoder = {k: v for k, v in narrow_state.items() if not k.startswith(("l1.", "l2.", "l3."))}
    from_aliases = convert_torch.torch_to_flax({**no_encoder, **aliases}, NARROW_CFG)
    tv_encoder = convert_torch.torchvision_to_flax_encoder(torchvision_state(aux_logits=True))
    np.testing.assert_equal(from_aliases["params"]["encoder"], tv_encoder["params"]["encoder"])


@functools.cache
def _torchvision_net(aux_logits: bool) -> torch.nn.Module:
    torch.manual_seed(3)
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=aux_logits, init_weights=False
    ).eval()
    randomise_batchnorm(net, seed=4)
    return net


def torchvision_state(aux_logits: bool) -> dict:
    return {k: v.numpy() for k, v in _torchvision_net(aux_logits).state_dict().items()}


def test_torchvision_inception_file_gives_the_same_encoder_features(tmp_path):
    net = _torchvision_net(aux_logits=True)
    torch.save(net.state_dict(), tmp_path / "inception_v3.pth")
    convert_cli.convert_torchvision_inception(str(tmp_path / "inception_v3.pth"), tmp_path / "enc")
    cfg, variables = checkpointing.load_model(tmp_path / "enc")
    assert cfg.encoder_only

    x = np.random.default_rng(5).uniform(size=(2, 3, 128, 128)).astype(np.float32)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(net.children())[:10])(torch.from_numpy(x)).numpy()
    encoder_variables = {col: tree["encoder"] for col, tree in variables.items()}
    l1, l2, l3 = jax.jit(functools.partial(InceptionV3Encoder().apply, train=False))(
        encoder_variables, nchw_to_nhwc(x)
    )
    assert (l1.shape, l2.shape, l3.shape) == ((2, 61, 61, 64), (2, 28, 28, 192), (2, 13, 13, 288))
    np.testing.assert_allclose(np.asarray(l3), nchw_to_nhwc(expected), rtol=0, atol=1e-4)


def test_torchvision_converter_rejects_a_thesis_state_dict(narrow_state):
    with pytest.raises(ValueError, match="(?s)looks like a thesis checkpoint.*missing keys"):
        convert_torch.torchvision_to_flax_encoder(narrow_state, source="model.tar")


def test_unreadable_files_fail_with_the_file_name(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.txt: not a PyTorch file"):
        convert_cli.convert_thesis_checkpoint(str(text), str(tmp_path / "out"))
    no_state = tmp_path / "meta.tar"
    torch.save({"epoch": 3, "optimizer_state_dict": {}}, no_state)
    with pytest.raises(UserError, match="meta.tar is neither .* 'epoch'"):
        convert_cli.convert_thesis_checkpoint(str(no_state), str(tmp_path / "out"))
    with pytest.raises(UserError, match="absent.tar: no such file"):
        convert_cli.convert_thesis_checkpoint(str(tmp_path / "absent.tar"), str(tmp_path / "o"))


def test_pickled_objects_are_refused_naming_the_global(tmp_path):
    pickled = tmp_path / "pickled.tar"
    state = {"a.weight": torch.ones(2, 3)}
    torch.save({"model_state_dict": state, "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(UserError, match="pickled.tar: holds a pickled argparse.Namespace") as info:
        convert_cli.load_torch_file(str(pickled))
    assert "--unsafe-allow-pickle" in info.value.hint
    loaded = convert_cli.load_torch_file(str(pickled), allow_pickle=True)
    assert torch.equal(loaded["model_state_dict"]["a.weight"], state["a.weight"])


def _damaged_files(folder) -> dict[str, bytes]:
    """Files that start like torch.save output but are cut short or garbled."""
    state = {"model_state_dict": {"a.weight": torch.ones(4, 5), "b.bias": torch.zeros(3)}}
    torch.save(state, folder / "legacy.tar", _use_new_zipfile_serialization=False)
    torch.save(state, folder / "zip.tar")
    legacy = (folder / "legacy.tar").read_bytes()
    archive = (folder / "zip.tar").read_bytes()
    # Cut inside a GLOBAL name: torch.load(weights_only=True) then refuses "GLOBAL torch.Float"
    # as if the file held a pickled object.
    cut = legacy.index(b"FloatStorage") + 5
    return {
        "cut_in_a_global.tar": legacy[:cut],
        "cut_in_the_storages.tar": legacy[:-7],
        "garbled.tar": b"\x80\x02" + bytes(range(256)),
        "cut_zip.tar": archive[: len(archive) // 2],
    }


def test_damaged_files_are_called_corrupt_not_pickled(tmp_path):
    for name, data in _damaged_files(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        for allow_pickle in (False, True):
            with pytest.raises(UserError, match=f"{name}: corrupt or truncated") as info:
                convert_cli.load_torch_file(str(tmp_path / name), allow_pickle=allow_pickle)
            assert "pickle" not in (info.value.hint or "") and "\n" not in str(info.value)


def test_data_parallel_keys_and_non_finite_weights_are_reported(tmp_path, narrow_state, capsys):
    state = {k: torch.from_numpy(np.array(v)) for k, v in narrow_state.items()}
    state["l5.0.weight"][0, 0, 0, 0] = float("nan")
    state["a1.0.weight"][0, :2, 0, 0] = float("inf")
    torch.save(
        {"model_state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "dp.tar"
    )
    cfg = convert_cli.convert_thesis_checkpoint(str(tmp_path / "dp.tar"), str(tmp_path / "m"))
    assert (cfg["head"], cfg["width"]) == ("softmax", 0.125)
    err = capsys.readouterr().err
    assert "dp.tar: every key has the 'module.' prefix of a DataParallel model" in err
    assert (
        "dp.tar: non-finite values in 2 tensor(s): a1.0.weight (0 NaN, 2 inf), "
        "l5.0.weight (1 NaN, 0 inf)" in err
    )
    _, variables = checkpointing.load_model(tmp_path / "m")
    expected = convert_torch.torch_to_flax(state, NARROW_CFG)
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, variables), expected)
    mixed = {"module.l1.0.conv.weight": state["l1.0.conv.weight"], **state}
    assert convert_torch.strip_data_parallel_prefix(mixed) == (mixed, False)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dermseg_jax.convert", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_cli_help_documents_both_input_kinds(capsys):
    with pytest.raises(SystemExit) as info:
        convert_cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for needle in (
        "--torch-checkpoint",
        "model_state_dict",
        "--torchvision-inception",
        "inception_v3",
        "--to-torch",
    ):
        assert needle in out


def test_cli_converts_a_thesis_tar_both_ways(tmp_path, capsys):
    torch.manual_seed(6)
    net = InceptionUNetTorch(width=0.125, head="sigmoid")
    randomise_batchnorm(net, seed=7)
    # The thesis' .tar also holds Adam and StepLR states; weights_only loading must accept them.
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-6)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.95)
    net(torch.rand(2, 3, 128, 128)).sum().backward()
    optimizer.step()
    scheduler.step()
    checkpoint = {
        "model_state_dict": net.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "model.tar")

    result = _run_cli(
        "--torch-checkpoint", str(tmp_path / "model.tar"), "--out", str(tmp_path / "m")
    )
    assert result.returncode == 0, result.stderr
    model, variables = load_checkpoint(tmp_path / "m")
    assert (model.head, model.width, tuple(model.aspp_rates)) == ("sigmoid", 0.125, (2, 3, 4))
    x = np.random.default_rng(8).uniform(size=(1, 3, 128, 128)).astype(np.float32)
    net.eval()
    with torch.no_grad():
        expected = nchw_to_nhwc(net(torch.from_numpy(x)).numpy())
    got = jax.jit(functools.partial(model.apply, train=False))(variables, nchw_to_nhwc(x))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)

    # The other directions run in-process: same entry point, without another interpreter start.
    status = convert_cli.main(
        ["--to-torch", "--model-dir", str(tmp_path / "m"), "--out", str(tmp_path / "b.pt")]
    )
    assert status == 0 and not (tmp_path / "b.pt.partial").exists()
    exported = torch.load(tmp_path / "b.pt", map_location="cpu", weights_only=True)
    reloaded = InceptionUNetTorch(width=0.125, head="sigmoid")
    reloaded.load_state_dict(exported["model_state_dict"], strict=True)
    for key, value in net.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, exported["model_state_dict"][key]), key

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        convert_cli.main(
            ["--torch-checkpoint", str(tmp_path / "model.tar"), "--out", str(tmp_path / "m")]
        )
    assert info.value.code == 2 and "m already holds a model" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["cut_in_a_global.tar", "pickled.tar", "existing.pt"])
def test_cli_errors_are_one_line_and_keep_existing_files(tmp_path, case):
    if case == "pickled.tar":
        torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / case)
        args, expected = ["--torch-checkpoint", str(tmp_path / case)], "argparse.Namespace"
    elif case == "existing.pt":
        (tmp_path / case).write_bytes(b"keep me")
        args = ["--to-torch", "--model-dir", str(tmp_path / "m")]
        expected = "existing.pt: already exists"
    else:
        (tmp_path / case).write_bytes(_damaged_files(tmp_path)[case])
        args, expected = ["--torch-checkpoint", str(tmp_path / case)], "corrupt or truncated"
    out = tmp_path / ("existing.pt" if case == "existing.pt" else "out")
    result = _run_cli(*args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("convert: error:")]
    assert len(errors) == 1 and case in errors[0] and expected in errors[0], result.stderr
    if case == "existing.pt":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()


def test_torch_baseline_refuses_to_import_after_tensorflow():
    code = "import tensorflow\nimport dermseg_jax.models.torch_baseline\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "before tensorflow" in result.stderr
