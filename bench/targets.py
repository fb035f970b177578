"""The speed targets of the issues, checked against one benchmark run (report.py's "Targets").

Each target reads the run's entries (report.entries: op, mode, impl, dtype, shape, median_s,
gbps) and says what was measured and whether the target holds; a target whose entries the run
does not have says so ("not measured") rather than pass. fastnn is judged by the backend that
`auto` prefers for the op on that device (fastnn._backend.auto_order): what a user gets by
default, native everywhere but the norms on CUDA (Triton).
"""

from fastnn import _backend

# Benchmark op name -> fastnn op family.
FAMILY = {
    "rms_norm": "rms_norm",
    "layer_norm": "layer_norm",
    "swiglu": "glu",
    "adam": "adam",
    "adamw": "adam",
    "rmsprop": "rmsprop",
    "rmsprop-centered-momentum": "rmsprop",
}


def default_impl(op, device):
    """The benchmark impl name of the backend `auto` prefers for `op` on `device`."""
    return "fastnn-" + _backend.auto_order(FAMILY[op], device)[0]


TARGET_ROWS = 32768  # the GPU targets' row count (norms: N from 1K to 64K; SwiGLU: H = 11008)


def _find(rows, op, mode, impl, dtype, shape=None):
    return [
        r
        for r in rows
        if (r["op"], r["mode"], r["impl"], r["dtype"]) == (op, mode, impl, dtype)
        and (shape is None or list(r["shape"]) == list(shape))
    ]


def _one(rows, op, mode, impl, dtype, shape):
    found = _find(rows, op, mode, impl, dtype, shape)
    return found[0] if found else None


def speedup(op, mode, dtype, shape, baseline, minimum, what):
    """fastnn's time at least `minimum` times faster than `baseline`'s."""

    def check(rows, copy, device):
        ours = _one(rows, op, mode, default_impl(op, device), dtype, shape)
        theirs = _one(rows, op, mode, baseline, dtype, shape)
        if ours is None or theirs is None:
            return None, None
        ratio = theirs["median_s"] / ours["median_s"]
        return f"{ratio:.2f}x", ratio >= minimum

    return what, op, check


def share_of_copy(op, modes, dtype, minimum, what, shape_ok=lambda shape: True):
    """fastnn's GB/s at least `minimum` of the copy bandwidth at every matching shape (the worst
    one is shown)."""

    def check(rows, copy, device):
        found = [
            r
            for mode in modes
            for r in _find(rows, op, mode, default_impl(op, device), dtype)
            if shape_ok(list(r["shape"]))
        ]
        if not found or not copy:
            return None, None
        worst = min(found, key=lambda r: r["gbps"])
        share = worst["gbps"] / copy
        where = f"{worst['mode']} {list(worst['shape'])}"
        return f"{share:.0%} at worst ({where})", share >= minimum

    return what, op, check


def faster_everywhere(op, modes, dtype, baseline, what, shape_ok=lambda shape: True):
    """fastnn faster than `baseline` at every matching shape of the run (the closest case is
    shown)."""

    def check(rows, copy, device):
        pairs = []
        for mode in modes:
            for ours in _find(rows, op, mode, default_impl(op, device), dtype):
                if not shape_ok(list(ours["shape"])):
                    continue
                theirs = _one(rows, op, mode, baseline, dtype, ours["shape"])
                if theirs is not None:
                    pairs.append((theirs["median_s"] / ours["median_s"], mode, ours["shape"]))
        if not pairs:
            return None, None
        ratio, mode, shape = min(pairs)
        return f"{ratio:.2f}x at worst ({mode} {list(shape)})", ratio > 1.0

    return what, op, check


def _norm_target_shape(shape):
    rows, n = shape
    return rows == TARGET_ROWS and 1024 <= n <= 65536


