"""LRM training step speed, FLOPs and MFU of the `vfusion3d` config, released-style and ours, per batch size.

    python benchmarks/lrm_train_step.py [--batch-sizes 1 2 4 8 16 32] [--steps 10]
        [--checkpointing [all|network|selective]] [--recompute-blocks 8] [--max-rays 16384] [--unfused]
        [--torch-composite] [--compile] [--sync-check] [--profile | --breakdown]

One step of `LRMModule.training_step` as Lightning runs it (bf16-mixed, AdamW, LPIPS-VGG with a random trunk,
opacity loss): 512 px input, 4 supervision views rendered as 128x128 patches of a 384 px render. Released-
style: the released decoder computation (concatenated features through the whole MLP); ours: planes
projected by the decoder's first layer once. Model FLOPs a step are counted by torch's FlopCounterMode on the
same step (forward and backward; matmuls, convolutions, attention); MFU is achieved FLOP/s over the GPU's
dense bf16 peak. Timing: median step time over `--steps` steps after 3 warm-up steps. Ours is also given as a
multiple of the released style's samples/s at its best batch so far (the largest its memory allowed).
`--sync-check` runs the steps after the warm-up under `torch.cuda.set_sync_debug_mode("warn")` and prints
where the step waited on the GPU (a host-device synchronisation), if anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import Counter

import lightning as L
import torch
from timing import cuda_ms
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.flop_counter import FlopCounterMode

from vfusion3d_lightning import presets
from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
from vfusion3d_lightning.models.lrm import LRMConfig
from vfusion3d_lightning.models.lrm import renderer as renderer_module
from vfusion3d_lightning.training import LRMModule
from vfusion3d_lightning.training.losses import lpips_loss, opacity_loss

# dense bf16 tensor-core peaks, FLOP/s
PEAKS = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the CPU runs the tiny preset, to check the script


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_flops() -> float:
    if not CUDA:
        return float("nan")
    name = torch.cuda.get_device_name()
    for key, value in PEAKS.items():
        if key in name:
            return value
    raise SystemExit(f"no bf16 peak known for {name}; add it to PEAKS")


def synthetic_batch(batch_size: int, input_size: int, views: int = 4, size: int = 384) -> dict[str, torch.Tensor]:
    cameras = turntable_cameras(views)
    return {"input_image": torch.rand(batch_size, 3, input_size, input_size),
            "source_camera": canonical_source_camera(batch_size),
            "target_images": torch.rand(batch_size, views, 3, size, size),
            "target_masks": (torch.rand(batch_size, views, 1, size, size) > 0.5).float(),
            "render_cameras": cameras[None].expand(batch_size, -1, -1).contiguous()}


class Repeat(IterableDataset):
    """The same batch forever: the step, not data loading, is measured (benchmarks/data_decode.py does that)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        self.times.append(time.perf_counter() - self.start)


class SyncCheck(L.Callback):
    """Records torch's warnings of synchronising CUDA calls during the steps after `warmup`."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.places: Counter[str] = Counter()
        self.recorder = None
        self.records: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.recorder = warnings.catch_warnings(record=True)
            self.records = self.recorder.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.recorder is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self.recorder.__exit__(None, None, None)
        self.recorder = None
        for record in self.records:
            if "synchroniz" in str(record.message):
                self.places[f"{record.filename}:{record.lineno}"] += 1


def module(config: LRMConfig, project: bool, checkpointing: str | None, max_rays: int | None = None,
           fused: bool = False, compile_network: bool = False, recompute_blocks: int | None = None) -> LRMModule:
    m = LRMModule(network=config, lr=4e-4, warmup_steps=0, render_size=384, patch_size=128,
                  lpips_random_backbone=True, turntable_frames=0, max_rays=max_rays, compile_network=compile_network,
                  gradient_checkpointing={None: False, "all": True}.get(checkpointing, checkpointing),
                  recompute_blocks=recompute_blocks)
    m.model.renderer.project_planes = project
    m.model.renderer.fused_training = fused and project
    return m


def forward_backward(m: LRMModule, batch: dict[str, torch.Tensor]) -> None:
    """The training step's computation, forward and backward, outside Lightning."""
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        planes = m.model(batch["input_image"], batch["source_camera"])
        out = m.model.render(planes, batch["render_cameras"], 384, patch=(128, 128, 128))
        target = batch["target_images"][..., 128:256, 128:256].flatten(0, 1)
        mask = batch["target_masks"][..., 128:256, 128:256]
        loss = opacity_loss(out.opacity, mask) + lpips_loss(m.lpips, out.rgb.flatten(0, 1), target)
    loss.backward()
    m.zero_grad(set_to_none=True)


