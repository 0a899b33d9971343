"""Benchmark core: the Flax network against the PyTorch baseline, same weights, same batch.

`build_pair` makes the PyTorch thesis network (`torch_baseline`) with random weights and
BatchNorm statistics and converts its state dict to Flax variables (`convert_torch`), so both
frameworks run the same numbers. `check_equivalence` compares them on one batch (inference
logits, training-mode loss and the loss after one Adam step) and raises
`EquivalenceError` when they disagree. `jax_train_step_fn` / `torch_train_step_fn` (and the
inference counterparts) return zero-argument callables that run one blocking step; the training
step is the thesis': forward with batch statistics and channel dropout, thesis focal loss with
the thesis class weights, backward, Adam (weight decay 1e-6; l3 lr 1e-5, ASPP and decoder
1e-3; l1 and l2 frozen). The JAX side is the project's own `trainer.train_step`, jitted once
with the state donated; on the PyTorch side l1/l2 get `requires_grad=False`, so neither
framework computes gradients that are thrown away. `time_interleaved` runs the variants in turn
(A B A B ...) so that a load change on a shared machine hits all of them alike.

This module imports torch (and torchvision via `torch_baseline`) and never TensorFlow.
"""

import copy
import ctypes
import functools
import os
import platform
import resource
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from configs import thesis
from dermseg_jax import losses, models, optim, sharding, trainer, xla_options
from dermseg_jax.models import convert_torch
from dermseg_jax.models.torch_baseline import InceptionUNetTorch

# Trainable thesis groups and their learning rates (configs/thesis.py; l1, l2 frozen).
TORCH_GROUP_PREFIXES = {"l3": ("l3.",), "aspp": ("a",), "decoder": ("l5.", "l6.", "l7.")}
JAX_VARIANTS = ("jax_f32", "jax_bf16", "jax_f32_xla_deconv", "jax_f32_ynn_conv")
TORCH_VARIANTS = ("torch_f32", "torch_amp_bf16", "torch_compile_f32")
VARIANTS = JAX_VARIANTS + TORCH_VARIANTS
# Variants compiled with other XLA options than the step's own (CPU): 'jax_f32_ynn_conv' runs
# the convolutions on YNNPACK, the CPU setting before XLA's own convolutions were chosen.
VARIANT_COMPILER_OPTIONS = {
    "jax_f32_ynn_conv": {
        **xla_options.CPU_TRAIN_OPTIONS,
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
        ),
    },
}


class EquivalenceError(AssertionError):
    """The two frameworks disagree on the same weights and batch."""


def training_config(width: float, dtype: str = "float32", deconv_impl: str = "subpixel"):
    """The thesis training config (`configs/thesis.py`) at a given width and compute dtype."""
    config = thesis.get_config()
    with config.unlocked():
        config.model.width = float(width)
        config.model.dtype = dtype
        config.model.deconv_impl = deconv_impl
    return config


