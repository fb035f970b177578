// The per-element optimizer math of fastnn/adam_math.h and fastnn/rmsprop_math.h, scalar (as the
// CUDA kernels run it) in float and double, over pseudo-random inputs and every option
// combination; prints one checksum of all results' bits per (op, math type, options).
//
// tests/test_optim_math_contraction.py builds it twice: as the host kernels are built (no fused
// multiply-add but the header's explicit fma_), and with -ffp-contract=fast, which fuses the
// a * b + c GCC finds within a basic block into one fma as nvcc does by default, with mul_'s
// device branch taken (FASTNN_EMULATE_NVCC). Equal checksums: no multiply-add the compiler can
// see rounds differently on the GPU than on the CPU.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(FASTNN_EMULATE_NVCC)
// mul_ calls these under __CUDA_ARCH__: multiplies nvcc never fuses with an add. Calls the
// compiler may not inline keep GCC from fusing them too.
__attribute__((noinline)) float __fmul_rn(float a, float b) { return a * b; }
__attribute__((noinline)) double __dmul_rn(double a, double b) { return a * b; }
#define __CUDA_ARCH__ 900
#endif

#include "fastnn/adam_math.h"
#include "fastnn/rmsprop_math.h"

namespace om = fastnn::optim_math;

namespace {

// xorshift64*: integer-only, so both builds see the same inputs.
uint64_t state = 0x9e3779b97f4a7c15ull;
uint64_t next_bits() {
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545f4914f6cdd1dull;
}

// A random value of either sign with magnitude in [2^lo, 2^(lo + span)).
template <typename M>
M random_value(int lo, int span, bool positive = false) {
  const uint64_t r = next_bits();
  const double mantissa = 1.0 + double(r >> 12) / double(uint64_t{1} << 52);
  const double v = std::ldexp(mantissa, lo + int(r % unsigned(span)));
  return M(positive || (r & 2048) ? v : -v);
}

// Folds the bits of x into h (FNV-1a's multiply, then a shift so high bits reach the low ones).
template <typename M>
uint64_t mix(uint64_t h, M x) {
  uint64_t bits = 0;
  std::memcpy(&bits, &x, sizeof x);
  h = (h ^ bits) * 1099511628211ull;
  return h ^ (h >> 29);
}

template <typename M>
void adam(const double* hp) {
  for (int flags = 0; flags < 16; ++flags) {
    const bool l2 = flags & 1, decoupled = flags & 2, amsgrad = flags & 4, maximize = flags & 8;
    const om::AdamHyper h{hp[0], hp[1], hp[2], hp[3], decoupled, maximize};
    double bc1, bc2_sqrt;
    om::adam_bias_corrections(hp[0], hp[1], hp[4], &bc1, &bc2_sqrt);
    const auto c = om::adam_coeffs<M>(h, hp[5], bc1, bc2_sqrt, hp[6]);
    uint64_t sum = 1469598103934665603ull;
    for (int i = 0; i < 100000; ++i) {
      M p = random_value<M>(-8, 8), g = random_value<M>(-12, 12), m = random_value<M>(-14, 10);
      M v = random_value<M>(-24, 16, true), v_max = random_value<M>(-24, 16, true);
      om::adam_update(p, g, m, v, v_max, c, l2 && !decoupled, decoupled, amsgrad);
      sum = mix(mix(mix(mix(mix(sum, p), g), m), v), v_max);
    }
    std::printf("adam %s %2d %016llx\n", sizeof(M) == 4 ? "float" : "double", flags,
                static_cast<unsigned long long>(sum));
  }
}

template <typename M>
void rmsprop(const double* hp) {
  for (int flags = 0; flags < 16; ++flags) {
    const bool l2 = flags & 1, centered = flags & 2, momentum = flags & 4, maximize = flags & 8;
    const om::RmspropHyper h{hp[7], hp[2], l2 ? hp[3] : 0.0, momentum ? hp[8] : 0.0, maximize};
    const auto c = om::rmsprop_coeffs<M>(h, hp[5], hp[6]);
    uint64_t sum = 1469598103934665603ull;
    for (int i = 0; i < 100000; ++i) {
      M p = random_value<M>(-8, 8), g = random_value<M>(-12, 12);
      M sq = random_value<M>(-20, 12, true), grad_avg = random_value<M>(-16, 6);
      M buf = random_value<M>(-14, 10);
      om::rmsprop_update(p, g, sq, grad_avg, buf, c, l2, centered, momentum);
      sum = mix(mix(mix(mix(mix(sum, p), g), sq), grad_avg), buf);
    }
    std::printf("rmsprop %s %2d %016llx\n", sizeof(M) == 4 ? "float" : "double", flags,
                static_cast<unsigned long long>(sum));
  }
}

}  // namespace

// argv: beta1 beta2 eps weight_decay step lr grad_scale alpha momentum (read at run time, so
// the coefficients are computed as the kernels compute them, not folded at compile time).
int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s beta1 beta2 eps wd step lr grad_scale alpha momentum\n",
                 argv[0]);
    return 2;
  }
  double hp[9];
  for (int i = 0; i < 9; ++i) hp[i] = std::strtod(argv[i + 1], nullptr);
  adam<float>(hp);
  adam<double>(hp);
  rmsprop<float>(hp);
  rmsprop<double>(hp);
  return 0;
}
