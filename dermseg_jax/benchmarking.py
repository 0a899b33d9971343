"""Benchmark core: the Flax network against the PyTorch baseline, same weights, same batch.

Why: speed claims against the thesis' PyTorch code are only fair on the same numbers.
`build_pair` makes the PyTorch thesis network with random weights and BatchNorm statistics and
its Flax conversion; `check_equivalence` compares both on one batch (logits, training loss, loss
after one Adam step). The `*_step_fn`s return callables that run one blocking step of the
thesis' training (batch statistics, dropout, thesis focal loss, Adam with l1/l2 frozen; JAX: the
trainer's own `train_step`, jitted once, state donated) or inference; `time_interleaved` runs
variants in turn (A B A B ...) so load changes on a shared machine hit all alike.
On a GPU both sides get their fast settings: PyTorch channels_last with `cudnn.benchmark`, JAX
both kernel sets (`config.model.kernels`) in float32 and bfloat16. The thesis config is an
argument (scripts build it from `dermseg_jax/configs/thesis.py`). Imports torch, never TensorFlow.
"""

import copy
import functools
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from dermseg_jax import losses, models, optim, sharding, trainer, xla_options
from dermseg_jax.models import convert_torch
from dermseg_jax.models.torch_baseline import InceptionUNetTorch

# Trainable thesis groups and their learning rates (dermseg_jax/configs/thesis.py; l1, l2 frozen).
TORCH_GROUP_PREFIXES = {"l3": ("l3.",), "aspp": ("a",), "decoder": ("l5.", "l6.", "l7.")}
# JAX: compute dtype x `model.kernels` (no suffix: 'auto', the platform's choice).
JAX_VARIANTS = tuple(
    f"jax_{dtype}{suffix}" for suffix in ("", "_xla", "_cpu_tuned") for dtype in ("f32", "bf16")
)
TORCH_VARIANTS = ("torch_f32", "torch_amp_bf16", "torch_compile_f32", "torch_compile_amp_bf16")
VARIANTS = JAX_VARIANTS + TORCH_VARIANTS


def variant_settings(variant: str) -> dict:
    """What a variant name means: framework, compute dtype, JAX kernels, PyTorch AMP/compile."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    kernels = next((k for k in ("xla", "cpu_tuned") if variant.endswith(f"_{k}")), "auto")
    return {
        "framework": variant.split("_")[0],
        "dtype": "bfloat16" if "bf16" in variant else "float32",
        "kernels": kernels if variant.startswith("jax") else None,
        "amp": "amp_bf16" in variant,
        "compiled": "compile" in variant,
    }


class EquivalenceError(AssertionError):
    """The two frameworks disagree on the same weights and batch."""


def training_config(
    base: ml_collections.ConfigDict, width: float, dtype: str = "float32", kernels: str = "auto"
) -> ml_collections.ConfigDict:
    """A copy of the thesis training config `base` at a width, compute dtype and kernel set."""
    config = copy.deepcopy(base)
    with config.unlocked():
        config.model.width = float(width)
        config.model.dtype = dtype
        config.model.kernels = kernels
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


def replicated_train_state(config, variables: Mapping, mesh: jax.sharding.Mesh, seed: int = 0):
    """A replicated `trainer.TrainState` holding `variables` and a fresh thesis optimizer.

    Built by one jitted function straight onto the mesh, as `trainer.create_train_state` does:
    run op by op, the optimizer's initialisation compiles one small program per parameter shape
    and left ~80 MiB more RSS in the benchmark's memory worker (batch 2: 2558 against 2476 MiB).
    """
    model = models.create_model(config.model)
    tx = trainer.run_optimizer(config)

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
    if compiler_options is None:
        compiler_options = xla_options.train_step_options()
    return jax.jit(step, donate_argnums=0 if donate else (), compiler_options=compiler_options)


def jax_train_step_fn(config, variables: Mapping, batch: Mapping, mesh=None) -> Callable:
    """Returns run() -> loss (float) doing one blocking JAX training step; `.jitted` is the
    jitted step and `.args()` its current (state, batch) arguments."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    holder = {"state": replicated_train_state(config, variables, mesh)}
    device_batch = sharding.shard_batch(batch, mesh)
    step = jitted_train_step(config)

    def run() -> float:
        holder["state"], metrics = step(holder["state"], device_batch)
        return float(metrics["loss"])  # blocks until the step is done

    run.jitted = step
    run.args = lambda: (holder["state"], device_batch)
    return run


