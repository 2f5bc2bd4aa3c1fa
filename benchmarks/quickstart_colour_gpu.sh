#!/usr/bin/env bash
# The quickstart's 3D fine-tune (configs/lrm/quickstart_finetune_3d.yaml, from scratch) in 12-14 variants at once on
# one GPU, on 100 `solid` procedural assets; each variant's held-out scores and rendered colour spread
# (benchmarks/input_dependence.py) are appended to $OUT/summary.txt as it ends. README: "The whole pipeline".
# Usage: OUT=results [ROUND=2] bash benchmarks/quickstart_colour_gpu.sh   (the package and its dependencies
# installed; round 1: the 4-layer decoder's variants, round 2: the shipped settings' at 1,152 steps)
set -u
OUT=${OUT:-outputs/quickstart_colour}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
CLI="python3 -m vfusion3d_lightning.cli"; Q=/tmp/q; start=$(date +%s)
$CLI procedural --out $Q/train --count 100 --seed 0 --style solid --prefix asset --formats "[glb]" --progress false > /dev/null
$CLI procedural --out $Q/held --count 8 --seed 500000 --style solid --prefix held_out --formats "[glb]" --progress false > /dev/null
$CLI render --assets $Q/train --out $Q/set32 --views random32 --resolution 64 --workers 14 --shard_size 16 --progress false | tail -1
$CLI render --assets $Q/held --out $Q/held32 --views uniform32 --resolution 64 --workers 8 --shard_size 16 --progress false | tail -1
echo "data after $(( $(date +%s) - start )) s" >> $OUT/summary.txt
run() {
  local name=$1 steps=$2; shift 2
  $CLI fit --config configs/lrm/quickstart_finetune_3d.yaml --model.init_args.pretrained null \
    --data.init_args.train_shards "$Q/set32/shard-*.tar" --data.init_args.val_shards "$Q/held32/shard-*.tar" \
    --data.init_args.samples_per_epoch $steps --trainer.accelerator gpu --trainer.enable_progress_bar false \
    --trainer.enable_model_summary false --trainer.check_val_every_n_epoch 100 --trainer.default_root_dir /tmp/sw/$name "$@" > /tmp/fit_$name.txt 2>&1
  local ck=$(find /tmp/sw/$name -name last.ckpt | head -1)
  echo "$name $(( $(date +%s) - start ))s $(python3 benchmarks/input_dependence.py --lrm $ck --shards "$Q/held32/shard-*.tar" 2>&1 | tail -1)" >> $OUT/summary.txt
  [ -z "$ck" ] && tail -5 /tmp/fit_$name.txt >> $OUT/summary.txt
}
if [ "${ROUND:-1}" = 1 ]; then  # the 4-layer decoder of before: what brings colour
OP="--model.init_args.opacity_weight 0.1"
D4="--model.init_args.network.decoder_layers 4 --model.init_args.opacity_weight 1.0"
run base1536 1536 $D4 &
run op01 2304 $D4 $OP &
run dec2 2304 $OP --model.init_args.network.decoder_layers 2 &
run warm256 2304 $D4 $OP --model.init_args.warmup_steps 256 &
run tri4 2304 $D4 $OP --model.init_args.network.triplane_low_res 4 &
run wd0 2304 $D4 $OP --model.init_args.weight_decay 0.0 &
run beta99 2304 $D4 $OP --model.init_args.betas "[0.9, 0.99]" &
run tl1 2304 $D4 $OP --model.init_args.network.transformer_layers 1 &
run minlr 2304 $D4 $OP --model.init_args.min_lr_ratio 0.3 &
run op0 2304 $D4 --model.init_args.opacity_weight 0.0 &
run enc96 2304 $D4 $OP --model.init_args.network.encoder_embed_dim 96 &
run op01_3072 3072 $D4 $OP &
run dec2_1536 1536 $OP --model.init_args.network.decoder_layers 2 &
run dec2_1536_op1 1536 --model.init_args.network.decoder_layers 2 --model.init_args.opacity_weight 1.0 &
else  # round 2: the shipped 2-layer decoder and opacity weight 0.1 at the main job's 1,152 steps
run base 1152 &
run seed1 1152 --seed_everything 1 &
run seed2 1152 --seed_everything 2 &
run minlr03 1152 --model.init_args.min_lr_ratio 0.3 &
run lr5e3 1152 --model.init_args.lr 5.0e-3 &
run lr1e2 1152 --model.init_args.lr 1.0e-2 &
run op003 1152 --model.init_args.opacity_weight 0.03 &
run hid32 1152 --model.init_args.network.decoder_hidden_dim 32 &
run minlr_lr5e3 1152 --model.init_args.min_lr_ratio 0.3 --model.init_args.lr 5.0e-3 &
run minlr_seed1 1152 --model.init_args.min_lr_ratio 0.3 --seed_everything 1 &
run lr5e3_seed1 1152 --model.init_args.lr 5.0e-3 --seed_everything 1 &
run base1536 1536 &
fi
wait
echo "all done after $(( $(date +%s) - start )) s" >> $OUT/summary.txt
cat $OUT/summary.txt
