"""Train a small LLaMA-style character model with fastnn layers and fastnn.optim.AdamW under DDP.

The model: token embedding, pre-norm blocks (fastnn.RMSNorm with the residual add fused into the
norm, causal self-attention with rotary positions through F.scaled_dot_product_attention,
fastnn.SwiGLUMLP), a final norm and an output head tied to the embedding. It trains at the
character level on fastnn's own generated corpus (examples/corpus.py, no download) or on a text
file you name with --data.

Launch (gloo on CPUs, NCCL on GPUs; one process per GPU, or N CPU processes):

    python examples/train_ddp.py                                     # one process
    torchrun --nproc-per-node 2 examples/train_ddp.py --compare      # 2 CPU processes
    torchrun --nproc-per-node 8 examples/train_ddp.py --amp          # 8 GPUs, bf16 autocast
    # multi-node: the same command on every node, torchrun's own flags say who is who
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 examples/train_ddp.py   # node 0
    # (--node-rank 1 on the second node; HOST is node 0's address. If gloo or NCCL picks the
    # wrong network interface, set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, e.g. to eth0.)

--compare trains a plain PyTorch twin from the same seed on the same batches, interleaved step by
step (torch.nn.RMSNorm with an explicit add, an MLP of nn.Linear + F.silu, torch.optim.AdamW),
and ends with one line: both final losses and fastnn's speedup, from the median step times.
--fsdp shards both with FSDP2 (fully_shard per block, then the root) instead of DDP.
--compile runs the model and the optimizer step through torch.compile (Inductor).

Checkpoints (--ckpt PATH) hold the model, the optimizer and the step of every run, written by
rank 0 atomically; --resume continues from PATH when it exists. No RNG state is needed: the model
has no dropout and batch k of rank r is drawn from a generator seeded by (seed, k, r), so a resumed
run follows the uninterrupted trajectory exactly. --stop-after N ends this invocation after N steps
(the learning-rate schedule still spans --steps), for jobs with a time limit.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402  (examples/corpus.py, next to this file)

# ---------------------------------------------------------------------------------------------
# The model. `fast=True` builds it from fastnn pieces, `fast=False` from plain torch pieces; both
# create their parameters in the same order, so one seed gives both the same initial weights.


@dataclass
class Config:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    mlp_hidden: int  # about 8/3 * dim, as LLaMA
    max_seq_len: int = 128
    eps: float = 1e-5


class PlainMLP(nn.Module):
    """The LLaMA MLP in plain torch: down_proj(silu(gate_proj(x)) * up_proj(x)); x: [..., dim]."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(seq_len, head_dim, base=10000.0):
    """cos, sin: [seq_len, head_dim // 2] fp32, the rotary angles pos * base^(-2i / head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: [batch, heads, seq, head_dim]; rotates the pairs (x[..., :d/2], x[..., d/2:])."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [b, heads, t, head_dim]
        q, k = apply_rope(q, cos[:t], sin[:t]), apply_rope(k, cos[:t], sin[:t])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm block over a residual stream. forward(h, residual) -> (h, residual): `h` is the
    last sublayer's output not yet added to the stream; the add happens inside the next norm."""

    def __init__(self, cfg, fast):
        super().__init__()
        norm = fastnn.RMSNorm if fast else nn.RMSNorm
        self.fast = fast
        self.attn_norm = norm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = norm(cfg.dim, eps=cfg.eps)
        self.mlp = (fastnn.SwiGLUMLP if fast else PlainMLP)(cfg.dim, cfg.mlp_hidden)

    def add_norm(self, norm, h, residual):
        """(norm(h + residual), h + residual); residual=None means h starts the stream."""
        if residual is None:
            return norm(h), h
        if self.fast:
            # One fused pass: the add, then the norm of the sum. (Under autocast h is bf16 and
            # the stream fp32: the fused norm promotes h as `h + residual` does.)
            return norm(h, residual=residual)
        s = h + residual
        return norm(s), s

    def forward(self, h, residual, cos, sin):
        x, residual = self.add_norm(self.attn_norm, h, residual)
        h = self.attn(x, cos, sin)
        x, residual = self.add_norm(self.mlp_norm, h, residual)
        return self.mlp(x), residual


