// CUDA kernels of the GLU family (glu_fwd, glu_bwd, glu_packed_fwd, glu_packed_bwd and the
// in-place glu_bwd_, glu_packed_bwd_; schemas in csrc/library.cpp, semantics in
// fastnn/reference/glu.py): out = act(gate) * up, elementwise.
//
// Four tiers, as aten's layer_norm_kernel.cu:
//   1. device kernels: one thread per pack of VEC elements, 16-byte loads and stores
//      (VEC = 4 fp32, 8 fp16 / bf16, 2 fp64), fp32 math (fp64 for fp64) from
//      csrc/include/fastnn/activations.h, the activation a template parameter;
//   2. launchers: VEC = 16 / sizeof(scalar_t) when every pointer is 16-byte aligned (and, packed,
//      H % VEC == 0 so no pack straddles a row), else the scalar kernel (VEC = 1);
//   3. dtype dispatch (fp32, fp16, bf16, fp64) and activation dispatch;
//   4. op entry points: checks, contiguous inputs, allocation, device guard, current stream,
//      C10_CUDA_KERNEL_LAUNCH_CHECK() after the launch; zero-size inputs launch nothing.
// Offsets are int64 throughout (tensors over 2^31 elements). Packed [rows, 2H] inputs are read in
// place: row r's gate at r * 2H, its up at r * 2H + H; the packed backward writes one [rows, 2H].
// Bytes moved are the minimum: forward reads g, u and writes h; backward reads dh, g, u and
// writes dg, du (act(g) is recomputed, never saved).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "fastnn/activations.h"
#include "fastnn/checks.h"
#include "fastnn/glu_host.h"

namespace fastnn {
namespace {

namespace gh = fastnn::glu_host;
using gh::check_packed;
using gh::check_pair;
using gh::packed_out_shape;
using gh::prepare_grad;

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Input offset of output element `o` (the first of a pack: a pack never straddles a row).
template <bool PACKED>
__device__ __forceinline__ int64_t input_offset(int64_t o, int64_t H, int64_t in_stride) {
  if constexpr (PACKED) {
    const int64_t row = o / H;
    return row * in_stride + (o - row * H);
  } else {
    return o;
  }
}

// ---- tier 1: device kernels ---------------------------------------------------------------------

// n = number of outputs (rows * H). Thread t handles outputs [t * VEC, t * VEC + VEC); the last
// thread of a ragged unpacked tensor finishes its < VEC elements one by one.
template <Activation A, typename scalar_t, int VEC, bool PACKED>
__global__ void glu_fwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ u,
                               scalar_t* __restrict__ h, int64_t n, int64_t H, int64_t in_stride) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (o >= n) return;
  const int64_t i = input_offset<PACKED>(o, H, in_stride);
  if (o + VEC <= n) {
    const P gp = *reinterpret_cast<const P*>(g + i);
    const P up = *reinterpret_cast<const P*>(u + i);
    P hp;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      hp.v[k] = static_cast<scalar_t>(
          glu_fwd_elem<A>(static_cast<opmath_t>(gp.v[k]), static_cast<opmath_t>(up.v[k])));
    }
    *reinterpret_cast<P*>(h + o) = hp;
  } else {  // ragged tail (unpacked only: packed launches guarantee H % VEC == 0)
    for (int64_t k = 0; o + k < n; ++k) {
      h[o + k] = static_cast<scalar_t>(
          glu_fwd_elem<A>(static_cast<opmath_t>(g[i + k]), static_cast<opmath_t>(u[i + k])));
    }
  }
}

// dh is laid out as the output; dg, du as g, u (for packed: one [rows, 2H] gradient). Each
// element's g, u are read before its dg, du are written, so dg, du may be g, u themselves (the
// in-place kernel below, whose pointers carry no __restrict__).
template <Activation A, typename scalar_t, int VEC, bool PACKED>
__device__ __forceinline__ void glu_bwd_body(const scalar_t* dh, const scalar_t* g,
                                             const scalar_t* u, scalar_t* dg, scalar_t* du,
                                             int64_t n, int64_t H, int64_t in_stride) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (o >= n) return;
  const int64_t i = input_offset<PACKED>(o, H, in_stride);
  if (o + VEC <= n) {
    const P dhp = *reinterpret_cast<const P*>(dh + o);
    const P gp = *reinterpret_cast<const P*>(g + i);
    const P up = *reinterpret_cast<const P*>(u + i);
    P dgp, dup;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      opmath_t a, b;
      glu_bwd_elem<A>(static_cast<opmath_t>(dhp.v[k]), static_cast<opmath_t>(gp.v[k]),
                      static_cast<opmath_t>(up.v[k]), a, b);
      dgp.v[k] = static_cast<scalar_t>(a);
      dup.v[k] = static_cast<scalar_t>(b);
    }
    *reinterpret_cast<P*>(dg + i) = dgp;
    *reinterpret_cast<P*>(du + i) = dup;
  } else {
    for (int64_t k = 0; o + k < n; ++k) {
      opmath_t a, b;
      glu_bwd_elem<A>(static_cast<opmath_t>(dh[o + k]), static_cast<opmath_t>(g[i + k]),
                      static_cast<opmath_t>(u[i + k]), a, b);
      dg[i + k] = static_cast<scalar_t>(a);
      du[i + k] = static_cast<scalar_t>(b);
    }
  }
}

