"""Fits the polynomial of fastnn's vectorisable fp32 erfc (glu_math::erfc_ in
csrc/include/fastnn/activations.h) and prints its coefficients and errors.

erfc(z) = t exp(-z^2 + P(u)) for z >= 0, t = 1 / (1 + z / 2), u = (t - 0.575) / 0.425: P is a
least-squares polynomial fit of ln(erfc(z) / t) + z^2 on Chebyshev nodes of t in [0.15, 1]
(z up to 11.3; fp32 erfc is 0 past 9.2). Then the fp32 formula, as the C++ evaluates it, is
checked against mpmath in ulps. Needs only numpy and mpmath (a dependency of torch's sympy).

    python tools/fit_erfc.py [degree]
"""

import sys

import mpmath
import numpy as np

T_LO = 0.15
CENTER, HALF = (1 + T_LO) / 2, (1 - T_LO) / 2
mpmath.mp.dps = 40


def target(t):
    z = 2 * (1 / mpmath.mpf(t) - 1)
    return float(mpmath.log(mpmath.erfc(z) / t) + z * z)


def fit(degree, nodes=400):
    k = np.arange(nodes)
    t = CENTER + HALF * np.cos((2 * k + 1) * np.pi / (2 * nodes))
    u = (t - CENTER) / HALF
    return np.polynomial.polynomial.polyfit(u, [target(x) for x in t], degree)


def erfc_fp32(z, coeffs):
    """The C++ formula in fp32 (numpy), with a correctly rounded exp standing in for exp_."""
    f32 = np.float32
    a = np.minimum(np.abs(z), f32(10))
    t = f32(1) / (f32(1) + f32(0.5) * a)
    u = (t - f32(CENTER)) * f32(1 / HALF)
    p = np.full_like(a, f32(coeffs[-1]))
    for c in coeffs[-2::-1]:
        p = p * u + f32(c)
    a_hi = (a.view(np.uint32) & np.uint32(0xFFFFF000)).view(f32)  # 12 bits: a_hi^2 is exact
    hi, lo = -(a_hi * a_hi), (a_hi - a) * (a_hi + a)
    exp = lambda y: np.exp(y.astype(np.float64)).astype(f32)  # noqa: E731
    r = t * exp(hi) * exp(lo + p)
    return np.where(z < 0, f32(2) - r, r)


def main():
    degree = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    coeffs = fit(degree)
    dense = np.linspace(T_LO, 1, 4001)
    fit_err = np.max(np.abs(np.polynomial.polynomial.polyval((dense - CENTER) / HALF, coeffs)
                            - [target(x) for x in dense]))  # fmt: skip
    print(f"degree {degree}: max |P - target| = {fit_err:.2e} (fp64)")
    print("coefficients, u^0 first:", ", ".join(f"{c:.9e}" for c in coeffs))
    rng = np.random.default_rng(0)
    z = np.concatenate([np.linspace(-4, 9.2, 20001), rng.uniform(0, 9.2, 20000),
                        np.linspace(0, 0.05, 2001)]).astype(np.float32)  # fmt: skip
    ref = np.array([float(mpmath.erfc(mpmath.mpf(float(x)))) for x in z])
    keep = ref > np.finfo(np.float32).tiny
    ulps = np.abs(erfc_fp32(z, coeffs) - ref) / np.spacing(ref.astype(np.float32))
    worst = np.argmax(np.where(keep, ulps, 0))
    print(f"fp32 formula: max {ulps[keep].max():.1f} ulp (at z = {z[worst]:.4f}), "
          f"mean {ulps[keep].mean():.2f}, over {keep.sum()} points in [-4, 9.2]")  # fmt: skip


if __name__ == "__main__":
    main()