def build_pair(width: float, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The PyTorch baseline with random weights and BN statistics, and its Flax conversion.

    Args:
        width: channel multiplier of ASPP and decoder (1.0 = the thesis network).
        seed: torch seed of the weights.

    Returns:
        (torch module on the CPU, Flax variables {'params', 'batch_stats'} as numpy arrays).
    """
    torch.manual_seed(seed)
    net = InceptionUNetTorch(width=width, bn_momentum=0.008)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Non-trivial statistics and affine terms, so that conversion errors change the output.
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    model_cfg = dict(head="softmax", width=width, aspp_rates=(2, 3, 4))
    variables = convert_torch.torch_to_flax(net.state_dict(), model_cfg, source="baseline")
    return net, variables


def make_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch: `image` float32 [B, S, S, 3] in [0, 1], `label` int32 [B, S, S] in 0..5."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    # Blocky labels, so that every class occurs with realistic spatial structure.
    coarse = rng.integers(0, 6, size=(batch, size // 8, size // 8))
    label = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2).astype(np.int32)
    return {"image": image, "label": label}


def torch_focal_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The thesis' loss in PyTorch: mean((1 - exp(-wce)) ** 2 * wce), logits [B, C, H, W]."""
    weight = torch.tensor(losses.THESIS_CLASS_WEIGHTS, device=logits.device)
    wce = torch.nn.functional.cross_entropy(logits.float(), label, weight=weight, reduction="none")
    return ((1 - torch.exp(-wce)) ** 2 * wce).mean()


def torch_optimizer(net: torch.nn.Module, config: ml_collections.ConfigDict):
    """torch Adam with the thesis groups; freezes l1, l2 (requires_grad False)."""
    groups = []
    for group, prefixes in TORCH_GROUP_PREFIXES.items():
        params = [p for n, p in net.named_parameters() if n.startswith(prefixes)]
        groups.append({"params": params, "lr": float(config.optim[f"lr_{group}"])})
    trained = {id(p) for g in groups for p in g["params"]}
    for p in net.parameters():
        p.requires_grad_(id(p) in trained)
    return torch.optim.Adam(groups, weight_decay=float(config.optim.weight_decay))


def create_train_state(config, variables: Mapping, mesh: jax.sharding.Mesh, seed: int = 0):
    """A replicated `trainer.TrainState` holding `variables` and a fresh thesis optimizer.

    Built by one jitted function straight onto the mesh, as `trainer.create_train_state` does:
    run op by op, the optimizer's initialisation compiles one small program per parameter shape
    and left ~80 MiB more RSS in the benchmark's memory worker (batch 2: 2558 against 2476 MiB).
    """
    model = models.create_model(config.model)
    tx = trainer.create_optimizer(config)

    def init(variables):
        return trainer.initial_train_state(variables, jax.random.key(seed), model, tx)

    init = jax.jit(init, out_shardings=sharding.replicated_sharding(mesh))
    return init({"params": variables["params"], "batch_stats": variables["batch_stats"]})


def jitted_train_step(config, donate: bool = True, compiler_options=None) -> Callable:
    """`trainer.train_step` for the thesis loss, jitted (the state donated unless told not to).

    `compiler_options` default to the training step's (`xla_options.train_step_options()`).
    """
    step = functools.partial(
        trainer.train_step,
        loss_cfg=config.loss,
        class_weights=jnp.asarray(losses.THESIS_CLASS_WEIGHTS, jnp.float32),
        frozen_groups=optim.frozen_groups(config.optim),
    )
    return jax.jit(
        step,
        donate_argnums=0 if donate else (),
        compiler_options=(
            xla_options.train_step_options() if compiler_options is None else compiler_options
        ),
    )


def jax_train_step_fn(
    config, variables: Mapping, batch: Mapping, mesh=None, compiler_options=None
) -> Callable:
    """Returns run() -> loss (float) doing one blocking JAX training step; `.jitted` is the fn.

    `compiler_options`: as `jitted_train_step`'s (default: the training step's own).
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    holder = {"state": create_train_state(config, variables, mesh)}
    device_batch = sharding.shard_batch(batch, mesh)
    step = jitted_train_step(config, compiler_options=compiler_options)

    def run() -> float:
        holder["state"], metrics = step(holder["state"], device_batch)
        return float(metrics["loss"])  # blocks until the step is done

    run.jitted = step
    return run


def jax_infer_fn(
    config, variables: Mapping, batch: Mapping, mesh=None, compiler_options=None
) -> Callable:
    """Returns run() doing one blocking JAX inference (running statistics) on the batch.

    `compiler_options`: XLA options of the jitted forward pass (default: none).
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    model = models.create_model(config.model)
    device_vars = jax.device_put(variables, sharding.replicated_sharding(mesh))
    image = sharding.shard_batch({"image": batch["image"]}, mesh)["image"]
    apply = jax.jit(functools.partial(model.apply, train=False), compiler_options=compiler_options)

    def run() -> None:
        apply(device_vars, image).block_until_ready()

    run.jitted = apply
    return run


def _torch_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "gpu" else "cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_train_step_fn(
    net: torch.nn.Module, config, batch: Mapping, device: str, *, amp=False, compiled=False
) -> Callable:
    """Returns run() -> loss doing one blocking PyTorch training step (on a copy of `net`).

    The copy trains in place and is `run.module`; `net` itself is left unchanged.
    """
    dev = _torch_device(device)
    net = copy.deepcopy(net).to(dev).train()
    opt = torch_optimizer(net, config)
    forward = torch.compile(net) if compiled else net
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(dev)
    y = torch.from_numpy(batch["label"]).long().to(dev)

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(x)
        loss = torch_focal_loss(logits, y)
        loss.backward()
        opt.step()
        return float(loss.detach())  # blocks (synchronises the device)

    run.module = net
    return run


