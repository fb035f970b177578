"""`python -m fastnn info [--json] [--devices]`: what this fastnn install is and what it will run.

Prints the fastnn, torch, triton and Python versions; whether the extension fastnn._C is built
and loaded (or why not); the torch, CUDA and CUDA archs it was built against; which native ops
have CPU and CUDA kernels in it; the forced backend; and, per op family, the backend `auto`
picks on cpu and on cuda tensors. The choice comes from fastnn._backend itself, which without
`--devices` looks at the dispatcher and installed packages only, so this queries no device and
initialises no CUDA context (the cuda choice then assumes the built archs cover the GPU).
`--devices` does ask the CUDA driver for the GPUs present, says whether the built archs cover
each one, and makes the cuda choice for the current one.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import sys

from fastnn._arch import arch_covers

DEVICE_TYPES = ("cpu", "cuda")


def _dist_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _native_kernels(op_names):
    """{device type: [ops with a native kernel for it]} from the dispatcher."""
    import torch

    return {
        device: [
            name
            for name in op_names
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnn::{name}", device.upper())
        ]
        for device in DEVICE_TYPES
    }


def _choices():
    """{family: {device type: {"backend": name or None, "why": {backend: reason}}}}: what the
    current backend setting runs on each device type, and why preferred backends are skipped."""
    from fastnn import _backend

    out = {}
    for family in sorted(_backend._FAMILIES):
        out[family] = {}
        for device in DEVICE_TYPES:
            forced = _backend.get_backend()
            order = _backend.auto_order(family, device) if forced == "auto" else (forced,)
            why = {}
            for backend in order:
                reason = _backend.unavailable_reason(backend, family, device)
                if reason is None:
                    break
                why[backend] = reason
            try:
                chosen = _backend.resolve(family, device)
            except _backend.BackendUnavailableError:
                chosen = None
            out[family][device] = {"backend": chosen, "why": why}
    return out


def _devices(archs):
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(index)
        found.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "capability": f"{cap[0]}.{cap[1]}",
                "covered": bool(archs) and arch_covers(archs, cap),
            }
        )
    return found


def collect(query_devices=False):
    """Every fact `info` prints, as a JSON-serialisable dict."""
    import torch

    import fastnn
    from fastnn import _backend, _extension, ops

    info = _extension.build_info()
    loaded = _extension.load()
    op_names = sorted(ops._SCHEMAS)
    c_module = sys.modules.get("fastnn._C")
    facts = {
        "fastnn": fastnn.__version__,
        "distribution": _dist_version("fastnn"),
        "location": os.path.dirname(fastnn.__file__),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "extension": {
            "loaded": loaded,
            "error": _extension.error(),
            "path": getattr(c_module, "__file__", None),
            "variant": getattr(info, "VARIANT", None),
            "torch": getattr(info, "TORCH_VERSION", None),
            "cuda": getattr(info, "CUDA_VERSION", None),
            "cuda_toolkit": getattr(info, "CUDA_TOOLKIT", None),
            "cuda_archs": getattr(info, "CUDA_ARCHS", None),
            "cxx11_abi": getattr(info, "CXX11_ABI", None),
        },
        "ops": op_names,
        "native_kernels": _native_kernels(op_names) if loaded else {d: [] for d in DEVICE_TYPES},
        "backend": _backend.get_backend(),
        "backend_env": os.environ.get("FASTNN_BACKEND"),
        "families": None,
        "devices": None,
    }
    if query_devices:  # first: it initialises CUDA, so the choices below check the GPU's arch
        facts["devices"] = _devices(facts["extension"]["cuda_archs"] or "")
    facts["families"] = _choices()
    return facts


def _format(f):
    ext = f["extension"]
    lines = [
        f"fastnn {f['fastnn']} (installed as {f['distribution']}) at {f['location']}",
        f"python {f['python']}, torch {f['torch']} (CUDA {f['torch_cuda'] or 'none: CPU build'}),"
        f" triton {f['triton'] or 'not installed'}"
        + (" (TRITON_INTERPRET=1)" if f["triton_interpret"] else ""),
    ]
    if ext["loaded"]:
        lines.append(f"extension fastnn._C: loaded from {ext['path']}")
    else:
        lines.append(f"extension fastnn._C: not loaded: {ext['error']}")
    if ext["variant"] in ("cuda", "cpu"):
        cuda = (
            f"CUDA {ext['cuda']} (nvcc {ext['cuda_toolkit']}), archs {ext['cuda_archs']}"
            if ext["variant"] == "cuda"
            else "no CUDA kernels (FASTNN_BUILD_CUDA=0 or no toolkit)"
        )
        lines.append(f"  built against torch {ext['torch']}, {cuda}")
    n = len(f["ops"])
    for device in DEVICE_TYPES:
        have = f["native_kernels"][device]
        missing = [op for op in f["ops"] if op not in have]
        tail = f" (none for: {', '.join(missing)})" if missing and have else ""
        lines.append(f"  native {device} kernels: {len(have)} of {n} ops{tail}")
    env = f["backend_env"]
    lines.append(
        f"backend: {f['backend']}"
        + (f" (FASTNN_BACKEND={env})" if env else " (FASTNN_BACKEND unset)")
    )
    lines.append(f"{'op family':<12}" + "".join(f"{d:<10}" for d in DEVICE_TYPES))
    notes = []
    for family, per_device in f["families"].items():
        row = f"{family:<12}"
        for device in DEVICE_TYPES:
            choice = per_device[device]
            row += f"{choice['backend'] or 'ERROR':<10}"
            for backend, why in choice["why"].items():
                notes.append(f"  {family} on {device}: not {backend}: {why}")
        lines.append(row)
    lines += notes
    if f["devices"] is None:
        lines.append("CUDA devices: not queried (add --devices to ask the driver)")
    elif not f["devices"]:
        lines.append("CUDA devices: none")
    else:
        for d in f["devices"]:
            cover = "covered by" if d["covered"] else "NOT covered by"
            lines.append(
                f"cuda:{d['index']} {d['name']} (compute {d['capability']}): {cover} the built"
                f" archs {ext['cuda_archs'] or '(none)'}"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastnn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, build, and the backend each op uses")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.add_argument(
        "--devices", action="store_true", help="ask the CUDA driver which GPUs are present"
    )
    args = parser.parse_args(argv)
    facts = collect(query_devices=args.devices)
    print(json.dumps(facts, indent=2) if args.json else _format(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