CPU_SQUARE = [4096, 4096]  # the issues' CPU shape, fp32
TARGETS = {
    "cpu": [
        speedup("rms_norm", "fwd", "fp32", CPU_SQUARE, "eager", 2.0,
                "RMSNorm fwd [4096, 4096] fp32: >= 2x F.rms_norm"),
        speedup("rms_norm", "fwd+bwd", "fp32", CPU_SQUARE, "eager", 2.0,
                "RMSNorm fwd+bwd [4096, 4096] fp32: >= 2x F.rms_norm"),
        speedup("rms_norm", "fwd", "fp32", CPU_SQUARE, "compile", 0.9,
                "RMSNorm fwd [4096, 4096] fp32: >= 0.9x torch.compile"),
        speedup("rms_norm", "fwd+bwd", "fp32", CPU_SQUARE, "compile", 0.9,
                "RMSNorm fwd+bwd [4096, 4096] fp32: >= 0.9x torch.compile"),
        speedup("layer_norm", "fwd", "fp32", CPU_SQUARE, "eager", 1.0,
                "LayerNorm fwd [4096, 4096] fp32: >= F.layer_norm"),
        speedup("layer_norm", "fwd+bwd", "fp32", CPU_SQUARE, "eager", 1.0,
                "LayerNorm fwd+bwd [4096, 4096] fp32: >= F.layer_norm"),
        speedup("swiglu", "fwd", "fp32", CPU_SQUARE, "eager", 1.4,
                "SwiGLU fwd [4096, 4096] fp32: >= 1.4x F.silu(g) * u"),
        speedup("swiglu", "fwd", "fp32", CPU_SQUARE, "compile", 0.9,
                "SwiGLU fwd [4096, 4096] fp32: >= 0.9x torch.compile"),
        speedup("swiglu", "fwd+bwd", "fp32", CPU_SQUARE, "eager", 1.5,
                "SwiGLU fwd+bwd [4096, 4096] fp32: >= 1.5x eager"),
        speedup("adam", "step", "fp32", None, "eager-fused", 1.0,
                "Adam step fp32: >= torch.optim.Adam(fused=True)"),
        speedup("rmsprop-centered-momentum", "step", "fp32", None, "eager-forloop", 2.5,
                "RMSprop (centered, momentum) step fp32: >= 2.5x torch's for-loop"),
    ],
    "cuda": [
        share_of_copy("rms_norm", ["fwd"], "bf16", 0.9,
                      "RMSNorm fwd bf16, N 1K-64K at 32K rows: >= 90% of copy", _norm_target_shape),
        share_of_copy("rms_norm", ["bwd"], "bf16", 0.8,
                      "RMSNorm bwd bf16, N 1K-64K at 32K rows: >= 80% of copy", _norm_target_shape),
        faster_everywhere("rms_norm", ["fwd", "bwd"], "bf16", "compile",
                          "RMSNorm bf16, N 1K-64K at 32K rows: faster than torch.compile at every N",
                          _norm_target_shape),
        share_of_copy("layer_norm", ["fwd"], "bf16", 0.9,
                      "LayerNorm fwd bf16, N 1K-64K at 32K rows: >= 90% of copy",
                      _norm_target_shape),
        share_of_copy("layer_norm", ["bwd"], "bf16", 0.8,
                      "LayerNorm bwd bf16, N 1K-64K at 32K rows: >= 80% of copy",
                      _norm_target_shape),
        faster_everywhere("layer_norm", ["fwd", "bwd"], "bf16", "compile",
                          "LayerNorm bf16, N 1K-64K at 32K rows: faster than torch.compile at "
                          "every N", _norm_target_shape),
        share_of_copy("swiglu", ["fwd", "bwd"], "bf16", 0.9,
                      "SwiGLU fwd and bwd [32768, 11008] bf16: >= 90% of copy",
                      lambda s: s == [TARGET_ROWS, 11008]),
        share_of_copy("adam", ["step"], "fp32", 0.85, "Adam step fp32: >= 85% of copy"),
        share_of_copy("adamw", ["step"], "fp32", 0.85, "AdamW step fp32: >= 85% of copy"),
        share_of_copy("rmsprop", ["step"], "fp32", 0.85, "RMSprop step fp32: >= 85% of copy"),
        speedup("adam", "step", "fp32", None, "eager-fused", 1.0,
                "Adam step fp32: faster than torch's fused Adam"),
        speedup("adamw", "step", "fp32", None, "eager-fused", 1.0,
                "AdamW step fp32: faster than torch's fused AdamW"),
        speedup("rmsprop", "step", "fp32", None, "eager", 3.0,
                "RMSprop step fp32: >= 3x torch's foreach"),
        speedup("rmsprop-centered-momentum", "step", "fp32", None, "eager", 3.0,
                "RMSprop (centered, momentum) step fp32: >= 3x torch's foreach"),
    ],
}  # fmt: skip


def lines(rows, copy, device):
    """Markdown lines of the "Targets" section for `device` ('cpu' or 'cuda'), or none."""
    targets = TARGETS.get(device)
    if not targets:
        return []
    out = [
        "## Targets (the issues' speed targets, this run)",
        "",
        "fastnn is judged by the backend `auto` prefers for each op on this device (column "
        '"fastnn").',
        "",
        "| target | fastnn | measured | holds |",
        "| --- | --- | --- | --- |",
    ]
    for what, op, check in targets:
        measured, holds = check(rows, copy, device)
        verdict = "not measured" if holds is None else "yes" if holds else "**no**"
        out.append(f"| {what} | {default_impl(op, device)} | {measured or '-'} | {verdict} |")
    return out + [""]
