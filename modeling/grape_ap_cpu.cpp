// GRAPE-AP attention on CPU: one pass over each query block's keys does the path integral,
// the softmax statistics and the probe terms, with the five q/k/v products as BLAS GEMMs.
// Built on first use by grape_ap_cpu.py (torch.utils.cpp_extension); the math is SPEC §4's.
//
// Layout: a block holds kRows queries; its scratch matrices are (keys x kRows), one row per
// key, the queries in the vector lanes, so the scans along keys (b's suffix sum, dψ's prefix
// sum) are plain vector adds, one key row after the other.
// Causality: lane i (query s0 + i) uses key j only if j <= d0 + i (d0: the key of query s0);
// every other entry is -inf before the softmax and exactly 0 after it and in every sum, so a
// later token changes no bit of an earlier query's result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kRows = 4 * kLanes;          // queries per block: four independent lane vectors
constexpr int64_t kVecs = kRows / kLanes;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Far keys' softmax weights underflow into denormals, whose arithmetic is slow on x86;
// they carry nothing at float32 resolution. Per thread, restored on exit.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// A running sum with its rounding error carried alongside (TwoSum, Neumaier): the dependency
// chain from one key to the next is a single add (Kahan's is four, which bounded the scans),
// and value() is exact to float32 rounding however many keys it sums.
struct CompensatedSum {
  Vec sum{0.f}, err{0.f};
  void add(const Vec& x) {
    const Vec s = sum + x, back = s - sum;
    err = err + ((sum - (s - back)) + (x - back));
    sum = s;
  }
  Vec value() const { return sum + err; }
};

// MKL (torch's BLAS on x86) called from inside our parallel region would start threads of its
// own on top of ours; a weak reference, so that a build with another BLAS still links.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));   // mkl_set_num_threads_local

struct SingleThreadedBlas {
  int saved = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(saved);
  }
};

struct Block {
  int64_t s0, nq, d0, kend;  // first query, its queries, the key of query s0, keys seen (0..kend-1)
};

Block block_at(int64_t s0, int64_t n_queries, int64_t n_keys) {
  int64_t nq = std::min(kRows, n_queries - s0);
  int64_t d0 = n_keys - n_queries + s0;
  return {s0, nq, d0, d0 + nq};
}

// All-ones lanes where query lane sees key j.
inline Vec visible(const Block& blk, int64_t j, int64_t v) {
  static const Vec all_ones = Vec(0.f) == Vec(0.f);
  if (j < blk.d0 && blk.nq == kRows) return all_ones;
  const Vec lane = Vec::arange(static_cast<float>(v * kLanes), 1.f);
  const Vec seen = lane < Vec(static_cast<float>(blk.nq));
  if (j < blk.d0) return seen;
  return seen & (lane >= Vec(static_cast<float>(j - blk.d0)));
}

// e^x inline (Sleef's is a call, across which every vector register spills): x = n ln2 + r,
// |r| <= ln2/2, e^r by its Taylor series to r^7 (truncation < 6e-9 relative), times 2^n by
// scalef, which also takes x -> -inf (hidden keys) to exactly 0.
inline Vec exp_inline(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);       // Cody-Waite
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return Vec(_mm512_scalef_ps(p, n));
#else
  return x.exp();
#endif
}

// a / b to float32 precision: the division instruction's throughput bounded the scans.
inline Vec quotient(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(b);                                            // 14 bits
  return a * Vec(_mm512_mul_ps(r, _mm512_fnmadd_ps(b, r, _mm512_set1_ps(2.f))));  // Newton: ~23
#else
  return a / b;
#endif
}

// log1p(e) for e in [0, 1]: 2 atanh(t), t = e / (2 + e) <= 1/3, as its series up to t^13
// (truncation < 2e-8 relative). A third of Sleef's general log1p, which took a fifth of the
// kernel's time, and as precise: relative accuracy holds down to e -> 0.
inline Vec log1p_unit(const Vec& e) {
  const Vec t = quotient(e, Vec(2.f) + e);
  const Vec t2 = t * t;
  Vec poly(1.f / 13.f);
  for (float c : {1.f / 11.f, 1.f / 9.f, 1.f / 7.f, 1.f / 5.f, 1.f / 3.f, 1.f}) poly = at::vec::fmadd(poly, t2, Vec(c));
  return Vec(2.f) * t * poly;
}