class Decoder(nn.Module):
    """tokens [batch, seq] int64 -> logits [batch, seq, vocab] (the parameters' dtype)."""

    def __init__(self, cfg, fast):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, fast) for _ in range(cfg.n_layers))
        self.norm = (fastnn.RMSNorm if fast else nn.RMSNorm)(cfg.dim, eps=cfg.eps)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        # GPT-2 / LLaMA-style init: N(0, 0.02), the projections that write into the residual
        # stream scaled by 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02
                if name.endswith(("out_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * self.cfg.n_layers)
                nn.init.normal_(p, std=std)

    def forward(self, tokens):
        h, residual = self.embed(tokens), None
        for block in self.blocks:
            h, residual = block(h, residual, self.rope_cos, self.rope_sin)
        x, _ = self.blocks[0].add_norm(self.norm, h, residual)
        return F.linear(x, self.embed.weight)  # tied output head


# ---------------------------------------------------------------------------------------------
# Data: character level. Batch `step` of rank r is a function of (seed, step, r) alone.


class CharData:
    def __init__(self, text, val_fraction=0.1):
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
        n_val = max(int(len(ids) * val_fraction), 1)
        self.train, self.val = ids[:-n_val], ids[-n_val:]

    def check_windows(self, seq_len):
        """Exits, before any training, when a split is too short for one window of seq_len."""
        total = len(self.train) + len(self.val)
        for split, data in (("training", self.train), ("validation", self.val)):
            if len(data) <= seq_len + 1:
                raise SystemExit(
                    f"the text is too short: its {split} split has {len(data)} of its {total} "
                    f"characters, and --seq-len {seq_len} needs more than {seq_len + 1}"
                )

    def batch(self, split, seed, step, rank, batch_size, seq_len, device):
        """(x, y): [batch_size, seq_len] int64 windows of `split` and the same shifted by one."""
        data = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 65_537 + rank) % 2**63)
        starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=g)
        windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1].to(device), windows[:, 1:].to(device)


# ---------------------------------------------------------------------------------------------
# One training run: a model, its optimizer, and what it measured.


