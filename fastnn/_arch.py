"""CUDA arch lists (TORCH_CUDA_ARCH_LIST syntax, as recorded in fastnn/_build_info.py) and the
GPUs their kernels run on; used by the backend choice and `python -m fastnn info --devices`."""

import re


def parse_arch(entry):
    """'8.6' -> (8, 6, '', False); '9.0a' -> (9, 0, 'a', False); '9.0+PTX' -> (9, 0, '', True)."""
    m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry.strip())
    if m is None:
        raise ValueError(f"unrecognised CUDA arch {entry!r}")
    return int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) is not None


# TORCH_CUDA_ARCH_LIST's arch names, as torch's cpp_extension expands them (torch 2.14).
NAMED_ARCHS = {
    "Kepler+Tesla": "3.7",
    "Kepler": "3.5+PTX",
    "Maxwell+Tegra": "5.3",
    "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX",
    "Volta+Tegra": "7.2",
    "Volta": "7.0+PTX",
    "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7",
    "Ampere": "8.0;8.6+PTX",
    "Ada": "8.9+PTX",
    "Hopper": "9.0+PTX",
    "Blackwell+Tegra": "11.0",
    "Blackwell": "10.0;10.3;12.0;12.1+PTX",
    "Rubin": "10.7+PTX",
}


def arch_covers(archs, capability):
    """Whether kernels built for `archs` (TORCH_CUDA_ARCH_LIST syntax) run on a GPU of compute
    `capability` (major, minor): machine code for sm_XY runs on X.Y' with Y' >= Y (same major;
    an 'a' arch only on X.Y itself), and PTX for compute_XY is JIT-compiled for any later GPU."""
    major, minor = capability
    entries = archs.replace(" ", ";").split(";")
    entries = [e for name in entries if name for e in NAMED_ARCHS.get(name, name).split(";")]
    for entry in entries:
        a_major, a_minor, suffix, ptx = parse_arch(entry)
        if suffix == "a" and (a_major, a_minor) == (major, minor):
            return True  # arch-specific code and PTX (compute_XYa) run on X.Y only
        if suffix != "a" and a_major == major and a_minor <= minor:
            return True
        if ptx and suffix != "a" and (a_major, a_minor) <= (major, minor):
            return True
    return False
