"""Training speed and peak memory of VideoDiffusionModule at real sizes (random weights in the public
architectures' shapes): forward + backward + AdamW over the temporal layers, bf16 autocast.

    python benchmarks/video_train_step.py --architecture svd-xt --size 576 --frames 16 --checkpointing
"""

import argparse
import json
import time

import torch

from vfusion3d_lightning.training import VideoDiffusionModule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", default="svd-xt")
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    module = VideoDiffusionModule(model=args.architecture, gradient_checkpointing=args.checkpointing).cuda()
    params = [p for p in module.model.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batch = {"frames": torch.rand(args.batch_size, args.frames, 3, args.size, args.size, device="cuda"),
             "prompt": ["an orbit around an object"] * args.batch_size}
    timings = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module._loss(batch, dropout=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            timings.append(time.perf_counter() - start)
        if step == args.warmup - 1:
            torch.cuda.reset_peak_memory_stats()
    seconds = sorted(timings)[len(timings) // 2]
    print(json.dumps({
        "architecture": args.architecture, "frames": args.frames, "size": args.size, "batch_size": args.batch_size,
        "gradient_checkpointing": args.checkpointing, "trained_params": module.trained, "unet_params": module.total,
        "step_s_median": round(seconds, 3), "samples_per_s": round(args.batch_size / seconds, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