template <Activation A, typename scalar_t, int VEC, bool PACKED>
__global__ void glu_bwd_kernel(const scalar_t* __restrict__ dh, const scalar_t* __restrict__ g,
                               const scalar_t* __restrict__ u, scalar_t* __restrict__ dg,
                               scalar_t* __restrict__ du, int64_t n, int64_t H, int64_t in_stride) {
  glu_bwd_body<A, scalar_t, VEC, PACKED>(dh, g, u, dg, du, n, H, in_stride);
}

template <Activation A, typename scalar_t, int VEC, bool PACKED>
__global__ void glu_bwd_inplace_kernel(const scalar_t* __restrict__ dh, scalar_t* g, scalar_t* u,
                                       int64_t n, int64_t H, int64_t in_stride) {
  glu_bwd_body<A, scalar_t, VEC, PACKED>(dh, g, u, g, u, n, H, in_stride);
}

// ---- tier 2: launchers (vector width, grid) -----------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t>
bool can_vectorize(std::initializer_list<const void*> ptrs, int64_t H, bool packed) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (packed && H % kVec != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

dim3 grid_for(int64_t n, int vec) {
  const int64_t threads_needed = (n + vec - 1) / vec;
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT_MAX, "fastnn: glu: tensor of ", n, " elements is too large");
  return dim3(static_cast<unsigned>(blocks));
}

template <Activation A, typename scalar_t, bool PACKED>
void launch_fwd(const scalar_t* g, const scalar_t* u, scalar_t* h, int64_t n, int64_t H,
                int64_t in_stride, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (can_vectorize<scalar_t>({g, u, h}, H, PACKED)) {
    glu_fwd_kernel<A, scalar_t, kVec, PACKED>
        <<<grid_for(n, kVec), kThreads, 0, stream>>>(g, u, h, n, H, in_stride);
  } else {
    glu_fwd_kernel<A, scalar_t, 1, PACKED>
        <<<grid_for(n, 1), kThreads, 0, stream>>>(g, u, h, n, H, in_stride);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dg == g and du == u: the in-place backward.
template <Activation A, typename scalar_t, bool PACKED>
void launch_bwd(const scalar_t* dh, const scalar_t* g, const scalar_t* u, scalar_t* dg,
                scalar_t* du, int64_t n, int64_t H, int64_t in_stride, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = can_vectorize<scalar_t>({dh, g, u, dg, du}, H, PACKED);
  if (dg == g && du == u) {
    if (vec) {
      glu_bwd_inplace_kernel<A, scalar_t, kVec, PACKED>
          <<<grid_for(n, kVec), kThreads, 0, stream>>>(dh, dg, du, n, H, in_stride);
    } else {
      glu_bwd_inplace_kernel<A, scalar_t, 1, PACKED>
          <<<grid_for(n, 1), kThreads, 0, stream>>>(dh, dg, du, n, H, in_stride);
    }
  } else if (vec) {
    glu_bwd_kernel<A, scalar_t, kVec, PACKED>
        <<<grid_for(n, kVec), kThreads, 0, stream>>>(dh, g, u, dg, du, n, H, in_stride);
  } else {
    glu_bwd_kernel<A, scalar_t, 1, PACKED>
        <<<grid_for(n, 1), kThreads, 0, stream>>>(dh, g, u, dg, du, n, H, in_stride);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- tier 3: dtype and activation dispatch ------------------------------------------------------

// gate_base / up_base: tensors whose data_ptr + up_offset is element 0 of gate / up.
template <bool PACKED>
void dispatch_fwd(const at::Tensor& gate_base, const at::Tensor& up_base, int64_t up_offset,
                  at::Tensor& out, int64_t H, int64_t in_stride, Activation act) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "glu_fwd_cuda", [&] {
    const scalar_t* g = gate_base.const_data_ptr<scalar_t>();
    const scalar_t* u = up_base.const_data_ptr<scalar_t>() + up_offset;
    scalar_t* h = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto tag) {
      launch_fwd<decltype(tag)::value, scalar_t, PACKED>(g, u, h, out.numel(), H, in_stride,
                                                         stream);
    });
  });
}

