"""First views of orbit shards as generation inputs (PNG + prompt .txt), and a grid comparing generated
orbits with the ground truth.

    python benchmarks/video_first_frames.py SHARDS_DIR INPUTS_DIR                    # write inputs
    python benchmarks/video_first_frames.py SHARDS_DIR INPUTS_DIR --grid GEN_DIR OUT.png
"""

import argparse
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from vfusion3d_lightning.data.schema import complete_shards, decode_sample
from vfusion3d_lightning.io import on_white
from vfusion3d_lightning.training.video_diffusion import orbit_grid


def samples(folder: str) -> dict:
    return {s.key: s for s in map(decode_sample, wds.WebDataset([str(p) for p in complete_shards(folder)],
                                                                shardshuffle=False))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("inputs")
    parser.add_argument("--grid", nargs=2, metavar=("GENERATED", "PNG"))
    args = parser.parse_args()
    truth = samples(args.shards)
    if args.grid is None:
        Path(args.inputs).mkdir(parents=True, exist_ok=True)
        for key, sample in truth.items():
            Image.fromarray(sample.images[0]).save(Path(args.inputs) / f"{key}.png")
            (Path(args.inputs) / f"{key}.txt").write_text(sample.prompt or "")
        print(f"wrote {len(truth)} condition images to {args.inputs}")
        return
    generated = samples(args.grid[0])
    rows = []
    for key in sorted(generated):
        rows += [on_white(truth[key].images), on_white(generated[key].images)]
    Image.fromarray(orbit_grid(torch.stack(rows))).save(args.grid[1])
    print(f"{len(generated)} generated orbits (each under its ground truth) -> {args.grid[1]}")


if __name__ == "__main__":
    main()
