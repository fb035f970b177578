"""fastnn.patch(model): swap the norms and LLaMA-style MLPs of an existing model for fastnn's, in
place, keeping the very same parameter tensors (so their device, dtype, requires_grad and any
optimizer already holding them stay valid).

What it replaces:

- `torch.nn.RMSNorm` -> `fastnn.RMSNorm`, `torch.nn.LayerNorm` -> `fastnn.LayerNorm` (exact
  types; fastnn's subclass torch's, so the module object itself changes class, hooks included);
- LLaMA-style MLPs of any library, recognised by structure: children `gate_proj`, `up_proj`,
  `down_proj` that are `nn.Linear` ([H -> I], [H -> I], [I -> H]), no other parameters, and a
  forward that computes down_proj(act(gate_proj(x)) * up_proj(x)) for an activation fastnn has
  (silu: LLaMA, Mistral, Qwen; gelu_tanh: Gemma; gelu, relu, sigmoid) -> `fastnn.SwiGLUMLP`
  with that activation, holding the same Linear modules (16-bit modules are probed in fp32 too:
  gelu and gelu_tanh, or CLIP's quick GELU and gelu, differ by less than bf16 rounding); and
  the packed layout, one `gate_up_proj` [H -> 2I] whose output holds [gate | up], and
  `down_proj` (Phi-3, GLM-4) -> `fastnn.SwiGLUMLP(fused_gate_up=True, llama_state_dict=False)`,
  whose state_dict keeps the model's gate_up_proj key;
- RMSNorm-like modules of other libraries, recognised by structure: a 1-D `weight` [N] and
  nothing else to learn, an `eps` or `variance_epsilon` number, and a forward that computes
  RMSNorm with that weight and eps -> `fastnn.RMSNorm` holding the same weight.

No other library is imported. Every structural match is verified before it is swapped: its forward
must take the input alone, and the old forward and fastnn's are run on a probe input (without hooks,
under no_grad, in training and in eval mode; norms on [2, 2, N], so a norm over another dim fails)
and must agree within the forward tolerance of the parameters' dtype; look-alikes that compute
something else (Gemma's (1 + weight) scale, eps outside the square root, dropout in either mode, a
norm over channels) or whose activation module carries hooks are left alone and listed in the
report's `skipped`. A norm whose output takes a wider weight's dtype (HF's LlamaRMSNorm kept in
fp32: fp32 out of bf16 input) is replaced by one that does too. The probes use random weights
(swapped in for the call, the module's own tensors are never written): for norms with rows of mean
square near eps, so a formula that matches only at weight = 1 or only far from eps is not mistaken
for RMSNorm; for MLPs because zero-initialised projections would make any activation agree.

Patch before wrapping the model in DDP / FSDP or compiling it. Outputs keep their dtype rules:
fastnn's norms return the input's dtype, as torch.nn.RMSNorm does (the look-alikes above whose
output follows their weight's aside).
"""

import contextlib
import dataclasses
import inspect
import math

import torch
from torch import nn

from fastnn import functional as F
from fastnn.modules import LayerNorm, RMSNorm, SwiGLUMLP
from fastnn.reference.glu import ACTIVATIONS

# Relative forward tolerance of the probe, by dtype (the forward column of the testing guide's
# table; fp64 modules often compute in fp32 internally, so fp64 gets fp32's). A different formula
# misses by far more: eps outside the root is off by ~30% on the probe's near-eps row, a
# (1 + weight) scale by ~50%.
_PROBE_RTOL = {
    torch.float64: 1e-5,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}


@dataclasses.dataclass(frozen=True)
class Replacement:
    path: str  # where the module sits in the model, e.g. "layers.0.mlp" ("" for the root)
    before: str  # the replaced module's class, "module.QualName"
    after: str  # the fastnn class now there


