#!/usr/bin/env bash
# From-scratch video model on procedural orbits (configs/video/small_gpu.yaml), then orbits generated for
# held-out objects from their first view, as a grid PNG.
# Usage: benchmarks/video_orbit_gpu.sh [OUT] [MAX_TIME] [RESOLUTION] [BATCH_SIZE]
set -euo pipefail
OUT=${1:-outputs/video_gpu}
MAX_TIME=${2:-00:00:06:00}
RES=${3:-32}
BATCH=${4:-32}
CLI="python3 -m vfusion3d_lightning.cli"
[ -d "$OUT/assets" ] || $CLI procedural --out "$OUT/assets" --count 1200 --seed 0 --formats "[glb]" > /dev/null
$CLI render --assets "$OUT/assets" --out "$OUT/train" --views orbit16 --resolution "$RES" --workers 16 --shard_size 50 2>&1 | tail -1
[ -d "$OUT/val_assets" ] || $CLI procedural --out "$OUT/val_assets" --count 32 --seed 12345 --formats "[glb]" > /dev/null
$CLI render --assets "$OUT/val_assets" --out "$OUT/val" --views orbit16 --resolution "$RES" --workers 8 --shard_size 32 2>&1 | tail -1
$CLI fit --config configs/video/small_gpu.yaml --trainer.default_root_dir "$OUT/run" \
  --trainer.max_time "$MAX_TIME" --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$OUT/run" \
  --data.init_args.train_shards "$OUT/train/shard-*.tar" --data.init_args.val_shards "$OUT/val/shard-*.tar" \
  --data.init_args.frame_size "$RES" --data.init_args.batch_size "$BATCH" \
  --data.init_args.val_samples "$BATCH"
python3 benchmarks/video_first_frames.py "$OUT/val" "$OUT/val_inputs"
CKPT=$(ls -t "$OUT"/run/lightning_logs/version_*/checkpoints/last.ckpt | head -1)
$CLI generate --model "$CKPT" --inputs "$OUT/val_inputs" --out "$OUT/generated" --size "$RES" --steps 25 \
  --guidance "[1.0, 2.0]" --batch_size 8 --background alpha --border_ratio null
python3 benchmarks/video_first_frames.py "$OUT/val" "$OUT/val_inputs" --grid "$OUT/generated" "$OUT/orbits.png"
