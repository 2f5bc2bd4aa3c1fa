#!/usr/bin/env bash
# The paper's LRM ablations (configs/sweeps/paper_ablations_small_gpu.yaml) on one GPU, shortened to fit one
# 10-minute device window: COUNT procedural objects rendered like small_gpu.yaml's data, SAMPLES objects an
# epoch, epochs and stage lengths times SCALE, the 5 variants trained at once on the one GPU (n_jobs 5).
#   bash benchmarks/ablations_small_gpu.sh        # comparison.md / .png, curves.png, results.md into $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
cli() { python3 -m vfusion3d_lightning.cli "$@"; }
out=${OUT:-outputs}
COUNT=${COUNT:-800} SAMPLES=${SAMPLES:-800} SCALE=${SCALE:-0.5} JOBS=${JOBS:-5}
cli procedural --out data/abl/assets --count "$COUNT" --progress false
cli procedural --out data/abl/val_assets --count 48 --seed 1000000 --prefix held_out --progress false
time cli render --assets data/abl/assets --out data/abl/train --views random32 --resolution 128 --workers 14 \
  --shard_size 100 --progress false
cli render --assets data/abl/val_assets --out data/abl/val --views random32 --resolution 128 --workers 8 \
  --shard_size 12 --progress false
python3 benchmarks/ablations_short_sweep.py sweeps/paper_ablations_small_gpu outputs/abl/sweep.yaml \
  --scale "$SCALE" --samples "$SAMPLES" --train data/abl/train --val data/abl/val --out outputs/abl/sweep \
  --n_jobs "$JOBS"
time cli sweep --config outputs/abl/sweep.yaml --timeout 480 || true  # exits 1 when a trial failed: the table says which
mkdir -p "$out"
for f in comparison.md comparison.png curves.png results.md; do cp "outputs/abl/sweep/$f" "$out/" || true; done
nvidia-smi --query-gpu=name,memory.used --format=csv || true
