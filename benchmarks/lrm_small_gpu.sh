#!/usr/bin/env bash
# The small-LRM learning run recorded in BENCHMARKS.md, in three steps that each fit a 10-minute window:
#   bash benchmarks/lrm_small_gpu.sh data    # procedural assets -> rendered shards (train 2400, held-out 96)
#   bash benchmarks/lrm_small_gpu.sh train   # fit configs/lrm/small_gpu.yaml (resumes from last.ckpt if present;
#                                            # MAX_TIME counts training time across resumes, as Lightning's Timer does)
#   bash benchmarks/lrm_small_gpu.sh report  # final held-out validation + curves.png into $OUT (or outputs/)
set -euo pipefail
cd "$(dirname "$0")/.."
cli() { python3 -m vfusion3d_lightning.cli "$@"; }
out=${OUT:-outputs}
case "${1:-}" in
  data)
    cli procedural --out data/small/assets --count 2400
    cli procedural --out data/small/val_assets --count 96 --seed 1000000
    time cli render --assets data/small/assets --out data/small/train --views random32 --resolution 128 --workers 14 --shard_size 100
    cli render --assets data/small/val_assets --out data/small/val --views random32 --resolution 128 --workers 8 --shard_size 12
    ;;
  train)
    last=$(ls -t outputs/small_gpu/lightning_logs/version_*/checkpoints/last.ckpt 2>/dev/null | head -1 || true)
    resume=()
    [ -n "$last" ] && resume=(--ckpt_path "$last")
    cli fit --config configs/lrm/small_gpu.yaml --trainer.max_time "${MAX_TIME:-00:00:08:30}" "${resume[@]}"
    ;;
  report)
    last=$(ls -t outputs/small_gpu/lightning_logs/version_*/checkpoints/last.ckpt | head -1)
    cli validate --config configs/lrm/small_gpu.yaml --ckpt_path "$last" --trainer.logger false \
      --trainer.default_root_dir outputs/small_gpu/validate
    python3 benchmarks/plot_metrics.py $(ls -v outputs/small_gpu/lightning_logs/version_*/metrics.csv) --out "$out/curves.png"
    cp "$(ls -t outputs/small_gpu/lightning_logs/version_*/turntables/*.png | head -1)" "$out/turntable_last.png"
    ;;
  *) echo "usage: $0 data|train|report" >&2; exit 2 ;;
esac
