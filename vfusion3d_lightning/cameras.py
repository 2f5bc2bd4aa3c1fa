"""The one camera convention of the project.

Poses are camera-to-world 4x4 matrices in the OpenGL/Blender convention: the camera looks along its
-z axis with +y up, and the world is z-up. Angles are in radians. Intrinsics come in two forms:
pixels (fx, fy, cx, cy for an image of width W and height H) and normalised (divided by W and H),
which is what both camera vectors carry, so a camera vector does not depend on the image size.

Two camera vectors feed the LRM, exactly as the released VFusion3D code builds them:
- encoder (source) camera, 16 numbers: the 3x4 cam-to-world matrix row-major, then fx/W, fy/H, cx/W, cy/H;
- render camera, 25 numbers: the 4x4 cam-to-world matrix row-major, then the normalised 3x3 intrinsics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SOURCE_CAMERA_DIM = 16
RENDER_CAMERA_DIM = 25
WORLD_UP = (0.0, 0.0, 1.0)
# Mesh files are +y up (glTF's specification; most OBJ/PLY tools): world = Y_UP_TO_WORLD @ file, file +y -> world
# +z, file +z (a glTF model's front) -> world +x (the azimuth-0 camera), file +x -> world +y. Files are read with
# it (data/render.py `to_world`) and written with its transpose (procedural assets, exported meshes).
Y_UP_TO_WORLD = np.array([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels for an image of `width` x `height`."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got width={self.width} height={self.height}")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"focal lengths must be positive, got fx={self.fx} fy={self.fy}")

    def normalized(self) -> tuple[float, float, float, float]:
        """(fx/W, fy/H, cx/W, cy/H)."""
        return self.fx / self.width, self.fy / self.height, self.cx / self.width, self.cy / self.height

    def matrix(self) -> torch.Tensor:
        """Pixel intrinsics K: (3, 3)."""
        return torch.tensor([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def normalized_matrix(self) -> torch.Tensor:
        """Normalised intrinsics: (3, 3), the form the render camera vector and the ray sampler use."""
        fx, fy, cx, cy = self.normalized()
        return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])

    @classmethod
    def from_fov(cls, fov: float, width: int, height: int | None = None) -> "Intrinsics":
        """Centred intrinsics from a horizontal field of view (radians)."""
        height = width if height is None else height
        if not 0.0 < fov < math.pi:
            raise ValueError(f"fov must be in (0, pi) radians, got {fov}")
        focal = 0.5 * width / math.tan(0.5 * fov)
        return cls(focal, focal, 0.5 * width, 0.5 * height, width, height)


# The released model's default: fx = fy = 384, cx = cy = 256 on a 512 x 512 image.
DEFAULT_INTRINSICS = Intrinsics(fx=384.0, fy=384.0, cx=256.0, cy=256.0, width=512, height=512)


def _as_float_tensor(x: torch.Tensor | list | tuple) -> torch.Tensor:
    return x.float() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float32)


def look_at(
    positions: torch.Tensor,
    target: torch.Tensor | tuple[float, float, float] = (0.0, 0.0, 0.0),
    up: torch.Tensor | tuple[float, float, float] = WORLD_UP,
) -> torch.Tensor:
    """Cam-to-world poses of cameras at `positions` looking at `target`.

    positions: (..., 3) -> poses (..., 4, 4). The camera z axis points from the target to the camera,
    x = normalise(up x z), y = z x x, so the camera looks along -z with y up (OpenGL convention).
    """
    positions = _as_float_tensor(positions)
    target = _as_float_tensor(target).to(positions.device).expand_as(positions)
    up = _as_float_tensor(up).to(positions.device).expand_as(positions)
    z_axis = positions - target
    z_norm = z_axis.norm(dim=-1, keepdim=True)
    if bool((z_norm < 1e-8).any()):
        raise ValueError("look_at: a camera position coincides with the target; move the camera away from it")
    z_axis = z_axis / z_norm
    x_axis = torch.linalg.cross(up, z_axis, dim=-1)
    x_norm = x_axis.norm(dim=-1, keepdim=True)
    if bool((x_norm < 1e-8).any()):
        raise ValueError("look_at: the viewing direction is parallel to the up vector; choose another up vector")
    x_axis = x_axis / x_norm
    y_axis = torch.linalg.cross(z_axis, x_axis, dim=-1)
    pose = torch.zeros(*positions.shape[:-1], 4, 4, dtype=positions.dtype, device=positions.device)
    pose[..., :3, 0] = x_axis
    pose[..., :3, 1] = y_axis
    pose[..., :3, 2] = z_axis
    pose[..., :3, 3] = positions
    pose[..., 3, 3] = 1.0
    return pose


def spherical_to_cartesian(
    azimuth: torch.Tensor, elevation: torch.Tensor, radius: torch.Tensor | float
) -> torch.Tensor:
    """Points on a z-up sphere: azimuth from +x towards +y, elevation above the xy plane. -> (..., 3)"""
    azimuth, elevation = _as_float_tensor(azimuth), _as_float_tensor(elevation)
    return torch.stack(
        [
            radius * torch.cos(azimuth) * torch.cos(elevation),
            radius * torch.sin(azimuth) * torch.cos(elevation),
            radius * torch.sin(elevation) * torch.ones_like(azimuth),
        ],
        dim=-1,
    )


def orbit_azimuths(n_views: int, azimuth_offset: float = 0.0) -> torch.Tensor:
    """Azimuths 2*pi*i/n + offset for i in [0, n): (n,)."""
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    return torch.arange(n_views, dtype=torch.float32) * (2 * math.pi / n_views) + azimuth_offset


def orbit_poses(n_views: int, elevation: float, radius: float, azimuth_offset: float = 0.0) -> torch.Tensor:
    """Cam-to-world poses of `n_views` cameras evenly spaced in azimuth, looking at the origin: (n, 4, 4)."""
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if not -math.pi / 2 < elevation < math.pi / 2:
        raise ValueError(f"elevation must be in (-pi/2, pi/2) radians, got {elevation}")
    azimuths = orbit_azimuths(n_views, azimuth_offset)
    positions = spherical_to_cartesian(azimuths, torch.full_like(azimuths, elevation), radius)
    return look_at(positions)


def canonical_source_pose() -> torch.Tensor:
    """The released model's input camera: cam-to-world (4, 4) at (1, 0, 0) looking at the origin.

    The released code names a distance of 1.5 but never applies it; this is the matrix it used.
    """
    return torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )


def _check_pose(pose: torch.Tensor, name: str) -> None:
    if pose.shape[-2:] not in ((4, 4), (3, 4)):
        raise ValueError(f"{name} must end in (4, 4) or (3, 4), got shape {tuple(pose.shape)}")
    if not bool(torch.isfinite(pose).all()):
        raise ValueError(f"{name} holds NaN or inf values; check the camera poses of this sample")


def source_camera_vector(
    pose: torch.Tensor, intrinsics: Intrinsics | torch.Tensor = DEFAULT_INTRINSICS
) -> torch.Tensor:
    """The 16-number encoder camera: 3x4 cam-to-world row-major, then fx/W, fy/H, cx/W, cy/H.

    pose: (..., 4, 4) or (..., 3, 4); intrinsics: an `Intrinsics` or normalised (..., 3, 3) -> (..., 16).
    """
    _check_pose(pose, "pose")
    pose = pose.float()
    if isinstance(intrinsics, Intrinsics):
        intr = torch.tensor(intrinsics.normalized(), device=pose.device).expand(*pose.shape[:-2], 4)
    else:
        k = intrinsics.float().to(pose.device)
        intr = torch.stack([k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]], dim=-1)
        intr = intr.expand(*pose.shape[:-2], 4)
    return torch.cat([pose[..., :3, :].reshape(*pose.shape[:-2], 12), intr], dim=-1)


def render_camera_vector(
    pose: torch.Tensor, intrinsics: Intrinsics | torch.Tensor = DEFAULT_INTRINSICS
) -> torch.Tensor:
    """The 25-number render camera: 4x4 cam-to-world row-major, then the normalised 3x3 intrinsics.

    pose: (..., 4, 4) or (..., 3, 4); intrinsics: an `Intrinsics` or normalised (..., 3, 3) -> (..., 25).
    """
    _check_pose(pose, "pose")
    pose = pose.float()
    if pose.shape[-2] == 3:
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=pose.device).expand(*pose.shape[:-2], 1, 4)
        pose = torch.cat([pose, bottom], dim=-2)
    k = intrinsics.normalized_matrix() if isinstance(intrinsics, Intrinsics) else intrinsics.float()
    k = k.to(pose.device).expand(*pose.shape[:-2], 3, 3)
    return torch.cat([pose.reshape(*pose.shape[:-2], 16), k.reshape(*pose.shape[:-2], 9)], dim=-1)


def split_render_camera(camera: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 25) -> cam-to-world (..., 4, 4) and normalised intrinsics (..., 3, 3)."""
    if camera.shape[-1] != RENDER_CAMERA_DIM:
        raise ValueError(f"render cameras must have {RENDER_CAMERA_DIM} numbers, got shape {tuple(camera.shape)}")
    return camera[..., :16].unflatten(-1, (4, 4)), camera[..., 16:].unflatten(-1, (3, 3))


