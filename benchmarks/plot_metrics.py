"""Plot a Lightning CSV log (metrics.csv): training loss, validation PSNR and the learning rate.

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
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps, loss = series(rows, "train/loss")
    window = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - window + 1): i + 1]) / len(loss[max(0, i - window + 1): i + 1])
              for i in range(len(loss))]
    axes[0].plot(steps, loss, alpha=0.3, label="train/loss")
    axes[0].plot(steps, smooth, label=f"mean of {window}")
    axes[0].set_yscale("log")
    for key in ("val/psnr",):
        axes[1].plot(*series(rows, key), marker="o", label=key)
    axes[2].plot(*series(rows, "train/lr"), label="train/lr")
    for axis, title in zip(axes, ("training loss", "held-out novel views: PSNR (dB)", "learning rate")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
