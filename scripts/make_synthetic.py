"""Writes the built-in synthetic data set in the ISIC 2018 Task 1-2 layout.

Usage:
    python scripts/make_synthetic.py --out DIR --n 200 --seed 0 [--n-val 50] [--n-test 50]
        [--profile default|isic2018] [--size 288x384] [--fixed-size] [--num-workers 2]

The 'isic2018' profile draws ISIC-sized images (default 1000x1500) with structures at a fixed
pixel scale and the ISIC 2018 Task 2 frequencies (docs/synthetic.md). Prepare the result for
training with
    python -m dermseg_jax.data.prepare --format=synthetic --root=DIR --out=DATA_DIR
(add --shorter_side=0 to keep images larger than 1024 px at full size).
"""

import argparse
import time

from dermseg_jax import cli
from dermseg_jax.data import prepare, synthetic
from dermseg_jax.errors import UserError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--n", type=int, default=200, help="training images")
    parser.add_argument("--n-val", type=int, help="validation images (default n // 4)")
    parser.add_argument("--n-test", type=int, help="test images (default n // 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=synthetic.PROFILES, default="default")
    parser.add_argument(
        "--size", help="HEIGHTxWIDTH, e.g. 288x384 (default: the profile's, 288x384 or 1000x1500)"
    )
    parser.add_argument("--fixed-size", action="store_true", help="no +-10%% size variation")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    args = parser.parse_args(argv)
    cli.guard(lambda: _write(args), debug=args.debug, prog="make_synthetic")


def _write(args: argparse.Namespace) -> None:
    size = prepare._parse_size(args.size) if args.size else None  # prepare's --size syntax
    start = time.perf_counter()
    try:
        counts = synthetic.write_dataset(
            args.out,
            n_train=args.n,
            n_val=args.n // 4 if args.n_val is None else args.n_val,
            n_test=args.n // 4 if args.n_test is None else args.n_test,
            seed=args.seed,
            image_size=size,
            vary_size=not args.fixed_size,
            num_workers=args.num_workers,
            profile=args.profile,
        )
    except ValueError as e:  # the generator's own limits, e.g. the smallest image size
        raise UserError(f"synthetic data set (--n, --size): {e}") from e
    print(f"Wrote {counts} to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