def torch_infer_fn(
    net: torch.nn.Module, batch: Mapping, device: str, *, amp=False, compiled=False
) -> Callable:
    """Returns run() doing one blocking PyTorch inference (eval mode, no_grad)."""
    dev = _torch_device(device)
    net = copy.deepcopy(net).to(dev).eval()
    forward = torch.compile(net) if compiled else net
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(dev)

    def run() -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            forward(x)
        _synchronize(dev)

    return run


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def _raise_if_beyond(values: Mapping[str, float], limits: Mapping[str, float]) -> None:
    failed = {k: (values[k], v) for k, v in limits.items() if not values[k] <= v}
    if failed:
        listing = ", ".join(f"{k} = {got:.3g} > {lim:g}" for k, (got, lim) in failed.items())
        raise EquivalenceError(f"JAX and PyTorch disagree on the same weights and batch: {listing}")


def check_equivalence(
    net: torch.nn.Module,
    variables: Mapping,
    batch: Mapping,
    *,
    logits_rtol: float = 1e-3,
    loss_rtol: float = 1e-3,
) -> dict[str, float]:
    """Checks that the Flax network and the PyTorch baseline compute the same thing.

    Float32 on the CPU, dropout off (no common random stream). Compared: inference logits
    (running statistics), the training-mode loss (batch statistics) and the loss after one
    Adam step of the thesis optimizer on the same batch (which checks gradients and update).

    Args:
        net: the PyTorch baseline (not modified; a copy is used).
        variables: its Flax conversion {'params', 'batch_stats'}.
        batch: `image` [B, H, W, 3], `label` [B, H, W].
        logits_rtol: max |difference| / max |logit| allowed.
        loss_rtol: relative loss difference allowed (before and after the step).

    Returns:
        {'logits_rel_diff', 'loss_torch', 'loss_jax', 'loss_rel_diff',
        'loss_after_step_torch', 'loss_after_step_jax', 'loss_after_step_rel_diff'}.

    Raises:
        EquivalenceError: naming the quantity that differs and by how much.
    """
    width = float(net.l5[0].out_channels / 800)
    config = training_config(width)
    with config.unlocked():
        config.model.dropout_rate = 0.0
    model = models.create_model(config.model)
    net = copy.deepcopy(net).cpu()
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(batch["label"]).long()
    out = {}

    net.eval()
    with torch.no_grad():
        torch_logits = net(x).permute(0, 2, 3, 1).numpy()
    apply = jax.jit(functools.partial(model.apply, train=False))
    jax_logits = np.asarray(apply(variables, batch["image"]))
    out["logits_rel_diff"] = _relative(jax_logits, torch_logits)
    # Fail before compiling the training step when the forward passes already disagree.
    _raise_if_beyond(out, {"logits_rel_diff": logits_rtol})

    net.train()
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout2d):
            module.eval()
    opt = torch_optimizer(net, config)
    loss = torch_focal_loss(net(x), y)
    loss.backward()
    opt.step()
    with torch.no_grad():
        out["loss_after_step_torch"] = float(torch_focal_loss(net(x), y))
    out["loss_torch"] = float(loss.detach())

    mesh = sharding.make_mesh()
    state = create_train_state(config, variables, mesh)
    step = jitted_train_step(config, donate=False)
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    out["loss_jax"] = float(metrics["loss"])
    _, metrics = step(state, sharding.shard_batch(batch, mesh))
    out["loss_after_step_jax"] = float(metrics["loss"])
    for key in ("loss", "loss_after_step"):
        t, j = out[f"{key}_torch"], out[f"{key}_jax"]
        out[f"{key}_rel_diff"] = abs(t - j) / max(abs(t), 1e-12)

    _raise_if_beyond(out, {"loss_rel_diff": loss_rtol, "loss_after_step_rel_diff": loss_rtol})
    return out


