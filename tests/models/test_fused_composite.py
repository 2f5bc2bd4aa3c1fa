"""The compositing kernels (fused_composite.py) against the torch compositing of VolumeRenderer.

They run here on the CPU under Triton's interpreter, chosen when Triton is imported: the checks run in a child
process with TRITON_INTERPRET=1 and report as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHECKS = textwrap.dedent("""
    import json, torch
    from vfusion3d_lightning.models.lrm.fused_composite import composite_fused, fused_composite_supported
    from vfusion3d_lightning.models.lrm.renderer import VolumeRenderer

    torch.manual_seed(0)
    report = {"supported": fused_composite_supported(torch.device("cpu")), "cases": []}
    renderer = VolumeRenderer()
    for samples, opaque in ((2, False), (5, False), (33, False), (33, True)):
        depths = torch.rand(2, 7, samples, 1).sort(dim=-2).values * 3 + 1
        raw = torch.randn(2, 7, samples, 1) * 3
        if opaque:  # alpha exactly 1 somewhere: nothing behind it may get a gradient through 1 / (1 - alpha)
            raw[:, :3, samples // 2:] = 200.0
        # outside the box, as renderer._shade pads: part of one ray, and the whole of another (an empty ray,
        # whose depth must be the farthest and its gradients finite)
        raw[0, 0, :1] = torch.finfo(torch.float32).min / 3 if samples > 2 else raw[0, 0, :1]
        raw[1, 0] = torch.finfo(torch.float32).min / 3
        rgb = torch.rand(2, 7, samples, 3)
        upstream = [torch.randn(2, 7, 3), torch.randn(2, 7, 1), torch.randn(2, 7, 1), torch.randn(2, 7, samples - 1, 1)]
        results = []
        for fused in (False, True):
            renderer.fused_training = fused
            leaves = [rgb.clone().requires_grad_(), raw.clone().requires_grad_()]
            color, depth, opacity, weights = renderer.composite(leaves[0], leaves[1], depths)
            loss = sum((out * up).sum() for out, up in zip((color, depth, opacity, weights), upstream))
            loss.backward()
            results.append([color, depth, opacity, weights, leaves[0].grad, leaves[1].grad])

        def relative(a, b):
            return ((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-12)).item()

        names = ["color", "depth", "opacity", "weights", "grad_rgb", "grad_raw"]
        report["cases"].append({"samples": samples, "opaque": opaque, "finite": all(
            bool(torch.isfinite(t).all()) for result in results for t in result[4:]),
            "empty_depth": [result[1][1, 0, 0].item() for result in results], "far": depths.max().item(),
            **{name: relative(f, r) for name, f, r in zip(names, results[1], results[0])}})
    try:
        composite_fused(torch.rand(3, 1, 3), torch.rand(3, 1, 1), torch.rand(3, 1, 1))
    except ValueError as error:
        report["one_sample"] = str(error)
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fused_compositing_equals_torch_with_gradients(interpreted):
    assert interpreted["supported"]
    for case in interpreted["cases"]:
        assert case["finite"], case
        # an empty ray's depth is the farthest sample depth (as released)
        assert case["empty_depth"] == [case["far"], case["far"]], case
        for name in ("color", "depth", "opacity", "weights", "grad_rgb", "grad_raw"):
            assert case[name] < 1e-5, (name, case)


def test_fused_compositing_needs_two_samples(interpreted):
    assert interpreted["one_sample"] == "compositing needs at least 2 samples a ray, got 1"


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_compositing_kernels_compile_for_an_h100_without_one(direction):
    # the interpreter runs the kernels' Python; Triton's compiler has stricter rules (loop-carried types)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vfusion3d_lightning.models.lrm import fused_composite

    kernel = {"forward": fused_composite._composite_kernel,
              "backward": fused_composite._composite_backward_kernel}[direction]
    constants = {"S": 128, "COLUMNS": 128, "BLOCK": fused_composite.RAYS_PER_PROGRAM}
    signature = {name: "constexpr" if name in constants else "i32" if name == "ray_count" else "*fp32"
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": fused_composite.NUM_WARPS})
    assert ".target sm_90" in compiled.asm["ptx"]
