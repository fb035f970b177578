"""fastnn.optim state against torch.optim's: the state_dict layout, round trips both ways (training
goes on as if never saved), and fp32 master weights in the state (saved, loaded, pickled, and
kept fp32 throughout)."""

import copy

import pytest
import torch
from conftest import BACKENDS, skip_unless_available
from optim_cases import (
    STEPS,
    assert_params_close,
    assert_states_close,
    clone_leaves,
    make_grads,
    make_params,
    run,
)
from tolerances import assert_rel_close

import fastnn
from fastnn.optim import Adam, AdamW, RMSprop

pytestmark = pytest.mark.usefixtures("small_triton_chunks")


# ---- state_dict: layout and round trips with torch.optim ------------------------------------


def _split(grads):
    return grads[:10], grads[10:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cls,kw",
    [
        ("Adam", dict(amsgrad=True, weight_decay=0.1)),
        ("AdamW", dict()),
        ("RMSprop", dict(momentum=0.9, centered=True)),
    ],
)
@pytest.mark.parametrize("direction", ["torch_to_fastnn", "fastnn_to_torch"])
def test_state_dict_round_trip(backend, cls, kw, direction):
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    params = make_params(backend=backend)
    first, second = _split(make_grads(params, STEPS))
    fast_cls, torch_cls = getattr(fastnn.optim, cls), getattr(torch.optim, cls)
    # The uninterrupted torch run.
    ref = clone_leaves(params)
    ref_opt = torch_cls(ref, lr=0.01, foreach=False, **kw)
    run(ref_opt, ref, first + second)
    # Half a run in one library, the state_dict handed to the other, the rest there.
    a, b = clone_leaves(params), None
    with fastnn.use_backend(backend):
        if direction == "torch_to_fastnn":
            opt_a = torch_cls(a, lr=0.01, foreach=False, **kw)
            run(opt_a, a, first)
            b = [torch.nn.Parameter(p.detach().clone()) for p in a]
            opt_b = fast_cls(b, lr=0.5, **kw)  # lr comes from the state_dict
        else:
            opt_a = fast_cls(a, lr=0.01, **kw)
            run(opt_a, a, first)
            b = [torch.nn.Parameter(p.detach().clone()) for p in a]
            opt_b = torch_cls(b, lr=0.5, foreach=False, **kw)
        sd = opt_a.state_dict()
        opt_b.load_state_dict(sd)
        run(opt_b, b, second)
    assert_params_close(b, ref)
    assert_states_close(opt_b, ref_opt, b, ref)


