"""Fits the polynomial of fastnn's fp32 normal cdf (glu_math::normal_cdf in
csrc/include/fastnn/activations.h, also fastnn/triton_kernels/glu.py) and measures the formula.

erfc(a) = t exp(-a^2 + P(u)) for a >= 0, t = 1 / (1 + a / 2), u = (t - 0.575) / 0.425: P is a
least-squares polynomial fit of ln(erfc(a) / t) + a^2 on Chebyshev nodes of t in [0.15, 1]
(a up to 11.3; Phi(-x) = erfc(x / sqrt2) / 2 is 0 in fp32 past x = 13.6). Then Phi(x), evaluated
in fp32 as the C++ does it (|x| clamped to 14.5, -x^2 / 2 split into an exact hi and a small lo),
with a correctly rounded exp standing in for exp_, is compared with mpmath in ulps. Needs only
numpy and mpmath (a dependency of torch's sympy).

    python tools/fit_erfc.py [degree]
"""

import sys

import mpmath
import numpy as np

T_LO = 0.15
CENTER, HALF = (1 + T_LO) / 2, (1 - T_LO) / 2
mpmath.mp.dps = 40


def target(t):
    a = 2 * (1 / mpmath.mpf(t) - 1)
    return float(mpmath.log(mpmath.erfc(a) / t) + a * a)


def fit(degree, nodes=400):
    k = np.arange(nodes)
    t = CENTER + HALF * np.cos((2 * k + 1) * np.pi / (2 * nodes))
    u = (t - CENTER) / HALF
    return np.polynomial.polynomial.polyfit(u, [target(x) for x in t], degree)


def normal_cdf_fp32(x, coeffs):
    """activations.h's normal_cdf in fp32 (numpy), a correctly rounded exp for exp_."""
    f32 = np.float32
    xa = np.minimum(np.abs(x), f32(14.5))
    t = f32(1) / (f32(1) + f32(0.5) * (xa * f32(np.sqrt(0.5))))
    u = (t - f32(CENTER)) * f32(1 / HALF)
    p = np.full_like(xa, f32(coeffs[-1]))
    for c in coeffs[-2::-1]:
        p = p * u + f32(c)
    x_hi = (xa.view(np.uint32) & np.uint32(0xFFFFF000)).view(f32)  # x_hi^2 is exact
    hi = f32(-0.5) * (x_hi * x_hi)
    lo = f32(0.5) * ((x_hi - xa) * (x_hi + xa))
    exp = lambda y: np.exp(y.astype(np.float64)).astype(f32)  # noqa: E731
    erfc_a = t * exp(hi) * exp(lo + p)
    return np.where(x > 0, f32(1) - f32(0.5) * erfc_a, f32(0.5) * erfc_a)


def main():
    degree = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    coeffs = fit(degree)
    dense = np.linspace(T_LO, 1, 4001)
    fit_err = np.max(np.abs(np.polynomial.polynomial.polyval((dense - CENTER) / HALF, coeffs)
                            - [target(x) for x in dense]))  # fmt: skip
    print(f"degree {degree}: max |P - target| = {fit_err:.2e} (fp64)")
    print("coefficients, u^0 first:", ", ".join(f"{c:.9e}" for c in coeffs))
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-13, 6, 40001), rng.uniform(-13, 0, 20000),
                        np.linspace(-0.5, 0.5, 2001)]).astype(np.float32)  # fmt: skip
    ref = np.array([float(mpmath.ncdf(mpmath.mpf(float(v)))) for v in x])
    keep = ref > np.finfo(np.float32).tiny
    ulps = np.abs(normal_cdf_fp32(x, coeffs) - ref) / np.spacing(ref.astype(np.float32))
    worst = np.argmax(np.where(keep, ulps, 0))
    print(f"fp32 Phi(x): max {ulps[keep].max():.1f} ulp (at x = {x[worst]:.4f}), "
          f"mean {ulps[keep].mean():.2f}, over {keep.sum()} points in [-13, 6]")  # fmt: skip


if __name__ == "__main__":
    main()