def step_flops(config: LRMConfig, project: bool, batch: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one forward + backward of the training step's computation: without checkpointing (a
    recompute is not model work) and through the unfused field query, whose products the counter sees (the
    fused kernel does the same products out of its sight)."""
    m = module(config, project, None, fused=False).to(DEVICE).train()
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        forward_backward(m, batch)
    return float(counter.get_total_flops())


def profile(config: LRMConfig, batch_size: int, project: bool, checkpointing: str | None, max_rays: int | None,
            fused: bool, compile_network: bool = False, rows: int = 50) -> None:
    """The kernels that take the step's time (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    m = module(config, project, checkpointing, max_rays, fused, compile_network).to(DEVICE).train()
    batch = {k: v.to(DEVICE) for k, v in synthetic_batch(batch_size, config.encoder_img_size or 512).items()}
    for _ in range(2):  # compiles, then runs compiled
        forward_backward(m, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with torch_profile(activities=activities) as prof:
        forward_backward(m, batch)
        sync()
    if not CUDA:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows, max_name_column_width=60))
        return
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    micros = {e.key: e.self_device_time_total for e in kernels}
    total = sum(micros.values())
    families: Counter[str] = Counter()
    for name, time_us in micros.items():
        families[kernel_family(name)] += time_us
    print(f"# GPU time of one forward + backward at batch {batch_size}: {total / 1e3:.1f} ms in {len(micros)} kernels")
    print("| kind of kernel | GPU time | share |")
    print("| --- | --- | --- |")
    for family, time_us in families.most_common():
        print(f"| {family} | {time_us / 1e3:.1f} ms | {time_us / total:.1%} |")
    print("| kernel | kind | GPU time | share | calls |")
    print("| --- | --- | --- | --- | --- |")
    for event in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"| {event.key[:90]} | {kernel_family(event.key)} | {event.self_device_time_total / 1e3:.2f} ms | "
              f"{event.self_device_time_total / total:.1%} | {event.count} |")


def kernel_family(name: str) -> str:
    """A rough kind for a CUDA kernel's name: how the step's GPU time splits."""
    lowered = name.lower()
    if "triplane_field" in lowered:
        return "field query (Triton)"
    if "composite" in lowered:
        return "compositing (Triton)"
    # cudnn::fusion kernels (dot(dO, O), dQ to 16 bits) are cuDNN attention's backward, not convolutions
    if any(k in lowered for k in ("fmha", "flash", "attention", "sdpa", "cudnn::fusion")):
        return "attention"
    # before products: cuDNN's convolutions are implicit GEMMs whose names also say gemm and xmma
    if any(k in lowered for k in ("conv", "implicit", "winograd", "fprop", "dgrad", "wgrad")):
        return "convolutions"
    if any(k in lowered for k in ("gemm", "xmma", "nvjet", "cutlass", "sm90_", "wgmma")):
        return "matrix products"
    if lowered.startswith("triton_"):
        return "Inductor fused (elementwise, norms)"
    if "sort" in lowered or "scan" in lowered or "search" in lowered:
        return "sort, scan, search"
    return "other torch kernels"