def canonical_source_camera(batch_size: int = 1, intrinsics: Intrinsics = DEFAULT_INTRINSICS) -> torch.Tensor:
    """The released model's encoder camera for a front view: (batch_size, 16)."""
    return source_camera_vector(canonical_source_pose(), intrinsics).expand(batch_size, SOURCE_CAMERA_DIM).clone()


def turntable_cameras(
    n_frames: int = 160,
    radius: float = 1.5,
    elevation: float = 0.0,
    azimuth_offset: float = 0.0,
    intrinsics: Intrinsics = DEFAULT_INTRINSICS,
) -> torch.Tensor:
    """Render cameras for a 360-degree video: (n_frames, 25). The released code adds a random offset
    in [0, pi/180) to the azimuth; pass it as `azimuth_offset` to reproduce that."""
    return render_camera_vector(orbit_poses(n_frames, elevation, radius, azimuth_offset), intrinsics)


# Entries of each camera vector that carry pose or intrinsics; the rest are constant 0s and 1s.
_SOURCE_NOISE_MASK = torch.ones(SOURCE_CAMERA_DIM, dtype=torch.bool)
_RENDER_NOISE_MASK = torch.tensor(
    [True] * 12 + [False] * 4 + [True, False, True, False, True, True, False, False, False]
)


