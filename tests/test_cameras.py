import math

import pytest
import torch

from vfusion3d_lightning.cameras import (
    DEFAULT_INTRINSICS,
    Intrinsics,
    add_camera_noise,
    canonical_source_camera,
    canonical_source_pose,
    canonicalize_poses,
    look_at,
    orbit_poses,
    render_camera_vector,
    source_camera_vector,
    split_render_camera,
    turntable_cameras,
)


def test_canonical_source_camera_is_the_released_vector():
    expected = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0.75, 0.75, 0.5, 0.5], dtype=torch.float32)
    camera = canonical_source_camera(batch_size=3)
    assert camera.shape == (3, 16)
    assert torch.equal(camera[0], expected)
    assert torch.equal(camera[2], expected)


def test_look_at_from_plus_x_reproduces_the_canonical_pose():
    # z = (1,0,0); x = up x z = (0,1,0); y = z x x = (0,0,1)
    pose = look_at(torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(pose, canonical_source_pose(), atol=1e-7)


def test_look_at_axes_by_hand_for_a_camera_on_plus_y():
    pose = look_at(torch.tensor([0.0, 1.5, 0.0]))
    assert torch.allclose(pose[:3, 0], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-7)  # x = (0,0,1) x (0,1,0)
    assert torch.allclose(pose[:3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-7)  # y = z x x: world up
    assert torch.allclose(pose[:3, 2], torch.tensor([0.0, 1.0, 0.0]), atol=1e-7)  # z: target -> camera
    assert torch.allclose(pose[:3, 3], torch.tensor([0.0, 1.5, 0.0]))
    assert torch.equal(pose[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_orbit_positions_and_orientation():
    poses = orbit_poses(4, elevation=0.0, radius=1.5)
    expected = torch.tensor([[1.5, 0, 0], [0, 1.5, 0], [-1.5, 0, 0], [0, -1.5, 0]])
    assert torch.allclose(poses[:, :3, 3], expected, atol=1e-6)
    high = orbit_poses(16, elevation=math.pi / 4, radius=2.0, azimuth_offset=0.1)
    positions = high[:, :3, 3]
    assert torch.allclose(positions[:, 2], torch.full((16,), 2.0 * math.sin(math.pi / 4)), atol=1e-6)
    assert torch.allclose(positions.norm(dim=-1), torch.full((16,), 2.0), atol=1e-6)
    azimuths = torch.atan2(positions[:, 1], positions[:, 0])
    steps = torch.remainder(azimuths.diff(), 2 * math.pi)
    assert torch.allclose(steps, torch.full((15,), 2 * math.pi / 16), atol=1e-5)
    assert abs(azimuths[0].item() - 0.1) < 1e-6
    rotations = high[:, :3, :3]
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(16, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(16), atol=1e-6)
    # every camera looks at the origin along its -z axis
    assert torch.allclose(positions - positions.norm(dim=-1, keepdim=True) * rotations[:, :, 2],
                          torch.zeros(16, 3), atol=1e-6)


def test_intrinsics_pixels_and_normalised():
    assert DEFAULT_INTRINSICS.normalized() == (0.75, 0.75, 0.5, 0.5)
    k = Intrinsics(fx=100.0, fy=80.0, cx=32.0, cy=24.0, width=64, height=48)
    assert torch.equal(k.matrix(), torch.tensor([[100.0, 0, 32], [0, 80, 24], [0, 0, 1]]))
    assert torch.allclose(k.normalized_matrix(), torch.tensor([[100 / 64, 0, 0.5], [0, 80 / 48, 0.5], [0, 0, 1]]))
    fov = Intrinsics.from_fov(math.pi / 2, 64)
    assert fov.fx == pytest.approx(32.0) and fov.cx == 32.0
    with pytest.raises(ValueError, match="focal"):
        Intrinsics(fx=0.0, fy=1.0, cx=0, cy=0, width=4, height=4)


def test_render_camera_vector_layout_and_split():
    pose = look_at(torch.tensor([0.3, -1.2, 0.7]))
    camera = render_camera_vector(pose)
    assert camera.shape == (25,)
    assert torch.equal(camera[:16], pose.reshape(16))
    assert torch.equal(camera[16:], torch.tensor([0.75, 0, 0.5, 0, 0.75, 0.5, 0, 0, 1]))
    back_pose, back_k = split_render_camera(camera)
    assert torch.equal(back_pose, pose) and torch.equal(back_k, DEFAULT_INTRINSICS.normalized_matrix())
    # a 3x4 pose gains the constant bottom row
    assert torch.equal(render_camera_vector(pose[:3]), camera)
    source = source_camera_vector(pose)
    assert torch.equal(source[:12], pose[:3].reshape(12))


def test_turntable_cameras_match_the_released_defaults():
    cameras = turntable_cameras(160)
    assert cameras.shape == (160, 25)
    pose, _ = split_render_camera(cameras)
    assert torch.allclose(pose[:, :3, 3].norm(dim=-1), torch.full((160,), 1.5))
    assert torch.allclose(pose[:, 2, 3], torch.zeros(160), atol=1e-6)


def test_nan_pose_is_refused():
    pose = torch.eye(4)
    pose[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        render_camera_vector(pose)


def test_camera_noise_touches_only_pose_and_intrinsics():
    camera = turntable_cameras(8)
    noisy = add_camera_noise(camera, 0.02, generator=torch.Generator().manual_seed(0))
    delta = noisy - camera
    assert delta.abs().max() <= 0.02
    changed = (delta != 0).any(dim=0)
    # 3x4 pose entries, fx, cx, fy, cy change; the [0,0,0,1] row and K's constants do not
    assert changed[:12].all() and not changed[12:16].any()
    assert changed[[16, 18, 20, 21]].all() and not changed[[17, 19, 22, 23, 24]].any()
    again = add_camera_noise(camera, 0.02, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    source = canonical_source_camera(4)
    noisy_source = add_camera_noise(source, 0.02)
    assert ((noisy_source - source) != 0).all() and (noisy_source - source).abs().max() <= 0.02
    assert torch.equal(add_camera_noise(source, 0.0), source)
    with pytest.raises(ValueError, match="16 or 25"):
        add_camera_noise(torch.zeros(3, 12))


def test_canonicalised_orbit_puts_the_reference_camera_on_plus_x():
    poses = orbit_poses(16, elevation=0.4, radius=1.5, azimuth_offset=0.3)
    canonical = canonicalize_poses(poses, reference=5)
    assert torch.allclose(canonical[5, :3, :3], canonical_source_pose()[:3, :3], atol=1e-6)
    assert torch.allclose(canonical[5, :3, 3], torch.tensor([1.5, 0.0, 0.0]), atol=1e-6)
    # a rigid rotation about the object: distances and relative poses are kept
    assert torch.allclose(canonical[:, :3, 3].norm(dim=-1), poses[:, :3, 3].norm(dim=-1), atol=1e-6)
    relative = torch.linalg.inv(poses[5]) @ poses
    assert torch.allclose(torch.linalg.inv(canonical[5]) @ canonical, relative, atol=1e-5)
