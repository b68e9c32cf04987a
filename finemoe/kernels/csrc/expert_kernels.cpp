// Fused Expert Choice expert kernels for fp32 CPU (see finemoe/kernels/cpu_fused.py).
//
// The unfused path materialises [n_experts, C, d] copies of the tokens (x gathered, the output
// gradient gathered, the input gradient per slot): G times the token tensor, each written once and
// read by two batched matmuls from memory. Here each expert's C x d block is gathered into a
// per-thread tile that stays in cache for the matmuls that read it, and the gathered tokens are
// gathered again in the backward instead of being kept. The matmuls are MKL's sgemm, the one
// torch's bmm runs; one expert per call, the experts split over torch's OpenMP threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*);

namespace {

// Row-major C[M,N] = op(A)[M,K] op(B)[K,N] + beta * C, by the column-major BLAS call for
// C^T = op(B)^T op(A)^T.
void matmul(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int m = N, n = M, k = K, la = lda, lb = ldb, lc = ldc;
  const float one = 1.f;
  sgemm_(&tb, &ta, &m, &n, &k, &one, B, &lb, A, &la, &beta, C, &lc);
}

// Slots per tile: `block` if positive (tests), else about 1 MB of gathered rows (a core's L2
// here) and at least 128.
int64_t block_rows(int64_t C, int64_t d, int64_t block) {
  const int64_t rows = block > 0 ? block : std::max<int64_t>(128, (int64_t{1} << 18) / d);
  return std::max<int64_t>(1, std::min(C, rows));
}

// tile[r] = src[rows[r]] (times scale[r] if given), rows of d floats.
void gather_rows(float* tile, const float* src, const int64_t* rows, const float* scale, int64_t R,
                 int64_t d) {
  for (int64_t r = 0; r < R; ++r) {
    const float* s = src + rows[r] * d;
    float* t = tile + r * d;
    if (scale == nullptr) {
      std::memcpy(t, s, d * sizeof(float));
    } else {
      const float g = scale[r];
      for (int64_t j = 0; j < d; ++j) t[j] = s[j] * g;
    }
  }
}

void check(const at::Tensor& t, int64_t dim, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dim && t.is_contiguous(),
              name, ": expected a contiguous ", dim, "-d CPU tensor of ", dtype);
}

// The kernels read rows by these ids unchecked.
void check_tokens(const at::Tensor& idx, int64_t n_tokens) {
  check(idx, 2, at::kLong, "idx");
  if (idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n_tokens, "idx: token ids must lie in [0, ",
              n_tokens, ")");
}

// x [N, d], idx [n, C] token ids, w [n, d, o] -> out [n, C, o] = x[idx[e]] @ w[e] per expert e.
at::Tensor gather_mm(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& w, int64_t block) {
  check(x, 2, at::kFloat, "x");
  check_tokens(idx, x.size(0));
  check(w, 3, at::kFloat, "w");
  const int64_t n = idx.size(0), C = idx.size(1), d = x.size(1), o = w.size(2);
  TORCH_CHECK(w.size(0) == n && w.size(1) == d, "w: expected [", n, ", ", d, ", o]");
  auto out = at::empty({n, C, o}, x.options());
  const float* X = x.const_data_ptr<float>();
  const int64_t* I = idx.const_data_ptr<int64_t>();
  const float* W = w.const_data_ptr<float>();
  float* Out = out.mutable_data_ptr<float>();
  const int64_t rows = block_rows(C, d, block);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(rows * d);
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t c0 = 0; c0 < C; c0 += rows) {
        const int64_t R = std::min(rows, C - c0);
        gather_rows(tile.data(), X, I + e * C + c0, nullptr, R, d);
        matmul(false, false, R, o, d, tile.data(), d, W + e * d * o, o, 0.f, Out + (e * C + c0) * o, o);
      }
    }
  });
  return out;
}

