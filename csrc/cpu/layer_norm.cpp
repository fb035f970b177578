// LayerNorm on the CPU, optionally fused with the residual add (schemas in csrc/library.cpp,
// semantics of fastnn/reference/layer_norm.py):
//   forward   s = input + residual (rounded to input's dtype), mean = c + mean(s - c) for c the
//             mean of the first chunk (first_chunk_mean),
//             rstd = 1 / sqrt(mean((s - mean)^2) + eps), out = (s - mean) * rstd * weight + bias
//   backward  xhat = (x - mean) * rstd, g = dy * w,
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + d(residual_out)
//             dw = sum over rows of dy * xhat, db = sum over rows of dy
// The variance is the mean of squared deviations from the mean, each chunk's while it is in L1
// (no E[x^2] - E[x]^2 cancellation). Rows run in parallel (at::parallel_for); fp32
// accumulation (fp64 for fp64 tensors).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

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
  const A* b;    // [n], zeros without a bias
  T* y;
  T* res_out;
  A* mean;
  A* rstd;
  int64_t n;
  A eps;
};

// The centre the row's deviations are taken from (fastnn/reference/layer_norm.py, row_mean): over
// the first chunk (m elements, in L1 for the pass that follows), c = x[0] + mean(x - x[0]), a
// constant row's value exactly, then c + mean(x - c), which removes c's error of up to an ulp of
// x[0] - mean when x[0] is an outlier (fp32 N(0, 1) rows with x[0] = 1e4, N = 4096, as in
// test_outlier_in_the_first_column: the mean 3.8e-4 off relatively, 3.9e-7 after); x[0] where that
// is not finite (an Inf keeps the mean Inf).
template <typename X, typename A>
FASTNN_ALWAYS_INLINE A first_chunk_mean(const X* x, int64_t m) {
  if (m == 0) return A(0);
  const A first = to_acc<A>(x[0]), inv_m = A(1) / static_cast<A>(m);
  const A c = first + row_sum<Term::kDev>(x, x, first, m) * inv_m;
  const A centre = c + row_sum<Term::kDev>(x, x, c, m) * inv_m;
  return std::isfinite(centre) ? centre : first;
}

// One row of x -> y, returns (mean, rstd): two passes over the row from memory, bf16 widened in
// registers (a widened copy in a scratch row cost two more passes). The first pass takes the row
// in chunks of kChunk elements: each chunk's mean, then its squared deviations from that mean
// while the chunk is in L1, merged in row order (Chan, Golub and LeVeque's pairwise update); a
// row of one chunk gets the two-pass mean and variance exactly. Against two whole passes for the
// statistics (rows past L1 then read three times): [256, 16384] fp32 10.8-14.1 -> 13.1-17.6 GB/s
// on one Xeon core (best of 40 calls, five alternating runs, 2026-11-27); [4096, 4096] and bf16
// unchanged. `next`: the next input row, prefetched during the first pass, or nullptr.
template <typename X, typename A>
FASTNN_ALWAYS_INLINE std::pair<A, A> normalize_row(const X* x, X* y, const A* __restrict__ w,
                                                   const A* __restrict__ bias, A eps, int64_t n,
                                                   const X* next) {
  const A shift = first_chunk_mean<X, A>(x, std::min(kChunk, n));
  // Chunk means are merged as offsets from `shift`: as absolute values each carried an error of
  // up to an ulp of the row's mean into delta (fp32 rows at 1000 +- 100 ulp, N = 16K: rstd 1.4e-4
  // off; as offsets 1.4e-6, the two whole passes before 2.5e-6).
  // The chunk sums add up, and the mean is taken, in fp64: the first chunk's mean can lie far
  // from the row's, and in fp32 each addition rounded to an ulp of the running sum, the mean
  // deviation to an ulp of its own size (N(0, 1) rows with x[0] = 1e4, N = 16411: shift 9.8,
  // mean 0.61, 2.8e-6 off relatively; 2.5e-7 in fp64, torch's fp32 mean 3.5e-7).
  double dev_sum = 0;
  A merged = 0, merged_off = 0, sq_dev = 0;
  for (int64_t base = 0; base < n; base += kChunk) {
    const int64_t m = std::min(kChunk, n - base);
    const A chunk_dev = row_sum<Term::kDev>(x + base, x + base, shift, m);
    const A chunk_off = chunk_dev * (A(1) / static_cast<A>(m));  // chunk mean - shift
    const X* prefetch = next != nullptr ? next + base : nullptr;
    const A chunk_sq = row_sum<Term::kDevSq>(x + base, x + base, shift + chunk_off, m, prefetch);
    dev_sum += chunk_dev;
    if (base == 0) {  // not merged with zeros: an offset past sqrt(max) would square to inf * 0
      merged_off = chunk_off;
      sq_dev = chunk_sq;
    } else {
      const A total = merged + static_cast<A>(m), delta = chunk_off - merged_off;
      merged_off += delta * (static_cast<A>(m) / total);
      sq_dev += chunk_sq + delta * delta * (merged * static_cast<A>(m) / total);
    }
    merged += static_cast<A>(m);
  }
  const A inv_n = A(1) / static_cast<A>(n);
  const A mean = static_cast<A>(static_cast<double>(shift) + dev_sum / static_cast<double>(n));
  const A rstd = A(1) / std::sqrt(sq_dev * inv_n + eps);
  for (int64_t i = 0; i < n; ++i)
    store_acc(((to_acc<A>(x[i]) - mean) * rstd) * w[i] + bias[i], y[i]);
  return {mean, rstd};
}