def breakdown(config: LRMConfig, batch_size: int, checkpointing: str | None, compile_network: bool,
              recompute_blocks: int | None = None) -> None:
    """GPU time of each part of the step, forward and backward, timed apart: encoder, transformer, renderer
    with its losses (LPIPS also alone) and the AdamW step, foreach and fused."""
    from vfusion3d_lightning.training.lrm import decay_groups

    torch.manual_seed(0)
    m = module(config, True, checkpointing, None, True, compile_network, recompute_blocks).to(DEVICE).train()
    batch = {k: v.to(DEVICE) for k, v in synthetic_batch(batch_size, config.encoder_img_size or 512).items()}
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        tokens = m.model.encoder(batch["input_image"]).detach()
        camera = m.model.camera_embedder(batch["source_camera"].to(tokens.dtype)).detach()
        planes = m.model.transformer(tokens, camera).detach()
    target = batch["target_images"][..., 128:256, 128:256].flatten(0, 1)
    mask = batch["target_masks"][..., 128:256, 128:256]
    tokens_grad, planes_grad = torch.randn_like(tokens), torch.randn_like(planes)
    planes.requires_grad_(True)
    tokens.requires_grad_(True)
    rgb = torch.rand_like(target, requires_grad=True)

    def encoder():
        with autocast:
            out = m.model.encoder(batch["input_image"])
        out.backward(tokens_grad)

    def transformer():
        with autocast:
            out = m.model.transformer(tokens, camera)
        out.backward(planes_grad)

    def renderer_and_losses():
        with autocast:
            out = m.model.render(planes, batch["render_cameras"], 384, patch=(128, 128, 128))
            loss = opacity_loss(out.opacity, mask) + lpips_loss(m.lpips, out.rgb.flatten(0, 1), target)
        loss.backward()

    def lpips_alone():
        with autocast:
            loss = lpips_loss(m.lpips, rgb, target)
        loss.backward()

    parts = {"encoder": encoder, "transformer": transformer, "renderer + losses": renderer_and_losses,
             "of which LPIPS": lpips_alone}
    for param in m.model.parameters():
        param.grad = torch.zeros_like(param)
    for fused in (False, True) if CUDA else (False,):
        optimizer = torch.optim.AdamW(decay_groups(m.model, 0.05), lr=1e-4, fused=fused)
        parts[f"AdamW step ({'fused' if fused else 'foreach'})"] = optimizer.step
    print(f"# {torch.cuda.get_device_name() if CUDA else 'CPU'}, torch {torch.__version__}, batch {batch_size}, "
          f"checkpointing={checkpointing}, recompute_blocks={recompute_blocks}, compile={compile_network}, "
          f"compositing kernel={renderer_module.fused_composite_supported(torch.device(DEVICE))}: forward + backward "
          "of each part, bf16 autocast")
    print("| part | time | per item | peak memory |")
    print("| --- | --- | --- | --- |")
    for name, work in parts.items():
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        ms = cuda_ms(work)
        memory = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
        print(f"| {name} | {ms:.1f} ms | {ms / batch_size:.2f} ms | {memory:.1f} GiB |", flush=True)


