import dataclasses
import math

import pytest
import torch

from vfusion3d_lightning.cameras import Intrinsics, look_at, render_camera_vector, turntable_cameras
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.renderer import camera_rays, ray_box_limits, sample_triplane

NARROW = Intrinsics.from_fov(math.radians(10), 5)  # nearly parallel rays; the centre pixel hits the origin


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LRM(LRMConfig.from_name("tiny")).eval()


def constant_field(model: LRM, density: float, colour: float) -> None:
    """Make the decoder output one density and grey level everywhere (weights 0, biases set)."""
    raw_sigma = 1.0 + math.log(math.expm1(density))  # inverse of softplus(x - 1)
    logit = math.log((colour + 0.001) / (1.001 - colour))  # inverse of sigmoid(x) * 1.002 - 0.001
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        model.decoder.layers[-1].bias.copy_(torch.tensor([raw_sigma, logit, logit, logit]))


def planes_for(model: LRM, batch: int = 1) -> torch.Tensor:
    c, r = model.config.triplane_dim, model.config.triplane_high_res
    return torch.randn(batch, 3, c, r, r)


def camera_at(position, target=(0.0, 0.0, 0.0), intrinsics=NARROW) -> torch.Tensor:
    return render_camera_vector(look_at(torch.tensor(position), torch.tensor(target)), intrinsics)[None, None]


def test_empty_triplane_renders_white_with_zero_opacity():
    model = LRM(LRMConfig.from_name("tiny")).eval()
    with torch.no_grad():
        model.decoder.layers[-1].bias[0] = -30.0  # density softplus(-31) ~ 3e-14
    planes = torch.zeros(2, 3, model.config.triplane_dim, 16, 16)
    out = model.render(planes, turntable_cameras(3)[None].expand(2, -1, -1), size=12)
    assert torch.allclose(out.rgb, torch.ones_like(out.rgb), atol=1e-6)
    assert out.opacity.abs().max() < 1e-6


def test_constant_density_gives_beer_lambert_opacity_and_colour():
    model = LRM(dataclasses.replace(LRMConfig.from_name("tiny"),
                                    coarse_samples=64, importance_samples=64)).eval()
    density, grey = 0.5, 0.2
    constant_field(model, density, grey)
    out = model.render(planes_for(model), camera_at((3.0, 0.0, 0.0)), size=5,
                       generator=torch.Generator().manual_seed(0))
    centre_opacity = out.opacity[0, 0, 0, 2, 2].item()
    # the centre ray crosses 2 units of the box: 1 - exp(-0.5 * 2), less up to two sample spacings at the walls
    expected = 1 - math.exp(-density * 2.0)
    assert expected - 0.02 < centre_opacity <= expected + 1e-4
    # constant colour over a white background
    assert torch.allclose(out.rgb[0, 0], grey * out.opacity[0, 0] + (1 - out.opacity[0, 0]), atol=1e-4)


def test_dense_field_depth_is_the_box_entry_distance():
    dense = LRM(dataclasses.replace(LRMConfig.from_name("tiny"),
                                    coarse_samples=64, importance_samples=64)).eval()
    constant_field(dense, 200.0, 0.5)
    for seed in range(4):
        out = dense.render(planes_for(dense), camera_at((3.0, 0.0, 0.0)), size=5,
                           generator=torch.Generator().manual_seed(seed))
        assert out.opacity[0, 0, 0, 2, 2].item() > 0.999
        # the wall x = 1 is 2 units away; the first interval's midpoint, where the weight is, lies within 1.5
        # sample spacings (2/63) behind it whatever the jitter
        assert 2.0 <= out.depth[0, 0, 0, 2, 2].item() < 2.0 + 1.5 * 2 / 63


def test_rays_that_miss_the_box_render_background():
    model = LRM(LRMConfig.from_name("tiny")).eval()
    constant_field(model, 5.0, 0.0)
    out = model.render(planes_for(model), camera_at((3.0, 0.0, 0.0), target=(6.0, 0.0, 0.0)), size=5)
    assert torch.allclose(out.rgb, torch.ones_like(out.rgb)) and out.opacity.max() == 0


def test_render_shapes_for_images_and_patches(model):
    planes = planes_for(model, batch=2)
    cameras = turntable_cameras(3)[None].expand(2, -1, -1)
    full = model.render(planes, cameras, size=16)
    assert full.rgb.shape == (2, 3, 3, 16, 16)
    assert full.depth.shape == full.opacity.shape == (2, 3, 1, 16, 16)
    patch = model.render(planes, cameras, size=32, patch=(4, 10, 8))
    assert patch.rgb.shape == (2, 3, 3, 8, 8) and patch.opacity.shape == (2, 3, 1, 8, 8)
    chunked = model.render(planes, cameras, size=16, max_rays=100)
    assert chunked.rgb.shape == full.rgb.shape
    for out in (full, patch, chunked):
        assert torch.isfinite(out.rgb).all() and torch.isfinite(out.depth).all()
        assert out.opacity.min() >= 0 and out.opacity.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        model.render(planes, cameras, size=16, patch=(10, 0, 8))


def test_patch_rays_are_the_crop_of_the_full_image_rays():
    cameras = turntable_cameras(2)
    origins, directions = camera_rays(cameras, 20)
    patch_origins, patch_directions = camera_rays(cameras, 20, patch=(3, 7, 6))
    full = directions.reshape(2, 20, 20, 3)[:, 7:13, 3:9].reshape(2, 36, 3)
    assert torch.equal(patch_directions, full)
    assert torch.equal(patch_origins, origins[:, :36])


