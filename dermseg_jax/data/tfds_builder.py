"""The TFDS builder that writes prepared shards from any of the raw layouts.

`DermsegStructures` is a `GeneratorBasedBuilder` with one BuilderConfig per raw format
(`isic2018`, `isic2017_thesis`, `synthetic`); the raw root is TFDS' manual directory. Features
(docs/design.md, "Data"):

- `id`: Text.
- `image`: Image uint8 [None, None, 3], JPEG. The source file is stored byte for byte when it
  is kept at full size, else the downscaled image is re-encoded at quality 95, 4:4:4 chroma.
  Decode with `tf.io.decode_jpeg(..., dct_method='INTEGER_ACCURATE')` (e.g. through
  `decoders={'image': tfds.decode.SkipDecoding()}`) to get OpenCV's pixels exactly; TF's
  default fast IDCT is off by up to ~12 grey levels.
- `structures`: Tensor uint8 [None, None, 5], zlib. `lesion`: Tensor uint8 [None, None, 1],
  zlib (zeros where the layout has no lesion mask). `has_lesion_mask`: bool.
- `original_height`, `original_width`: int32, the source image size.

The written directory is read with `tfds.builder_from_directory`, without this module.
Examples are decoded by a thread pool (cv2 and zlib release the GIL). While writing, the
builder accumulates per-split pixel statistics in `class_counts` (see `count_example`).
"""

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from dermseg_jax import labels
from dermseg_jax.data import sources

DATASET_VERSION = "1.0.0"
JPEG_QUALITY = 95
# Format names as the CLI spells them -> BuilderConfig names (TFDS names are identifiers).
CONFIG_NAMES = {
    "isic2018": "isic2018",
    "isic2017-thesis": "isic2017_thesis",
    "synthetic": "synthetic",
}


def count_example(example: sources.Example) -> dict[str, Any]:
    """Pixel statistics of one example, summed over a split into `class_counts.json`.

    Args:
        example: a decoded example.

    Returns:
        dict of numpy counts: `class_pixels` [6] (softmax classes, `labels.label_from_structures`,
        whole image), `class_pixels_lesion_crop` [6] (inside the lesion's rows and columns, the
        thesis' training crop; the whole image without a lesion mask), `structure_pixels` [5],
        `structure_images` [5], `lesion_pixels`, `lesion_mask_images`, `total_pixels`, `images`.
    """
    label = labels.label_from_structures(example.structures)
    crop = label
    if example.lesion is not None and example.lesion.any():
        rows, cols = np.flatnonzero(example.lesion.any(1)), np.flatnonzero(example.lesion.any(0))
        crop = label[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    per_structure = example.structures.reshape(-1, labels.NUM_STRUCTURES).sum(0, dtype=np.int64)
    return {
        "images": 1,
        "total_pixels": label.size,
        "class_pixels": np.bincount(label.ravel(), minlength=labels.NUM_CLASSES),
        "class_pixels_lesion_crop": np.bincount(crop.ravel(), minlength=labels.NUM_CLASSES),
        "structure_pixels": per_structure,
        "structure_images": (per_structure > 0).astype(np.int64),
        "lesion_pixels": int(example.lesion.sum()) if example.lesion is not None else 0,
        "lesion_mask_images": int(example.lesion is not None),
    }


def _add_counts(total: dict[str, Any], counts: Mapping[str, Any]) -> None:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def encode_jpeg(image: np.ndarray) -> bytes:
    """Encodes uint8 [H, W, 3] RGB as JPEG at `JPEG_QUALITY`, 4:4:4 chroma."""
    # 4:4:4 chroma keeps the colour edges of structures that 4:2:0 would blur.
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        JPEG_QUALITY,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    ]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def to_features(example: sources.Example) -> dict[str, Any]:
    """The feature dict of one example (image as JPEG bytes, masks as arrays)."""
    height, width = example.image.shape[:2]
    lesion = example.lesion if example.lesion is not None else np.zeros((height, width), np.uint8)
    return {
        "id": example.id,
        "image": example.jpeg_bytes or encode_jpeg(example.image),
        "structures": np.ascontiguousarray(example.structures, np.uint8),
        "lesion": lesion[..., None].astype(np.uint8),
        "has_lesion_mask": example.lesion is not None,
        "original_height": np.int32(example.original_size[0]),
        "original_width": np.int32(example.original_size[1]),
    }


