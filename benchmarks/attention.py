"""The LRM transformer's attention through each of torch's SDPA backends: speed and agreement.

    python benchmarks/attention.py [--batch-size 16] [--repeats 10]

Shapes of the `vfusion3d` config (16 heads of 64 channels): self-attention over 3,072 triplane tokens and
cross-attention from them to 1,297 image tokens, bf16. For each backend (flash, cuDNN, memory-efficient, and
torch's own choice): forward, and forward + backward, median GPU time (CUDA events) and achieved TFLOP/s
(4 * B * heads * Lq * Lk * 64 FLOPs forward, 2.5x that for the backward); and the largest difference of the
output and query gradient from the math backend in fp32, at batch 1.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import cuda_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
SHAPES = {"self (3072 x 3072)": (3072, 3072), "cross (3072 x 1297)": (3072, 1297)}
HEADS, HEAD_DIM = 16, 64


def inputs(batch: int, queries: int, keys: int, dtype=torch.bfloat16):
    generator = torch.Generator("cuda").manual_seed(0)
    return [torch.randn(batch, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype, generator=generator,
                        requires_grad=True) for length in (queries, keys, keys)]


def attend(backend: SDPBackend | None, q, k, v):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def agreement(backend: SDPBackend | None, queries: int, keys: int) -> float:
    """Largest |difference| of output and query gradient from fp32 math attention, at batch 1."""
    q, k, v = inputs(1, queries, keys)
    out = attend(backend, q, k, v)
    (grad_q,) = torch.autograd.grad(out.float().square().sum(), q)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    reference = attend(SDPBackend.MATH, q32, k32, v32)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), q32)
    return max((out.float() - reference).abs().max().item(), (grad_q.float() - reference_grad).abs().max().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py times CUDA kernels; run it on a GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"batch {args.batch_size}, {HEADS} heads of {HEAD_DIM}, bf16")
    print("| attention | backend | forward | TFLOP/s | forward + backward | TFLOP/s | max error vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape_name, (queries, keys) in SHAPES.items():
        flops = 4 * args.batch_size * HEADS * queries * keys * HEAD_DIM
        q, k, v = inputs(args.batch_size, queries, keys)
        grad = torch.randn(args.batch_size, HEADS, queries, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        for name, backend in [("default", None), *BACKENDS.items()]:
            try:
                error = agreement(backend, queries, keys)

                def forward():
                    with torch.no_grad():
                        attend(backend, q, k, v)

                def forward_backward():
                    attend(backend, q, k, v).backward(grad)

                forward_ms = cuda_ms(forward, args.repeats, warmup=3)
                both_ms = cuda_ms(forward_backward, args.repeats, warmup=3)
            except RuntimeError as err:  # a backend that does not take these shapes here
                print(f"| {shape_name} | {name} | unavailable: {str(err).splitlines()[0][:80]} | | | | |")
                continue
            print(f"| {shape_name} | {name} | {forward_ms:.2f} ms | {flops / forward_ms / 1e9:.0f} | {both_ms:.2f} ms "
                  f"| {3.5 * flops / both_ms / 1e9:.0f} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
