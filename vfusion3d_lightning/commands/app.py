"""`vfusion3d-lightning app`: a local web page (Gradio) for image -> 3D, like the released VFusion3D demo.

Upload an image (or pick an example: procedural assets' front views, rendered at startup into OUT/examples);
the page shows the preprocessed input, the turntable video and the mesh in a 3D viewer, with the GLB, OBJ and
MP4 files to download. The model is loaded once; requests run one at a time through Gradio's queue, so two
users never share the model mid-run. Each request writes its files into its own folder under OUT.

The page loads nothing from outside the server (Gradio's analytics are off, its fonts and viewer are bundled):
demo machines may be offline. It listens on 127.0.0.1 unless told otherwise, and warns loudly otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from vfusion3d_lightning.commands.common import DTYPES, resolve_device
from vfusion3d_lightning.geometry.mesh import export_mesh
from vfusion3d_lightning.inference import ImageTo3D, save_outputs
from vfusion3d_lightning.io import atomic_write, require_extra
from vfusion3d_lightning.models.lrm import LRM

MESH_FILES = ("mesh.glb", "mesh.obj")


def exposure_warning(host: str, port: int) -> str | None:
    """The warning line for serving on `host`:`port`, or None for a loopback address."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        loopback = host.lower() == "localhost"
    if loopback:
        return None
    shown = "all addresses" if host in ("0.0.0.0", "::", "") else host
    return (f"WARNING: app is listening on {shown} (port {port}), not on loopback: anyone who can reach this "
            f"machine on port {port} can upload images and run the model. Use --host 127.0.0.1 unless you mean "
            "to share the page on a trusted network.")


def export_meshes(mesh, folder: Path) -> list[Path]:
    """The downloadable meshes: GLB (also shown in the 3D viewer) and OBJ."""
    return [export_mesh(mesh, folder / name) for name in MESH_FILES]


def render_examples(folder: Path, count: int, size: int = 256, seed: int = 0) -> list[Path]:
    """Front views (RGBA PNG, the encoder's canonical camera) of `count` procedural assets, rendered once into
    `folder` and reused on the next start."""
    from vfusion3d_lightning.cameras import canonical_source_pose
    from vfusion3d_lightning.data.procedural import write_assets
    from vfusion3d_lightning.data.render import MeshRenderer, default_intrinsics, load_asset

    pictures = [folder / f"example_{seed + i:03d}.png" for i in range(count)]
    missing = [p for p in pictures if not p.is_file()]
    if missing:
        assets = write_assets(folder / "assets", count, seed=seed, formats=("glb",), progress=False,
                              style="upright")
        pose = canonical_source_pose().numpy()[None].astype(np.float32)
        with MeshRenderer(size) as renderer:
            for asset, picture in zip(assets, pictures):
                if not picture.is_file():
                    view = renderer.render(load_asset(asset), pose, default_intrinsics(size))[0]
                    atomic_write(picture, lambda tmp: Image.fromarray(view, "RGBA").save(tmp, format="PNG"))
    return pictures


def build_page(engine: ImageTo3D, out: Path, examples: list[Path], frames: int, render_size: int,
               frames_per_batch: int, fps: int, mesh_resolution: int, mesh_threshold: float):
    """The Gradio Blocks of the page, running every request through `engine` and writing under `out`."""
    import gradio as gr

    def generate(image_path: str | None):
        if not image_path:
            raise gr.Error("upload an image first (PNG with transparency, or an object on a plain background)")
        folder = out / "requests" / uuid.uuid4().hex[:12]
        try:
            result = engine.run(image_path, frames, render_size, frames_per_batch, mesh_resolution,
                                mesh_threshold, "coarse_to_fine")
        # this image (unreadable, empty mask, no surface) or rembg missing for a photo: shown on the page
        except (ValueError, OSError, ImportError) as err:
            raise gr.Error(" ".join(str(err).split())) from None
        picture, video = save_outputs(result, folder, "mp4", None, fps)
        if result.mesh is None:  # no surface at the threshold: the turntable is kept, the warning names a threshold
            gr.Warning(result.warning)
            return str(picture), str(video), None, [str(video)]
        glb, obj = export_meshes(result.mesh, folder)
        # a textured OBJ needs its .mtl and texture beside it: offer every file the request wrote
        extras = sorted(p for p in folder.iterdir() if p not in (glb, obj, video, picture))
        return str(picture), str(video), str(glb), [str(glb), str(obj), *map(str, extras), str(video)]

    with gr.Blocks(title="VFusion3D", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("# VFusion3D: image to 3D\nUpload an image of one object (a PNG with transparency, or an object "
                    "on a plain white background), then press Generate.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Input image", type="filepath", image_mode=None, sources=["upload"],
                                 height=320, elem_id="input-image")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image], label="Examples (procedural assets)")
            with gr.Column():
                processed = gr.Image(label="Preprocessed input", interactive=False, height=320, elem_id="processed")
                video = gr.Video(label="Turntable", interactive=False, autoplay=True, loop=True, height=320,
                                 elem_id="turntable")
            with gr.Column():
                viewer = gr.Model3D(label="Mesh", interactive=False, height=320, elem_id="mesh-viewer")
                files = gr.File(label="Download GLB / OBJ / MP4", file_count="multiple", interactive=False,
                                elem_id="downloads")
        button.click(generate, inputs=[image], outputs=[processed, video, viewer, files])
    # one request at a time: the model is shared, and a second run would only halve the speed of the first
    return page.queue(default_concurrency_limit=1, max_size=32)


