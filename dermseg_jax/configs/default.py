"""The embedded default: the thesis network with the fixed recipe on the built-in synthetic set.

COMMAND:
    python -m dermseg_jax.train                       # = --config=dermseg_jax/configs/default.py
    python -m dermseg_jax.train --config=dermseg_jax/configs/default.py --workdir=runs/default \
        --config.train.batch_size=16

What it fixes relative to the thesis notebook (SEED_SPEC "Defects"): warm-up then cosine decay
over the whole run (not StepLR per batch); every block trains; evaluation BatchNorm uses running
statistics; no wrap-around "normalisation"; bilinear resize; evaluation on the whole image
(automatic lesion crop, no ground-truth mask).

Sized for a CPU: on 2 cores the full-width network is far too slow (a PyTorch step on 4 images of
128x128 takes ~17 s), so this default narrows the ASPP and decoder to `width=0.125` and trains on
80x80 crops (the network needs >= 75) of lesion crops resized to a shorter side of 96; 160
training images, batch 8, 20 epochs = 400 steps. The encoder (torchvision Inception v3 stem up to
Mixed_5d) keeps its full width, so ImageNet weights still load via `init_from`.
Measured (2-core CPU, shared with a concurrent test run): `python -m dermseg_jax.train` on a
fresh cache took 9 min 45 s end to end (synthetic data generation, compile, 400 steps, two
validations); final validation jaccard/pigment_network 0.859, jaccard/mean (five structures,
thesis per-image protocol) 0.365.
On a GPU, raise `model.width` to 1.0 and `data.crop_size` to 128 for the thesis network.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """Returns the default training configuration."""
    config = ml_collections.ConfigDict()

    # Path to a model directory (`python -m dermseg_jax.convert` output: a converted torchvision
    # Inception v3 encoder or a full model) to start from; None = random init. A checkpoint in
    # the workdir always takes precedence (resume).
    config.init_from = config_dict.placeholder(str)

    config.train = train = ml_collections.ConfigDict()
    train.seed = 0
    # Global batch (all devices and processes); must be divisible by the device count.
    train.batch_size = 8
    # Number of training images per epoch of the synthetic set (see data); used for the
    # per-epoch schedule and to derive num_train_steps.
    train.num_epochs = 20
    # Optimizer steps per epoch: training images // batch size (thesis: 1590 // 24 + 1 = 67).
    train.steps_per_epoch = 0  # Set below from a reference.
    train.num_train_steps = 0  # Set below from a reference.
    train.log_every_steps = 20
    # Thesis defect 3: after the first validation BatchNorm running statistics stop updating.
    train.freeze_bn_stats_after_first_eval = False

    config.model = model = ml_collections.ConfigDict()
    model.head = "softmax"
    # Channel multiplier of the ASPP and decoder (1.0 = the thesis' 256/800/512/... channels).
    model.width = 0.125
    # Dilation rates of the three ASPP branches on the stride-8 features (thesis).
    model.aspp_rates = (2, 3, 4)
    model.dropout_rate = 0.5
    # Flax convention: weight of the old running value (= 1 - PyTorch momentum). 0.9 = PyTorch
    # default; the thesis' 0.992 adapts too slowly for short runs.
    model.bn_momentum = 0.9
    # Compute dtype ('float32' | 'bfloat16' | 'auto' = bfloat16 on GPU/TPU, float32 on the CPU);
    # parameters, optimizer state and loss stay float32 (docs/kernels.md).
    model.dtype = "float32"
    # How the layers compute: 'xla' (plain XLA ops, JAX autodiff: GPU/TPU) | 'cpu_tuned'
    # (hand-written backward passes for XLA:CPU) | 'auto' (cpu_tuned on the CPU, xla
    # elsewhere). Same parameters either way (docs/kernels.md).
    model.kernels = "auto"
    # Sigmoid head: an image-level presence logit per structure from the pooled bottleneck,
    # trained with BCE on "present in the crop"; at inference a structure's mask is emptied
    # when its presence probability is below eval.presence_threshold (dermseg_jax.presence).
    model.presence_head = False

    config.data = data = ml_collections.ConfigDict()
    # Prepared TFDS directory (`python -m dermseg_jax.data.prepare`); None = the built-in
    # synthetic set, generated once into synthetic_cache.
    data.data_dir = config_dict.placeholder(str)
    # Cache root of the synthetic set; None = $DERMSEG_CACHE or ~/.cache/dermseg_jax.
    data.synthetic_cache = config_dict.placeholder(str)
    data.synthetic_num_train = 160
    data.synthetic_num_val = 32
    data.synthetic_num_test = 32
    data.synthetic_seed = 0
    # Side of the synthetic images as generated (before the lesion crop and resize).
    data.synthetic_image_size = 128
    # Training crop to the lesion's rows and columns ('mask' | 'auto' | 'none').
    data.lesion_crop = "mask"
    # The same at evaluation; 'mask' uses the ground-truth lesion (thesis defect 4: a leak).
    data.eval_lesion_crop = "auto"
    # Shorter side after the lesion crop, and how to resize ('bilinear' | 'thesis_nearest').
    data.resize_shorter = 96
    data.resize_method = "bilinear"
    data.crop_size = 80
    data.flip = True
    # Brightness, contrast, saturation, hue jitter (thesis 0.05 each; 0 disables).
    data.color_jitter = (0.05, 0.05, 0.05, 0.05)
    # 'none' = [0, 1] | 'thesis_wrap' | 'isic' | 'imagenet'.
    data.normalization = "none"
    # At evaluation the lesion crop's longer side is resized to eval_size and padded square.
    data.eval_size = 96
    # How the square eval frame is filled beyond the crop: 'edge' repeats the crop's last row
    # and column; 'zeros' (before issue 17) makes the network see an edge it never trained on.
    data.eval_padding = "edge"
    # Normalisation at evaluation; None = `normalization` (the thesis protocol: 'none' for
    # 'thesis_wrap', whose test images were plain [0, 1]).
    data.eval_normalization = config_dict.placeholder(str)
    data.shuffle_buffer = 256
    # Keep the training views (lesion crops at the training scale) in memory after the first
    # epoch; None = when they fit in 2 GiB (docs/input_pipeline.md).
    data.cache = config_dict.placeholder(bool)

    train.steps_per_epoch = data.get_ref("synthetic_num_train") // train.get_ref("batch_size")
    train.num_train_steps = train.get_ref("num_epochs") * train.get_ref("steps_per_epoch")

    config.loss = loss = ml_collections.ConfigDict()
    # 'thesis_focal' | 'weighted_ce' | 'focal' | 'bce' | 'bce_dice' | 'bce_log_jaccard' (see
    # dermseg_jax.losses).
    loss.name = "focal"
    loss.gamma = 2.0
    loss.dice_weight = 1.0
    # 'bce_log_jaccard': BCE - jaccard_weight * log(soft Jaccard pooled over batch and structures).
    loss.jaccard_weight = 1.0
    # model.presence_head: weight of the presence BCE added to the segmentation loss.
    loss.presence_weight = 1.0
    # Softmax: per-class weights [6] (focal: alpha); sigmoid: BCE pos_weight [5].
    loss.class_weights = config_dict.placeholder(tuple)
    # With class_weights None: derive them from the training split's pixel counts (softmax:
    # normalised inverse frequency; sigmoid: sqrt(negatives / positives)), else no weights.
    loss.weights_from_data = False

    config.optim = optim = ml_collections.ConfigDict()
    # 'adam' (weight decay added to the gradient, as torch.optim.Adam) | 'adamw' (decoupled).
    optim.optimizer = "adam"
    # Peak learning rate per parameter group; 0 or None freezes the group (no update, no
    # optimizer state). l1/l2/l3 = Inception stem blocks (SEED_SPEC "Network").
    optim.lr_l1 = 1e-3
    optim.lr_l2 = 1e-3
    optim.lr_l3 = 1e-3
    optim.lr_aspp = 1e-3
    optim.lr_decoder = 1e-3
    optim.weight_decay = 1e-6
    # 'constant' | 'thesis_step' (StepLR stepped per batch: defect 2) | 'step_per_epoch' |
    # 'warmup_cosine'.
    optim.schedule = "warmup_cosine"
    # StepLR parameters (thesis_step: every step_size batches; step_per_epoch: every
    # step_size epochs).
    optim.step_size = 5
    optim.step_gamma = 0.95
    # `* 1` makes a new reference: overriding warmup_steps must not overwrite steps_per_epoch.
    optim.warmup_steps = train.get_ref("steps_per_epoch") * 1
    # Without init_from (a random encoder): lr_l1, lr_l2 and lr_l3 become this; None/0 keeps them.
    optim.encoder_lr_without_init = config_dict.placeholder(float)
    # Clip the global gradient norm of trainable parameters; None disables.
    optim.grad_clip_norm = config_dict.placeholder(float)

    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.split = "validation"
    # Evaluate every so many steps (and always at the end); 0 = only at the end.
    evaluation.every_steps = train.get_ref("steps_per_epoch") * 10
    evaluation.batch_size = 8
    # Sigmoid head: probability threshold per structure.
    evaluation.threshold = 0.5
    # Post-processing (`postprocess.decide_masks`): the thesis' per-channel morphological
    # opening, with 5 kernel sizes at eval resolution (None = the thesis' (21, 21, 15, 5, 15)).
    evaluation.opening = False
    evaluation.opening_sizes = config_dict.placeholder(tuple)
    # Flip test-time augmentation.
    evaluation.tta = False
    # model.presence_head: a structure's mask is emptied when its presence probability is
    # below this (five values, one per structure; None = no gate). `evaluate --fit-thresholds` fits it on
    # validation together with the pixel thresholds (thresholds.json).
    evaluation.presence_threshold = config_dict.placeholder(tuple)
    # 'resize': the lesion crop resized to eval_size, one pass | 'tiles': the crop at the
    # training scale (shorter side resize_shorter), overlapping tile_size tiles (None =
    # data.crop_size) sharing tile_overlap of a tile, Gaussian-blended (dermseg_jax.tiling).
    evaluation.inference = "resize"
    evaluation.tile_size = config_dict.placeholder(int)
    evaluation.tile_overlap = 0.5
    # Sigmoid head: use thresholds.json of the run/model directory (fitted on validation by
    # `evaluate --fit-thresholds`) instead of `threshold` when present.
    evaluation.fitted_thresholds = True
    # Sigmoid head: at the end of training, fit those thresholds (and the presence cut-offs)
    # on the validation split and write thresholds.json into the workdir.
    evaluation.fit_thresholds = False
    # The thesis' evaluation (defects 1, 3, 4: ground-truth lesion crop, one random crop,
    # BatchNorm on batch statistics, batch-axis softmax); see dermseg_jax.evaluator.
    evaluation.thesis_protocol = False

    config.checkpoint = ckpt = ml_collections.ConfigDict()
    ckpt.every_steps = train.get_ref("steps_per_epoch") * 10
    # Keep the last `keep` checkpoints plus the `keep_best` best by `best_metric`.
    ckpt.keep = 2
    ckpt.keep_best = 1
    ckpt.best_metric = "jaccard/mean"
    ckpt.best_mode = "max"
    return config