@dataclasses.dataclass
class PatchReport:
    """What patch() did: `replaced` (in model order) and `skipped`, a list of (path, why) for
    modules that looked replaceable but were left alone."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.replaced)

    def __iter__(self):
        return iter(self.replaced)

    def counts(self):
        """{(before, after): how many}."""
        out = {}
        for r in self.replaced:
            out[(r.before, r.after)] = out.get((r.before, r.after), 0) + 1
        return out

    def __str__(self):
        lines = [f"fastnn.patch: replaced {len(self.replaced)} modules"]
        lines += [f"  {r.path or '(root)'}: {r.before} -> {r.after}" for r in self.replaced]
        if self.skipped:
            lines.append(f"left alone {len(self.skipped)}:")
            lines += [f"  {path or '(root)'}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _qualname(module):
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _probe_rtol(dtype):
    return _PROBE_RTOL.get(dtype, 1e-5)


def _rel_error(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _randn(shape, like, seed):
    # Drawn on the CPU from a fixed seed: the same probe on every device, no global RNG touched.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(like.device, like.dtype)


def _instance_forward(module):
    # A forward set on the instance (offloading / quantisation wrappers do this) would be lost.
    return "forward" in vars(module)


def _takes_one_input(module):
    """Whether forward takes exactly one argument (the input): a module called with more (a
    scale, a skip tensor fastnn would take for its fused residual) cannot be replaced."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def _rng_kept(x):
    """The RNG state of the CPU (and of x's CUDA device) restored after the block: a probe's
    dropout must not advance the model's random stream."""
    return torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])


def _forward_both_modes(module, x):
    """module.forward(x) in training mode, then in eval mode (no grad, the modes of module and
    its children restored after, and the RNG state too: dropout draws from it), so that what
    differs between the modes (dropout) shows up whatever mode the model is in now."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        with torch.no_grad(), _rng_kept(x):
            return [module.train(mode).forward(x) for mode in (True, False)]
    finally:
        for m, mode in modes:
            m.training = mode


def _mismatch(outputs, ours, x, formula, dtype=None):
    """None when both probe outputs (training, eval mode) are `ours` within the dtype's
    tolerance (and of `dtype`, when given), else why not."""
    for theirs, mode in zip(outputs, ("training", "eval"), strict=True):
        if not isinstance(theirs, torch.Tensor) or theirs.shape != x.shape:
            return "its forward does not return one tensor of the input's shape"
        if dtype is not None and theirs.dtype != dtype:
            return f"its forward returns {theirs.dtype} for {x.dtype} input; fastnn returns {dtype}"
        err, tol = _rel_error(theirs, ours), _probe_rtol(x.dtype)
        if not err <= tol:
            return (
                f"its forward in {mode} mode is not {formula}: relative error {err:.2e} > {tol:g}"
            )
    return None


# ---- RMSNorm-like modules of other libraries --------------------------------------------------


def _norm_eps(module):
    for name in ("eps", "variance_epsilon"):
        eps = getattr(module, name, None)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0:
            return float(eps)
    return None


def _looks_like_rms_norm(module):
    """Structure alone: a 1-D weight, no other parameters, buffers or children, a numeric eps."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    return (
        set(params) == {"weight"}
        and weight.dim() == 1
        and weight.is_floating_point()
        and not any(True for _ in module.buffers(recurse=False))
        and not any(True for _ in module.children())
        and _norm_eps(module) is not None
    )


