"""The tolerance table of the testing guide, and the comparisons built on it.

Relative error ||out - ref|| / ||ref|| against an fp64 reference computed from the same rounded
inputs; for fp16 / bf16 also the ratio check |kernel - ref64| <= 2 |eager same dtype - ref64| + atol.
"""

import torch

# dtype -> (forward, input grad, weight / bias grads)
RTOL = {
    torch.float32: (1e-5, 1e-5, 1e-4),
    torch.float16: (1e-3, 2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 1.6e-2, 3e-2),
    torch.float64: (1e-12, 1e-12, 1e-10),
}
FORWARD, INPUT_GRAD, PARAM_GRAD = 0, 1, 2


def rel_error(out, ref):
    """||out - ref|| / ||ref|| in fp64 (0 when both are empty or zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm()
    diff = (out - ref).norm()
    return (diff / denom).item() if denom > 0 else diff.item()


def assert_rel_close(out, ref, dtype, kind=FORWARD, what="output"):
    """out (any dtype) against an fp64 ref, with the table's tolerance for `dtype`."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    tol = RTOL[dtype][kind]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def assert_ratio_close(out, ref64, eager, atol=1e-6, what="output"):
    """Low-precision check: |out - ref64| <= 2 |eager - ref64| + atol, elementwise."""
    err = (out.double() - ref64).abs()
    bound = 2 * (eager.double() - ref64).abs() + atol
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements exceed 2x eager error + {atol}; "
        f"worst excess {(err - bound).max().item():.3e}"
    )
