"""fastnn.patch(model): what it replaces (by path), what it leaves alone, and that outputs and
gradients of the patched model match the original's within the testing guide's tolerances."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerances import FORWARD, INPUT_GRAD, PARAM_GRAD, assert_rel_close
from torch import nn

import fastnn
from fastnn.patch import patch

# ---- imitations of other libraries' modules (recognised by structure, never imported) ---------


class ThirdPartyRMSNorm(nn.Module):
    """As HF's LlamaRMSNorm: fp32 statistics, `variance_epsilon`, weight applied after the cast."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class OnePlusWeightRMSNorm(ThirdPartyRMSNorm):
    """Gemma's variant: scales by (1 + weight). Looks like RMSNorm, is not: must be left alone."""

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class EpsOutsideNorm(nn.Module):
    """x / (rms(x) + eps): right structure, different formula near zero: must be left alone."""

    def __init__(self, hidden, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


class SiLU(nn.Module):  # as HF's activation classes: a module that is not torch.nn.SiLU
    def forward(self, x):
        return x * torch.sigmoid(x)


class QuickGELU(nn.Module):  # CLIP's GELU approximation: not one of fastnn's activations
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ThirdPartyMLP(nn.Module):
    """As HF's LlamaMLP."""

    def __init__(self, hidden, inter, act=None):
        super().__init__()
        self.hidden_size = hidden
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = act if act is not None else SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, hidden, inter, norm):
        super().__init__()
        self.input_layernorm = norm
        self.mlp = ThirdPartyMLP(hidden, inter)
        self.post_norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return self.post_norm(x + self.mlp(self.input_layernorm(x)))


class Model(nn.Module):
    def __init__(self, hidden=24, inter=40):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                Block(hidden, inter, nn.RMSNorm(hidden, eps=1e-6)),
                Block(hidden, inter, ThirdPartyRMSNorm(hidden)),
                Block(hidden, inter, OnePlusWeightRMSNorm(hidden)),
                Block(hidden, inter, EpsOutsideNorm(hidden)),
            ]
        )
        self.gelu_mlp = ThirdPartyMLP(hidden, inter, act=nn.GELU())  # GeGLU (erf)
        self.mish_mlp = ThirdPartyMLP(hidden, inter, act=nn.Mish())  # no fastnn activation
        self.norm = nn.RMSNorm(hidden)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x + self.gelu_mlp(x) + self.mish_mlp(x))


def make_model(dtype):
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():  # weights away from their init values, so a dropped weight shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


EXPECTED = [
    ("layers.0.input_layernorm", "torch.nn.modules.normalization.RMSNorm", "fastnn.RMSNorm"),
    ("layers.0.mlp", "test_patch.ThirdPartyMLP", "fastnn.SwiGLUMLP"),
    ("layers.0.post_norm", "torch.nn.modules.normalization.LayerNorm", "fastnn.LayerNorm"),
    # (its output follows its weight's dtype, as HF's LlamaRMSNorm: fp32 out of bf16 input)
    (
        "layers.1.input_layernorm",
        "test_patch.ThirdPartyRMSNorm",
        "fastnn.RMSNorm(output in the promoted dtype)",
    ),
    ("layers.1.mlp", "test_patch.ThirdPartyMLP", "fastnn.SwiGLUMLP"),
    ("layers.1.post_norm", "torch.nn.modules.normalization.LayerNorm", "fastnn.LayerNorm"),
    ("layers.2.mlp", "test_patch.ThirdPartyMLP", "fastnn.SwiGLUMLP"),
    ("layers.2.post_norm", "torch.nn.modules.normalization.LayerNorm", "fastnn.LayerNorm"),
    ("layers.3.mlp", "test_patch.ThirdPartyMLP", "fastnn.SwiGLUMLP"),
    ("layers.3.post_norm", "torch.nn.modules.normalization.LayerNorm", "fastnn.LayerNorm"),
    ("gelu_mlp", "test_patch.ThirdPartyMLP", "fastnn.SwiGLUMLP(activation='gelu')"),
    ("norm", "torch.nn.modules.normalization.RMSNorm", "fastnn.RMSNorm"),
]
LEFT_ALONE = ["layers.2.input_layernorm", "layers.3.input_layernorm", "mish_mlp"]