// logsigmoid(z) = min(z, 0) - log1p(e), e = exp(-|z|); with want_sigmoid also
// sigmoid(-z) = (z > 0 ? e : 1) / (1 + e), the derivative of logsigmoid.
template <bool want_sigmoid>
inline Vec log_sigmoid(const Vec& z, Vec& sig_neg) {
  const Vec e = exp_inline(z.abs().neg());
  if constexpr (want_sigmoid) sig_neg = quotient(Vec::blendv(Vec(1.f), e, z > Vec(0.f)), Vec(1.f) + e);
  return at::vec::minimum(z, Vec(0.f)) - log1p_unit(e);
}

// S holds q·k (keys x kRows). Adds b(t, j) = m Σ_{j<l<=t} logsigmoid(z(t, l)), walking keys
// from the diagonal down with a compensated running sum; hidden entries get -inf.
// Forward: S becomes the logits and stat receives each lane's max. Backward: stat holds each
// lane's logsumexp and S becomes the probabilities exp(logit - lse); sigmoid(-z) and
// logsigmoid(z) go to sig_neg and log_sig, 0 where hidden. The kVecs lane vectors of a key
// are independent chains for the out-of-order core; DP > 0 fixes the probe width.
template <bool backward, int64_t DP>
void add_path_bias(float* S, float* sig_neg, float* log_sig, const float* pT, const float* r,
                   int64_t dp, float m, const Block& blk, float* stat) {
  const int64_t width = DP > 0 ? DP : dp;
  const Vec slope(m);
  CompensatedSum sum[kVecs];
  Vec best[kVecs], shift[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) {
    best[v] = Vec(-kInf);
    shift[v] = backward ? Vec::loadu(stat + v * kLanes) : Vec(0.f);
  }
  for (int64_t j = blk.kend - 1; j >= 0; --j) {
    const float* rj = r + j * width;
#pragma GCC unroll 8    // the lane vectors' state in registers, not in stack arrays
    for (int64_t v = 0; v < kVecs; ++v) {
      const int64_t at = j * kRows + v * kLanes;
      Vec z(0.f);
      for (int64_t c = 0; c < width; ++c) z = at::vec::fmadd(Vec::loadu(pT + c * kRows + v * kLanes), Vec(rj[c]), z);
      Vec sn;
      Vec ls = log_sigmoid<backward>(z, sn);
      const Vec seen = visible(blk, j, v);
      const Vec logit = Vec::blendv(Vec(-kInf), at::vec::fmadd(slope, sum[v].value(), Vec::loadu(S + at)), seen);
      ls = ls & seen;
      sum[v].add(ls);
      if constexpr (backward) {
        exp_inline(logit - shift[v]).store(S + at);
        (sn & seen).store(sig_neg + at);
        if (log_sig) ls.store(log_sig + at);
      } else {
        logit.store(S + at);
        best[v] = at::vec::maximum(best[v], logit);
      }
    }
  }
  if constexpr (!backward)
    for (int64_t v = 0; v < kVecs; ++v) best[v].store(stat + v * kLanes);
}

template <bool backward>
void add_path_bias_any(float* S, float* sig_neg, float* log_sig, const float* pT, const float* r,
                       int64_t dp, float m, const Block& blk, float* stat) {
  switch (dp) {
    case 4: return add_path_bias<backward, 4>(S, sig_neg, log_sig, pT, r, dp, m, blk, stat);
    case 8: return add_path_bias<backward, 8>(S, sig_neg, log_sig, pT, r, dp, m, blk, stat);
    case 16: return add_path_bias<backward, 16>(S, sig_neg, log_sig, pT, r, dp, m, blk, stat);
    default: return add_path_bias<backward, 0>(S, sig_neg, log_sig, pT, r, dp, m, blk, stat);
  }
}