@pytest.mark.parametrize("step_dtype", [torch.int64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_integer_and_16_bit_steps_in_a_state_dict_count_on(cls, step_dtype):
    # A state_dict whose step counts are integer or 16-bit tensors: torch's for-loop steps on
    # from it, and so does fastnn (its kernels count in fp32: the count is converted once).
    params = make_params()
    first, second = _split(make_grads(params, STEPS))
    ref = clone_leaves(params)
    ref_opt = getattr(torch.optim, cls)(ref, lr=0.01, foreach=False)
    run(ref_opt, ref, first)
    sd = copy.deepcopy(ref_opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = torch.tensor(int(entry["step"]), dtype=step_dtype)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = getattr(fastnn.optim, cls)(ours, lr=0.01)
    opt.load_state_dict(sd)
    run(opt, ours, second)
    run(ref_opt, ref, second)
    assert_params_close(ours, ref)
    assert all(opt.state[p]["step"].dtype == torch.float32 for p in ours)
    assert float(opt.state[ours[0]]["step"]) == STEPS


def test_state_dict_layout_is_torchs():
    params = make_params()
    grads = make_grads(params, 3)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt, ref_opt = AdamW(ours, amsgrad=True), torch.optim.AdamW(ref, amsgrad=True)
    run(opt, ours, grads)
    run(ref_opt, ref, grads)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for k, v in ref_sd["state"].items():
        assert list(sd["state"][k]) == list(v)  # same keys, same order
        assert sd["state"][k]["step"].device == v["step"].device
    assert sd["param_groups"] == ref_sd["param_groups"]  # the same keys and values
    assert opt.defaults == ref_opt.defaults and repr(opt) == repr(ref_opt)
    with_masters = AdamW(clone_leaves(params), amsgrad=True, master_weights=True)
    extra = set(with_masters.state_dict()["param_groups"][0]) - set(ref_sd["param_groups"][0])
    assert extra == {"master_weights"}


def _skip_interpreted_triton(backend):
    if backend == "triton":
        pytest.skip(
            "the Triton interpreter truncates fp32 -> bf16, so its params are not their masters' "
            "rounding and read as written outside step()"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_state_dict_round_trip(backend):
    # Saved master weights and fp32 moments come back fp32 (torch.optim's loader would cast them
    # to bf16), and training continues exactly as without the interruption.
    skip_unless_available(backend, "adam", "cpu")
    _skip_interpreted_triton(backend)  # a loaded master is checked against its param
    params = make_params(torch.bfloat16, backend=backend)
    first, second = _split(make_grads(params, STEPS))
    ref = clone_leaves(params)
    with fastnn.use_backend(backend):
        ref_opt = AdamW(ref, lr=0.02, master_weights=True)
        run(ref_opt, ref, first + second)
        a = clone_leaves(params)
        opt_a = AdamW(a, lr=0.02, master_weights=True)
        run(opt_a, a, first)
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        opt_b = AdamW(b, lr=0.02, master_weights=True)
        opt_b.load_state_dict(opt_a.state_dict())
        assert opt_b.state[b[1]]["master_param"].dtype == torch.float32
        assert opt_b.state[b[1]]["exp_avg_sq"].dtype == torch.float32
        run(opt_b, b, second)
    for p, q in zip(b, ref, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt_b.state[p]["master_param"], ref_opt.state[q]["master_param"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
@pytest.mark.parametrize("compiled", [None, "aot_eager", "inductor"])
def test_master_weights_follow_writes_outside_step(backend, cls, compiled):
    """A param written between steps (a model's load_state_dict, a clamp under no_grad) keeps
    the write: the written elements' masters restart from it, as an fp32 run written the same
    way (a stale master made the next step undo the write), and the other elements keep theirs
    (restarting them from the bf16 values loses what the master holds below bf16's rounding).
    A compiled step too (it once skipped the check and undid the write; under Inductor the
    check once compared without the bf16 rounding and reset nearly every master)."""
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    _skip_interpreted_triton(backend)
    params = make_params(torch.bfloat16, shapes=[(33, 7), (5,)], backend=backend)
    grads = make_grads(params, 4)
    ours = clone_leaves(params)
    ref32 = [torch.nn.Parameter(p.float()) for p in params]
    opt = getattr(fastnn.optim, cls)(ours, lr=0.02, master_weights=True)
    ref_opt = getattr(torch.optim, cls)(ref32, lr=0.02, foreach=False)
    grads32 = [[g.float() for g in gs] for gs in grads]
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=compiled) if compiled else opt.step

    def run_ours(step_grads):
        for gs in step_grads:
            for p, g in zip(ours, gs, strict=True):
                p.grad = g.clone()
            step()

    with fastnn.use_backend(backend):
        run_ours(grads[:2])
        run(ref_opt, ref32, grads32[:2])
        with torch.no_grad():
            for p, r in zip(ours, ref32, strict=True):
                p.view(-1)[:3].fill_(5.0)
                r.view(-1)[:3].fill_(5.0)
        run_ours(grads[2:])
        run(ref_opt, ref32, grads32[2:])
    for p, r in zip(ours, ref32, strict=True):
        assert_rel_close(opt.state[p]["master_param"], r.detach().double(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
def test_a_master_kept_by_torch_optim_does_not_undo_its_steps(backend, cls):
    """fastnn (master weights) -> torch.optim, which keeps the master entry and ignores it,
    trains -> fastnn again: the stale master must not take the params back to where fastnn
    left them (one step with zero grads undid torch's ten)."""
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    _skip_interpreted_triton(backend)
    params = make_params(torch.bfloat16, shapes=[(33, 7), (5,)], backend=backend)
    grads = make_grads(params, 12)
    ours = clone_leaves(params)
    with fastnn.use_backend(backend):
        opt = getattr(fastnn.optim, cls)(ours, lr=0.02, master_weights=True)
        run(opt, ours, grads[:2])
        theirs = getattr(torch.optim, cls)(ours, lr=0.02)
        theirs.load_state_dict(opt.state_dict())
        run(theirs, ours, grads[2:])
        trained = [p.detach().clone() for p in ours]
        again = getattr(fastnn.optim, cls)(ours, lr=0.02, master_weights=True)
        again.load_state_dict(theirs.state_dict())
        for p in ours:
            p.grad = torch.zeros_like(p)
        again.step()
    for p, t in zip(ours, trained, strict=True):
        assert_rel_close(p.detach().double(), t.double(), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
def test_master_weights_of_params_sharing_one_buffer_hold(backend, cls):
    """Params that are views of one flat bf16 buffer share its version counter: each group's
    update, and another optimizer's step of a sibling, bump it. No element is written outside
    step(), so every master holds, as an fp32 run of separate params (were they restarted from
    the bf16 params, updates of lr 1e-4 would round away and the params never move)."""
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    _skip_interpreted_triton(backend)
    flat = torch.ones(12, dtype=torch.bfloat16)
    ours = [torch.nn.Parameter(flat[:5]), torch.nn.Parameter(flat[5:])]
    ref32 = [torch.nn.Parameter(torch.ones(n)) for n in (5, 7)]
    kw = dict(lr=1e-4, weight_decay=0.0)
    opt = getattr(fastnn.optim, cls)([{"params": [p]} for p in ours], master_weights=True, **kw)
    sibling = torch.optim.SGD(ours[1:], lr=0.0)  # steps bump the shared counter, change nothing
    ref_opt = getattr(torch.optim, cls)(ref32, foreach=False, **kw)
    with fastnn.use_backend(backend):
        for _ in range(20):
            for p in (*ours, *ref32):
                p.grad = torch.ones_like(p)
            opt.step()
            sibling.step()
            ref_opt.step()
    for p, r in zip(ours, ref32, strict=True):
        assert_rel_close(opt.state[p]["master_param"], r.detach().double(), torch.float32)
    assert (flat < 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
def test_a_master_state_loaded_for_fp32_params_steps_from_the_params(backend, cls):
    """A bf16 run with master weights resumed in fp32 (state_dict loaded into an optimizer over
    fp32 params): the params step from themselves, as torch.optim's do; the loaded master is
    dropped, not copied over them."""
    skip_unless_available(backend, cls.lower().rstrip("w"), "cpu")
    bf16 = torch.nn.Parameter(torch.full((5,), 3.0, dtype=torch.bfloat16))
    saved = getattr(fastnn.optim, cls)([bf16], lr=0.01, master_weights=True)
    bf16.grad = torch.ones_like(bf16)
    saved.step()
    ours, ref = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    opt = getattr(fastnn.optim, cls)([ours], lr=0.01)
    ref_opt = getattr(torch.optim, cls)([ref], lr=0.01, foreach=False)
    for o, p in ((opt, ours), (ref_opt, ref)):
        o.load_state_dict(copy.deepcopy(saved.state_dict()))  # a load may alias the tensors
        p.grad = torch.ones_like(p)
        with fastnn.use_backend(backend):
            o.step()
    torch.testing.assert_close(ours, ref)
    assert "master_param" not in opt.state[ours]


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_loaded_with_the_model_hold(backend):
    """Resuming in the same process (the model's params copied back, then the optimizer's
    state_dict loaded) keeps the saved fp32 masters, not masters rounded from the params."""
    skip_unless_available(backend, "adam", "cpu")
    params = make_params(torch.bfloat16, shapes=[(33, 7), (5,)], backend=backend)
    grads = make_grads(params, 4)
    ours, fresh = clone_leaves(params), None
    with fastnn.use_backend(backend):
        opt = AdamW(ours, lr=0.02, master_weights=True)
        run(opt, ours, grads[:2])
        saved_params = [p.detach().clone() for p in ours]
        saved = copy.deepcopy(opt.state_dict())
        run(opt, ours, grads[2:3])
        with torch.no_grad():
            for p, q in zip(ours, saved_params, strict=True):
                p.copy_(q)
        opt.load_state_dict(copy.deepcopy(saved))  # (the steps count in the loaded tensors)
        run(opt, ours, grads[3:])
        fresh = [torch.nn.Parameter(q.clone()) for q in saved_params]
        fresh_opt = AdamW(fresh, lr=0.02, master_weights=True)
        fresh_opt.load_state_dict(saved)
        run(fresh_opt, fresh, grads[3:])
    for p, q in zip(ours, fresh, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], fresh_opt.state[q]["master_param"])


def test_user_load_state_dict_pre_hooks_edit_the_master_weights_state():
    """fastnn's own pre-hook (which keeps fp32 state from torch's cast) runs after the user's,
    on the state_dict they return."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = AdamW([p], lr=0.01, master_weights=True)
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()

    def zero_exp_avg(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"] = torch.zeros(3)
        return state_dict

    opt.register_load_state_dict_pre_hook(zero_exp_avg)
    opt.load_state_dict(saved)
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3))
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_master_weights_from_torch_state_dict():
    # A torch.optim state_dict has no master weights: the optimizer's own choice stays, masters
    # start from the params and the loaded bf16 moments become fp32.
    params = make_params(torch.bfloat16)
    grads = make_grads(params, 4)
    a = clone_leaves(params)
    ref_opt = torch.optim.Adam(a, lr=0.01)
    run(ref_opt, a, grads[:2])
    opt = Adam(a, lr=0.01, master_weights=True)
    opt.load_state_dict(ref_opt.state_dict())
    assert opt.param_groups[0]["master_weights"] is True
    assert opt.state[a[1]]["exp_avg"].dtype == torch.float32
    run(opt, a, grads[2:])
    assert opt.state[a[1]]["master_param"].dtype == torch.float32


def test_pickled_optimizer_keeps_master_weights_fp32_on_load():
    import pickle

    q = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    opt = RMSprop([q], master_weights=True)
    q.grad = torch.ones(5, dtype=torch.bfloat16)
    opt.step()
    copy = pickle.loads(pickle.dumps(opt))  # torch.optim drops hooks when pickling
    copy.load_state_dict(opt.state_dict())
    (p,) = copy.param_groups[0]["params"]
    assert copy.state[p]["master_param"].dtype == torch.float32
    assert copy.state[p]["square_avg"].dtype == torch.float32


def test_betas_as_a_list_as_checkpoint_loaders_hand_them_back():
    """torch.distributed.checkpoint's set_state_dict returns betas as a list; step() takes it."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = fastnn.optim.AdamW([p], betas=[0.9, 0.95])
    ref_opt = torch.optim.AdamW([ref], betas=(0.9, 0.95), foreach=False)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        ref.grad = torch.ones_like(ref)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p, ref)
