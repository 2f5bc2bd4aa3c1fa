"""The one-kernel field query (fused_field.py) and empty-space skipping.

The kernel runs here on the CPU under Triton's interpreter, which is chosen when Triton is imported, so its
checks run in a child process with TRITON_INTERPRET=1 and report their measurements as JSON.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vfusion3d_lightning.cameras import turntable_cameras
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.analytic import write_sphere
from vfusion3d_lightning.models.lrm.renderer import density_activation

INTERPRETED_CHECKS = textwrap.dedent("""
    import dataclasses, json, torch
    from vfusion3d_lightning.cameras import turntable_cameras
    from vfusion3d_lightning.models.lrm import LRM, LRMConfig
    from vfusion3d_lightning.models.lrm.analytic import write_sphere
    from vfusion3d_lightning.models.lrm.fused_field import FusedField, fused_field_supported
    from vfusion3d_lightning.models.lrm.renderer import TriplaneDecoder, sample_projected

    torch.manual_seed(0)
    report = {"supported": fused_field_supported(torch.device("cpu"), 16),
              "supported_width_24": fused_field_supported(torch.device("cpu"), 24), "queries": []}
    for layers, width in ((4, 16), (2, 16), (3, 32)):
        decoder = TriplaneDecoder(3 * 8, width, layers)
        projected = decoder.project(torch.randn(2, 3, 8, 12, 10))
        points = torch.rand(2, 150, 3) * 2.6 - 1.3  # some outside the box: zero padding
        item = torch.arange(2).repeat_interleave(150)
        with torch.no_grad():
            ref_sigma, ref_rgb = decoder.decode_projected(sample_projected(projected, points))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half_sigma, half_rgb = decoder.decode_projected(sample_projected(projected, points))
            for bf16 in (False, True):
                sigma, rgb = FusedField(projected, decoder, 2.0, bf16)(points.reshape(-1, 3), item)
                sigma, rgb = sigma.reshape(2, 150, 1), rgb.reshape(2, 150, 3)
                report["queries"].append({
                    "layers": layers, "width": width, "bf16": bf16, "scale": ref_sigma.abs().max().item(),
                    "sigma": (sigma - ref_sigma).abs().max().item(), "rgb": (rgb - ref_rgb).abs().max().item(),
                    "autocast_sigma": (half_sigma.float() - ref_sigma).abs().max().item()})

    model = LRM(dataclasses.replace(LRMConfig.tiny(), coarse_samples=12, importance_samples=12)).eval()
    planes = write_sphere(model, 0.5)
    cameras = turntable_cameras(2)[None]

    def render(fused, occupancy=None):
        model.renderer.fused = fused
        with torch.no_grad():
            return model.render(planes, cameras, 12, generator=torch.Generator().manual_seed(3), occupancy=occupancy)

    unfused, fused = render(False), render(True)
    skipped = render(True, model.occupancy(planes, 16))
    report["render_fused"] = (fused.rgb - unfused.rgb).abs().max().item()
    report["render_fused_opacity"] = (fused.opacity - unfused.opacity).abs().max().item()
    report["render_skipped"] = (skipped.rgb - unfused.rgb).abs().max().item()
    planes.requires_grad_(True)
    report["fused_with_gradient"] = model.renderer.field(planes, model.decoder).fused is not None
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED_CHECKS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fused_query_equals_the_projected_decoder(interpreted):
    assert interpreted["supported"] and not interpreted["supported_width_24"]
    for query in interpreted["queries"]:
        if query["bf16"]:
            # bf16 planes, weights and activations: the error of bf16 autocast, not more
            assert query["sigma"] < max(4 * query["autocast_sigma"], 2e-2 * query["scale"]), query
            assert query["rgb"] < 2e-3, query
        else:
            assert query["sigma"] < 1e-5 and query["rgb"] < 1e-6, query


def test_fused_render_equals_the_unfused_render(interpreted):
    assert interpreted["render_fused"] < 1e-5
    assert interpreted["render_fused_opacity"] < 1e-5
    assert interpreted["render_skipped"] < 2e-3
    # training needs gradients to the planes: the unfused path
    assert not interpreted["fused_with_gradient"]


@pytest.fixture(scope="module")
def sphere_model():
    model = LRM(dataclasses.replace(LRMConfig.tiny(), coarse_samples=32, importance_samples=32)).eval()
    return model, write_sphere(model, 0.5)


def test_sphere_field_has_its_surface_at_the_radius(sphere_model):
    model, planes = sphere_model
    directions = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    with torch.no_grad():
        density = [model.query(planes, (directions * r)[None])[0].flatten() for r in (0.2, 0.5, 0.8, 0.97)]
    assert density[0].min() > 2  # solid inside
    assert (density[1] - 1).abs().max() < 0.5  # density 1 on the sphere, up to bilinear sampling of r^2
    assert density[2].max() < 0.05 and density[3].max() < 1e-3  # empty towards the box


def test_occupancy_holds_every_point_with_density(sphere_model):
    model, planes = sphere_model
    with torch.no_grad():
        occupancy = model.occupancy(planes, resolution=24)
        points = torch.rand(1, 20000, 3) * 2 - 1
        raw_sigma, _ = model.renderer.query(planes, model.decoder, points)
    threshold = 0.5 / 255 / (2 * 3**0.5)
    has_density = density_activation(raw_sigma)[0, :, 0] > threshold
    occupied = occupancy(points)[0]
    assert has_density.any() and bool(occupied[has_density].all())
    assert 0.05 < occupancy.fraction < 0.5  # the corners of the box are skipped
    assert not occupancy(torch.tensor([[[1.5, 0.0, 0.0]]]))[0, 0]  # outside the box


def test_skipping_empty_space_renders_the_same_frames(sphere_model):
    model, planes = sphere_model
    cameras = turntable_cameras(3, elevation=0.3)[None]
    with torch.no_grad():
        full = model.render(planes, cameras, 24, generator=torch.Generator().manual_seed(0))
        occupancy = model.occupancy(planes, resolution=32)
        skipped = model.render(planes, cameras, 24, generator=torch.Generator().manual_seed(0), occupancy=occupancy)
        other_jitter = model.render(planes, cameras, 24, generator=torch.Generator().manual_seed(1))
    assert full.opacity.max() > 0.9 and full.opacity.min() < 0.01  # the sphere and the background are both seen
    gap = (skipped.rgb - full.rgb).abs()
    assert gap.max() < 2e-3
    assert gap.mean() < (other_jitter.rgb - full.rgb).abs().mean()  # below the noise of sample jitter
    assert torch.allclose(skipped.opacity, full.opacity, atol=2e-3)


def test_occupancy_rejects_a_bad_resolution(sphere_model):
    model, planes = sphere_model
    with pytest.raises(ValueError, match="occupancy resolution"):
        model.occupancy(planes, resolution=0)
