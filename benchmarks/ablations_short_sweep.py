"""Write a shortened copy of a shipped ablation sweep: fewer objects an epoch and fewer epochs, the stage lengths
scaled alike, the data paths and output folder replaced. For one device window; BENCHMARKS.md says what ran.

    python benchmarks/ablations_short_sweep.py sweeps/paper_ablations_small_gpu OUT.yaml --scale 0.5 \
        --samples 800 --train data/abl/train --val data/abl/val --out outputs/abl/sweep --n_jobs 5
"""

import argparse
from pathlib import Path

import yaml

from vfusion3d_lightning import presets


def scaled(callbacks: list[dict], scale: float) -> list[dict]:
    """Callbacks with every `epochs` list scaled (at least 1 epoch a stage)."""
    out = []
    for callback in callbacks:
        args = dict(callback.get("init_args", {}))
        if "epochs" in args:
            args["epochs"] = [max(1, round(e * scale)) for e in args["epochs"]]
        out.append({**callback, "init_args": args})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep")
    parser.add_argument("target")
    parser.add_argument("--scale", type=float, required=True, help="epochs and stage lengths times this")
    parser.add_argument("--samples", type=int, required=True, help="objects an epoch")
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n_jobs", type=int, default=1)
    args = parser.parse_args()
    sweep = yaml.safe_load(presets.shipped_config(args.sweep).read_text())
    (base,) = sweep["configs"]
    config = yaml.safe_load(presets.shipped_config(base).read_text())
    epochs = max(1, round(config["trainer"]["max_epochs"] * args.scale))
    sweep["overrides"] = {**sweep.get("overrides", {}), "trainer.max_epochs": epochs,
                          "trainer.check_val_every_n_epoch": max(1, epochs // 5),
                          "trainer.callbacks": scaled(config["trainer"]["callbacks"], args.scale),
                          "data.init_args.samples_per_epoch": args.samples,
                          "data.init_args.train_shards": f"{args.train}/shard-*.tar",
                          "data.init_args.val_shards": f"{args.val}/shard-*.tar"}
    for name, variant in sweep["variants"].items():
        if "trainer.callbacks" in variant:
            sweep["variants"][name] = {**variant, "trainer.callbacks": scaled(variant["trainer.callbacks"], args.scale)}
    sweep.update(out=args.out, n_jobs=args.n_jobs)
    Path(args.target).parent.mkdir(parents=True, exist_ok=True)
    Path(args.target).write_text(yaml.safe_dump(sweep, sort_keys=False))
    print(yaml.safe_dump(sweep, sort_keys=False))


if __name__ == "__main__":
    main()
