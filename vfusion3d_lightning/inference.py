"""Image -> preprocessing -> triplane -> turntable video and a UV-textured (or vertex-coloured) mesh.

>>> engine = ImageTo3D(LRM.from_pretrained("vfusion3d"), "cuda")
>>> result = engine.run("photo.png", **auto_settings("cuda"))      # result.mesh: trimesh.Trimesh with a texture
>>> export_mesh(result.mesh, "out/mesh.glb")
>>> engine.run("photo.png", out_dir=Path("out"))                    # writes input.png, turntable.mp4, mesh.glb

With `out_dir`, the files are written while the GPU works: the mesh file in a background thread while the
turntable renders, and the video encoded batch by batch as its frames come (BENCHMARKS.md, end to end).
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image
from tqdm import tqdm

from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
from vfusion3d_lightning.data.preprocess import preprocess
from vfusion3d_lightning.geometry.mesh import NoSurfaceError, export_mesh, extract_mesh
from vfusion3d_lightning.geometry.texture import DEFAULT_MAX_FACES, bake_texture, check_unwrap, field_colour
from vfusion3d_lightning.io import atomic_write, to_uint8_images
from vfusion3d_lightning.models.lrm import LRM

VIDEO_FORMATS = ("mp4", "gif")
TEXTURED_FORMATS = ("glb", "obj")  # .ply keeps vertex colours
# `None` settings of `run` and `infer` by device: a GPU gets the released ones; a CPU ones that finish in a
# few minutes for the released network on 2 cores (benchmarks/infer_cpu.py)
AUTO_SETTINGS = {
    "cuda": {"frames": 160, "render_size": 384, "fps": 40, "mesh_resolution": 512, "texture_size": 1024,
             "max_faces": DEFAULT_MAX_FACES},
    "cpu": {"frames": 16, "render_size": 64, "fps": 8, "mesh_resolution": 128, "texture_size": 512,
            "max_faces": 20_000},
}


def auto_settings(device: str | torch.device) -> dict[str, int]:
    """The settings `ImageTo3D.run` uses on `device` for those left `None` (see AUTO_SETTINGS)."""
    return dict(AUTO_SETTINGS["cuda" if torch.device(device).type == "cuda" else "cpu"])


@dataclass
class InferenceResult:
    """image (3, S, S) preprocessed input; planes (1, 3, C, H, W); frames (N, 3, R, R) in [0, 1] or None;
    mesh a trimesh.Trimesh or None."""

    image: torch.Tensor
    planes: torch.Tensor
    frames: torch.Tensor | None = None
    mesh: object | None = None
    files: list[Path] = field(default_factory=list)  # what `run(out_dir=...)` wrote, in order
    warning: str | None = None  # why there is no mesh (no surface at the threshold)


def max_rays_for(model: LRM, device: torch.device, memory_fraction: float = 0.5) -> int:
    """Rays per renderer pass, a power of two, that fit in `memory_fraction` of the GPU memory this process may
    still use (2**16 on the CPU): the device's free memory plus what PyTorch holds unused, within the cap of
    `torch.cuda.set_per_process_memory_fraction` (a small card's size, to check that inference fits one).

    A ray's samples hold 3 x triplane_dim features each; on an H100 2**16 rays of the released model
    peaked at 6.9 GiB above the weights, about 0.9 x samples x 3C x 4 bytes a ray: 1.5 x that is budgeted."""
    if device.type != "cuda":
        return 2**16
    config = model.config
    per_ray = 1.5 * (config.coarse_samples + config.importance_samples) * 3 * config.triplane_dim * 4
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    cap = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index) * total
    usable = min(free + torch.cuda.memory_reserved(device) - allocated, cap - allocated)
    rays = max(1024, int(usable * memory_fraction / per_ray))
    return 2 ** (rays.bit_length() - 1)  # a power of two: the same pass shapes each call, so compiled code is reused


class ImageTo3D:
    """The released inference, batched: `ImageTo3D(LRM.from_pretrained("vfusion3d")).run("photo.png")`.

    Takes over `model`: moves it to `device`, and with a dtype other than float32 holds its network weights in
    that dtype (`LRM.cast_network_weights`)."""

    def __init__(self, model: LRM, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 input_size: int = 512, border_ratio: float = 0.2, background: str = "auto", compile: bool = False):
        self.model = model.eval().to(device)
        self.device, self.dtype = torch.device(device), dtype
        if dtype != torch.float32:  # cast once what autocast would cast on every call
            self.model.cast_network_weights(dtype)
        self.input_size, self.border_ratio, self.background = input_size, border_ratio, background
        if compile:  # BENCHMARKS.md: turntables and image -> planes on an H100
            self.model.compile_for_speed(cuda_graphs=self.device.type == "cuda")

    def _autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    @torch.no_grad()
    def planes(self, image: torch.Tensor) -> torch.Tensor:
        """(3, S, S) in [0, 1] -> planes (1, 3, C, H, W) in float32."""
        with self._autocast():
            planes = self.model(image[None].to(self.device), canonical_source_camera(1).to(self.device))
        return planes.float().clone()  # a copy: with CUDA graphs the next call overwrites the output

    def max_rays(self, memory_fraction: float = 0.5) -> int:
        return max_rays_for(self.model, self.device, memory_fraction)

    @torch.no_grad()
    def turntable(self, planes: torch.Tensor, frames: int = 160, size: int = 384, frames_per_batch: int = 8,
                  radius: float = 1.5, elevation: float = 0.0, max_rays: int | None = None,
                  skip_empty: bool | None = None, seed: int = 0, progress: bool = False,
                  on_batch=None) -> torch.Tensor:
        """Frames (N, 3, size, size) around the object, `frames_per_batch` cameras per call (the release
        renders one per call); `max_rays` bounds the rays in one renderer pass, and so the memory (None: sized
        to the free memory by `max_rays()`). `skip_empty` (None: on a GPU) queries the field only in cells of
        a 128^3 occupancy grid where it has density (`LRM.occupancy`; frames differ from a full render by well
        under a grey level, BENCHMARKS.md); a field with density in over half the cells is rendered in full.
        `seed` seeds the renderer's sample jitter: the same planes give the same frames. `progress`: a tqdm bar
        of frames on stderr. `on_batch(frames)` gets each batch as it is rendered (a video writer)."""
        max_rays = max_rays or self.max_rays()
        cameras = turntable_cameras(frames, radius, elevation).to(self.device)
        occupancy = None
        if skip_empty or (skip_empty is None and self.device.type == "cuda"):
            with self._autocast():
                occupancy = self.model.occupancy(planes)
            if occupancy.fraction > 0.5:  # compacting the samples would cost more than it saves
                occupancy = None
        out = []
        generator = torch.Generator(self.device).manual_seed(seed)
        with tqdm(total=frames, desc="frames", unit="frame", disable=not progress, leave=False) as bar:
            for start in range(0, frames, frames_per_batch):
                with self._autocast():
                    rgb = self.model.render(planes, cameras[None, start:start + frames_per_batch], size,
                                            generator=generator, max_rays=max_rays, occupancy=occupancy).rgb[0]
                out.append(rgb.float().clamp(0, 1).cpu())
                if on_batch is not None:
                    on_batch(out[-1])
                bar.update(len(rgb))
        return torch.cat(out)

    @torch.no_grad()
    def texture(self, planes: torch.Tensor, mesh, size: int = 1024, max_faces: int = DEFAULT_MAX_FACES,
                unwrap: str = "per_face", log=None, timings: dict | None = None, progress: bool = False):
        """`mesh` -> a decimated copy with UVs and a `size`^2 texture baked from `planes`' colour field
        (`texture.bake_texture`, on this engine's device); `log` gets the decimation line; `progress`: a tqdm bar
        of its steps."""
        query = field_colour(self.model, planes)

        def colour(points: torch.Tensor) -> torch.Tensor:
            with self._autocast():  # the field query only: the bake's geometry stays in float32
                return query(points)

        return bake_texture(colour, mesh, size, max_faces, unwrap, self.device, timings=timings, log=log,
                            progress=progress)

    def run(self, image, frames: int | None = None, render_size: int | None = None, frames_per_batch: int = 8,
            mesh_resolution: int | None = None, mesh_threshold: float = 1.0, mesh_method: str = "coarse_to_fine",
            video: bool = True, mesh: bool = True, texture_size: int | None = None, max_faces: int | None = None,
            unwrap: str = "per_face", out_dir: Path | None = None, video_format: str = "mp4",
            mesh_format: str = "glb", fps: int | None = None, progress: bool = False, log=None,
            timings: dict | None = None) -> InferenceResult:
        """`image`: a path or a uint8 (H, W, 3|4) array. Settings left `None` come from `auto_settings(device)`;
        `texture_size` 0 keeps vertex colours; `unwrap` one of `texture.UNWRAPS`. With `out_dir`, input.png,
        turntable.<video_format> and mesh.<mesh_format> are written there, each atomically, and listed in
        `result.files` in that order. No surface at `mesh_threshold` leaves `result.mesh` None and says why in
        `result.warning` (the rest is kept; an earlier mesh file in `out_dir` is removed).
        `progress`: tqdm bars (planes, mesh, texture, frames) on stderr; `log`: gets one-line notes; `timings`:
        filled with the seconds of each step on this thread (preprocess, planes, mesh, texture, turntable, and
        finish: waiting for the files after the last frame)."""
        auto = auto_settings(self.device)
        frames = auto["frames"] if frames is None else frames
        render_size = auto["render_size"] if render_size is None else render_size
        mesh_resolution = auto["mesh_resolution"] if mesh_resolution is None else mesh_resolution
        texture_size = auto["texture_size"] if texture_size is None else texture_size
        max_faces = auto["max_faces"] if max_faces is None else max_faces
        fps = auto["fps"] if fps is None else fps
        check_unwrap(unwrap)  # before the GPU work, not after it
        if out_dir is not None and mesh_format not in TEXTURED_FORMATS:
            texture_size = 0
        timings = {} if timings is None else timings
        clock = time.perf_counter()

        def done(step: str) -> None:
            nonlocal clock
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[step], clock = time.perf_counter() - clock, time.perf_counter()

        tensor = preprocess(image, self.input_size, self.border_ratio, self.background)
        done("preprocess")
        with tqdm(total=1, desc="planes", unit="image", disable=not progress, leave=False) as bar:
            planes = self.planes(tensor)
            bar.update()
        done("planes")
        result = InferenceResult(image=tensor, planes=planes)
        files = {}
        # files are written by these threads while this one drives the GPU; one each keeps their order
        with ThreadPoolExecutor(1) as mesh_writer, ThreadPoolExecutor(1) as video_writer:
            if out_dir is not None:
                picture = to_uint8_images(tensor)
                files["input"] = mesh_writer.submit(atomic_write, Path(out_dir) / "input.png",
                                                    lambda tmp: Image.fromarray(picture).save(tmp))
            if mesh:
                try:
                    result.mesh = extract_mesh(self.model, planes, mesh_resolution, mesh_threshold, mesh_method,
                                               progress=progress, vertex_colours=not texture_size)
                except NoSurfaceError as err:
                    result.warning = str(err)
                    if out_dir is not None:  # an earlier run's mesh would pass for this input's
                        for name in [f"mesh.{mesh_format}"] + (["mesh.mtl", "mesh.png"] if mesh_format == "obj"
                                                              else []):
                            (Path(out_dir) / name).unlink(missing_ok=True)
                done("mesh")
                if result.mesh is not None and texture_size:
                    result.mesh = self.texture(planes, result.mesh, texture_size, max_faces, unwrap, log=log,
                                               progress=progress)
                done("texture")
                if result.mesh is not None and out_dir is not None:
                    files["mesh"] = mesh_writer.submit(export_mesh, result.mesh,
                                                       Path(out_dir) / f"mesh.{mesh_format}")
            if video:
                stream = None
                if out_dir is not None:
                    stream = FrameStream()
                    files["video"] = stream.reader = video_writer.submit(
                        write_video, stream, Path(out_dir) / f"turntable.{video_format}", fps)
                try:
                    result.frames = self.turntable(planes, frames, render_size, frames_per_batch, progress=progress,
                                                   on_batch=stream.put if stream else None)
                finally:  # a failed render leaves no video: the writer's temporary file goes
                    if stream is not None:
                        stream.close(failed=result.frames is None)
                done("turntable")
            result.files = [files[name].result() for name in ("input", "video", "mesh") if name in files]
        done("finish")
        return result


class FrameStream:
    """Batches of frames handed from the rendering thread to a video writer's thread, in order (`write_video`
    iterates over it). At most `depth` batches wait, bounding the memory. `reader`: the writer's Future, so that
    a writer that failed is not waited for (`put` raises its error); `close(failed=True)` makes the writer's
    iteration raise, so that it drops its partial file."""

    def __init__(self, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.reader = None

    def _hand_over(self, item) -> None:
        while True:
            try:
                return self._queue.put(item, timeout=0.1)
            except queue.Full:
                if self.reader is not None and self.reader.done():
                    return

    def put(self, frames: torch.Tensor) -> None:
        if self.reader is not None and self.reader.done():
            self.reader.result()  # the writer's own error, e.g. no MP4 encoder
            raise RuntimeError("the video writer stopped before the last frame")
        self._hand_over(frames)

    def close(self, failed: bool = False) -> None:
        self._hand_over(RuntimeError("the render stopped before its last frame") if failed else None)

    def __iter__(self):
        while (item := self._queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


def write_video(frames: torch.Tensor | Iterable[torch.Tensor], path: str | Path, fps: int = 40) -> Path:
    """MP4 (through imageio's ffmpeg plugin) or GIF (Pillow), by suffix, written atomically. `frames`:
    (N, 3, H, W) in [0, 1], or batches of them as they come (a `FrameStream`): an MP4 encodes each batch while the
    next is made."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"video {path} must end in one of {['.' + f for f in VIDEO_FORMATS]}")
    batches = [frames] if isinstance(frames, torch.Tensor) else frames
    if fmt == "gif":
        def save(tmp: Path) -> None:
            images = [Image.fromarray(p) for batch in batches for p in to_uint8_images(batch)]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    else:
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401  (the plugin that writes MP4)
        except ImportError:
            raise RuntimeError("MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); or write a .gif") from None

        def save(tmp: Path) -> None:
            with imageio.get_writer(tmp, fps=fps, macro_block_size=1) as writer:
                for batch in batches:
                    for picture in to_uint8_images(batch):
                        writer.append_data(picture)
    return atomic_write(path, save)


def save_outputs(result: InferenceResult, out_dir: Path, video_format: str | None, mesh_format: str | None,
                 fps: int = 40) -> list[Path]:
    """input.png, turntable.<video_format>, mesh.<mesh_format> of a finished `result` in `out_dir` (`run` with
    `out_dir` writes each as soon as it exists instead)."""
    picture = to_uint8_images(result.image)
    written = [atomic_write(out_dir / "input.png", lambda tmp: Image.fromarray(picture).save(tmp))]
    if video_format and result.frames is not None:
        written.append(write_video(result.frames, out_dir / f"turntable.{video_format}", fps))
    if mesh_format and result.mesh is not None:
        written.append(export_mesh(result.mesh, out_dir / f"mesh.{mesh_format}"))
    return written