class DermsegConfig(tfds.core.BuilderConfig):
    """One raw layout; `fmt` is its `sources.FORMATS` name."""

    def __init__(self, *, fmt: str, **kwargs):
        super().__init__(**kwargs)
        self.fmt = fmt


class DermsegStructures(tfds.core.GeneratorBasedBuilder):
    """Dermoscopic structure segmentation (ISIC 2017 Part 2 / ISIC 2018 Task 2 / synthetic)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Prepared by dermseg_jax.data.prepare."}
    BUILDER_CONFIGS = [
        DermsegConfig(name=name, fmt=fmt, description=f"The {fmt} layout.")
        for fmt, name in CONFIG_NAMES.items()
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at the raw root: the ISIC 2018 Task 1-2 release, the thesis' ISIC 2017 "
        "layout, or a folder written by scripts/make_synthetic.py (see dermseg_jax.data.sources)."
    )

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS' default looks the package up through `importlib_resources`, which is not a
        # dependency of this project; this file is the answer it would find.
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        refs: Mapping[str, Sequence[sources.ExampleRef]] | None = None,
        task1_dir: str | os.PathLike | None = None,
        splits_dir: str | os.PathLike | None = None,
        shorter_side: int | None = sources.DEFAULT_SHORTER_SIDE,
        allow_non_rgb: bool = False,
        skip_bad: bool = False,
        num_workers: int = 4,
        **kwargs,
    ):
        """Creates the builder.

        Args:
            refs: examples per split, e.g. already validated by `sources.validate_examples`;
                None lists every split present under the manual directory.
            task1_dir, splits_dir: as in `sources.list_examples`.
            shorter_side, allow_non_rgb: as in `sources.read_example`.
            skip_bad: skip bad examples (listed in `skipped`) instead of raising.
            num_workers: decoding threads.
            **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (`config`, `data_dir`, ...).
        """
        super().__init__(**kwargs)
        self._refs = refs
        self._options = {"task1_dir": task1_dir, "splits_dir": splits_dir}
        self._read = {"shorter_side": shorter_side, "allow_non_rgb": allow_non_rgb}
        self._skip_bad = skip_bad
        self._num_workers = num_workers
        self.class_counts: dict[str, dict[str, Any]] = {}
        # Per split, one "file: problem" line per example skipped under skip_bad.
        self.skipped: dict[str, list[str]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        zlib = tfds.features.Encoding.ZLIB
        return self.dataset_info_from_configs(
            description=(
                "Dermoscopic structures (milia-like cysts, negative network, pigment network, "
                "streaks, globules) as multi-label masks, with lesion masks where available."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(
                        shape=(None, None, 3), dtype=np.uint8, encoding_format="jpeg"
                    ),
                    "structures": tfds.features.Tensor(
                        shape=(None, None, labels.NUM_STRUCTURES), dtype=np.uint8, encoding=zlib
                    ),
                    "lesion": tfds.features.Tensor(
                        shape=(None, None, 1), dtype=np.uint8, encoding=zlib
                    ),
                    "has_lesion_mask": tfds.features.Scalar(dtype=np.bool_),
                    "original_height": tfds.features.Scalar(dtype=np.int32),
                    "original_width": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        refs = self._refs
        if refs is None:
            fmt, root = self.builder_config.fmt, dl_manager.manual_dir
            refs = {
                split: sources.list_examples(fmt, root, split, **self._options)
                for split in sources.available_splits(fmt, root)
            }
        if not refs:
            raise sources.DataError(f"{dl_manager.manual_dir}: no split found")
        for split_refs in refs.values():
            sources.check_unique_ids(split_refs)  # TFDS would fail only when finalising
        return {
            split: self._generate_examples(split, split_refs) for split, split_refs in refs.items()
        }

    def _generate_examples(
        self, split: str, refs: Sequence[sources.ExampleRef]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        def encode(ref):
            example = sources.read_example(ref, **self._read)
            return to_features(example), count_example(example)

        totals = self.class_counts.setdefault(split, {})
        skipped = self.skipped.setdefault(split, [])
        for ref, result in zip(
            refs, sources.parallel_map(encode, refs, self._num_workers), strict=True
        ):
            if isinstance(result, sources.DataError) and self._skip_bad:
                logging.warning("Skipping bad example: %s", result)
                skipped.append(str(result))
                continue
            if isinstance(result, Exception):
                raise result
            features, counts = result
            _add_counts(totals, counts)
            yield ref.id, features
        if skipped:
            logging.warning("Skipped %d of %d bad %s examples", len(skipped), len(refs), split)