def _verify_rms_norm(module):
    """(None, promotes) when module.forward computes RMSNorm(weight, eps), else (why not,
    False); promotes: its output takes a wider weight's dtype."""
    weight, eps = module.weight, _norm_eps(module)
    if weight.is_meta:
        return "its weight is on the meta device; cannot probe it", False
    n = weight.shape[0]
    x = _randn((4, n), weight, seed=0)
    # Row scales: ordinary, large, small, and mean square = eps / 4 where eps's place matters.
    scales = torch.tensor([1.0, 30.0, 0.05, math.sqrt(eps) / 2 if eps > 0 else 1e-3])
    x = x * scales.to(x.device, x.dtype)[:, None]
    # 3-D, its middle dim not N: a norm over dim 1 (channels first) fails or disagrees.
    x = x.view(2, 2, n) if n != 2 else x.view(1, 4, n)
    probe_weight = 1 + 0.5 * _randn((n,), weight, seed=1)
    # (input, weight) probes beside the module's own dtype: a bf16 input with an fp32 weight
    # and an fp32 input with a 16-bit weight, whatever the module's dtype now (a model patched
    # in bf16 is often made fp32 later, its activations bf16 under autocast). fastnn returns
    # the input's dtype (as torch.nn.RMSNorm); norms that multiply by the weight last (HF's
    # LlamaRMSNorm) return the promotion of both, which the replacement must keep (the next
    # layer expects it); norms that cast to a 16-bit weight's dtype (HF's T5LayerNorm: bf16 out
    # of the fp32 residual stream of a bf16 T5) do neither and are left alone.
    low = probe_weight if weight.dtype.itemsize <= 2 else probe_weight.to(torch.bfloat16)
    probes = [(x, probe_weight), (x.to(torch.bfloat16), probe_weight.float()), (x.float(), low)]
    original = module._parameters["weight"]
    outputs = []
    try:
        for probe, w in probes:
            module._parameters["weight"] = nn.Parameter(w, requires_grad=False)
            outputs.append(_forward_both_modes(module, probe))
    except Exception as e:  # any forward that cannot take [..., N] is not one we can replace
        return f"its forward failed on a {list(x.shape)} probe ({type(e).__name__}: {e})", False
    finally:
        module._parameters["weight"] = original
    # The bf16 input with the fp32 weight tells whether it promotes (fp32 out).
    promotes = {t.dtype for t in outputs[1] if isinstance(t, torch.Tensor)} == {torch.float32}
    for (probe, w), theirs in zip(probes, outputs, strict=True):
        dtype = torch.promote_types(probe.dtype, w.dtype) if promotes else probe.dtype
        with torch.no_grad():
            ours = F.rms_norm(probe, (n,), w, eps).to(dtype)
        why = _mismatch(theirs, ours, probe, f"RMSNorm(weight, eps={eps:g})", dtype)
        if why:
            return why, False
    return None, promotes


class _PromotingRMSNorm(RMSNorm):
    """fastnn.RMSNorm whose output has the promotion of the input's and the weight's dtypes, as
    the look-alikes that multiply by the weight last (an fp32 weight: fp32 out of bf16 input)."""

    def _get_name(self):
        return "RMSNorm"  # a patched model's repr names fastnn's class, not this private one

    def extra_repr(self):
        return f"{super().extra_repr()}, output in the promoted dtype of input and weight"

    def forward(self, x, *, residual=None):
        result = super().forward(x, residual=residual)
        out = result if residual is None else result[0]
        out = out.to(torch.promote_types(out.dtype, self.weight.dtype))
        return out if residual is None else (out, result[1])


def _new_rms_norm(module, promotes):
    cls = _PromotingRMSNorm if promotes else RMSNorm
    new = cls(module.weight.shape[0], eps=_norm_eps(module), device="meta")
    new.weight = module.weight  # the same Parameter: nothing allocated or copied
    return new


# ---- LLaMA-style MLPs -------------------------------------------------------------------------
# Two layouts: separate gate and up projections (LLaMA, Mistral, Qwen, Gemma), or one gate_up
# projection whose output holds [gate | up] (Phi-3, GLM-4).

_SEPARATE = ("gate_proj", "up_proj", "down_proj")
_PACKED = ("gate_up_proj", "down_proj")


def _mlp_layout(module):
    """_SEPARATE or _PACKED, the names of module's projections, when its structure alone is a
    GLU MLP's: nn.Linear children [H -> I] gate and up, or [H -> 2I] gate_up, and [I -> H] down,
    all with or all without bias; any other child (the activation) holds no parameters or
    buffers; the module itself holds none either. Else None."""
    children = dict(module.named_children())
    for names in (_SEPARATE, _PACKED):
        linears = [children.get(name) for name in names]
        if all(type(lin) is nn.Linear for lin in linears) and _shapes_fit(linears):
            break
    else:
        return None
    if len({lin.bias is None for lin in linears}) != 1:
        return None
    # Plain weights: a legacy weight_norm Linear holds weight_g / weight_v and rebuilds weight
    # in a pre-hook (from the probe's tensors, during the probe).
    if any(set(lin._parameters) - {"weight", "bias"} for lin in linears):
        return None
    others = [m for name, m in children.items() if name not in names]
    if any(True for m in others for _ in m.parameters()) or any(
        True for m in others for _ in m.buffers()
    ):
        return None
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return None if own else names