struct FwdRows {
  template <typename T, typename A>
  static FASTNN_ALWAYS_INLINE void run(const FwdArgs<T, A>& a, int64_t begin, int64_t end) {
    const int64_t n = a.n;
    const RowViews<T> rows(2, n);  // scratch (fp16): input and output 0 (in place), residual 1
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * n;
      // While this row is L1-resident, start the next row's loads from memory: perf showed the
      // first pass's loads and the output stores as nearly all of the time at [4096, 4096] fp32.
      const row_t<T>* next = nullptr;
      if constexpr (!kStagedRows<T>)
        next = a.res == nullptr && r + 1 < end ? a.x + off + n : nullptr;
      const row_t<T>* x = a.res == nullptr
                              ? rows.in(a.x + off, 0)
                              : rows.sum_in(a.x + off, a.res + off, a.res_out + off, 0);
      const auto [mean, rstd] = normalize_row(x, rows.out(a.y + off, 0), a.w, a.b, a.eps, n, next);
      rows.done(a.y + off, 0);
      a.mean[r] = mean;
      a.rstd[r] = rstd;
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
  const A* mean;
  const A* rstd;
  T* dx;
  A* partial_w;  // [blocks.count, n] dw partials, nullptr without a weight
  A* partial_b;  // [blocks.count, n] db partials, nullptr without a bias
  int64_t n;
  int64_t rows;
  RowBlocks blocks;
};

// dx of one element, the residual's gradient aside: rstd (g - mean(g) - xhat mean(g xhat)).
template <typename A>
FASTNN_ALWAYS_INLINE A input_grad(A x, A dy, A w, A mean, A rstd, A g_mean, A gh_mean) {
  return rstd * (dy * w - g_mean - ((x - mean) * rstd) * gh_mean);
}

// Per row, two passes over the (L1/L2-resident) row: pass 1 accumulates sum(g) and
// sum(g * xhat) in a fixed lane order and adds dy * xhat and dy into the block's dW / dB
// partials; pass 2 writes dx. xhat and g are recomputed in pass 2 rather than stored.
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
      A* __restrict__ pw = a.partial_w != nullptr ? a.partial_w + blk * n : nullptr;
      A* __restrict__ pb = a.partial_b != nullptr ? a.partial_b + blk * n : nullptr;
      if (pw != nullptr) std::fill(pw, pw + n, A(0));
      if (pb != nullptr) std::fill(pb, pb + n, A(0));
      const int64_t row_end = std::min(a.rows, (blk + 1) * a.blocks.per_block);
      for (int64_t r = blk * a.blocks.per_block; r < row_end; ++r) {
        const int64_t off = r * n;
        const row_t<T>* x = rows.in(a.x + off, 0);  // dx may overwrite it (same index only)
        const row_t<T>* __restrict__ dy = rows.in(a.dy + off, 1);
        const A mean = a.mean[r], rstd = a.rstd[r];
        const V mv = V{} + mean, rs = V{} + rstd;
        A g_sum = 0, gh_sum = 0;  // sum(g), sum(g * xhat)
        for (int64_t base = 0; base < n; base += kChunk) {
          const int64_t end = std::min(base + kChunk, n);
          V g0{}, g1{}, s0{}, s1{};
          int64_t i = base;
          for (; i + kStep <= end; i += kStep) {
            const V d0 = vload_as<A>(dy + i), d1 = vload_as<A>(dy + i + W);
            const V h0 = (vload_as<A>(x + i) - mv) * rs, h1 = (vload_as<A>(x + i + W) - mv) * rs;
            const V e0 = d0 * vload(w + i), e1 = d1 * vload(w + i + W);
            g0 += e0;
            g1 += e1;
            s0 += e0 * h0;
            s1 += e1 * h1;
            if (pw != nullptr) {
              vstore(pw + i, vload(pw + i) + d0 * h0);
              vstore(pw + i + W, vload(pw + i + W) + d1 * h1);
            }
            if (pb != nullptr) {
              vstore(pb + i, vload(pb + i) + d0);
              vstore(pb + i + W, vload(pb + i + W) + d1);
            }
          }
          A lg[kStep] = {}, ls[kStep] = {};
          std::memcpy(lg, &g0, sizeof g0);
          std::memcpy(lg + W, &g1, sizeof g1);
          std::memcpy(ls, &s0, sizeof s0);
          std::memcpy(ls + W, &s1, sizeof s1);
          for (int64_t l = 0; i < end; ++i, ++l) {
            const A h = (to_acc<A>(x[i]) - mean) * rstd, e = to_acc<A>(dy[i]) * w[i];
            lg[l] += e;
            ls[l] += e * h;
            if (pw != nullptr) pw[i] += to_acc<A>(dy[i]) * h;
            if (pb != nullptr) pb[i] += to_acc<A>(dy[i]);
          }
          g_sum += fold_lanes<kStep>(lg);
          gh_sum += fold_lanes<kStep>(ls);
        }
        const A g_mean = g_sum * inv_n, gh_mean = gh_sum * inv_n;
        row_t<T>* dx = rows.out(a.dx + off, 0);
        if (a.gres != nullptr) {
          const row_t<T>* __restrict__ gr = rows.in(a.gres + off, 2);
          for (int64_t i = 0; i < n; ++i)
            store_acc(
                input_grad(to_acc<A>(x[i]), to_acc<A>(dy[i]), w[i], mean, rstd, g_mean, gh_mean) +
                    to_acc<A>(gr[i]),
                dx[i]);
        } else {
          for (int64_t i = 0; i < n; ++i)
            store_acc(
                input_grad(to_acc<A>(x[i]), to_acc<A>(dy[i]), w[i], mean, rstd, g_mean, gh_mean),
                dx[i]);
        }
        rows.done(a.dx + off, 0);
      }
    }
  }
};

