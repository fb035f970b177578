// RMSNorm on the CPU, optionally fused with the residual add (schemas in csrc/library.cpp,
// semantics of fastnn/reference/rms_norm.py):
//   forward   s = input + residual (rounded to input's dtype), rstd = 1 / sqrt(mean(s^2) + eps),
//             out = s * rstd * weight
//   backward  xhat = x * rstd, g = dy * w, dx = rstd * (g - xhat * mean(g * xhat)) +
//   d(residual_out)
//             dw = sum over rows of dy * xhat
// Rows run in parallel (at::parallel_for); each row is read from memory once and kept in L1/L2
// between its reduction and its normalise loop. fp32 accumulation (fp64 for fp64 tensors).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "fastnn/checks.h"
#include "fastnn/cpu_alloc.h"
#include "fastnn/norm_cpu.h"

namespace fastnn::cpu {
namespace {

// ---- Forward ----------------------------------------------------------------------------------

template <typename T, typename A>
struct FwdArgs {
  const T* x;
  const T* res;  // nullptr without a residual
  const A* w;    // [n], ones without a weight
  T* y;
  T* res_out;
  A* rstd;
  int64_t n;
  A eps;
};

// One row of x -> y, returns rstd: two passes over the row, bf16 widened in registers (a widened
// copy in a scratch row cost two more passes: bf16 [1024, 4096] ran at 0.62x torch.compile's
// forward on the Xeon VM).
template <typename X, typename A>
FASTNN_ALWAYS_INLINE A normalize_row(const X* x, X* y, const A* __restrict__ w, A eps, int64_t n) {
  const A ss = row_sum<Term::kXX>(x, x, A(0), n);
  const A rstd = A(1) / std::sqrt(ss / static_cast<A>(n) + eps);
  for (int64_t i = 0; i < n; ++i) store_acc((to_acc<A>(x[i]) * rstd) * w[i], y[i]);
  return rstd;
}

struct FwdRows {
  template <typename T, typename A>
  static FASTNN_ALWAYS_INLINE void run(const FwdArgs<T, A>& a, int64_t begin, int64_t end) {
    const int64_t n = a.n;
    const RowViews<T> rows(2, n);  // scratch (fp16): input and output 0 (in place), residual 1
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * n;
      const row_t<T>* x = a.res == nullptr
                              ? rows.in(a.x + off, 0)
                              : rows.sum_in(a.x + off, a.res + off, a.res_out + off, 0);
      a.rstd[r] = normalize_row(x, rows.out(a.y + off, 0), a.w, a.eps, n);
      rows.done(a.y + off, 0);
    }
  }
};

// ---- Backward ---------------------------------------------------------------------------------

template <typename T, typename A>
struct BwdArgs {
  const T* dy;
  const T* gres;  // gradient into residual_out, nullptr when absent
  const T* x;
  const A* w;  // [n], ones without a weight
  const A* rstd;
  T* dx;
  A* partial;  // [blocks.count, n] dw partials, nullptr without a weight
  int64_t n;
  int64_t rows;
  RowBlocks blocks;
};

// dx of one element, the residual's gradient aside: rstd (dy w - xhat c), c = mean(g * xhat).
template <typename A>
FASTNN_ALWAYS_INLINE A input_grad(A x, A dy, A w, A rstd, A c) {
  return rstd * (dy * w - (x * rstd) * c);
}

// Per row, two passes over the (L1/L2-resident) row: pass 1 accumulates sum(g * xhat) in a fixed
// lane order and adds dy * xhat into the block's dW partial; pass 2 writes dx. xhat and g are
// recomputed in pass 2 rather than stored (an earlier version kept them in scratch rows: 14 loads
// and 5 stores per element against 8 and 3 now).
struct BwdBlocks {
  template <typename T, typename A>
  static FASTNN_ALWAYS_INLINE void run(const BwdArgs<T, A>& a, int64_t blk_begin, int64_t blk_end) {
    using V = vec_t<A>;
    constexpr int64_t W = kVecWidth<A>, kStep = 2 * W;
    const int64_t n = a.n;
    const RowViews<T> rows(3, n);  // scratch (fp16): x and dx 0 (in place), dy 1, residual grad 2
    const A* __restrict__ w = a.w;
    const A inv_n = A(1) / static_cast<A>(n);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      A* __restrict__ pw = a.partial != nullptr ? a.partial + blk * n : nullptr;
      if (pw != nullptr) std::fill(pw, pw + n, A(0));
      const int64_t row_end = std::min(a.rows, (blk + 1) * a.blocks.per_block);
      for (int64_t r = blk * a.blocks.per_block; r < row_end; ++r) {
        const int64_t off = r * n;
        const row_t<T>* x = rows.in(a.x + off, 0);  // dx may overwrite it (same index only)
        const row_t<T>* __restrict__ dy = rows.in(a.dy + off, 1);
        const A rstd = a.rstd[r];
        const V rs = V{} + rstd;
        A gh = 0;  // sum(g * xhat)
        for (int64_t base = 0; base < n; base += kChunk) {
          const int64_t end = std::min(base + kChunk, n);
          V s0{}, s1{};
          int64_t i = base;
          for (; i + kStep <= end; i += kStep) {
            const V d0 = vload_as<A>(dy + i), d1 = vload_as<A>(dy + i + W);
            const V h0 = vload_as<A>(x + i) * rs, h1 = vload_as<A>(x + i + W) * rs;
            s0 += d0 * vload(w + i) * h0;
            s1 += d1 * vload(w + i + W) * h1;
            if (pw != nullptr) {
              vstore(pw + i, vload(pw + i) + d0 * h0);
              vstore(pw + i + W, vload(pw + i + W) + d1 * h1);
            }
          }
          A lanes[kStep] = {};
          std::memcpy(lanes, &s0, sizeof s0);
          std::memcpy(lanes + W, &s1, sizeof s1);
          for (int64_t l = 0; i < end; ++i, ++l) {
            const A h = to_acc<A>(x[i]) * rstd;
            lanes[l] += to_acc<A>(dy[i]) * w[i] * h;
            if (pw != nullptr) pw[i] += to_acc<A>(dy[i]) * h;
          }
          gh += fold_lanes<kStep>(lanes);
        }
        const A c = gh * inv_n;  // mean(g * xhat)
        row_t<T>* dx = rows.out(a.dx + off, 0);
        if (a.gres != nullptr) {
          const row_t<T>* __restrict__ gr = rows.in(a.gres + off, 2);
          for (int64_t i = 0; i < n; ++i)
            store_acc(
                input_grad(to_acc<A>(x[i]), to_acc<A>(dy[i]), w[i], rstd, c) + to_acc<A>(gr[i]),
                dx[i]);
        } else {
          for (int64_t i = 0; i < n; ++i)
            store_acc(input_grad(to_acc<A>(x[i]), to_acc<A>(dy[i]), w[i], rstd, c), dx[i]);
        }
        rows.done(a.dx + off, 0);
      }
    }
  }
};