def _shapes_fit(linears):
    *ins, down = linears
    hidden, inter = down.out_features, down.in_features
    outs = [inter, inter] if len(ins) == 2 else [2 * inter]
    return (
        all(lin.in_features == hidden for lin in ins) and [lin.out_features for lin in ins] == outs
    )


def _glu_mlp_forward(linears, x, activation):
    *ins, down = linears
    up = ins[1](x) if len(ins) == 2 else None  # None: packed [gate | up]
    return down(F.glu_family(ins[0](x), up, activation))


def _verify_mlp(module, names):
    """(why not, activation): why not is None when module.forward computes
    down(act(gate(x)) * up(x)) ([gate | up] = gate_up(x) for the packed layout) for an
    activation fastnn has (SwiGLU's silu, GeGLU's gelu_tanh or gelu, ReGLU's relu, GLU's
    sigmoid), and activation is that one. Probed with random weights swapped in for the call
    (the module's own tensors are never written): with its real ones, zero-initialised
    down_proj or up_proj weights would make any activation agree. A 16-bit module is probed in
    fp32 too: its own rounding (bf16: 1.6e-2 relative) hides activations that differ by less,
    gelu and gelu_tanh (~1e-4) or CLIP's quick GELU and gelu (~1e-2)."""
    w = module.down_proj.weight
    if w.is_meta:
        return "its weights are on the meta device; cannot probe it", None
    params = [p for name in names for p in getattr(module, name).parameters()]
    kinds = sorted({f"{p.dtype} on {p.device}" for p in params})
    if len(kinds) > 1:  # the probe and SwiGLUMLP (one dtype for all its Linears) cannot follow
        return f"its projections' parameters differ in dtype or device ({', '.join(kinds)})", None
    other = _other_input_dtype_taken(module, names)
    if other is not None:
        return (
            f"its forward takes {other} input with {w.dtype} weights (it casts); fastnn's "
            "SwiGLUMLP, as torch.nn.Linear, needs the weights' dtype",
            None,
        )
    dtypes = [w.dtype] + ([torch.float32] if w.dtype in (torch.float16, torch.bfloat16) else [])
    try:
        # Gates of about N(0, 1), and of N(0, 8^2) for activations clamped beyond the first's
        # reach (ReLU6 is ReLU below 6).
        probes = [
            _probe_mlp(module, names, dtype, scale) for scale in (8.0, 1.0) for dtype in dtypes
        ]
    except Exception as e:
        shape = [3, module.down_proj.out_features]
        return f"its forward failed on a {shape} probe ({type(e).__name__}: {e})", None
    x, outputs, ours = probes[-1]  # the most precise, N(0, 1): where gelu and gelu_tanh differ
    matching = [
        act
        for act in ACTIVATIONS
        if not any(_mismatch(out, ours_[act], x_, "") for x_, out, ours_ in probes)
    ]
    if matching:
        return None, min(matching, key=lambda act: _worst_error(outputs, ours[act]))
    closest = min(ACTIVATIONS, key=lambda act: _worst_error(outputs, ours[act]))
    formula = (
        "down_proj(act(gate_proj(x)) * up_proj(x))"
        if names == _SEPARATE
        else "down_proj(act(gate) * up) of [gate | up] = gate_up_proj(x)"
    ) + f" for act in {', '.join(ACTIVATIONS)}"
    mismatches = (_mismatch(out, ours_[closest], x_, formula) for x_, out, ours_ in probes[::-1])
    return f"{next(filter(None, mismatches))} (closest: {closest})", None


