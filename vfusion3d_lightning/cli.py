"""`vfusion3d-lightning`: the project's command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch
from PIL import Image


def run_demo(args: argparse.Namespace) -> int:
    from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
    from vfusion3d_lightning.io import to_uint8_images
    from vfusion3d_lightning.models.lrm import LRM, LRMConfig

    torch.manual_seed(args.seed)
    config = LRMConfig.preset(args.preset)
    model = LRM(config).eval()
    image_size = model.encoder.vit.patch_embed.img_size[0]
    image = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad():
        planes = model(image, canonical_source_camera(1))
        frame = model.render(planes, turntable_cameras(args.frames)[:1][None], size=args.size,
                             generator=torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_images(frame.rgb[0, 0])).save(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LRM '{args.preset}' ({n_params:,} parameters, random weights): planes {tuple(planes.shape)}, "
          f"turntable frame 0 of {args.frames} at {args.size}x{args.size}, mean opacity "
          f"{frame.opacity.mean().item():.3f} -> {out}")
    return 0


def run_weights(args: argparse.Namespace) -> int:
    from vfusion3d_lightning.hub import checkpoint_dir, load_registry

    directory = checkpoint_dir(args.checkpoint_dir)
    for name, entry in load_registry().items():
        path = directory / entry.filename
        state = "present" if path.exists() else "missing"
        print(f"{name:14s} {state:8s} {path}\n{'':14s} {entry.description}\n{'':14s} source: {entry.source}")
    return 0


def run_procedural(args: argparse.Namespace) -> int:
    from vfusion3d_lightning.data.procedural import write_assets

    paths = write_assets(args.out, args.count, seed=args.seed, formats=tuple(args.formats), style=args.style)
    print(f"{len(paths)} procedural assets in {args.out}")
    return 0


def run_render(args: argparse.Namespace) -> int:
    from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder

    settings = RenderSettings(views=args.views, resolution=args.resolution, radius=args.radius, seed=args.seed,
                              image_format=args.format)
    report = render_folder(args.assets, args.out, settings, workers=args.workers, shard_size=args.shard_size)
    print(f"rendered {report.rendered}, already present {report.skipped_existing}, failed {len(report.failed)} "
          f"-> {args.out} (report: render_report.json)")
    return 0


def run_infer(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vfusion3d_lightning.inference import ImageTo3D, input_images, save_outputs
    from vfusion3d_lightning.models.lrm import LRM

    images = input_images(args.input)
    model = LRM.from_pretrained(args.checkpoint)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    engine = ImageTo3D(model, args.device, dtype, args.input_size, args.border_ratio, args.background,
                       compile=args.compile)
    video = None if args.video_format == "none" else args.video_format
    mesh = None if args.mesh_format == "none" else args.mesh_format
    for path in tqdm(images, desc="infer", unit="image", disable=len(images) == 1):
        try:
            result = engine.run(path, args.frames, args.render_size, args.frames_per_batch, args.mesh_resolution,
                                args.mesh_threshold, args.mesh_method, video=video is not None,
                                mesh=mesh is not None)
        except ValueError as err:  # an empty mask or mesh: say which image of a folder it was
            if str(path) in str(err):
                raise
            raise ValueError(f"{path}: {err}") from err
        written = save_outputs(result, Path(args.out) / path.stem, video, mesh, args.fps)
        print(f"{path} -> " + ", ".join(str(p) for p in written))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from vfusion3d_lightning.data.generate_shards import generate_shards, read_inputs
    from vfusion3d_lightning.models.video import SamplerSettings
    from vfusion3d_lightning.training.video_diffusion import load_video_model

    inputs = read_inputs(args.inputs)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_video_model(args.model).to(args.device, dtype).eval()
    guidance = args.guidance if len(args.guidance) == 2 else args.guidance * 2
    settings = SamplerSettings(num_frames=args.frames, num_inference_steps=args.steps, min_guidance=guidance[0],
                               max_guidance=guidance[1], decode_chunk=args.decode_chunk)
    report = generate_shards(model, inputs, args.out, settings, frame_size=args.size, batch_size=args.batch_size,
                             seed=args.seed, shard_size=args.shard_size,
                             border_ratio=args.border_ratio if args.border_ratio >= 0 else None,
                             background=args.background, model_name=str(args.model))
    print(f"generated {report.generated}, already present {report.skipped_existing}, failed {len(report.failed)} "
          f"-> {args.out} (report: generate_report.json)")
    return 0


def run_filter(args: argparse.Namespace) -> int:
    from vfusion3d_lightning.data.curate_shards import file_digest, filter_shards
    from vfusion3d_lightning.models.curation.quality import QualitySVM

    svm = QualitySVM.load(args.svm)
    report = filter_shards(args.shards, args.out, svm, args.threshold, svm_id=file_digest(args.svm))
    totals = report.totals()
    print(f"kept {totals.get('kept', 0)} of {totals.get('videos', 0)} videos (threshold {args.threshold}) -> "
          f"{args.out} (report: filter_report.json)")
    return 0


def run_label(args: argparse.Namespace) -> int:
    from vfusion3d_lightning.data.curate_shards import Labellers, file_digest, label_shards
    from vfusion3d_lightning.models.curation.elevation import ElevationMLP
    from vfusion3d_lightning.models.curation.quality import QualitySVM

    labellers = Labellers(elevation=ElevationMLP.from_pretrained(args.elevation) if args.elevation else None,
                          masks=None if args.masks == "none" else args.masks, mask_tolerance=args.mask_tolerance,
                          quality=QualitySVM.load(args.svm) if args.svm else None, radius=args.radius)
    ids = {name: file_digest(path) for name, path in (("elevation", args.elevation), ("quality", args.svm)) if path}
    report = label_shards(args.shards, args.out, labellers, ids)
    totals = report.totals()
    print(f"labelled {totals.get('videos', 0)} videos: elevation {totals.get('elevation', 0)}, masks "
          f"{totals.get('masks', 0)}, quality {totals.get('quality', 0)} -> {args.out} (report: label_report.json)")
    return 0


MODULE_COMMANDS = (
    ("label-ui", "commands.label_ui", "a local web page to label generated videos good or bad"),
    ("pipeline", "commands.pipeline", "the whole system end to end, resumable: assets -> renders -> video model -> videos "
                             "-> curation -> LRM -> metrics, samples"),
    ("evaluate", "evaluation", "3D metrics (PSNR, SSIM, LPIPS, CLIP) of LRM checkpoints on held-out multi-view shards"),
    ("prompts", "data.prompts", "keep the captions an LLM judges to describe a single object (resumable)"),
    ("sweep", "commands.sweep", "grid or random search over config overrides: one `fit` per trial in its own process and "
                       "folder, results sorted by a metric (resumable)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfusion3d-lightning", description=__doc__,
        epilog="Training: vfusion3d-lightning {fit,validate,test,predict} --config CONFIG.yaml (LightningCLI)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build an LRM with random weights and render one turntable frame to PNG")
    demo.add_argument("--preset", default="tiny", choices=["tiny", "vfusion3d"])
    demo.add_argument("--out", default="demo.png", help="PNG to write")
    demo.add_argument("--size", type=int, default=128, help="render resolution")
    demo.add_argument("--frames", type=int, default=160, help="turntable length (frame 0 is rendered)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=run_demo)

    procedural = commands.add_parser("procedural", help="write seeded procedural 3D assets (GLB, OBJ, PLY)")
    procedural.add_argument("--out", required=True, help="folder for the asset files")
    procedural.add_argument("--count", type=int, default=100)
    procedural.add_argument("--seed", type=int, default=0)
    procedural.add_argument("--formats", nargs="+", default=["glb", "obj", "ply"], choices=["glb", "obj", "ply"])
    procedural.add_argument("--style", default="tumbled", choices=["tumbled", "upright"],
                            help="upright: parts stand on a base, so views show the camera's elevation")
    procedural.set_defaults(run=run_procedural)

    render = commands.add_parser("render", help="render a folder of 3D assets into multi-view shards (resumable)")
    render.add_argument("assets", help="folder of .glb/.gltf/.obj/.ply files (searched recursively)")
    render.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar files")
    render.add_argument("--views", default="orbit16", choices=["orbit16", "random32", "uniform32"],
                        help="orbit16: the paper's 16-view orbit; random32/uniform32: LRM supervision sets")
    render.add_argument("--resolution", type=int, default=256)
    render.add_argument("--radius", type=float, default=1.5, help="camera distance; assets fill [-0.5, 0.5]^3")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--format", default="png", choices=["png", "jpg"], help="jpg stores a mask PNG beside")
    render.add_argument("--workers", type=int, default=2, help="rendering processes")
    render.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    render.set_defaults(run=run_render)

    infer = commands.add_parser("infer", help="image(s) -> turntable video and coloured mesh")
    infer.add_argument("input", help="an image, or a folder of images")
    infer.add_argument("--checkpoint", default="vfusion3d",
                       help="save_pretrained folder, weights file, or registry name (default: the released model)")
    infer.add_argument("--out", required=True, help="folder; each image gets a subfolder")
    infer.add_argument("--frames", type=int, default=160)
    infer.add_argument("--render-size", type=int, default=384)
    infer.add_argument("--frames-per-batch", type=int, default=8, help="turntable frames rendered per call")
    infer.add_argument("--fps", type=int, default=40)
    infer.add_argument("--video-format", default="mp4", choices=["mp4", "gif", "none"])
    infer.add_argument("--mesh-format", default="glb", choices=["glb", "obj", "ply", "none"])
    infer.add_argument("--mesh-resolution", type=int, default=512)
    infer.add_argument("--mesh-threshold", type=float, default=1.0)
    infer.add_argument("--mesh-method", default="coarse_to_fine", choices=["coarse_to_fine", "dense"])
    infer.add_argument("--input-size", type=int, default=512, help="encoder input size")
    infer.add_argument("--border-ratio", type=float, default=0.2)
    infer.add_argument("--background", default="auto", choices=["auto", "rembg", "alpha", "white"],
                       help="auto: the alpha channel if any, else rembg; white: objects on plain white")
    infer.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    infer.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    infer.add_argument("--compile", action="store_true",
                       help="torch.compile the network and renderer: minutes of compiling, then faster (GPU)")
    infer.set_defaults(run=run_infer)

    generate = commands.add_parser("generate", help="condition images + prompts -> orbit videos as shards")
    generate.add_argument("--model", required=True,
                          help="a VideoDiffusionModule .ckpt, an exported folder, a diffusers folder or an "
                               "architecture name (random weights)")
    generate.add_argument("--inputs", required=True,
                          help="a folder of images (prompts in same-stem .txt files), or a .jsonl/.csv file with "
                               "image and prompt fields")
    generate.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar files")
    generate.add_argument("--frames", type=int, default=16)
    generate.add_argument("--size", type=int, default=256, help="frame size in pixels")
    generate.add_argument("--steps", type=int, default=25, help="denoising steps")
    generate.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0],
                          help="classifier-free guidance: one value, or first-frame and last-frame values")
    generate.add_argument("--batch-size", type=int, default=4)
    generate.add_argument("--shard-size", type=int, default=64, help="videos per shard (a kill redoes one shard)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--border-ratio", type=float, default=0.2,
                          help="recentre the object with this margin; a negative value keeps the image's framing")
    generate.add_argument("--background", default="auto", choices=["auto", "rembg", "alpha", "white"])
    generate.add_argument("--decode-chunk", type=int, default=8, help="frames per VAE decode call")
    generate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    generate.set_defaults(run=run_generate)

    filter_ = commands.add_parser("filter", help="keep the generated videos the quality SVM scores as good "
                                                 "(resumable)")
    filter_.add_argument("shards", help="folder of shard-NNNNNN.tar files (features cached), or a pattern")
    filter_.add_argument("--svm", required=True, help="quality_svm.skops written by the quality config")
    filter_.add_argument("--out", required=True, help="folder for the kept videos' shards")
    filter_.add_argument("--threshold", type=float, default=0.5, help="keep videos with P(good) >= this")
    filter_.set_defaults(run=run_filter)

    label = commands.add_parser("label", help="write elevation + orbit cameras, masks and quality scores into "
                                              "the videos' shards (resumable)")
    label.add_argument("shards", help="folder of shard-NNNNNN.tar files (features cached), or a pattern")
    label.add_argument("--out", required=True, help="folder for the labelled shards")
    label.add_argument("--elevation", help="elevation_mlp folder written by the elevation config")
    label.add_argument("--masks", default="threshold", choices=["threshold", "rembg", "none"],
                       help="threshold: objects on white (offline); rembg: a saliency model (weights local)")
    label.add_argument("--mask-tolerance", type=int, default=12, help="threshold masks: how far from white")
    label.add_argument("--svm", help="quality SVM, to score videos not scored by filter")
    label.add_argument("--radius", type=float, default=1.5, help="camera distance of the orbit, as rendered")
    label.set_defaults(run=run_label)

    # commands whose module defines add_arguments(parser) and run(args)
    for name, module_name, text in MODULE_COMMANDS:
        module = importlib.import_module(f".{module_name}", __package__)
        command = commands.add_parser(name, help=text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)

    weights = commands.add_parser("weights", help="list known pretrained weights and whether they are present")
    weights.add_argument("--checkpoint-dir", default=None)
    weights.set_defaults(run=run_weights)
    return parser


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(argv: list[str] | None, run: bool = True, overwrite_config: bool = False):
    """LightningCLI for any of our LightningModules and DataModules, chosen by `class_path` in the config.
    `argv` None reads the command line. `overwrite_config` lets a rerun write the run's config.yaml again
    where there is no versioned log folder (predict)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, args=argv, run=run,
                        save_config_kwargs={"overwrite": overwrite_config})


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in LIGHTNING_COMMANDS:
        # predict writes no versioned log folder, so its rerun (skipping cached shards) meets its own config.yaml
        lightning_cli(argv, overwrite_config=words[0] == "predict")
        return 0
    args = build_parser().parse_args(words)
    return args.run(args)


def _user_error(err: BaseException) -> BaseException | None:
    """The error in `err`'s chain that is the user's to mend, with a message that says how: a missing file
    (weights to fetch, an input path) or data that breaks the shard schema or cannot be rendered. Lightning's
    config parser wraps errors from building a module, so the chain is searched."""
    from vfusion3d_lightning.data.render import AssetLoadError
    from vfusion3d_lightning.data.schema import SampleError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (FileNotFoundError, SampleError, AssetLoadError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def console_main() -> int:
    """The `vfusion3d-lightning` command: `main`, with errors the user can mend printed as one message
    rather than a traceback (VFUSION3D_TRACEBACK=1 shows the traceback too)."""
    try:
        return main()
    except Exception as err:
        found = _user_error(err)
        if found is None or os.environ.get("VFUSION3D_TRACEBACK") == "1":
            raise
        message = str(found)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its message ends the worker's traceback
            name, _, text = message.strip().splitlines()[-1].partition(": ")
            message = text if text and " " not in name else message
        print(f"vfusion3d-lightning: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(console_main())
