"""Plot a Lightning CSV log (metrics.csv): training loss, the validation metric (PSNR for the LRM, loss for
the video model) and the learning rate.

    python benchmarks/plot_metrics.py outputs/small_gpu/lightning_logs/version_0/metrics.csv --out curves.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [s for s, _ in points], [v for _, v in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.csv files, read in order (a resumed run appends)")
    parser.add_argument("--out", default="curves.png")
    args = parser.parse_args()
    rows = [row for path in args.metrics for row in csv.DictReader(open(path))]
    has_lr = any(row.get("train/lr") for row in rows)
    figure, axes = plt.subplots(1, 3 if has_lr else 2, figsize=(15 if has_lr else 10, 4))
    steps, loss = series(rows, "train/loss")
    window = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - window + 1): i + 1]) / len(loss[max(0, i - window + 1): i + 1])
              for i in range(len(loss))]
    axes[0].plot(steps, loss, alpha=0.3, label="train/loss")
    axes[0].plot(steps, smooth, label=f"mean of {window}")
    axes[0].set_yscale("log")
    val_key = "val/psnr" if any(row.get("val/psnr") for row in rows) else "val/loss"
    axes[1].plot(*series(rows, val_key), marker="o", label=val_key)
    if has_lr:
        axes[2].plot(*series(rows, "train/lr"), label="train/lr")
    val_title = "held-out novel views: PSNR (dB)" if val_key == "val/psnr" else "held-out loss"
    for axis, title in zip(axes, ("training loss", val_title, "learning rate")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