// S = exp(S - shift) per lane (hidden -inf -> 0); the lane sums into total.
void exp_shifted(float* S, const float* shift, int64_t kend, float* total) {
  Vec sum[kVecs], sh[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) {
    sum[v] = Vec(0.f);
    sh[v] = Vec::loadu(shift + v * kLanes);
  }
  for (int64_t j = 0; j < kend; ++j)
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) {
      const Vec p = exp_inline(Vec::loadu(S + j * kRows + v * kLanes) - sh[v]);
      p.store(S + j * kRows + v * kLanes);
      sum[v] = sum[v] + p;
    }
  for (int64_t v = 0; v < kVecs; ++v) sum[v].store(total + v * kLanes);
}

// Rows s0 .. s0+nq-1 of src (n x width) into the first rows of a zeroed (kRows x width) pad.
void load_rows(at::Tensor& pad, const at::Tensor& src, const Block& blk) {
  pad.zero_();
  pad.narrow(0, 0, blk.nq).copy_(src.narrow(0, blk.s0, blk.nq));
}

struct Scratch {
  at::Tensor S, sig_neg, log_sig, dS, q, p, out, dout, dq, dp;
  Scratch(int64_t n_keys, int64_t d, int64_t dp_, bool backward, bool want_slope = false) {
    auto f = at::TensorOptions().dtype(at::kFloat);
    S = at::empty({n_keys, kRows}, f);
    q = at::empty({kRows, d}, f);
    p = at::empty({kRows, dp_}, f);
    out = at::empty({kRows, d}, f);
    if (backward) {
      sig_neg = at::empty({n_keys, kRows}, f);
      if (want_slope) log_sig = at::empty({n_keys, kRows}, f);
      dS = at::empty({n_keys, kRows}, f);
      dout = at::empty({kRows, d}, f);
      dq = at::empty({kRows, d}, f);
      dp = at::empty({kRows, dp_}, f);
    }
  }
};

// One block (queries and probes in w.q, w.p) with the path bias into w.S: see add_path_bias.
void block_logits(Scratch& w, const at::Tensor& k, const at::Tensor& r, float m, const Block& blk, float* stat,
                  bool backward) {
  at::Tensor S = w.S.narrow(0, 0, blk.kend);
  at::mm_out(S, k.narrow(0, 0, blk.kend), w.q.t());
  at::Tensor pT = w.p.t().contiguous();
  auto bias = backward ? add_path_bias_any<true> : add_path_bias_any<false>;
  bias(S.data_ptr<float>(), backward ? w.sig_neg.data_ptr<float>() : nullptr,
       backward && w.log_sig.defined() ? w.log_sig.data_ptr<float>() : nullptr, pT.data_ptr<float>(), r.data_ptr<float>(),
       r.size(1), m, blk, stat);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& p,
                  const at::Tensor& r, const at::Tensor& slope) {
  for (const at::Tensor* t : {&q, &k, &v, &p, &r, &slope})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "grape_ap_cpu: inputs must be float32 CPU tensors");
  // q, k, v are read through BLAS and copies, any layout with unit stride along the head dim
  // (the model's are transposed views); the probes and slopes through raw pointers
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, "grape_ap_cpu: q, k, v must have unit stride along the head dim");
  for (const at::Tensor* t : {&p, &r, &slope})
    TORCH_CHECK(t->is_contiguous(), "grape_ap_cpu: probes and slopes must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(3) == k.size(3) && q.size(2) <= k.size(2),
              "grape_ap_cpu: q (B, H, Tq, D) must end with k, v (B, H, Tk, D)");
  TORCH_CHECK(p.dim() == 4 && r.dim() == 4 && p.sizes().slice(0, 3) == q.sizes().slice(0, 3) &&
                  r.sizes().slice(0, 3) == k.sizes().slice(0, 3) && p.size(3) == r.size(3) &&
                  slope.numel() == q.size(1),
              "grape_ap_cpu: probes p (B, H, Tq, dp), r (B, H, Tk, dp) and one slope per head");
}