template <bool PACKED>
void dispatch_bwd(const at::Tensor& grad_out, const at::Tensor& gate_base,
                  const at::Tensor& up_base, int64_t up_offset, at::Tensor& dgate_base,
                  at::Tensor& dup_base, int64_t H, int64_t in_stride, Activation act) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gate_base.scalar_type(), "glu_bwd_cuda", [&] {
        const scalar_t* dh = grad_out.const_data_ptr<scalar_t>();
        const scalar_t* g = gate_base.const_data_ptr<scalar_t>();
        const scalar_t* u = up_base.const_data_ptr<scalar_t>() + up_offset;
        scalar_t* dg = dgate_base.mutable_data_ptr<scalar_t>();
        scalar_t* du = dup_base.mutable_data_ptr<scalar_t>() + up_offset;
        dispatch_activation(act, [&](auto tag) {
          launch_bwd<decltype(tag)::value, scalar_t, PACKED>(dh, g, u, dg, du, grad_out.numel(), H,
                                                             in_stride, stream);
        });
      });
}

// ---- tier 4: op entry points --------------------------------------------------------------------

at::Tensor glu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_pair(gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel();
  if (n == 0) return out;
  dispatch_fwd<false>(g, u, 0, out, n, n, act);
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& gate,
                                                const at::Tensor& up, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_pair(gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  const at::Tensor dh = prepare_grad(grad_out, g, g.sizes());
  at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(u.sizes(), u.options());
  const int64_t n = g.numel();
  if (n == 0) return {dg, du};
  dispatch_bwd<false>(dh, g, u, 0, dg, du, n, n, act);
  return {dg, du};
}

at::Tensor glu_packed_fwd_cuda(const at::Tensor& gate_up, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_packed(gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor gu = gate_up.contiguous();
  at::Tensor out = at::empty(packed_out_shape(gu), gu.options());
  if (out.numel() == 0) return out;
  const int64_t H = gu.size(-1) / 2;
  dispatch_fwd<true>(gu, gu, H, out, H, 2 * H, act);
  return out;
}

at::Tensor glu_packed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& gate_up,
                               c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_packed(gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor gu = gate_up.contiguous();
  const at::Tensor dh = prepare_grad(grad_out, gu, packed_out_shape(gu));
  at::Tensor dgu = at::empty(gu.sizes(), gu.options());
  if (dh.numel() == 0) return dgu;
  const int64_t H = gu.size(-1) / 2;
  dispatch_bwd<true>(dh, gu, gu, H, dgu, dgu, H, 2 * H, act);
  return dgu;
}

// The in-place backward (fastnn/glu_host.h): the aliasing kernel writes each element's
// gradients over its own gate / up values after reading them.
void glu_bwd_inplace_cuda(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up,
                          c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(gate.device());
  gh::bwd_inplace(
      grad_out, gate, up,
      [&](const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
        return glu_bwd_cuda(dh, g, u, activation);
      },
      [&](const at::Tensor& dh, at::Tensor g, at::Tensor u) {
        dispatch_bwd<false>(dh, g, u, 0, g, u, g.numel(), g.numel(), act);
      });
}

void glu_packed_bwd_inplace_cuda(const at::Tensor& grad_out, const at::Tensor& gate_up,
                                 c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  gh::packed_bwd_inplace(
      grad_out, gate_up,
      [&](const at::Tensor& dh, const at::Tensor& gu) {
        return glu_packed_bwd_cuda(dh, gu, activation);
      },
      [&](const at::Tensor& dh, at::Tensor gu) {
        const int64_t H = gu.size(-1) / 2;
        dispatch_bwd<true>(dh, gu, gu, H, gu, gu, H, 2 * H, act);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("glu_fwd", &glu_fwd_cuda);
  m.impl("glu_bwd", &glu_bwd_cuda);
  m.impl("glu_packed_fwd", &glu_packed_fwd_cuda);
  m.impl("glu_packed_bwd", &glu_packed_bwd_cuda);
  m.impl("glu_bwd_", &glu_bwd_inplace_cuda);
  m.impl("glu_packed_bwd_", &glu_packed_bwd_inplace_cuda);
}

}  // namespace fastnn
