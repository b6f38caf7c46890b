// CPU grad_stats: (a.b, a.a, b.b) over two flat gradient buffers in one pass, double accumulation,
// deterministic (fixed chunks summed in order).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "lanes.h"

namespace craft::cpu {
namespace {

template <typename T>
CRAFT_CPU_CLONES void stats_range(const T* a, const T* b, int64_t n, double* out) {
  double ab = 0, aa = 0, bb = 0;
  int64_t i = 0;
  for (; i + kFlush <= n; i += kFlush) {
    float lab[kLanes] = {}, laa[kLanes] = {}, lbb[kLanes] = {};
    for (int64_t j = 0; j < kFlush; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const float x = to_float(a[i + j + k]);
        const float y = to_float(b[i + j + k]);
        lab[k] += x * y;
        laa[k] += x * x;
        lbb[k] += y * y;
      }
    }
    for (int k = 0; k < kLanes; ++k) {
      ab += lab[k];
      aa += laa[k];
      bb += lbb[k];
    }
  }
  for (; i < n; ++i) {
    const double x = to_float(a[i]);
    const double y = to_float(b[i]);
    ab += x * y;
    aa += x * x;
    bb += y * y;
  }
  out[0] = ab;
  out[1] = aa;
  out[2] = bb;
}

// float16: blocks converted to float (F16C), then the float kernel on each.
template <>
void stats_range<c10::Half>(const c10::Half* a, const c10::Half* b, int64_t n, double* out) {
  out[0] = out[1] = out[2] = 0;
  for (int64_t i = 0; i < n; i += kFlush) {
    const int64_t len = std::min(kFlush, n - i);
    float x[kFlush], y[kFlush];
    half_to_float(a + i, x, len);
    half_to_float(b + i, y, len);
    double part[3];
    stats_range(static_cast<const float*>(x), static_cast<const float*>(y), len, part);
    for (int k = 0; k < 3; ++k) out[k] += part[k];
  }
}

at::Tensor grad_stats_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_buffer_pair(a, b, "a", "b");
  const int64_t n = a.numel();
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(3 * chunks, 0.0);
  dispatch_grad_type(a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, kGrain / kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t lo = c * kChunk;
        const int64_t len = std::min(kChunk, n - lo);
        stats_range(pa + lo, pb + lo, len, &partial[3 * c]);
      }
    });
  });
  double total[3] = {0, 0, 0};
  for (int64_t c = 0; c < chunks; ++c)
    for (int k = 0; k < 3; ++k) total[k] += partial[3 * c + k];
  at::Tensor out = at::empty({3}, a.options().dtype(at::kFloat));
  float* po = out.mutable_data_ptr<float>();
  for (int k = 0; k < 3; ++k) po[k] = static_cast<float>(total[k]);
  return out;
}

// grad_stats over the concatenation of pieces (a[i] paired with b[i]) without concatenating them:
// the chunks are those of the concatenation (kChunk elements from its start), so every partial, the
// sum and the result are bitwise those of grad_stats(cat(a), cat(b)). A chunk that straddles two
// pieces is gathered into a contiguous temporary first (at most kChunk elements per boundary).
at::Tensor grad_stats_pieces_cpu(at::TensorList a, at::TensorList b) {
  const int64_t pieces = static_cast<int64_t>(a.size());
  TORCH_CHECK(pieces >= 1, "craft: grad_stats_pieces needs at least one piece");
  TORCH_CHECK(static_cast<int64_t>(b.size()) == pieces, "craft: a and b must have the same number of pieces, got ",
              pieces, " and ", b.size());
  std::vector<int64_t> offsets(pieces + 1, 0);
  for (int64_t i = 0; i < pieces; ++i) {
    check_buffer_pair(a[i], b[i], "a[i]", "b[i]");
    TORCH_CHECK(a[i].scalar_type() == a[0].scalar_type() && a[i].device() == a[0].device(),
                "craft: every piece must have the dtype and device of the first (", a[0].scalar_type(), " on ",
                a[0].device(), "), piece ", i, " is ", a[i].scalar_type(), " on ", a[i].device());
    offsets[i + 1] = offsets[i] + a[i].numel();
  }
  const int64_t n = offsets[pieces];
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(3 * chunks, 0.0);
  dispatch_grad_type(a[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<const scalar_t*> pa(pieces), pb(pieces);
    for (int64_t i = 0; i < pieces; ++i) {
      pa[i] = a[i].const_data_ptr<scalar_t>();
      pb[i] = b[i].const_data_ptr<scalar_t>();
    }
    at::parallel_for(0, chunks, kGrain / kChunk, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> ta, tb;  // a straddling chunk, gathered
      for (int64_t c = begin; c < end; ++c) {
        const int64_t lo = c * kChunk;
        const int64_t len = std::min(kChunk, n - lo);
        // the piece holding element lo (the last one starting at or before it: empty pieces are skipped)
        int64_t p = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
        if (lo + len <= offsets[p + 1]) {
          stats_range(pa[p] + (lo - offsets[p]), pb[p] + (lo - offsets[p]), len, &partial[3 * c]);
          continue;
        }
        ta.resize(len);
        tb.resize(len);
        for (int64_t done = 0; done < len; ++p) {
          const int64_t from = lo + done - offsets[p];
          const int64_t take = std::min(len - done, offsets[p + 1] - offsets[p] - from);
          if (take <= 0) continue;
          std::copy(pa[p] + from, pa[p] + from + take, ta.begin() + done);
          std::copy(pb[p] + from, pb[p] + from + take, tb.begin() + done);
          done += take;
        }
        stats_range(static_cast<const scalar_t*>(ta.data()), static_cast<const scalar_t*>(tb.data()), len,
                    &partial[3 * c]);
      }
    });
  });
  double total[3] = {0, 0, 0};
  for (int64_t c = 0; c < chunks; ++c)
    for (int k = 0; k < 3; ++k) total[k] += partial[3 * c + k];
  at::Tensor out = at::empty({3}, a[0].options().dtype(at::kFloat));
  float* po = out.mutable_data_ptr<float>();
  for (int k = 0; k < 3; ++k) po[k] = static_cast<float>(total[k]);
  return out;
}

}  // namespace
}  // namespace craft::cpu

TORCH_LIBRARY_IMPL(craft, CPU, m) {
  m.impl("grad_stats", &craft::cpu::grad_stats_cpu);
  m.impl("grad_stats_pieces", &craft::cpu::grad_stats_pieces_cpu);
}