// Backward of out = combine over slots of gates * (relu(x[idx] @ w1) @ w2), h = relu(x[idx] @ w1)
// [n, C, w]: returns (dxs [n, C, d], the input gradient per slot, still to be summed per token;
// dw1; dw2; dgates). A gate of exactly 0 gets gradient 0 (as in finemoe.nn.experts).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_backward(
    const at::Tensor& x, const at::Tensor& idx, const at::Tensor& gates, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& h, const at::Tensor& dout, int64_t block) {
  check(x, 2, at::kFloat, "x");
  check_tokens(idx, x.size(0));
  check(gates, 2, at::kFloat, "gates");
  check(w1, 3, at::kFloat, "w1");
  check(w2, 3, at::kFloat, "w2");
  check(h, 3, at::kFloat, "h");
  check(dout, 2, at::kFloat, "dout");
  const int64_t n = idx.size(0), C = idx.size(1), d = x.size(1), w = w1.size(2);
  TORCH_CHECK(gates.sizes() == idx.sizes() && w1.size(0) == n && w1.size(1) == d &&
                  w2.size(0) == n && w2.size(1) == w && w2.size(2) == d && h.size(0) == n &&
                  h.size(1) == C && h.size(2) == w && dout.sizes() == x.sizes(),
              "expert_backward: inconsistent shapes");
  auto dxs = at::empty({n, C, d}, x.options());
  // zeros only when no block writes them (no slots)
  auto dw1 = C ? at::empty_like(w1) : at::zeros_like(w1);
  auto dw2 = C ? at::empty_like(w2) : at::zeros_like(w2);
  auto dgates = at::empty_like(gates);
  const float *X = x.const_data_ptr<float>(), *G = gates.const_data_ptr<float>();
  const float *W1 = w1.const_data_ptr<float>(), *W2 = w2.const_data_ptr<float>();
  const float *H = h.const_data_ptr<float>(), *DO = dout.const_data_ptr<float>();
  const int64_t* I = idx.const_data_ptr<int64_t>();
  float *DX = dxs.mutable_data_ptr<float>(), *DW1 = dw1.mutable_data_ptr<float>();
  float *DW2 = dw2.mutable_data_ptr<float>(), *DG = dgates.mutable_data_ptr<float>();
  const int64_t rows = block_rows(C, d, block);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(rows * d), da(rows * w);
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t c0 = 0; c0 < C; c0 += rows) {
        const int64_t R = std::min(rows, C - c0), s0 = e * C + c0;
        const float beta = c0 == 0 ? 0.f : 1.f;  // the weight gradients sum over the blocks
        const int64_t* slot = I + s0;
        const float* g = G + s0;
        const float* he = H + s0 * w;
        // dy = gates * dout[idx]: the gated output gradient of each slot
        gather_rows(tile.data(), DO, slot, g, R, d);
        matmul(false, true, R, w, d, tile.data(), d, W2 + e * w * d, d, 0.f, da.data(), w);  // dy w2^T
        matmul(true, false, w, d, R, he, w, tile.data(), d, beta, DW2 + e * w * d, d);      // h^T dy
        for (int64_t c = 0; c < R; ++c) {
          // d gate = dout . (h w2) = (dy w2^T) . h / gate; then the ReLU mask
          float* a = da.data() + c * w;
          const float* hr = he + c * w;
          float dot = 0.f;
          for (int64_t j = 0; j < w; ++j) {
            dot += a[j] * hr[j];
            a[j] = hr[j] > 0.f ? a[j] : 0.f;
          }
          DG[s0 + c] = g[c] > 0.f ? dot / g[c] : 0.f;
        }
        gather_rows(tile.data(), X, slot, nullptr, R, d);
        matmul(true, false, d, w, R, tile.data(), d, da.data(), w, beta, DW1 + e * d * w, w);  // x^T da
        matmul(false, true, R, d, w, da.data(), w, W1 + e * d * w, w, 0.f, DX + s0 * d, d);  // da w1^T
      }
    }
  });
  return {dxs, dw1, dw2, dgates};
}

}  // namespace

// CPU kernels, not composite ones, so dispatch modes (the benchmark's op timer) see the calls.
TORCH_LIBRARY(finemoe_cpu, m) {
  m.def("gather_mm(Tensor x, Tensor idx, Tensor w, int block=0) -> Tensor");
  m.def(
      "expert_backward(Tensor x, Tensor idx, Tensor gates, Tensor w1, Tensor w2, Tensor h, "
      "Tensor dout, int block=0) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(finemoe_cpu, CPU, m) {
  m.impl("gather_mm", gather_mm);
  m.impl("expert_backward", expert_backward);
}
