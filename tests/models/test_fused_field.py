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

    # gradients: the backward kernel against autograd through the unfused query, fp32 and bf16
    report["gradients"] = []
    # sparse: no upstream gradient for most points, so that the bf16 backward kernel skips whole blocks
    for layers, width, bf16, sparse in ((4, 16, False, False), (2, 16, False, False), (3, 32, False, False),
                                        (4, 16, True, False), (4, 16, True, True)):
        decoder = TriplaneDecoder(3 * 8, width, layers)
        for layer in decoder.layers:
            torch.nn.init.normal_(layer.bias, std=0.1)
        planes = torch.randn(2, 3, 8, 6, 5, requires_grad=True)
        points = torch.rand(2, 70, 3) * 2.4 - 1.2
        up_sigma, up_rgb = torch.randn(2, 70, 1), torch.randn(2, 70, 3)
        if sparse:
            up_sigma[:, :50], up_rgb[:, :50] = 0.0, 0.0

        def gradients(mode):
            decoder.zero_grad()
            planes.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast" or (mode == "fused" and bf16)):
                projected = decoder.project(planes)
                if mode == "fused":
                    sigma, rgb = FusedField(projected, decoder, 2.0, bf16)(points.reshape(-1, 3),
                                                                          torch.arange(2).repeat_interleave(70))
                else:
                    sigma, rgb = decoder.decode_projected(sample_projected(projected, points))
            sigma, rgb = sigma.reshape(2, -1, 1)[:, :70].float(), rgb.reshape(2, -1, 3)[:, :70].float()
            ((sigma * up_sigma).sum() + (rgb * up_rgb).sum()).backward()
            return [planes.grad.clone()] + [p.grad.clone() for p in decoder.parameters()]

        def relative(a, b):
            return max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b))

        reference = gradients("fp32")
        report["gradients"].append({"layers": layers, "width": width, "bf16": bf16, "sparse": sparse,
                                    "fused": relative(reference, gradients("fused")),
                                    "autocast": relative(reference, gradients("autocast")) if bf16 else None})

    model = LRM(dataclasses.replace(LRMConfig.from_name("tiny"),
                                    coarse_samples=12, importance_samples=12)).eval()
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
    model.renderer.fused_training = False
    report["fused_with_gradient_off"] = model.renderer.field(planes, model.decoder).fused is not None
    # a training render with the fused query under autograd: the same gradients
    grads = []
    for fused_training in (False, True):
        model.renderer.fused_training = fused_training
        planes.grad = None
        out = model.render(planes, cameras, 6, patch=(1, 1, 4), generator=torch.Generator().manual_seed(3))
        (out.rgb.square().sum() + out.opacity.sum()).backward()
        grads.append(planes.grad.clone())
    report["render_gradient"] = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
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


def test_fused_gradients_equal_autograd_of_the_unfused_query(interpreted):
    assert any(case["sparse"] for case in interpreted["gradients"])
    for case in interpreted["gradients"]:
        if case["bf16"]:
            # bf16 products in the backward: the error of bf16 autocast, not much more
            assert case["fused"] < max(3 * case["autocast"], 0.1), case
        else:
            assert case["fused"] < 1e-5, case
    assert interpreted["render_gradient"] < 1e-4


def test_fused_render_equals_the_unfused_render(interpreted):
    assert interpreted["render_fused"] < 1e-5
    assert interpreted["render_fused_opacity"] < 1e-5
    assert interpreted["render_skipped"] < 2e-3
    # training takes the fused query under autograd too, unless renderer.fused_training is off
    assert interpreted["fused_with_gradient"] and not interpreted["fused_with_gradient_off"]


@pytest.fixture(scope="module")
def sphere_model():
    model = LRM(dataclasses.replace(LRMConfig.from_name("tiny"),
                                    coarse_samples=32, importance_samples=32)).eval()
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


KERNEL_ARGUMENTS = {
    "forward": ("points item planes first_bias hidden_weights hidden_biases last_weight last_bias out count height "
                "width scale"),
    "backward": ("points item planes first_bias hidden_weights hidden_biases last_weight last_bias grad_out "
                 "grad_planes grad_first_bias grad_hidden_weights grad_hidden_biases grad_last_weight grad_last_bias "
                 "count height width scale copy_size copies"),
}


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_kernels_compile_for_an_h100_without_one(direction, bf16):
    # The interpreter runs the kernels' Python, not Triton's compiler, whose stricter rules (constexpr loops
    # and branches, operand dtypes) failed twice on the GPU only. Compiling for sm_90 needs no GPU.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vfusion3d_lightning.models.lrm import fused_field

    kernel = {"forward": fused_field._triplane_field_kernel,
              "backward": fused_field._triplane_field_backward_kernel}[direction]
    packed = "*bf16" if bf16 else "*fp32"
    types = {"item": "*i32", "planes": packed, "hidden_weights": packed, "last_weight": packed, "scale": "fp32",
             **{name: "i32" for name in ("count", "height", "width", "copy_size", "copies")}}
    signature = {name: types.get(name, "*fp32") for name in KERNEL_ARGUMENTS[direction].split()}
    # the launches the code makes
    block, warps = (fused_field.BACKWARD_LAUNCH[bf16][:2] if direction == "backward"
                    else (fused_field.BLOCK, fused_field.NUM_WARPS))
    constants = {"D": 64, "HIDDEN_LAYERS": 2, "OUT": fused_field.OUT_WIDTH, "BLOCK_SIZE": block, "BF16": bf16}
    if direction == "backward":
        constants["SKIP_EMPTY"] = bf16
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert ".target sm_90" in compiled.asm["ptx"]
    if bf16:  # the decoder's products run on tensor cores
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in compiled.asm["ptx"]