// ---- Op entry points --------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& input, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& weight, double eps) {
  check_float(input, "input");
  TORCH_CHECK(input.dim() == 2, "fastnn: rms_norm_fwd expects a 2-D input [rows, N], got shape ",
              input.sizes());
  TORCH_CHECK(input.device().is_cpu(), "fastnn: CPU rms_norm_fwd got input on ", input.device());
  const int64_t rows = input.size(0), n = input.size(1);
  if (has(residual)) check_like(*residual, "residual", input, "input");
  check_vector(weight, "weight", input, n);

  const at::Tensor x = input.contiguous();
  const at::ScalarType acc = acc_type(x.scalar_type());
  at::Tensor out = empty_output({rows, n}, x.options());
  at::Tensor residual_out = has(residual) ? empty_output({rows, n}, x.options()) : x.new_empty({0});
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc));
  if (rows == 0) return {out, residual_out, rstd};
  const at::Tensor res = has(residual) ? residual->contiguous() : at::Tensor();
  const at::Tensor w = param_as_acc(weight, acc, n, 1.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnn_rms_fwd", [&] {
    using A = acc_t<scalar_t>;
    const FwdArgs<scalar_t, A> args{
        x.const_data_ptr<scalar_t>(),
        res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
        w.const_data_ptr<A>(),
        out.mutable_data_ptr<scalar_t>(),
        res.defined() ? residual_out.mutable_data_ptr<scalar_t>() : nullptr,
        rstd.mutable_data_ptr<A>(),
        n,
        static_cast<A>(eps)};
    at::parallel_for(0, rows, row_grain(n),
                     [&](int64_t begin, int64_t end) { run_isa<FwdRows>(args, begin, end); });
  });
  // Strided as the fake says (input's strides when dense), after the contiguous kernel writes.
  if (has(residual)) residual_out = strided_like(residual_out, input);
  return {strided_like(out, input), residual_out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out,
                                                const c10::optional<at::Tensor>& grad_residual_out,
                                                const at::Tensor& x_in,
                                                const c10::optional<at::Tensor>& weight,
                                                const at::Tensor& rstd_in) {
  check_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "fastnn: rms_norm_bwd expects a 2-D x [rows, N], got shape ",
              x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "fastnn: CPU rms_norm_bwd got x on ", x_in.device());
  const int64_t rows = x_in.size(0), n = x_in.size(1);
  check_like(grad_out, "grad_out", x_in, "x");
  if (has(grad_residual_out)) check_like(*grad_residual_out, "grad_residual_out", x_in, "x");
  check_vector(weight, "weight", x_in, n);
  check_stat(rstd_in, "rstd", x_in);

  const at::ScalarType acc = acc_type(x_in.scalar_type());
  const bool with_w = has(weight);
  at::Tensor dx = empty_output({rows, n}, x_in.options());
  if (rows == 0) {
    // The sum over zero rows is zero, as the reference's dy.sum(0).
    return {dx, with_w ? at::zeros({n}, weight->options()) : x_in.new_empty({0})};
  }
  const at::Tensor x = x_in.contiguous(), dy = grad_out.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor gres = has(grad_residual_out) ? grad_residual_out->contiguous() : at::Tensor();
  const at::Tensor w = param_as_acc(weight, acc, n, 1.0);
  const RowBlocks blocks = row_blocks(rows, n);
  at::Tensor partial = with_w ? at::empty({blocks.count, n}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor dw = with_w ? at::empty({n}, x.options().dtype(acc)) : x.new_empty({0});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnn_rms_bwd", [&] {
    using A = acc_t<scalar_t>;
    const BwdArgs<scalar_t, A> args{dy.const_data_ptr<scalar_t>(),
                                    gres.defined() ? gres.const_data_ptr<scalar_t>() : nullptr,
                                    x.const_data_ptr<scalar_t>(),
                                    w.const_data_ptr<A>(),
                                    rstd.const_data_ptr<A>(),
                                    dx.mutable_data_ptr<scalar_t>(),
                                    with_w ? partial.mutable_data_ptr<A>() : nullptr,
                                    n,
                                    rows,
                                    blocks};
    at::parallel_for(0, blocks.count, 1,
                     [&](int64_t begin, int64_t end) { run_isa<BwdBlocks>(args, begin, end); });
    if (with_w) {
      const A* p = partial.const_data_ptr<A>();
      A* out = dw.mutable_data_ptr<A>();
      at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
        reduce_partials(p, blocks.count, n, out, begin, end);
      });
    }
  });
  if (with_w && weight->scalar_type() != acc) dw = dw.to(weight->scalar_type());
  return {strided_like(dx, x_in), dw};
}

}  // namespace
}  // namespace fastnn::cpu

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("rms_norm_fwd", &fastnn::cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &fastnn::cpu::rms_norm_bwd);
}