def test_report_lists_what_was_replaced_and_what_was_left_alone():
    model = make_model(torch.float32)
    report = patch(model)
    assert [(r.path, r.before, r.after) for r in report] == EXPECTED
    assert len(report) == len(EXPECTED)
    assert [path for path, _ in report.skipped] == LEFT_ALONE
    assert "not RMSNorm" in dict(report.skipped)["layers.2.input_layernorm"]
    assert "not down_proj(act(gate_proj(x)) * up_proj(x))" in dict(report.skipped)["mish_mlp"]
    assert report.counts()[("test_patch.ThirdPartyMLP", "fastnn.SwiGLUMLP")] == 4
    text = str(report)
    assert "layers.1.input_layernorm: test_patch.ThirdPartyRMSNorm -> fastnn.RMSNorm(" in text
    assert "mish_mlp" in text
    for path, _, after in EXPECTED:
        cls = getattr(fastnn, after.split(".")[1].split("(")[0])
        assert isinstance(model.get_submodule(path), cls)
    assert model.gelu_mlp.activation == "gelu"
    for path in LEFT_ALONE:
        assert type(model.get_submodule(path)).__module__ == "test_patch"
    assert len(patch(model)) == 0  # a second patch finds nothing left to do


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_outputs_gradients_and_parameters_are_kept(dtype):
    original = make_model(dtype)
    patched = copy.deepcopy(original)
    before = {name: p for name, p in patched.named_parameters()}
    patch(patched)
    after = dict(patched.named_parameters())
    # The same Parameter objects under the same names: device, dtype and optimizers stay valid.
    assert list(after) == list(before)
    assert all(after[name] is before[name] for name in before)
    assert patched.state_dict().keys() == original.state_dict().keys()

    # The oracle: the original model in fp64 on the same (rounded) input and parameters.
    oracle = copy.deepcopy(original).double()
    x = torch.randn(3, 5, 24, dtype=torch.float64).to(dtype)
    x_ref = x.to(torch.float64, copy=True).requires_grad_()
    x_new = x.clone().requires_grad_()
    out_ref, out_new = oracle(x_ref), patched(x_new)
    assert out_new.dtype == original(x).dtype == dtype
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_new.backward(grad.to(dtype))
    # The imitated third-party norm computes in fp32 even for fp64 input (as HF's does), so an
    # fp64 model is held to fp32's row of the table.
    tol = torch.float32 if dtype == torch.float64 else dtype
    assert_rel_close(out_new, out_ref, tol, FORWARD, "output")
    assert_rel_close(x_new.grad, x_ref.grad, tol, INPUT_GRAD, "input grad")
    for (name, p_ref), p_new in zip(oracle.named_parameters(), after.values(), strict=True):
        assert p_new.dtype == dtype
        assert_rel_close(p_new.grad, p_ref.grad, tol, PARAM_GRAD, f"{name} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_glu_mlp_activation_is_recognised(dtype):
    # gelu and its tanh approximation differ by less than 16-bit rounding, and so do gelu and
    # CLIP's quick GELU, x * sigmoid(1.702 x) (~1e-2, under bf16's 1.6e-2): a second probe in
    # fp32 tells them apart, and leaves quick GELU alone. ReLU6 agrees with ReLU on gates below
    # 6: a probe with large gates leaves it alone.
    acts = {
        "silu": SiLU(),
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"),
        "relu": nn.ReLU(),
        "sigmoid": nn.Sigmoid(),
    }
    torch.manual_seed(0)
    model = nn.ModuleDict({name: ThirdPartyMLP(16, 32, act=act) for name, act in acts.items()})
    model["quick_gelu"] = ThirdPartyMLP(16, 32, act=QuickGELU())
    model["relu6"] = ThirdPartyMLP(16, 32, act=nn.ReLU6())  # ReLU below 6 only
    model = model.to(dtype)
    x = torch.randn(4, 16, dtype=dtype)
    before = {name: mlp(x) for name, mlp in model.items()}
    report = patch(model)
    assert len(report) == len(acts)
    assert [path for path, _ in report.skipped] == ["quick_gelu", "relu6"]
    assert "(closest: gelu)" in report.skipped[0][1]
    for name, mlp in model.items():
        if name in ("quick_gelu", "relu6"):
            continue
        assert isinstance(mlp, fastnn.SwiGLUMLP) and mlp.activation == name
        assert_rel_close(mlp(x), before[name].double(), dtype, FORWARD, name)


class PackedMLP(nn.Module):
    """As HF's Phi3MLP (and GLM-4's): one gate_up_proj whose output holds [gate | up]."""

    def __init__(self, hidden, inter, act, bias=False, up_first=False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.activation_fn = act
        self.up_first = up_first  # torch.nn.functional.glu's order: not fastnn's packed layout

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if self.up_first:
            gate, up = up, gate
        return self.down_proj(up * self.activation_fn(gate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gate_up_mlp_becomes_a_fused_swiglu_mlp_with_the_same_keys(dtype):
    torch.manual_seed(1)
    model = nn.ModuleDict(
        {
            "phi": PackedMLP(16, 24, SiLU()),
            "glm": PackedMLP(16, 24, nn.GELU(approximate="tanh"), bias=True),
            "up_first": PackedMLP(16, 24, SiLU(), up_first=True),
        }
    ).to(dtype)
    original = copy.deepcopy(model)
    x = torch.randn(3, 16, dtype=dtype)
    gate_up = model["phi"].gate_up_proj
    report = patch(model)
    assert [(r.path, r.after) for r in report] == [
        ("phi", "fastnn.SwiGLUMLP(fused_gate_up=True)"),
        ("glm", "fastnn.SwiGLUMLP(fused_gate_up=True, activation='gelu_tanh')"),
    ]
    assert [path for path, _ in report.skipped] == ["up_first"]
    assert isinstance(model["phi"], fastnn.SwiGLUMLP) and model["phi"].gate_up_proj is gate_up
    # The model's own checkpoint keys stay: gate_up_proj.*, not split into gate_proj / up_proj.
    assert model.state_dict().keys() == original.state_dict().keys()
    copy.deepcopy(original).load_state_dict(model.state_dict())
    for name in ("phi", "glm"):
        assert_rel_close(model[name](x), original[name](x).double(), dtype, FORWARD, name)


def test_optimizer_made_before_patch_keeps_training_the_model():
    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    patch(model)
    w = model.layers[1].input_layernorm.weight
    w0 = w.detach().clone()
    model(torch.randn(4, 24)).square().mean().backward()
    opt.step()
    assert not torch.equal(w.detach(), w0)


def test_hooks_and_mode_carry_over():
    model = make_model(torch.float32).eval()
    calls = []
    model.layers[1].input_layernorm.register_forward_hook(lambda m, i, o: calls.append("norm"))
    model.layers[0].mlp.register_forward_pre_hook(lambda m, i: calls.append("mlp"))
    model.norm.register_forward_hook(lambda m, i, o: calls.append("torch norm"))
    model.layers[1].input_layernorm.register_full_backward_hook(lambda *a: calls.append("grad"))
    patch(model)
    model(torch.randn(2, 24, requires_grad=True)).sum().backward()
    assert sorted(calls) == ["grad", "mlp", "norm", "torch norm"]
    assert model.layers[1].input_layernorm._is_full_backward_hook  # a full hook still
    assert not any(m.training for m in model.modules())


def test_module_shared_by_two_paths_is_replaced_everywhere():
    norm = ThirdPartyRMSNorm(8)
    model = nn.ModuleDict({"a": norm, "b": nn.Sequential(norm)})
    report = patch(model)
    assert [r.path for r in report] == ["a"]
    assert isinstance(model["a"], fastnn.RMSNorm) and model["b"][0] is model["a"]


def test_root_module():
    norm = nn.RMSNorm(8)
    assert [r.path for r in patch(norm)] == [""]
    assert type(norm) is fastnn.RMSNorm
    foreign = ThirdPartyRMSNorm(8)
    report = patch(foreign)
    assert len(report) == 0 and "root module" in report.skipped[0][1]


def test_look_alikes_that_cannot_be_replaced_safely_are_left_alone():
    class DropoutMLP(ThirdPartyMLP):
        def forward(self, x):
            return F.dropout(super().forward(x), p=0.5, training=self.training)

    mlp = DropoutMLP(8, 16)
    wrapped = ThirdPartyRMSNorm(8)
    wrapped.forward = lambda x: x  # as offloading wrappers set forward on the instance
    model = nn.ModuleDict({"mlp": mlp, "wrapped": wrapped, "ln": nn.LayerNorm(8)})
    report = patch(model, norms=False)
    assert len(report) == 0  # norms=False: the LayerNorm stays too
    assert dict(report.skipped).keys() == {"mlp"}  # dropout in training mode differs
    assert type(model["ln"]) is nn.LayerNorm
    report = patch(model)
    assert [r.path for r in report] == ["ln"]
    assert "overridden on the instance" in dict(report.skipped)["wrapped"]
    mlp.eval()  # no dropout now, but .train() would bring it back: still left alone
    report = patch(model, norms=False)
    assert len(report) == 0 and "in training mode" in dict(report.skipped)["mlp"]
    assert not mlp.training  # the probe restored the mode


def test_mlp_probe_does_not_trust_zero_initialised_weights():
    # Zero-initialised down_proj (or up_proj) weights make any activation's output 0, as
    # any of fastnn's: the probe swaps in random weights, so a Mish MLP is still told apart.
    for zeroed in ("down_proj", "up_proj"):
        mlp = ThirdPartyMLP(8, 16, act=nn.Mish())
        nn.init.zeros_(getattr(mlp, zeroed).weight)
        model = nn.ModuleDict({"mlp": mlp})
        report = patch(model)
        assert len(report) == 0 and "not down_proj(act(" in dict(report.skipped)["mlp"]
        assert torch.count_nonzero(getattr(mlp, zeroed).weight) == 0  # its own weight kept


class CastingMLP(ThirdPartyMLP):
    def forward(self, x):
        return super().forward(x.to(self.gate_proj.weight.dtype)).to(x.dtype)


def test_mlps_of_mixed_dtypes_or_that_cast_their_input_are_left_alone():
    """SwiGLUMLP runs its Linears in one dtype, the input's: an MLP with an fp32 down_proj in
    bf16, or one casting its input to its weights' dtype, would fail after the swap."""
    mixed = ThirdPartyMLP(8, 16).bfloat16()
    mixed.down_proj.float()
    model = nn.ModuleDict(
        {"mixed": mixed, "casting": CastingMLP(8, 16), "plain": ThirdPartyMLP(8, 16)}
    )
    report = patch(model)
    assert [r.path for r in report] == ["plain"]
    skipped = dict(report.skipped)
    assert (
        "differ in dtype or device (torch.bfloat16 on cpu, torch.float32 on cpu)"
        in skipped["mixed"]
    )
    assert "takes torch.bfloat16 input with torch.float32 weights" in skipped["casting"]
    x = torch.randn(2, 8)
    assert model["casting"](x.bfloat16()).dtype == torch.bfloat16

    class DropoutCastingMLP(CastingMLP):  # the probes must leave the global RNG where it was
        def forward(self, x):
            return F.dropout(super().forward(x), p=0.5, training=self.training)

    model = nn.ModuleDict({"mlp": DropoutCastingMLP(8, 16)})
    state = torch.random.get_rng_state()
    report = patch(model)
    assert len(report) == 0 and torch.equal(torch.random.get_rng_state(), state)


class ChannelsFirstRMSNorm(nn.Module):
    """RMSNorm over dim 1 of [B, C, ...] (image models): right structure, other dim."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = 1e-6

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


class ScaledMLP(ThirdPartyMLP):
    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


class SkipNorm(ThirdPartyRMSNorm):
    def forward(self, x, skip=None):
        out = super().forward(x)
        return out if skip is None else out + skip


def test_look_alikes_called_otherwise_are_left_alone():
    # A norm over channels (dim 1), a forward taking more than the input (fastnn's norm would
    # take the second argument for its fused residual), hooks on the activation the new module
    # would drop, a legacy weight_norm Linear (its weight rebuilt from weight_g / weight_v).
    hooked = ThirdPartyMLP(8, 16)
    calls = []
    hooked.act_fn.register_forward_hook(lambda *args: calls.append(args))
    hooked.gate_proj.register_forward_hook(lambda *args: calls.append(args))
    normed = ThirdPartyMLP(8, 16)
    with pytest.warns(FutureWarning):  # deprecated, still in use
        normed.gate_proj = torch.nn.utils.weight_norm(normed.gate_proj)
    model = nn.ModuleDict(
        {"channels": ChannelsFirstRMSNorm(8), "scaled": ScaledMLP(8, 16), "skip": SkipNorm(8),
         "hooked": hooked, "normed": normed, "plain": ThirdPartyMLP(8, 16)}
    )  # fmt: skip
    report = patch(model)
    assert [r.path for r in report] == ["plain"]
    skipped = dict(report.skipped)
    assert skipped.keys() == {"channels", "scaled", "skip", "hooked"}  # normed: no match at all
    assert "probe" in skipped["channels"]
    assert "takes more than the input" in skipped["scaled"] == skipped["skip"]
    assert "hooks on its other children" in skipped["hooked"]
    assert not calls  # no probe went through the user's hooks
    x = torch.randn(2, 8, 5, 5)
    assert model["channels"](x).shape == x.shape


def test_mlp_probe_leaves_the_linears_hooks_alone():
    mlp = ThirdPartyMLP(8, 16)
    calls = []
    mlp.gate_proj.register_forward_hook(lambda *args: calls.append(args))
    model = nn.ModuleDict({"mlp": mlp})
    assert len(patch(model)) == 1 and not calls  # not fired by the probe
    model["mlp"](torch.randn(3, 8))
    assert len(calls) == 1  # still there, on the Linear the new module holds


def test_a_norm_whose_output_follows_its_fp32_weight_keeps_doing_so():
    """HF-style norms kept in fp32 inside a bf16 model return fp32 (the weight multiplies
    last); the next layer expects it. The replacement keeps that dtype rule."""
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), ThirdPartyRMSNorm(8), nn.Linear(8, 4))
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    want = model(x)
    assert want.dtype == torch.float32
    report = patch(model)
    assert [r.after for r in report] == ["fastnn.RMSNorm(output in the promoted dtype)"]
    assert isinstance(model[1], fastnn.RMSNorm)
    assert repr(model[1]) == (
        "RMSNorm((8,), eps=1e-06, elementwise_affine=True, output in the promoted dtype of "
        "input and weight)"
    )
    got = model(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 activations
    assert model[1](torch.randn(2, 8)).dtype == torch.float32


class CastToWeightRMSNorm(ThirdPartyRMSNorm):
    """As HF's T5LayerNorm: the output takes a 16-bit weight's dtype, whatever the input's."""

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


def test_a_norm_that_casts_to_its_16_bit_weight_dtype_is_left_alone():
    """bf16 out of fp32 input (a bf16 T5 keeps its residual stream in fp32): fastnn's norms
    return the input's dtype, and the next bf16 Linear would refuse fp32."""
    model = nn.ModuleDict({"t5": CastToWeightRMSNorm(8), "llama": ThirdPartyRMSNorm(8)})
    model.bfloat16()
    report = patch(model)
    assert [r.path for r in report] == ["llama"]
    why = dict(report.skipped)["t5"]
    assert "returns torch.bfloat16 for torch.float32 input" in why, why
    assert model["llama"](torch.randn(2, 8)).dtype == torch.float32  # promotion, as before


@pytest.mark.parametrize("patched_in", [torch.bfloat16, torch.float32])
def test_the_output_dtype_rule_holds_after_the_model_changes_dtype(patched_in):
    """The probes try a bf16 input with an fp32 weight and an fp32 input with a bf16 weight
    whatever the model's dtype when patched, so the replacement returns what the original does
    after a .float() or .bfloat16() too (fp32 weights, bf16 activations under autocast). A
    LlamaRMSNorm patched in bf16 became a plain RMSNorm (bf16 out of bf16 input once fp32,
    where it returns fp32); a T5-style norm patched in fp32 became a promoting one (fp32 out of
    fp32 input once bf16, where it returns bf16)."""
    model = nn.ModuleDict({"t5": CastToWeightRMSNorm(8), "llama": ThirdPartyRMSNorm(8)})
    original = copy.deepcopy(model)
    report = patch(model.to(patched_in))
    assert [r.path for r in report] == ["llama"] and "t5" in dict(report.skipped)
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype), original.to(dtype)
        for x in (torch.randn(2, 8), torch.randn(2, 8, dtype=torch.bfloat16)):
            assert model["llama"](x).dtype == original["llama"](x).dtype, (dtype, x.dtype)


def test_look_alikes_on_the_meta_device_are_left_alone_with_a_reason():
    """A model built on the meta device (before loading weights): look-alikes cannot be probed,
    so they are listed as skipped; torch's own norms, matched by type, are replaced."""
    with torch.device("meta"):
        model = nn.Sequential(ThirdPartyRMSNorm(8), ThirdPartyMLP(8, 16), nn.RMSNorm(8))
    report = patch(model)
    assert [r.path for r in report.replaced] == ["2"]
    assert [path for path, _ in report.skipped] == ["0", "1"]
    assert all("meta device" in why for _, why in report.skipped)
    assert type(model[0]) is ThirdPartyRMSNorm and type(model[2]) is fastnn.RMSNorm


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch(lambda x: x)
