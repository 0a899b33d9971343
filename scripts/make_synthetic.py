"""Writes the built-in synthetic data set in the ISIC 2018 Task 1-2 layout.

Usage:
    python scripts/make_synthetic.py --out DIR --n 200 --seed 0 [--n-val 50] [--n-test 50]
        [--size 288x384] [--fixed-size] [--num-workers 2]

Prepare the result for training with
    python -m dermseg_jax.data.prepare --format=synthetic --root=DIR --out=DATA_DIR
"""

import argparse
import time

from dermseg_jax.data import synthetic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--n", type=int, default=200, help="training images")
    parser.add_argument("--n-val", type=int, help="validation images (default n // 4)")
    parser.add_argument("--n-test", type=int, help="test images (default n // 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size",
        default="x".join(map(str, synthetic.DEFAULT_IMAGE_SIZE)),
        help="HEIGHTxWIDTH, e.g. 288x384",
    )
    parser.add_argument("--fixed-size", action="store_true", help="no +-10%% size variation")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    start = time.perf_counter()
    counts = synthetic.write_dataset(
        args.out,
        n_train=args.n,
        n_val=args.n // 4 if args.n_val is None else args.n_val,
        n_test=args.n // 4 if args.n_test is None else args.n_test,
        seed=args.seed,
        image_size=size,
        vary_size=not args.fixed_size,
        num_workers=args.num_workers,
    )
    print(f"Wrote {counts} to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