// ---- Op entry points --------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps) {
  check_float(input, "input");
  TORCH_CHECK(input.dim() == 2, "fastnn: layer_norm_fwd expects a 2-D input [rows, N], got shape ",
              input.sizes());
  TORCH_CHECK(input.device().is_cpu(), "fastnn: CPU layer_norm_fwd got input on ", input.device());
  const int64_t rows = input.size(0), n = input.size(1);
  if (has(residual)) check_like(*residual, "residual", input, "input");
  check_vector(weight, "weight", input, n);
  check_vector(bias, "bias", input, n);

  const at::Tensor x = input.contiguous();
  const at::ScalarType acc = acc_type(x.scalar_type());
  at::Tensor out = empty_output({rows, n}, x.options());
  at::Tensor residual_out = has(residual) ? empty_output({rows, n}, x.options()) : x.new_empty({0});
  at::Tensor mean = at::empty({rows}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc));
  if (rows == 0) return {out, residual_out, mean, rstd};
  const at::Tensor res = has(residual) ? residual->contiguous() : at::Tensor();
  const at::Tensor w = param_as_acc(weight, acc, n, 1.0);
  const at::Tensor b = param_as_acc(bias, acc, n, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnn_ln_fwd", [&] {
    using A = acc_t<scalar_t>;
    const FwdArgs<scalar_t, A> args{
        x.const_data_ptr<scalar_t>(),
        res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
        w.const_data_ptr<A>(),
        b.const_data_ptr<A>(),
        out.mutable_data_ptr<scalar_t>(),
        res.defined() ? residual_out.mutable_data_ptr<scalar_t>() : nullptr,
        mean.mutable_data_ptr<A>(),
        rstd.mutable_data_ptr<A>(),
        n,
        static_cast<A>(eps)};
    at::parallel_for(0, rows, row_grain(n),
                     [&](int64_t begin, int64_t end) { run_isa<FwdRows>(args, begin, end); });
  });
  // Strided as the fake says (input's strides when dense), after the contiguous kernel writes.
  if (has(residual)) residual_out = strided_like(residual_out, input);
  return {strided_like(out, input), residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  check_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "fastnn: layer_norm_bwd expects a 2-D x [rows, N], got shape ",
              x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "fastnn: CPU layer_norm_bwd got x on ", x_in.device());
  const int64_t rows = x_in.size(0), n = x_in.size(1);
  check_like(grad_out, "grad_out", x_in, "x");
  if (has(grad_residual_out)) check_like(*grad_residual_out, "grad_residual_out", x_in, "x");
  check_vector(weight, "weight", x_in, n);
  check_vector(bias, "bias", x_in, n);
  check_stat(mean_in, "mean", x_in);
  check_stat(rstd_in, "rstd", x_in);

  const at::ScalarType acc = acc_type(x_in.scalar_type());
  const bool with_w = has(weight), with_b = has(bias);
  at::Tensor dx = empty_output({rows, n}, x_in.options());
  if (rows == 0) {
    // Sums over zero rows are zero, as the reference's .sum(0).
    return {dx, with_w ? at::zeros({n}, weight->options()) : x_in.new_empty({0}),
            with_b ? at::zeros({n}, bias->options()) : x_in.new_empty({0})};
  }
  const at::Tensor x = x_in.contiguous(), dy = grad_out.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor gres = has(grad_residual_out) ? grad_residual_out->contiguous() : at::Tensor();
  const at::Tensor w = param_as_acc(weight, acc, n, 1.0);
  const RowBlocks blocks = row_blocks(rows, n);
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor partial_w = with_w ? at::empty({blocks.count, n}, acc_opts) : at::Tensor();
  at::Tensor partial_b = with_b ? at::empty({blocks.count, n}, acc_opts) : at::Tensor();
  at::Tensor dw = with_w ? at::empty({n}, acc_opts) : x.new_empty({0});
  at::Tensor db = with_b ? at::empty({n}, acc_opts) : x.new_empty({0});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnn_ln_bwd", [&] {
    using A = acc_t<scalar_t>;
    const BwdArgs<scalar_t, A> args{dy.const_data_ptr<scalar_t>(),
                                    gres.defined() ? gres.const_data_ptr<scalar_t>() : nullptr,
                                    x.const_data_ptr<scalar_t>(),
                                    w.const_data_ptr<A>(),
                                    mean.const_data_ptr<A>(),
                                    rstd.const_data_ptr<A>(),
                                    dx.mutable_data_ptr<scalar_t>(),
                                    with_w ? partial_w.mutable_data_ptr<A>() : nullptr,
                                    with_b ? partial_b.mutable_data_ptr<A>() : nullptr,
                                    n,
                                    rows,
                                    blocks};
    at::parallel_for(0, blocks.count, 1,
                     [&](int64_t begin, int64_t end) { run_isa<BwdBlocks>(args, begin, end); });
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      if (with_w)
        reduce_partials(partial_w.const_data_ptr<A>(), blocks.count, n, dw.mutable_data_ptr<A>(),
                        begin, end);
      if (with_b)
        reduce_partials(partial_b.const_data_ptr<A>(), blocks.count, n, db.mutable_data_ptr<A>(),
                        begin, end);
    });
  });
  if (with_w && weight->scalar_type() != acc) dw = dw.to(weight->scalar_type());
  if (with_b && bias->scalar_type() != acc) db = db.to(bias->scalar_type());
  return {strided_like(dx, x_in), dw, db};
}

}  // namespace
}  // namespace fastnn::cpu

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("layer_norm_fwd", &fastnn::cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fastnn::cpu::layer_norm_bwd);
}
