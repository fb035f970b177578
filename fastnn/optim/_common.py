"""What the fastnn optimizers share: FusedStepMixin, the step() engine that collects the
parameters with gradients, creates torch.optim's state for them, groups them by (device, dtype)
and calls the chosen backend's update op once per group.

A tensor goes to the kernels as the kernel sees it: the local shard of a DTensor (FSDP2) and the
real view of a complex tensor (torch.optim does the same: complex Adam is Adam on (re, im)).
Nothing here reads a device tensor on the host: step() never synchronises with the GPU.
"""

from collections import defaultdict

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_scalar_dtype

from fastnn import _backend, ops
from fastnn._dtensor import is_dtensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
MASTER = "master_param"  # state key of the fp32 master copy (master_weights=True)


def kernel_view(t):
    """t as the kernels take it: a DTensor's local shard, a complex tensor's real view.

    The shard is _local_tensor, what to_local() returns under no_grad (step() runs under it):
    torch.compile then takes the local tensors as the graph's inputs, not the DTensors. With
    DTensor inputs, an FSDP2 param's grad (a view into the reduce-scatter buffer) was fakified
    again by AOTAutograd with fresh size symbols that Dynamo never saw, and AOTAutograd's
    subclass metadata guarded on them (local size != global size, which no op here pins down):
    an IndexError in Dynamo's guard building, on the first compiled step (torch 2.14.1)."""
    if is_dtensor(t):
        t = t._local_tensor
    return torch.view_as_real(t) if t.is_complex() else t


def new_step(p, group):
    """A zero step counter as torch.optim makes it: on the param's device when capturable or
    fused (so the fused GradScaler protocol and CUDA graphs need no host), else on the host."""
    if group.get("capturable") or group.get("fused"):
        return torch.zeros(
            (), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device
        )
    return torch.tensor(0.0, dtype=_get_scalar_dtype())


