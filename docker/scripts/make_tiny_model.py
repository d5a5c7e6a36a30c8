"""Writes the tiny random model the compose inference services serve.

  make_tiny_model.py MODEL_DIR [--arch qwen2] [--seed 0] [--dtype float32]

Idempotent: a directory already holding the same model is kept (make_tiny_model
checks its marker), so restarting the job is harmless.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from weightsync.engine.models import ARCHITECTURES, make_tiny_model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--arch", default="qwen2", choices=ARCHITECTURES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_s = time.monotonic()
    path = make_tiny_model(args.model_dir, arch=args.arch, seed=args.seed, dtype=args.dtype)
    logging.info("tiny %s model (seed %d, %s) ready in %s after %.1f s", args.arch, args.seed, args.dtype, path, time.monotonic() - start_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