def _mlp_probe_input(module, dtype):
    """A [3, hidden] N(0, 1) probe of `dtype` on the module's device."""
    like = module.down_proj.weight.new_empty(0, dtype=dtype)
    return _randn((3, module.down_proj.out_features), like, seed=2)


def _other_input_dtype_taken(module, names):
    """bf16 (fp32 for 16-bit weights) when module's forward runs on a [3, hidden] input of that
    dtype (it casts the input to its weights' dtype), else None."""
    w = module.down_proj.weight
    other = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    x = _mlp_probe_input(module, other)
    linears = [getattr(module, name) for name in names]
    try:
        with _hooks_off(linears), torch.no_grad(), _rng_kept(x):
            module.forward(x)
    except Exception:
        return None
    return other


def _worst_error(outputs, ours):
    """The larger relative error of the two probe outputs (training, eval mode); inf where an
    output is not a tensor of ours's shape."""
    errors = [
        _rel_error(o, ours) if isinstance(o, torch.Tensor) and o.shape == ours.shape else math.inf
        for o in outputs
    ]
    return max(errors)


def _probe_mlp(module, names, dtype, scale):
    """(x, the module's outputs in training and eval mode, {activation: fastnn's output}) on a
    [3, hidden] probe of `dtype` and standard deviation `scale`, the parameters of the
    projections `names` swapped for random ones of that dtype for the call."""
    like = module.down_proj.weight.new_empty(0, dtype=dtype)
    x = _mlp_probe_input(module, dtype) * scale
    linears = [getattr(module, name) for name in names]
    originals = [dict(lin._parameters) for lin in linears]
    for seed, (lin, params) in enumerate(zip(linears, originals, strict=True), start=3):
        for name, p in params.items():
            if p is not None:  # weights scaled as Linear's init, so activations stay O(1)
                probe = _randn(p.shape, like, seed=seed * 2 + (name == "bias"))
                lin._parameters[name] = nn.Parameter(probe / math.sqrt(lin.in_features), False)
    try:
        with _hooks_off(linears):  # the Linears' hooks see the model's calls, not the probe's
            outputs = _forward_both_modes(module, x)
            with torch.no_grad():
                ours = {act: _glu_mlp_forward(linears, x, act) for act in ACTIVATIONS}
    finally:
        for lin, params in zip(linears, originals, strict=True):
            lin._parameters.update(params)
    return x, outputs, ours


@contextlib.contextmanager
def _hooks_off(modules):
    """The modules' own hooks set aside for the block, then put back."""
    saved = [(m, key, getattr(m, key)) for m in modules for key in _hook_dicts(m)]
    for m, key, hooks in saved:
        setattr(m, key, type(hooks)())
    try:
        yield
    finally:
        for m, key, hooks in saved:
            setattr(m, key, hooks)


def _hook_attributes(module):
    """Names of the module's hook state: its hook dicts and _is_full_backward_hook."""
    return [k for k in vars(module) if k.startswith("_") and "hook" in k]


def _hook_dicts(module):
    """Names of the module's hook dicts (_forward_hooks, _forward_pre_hooks, ...)."""
    return [k for k in _hook_attributes(module) if isinstance(getattr(module, k), dict)]


def _mlp_note(names, activation):
    """The report's arguments of a new SwiGLUMLP that differ from the defaults."""
    args = ["fused_gate_up=True"] if names == _PACKED else []
    args += [] if activation == "silu" else [f"activation={activation!r}"]
    return f"({', '.join(args)})" if args else ""


def _new_glu_mlp(module, names, activation):
    down = module.down_proj
    packed = names == _PACKED
    new = SwiGLUMLP(
        down.out_features,
        down.in_features,
        bias=down.bias is not None,
        device="meta",
        fused_gate_up=packed,
        activation=activation,
        llama_state_dict=not packed,  # the model's own keys: gate_up_proj.* stays
    )
    for name in names:  # the same Linear modules: nothing allocated or copied
        setattr(new, name, getattr(module, name))
    return new