def jax_infer_fn(config, variables: Mapping, batch: Mapping, mesh=None) -> Callable:
    """Returns run() doing one blocking JAX inference (running statistics) on the batch."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    model = models.create_model(config.model)
    device_vars = jax.device_put(variables, sharding.replicated_sharding(mesh))
    image = sharding.shard_batch({"image": batch["image"]}, mesh)["image"]
    apply = jax.jit(functools.partial(model.apply, train=False))

    def run() -> None:
        apply(device_vars, image).block_until_ready()

    run.jitted = apply
    run.args = lambda: (device_vars, image)
    return run


def _torch_on_device(net: torch.nn.Module, image: np.ndarray, device: str):
    """A copy of `net` and the NCHW image on the device; on a GPU channels_last + cudnn.benchmark.

    PyTorch's fast GPU settings for convolutions: NHWC memory (tensor-core kernels without
    layout transposes) and cuDNN's per-shape algorithm search. Recorded by the scripts.
    """
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    net = copy.deepcopy(net).to(dev)
    x = torch.from_numpy(image).permute(0, 3, 1, 2).to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        net = net.to(memory_format=torch.channels_last)
        return net, x.contiguous(memory_format=torch.channels_last), dev
    return net, x.contiguous(), dev


def torch_train_step_fn(
    net: torch.nn.Module, config, batch: Mapping, device: str, *, amp=False, compiled=False
) -> Callable:
    """Returns run() -> loss doing one blocking PyTorch training step (on a copy of `net`).

    The copy trains in place and is `run.module`; `net` itself is left unchanged.
    """
    net, x, dev = _torch_on_device(net, batch["image"], device)
    net.train()
    opt = torch_optimizer(net, config)
    forward = torch.compile(net) if compiled else net
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
    net, x, dev = _torch_on_device(net, batch["image"], device)
    net.eval()
    forward = torch.compile(net) if compiled else net

    def run() -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            forward(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()

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
    base_config: ml_collections.ConfigDict,
    *,
    device: str = "cpu",
    kernels: str = "auto",
    logits_rtol: float = 1e-3,
    loss_rtol: float = 1e-3,
) -> dict[str, float]:
    """Checks that the Flax network and the PyTorch baseline compute the same thing.

    Float32, dropout off (no common random stream); PyTorch on `device`, JAX on its default
    backend (on a GPU, turn TF32 off in both first for a tight tolerance). Compared: inference logits
    (running statistics), the training-mode loss (batch statistics) and the loss after one
    Adam step of the thesis optimizer on the same batch (which checks gradients and update).

    Args:
        net: the PyTorch baseline (not modified; a copy is used).
        variables: its Flax conversion {'params', 'batch_stats'}.
        batch: `image` [B, H, W, 3], `label` [B, H, W].
        base_config: the thesis training config (`dermseg_jax/configs/thesis.py`).
        device: 'cpu' | 'gpu', where PyTorch runs.
        kernels: JAX's `model.kernels`.
        logits_rtol: max |difference| / max |logit| allowed.
        loss_rtol: relative loss difference allowed (before and after the step).

    Returns:
        {'logits_rel_diff', 'loss_torch', 'loss_jax', 'loss_rel_diff',
        'loss_after_step_torch', 'loss_after_step_jax', 'loss_after_step_rel_diff'}.

    Raises:
        EquivalenceError: naming the quantity that differs and by how much.
    """
    width = float(net.l5[0].out_channels / 800)
    config = training_config(base_config, width, kernels=kernels)
    with config.unlocked():
        config.model.dropout_rate = 0.0
    model = models.create_model(config.model)
    net, x, dev = _torch_on_device(net, batch["image"], device)
    y = torch.from_numpy(batch["label"]).long().to(dev)
    out = {}

    net.eval()
    with torch.no_grad():
        torch_logits = net(x).permute(0, 2, 3, 1).float().cpu().numpy()
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
    state = replicated_train_state(config, variables, mesh)
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