def zeros_state(p, dtype=None):
    """A zero state tensor like p (torch's zeros_like(p, preserve_format)), in `dtype` if given."""
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def host_float(value, what):
    """A hyperparameter as a Python float. A 0-d CPU tensor is read on the host (no device sync);
    a tensor on an accelerator would need a sync every step, so it is refused."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(
                f"fastnn.optim: {what} as a tensor on {value.device} would synchronise the host "
                "every step; pass a float or a CPU tensor (lr may be a device tensor)"
            )
        return float(value)
    return float(value)


def lr_arguments(lr, device):
    """(lr float, lr_tensor) for an update of tensors on `device`: a tensor lr on that device is
    read by the kernel; a CPU tensor lr is read on the host (no device sync). Under
    torch.compile a float lr goes in as an fp64 tensor on `device` computed in the graph (ones
    times lr: Dynamo keeps a float graph input symbolic through that product, not through
    torch.tensor / full / scalar_tensor): as the op's float argument it made Dynamo specialise
    the graph on its value, and a scheduler's every new lr compiled the step again (8 graphs in
    12 steps, then eager). MPS has no fp64: fp32 there, the precision of its updates anyway."""
    if not isinstance(lr, torch.Tensor):
        if torch.compiler.is_compiling():
            dtype = torch.float32 if device.type == "mps" else torch.float64
            return 0.0, torch.ones((), dtype=dtype, device=device) * lr
        return float(lr), None
    if lr.device == device:
        return 0.0, lr
    if lr.device.type == "cpu":
        return float(lr), None
    return 0.0, lr.to(device, non_blocking=True)


def grad_dtype_ok(grad_dtype, param_dtype):
    """The grads every backend's kernels read: in their param's dtype, or float32 for a float16 /
    bfloat16 param (Tensor.grad_dtype set to keep low-precision params' gradients in fp32; the
    update reads them unrounded, into fp32 master weights too)."""
    return grad_dtype == param_dtype or (
        grad_dtype == torch.float32 and param_dtype in LOW_PRECISION
    )


def _low_precision_master(group, p):
    return bool(group.get("master_weights")) and p.dtype in LOW_PRECISION


class FusedStepMixin:
    """step(), master weights and GradScaler support for a torch.optim optimizer subclass.

    Subclasses set FAMILY / OP (backend family and op name), MOMENTS (the keys of the
    per-element state) and define _new_state(p, group, state,
    dtype) and _op_arguments(group, states) -> (state lists, kwargs): the op's state-list
    arguments before `steps`, and its keyword arguments but lr.
    """

    FAMILY = ""
    OP = ""
    MOMENTS = ()

    def _fastnn_setup(self, master_weights):
        if self.defaults.get("differentiable"):
            raise RuntimeError(
                f"fastnn.optim.{type(self).__name__} does not support differentiable=True (its "
                f"fused update is not differentiable); use torch.optim.{type(self).__name__}"
            )
        if master_weights:  # without it the defaults and groups have torch's keys alone
            self.defaults["master_weights"] = True
            for group in self.param_groups:
                group.setdefault("master_weights", True)
        self._register_fp32_hooks()
        self._master_versions = {}  # id(param) -> its _version after its last update

    def _register_fp32_hooks(self):
        # Hooks are not pickled (torch.optim.Optimizer.__getstate__ keeps defaults, state and
        # param_groups only), so __setstate__ calls this again; never twice.
        if _keep_fp32_state not in self._optimizer_load_state_dict_pre_hooks.values():
            self.register_load_state_dict_pre_hook(_keep_fp32_state)
        if _restore_fp32_state not in self._optimizer_load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_restore_fp32_state)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register_fp32_hooks()
        # (load_state_dict calls this too: no version seen, so the next step checks each loaded
        # master against its param; see _written_outside_step)
        self._master_versions = {}

    def load_state_dict(self, state_dict):
        # fastnn's pre-hook keeps the saved fp32 state from torch's cast to the params' dtypes:
        # it runs after the user's pre-hooks, on the state_dict they return.
        hooks = self._optimizer_load_state_dict_pre_hooks
        for key, hook in list(hooks.items()):
            if hook is _keep_fp32_state:
                hooks.move_to_end(key)
        super().load_state_dict(state_dict)

    # GradScaler calls step() with grad_scale / found_inf set (the fused protocol: the kernels
    # unscale, and a step with an inf found writes nothing, with no host sync) when this is True:
    # as for torch's optimizers, only with fused=True (its step counters live on the params'
    # device). Otherwise GradScaler unscales the grads and skips step() itself, as it does for
    # torch.optim.Adam: no step hooks, no state and unscaled grads on a skipped step.
    @property
    def _step_supports_amp_scaling(self):
        return all(g.get("fused") for g in self.param_groups)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value):
        pass  # torch.optim.Adam.__init__ assigns it for fused=True; the property decides

    def _params_with_grad(self, group):
        """The group's params that have a gradient; torch.optim's errors for the others."""
        if group.get("differentiable"):
            raise RuntimeError(
                f"fastnn.optim.{type(self).__name__} does not support differentiable=True"
            )
        out = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(self._sparse_message())
            if not grad_dtype_ok(grad.dtype, p.dtype):
                raise RuntimeError(
                    f"fastnn.optim.{type(self).__name__}: a {p.dtype} param (shape "
                    f"{tuple(p.shape)}) has a {grad.dtype} grad; a grad must have its param's "
                    "dtype, or float32 for a float16 / bfloat16 param"
                )
            if is_dtensor(p) and grad.placements != p.placements:
                # A replicated norm weight under sequence parallelism gets a Partial grad (each
                # rank's rows): summed here, where torch's ops would sum it implicitly; the
                # kernels update local shards, so grad and param must have one layout.
                p.grad = grad.redistribute(placements=p.placements)
            out.append(p)
        return out

    def _sparse_message(self):
        return f"{type(self).__name__} does not support sparse gradients"

    def _init_state(self, p, group):
        """p's state (created where missing), as the kernels need it."""
        state = self.state[p]
        master = _low_precision_master(group, p)
        if len(state) == 0 and group.get("fused"):
            _device_dtype_check_for_fused(p)
        # Low-precision params with master weights keep fp32 moments too: a bf16 exp_avg_sq
        # cannot move by (1 - 0.999) of itself (below half a bf16 ulp, 2^-9).
        self._new_state(p, group, state, torch.float32 if master else None)
        step = state["step"]
        if isinstance(step, torch.Tensor) and (
            not step.is_floating_point() or step.dtype in LOW_PRECISION
        ):
            # An integer step from a state_dict (torch's for-loop accepts one), or a 16-bit one
            # (a checkpoint with every float cast down): the kernels count in fp32 / fp64, as
            # torch.optim's own step tensors do (fp16 counts only to 2048 exactly).
            state["step"] = step.to(_get_scalar_dtype(is_fused=group.get("fused")))
        if not master:
            # A master copy loaded for a param that is no longer low precision (a bf16 run
            # resumed in fp32): the param steps from itself, as torch.optim's would.
            state.pop(MASTER, None)
        elif MASTER not in state:
            state[MASTER] = p.detach().to(torch.float32, copy=True)
        elif self._written_outside_step(p):
            # Elements that no longer hold their master's rounding were written outside step()
            # (a model's load_state_dict, an in-place clamp or copy under no_grad): they restart
            # from p, or the next step would undo the write. The others keep their master: a
            # version bump may come from a write to another view of p's storage (params that
            # are slices of one flat buffer share one version counter). Elementwise, with no
            # host sync, on bit patterns: Inductor compiles `value == m.to(value.dtype)` without
            # the rounding (emulate_precision_casts off), which reset nearly every master.
            # On DTensors' local shards, as the op writes them: a DTensor copy_ here and the
            # op's write of the shard were two chained write-backs into one input of a compiled
            # FSDP2 step, which AOTAutograd refused (assert_functional_graph).
            m, value = kernel_view(state[MASTER]), kernel_view(p.detach())
            rounded = m.to(value.dtype).view(torch.int16)  # masters are kept for 16-bit params
            m.copy_(torch.where(value.view(torch.int16) == rounded, m, value))
        return state

    def _written_outside_step(self, p):
        """Whether p may have been written since its master was: its version moved since its
        last update here, or it has had none since this optimizer was loaded or unpickled (a
        loaded master can be older than p: torch.optim keeps the entry and ignores it, so a
        run of it in between left the master stale). Writes through p.data are not seen (it has
        a version counter of its own). Under torch.compile, which traces no version counters,
        always: a compiled step once undid a model.load_state_dict between steps. The check is
        then one more pass over the low-precision params and their masters, fused by inductor
        (read p and master, write master: about a third of an Adam step's traffic)."""
        if torch.compiler.is_compiling():
            return True
        seen = self._master_versions.get(id(p))
        return seen is None or seen != p._version

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param with a grad: one backend op call per (device, dtype)."""
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Validate everything before changing anything: a bad grad in the last group must not
        # leave the first groups stepped.
        work = [(group, self._params_with_grad(group)) for group in self.param_groups]
        for group, _ in work:
            self._check_group(group)
        for group, params in work:
            states = [self._init_state(p, group) for p in params]
            for k, occurrence in enumerate(_occurrences(params)):
                # The first round unscales the grads in place (fused GradScaler protocol); a
                # param's later rounds read its grad unscaled.
                scale = grad_scale if k == 0 else None
                for (device, _, special), idx in _buckets(params, occurrence).items():
                    bucket = ([params[i] for i in idx], [states[i] for i in idx])
                    self._update_bucket(group, device, *bucket, special, scale, found_inf)
        # After every group: a group's update bumps the version counter its params may share
        # with another group's (views of one buffer).
        if not torch.compiler.is_compiling():
            for group, params in work:
                if group.get("master_weights"):
                    for p in params:
                        self._master_versions[id(p)] = p._version
        return loss

    def _check_group(self, group):
        # Values the kernels take as host floats: refuse device tensors before any update.
        for key in ("betas", "eps", "weight_decay", "alpha", "momentum"):
            if key in group:
                values = group[key] if isinstance(group[key], (tuple, list)) else (group[key],)
                for v in values:
                    host_float(v, key)

    def _lay_out_state_as(self, p, p_contiguous, state):
        """The kernels read a param's state alongside it, element by element: a state tensor laid
        out otherwise (the param made channels_last after its first step, a state_dict saved for
        a transposed param) is replaced by a copy in the param's layout, as zeros_like(param)
        lays out new state. (DTensor and complex params keep the kernels' error for it.)"""
        for key in (*self.MOMENTS, MASTER):
            t = state.get(key)
            if t is not None and not (p_contiguous and t.is_contiguous()):
                if t.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=t.dtype).copy_(t)

    def _update_bucket(self, group, device, params, states, special, grad_scale, found_inf):
        # special: DTensor or complex params, whose tensors the kernels see through views.
        # One pass over the params: in a training loop their tensors are cold in the caches
        # (forward and backward evicted them), and each touch costs.
        view = kernel_view if special else _same
        compiling = torch.compiler.is_compiling()
        # copied_back: (tensor, the copy the op updates in its place), copied back after the op
        pk, gk, copied_back, relaid = [], [], [], []
        # (address, bytes spanned) of each param's memory: not traced when compiled, and a fake
        # param's data_ptr warns (FakeTensorMode); meta tensors and wrapper subclasses give
        # address 0, which _overlap_rounds passes over
        spans = []
        has_addresses = not (compiling or isinstance(view(params[0]), FakeTensor))
        for q, state in zip(params, states, strict=True):
            p, g = view(q), view(q.grad)
            contiguous = p.is_contiguous()
            if has_addresses:
                spans.append((p.data_ptr(), p.nbytes if contiguous else _bytes_spanned(p)))
            if not contiguous and not is_dense(p):
                # A param with gaps (a strided slice of a larger tensor): the kernels take dense
                # tensors, so they update a dense copy (its state is dense too: zeros_like gives
                # a contiguous tensor for it), written back after the op.
                copied_back.append((p, p.contiguous()))
                p, contiguous = copied_back[-1][1], True
            # Compiled, strides are not compared: Dynamo fails on a grad view at storage offset
            # 0 of a non-contiguous param (a DDP bucket's first grad of a channels_last conv).
            if not (contiguous and g.is_contiguous()) and (compiling or g.stride() != p.stride()):
                # e.g. a DDP bucket view of a transposed param: the kernels read a copy
                relaid.append((g, torch.empty_like(p, dtype=g.dtype).copy_(g)))
                g = relaid[-1][1]
            if not special:
                self._lay_out_state_as(p, contiguous, state)
            pk.append(p)
            gk.append(g)
        rounds = _overlap_rounds(spans)
        if len(rounds) > 1:
            # Distinct params over one memory (weights tied through .data rather than one
            # Parameter): torch's for-loop step updates the later from the earlier's result,
            # where one op call would update that memory from two threads (CUDA blocks) at once,
            # losing updates (whole lr-sized steps) at random. One call per round, in order.
            for idx in rounds:
                sub = ([params[i] for i in idx], [states[i] for i in idx])
                self._update_bucket(group, device, *sub, special, grad_scale, found_inf)
            return
        master = [view(s[MASTER]) for s in states] if MASTER in states[0] else []
        lists, kwargs = self._op_arguments(group, states)
        if special:
            lists = [[kernel_view(t) for t in lst] for lst in lists]
        steps = [s["step"] for s in states]
        lr, lr_tensor = lr_arguments(group["lr"], device)
        scale = _on(grad_scale, device)
        inf = _on(found_inf, device)
        unscaled = scale is not None
        if unscaled and compiling:
            # Compiled, the grads are unscaled by a torch op and the update reads them: the op
            # that writes them trips Inductor on grads that alias (see ops/optim.py). Rounded to
            # the grads' dtype first (GradScaler.unscale_ multiplies by the scale's reciprocal:
            # the same quotients for power-of-two scales); with an inf, left scaled.
            divisor = scale if inf is None else torch.where(inf != 0, 1.0, scale)
            torch._foreach_div_(gk, divisor)
            scale = None
        # Without a grad_scale the grads are only read: the op that says so (see ops/optim.py).
        name = self.OP if scale is not None else self.OP + "keep_grads_"
        op = ops.get(_backend.resolve(self.FAMILY, device.type), name)
        # The op counts the steps too (not a foreach add here: 200-300 us for 39 CPU counters,
        # 5% of an RMSprop step over 5M params whose objects are cold in the caches).
        if params[0].is_complex() and compiling:
            # The op writing the real views of complex tensors fails torch 2.14's
            # functionalization ("setStorage ... out of bounds" with aot_eager,
            # "auto_functionalized_v2 was not removed" with Inductor): it writes copies.
            written = [pk, *lists]
            pk, *lists = [[t.clone() for t in lst] for lst in written]
            for views, copies in zip(written, [pk, *lists], strict=True):
                copied_back += zip(views, copies, strict=True)
        op(pk, gk, *lists, steps, master, lr_tensor, scale, inf, lr=lr, **kwargs)
        if device.type == "meta" and not compiling:
            # Meta params run the op's fake, which writes nothing; torch's step still counts
            # their (CPU) steps, and a later real step's bias corrections read the count.
            torch._foreach_add_(steps, 1)
        for t, copy in reversed(copied_back):  # a clone of a gapped param's dense copy first
            t.copy_(copy)
        if unscaled:  # the grads it read hold grad / grad_scale now
            for g, copy in relaid:
                g.copy_(copy)