// softmax(scale q·k + b) v and each query's logsumexp; p: (B, H, Tq, dp) already divided by dp.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& p, const at::Tensor& r, const at::Tensor& slope,
                                           double scale) {
  check_inputs(q, k, v, p, r, slope);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2), dp = p.size(3);
  const int64_t n_blocks = (Tq + kRows - 1) / kRows;
  at::Tensor out = at::empty({B, H, Tq, D}, q.options()), lse = at::empty({B, H, Tq}, q.options());
  const float* m = slope.data_ptr<float>();
  at::parallel_for(0, B * H * n_blocks, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals flush;
    SingleThreadedBlas blas;
    Scratch w(Tk, D, dp, false);
    alignas(64) float mx[kRows], total[kRows];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_blocks, b = bh / H, h = bh % H;
      const Block blk = block_at((task % n_blocks) * kRows, Tq, Tk);
      at::Tensor qh = q[b][h], kh = k[b][h], vh = v[b][h], ph = p[b][h], rh = r[b][h];
      load_rows(w.q, qh, blk);
      w.q.mul_(scale);
      load_rows(w.p, ph, blk);
      block_logits(w, kh, rh, m[h], blk, mx, false);
      for (int64_t i = 0; i < kRows; ++i) mx[i] = std::isinf(mx[i]) ? 0.f : mx[i];   // padding lanes
      exp_shifted(w.S.data_ptr<float>(), mx, blk.kend, total);
      at::mm_out(w.out, w.S.narrow(0, 0, blk.kend).t(), vh.narrow(0, 0, blk.kend));
      float* o = out[b][h].data_ptr<float>();
      float* l = lse[b][h].data_ptr<float>();
      const float* wo = w.out.data_ptr<float>();
      for (int64_t i = 0; i < blk.nq; ++i) {
        for (int64_t d = 0; d < D; ++d) o[(blk.s0 + i) * D + d] = wo[i * D + d] / total[i];
        l[blk.s0 + i] = mx[i] + std::log(total[i]);
      }
    }
  });
  return {out, lse};
}

// dS = P (dP - δ) in place of dP; then dψ(t, j) = Σ_{j'<j} dS(t, j') walking keys upwards
// (compensated), dz = m dψ sigmoid(-z) into sig_neg, and (with log_sig) the lanes'
// Σ dψ logsigmoid(z), the slope's gradient, into dslope.
void path_gradient(float* dP, const float* P, const float* delta, float* sig_neg, const float* log_sig, float m,
                   int64_t kend, float* dslope) {
  const Vec slope(m);
  CompensatedSum sum[kVecs];
  Vec acc[kVecs], dl[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) {
    acc[v] = Vec(0.f);
    dl[v] = Vec::loadu(delta + v * kLanes);
  }
  for (int64_t j = 0; j < kend; ++j)
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) {
      const int64_t at = j * kRows + v * kLanes;
      const Vec dS = Vec::loadu(P + at) * (Vec::loadu(dP + at) - dl[v]);
      dS.store(dP + at);
      const Vec dpsi = sum[v].value();
      if (log_sig) acc[v] = at::vec::fmadd(dpsi, Vec::loadu(log_sig + at), acc[v]);
      (slope * dpsi * Vec::loadu(sig_neg + at)).store(sig_neg + at);
      sum[v].add(dS);
    }
  for (int64_t v = 0; v < kVecs; ++v) acc[v].store(dslope + v * kLanes);
}