def measure(config: LRMConfig, batch_size: int, project: bool, checkpointing: str | None, steps: int,
            compile_model: bool, max_rays: int | None = None, fused: bool = False,
            recompute_blocks: int | None = None, sync_check: SyncCheck | None = None):
    # counted on one item and scaled: every FLOP is per item, and the counting pass runs in fp32 without
    # autocast, which at batch 8 ran out of memory before training did
    flops = step_flops(config, project, synthetic_batch(1, config.encoder_img_size or 512)) * batch_size
    if CUDA:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    m = module(config, project, checkpointing, max_rays, fused, compile_model, recompute_blocks)
    batch = synthetic_batch(batch_size, config.encoder_img_size or 512)
    timer = StepTimer()
    trainer = L.Trainer(accelerator=DEVICE, devices=1, precision="bf16-mixed", max_steps=3 + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer] + ([sync_check] if sync_check else []), num_sanity_val_steps=0,
                        limit_val_batches=0)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(m, DataLoader(Repeat(batch), batch_size=None, pin_memory=CUDA))
    seconds = statistics.median(timer.times[3:])
    return seconds, flops, torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpointing", nargs="?", const="all", choices=["all", "network", "selective"],
                        help="recompute encoder and transformer blocks, and (all) each renderer pass of --max-rays "
                             "rays; selective: only the blocks' elementwise work")
    parser.add_argument("--recompute-blocks", type=int, default=None,
                        help="with --checkpointing, recompute only the first this many transformer blocks")
    parser.add_argument("--max-rays", type=int, default=None, help="rays per renderer pass and batch item")
    parser.add_argument("--torch-composite", action="store_true",
                        help="ours with torch's compositing in place of the compositing kernel (fused_composite.py)")
    parser.add_argument("--unfused", action="store_true", help="ours without the one-kernel field query under autograd")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoder and transformer (LRMModule(compile_network=True))")
    parser.add_argument("--sync-check", action="store_true",
                        help="report host-device synchronisations in the steps after the warm-up (a GPU is needed)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top kernels of one step of ours at the first batch size")
    parser.add_argument("--breakdown", action="store_true",
                        help="time each part of the step of ours apart at the first batch size")
    parser.add_argument("--preset", default="vfusion3d", choices=presets.network_names())
    parser.add_argument("--paths", nargs="+", default=["released", "ours"], choices=["released", "ours"])
    args = parser.parse_args()
    peak = peak_flops()
    config = LRMConfig.from_name(args.preset)
    if args.torch_composite:  # VolumeRenderer.composite asks this whether the kernel runs here
        renderer_module.fused_composite_supported = lambda device: False
    if args.profile:
        profile(config, args.batch_sizes[0], "ours" in args.paths, args.checkpointing, args.max_rays, not args.unfused,
                args.compile)
        return
    if args.breakdown:
        breakdown(config, args.batch_sizes[0], args.checkpointing, args.compile, args.recompute_blocks)
        return
    print(f"# {torch.cuda.get_device_name() if CUDA else 'CPU'}, torch {torch.__version__}, {args.preset} config, "
          f"4 views of 128^2 patches, bf16-mixed, checkpointing={args.checkpointing}, "
          f"recompute_blocks={args.recompute_blocks}, "
          f"max_rays={args.max_rays}, compile={args.compile}, torch_composite={args.torch_composite}, "
          f"peak {peak / 1e12:.0f} TFLOP/s")
    print("| path | batch | step | samples/s | against released-style | TFLOP a step | MFU | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    best_released = None  # samples/s: the released style's best batch so far, which its own memory allows
    for batch_size in args.batch_sizes:
        for path in args.paths:
            try:
                sync_check = SyncCheck() if args.sync_check and CUDA else None
                seconds, flops, memory = measure(config, batch_size, path == "ours", args.checkpointing, args.steps,
                                                 args.compile and path == "ours", args.max_rays, not args.unfused,
                                                 args.recompute_blocks, sync_check)
            except torch.OutOfMemoryError:
                print(f"| {path} | {batch_size} | out of memory | | | | | |", flush=True)
                torch.cuda.empty_cache()
                continue
            rate = batch_size / seconds
            if path == "released":
                best_released = max(best_released or 0.0, rate)
            ratio = f"{rate / best_released:.1f}x" if path == "ours" and best_released else ""
            print(f"| {path} | {batch_size} | {seconds * 1e3:.0f} ms | {rate:.1f} | {ratio} | {flops / 1e12:.2f} | "
                  f"{flops / seconds / peak:.1%} | {memory:.1f} GiB |", flush=True)
            if sync_check is not None:
                found = ", ".join(f"{place} ({count}x)" for place, count in sync_check.places.most_common())
                print(f"# host-device synchronisations in {args.steps} steps of {path}: {found or 'none'}", flush=True)
            if CUDA:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