def time_interleaved(
    fns: Mapping[str, Callable], rounds: int, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per step of each callable, measured in turn (A B A B ...), `rounds` times.

    Args:
        fns: name -> run() doing one blocking step (already warmed up).
        rounds: interleaved rounds.
        inner: steps per timing (the mean of `inner` back-to-back steps is one sample).

    Returns:
        name -> `rounds` samples of seconds per step.
    """
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux's VmHWM (reset by exec); `ru_maxrss` is not used because a child started with
    fork + exec inherits its parent's value as a floor.
    """
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# Dense peak TFLOP/s by (device name fragment, compute dtype), from the vendors' data sheets
# (SXM parts, no sparsity); `scripts/benchmark.py --peak-tflops` overrides.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0,
    ("H200", "float32"): 67.0,
    ("H100", "bfloat16"): 989.0,
    ("H100", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0,
    ("A100", "float32"): 19.5,
}


def forward_flops(net: torch.nn.Module, size: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one size x size image through the network's convolutions.

    Counted from the layers' shapes with forward hooks (Conv2d: output elements x C_in x k x k;
    ConvTranspose2d: input elements x C_out x k x k, the multiplications that are not by inserted
    zeros). Normalisation, activations and the loss are left out (< 1 %). A training step is
    counted as 3x its forward pass (forward, input and weight gradients: the usual model-FLOPs
    convention for MFU, frozen layers included).
    """
    macs = []

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        if isinstance(module, torch.nn.ConvTranspose2d):
            x = inputs[0]
            macs.append(x[0].numel() * module.out_channels * kh * kw / module.groups)
        else:
            per_output = module.in_channels // module.groups * kh * kw
            macs.append(output[0].numel() * per_output)

    layers = [
        m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size))
        net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return 2.0 * float(sum(macs))


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The data-sheet peak of a known accelerator for a compute dtype, else None."""
    for (fragment, kind), value in PEAK_TFLOPS.items():
        if fragment in device_name and kind == dtype:
            return value
    return None


def release_free_heap() -> None:
    """Returns freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Compilation (XLA) and model building free much more memory than they keep; glibc holds the
    freed pages in the process, where they would count as the next step's memory.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS; False where unsupported.

    Linux >= 4.0: writing 5 to /proc/self/clear_refs. Lets a step's own peak be told apart from
    the (larger, one-off) peak of compiling it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_peak_memory(framework: str) -> int | None:
    """Peak accelerator memory of a framework in this process (None on the CPU)."""
    if framework == "torch":
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def machine_description(device: str) -> dict:
    """CPU model, core count, library versions, devices and XLA flags."""
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
    except (OSError, StopIteration):
        pass
    jax_device = jax.devices()[0]
    info = {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": __import__("flax").__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "jax_devices": f"{jax.device_count()} x {jax_device.device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if device == "gpu" and torch.cuda.is_available():
        info["torch_device"] = torch.cuda.get_device_name(0)
    return info