def add_camera_noise(
    camera: torch.Tensor, scale: float = 0.02, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add uniform noise in [-scale, scale] to a camera vector's extrinsic and intrinsic entries.

    camera: (..., 16) source or (..., 25) render cameras. For render cameras only the 3x4 pose and
    fx, cx, fy, cy change; the constant row [0, 0, 0, 1] and the zeros/ones of K stay exact.
    """
    if scale < 0:
        raise ValueError(f"camera noise scale must be >= 0, got {scale}")
    if camera.shape[-1] == SOURCE_CAMERA_DIM:
        mask = _SOURCE_NOISE_MASK
    elif camera.shape[-1] == RENDER_CAMERA_DIM:
        mask = _RENDER_NOISE_MASK
    else:
        raise ValueError(
            f"camera vectors have {SOURCE_CAMERA_DIM} or {RENDER_CAMERA_DIM} numbers, got shape {tuple(camera.shape)}"
        )
    if scale == 0:
        return camera.clone()
    noise = (torch.rand(camera.shape, generator=generator, dtype=camera.dtype, device=camera.device) * 2 - 1) * scale
    return camera + noise * mask.to(camera.device, camera.dtype)


def canonicalize_poses(poses: torch.Tensor, reference: int | torch.Tensor = 0) -> torch.Tensor:
    """Rotate the world about the origin so the reference camera takes the canonical source orientation.

    poses: (N, 4, 4) cam-to-world; reference: a view index or a (4, 4) pose -> (N, 4, 4). Distances to
    the object at the origin are kept: the reference camera ends on the +x axis looking at the origin,
    which is how the LRM sees its input view (its source camera is `canonical_source_camera`).
    """
    _check_pose(poses, "poses")
    ref = poses[reference] if isinstance(reference, int) else reference
    world_rotation = canonical_source_pose()[:3, :3].to(poses) @ ref[:3, :3].transpose(0, 1)
    transform = torch.eye(4, dtype=poses.dtype, device=poses.device)
    transform[:3, :3] = world_rotation
    return transform @ poses
