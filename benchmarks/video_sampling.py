"""Generation speed of the data engine at real sizes: orbit videos per second per GPU of `OrbitVideoPipeline`
(random weights in the public architectures' shapes, bf16), with classifier-free guidance and the VAE decode, and
from it the GPU-hours for the paper's 4 million videos.

    python benchmarks/video_sampling.py --architecture i2vgen-xl --size 512 --steps 50 --guidance 9 --batch-size 4
    python benchmarks/video_sampling.py --architecture svd-xt --size 576 --steps 25 --guidance 1 3 --batch-size 4
"""

import argparse
import json
import time

import torch

from vfusion3d_lightning.models.video import OrbitVideoPipeline, SamplerSettings, VideoDiffusionModel

PAPER_VIDEOS = 4_000_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", default="i2vgen-xl")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[9.0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = VideoDiffusionModel.build(args.architecture).to("cuda", torch.bfloat16).eval()
    settings = SamplerSettings(num_frames=args.frames, num_inference_steps=args.steps,
                               min_guidance=args.guidance[0], max_guidance=args.guidance[-1])
    pipe = OrbitVideoPipeline(model, settings)
    images = torch.rand(args.batch_size, 3, args.size, args.size, device="cuda", dtype=torch.bfloat16)
    prompts = ["a wooden chair with a red seat"] * args.batch_size
    timings = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # float32 latents into bf16 weights
        for repeat in range(args.repeats + 1):  # the first call warms up (kernels, allocator)
            torch.cuda.synchronize()
            start = time.perf_counter()
            pipe(images, prompts, list(range(args.batch_size)), progress=False)
            torch.cuda.synchronize()
            if repeat:
                timings.append(time.perf_counter() - start)
            else:
                torch.cuda.reset_peak_memory_stats()
    seconds = min(timings)
    videos_per_s = args.batch_size / seconds
    print(json.dumps({
        "architecture": args.architecture, "frames": args.frames, "size": args.size, "steps": args.steps,
        "guidance": args.guidance, "batch_size": args.batch_size, "batch_s": round(seconds, 2),
        "videos_per_s_per_gpu": round(videos_per_s, 4), "s_per_video": round(1 / videos_per_s, 2),
        "gpu_hours_for_4M": round(PAPER_VIDEOS / videos_per_s / 3600),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