def test_ray_directions_follow_the_opengl_camera():
    # canonical camera at (1,0,0) looking down -x, image up = world +z, image right = world +y
    origins, directions = camera_rays(camera_at((1.0, 0.0, 0.0), intrinsics=Intrinsics.from_fov(1.0, 3))[0, 0], 3)
    assert torch.allclose(directions[4], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)  # centre pixel
    top_left = directions[0]
    assert top_left[2] > 0 and top_left[1] < 0
    assert torch.allclose(directions.norm(dim=-1), torch.ones(9))
    assert torch.allclose(origins, torch.tensor([1.0, 0.0, 0.0]).expand(9, 3))


def test_ray_box_limits():
    origins = torch.tensor([[[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    directions = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # through the box, and a miss
    near, far = ray_box_limits(origins, directions, 1.0)
    assert near[0, 0].item() == pytest.approx(2.0) and far[0, 0].item() == pytest.approx(4.0)
    # the miss gets the hits' smallest and largest entry distance
    assert near[0, 1].item() == pytest.approx(2.0) and far[0, 1].item() == pytest.approx(2.0)
    # a box behind the camera is missed; a camera inside the box samples from itself on
    behind, _ = ray_box_limits(origins[:, :1], -directions[:, :1], 1.0)
    assert behind.item() == 0.0
    inside_near, inside_far = ray_box_limits(torch.zeros(1, 1, 3), directions[:, :1], 1.0)
    assert inside_near.item() == 0.0 and inside_far.item() == pytest.approx(1.0)


def test_plane_axes_are_xy_xz_zy():
    size = 8
    ramp = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres, align_corners=False
    u = ramp.view(1, size).expand(size, size)  # varies along width: the plane's first coordinate
    v = ramp.view(size, 1).expand(size, size)  # varies along height: the second coordinate
    planes = torch.stack([torch.stack([u, v])] * 3)[None]  # (1, 3, 2, H, W)
    points = torch.tensor([[[0.25, -0.5, 0.375], [-0.125, 0.125, -0.625]]])
    features = sample_triplane(planes, points).view(1, 2, 3, 2)
    x, y, z = points[0].unbind(-1)
    assert torch.allclose(features[0, :, 0], torch.stack([x, y], -1), atol=1e-6)
    assert torch.allclose(features[0, :, 1], torch.stack([x, z], -1), atol=1e-6)
    assert torch.allclose(features[0, :, 2], torch.stack([z, y], -1), atol=1e-6)


def test_point_queries_are_deterministic_and_activated(model):
    planes = planes_for(model, batch=2)
    points = torch.rand(2, 500, 3) * 2 - 1
    density, rgb = model.query(planes, points)
    density_again, rgb_again = model.query(planes, points)
    assert torch.equal(density, density_again) and torch.equal(rgb, rgb_again)
    assert density.shape == (2, 500, 1) and rgb.shape == (2, 500, 3)
    assert density.min() >= 0
    assert rgb.min() >= -0.001 and rgb.max() <= 1.001
    with pytest.raises(ValueError, match="points must be"):
        model.query(planes, points[0])


def test_projected_planes_render_as_the_released_concatenated_features(model):
    # the renderer projects each plane by its block of the first layer once (and, under autograd, samples
    # in groups, 45 rays of 16 samples padding the last group); the release decodes the 3C concatenated
    # features of every sample: the same function, forward and backward
    torch.manual_seed(1)
    planes = planes_for(model, batch=2).requires_grad_()
    cameras = turntable_cameras(3, radius=2.0)[None].expand(2, -1, -1)

    def render(project: bool):
        model.renderer.project_planes = project
        try:
            out = model.render(planes, cameras, size=12, generator=torch.Generator().manual_seed(3), max_rays=45)
        finally:
            model.renderer.project_planes = True
        loss = out.rgb.square().mean() + out.opacity.mean()
        grads = torch.autograd.grad(loss, [planes, *model.decoder.parameters()])
        return out, grads

    fast, fast_grads = render(True)
    released, released_grads = render(False)
    for name in ("rgb", "depth", "opacity"):
        torch.testing.assert_close(getattr(fast, name), getattr(released, name), atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(fast_grads, released_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    assert fast.opacity.std() > 0  # a field with structure, not a constant


def test_renderer_checkpointing_gives_the_same_gradients():
    model = LRM(LRMConfig.from_name("tiny"))
    planes = torch.randn(2, 3, 8, 16, 16)
    cameras = turntable_cameras(2, elevation=0.3)[None].expand(2, -1, -1)

    def gradients(checkpointing: bool):
        model.set_gradient_checkpointing(checkpointing)
        model.zero_grad()
        leaf = planes.clone().requires_grad_(True)
        generator = torch.Generator().manual_seed(5)
        out = model.render(leaf, cameras, 12, patch=(2, 2, 8), generator=generator, max_rays=50)
        (out.rgb.square().sum() + out.opacity.sum()).backward()
        after = torch.rand(1, generator=generator)  # the generator moves on as without checkpointing
        return out.rgb.detach(), leaf.grad, model.decoder.layers[1].weight.grad.clone(), after

    plain, checkpointed = gradients(False), gradients(True)
    assert model.renderer.gradient_checkpointing
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6)
    assert plain[1].abs().sum() > 0
    model.set_gradient_checkpointing(False)