def start(checkpoint: str, host: str, port: int, out: Path | None, examples: int, frames: int, render_size: int,
          frames_per_batch: int, fps: int, mesh_resolution: int, mesh_threshold: float, input_size: int,
          border_ratio: float, background: str, device: str, dtype: str, block: bool):
    """Load the model, build the page and serve it; returns the Gradio Blocks (serving in the background when
    `block` is False: `page.local_url`, `page.close()`)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # offline machines: no calls home (read on import)
    require_extra("gradio", "app", "the app (vfusion3d-lightning app)")

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="vfusion3d-app-"))
    engine = ImageTo3D(LRM.from_pretrained(checkpoint), resolve_device(device), DTYPES[dtype], input_size,
                       border_ratio, background)
    pictures = []
    if examples:
        try:
            pictures = render_examples(out / "examples", examples)
        except Exception as err:  # no headless OpenGL here: the examples are a convenience, the page still works
            print(f"app: no examples ({type(err).__name__}: {' '.join(str(err).split())}); --examples 0 skips "
                  "them", file=sys.stderr, flush=True)
    page = build_page(engine, out, pictures, frames, render_size, frames_per_batch, fps, mesh_resolution,
                      mesh_threshold)
    warning = exposure_warning(host, port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, ssr_mode=False,
                allowed_paths=[str(out)], max_file_size="25mb", show_error=True, quiet=True)
    print(f"app: serving {page.local_url} (files under {out}); Ctrl+C stops it", flush=True)
    if block:
        page.block_thread()  # until Ctrl+C, which closes the server
    return page


def app(checkpoint: str = "vfusion3d", host: str = "127.0.0.1", port: int = 7860, out: Path | None = None,
        examples: int = 4, frames: int = 24, render_size: int = 128, frames_per_batch: int = 8, fps: int = 12,
        mesh_resolution: int = 128, mesh_threshold: float = 1.0, input_size: int = 512, border_ratio: float = 0.2,
        background: Literal["auto", "rembg", "alpha", "white"] = "auto", device: str = "auto",
        dtype: Literal["float32", "bfloat16"] = "float32") -> None:
    """Serve a web page: upload an image, see the preprocessed input, turntable video and mesh, download them.

    Args:
        checkpoint: a save_pretrained folder, a weights file, a registry name or an LRMModule .ckpt (default: the
            released model).
        host: address to listen on; 127.0.0.1 keeps the page to this machine (0.0.0.0 shares it: a warning).
        port: port to listen on.
        out: folder for the examples and each request's files (default: a new temporary folder).
        examples: procedural example images rendered at startup (0: none).
        frames: turntable frames (small defaults keep a CPU run short).
        render_size: turntable frame size in pixels.
        frames_per_batch: turntable frames rendered per call (memory).
        fps: video frame rate.
        mesh_resolution: density grid size per axis for the mesh.
        mesh_threshold: density level of the surface (the released 1.0).
        input_size: encoder input size in pixels.
        border_ratio: margin kept around the object when recentring.
        background: `auto`: the alpha channel if any, else rembg; `white`: objects on plain white.
        device: `auto` (the GPU if any), `cpu`, `cuda`, `cuda:N`.
        dtype: `bfloat16` runs the network under autocast.
    """
    start(checkpoint, host, port, out, examples, frames, render_size, frames_per_batch, fps, mesh_resolution,
          mesh_threshold, input_size, border_ratio, background, device, dtype, block=True)
