"""`infer` end to end on the CPU with its auto settings: image -> input.png, turntable, textured GLB.

    python benchmarks/infer_cpu.py [--threshold X] [--network vfusion3d] [--workdir /tmp/infer_cpu] [-- FLAGS]

Calls the function the command calls (`commands.infer.infer`) on the released-size network with random weights
(saved once with `save_pretrained` into `--workdir`, then loaded by `infer` as a checkpoint would be), on an RGBA
picture of a red box. Random weights make fog with no surface at the released threshold 1.0: the first run
then warns and suggests a threshold; pass it as `--threshold` (the time of that run is the one to quote).
Anything after `--` goes to `infer` as it would on the command line (e.g. `-- --frames 8`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vfusion3d_lightning.cli import main as cli
from vfusion3d_lightning.models.lrm import LRM, LRMConfig


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--network", default="vfusion3d")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/infer_cpu"))
    args = parser.parse_args(argv)

    weights = args.workdir / f"{args.network}-random"
    if not (weights / "model.safetensors").is_file():
        torch.manual_seed(0)
        LRM(LRMConfig.from_name(args.network)).save_pretrained(weights)
    picture = np.zeros((256, 256, 4), np.uint8)
    picture[64:192, 80:176] = (200, 40, 40, 255)
    Image.fromarray(picture, "RGBA").save(args.workdir / "box.png")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, network {args.network}", flush=True)
    start = time.perf_counter()
    code = cli(["infer", "--input", str(args.workdir / "box.png"), "--out", str(args.workdir / "out"),
                "--checkpoint", str(weights), "--device", "cpu", "--mesh_threshold", str(args.threshold), *extra])
    seconds = time.perf_counter() - start
    files = sorted((args.workdir / "out" / "box").iterdir())
    print(f"exit {code}; image -> outputs in {seconds:.1f} s (loading the weights included): "
          + ", ".join(f"{p.name} ({p.stat().st_size / 1e3:.0f} kB)" for p in files))


if __name__ == "__main__":
    main()