class Run:
    def __init__(self, name, fast, cfg, args, device, world):
        self.name = name
        torch.manual_seed(args.seed)  # the same initial weights for every run
        model = Decoder(cfg, fast).to(device)
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard  # FSDP2, torch >= 2.6

            # The fused norm's residual output is a view of the kernel's [rows, N] result; FSDP2
            # warns that an in-place op on a returned view would skip its hook. Nothing here
            # writes in place into a block's outputs.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            self.model = model
        else:
            # gradient_as_bucket_view: the grads are views into DDP's buckets (no copy); the
            # optimizers read them in place.
            ids = [device.index] if device.type == "cuda" else None
            self.model = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
        # After wrapping: fully_shard replaces the parameters with sharded (DTensor) ones.
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt_cls = fastnn.optim.AdamW if fast else torch.optim.AdamW
        self.opt = opt_cls(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
        self.forward, self.step = self.model, self.opt.step
        if args.compile:
            self.forward, self.step = torch.compile(self.model), torch.compile(self.opt.step)
        self.pending = []  # this interval's losses, [1] tensors, not yet reduced over ranks
        self.step_times = []  # seconds per step on this rank, the whole run
        self.losses = []  # (step, loss averaged over ranks)


def lr_at(step, args):
    """Linear warm-up over --warmup steps, then cosine decay to 10% of --lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_step(run, x, y, lr, args, device):
    """One optimizer step; returns the seconds it took on this rank (device work included)."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    with autocast(args, device):
        logits = run.forward(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    if args.clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip)
    run.step()
    run.opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run.pending.append(loss.detach().reshape(1))
    return time.perf_counter() - t0


def autocast(args, device):
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(run, data, args, device, rank, world):
    """Mean loss over --eval-batches batches per rank of the validation text, same for every run."""
    run.model.eval()
    total = torch.zeros((), device=device)
    for i in range(args.eval_batches):
        x, y = data.batch("val", args.seed + 1, i, rank, args.batch_size, args.seq_len, device)
        with autocast(args, device):
            logits = run.forward(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    run.model.train()
    dist.all_reduce(total)
    return total.item() / (args.eval_batches * world)


# ---------------------------------------------------------------------------------------------
# Checkpoints: full (unsharded) state dicts, the same file for DDP and FSDP and any world size.


def save_checkpoint(path, runs, step, cfg, data, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # cpu_offload + full_state_dict: rank 0 gets the whole state on the CPU, the others nothing.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states = {}
    for run in runs:
        model_sd, optim_sd = get_state_dict(run.model, run.opt, options=options)
        states[run.name] = {"model": model_sd, "optim": optim_sd}
    if rank == 0:
        ckpt = {"step": step, "config": asdict(cfg), "vocab": data.vocab, "runs": states}
        tmp = f"{path}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint
    dist.barrier()


def load_checkpoint(path, runs, cfg, data):
    """Loads every run from `path`; returns the step to start at. Every rank reads the file, so
    on several nodes it must sit on a filesystem they share (as --ckpt's directory usually is)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["config"] != asdict(cfg) or ckpt["vocab"] != data.vocab:
        raise SystemExit(
            f"{path} was saved for another model or text: config {ckpt['config']}, "
            f"{len(ckpt['vocab'])} characters; this run has {asdict(cfg)}, "
            f"{len(data.vocab)} characters"
        )
    for run in runs:
        if run.name not in ckpt["runs"]:
            raise SystemExit(f"{path} holds no '{run.name}' run (saved without --compare?)")
        state = ckpt["runs"][run.name]
        set_state_dict(
            run.model,
            run.opt,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(full_state_dict=True),
        )
    return ckpt["step"]


# ---------------------------------------------------------------------------------------------
# Reporting (rank 0 only).


def progress_bar(done, total, width=24):
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done:>{len(str(total))}}/{total}"


def fmt_rate(tokens_per_s):
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s < 1e6 else f"{tokens_per_s / 1e6:.2f}M"


def report_interval(runs, step, args, world, metrics):
    """All-reduces the interval's losses; prints one line with a progress bar (rank 0)."""
    tokens_per_step = args.batch_size * args.seq_len * world
    parts = []
    for run in runs:
        k = len(run.pending)
        losses = torch.cat(run.pending)
        dist.all_reduce(losses)
        losses = (losses / world).tolist()
        run.pending = []
        first = step + 1 - k
        run.losses += list(zip(range(first + 1, step + 2), losses, strict=True))
        seconds = sum(run.step_times[-k:])
        parts.append(
            f"{run.name} loss {sum(losses) / k:.4f} {fmt_rate(tokens_per_step * k / seconds)} tok/s"
        )
        if metrics is not None:
            for i, loss in enumerate(losses):
                row = {"run": run.name, "step": first + i + 1, "loss": loss}
                row["step_time_s"] = run.step_times[-k + i]
                metrics.write(json.dumps(row) + "\n")
    if metrics is not None:
        metrics.flush()
    if dist.get_rank() == 0:
        print(f"\r{progress_bar(step + 1, args.steps)} | " + " | ".join(parts), flush=True)


def median_step_time(run):
    # The first steps pay for allocator growth and lazy initialisation: skip 20% of them.
    times = run.step_times[len(run.step_times) // 5 :] or run.step_times
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = ap.add_argument
    a("--data", help="a UTF-8 text file to train on (default: fastnn's generated corpus)")
    a("--corpus-chars", type=int, default=400_000, help="size of the generated corpus")
    a("--steps", type=int, default=120, help="optimizer steps of the whole run")
    a("--batch-size", type=int, default=16, help="sequences per rank and step")
    a("--seq-len", type=int, default=128)
    a("--dim", type=int, default=96)
    a("--layers", type=int, default=3)
    a("--heads", type=int, default=4)
    a("--mlp-hidden", type=int, default=None, help="default: 8/3 * dim rounded up to 32")
    a("--lr", type=float, default=3e-3)
    a("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of --steps)")
    a("--weight-decay", type=float, default=0.1)
    a("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    a("--seed", type=int, default=0)
    a("--amp", action="store_true", help="bf16 autocast (GPUs; also works on CPUs)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--compare", action="store_true", help="also train the plain PyTorch twin; print speedup")
    a("--fsdp", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    a("--compile", action="store_true", help="torch.compile the model and the optimizer step")
    a("--log-every", type=int, default=None, help="steps per report (default: steps / 15)")
    a("--eval-batches", type=int, default=8, help="validation batches per rank at the end")
    a("--ckpt", help="checkpoint file to write (at --save-every and at the end)")
    a("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    a("--resume", action="store_true", help="continue from --ckpt when the file exists")
    a("--stop-after", type=int, default=None, help="end this invocation after N steps")
    a("--metrics", help="append per-step losses and times to this JSON-lines file (rank 0)")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.steps // 10, 1)
    if args.log_every is None:
        args.log_every = max(args.steps // 15, 1)
    if args.mlp_hidden is None:
        args.mlp_hidden = -(-8 * args.dim // 3 // 32) * 32
    if args.resume and not args.ckpt:
        ap.error("--resume needs --ckpt")
    # Rank 0 writes the checkpoint: on several nodes, its directory may exist on node 0 only.
    first_rank = os.environ.get("RANK", "0") == "0"
    if args.ckpt and first_rank and not os.path.isdir(os.path.dirname(os.path.abspath(args.ckpt))):
        ap.error(f"--ckpt {args.ckpt}: its directory does not exist (checked before training)")
    if args.stop_after is not None and args.stop_after < 1:
        ap.error("--stop-after must be at least 1")
    for flag in ("log_every", "eval_batches"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        ap.error("--dim must be a multiple of --heads with an even head size")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    return args


def setup_distributed(args):
    """Joins torchrun's process group (or makes a one-process group); returns (device, rank,
    world)."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:  # launched by torchrun: it sets RANK, WORLD_SIZE, MASTER_ADDR...
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device, dist.get_rank(), dist.get_world_size()


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = setup_distributed(args)
    try:
        result = train(args, device, rank, world)
        # Tear down together: a rank whose peer has already closed its gloo pairs can abort at
        # exit ("terminate called without an active exception", seen once in a CI run). The
        # barrier lines the ranks up; gc.collect() frees the DDP reducers, which hold the group,
        # before the group is destroyed rather than during interpreter shutdown.
        dist.barrier()
        gc.collect()
        return result
    finally:
        dist.destroy_process_group()


def train(args, device, rank, world):
    if args.data:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    else:
        text = corpus.generate(args.corpus_chars, seed=0)
    data = CharData(text)
    data.check_windows(args.seq_len)
    cfg = Config(
        vocab_size=len(data.vocab),
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        mlp_hidden=args.mlp_hidden,
        max_seq_len=args.seq_len,
    )
    runs = [Run("fastnn", True, cfg, args, device, world)]
    if args.compare:
        runs.append(Run("torch", False, cfg, args, device, world))

    start = 0
    if args.resume and os.path.exists(args.ckpt):
        start = load_checkpoint(args.ckpt, runs, cfg, data)
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)

    metrics = open(args.metrics, "a") if (args.metrics and rank == 0) else None  # noqa: SIM115
    if rank == 0:
        n_params = sum(p.numel() for p in runs[0].model.parameters())
        families = ("rms_norm", "glu", "adam")
        backends = ", ".join(f"{f}={fastnn._backend.resolve(f, device.type)}" for f in families)
        print(
            f"{'FSDP2' if args.fsdp else 'DDP'} on {world} x {device.type}"
            f" ({dist.get_backend()}): {n_params / 1e6:.2f}M params, {len(data.vocab)} chars"
            f" vocabulary, {len(data.train)} training characters, {args.batch_size} x"
            f" {args.seq_len} tokens per rank and step; fastnn backends: {backends}"
        )
        if start:
            print(f"resumed from {args.ckpt} at step {start}")

    tty = rank == 0 and sys.stdout.isatty()
    for step in range(start, end):
        x, y = data.batch("train", args.seed, step, rank, args.batch_size, args.seq_len, device)
        lr = lr_at(step, args)
        for run in runs:  # interleaved, so machine noise hits every run alike
            run.step_times.append(train_step(run, x, y, lr, args, device))
        if (step + 1) % args.log_every == 0 or step + 1 == end:
            report_interval(runs, step, args, world, metrics)
        elif tty:
            print(f"\r{progress_bar(step + 1, args.steps)}", end="", flush=True)
        if args.ckpt and args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.ckpt, runs, step + 1, cfg, data, rank)
    if args.ckpt and end > start and not (args.save_every and end % args.save_every == 0):
        save_checkpoint(args.ckpt, runs, end, cfg, data, rank)

    results = {}
    for run in runs:
        val = evaluate(run, data, args, device, rank, world)
        # The last report interval's mean: one step's loss is too noisy to compare runs by.
        tail = [loss for _, loss in run.losses[-args.log_every :]]
        results[run.name] = {"train_loss": statistics.fmean(tail) if tail else float("nan")}
        results[run.name]["val_loss"] = val
        if run.step_times:
            step_s = median_step_time(run)
            results[run.name]["median_step_s"] = step_s
            results[run.name]["tokens_per_s"] = args.batch_size * args.seq_len * world / step_s
        if metrics is not None:
            metrics.write(json.dumps({"run": run.name, "step": end, **results[run.name]}) + "\n")
    if metrics is not None:
        metrics.close()
    if rank == 0:
        if end < args.steps:
            print(f"stopped after step {end} of {args.steps}; continue with --resume")
        if end == start:
            print(f"no training steps to run: the checkpoint is at step {start} of {args.steps}")
        for name, r in results.items():
            train = "" if end == start else f"train loss {r['train_loss']:.4f}, "
            print(f"{name}: {train}validation loss {r['val_loss']:.4f}")
        if args.compare and "median_step_s" in results["fastnn"]:
            fa, to = results["fastnn"], results["torch"]
            print(
                f"fastnn vs PyTorch ({world} x {device.type}, {'bf16 autocast' if args.amp else 'fp32'}"
                f", {'FSDP2' if args.fsdp else 'DDP'}): final loss {fa['train_loss']:.4f} vs"
                f" {to['train_loss']:.4f} (validation {fa['val_loss']:.4f} vs"
                f" {to['val_loss']:.4f}); {fmt_rate(fa['tokens_per_s'])} vs"
                f" {fmt_rate(to['tokens_per_s'])} tokens/s: speedup"
                f" {to['median_step_s'] / fa['median_step_s']:.2f}x"
            )
    return results


if __name__ == "__main__":
    main()