# ---- patch ------------------------------------------------------------------------------------


def _carry_over(old, new):
    """Keeps the old module's train/eval mode and every hook registered on it."""
    new.train(old.training)
    for key in _hook_attributes(old):  # the hook dicts and _is_full_backward_hook
        setattr(new, key, getattr(old, key))


def _plan(module, norms, mlps):
    """(kind, why_not, detail) for one module: kind is 'swap', 'replace' or None; detail, for a
    replaced norm, whether its output follows the weight's dtype (_PromotingRMSNorm), for a
    replaced MLP (its layout, its activation)."""
    if type(module) in (nn.RMSNorm, nn.LayerNorm):
        if not norms:
            return None, None, None
        if _instance_forward(module):
            return None, "forward is overridden on the instance", None
        return "swap", None, None
    if isinstance(module, (RMSNorm, LayerNorm, SwiGLUMLP)):
        return None, None, None  # fastnn's already
    layout = _mlp_layout(module) if mlps else None
    if layout is None and not (norms and _looks_like_rms_norm(module)):
        return None, None, None
    if _instance_forward(module):
        return None, "forward is overridden on the instance", None
    if not _takes_one_input(module):
        return None, "its forward takes more than the input", None
    if layout is None:
        why, promotes = _verify_rms_norm(module)
        return (None, why, None) if why else ("replace", None, promotes)
    if _children_hooked(module, layout):
        return None, "hooks on its other children (the activation) would be dropped", None
    why, activation = _verify_mlp(module, layout)
    return (None, why, None) if why else ("replace", None, (layout, activation))


def _children_hooked(module, linears):
    """Whether a child other than the Linears (kept in the new module) has hooks."""
    return any(
        getattr(child, key)
        for name, child in module.named_children()
        if name not in linears
        for key in _hook_dicts(child)
    )


def patch(model, *, norms=True, mlps=True):
    """Replace, in place, the norms (norms=True) and LLaMA-style MLPs (mlps=True) of `model` with
    fastnn's; returns a PatchReport of what was replaced, by path, and what was left alone.

    Parameters are reused, not copied; outputs are unchanged within the forward tolerance of the
    parameters' dtype (checked on a probe for every module not of an exact torch type). A module
    reached by several paths is replaced everywhere and reported under its first path. The root
    module can be patched only when it is a torch.nn.RMSNorm / LayerNorm (the object itself
    changes class); a replaceable root of another class is reported as skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastnn.patch: expected a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    replacements = {}  # id(old module) -> new module
    done_prefixes = []  # paths of replaced MLPs: their children are already handled
    for path, module in list(model.named_modules()):
        if any(path.startswith(p + ".") for p in done_prefixes):
            continue
        kind, why, detail = _plan(module, norms, mlps)
        if why is not None:
            report.skipped.append((path, why))
        if kind == "swap":
            before = _qualname(module)
            module.__class__ = RMSNorm if type(module) is nn.RMSNorm else LayerNorm
            report.replaced.append(Replacement(path, before, f"fastnn.{type(module).__name__}"))
        elif kind == "replace":
            if module is model:
                report.skipped.append((path, "it is the root module; patch its parent instead"))
                continue
            if isinstance(detail, tuple):  # an MLP: (layout, activation)
                new = _new_glu_mlp(module, *detail)
                name = "SwiGLUMLP" + _mlp_note(*detail)
            else:  # a norm (a _PromotingRMSNorm, a subclass of fastnn.RMSNorm, when detail is set)
                new = _new_rms_norm(module, detail)
                name = "RMSNorm(output in the promoted dtype)" if detail else "RMSNorm"
            _carry_over(module, new)
            replacements[id(module)] = new
            done_prefixes.append(path)
            report.replaced.append(Replacement(path, _qualname(module), f"fastnn.{name}"))
    if replacements:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and id(child) in replacements:
                    parent._modules[name] = replacements[id(child)]
    return report


__all__ = ["PatchReport", "Replacement", "patch"]