// Gradients of forward's inputs (the slope's only with want_slope). Each (batch, head) is one
// task, so the key-side gradients (dk, dv, dr) accumulate over its query blocks without races.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& p, const at::Tensor& r, const at::Tensor& slope, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool want_slope) {
  check_inputs(q, k, v, p, r, slope);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.stride(3) == 1 && out.is_contiguous(),
              "grape_ap_cpu: grad_out like the output");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2), dp = p.size(3);
  const auto f = q.options();
  at::Tensor dq = at::empty({B, H, Tq, D}, f), dk = at::zeros({B, H, Tk, D}, f), dv = at::zeros({B, H, Tk, D}, f);
  at::Tensor dpr = at::empty_like(p), dr = at::zeros_like(r), dslope = at::zeros({B, H}, f);
  const float* m = slope.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals flush;
    SingleThreadedBlas blas;
    Scratch w(Tk, D, dp, true, want_slope);
    alignas(64) float shift[kRows], lanes[kRows], part[kRows];
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      at::Tensor qh = q[b][h], kh = k[b][h], vh = v[b][h], ph = p[b][h], rh = r[b][h];
      const float* lse_h = lse[b][h].data_ptr<float>();
      const float* out_h = out[b][h].data_ptr<float>();
      float slope_grad = 0.f;
      for (int64_t s0 = 0; s0 < Tq; s0 += kRows) {
        const Block blk = block_at(s0, Tq, Tk);
        const int64_t kend = blk.kend;
        load_rows(w.q, qh, blk);
        w.q.mul_(scale);
        load_rows(w.p, ph, blk);
        load_rows(w.dout, grad_out[b][h], blk);
        const float* dout = w.dout.data_ptr<float>();
        for (int64_t i = 0; i < kRows; ++i) {          // δ = rowsum(dO ∘ O) = Σ_j P dP per query
          shift[i] = lanes[i] = 0.f;
          if (i >= blk.nq) continue;
          shift[i] = lse_h[s0 + i];
          for (int64_t d = 0; d < D; ++d) lanes[i] += dout[i * D + d] * out_h[(s0 + i) * D + d];
        }
        block_logits(w, kh, rh, m[h], blk, shift, true);              // w.S: probabilities
        at::Tensor P = w.S.narrow(0, 0, kend), dS = w.dS.narrow(0, 0, kend);
        dv[b][h].narrow(0, 0, kend).addmm_(P, w.dout);
        at::mm_out(dS, vh.narrow(0, 0, kend), w.dout.t());           // dP, then dS in place
        path_gradient(dS.data_ptr<float>(), P.data_ptr<float>(), lanes, w.sig_neg.data_ptr<float>(),
                      want_slope ? w.log_sig.data_ptr<float>() : nullptr, m[h], kend, part);
        for (int64_t i = 0; i < blk.nq; ++i) slope_grad += part[i];
        at::mm_out(w.dq, dS.t(), kh.narrow(0, 0, kend));
        w.dq.mul_(scale);
        dk[b][h].narrow(0, 0, kend).addmm_(dS, w.q);
        at::Tensor dz = w.sig_neg.narrow(0, 0, kend);
        at::mm_out(w.dp, dz.t(), rh.narrow(0, 0, kend));
        dr[b][h].narrow(0, 0, kend).addmm_(dz, w.p);
        dq[b][h].narrow(0, s0, blk.nq).copy_(w.dq.narrow(0, 0, blk.nq));
        dpr[b][h].narrow(0, s0, blk.nq).copy_(w.dp.narrow(0, 0, blk.nq));
      }
      dslope[b][h].fill_(slope_grad);
    }
  });
  return {dq, dk, dv, dpr, dr, dslope.sum(0)};
}

// torch.set_flush_denormal sets the calling thread only, and ATen's intra-op threads keep the
// floating-point mode they started with, so SDPA's and the GEMMs' chunks on those threads
// still compute with denormals (at T = 4096, 2 threads: ALiBi 1.8x RoPE's step, 1.04x with every
// thread flushed). A parallel_for over as many items as the pool has threads gives each thread
// one chunk; each sets flush-to-zero and denormals-are-zero for good, as torch's switch does.
// Returns how many threads ran a chunk.
int64_t flush_denormals_in_workers() {
  std::atomic<int64_t> reached{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    at::globalContext().setFlushDenormal(true);
    reached += 1;
  });
  return reached.load();
}

}  // namespace

TORCH_LIBRARY(grape_ap_cpu, lib) {
  lib.def("flush_denormals_in_workers() -> int", &flush_denormals_in_workers);
  lib.def("forward(Tensor q, Tensor k, Tensor v, Tensor p, Tensor r, Tensor slope, float scale) -> (Tensor, Tensor)",
          &forward);
  lib.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor p, Tensor r, Tensor slope, "
          "Tensor out, Tensor lse, float scale, bool want_slope) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", &backward);
}