def is_dense(t):
    """No gaps or overlaps: the dims (size-1 ones aside) ordered by stride tile memory exactly
    (the C++ is_non_overlapping_and_dense, which Python tensors do not expose)."""
    if t.is_contiguous():
        return True
    expected = 1
    dims = sorted(
        (d for d in zip(t.shape, t.stride(), strict=True) if d[0] != 1), key=lambda d: d[1]
    )
    for size, stride in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _bytes_spanned(t):
    """Bytes from t's first element to just past its last (its strides are not negative)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))) * (
        t.element_size()
    )


def _overlap_rounds(spans):
    """Indices into spans ((address, bytes) of a bucket's params) in rounds, one op call each:
    the params whose memory overlaps another's (clusters of overlapping spans) one per round in
    their list order, the others in the first. Address 0 is no memory of the param's own (meta
    tensors, wrapper subclasses): never an overlap."""
    end = 0
    for start, size in sorted(spans):  # the usual case, no overlap: one sort (0.2 us a param)
        if size and start:
            if start < end:
                break
            end = start + size
    else:
        return [range(len(spans))]
    clusters, end = [], 0
    for i in sorted(range(len(spans)), key=lambda i: spans[i][0]):
        start, size = spans[i]
        if size == 0 or start == 0:
            continue
        if clusters and start < end:
            clusters[-1].append(i)
        else:
            clusters.append([i])
        end = max(end, start + size)
    round_of = [0] * len(spans)
    for members in clusters:
        for k, i in enumerate(sorted(members)):
            round_of[i] = k
    rounds = [[] for _ in range(max(round_of) + 1)]
    for i, k in enumerate(round_of):
        rounds[k].append(i)
    return rounds


def _same(t):
    return t


def _on(t, device):
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def _occurrences(params):
    """Indices of params in rounds, round k holding each param's k-th occurrence in the list, in
    order: one round without repeats. A param listed twice in a group (torch warns of it) is
    then stepped twice in turn, each time counting its own step, as torch's for-loop step does;
    in one op call its two copies would update the same memory at once."""
    if len({id(p) for p in params}) == len(params):
        return [range(len(params))]  # the usual case, found without hashing tensors
    rounds, seen = [], {}
    for i, p in enumerate(params):
        k = seen.get(id(p), 0)
        seen[id(p)] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds


def _buckets(params, indices):
    """`indices` (into params) grouped by (device, dtype, needs a kernel view), in order."""
    out = defaultdict(list)
    for i in indices:
        p = params[i]
        special = is_dtensor(p) or p.is_complex()
        k = kernel_view(p) if special else p
        out[(k.device, k.dtype, special)].append(i)
    return out


# ---- state_dict: fp32 state of low-precision params stays fp32 ---------------------------------
# torch.optim.Optimizer.load_state_dict casts every floating state tensor to its param's dtype,
# which would round master weights (and fp32 moments) of bf16 params to bf16. The pre-hook keeps
# the saved tensors; the post-hook puts them back in fp32 for groups with master_weights.


def _keep_fp32_state(optimizer, state_dict):
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    kept = {}
    for saved_id, p in zip(saved_ids, params, strict=False):
        entry = state_dict["state"].get(saved_id)
        if isinstance(entry, dict):
            kept[p] = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
    optimizer._fastnn_loaded_state = kept


def _restore_fp32_state(optimizer):
    kept = getattr(optimizer, "_fastnn_loaded_state", {})
    optimizer._fastnn_loaded_state = {}
    for group in optimizer.param_groups:
        # A state_dict saved by torch.optim has no master_weights: keep this optimizer's choice.
        if optimizer.defaults.get("master_weights"):
            group.setdefault("master_weights", True)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or not _low_precision_master(group, p):
                continue
            for key in (*optimizer.MOMENTS, MASTER):
                if key in state:
                    src = kept.get(p, {}).get(key, state[key])
                    state[key] = src.to(device=p.device, dtype=torch.float32, copy=True)
