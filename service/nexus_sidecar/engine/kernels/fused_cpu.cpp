// Fused CPU kernels of one engine call (see engine/step_fused.py, which drives them).
//
// Each kernel loops over the rows of a batch (at::parallel_for, so torch's intra-op thread count
// applies) and does, per row, in one or a few sweeps over the slots what the pure-torch reference
// (engine/step.py, policies/, selection.py) does in tens of full-tensor passes. A row's data
// (4,097 slots: 16 KiB per float field, 393 KiB of edges at F = 8) stays in the core's caches for
// the whole row, where the reference streams every [R, W] temporary through memory.
//
// Agreement with the reference: every elementwise float operation is the reference's, in the same
// precision and order (this file is compiled with -ffp-contract=off: no fused multiply-adds), and
// the walk accumulates its scatter in the same (source, edge) order as torch's CPU scatter_add_,
// so those results are bit-identical. Row sums accumulate in float64 sequentially where torch
// sums pairwise: they may differ in the last float64 bits, which changes a float32 result only
// when it lies within ~1e-16 of a rounding boundary. Transcendentals are float64 (std::log, and a
// vectorisable exp within ~2 float64 ulps for the prior mass) where the reference uses float64
// torch.log/exp: the float32 results they round to agree but within ~1e-16 of a boundary.
//
// Rows are read through their row stride, so pool views (a batch of contiguous pool rows, arena
// narrowed to the call's width) need no copy; the last dimension must be contiguous.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int kSlotBits = 21;  // selection.py: MAX_SLOTS = 1 << 21

// ---- row access ----------------------------------------------------------------------------------
template <typename T>
struct Mat {
  T* p = nullptr;
  int64_t rs = 0;
  T* row(int64_t r) const { return p + r * rs; }
};

template <typename T>
Mat<T> mat(const at::Tensor& t, at::ScalarType st, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), name, ": a CPU tensor is expected");
  TORCH_CHECK(t.scalar_type() == st, name, ": dtype ", st, " expected, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) >= cols, name, ": shape [", rows, ", >=", cols,
              "] expected, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, ": the last dimension must be contiguous");
  return {t.data_ptr<T>(), t.stride(0)};
}

template <typename T>
const T* vec(const at::Tensor& t, at::ScalarType st, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == st && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              name, ": a contiguous CPU ", st, " vector of ", n, " expected");
  return t.data_ptr<T>();
}

template <typename T>
Mat<T> edges(const at::Tensor& t, at::ScalarType st, const char* name, int64_t rows, int64_t cols, int64_t fan) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == st && t.dim() == 3, name, ": CPU ", st, " [R, W, F] expected");
  TORCH_CHECK(t.size(0) == rows && t.size(1) >= cols && t.size(2) == fan, name, ": shape mismatch ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == fan, name, ": each row's [W, F] block must be contiguous");
  return {t.data_ptr<T>(), t.stride(0)};
}

// ---- counter-based uniforms (hashing.py) ---------------------------------------------------------
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kC1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kC2 = 0x94D049BB133111EBULL;
constexpr uint64_t kGroup = 0x632BE59BD9B4E019ULL;
constexpr uint64_t kCall = 0x2545F4914F6CDD1DULL;

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= kC1;
  x ^= x >> 27;
  x *= kC2;
  return x ^ (x >> 31);
}

inline uint64_t row_key(int64_t seed, int64_t group, int64_t call) {
  return mix64(mix64(static_cast<uint64_t>(seed) + kGolden) ^
               (static_cast<uint64_t>(group) * kGroup + static_cast<uint64_t>(call) * kCall));
}

inline double uniform(uint64_t key, int64_t unit) {
  const uint64_t x = mix64(static_cast<uint64_t>(unit) * kGolden + key);
  return (static_cast<double>(x >> 11) + 0.5) * 0x1.0p-53;
}

inline int64_t ordered(double x) {
  int64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits < 0 ? bits ^ kInt64Max : bits;
}

// ---- the walk (walk.py) --------------------------------------------------------------------------
// One iteration's scatter for a fan-out known at compile time (unrolled), or any fan-out (FF = 0).
// An out-of-row target is counted in ``bad`` and lands in the dump column acc[W]; the reference
// would raise, and so does the caller.
template <int FF>
inline void scatter_row(const float* s, const bool* alive, const int64_t* idx, const float* w, int64_t W,
                        int64_t F, float* acc, uint64_t& bad) {
  const int64_t fan = FF > 0 ? FF : F;
  for (int64_t j = 0; j < W; ++j) {
    const float sj = s[j];
    // A dead or massless source adds exact +0 terms in the reference: skipping them is exact.
    if (!alive[j] || sj == 0.0f) continue;
    const int64_t* ij = idx + j * fan;
    const float* wj = w + j * fan;
    for (int64_t f = 0; f < fan; ++f) {
      const uint64_t t = static_cast<uint64_t>(ij[f]);
      const bool out = t >= static_cast<uint64_t>(W);
      bad += out;
      acc[out ? W : t] += sj * wj[f];
    }
  }
}

// s_0 = d; s_{r+1} = d + beta * scatter(alive * s_r * w); result masked by alive. ``acc`` is scratch
// of W + 1 floats. Returns false if an edge points outside [0, W).
bool walk_row(const float* d, const bool* alive, const int64_t* idx, const float* w, int64_t W, int64_t F,
              float beta, int64_t iterations, float* s, float* acc) {
  std::copy(d, d + W, s);
  uint64_t bad = 0;
  for (int64_t it = 0; it < iterations; ++it) {
    std::fill(acc, acc + W + 1, 0.0f);
    if (F == 8) scatter_row<8>(s, alive, idx, w, W, F, acc, bad);
    else if (F == 16) scatter_row<16>(s, alive, idx, w, W, F, acc, bad);
    else if (F == 4) scatter_row<4>(s, alive, idx, w, W, F, acc, bad);
    else scatter_row<0>(s, alive, idx, w, W, F, acc, bad);
    for (int64_t j = 0; j < W; ++j) s[j] = d[j] + beta * acc[j];
  }
  for (int64_t j = 0; j < W; ++j) s[j] = alive[j] ? s[j] : 0.0f;
  return bad == 0;
}

// Float64 sum of x[j] (float32) over the slots where m[j], in four interleaved partial sums (slot j
// goes to sum j % 4, whatever the row's width): four independent add chains instead of one
// latency-bound chain, and the result depends only on the masked slots (padding adds nothing),
// so batch invariance holds exactly. The reference's torch sum uses yet another order.
inline double masked_sum(const float* x, const bool* m, int64_t W) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 4 <= W; j += 4)
    for (int k = 0; k < 4; ++k) acc[k] += m[j + k] ? static_cast<double>(x[j + k]) : 0.0;
  for (; j < W; ++j) acc[j & 3] += m[j] ? static_cast<double>(x[j]) : 0.0;
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// normalize(): x / sum(x[over]) with the sum in float64, the division in float64, rounded once.
inline void normalize_row(const float* x, const bool* over, int64_t W, float* out) {
  const double total = masked_sum(x, over, W);
  if (total > 0.0) {
    for (int64_t j = 0; j < W; ++j) out[j] = static_cast<float>(static_cast<double>(x[j]) / total);
  } else {
    std::fill(out, out + W, 0.0f);
  }
}

// prior_mass()'s exp: out[j] = float32(exp(min(z[j] - top, 0) * sharpness)), evaluated in float64
// within ~2 float64 ulps (Cody-Waite reduction by ln 2, degree-13 Taylor polynomial, the power of
// two by integer arithmetic on the bits), so it rounds to the correctly rounded float32 value except
// within ~4e-16 of a rounding boundary, as the reference's float64 torch.exp does. Written so the
// loop vectorises (SSE2 at least: no integer<->float64 conversions, no branches): glibc's scalar exp
// was a third of the Nexus scoring. Arguments below -104 give 0 (exp underflows float32 there).
void prior_mass_row(const float* z, float top, float sharpness, int64_t W, float* out) {
  constexpr double kInvLn2 = 1.4426950408889634, kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;
  constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  constexpr int64_t kShiftBits = 0x4338000000000000LL;  // its bits; bits(kShift + n) = kShiftBits + n
  for (int64_t j = 0; j < W; ++j) {
    const float arg = std::min(z[j] - top, 0.0f) * sharpness;
    const double x = arg < -104.0f ? -104.0 : static_cast<double>(arg);
    const double t = x * kInvLn2 + kShift;
    const double n = t - kShift;
    const double r = (x - n * kLn2Hi) - n * kLn2Lo;  // |r| <= ~0.347
    double p = 1.0 / 6227020800.0;  // 1/13!
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t tb;
    std::memcpy(&tb, &t, sizeof tb);
    const int64_t sb = (tb - kShiftBits + 1023) << 52;
    double scale;
    std::memcpy(&scale, &sb, sizeof scale);
    const float e = static_cast<float>(p * scale);
    out[j] = arg < -104.0f ? 0.0f : e;
  }
}

inline double row_scale(double share, double total) {
  return total > 0.0 ? share / std::max(total, 1e-300) : 0.0;
}


// The reservoir key of one slot, exactly as selection.py computes it (float64).
inline double reservoir_prio(double wj, double scale, double tau, const double* noise, int64_t j, const int64_t* pos,
                             uint64_t key) {
  double prio = noise ? noise[j] : -std::log(-std::log(uniform(key, pos[j])));
  if (tau > 0.0) prio = prio + tau * std::log(std::min(std::max(wj / scale, 1e-300), 1.0));
  return prio;
}

// The least Gumbel noise -log(-log u) can take: u >= 2^-54 (hashing.py's 53-bit uniforms).
constexpr double kGumbelMin = -3.6226;

// Reservoir keys of the candidates that can be among a row's ``need`` lowest, into ``keys``.
//
// The exact key costs two float64 logs for the per-call noise and one for the weight, ~8 ns per
// slot; but only the lowest few keys matter. A cheap lower bound per candidate (the least noise,
// or the cached noise, plus tau * log of the weight's power-of-two floor) bounds every key from
// below; the exact keys of the ``need`` candidates with the lowest bounds bound the need-th lowest
// key from above (T); only candidates whose bound is <= T can be selected, and they alone get an
// exact key. The selection is then exactly the one over every candidate's exact key.
// ``lb`` is scratch of W doubles.
void reservoir_keys(const float* w, const bool* c, int64_t W, int64_t need, double tau, const double* noise,
                    const int64_t* pos, uint64_t key, std::vector<std::pair<int64_t, int64_t>>& keys,
                    double* lb) {
  keys.clear();
  if (tau == 0.0 && !noise) {
    // Uniform eviction: the key -log(-log u) increases with u, so the lowest u are the lowest keys.
    for (int64_t j = 0; j < W; ++j)
      if (c[j]) keys.emplace_back(ordered(uniform(key, pos[j])), j);
    return;
  }
  double top = 0.0;
  for (int64_t j = 0; j < W; ++j)
    if (c[j] && w[j] > 0.0f) top = std::max(top, static_cast<double>(w[j]));
  const double scale = std::max(top, 1e-300);
  const double log_scale = std::log(scale), log_floor = std::log(1e-300);
  constexpr double kLn2 = 0.6931471805599453;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  auto exact = [&](int64_t j) {
    const double wj = w[j] > 0.0f ? static_cast<double>(w[j]) : 0.0;
    return reservoir_prio(wj, scale, tau, noise, j, pos, key);
  };
  // The bound's weight term from a power-of-two floor: log(rel) >= max(log 1e-300, min(floor2 * ln2 -
  // log scale, 0)) with rel = clamp(w / scale, 1e-300, 1); floor2 from the float32 exponent
  // (-150 for subnormals, which are >= 2^-149; zero weights: log 1e-300 exactly).
  auto lrel_of = [&](int expo) {  // expo: the biased exponent, or -1 for a zero weight
    if (expo < 0) return log_floor;
    const double floor2 = expo == 0 ? -150.0 : static_cast<double>(expo - 127);
    return std::max(log_floor, std::min(floor2 * kLn2 - log_scale, 0.0));
  };
  auto expo_of = [&](int64_t j) {
    uint32_t bits;
    std::memcpy(&bits, &w[j], sizeof bits);
    return w[j] > 0.0f ? static_cast<int>((bits >> 23) & 0xff) : -1;
  };
  if (!noise && need == 1) {
    // Per-call noise, one eviction (the decode steady state): the bound depends on the weight's
    // exponent alone and grows with it, so the least bound is at the least exponent, and the
    // contenders are the candidates whose exponent is at most the largest one the threshold allows.
    int least = 256;
    int64_t first = -1;
    for (int64_t j = 0; j < W; ++j) {
      const int e = c[j] ? expo_of(j) : 256;
      if (e < least) least = e, first = j;
    }
    if (first < 0) return;
    const double threshold = exact(first);
    auto bound = [&](int e) {
      const double lb = kGumbelMin + tau * lrel_of(e);
      return lb - 1e-9 * (1.0 + std::fabs(lb));
    };
    int most = least;
    while (most < 255 && bound(most + 1) <= threshold) ++most;
    for (int64_t j = 0; j < W; ++j)
      if (c[j] && expo_of(j) <= most) keys.emplace_back(ordered(exact(j)), j);
    return;
  }
  int64_t n = 0, best = -1;
  for (int64_t j = 0; j < W; ++j) {
    double bound = (noise ? noise[j] : kGumbelMin) + tau * lrel_of(expo_of(j));
    bound -= 1e-9 * (1.0 + std::fabs(bound));  // rounding of the bound itself
    lb[j] = c[j] ? bound : kInf;
    if (c[j]) {
      ++n;
      if (best < 0 || bound < lb[best]) best = j;
    }
  }
  const int64_t k = std::min(need, n);
  if (k <= 0) return;
  if (k == n) {  // every candidate goes: no keys needed beyond membership
    for (int64_t j = 0; j < W; ++j)
      if (c[j]) keys.emplace_back(0, j);
    return;
  }
  double threshold;
  if (k == 1) {
    threshold = exact(best);
  } else {
    std::vector<std::pair<double, int64_t>> order;
    for (int64_t j = 0; j < W; ++j)
      if (c[j]) order.emplace_back(lb[j], j);
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end());
    threshold = -kInf;
    for (int64_t i = 0; i < k; ++i) threshold = std::max(threshold, exact(order[i].second));
  }
  for (int64_t j = 0; j < W; ++j)
    if (lb[j] <= threshold) keys.emplace_back(ordered(exact(j)), j);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// value_codes: step.py validate_rows's checks of the [R, Wx] float inputs, in its order: per row
// the first failing code (1/2: attn not finite / negative, 3/4: last, then each prior's range
// code), 0 when all pass. The caller goes on with the edge and position checks.
at::Tensor value_codes(const at::Tensor& attn_t, const at::Tensor& last_t, const std::vector<at::Tensor>& priors,
                       const std::vector<int64_t>& codes, const std::vector<double>& lo,
                       const std::vector<double>& hi) {
  const int64_t R = attn_t.size(0), Wx = attn_t.size(1);
  const auto attn = mat<float>(attn_t, at::kFloat, "attn", R, Wx);
  const auto last = mat<float>(last_t, at::kFloat, "last", R, Wx);
  TORCH_CHECK(priors.size() == codes.size() && codes.size() == lo.size() && lo.size() == hi.size(),
              "value_codes: one code and range per prior");
  std::vector<Mat<float>> pr;
  for (const auto& t : priors) pr.push_back(mat<float>(t, at::kFloat, "prior", R, Wx));
  at::Tensor out_t = at::zeros({R}, attn_t.options().dtype(at::kLong));
  int64_t* out = out_t.data_ptr<int64_t>();
  // On the float32 bits, so the loops vectorise: not finite = all exponent bits set; negative =
  // sign set and not -0 (NaN with the sign set also counts, but NaN is reported first).
  auto finite_nonneg = [Wx](const float* x, int64_t bad_finite, int64_t bad_sign) -> int64_t {
    uint32_t nonfinite = 0, negative = 0;
    for (int64_t j = 0; j < Wx; ++j) {
      uint32_t b;
      std::memcpy(&b, x + j, sizeof b);
      nonfinite |= static_cast<uint32_t>((b & 0x7f800000u) == 0x7f800000u);
      negative |= static_cast<uint32_t>(b > 0x80000000u);
    }
    return nonfinite ? bad_finite : (negative ? bad_sign : 0);
  };
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t code = finite_nonneg(attn.row(r), 1, 2);
      if (!code) code = finite_nonneg(last.row(r), 3, 4);
      for (size_t i = 0; i < pr.size() && !code; ++i) {
        // One range test rejects NaN (every comparison is false), +-Inf and out-of-range values.
        const float l = static_cast<float>(lo[i]), h = static_cast<float>(std::min(hi[i], 3.4028234663852886e38));
        const float* x = pr[i].row(r);
        uint32_t bad = 0;
        for (int64_t j = 0; j < Wx; ++j) bad |= static_cast<uint32_t>(!((x[j] >= l) & (x[j] <= h)));
        if (bad) code = codes[i];
      }
      out[r] = code;
    }
  });
  return out_t;
}

// layout: arena columns -> call slots, protection, age, and the call's [R, Wx] inputs laid out on
// the arena columns (0 on dead columns). step.py: ext, gather_at, attn/last/priors, protected, age.
std::vector<at::Tensor> layout(const at::Tensor& alive_t, const at::Tensor& birth_t, const at::Tensor& call_t,
                               const at::Tensor& sinks_t, const at::Tensor& recent_t, const at::Tensor& count_t,
                               const std::vector<at::Tensor>& inputs, int64_t W) {
  const int64_t R = alive_t.size(0);
  const auto alive = mat<bool>(alive_t, at::kBool, "alive", R, W);
  const auto birth = mat<int64_t>(birth_t, at::kLong, "birth", R, W);
  const int64_t* call = vec<int64_t>(call_t, at::kLong, "call", R);
  const int64_t* sinks = vec<int64_t>(sinks_t, at::kLong, "sinks", R);
  const int64_t* recent = vec<int64_t>(recent_t, at::kLong, "recent", R);
  const int64_t* count = vec<int64_t>(count_t, at::kLong, "count", R);
  TORCH_CHECK(!inputs.empty(), "layout: at least one input");
  const int64_t Wx = inputs[0].size(1);
  TORCH_CHECK(Wx >= 1, "layout: inputs must have at least one column");
  std::vector<Mat<float>> in;
  for (const auto& t : inputs) in.push_back(mat<float>(t, at::kFloat, "input", R, Wx));
  auto opts = alive_t.options();
  at::Tensor ext_t = at::empty({R, W}, opts.dtype(at::kLong));
  at::Tensor prot_t = at::empty({R, W}, opts.dtype(at::kBool));
  at::Tensor cand_t = at::empty({R, W}, opts.dtype(at::kBool));
  at::Tensor age_t = at::empty({R, W}, opts.dtype(at::kInt));
  std::vector<at::Tensor> outs;
  std::vector<Mat<float>> out;
  for (size_t i = 0; i < inputs.size(); ++i) {
    outs.push_back(at::empty({R, W}, opts.dtype(at::kFloat)));
    out.push_back({outs.back().data_ptr<float>(), W});
  }
  int64_t* ext = ext_t.data_ptr<int64_t>();
  bool* prot = prot_t.data_ptr<bool>();
  bool* cand = cand_t.data_ptr<bool>();
  int32_t* age = age_t.data_ptr<int32_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool* a = alive.row(r);
      const int64_t* b = birth.row(r);
      int64_t* e = ext + r * W;
      const int64_t lo = sinks[r], hi = count[r] - recent[r];
      int64_t c = -1;
      for (int64_t j = 0; j < W; ++j) {
        c += a[j];
        e[j] = c;
        const bool p = a[j] && (c < lo || c >= hi);
        prot[r * W + j] = p;
        cand[r * W + j] = a[j] && !p;
        age[r * W + j] = static_cast<int32_t>(call[r] - b[j]);
        const int64_t g = std::min(std::max<int64_t>(c, 0), Wx - 1);
        for (size_t i = 0; i < in.size(); ++i) out[i].row(r)[j] = a[j] ? in[i].row(r)[g] : 0.0f;
      }
    }
  });
  std::vector<at::Tensor> res = {ext_t, prot_t, cand_t, age_t};
  res.insert(res.end(), outs.begin(), outs.end());
  return res;
}

// walk: the Nexus walk alone (walk.py), for tests and for callers that score elsewhere.
at::Tensor walk(const at::Tensor& d_t, const at::Tensor& alive_t, const at::Tensor& eidx_t, const at::Tensor& ew_t,
                double beta, int64_t iterations) {
  const int64_t R = d_t.size(0), W = d_t.size(1);
  const auto d = mat<float>(d_t, at::kFloat, "d", R, W);
  const auto alive = mat<bool>(alive_t, at::kBool, "alive", R, W);
  const int64_t F = eidx_t.size(2);
  const auto eidx = edges<int64_t>(eidx_t, at::kLong, "edge_idx", R, W, F);
  const auto ew = edges<float>(ew_t, at::kFloat, "edge_w", R, W, F);
  at::Tensor out_t = at::empty({R, W}, d_t.options());
  float* out = out_t.data_ptr<float>();
  bool ok = true;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(W + 1);
    bool local = true;
    for (int64_t r = r0; r < r1; ++r)
      local &= walk_row(d.row(r), alive.row(r), eidx.row(r), ew.row(r), W, F, static_cast<float>(beta), iterations,
                        out + r * W, acc.data());
    if (!local) ok = false;
  });
  TORCH_CHECK(ok, "walk: an edge points outside the row");
  return out_t;
}

// nexus_score: policies/nexus.py's nexus_scores, walk included, one row at a time. Writes the new
// memory (0 on dead columns) into ``memory`` (in place: it may be the pool's view) and returns the
// selection weight. ``prior`` is an undefined tensor when the direct mass is attention alone;
// ``react`` ([R] bool) says per row whether the last query's reaction enters the max.
at::Tensor nexus_score(const at::Tensor& attn_t, const at::Tensor& last_t, at::Tensor memory_t,
                       const at::Tensor& age_t, const at::Tensor& valid_t, const at::Tensor& cand_t,
                       const at::Tensor& ext_t, const at::Tensor& count_t, const at::Tensor& n_new_t,
                       const c10::optional<at::Tensor>& prior_opt, const at::Tensor& react_t,
                       const c10::optional<at::Tensor>& eidx_opt, const c10::optional<at::Tensor>& ew_opt,
                       const at::Tensor& denom_t, int64_t prior_kind, double mix, double sharpness, double gamma,
                       double beta, int64_t iterations, bool attn_mean) {
  const int64_t R = attn_t.size(0), W = attn_t.size(1);
  const auto attn = mat<float>(attn_t, at::kFloat, "attn", R, W);
  const auto last = mat<float>(last_t, at::kFloat, "last", R, W);
  const auto memory = mat<float>(memory_t, at::kFloat, "memory", R, W);
  const auto age = mat<int32_t>(age_t, at::kInt, "age", R, W);
  const auto valid = mat<bool>(valid_t, at::kBool, "valid", R, W);
  const auto cand = mat<bool>(cand_t, at::kBool, "cand", R, W);
  const auto ext = mat<int64_t>(ext_t, at::kLong, "ext", R, W);
  const int64_t* count = vec<int64_t>(count_t, at::kLong, "count", R);
  const int64_t* n_new = vec<int64_t>(n_new_t, at::kLong, "n_new", R);
  const bool* react = vec<bool>(react_t, at::kBool, "react", R);
  const bool has_prior = prior_opt.has_value() && prior_opt->defined();
  Mat<float> prior;
  if (has_prior) prior = mat<float>(*prior_opt, at::kFloat, "prior", R, W);
  const bool use_walk = eidx_opt.has_value() && eidx_opt->defined();
  Mat<int64_t> eidx;
  Mat<float> ew;
  int64_t F = 0;
  if (use_walk) {
    F = eidx_opt->size(2);
    eidx = edges<int64_t>(*eidx_opt, at::kLong, "edge_idx", R, W, F);
    ew = edges<float>(*ew_opt, at::kFloat, "edge_w", R, W, F);
  }
  TORCH_CHECK(denom_t.scalar_type() == at::kFloat && denom_t.dim() == 1 && denom_t.is_contiguous() &&
              denom_t.size(0) >= 2, "denom: contiguous float32 table expected");
  const float* denom = denom_t.data_ptr<float>();
  const int64_t L = denom_t.size(0);
  TORCH_CHECK(prior_kind >= 0 && prior_kind <= 2, "prior_kind must be 0, 1 or 2");
  const float g32 = static_cast<float>(gamma), one_minus_g = static_cast<float>(1.0 - gamma);
  const float sharp = static_cast<float>(sharpness), beta32 = static_cast<float>(beta);
  at::Tensor weight_t = at::empty({R, W}, attn_t.options());
  float* weight = weight_t.data_ptr<float>();
  bool ok = true;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> a(W), d(W), s(W), acc(W + 1), x(W), sq32(W);
    bool local = true;
    for (int64_t r = r0; r < r1; ++r) {
      const bool* v = valid.row(r);
      const bool* c = cand.row(r);
      const float* at_ = attn.row(r);
      // ScoreContext.observers(): queries of the call that could attend to each slot.
      if (attn_mean) {
        const int64_t* e = ext.row(r);
        for (int64_t j = 0; j < W; ++j) {
          const int64_t seen = std::max<int64_t>(std::min(count[r] - e[j], n_new[r]), 1);
          a[j] = at_[j] / static_cast<float>(seen);
        }
      } else {
        std::copy(at_, at_ + W, a.begin());
      }
      // personalisation(): the walk's direct mass.
      if (!has_prior) {
        normalize_row(a.data(), v, W, d.data());
      } else {
        const float* pr = prior.row(r);
        // base.py PRIOR_WEIGHTS
        if (prior_kind == 0) {
          for (int64_t j = 0; j < W; ++j) x[j] = (1.0f + pr[j]) * 0.5f;
        } else if (prior_kind == 1) {
          for (int64_t j = 0; j < W; ++j) x[j] = 1.0f / (1.0f + pr[j]);
        } else {
          std::copy(pr, pr + W, x.begin());
        }
        // standardize(): mean and std over the candidates in float64, applied in float32.
        int64_t nc = 0;
        for (int64_t j = 0; j < W; ++j) {
          nc += c[j];
          sq32[j] = x[j] * x[j];
        }
        const double n = static_cast<double>(std::max<int64_t>(nc, 1));
        const double mean = masked_sum(x.data(), c, W) / n;
        const double var = std::max(masked_sum(sq32.data(), c, W) / n - mean * mean, 0.0);
        const double sd = std::sqrt(var);
        const float inv = static_cast<float>(sd > 0.0 ? 1.0 / std::max(sd, 1e-300) : 0.0);
        const float mean32 = static_cast<float>(mean);
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < W; ++j) {
          x[j] = (x[j] - mean32) * inv;
          top = std::max(top, c[j] ? x[j] : -std::numeric_limits<float>::infinity());
        }
        top = std::max(top, -3e38f);
        // prior_mass(): exp(sharpness * min(z - top, 0)), exp in float64 rounded once 
        prior_mass_row(x.data(), top, sharp, W, x.data());
        const float sa = static_cast<float>(row_scale(1.0 - mix, masked_sum(a.data(), c, W)));
        const float sw = static_cast<float>(row_scale(mix, masked_sum(x.data(), c, W)));
        for (int64_t j = 0; j < W; ++j) d[j] = a[j] * sa + x[j] * sw;
      }
      const float* sp = d.data();
      if (use_walk) {
        local &= walk_row(d.data(), v, eidx.row(r), ew.row(r), W, F, beta32, iterations, s.data(), acc.data());
        sp = s.data();
      }
      // EMA, bias correction (denominator table shared with the reference), normalisations, max.
      float* m = memory.row(r);
      const int32_t* ag = age.row(r);
      for (int64_t j = 0; j < W; ++j) {
        const float mem = g32 * m[j] + one_minus_g * sp[j];
        m[j] = v[j] ? mem : 0.0f;
        const int64_t k = std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(ag[j]) + 1, 0), L - 1);
        x[j] = mem / denom[k];
      }
      float* out = weight + r * W;
      normalize_row(x.data(), c, W, out);  // remember
      if (react[r]) {
        normalize_row(last.row(r), c, W, a.data());
        for (int64_t j = 0; j < W; ++j) out[j] = std::max(out[j], a[j]);
      }
    }
    if (!local) ok = false;
  });
  TORCH_CHECK(ok, "nexus_score: an edge points outside the row");
  return weight_t;
}

// select_token: token-granularity selection (selection.py's select without blocks). ``weight`` may
// already be span-pooled (the candidate mask below is then idempotent). mode 0 = deterministic
// top-K keys, 1 = reservoir keys with noise from ``noise`` (fixed randomness) or hashed from
// (seed, group, pos, call) (per-call randomness). Evicts each row's ``need`` lowest-key candidates.
at::Tensor select_token(const at::Tensor& weight_t, const at::Tensor& cand_t, const at::Tensor& need_t, int64_t mode,
                        double tau, const c10::optional<at::Tensor>& noise_opt, const at::Tensor& pos_t,
                        const at::Tensor& seed_t, const at::Tensor& group_t, const at::Tensor& call_t) {
  const int64_t R = weight_t.size(0), W = weight_t.size(1);
  const auto weight = mat<float>(weight_t, at::kFloat, "weight", R, W);
  const auto cand = mat<bool>(cand_t, at::kBool, "cand", R, W);
  const auto pos = mat<int64_t>(pos_t, at::kLong, "pos", R, W);
  const int64_t* need = vec<int64_t>(need_t, at::kLong, "need", R);
  const int64_t* seed = vec<int64_t>(seed_t, at::kLong, "seed", R);
  const int64_t* group = vec<int64_t>(group_t, at::kLong, "group", R);
  const int64_t* call = vec<int64_t>(call_t, at::kLong, "call", R);
  const bool cached = noise_opt.has_value() && noise_opt->defined();
  Mat<double> noise;
  if (cached) noise = mat<double>(*noise_opt, at::kDouble, "noise", R, W);
  TORCH_CHECK(mode == 0 || mode == 1, "select_token: mode must be 0 (top-K) or 1 (reservoir)");
  at::Tensor evict_t = at::zeros({R, W}, cand_t.options());
  bool* evict = evict_t.data_ptr<bool>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<std::pair<int64_t, int64_t>> keys;
    std::vector<double> bounds(W);
    for (int64_t r = r0; r < r1; ++r) {
      if (need[r] <= 0) continue;
      const float* w = weight.row(r);
      const bool* c = cand.row(r);
      keys.clear();
      if (mode == 0 && need[r] == 1) {
        int64_t best_key = kInt64Max, best = -1;
        for (int64_t j = 0; j < W; ++j) {
          if (!c[j]) continue;
          const float wj = w[j] > 0.0f ? w[j] : 0.0f;
          int32_t bits;
          std::memcpy(&bits, &wj, sizeof bits);
          const int64_t kj = (static_cast<int64_t>(bits) << kSlotBits) | j;
          if (kj < best_key) best_key = kj, best = j;
        }
        if (best >= 0) evict[r * W + best] = true;
        continue;
      }
      if (mode == 0) {
        for (int64_t j = 0; j < W; ++j) {
          if (!c[j]) continue;
          const float wj = w[j] > 0.0f ? w[j] : 0.0f;
          int32_t bits;
          std::memcpy(&bits, &wj, sizeof bits);
          keys.emplace_back((static_cast<int64_t>(bits) << kSlotBits) | j, j);
        }
      } else {
        reservoir_keys(w, c, W, need[r], tau, cached ? noise.row(r) : nullptr, pos.row(r),
                       row_key(seed[r], group[r], call[r]), keys, bounds.data());
      }
      const int64_t k = std::min<int64_t>(need[r], static_cast<int64_t>(keys.size()));
      bool* ev = evict + r * W;
      if (k == static_cast<int64_t>(keys.size())) {
        for (const auto& kv : keys) ev[kv.second] = true;
        continue;
      }
      if (k == 1) {
        ev[std::min_element(keys.begin(), keys.end())->second] = true;
        continue;
      }
      std::nth_element(keys.begin(), keys.begin() + k, keys.end());
      for (int64_t i = 0; i < k; ++i) ev[keys[i].second] = true;
    }
  });
  return evict_t;
}

// finish: keep = alive & ~evict written into ``alive`` (in place: the pool's view, or the caller
// puts it back), the outputs in call-slot order [R, Wx], retained attention mass and live counts.
std::vector<at::Tensor> finish(at::Tensor alive_t, const at::Tensor& evict_t, const at::Tensor& ext_t,
                               const at::Tensor& pos_t, const at::Tensor& age_t, const at::Tensor& attn_t,
                               int64_t Wx) {
  const int64_t R = alive_t.size(0), W = evict_t.size(1);
  const auto alive = mat<bool>(alive_t, at::kBool, "alive", R, W);
  const auto evict = mat<bool>(evict_t, at::kBool, "evict", R, W);
  const auto ext = mat<int64_t>(ext_t, at::kLong, "ext", R, W);
  const auto pos = mat<int64_t>(pos_t, at::kLong, "pos", R, W);
  const auto age = mat<int32_t>(age_t, at::kInt, "age", R, W);
  const auto attn = mat<float>(attn_t, at::kFloat, "attn", R, W);
  auto opts = alive_t.options();
  at::Tensor keep_t = at::zeros({R, Wx}, opts.dtype(at::kBool));
  at::Tensor opos_t = at::full({R, Wx}, -1, opts.dtype(at::kLong));
  at::Tensor oage_t = at::zeros({R, Wx}, opts.dtype(at::kInt));
  at::Tensor mass_t = at::empty({R}, opts.dtype(at::kFloat));
  at::Tensor count_t = at::empty({R}, opts.dtype(at::kLong));
  bool* keep = keep_t.data_ptr<bool>();
  int64_t* opos = opos_t.data_ptr<int64_t>();
  int32_t* oage = oage_t.data_ptr<int32_t>();
  float* mass = mass_t.data_ptr<float>();
  int64_t* count = count_t.data_ptr<int64_t>();
  bool ok = true;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    bool local = true;
    for (int64_t r = r0; r < r1; ++r) {
      bool* a = alive.row(r);
      const bool* ev = evict.row(r);
      const int64_t* e = ext.row(r);
      const int64_t* p = pos.row(r);
      const int32_t* ag = age.row(r);
      const float* at_ = attn.row(r);
      const double total = masked_sum(at_, a, W);  // dead columns hold 0: the sum over all of them
      int64_t n = 0;
      for (int64_t j = 0; j < W; ++j) {
        if (!a[j]) continue;
        const bool gone = ev[j];
        const int64_t slot = e[j];
        if (slot < 0 || slot >= Wx) {
          local = false;
          continue;
        }
        keep[r * Wx + slot] = !gone;
        opos[r * Wx + slot] = p[j];
        if (gone) {
          oage[r * Wx + slot] = ag[j] + 1;
          a[j] = false;
        } else {
          ++n;
        }
      }
      const double kept = masked_sum(at_, a, W);  // ``a`` is the keep mask now
      mass[r] = total > 0.0 ? static_cast<float>(kept / std::max(total, 1e-300)) : 1.0f;
      count[r] = n;
    }
    if (!local) ok = false;
  });
  TORCH_CHECK(ok, "finish: a live column maps outside the call's slots");
  return {keep_t, opos_t, oage_t, mass_t, count_t};
}

// prior_mass: the prior mass's exp row by row, exp(min(z - top, 0) * sharpness) (its accuracy test).
at::Tensor prior_mass(const at::Tensor& z_t, double top, double sharpness) {
  const int64_t R = z_t.size(0), W = z_t.size(1);
  const auto z = mat<float>(z_t, at::kFloat, "z", R, W);
  at::Tensor out_t = at::empty({R, W}, z_t.options());
  for (int64_t r = 0; r < R; ++r)
    prior_mass_row(z.row(r), static_cast<float>(top), static_cast<float>(sharpness), W, out_t.data_ptr<float>() + r * W);
  return out_t;
}

// ---------------------------------------------------------------------------------------------------
// nexus_call: one whole engine call of a Nexus batch (token granularity, no span pooling) in one native
// entry, bound with the GIL released for its whole duration: the batch's inputs concatenated (or
// right-padded), step.py's validate_rows, its _insert, and step_fused.py's run_step_fused, as ATen
// ops and the kernels above. A Python driver of the same steps re-takes the GIL after every torch
// op; beside a busy Python thread (the server's event loop) each re-take can wait out the other
// thread's switch interval. The ops are the Python code's, in its order, so results are the same.
//
// ``pool``: the pool's pos, alive, birth, memory, gumbel, edge_idx, edge_w, used, count and the
// params budget, slack, sinks, recent, seed, group, call. ``first`` >= 0 when the batch's rows are
// contiguous (pool views, written in place), else -1 (``index`` gathers and scatters them). Per
// session: new positions [k], attn/last [g, w], edge_pos/edge_w [g, k, F], priors[p] [g, w].
// Returns {codes} when some row fails validation (nothing changed), else {codes, keep, slot_pos,
// evicted_age, retained_mass, count} in call-slot order.
static at::Tensor rows_get(const at::Tensor& x, const at::Tensor& index, int64_t first, int64_t width) {
  if (first >= 0) return x.narrow(0, first, index.size(0)).narrow(1, 0, width);
  return x.narrow(1, 0, width).index_select(0, index);
}

static void rows_put(const at::Tensor& x, const at::Tensor& index, int64_t first, const at::Tensor& value) {
  const int64_t w = value.size(1);
  if (first >= 0) {
    at::Tensor dst = x.narrow(0, first, index.size(0)).narrow(1, 0, w);
    if (dst.data_ptr() != value.data_ptr()) dst.copy_(value);
  } else {
    x.narrow(1, 0, w).index_copy_(0, index, value);
  }
}

std::vector<at::Tensor> nexus_call(
    const std::vector<at::Tensor>& pool, const at::Tensor& index, int64_t first,
    const std::vector<at::Tensor>& new_pos_in, const std::vector<at::Tensor>& attn_in,
    const std::vector<at::Tensor>& last_in, const std::vector<at::Tensor>& edge_pos_in,
    const std::vector<at::Tensor>& edge_w_in, const std::vector<std::vector<at::Tensor>>& priors_in,
    const std::vector<int64_t>& prior_codes, const std::vector<double>& prior_lo, const std::vector<double>& prior_hi,
    const std::vector<int64_t>& groups, const std::vector<int64_t>& widths, const std::vector<int64_t>& ks,
    int64_t used_max, int64_t width, int64_t read_prior, const at::Tensor& denom, int64_t prior_kind, double mix,
    double sharpness, double gamma, double beta, int64_t iterations, bool attn_mean, bool react, bool use_walk,
    bool token_fixed, int64_t mode, double tau, bool per_call) {
  TORCH_CHECK(pool.size() == 16, "nexus_call: 16 pool tensors expected");
  const at::Tensor &P_pos = pool[0], &P_alive = pool[1], &P_birth = pool[2], &P_memory = pool[3],
                   &P_gumbel = pool[4], &P_eidx = pool[5], &P_ew = pool[6], &P_used = pool[7], &P_count = pool[8];
  const at::Tensor &P_budget = pool[9], &P_slack = pool[10], &P_sinks = pool[11], &P_recent = pool[12],
                   &P_seed = pool[13], &P_group = pool[14], &P_call = pool[15];
  const size_t B = groups.size();
  TORCH_CHECK(B >= 1 && new_pos_in.size() == B && attn_in.size() == B && last_in.size() == B &&
              edge_pos_in.size() == B && edge_w_in.size() == B && widths.size() == B && ks.size() == B,
              "nexus_call: one entry per session in every input list");
  for (const auto& p : priors_in) TORCH_CHECK(p.size() == B, "nexus_call: one prior tensor per session");
  auto opts = P_pos.options();
  const auto f32 = opts.dtype(at::kFloat), i64 = opts.dtype(at::kLong);
  int64_t R = 0, Wx = 0, K = 0;
  bool same = true;
  for (size_t b = 0; b < B; ++b) {
    R += groups[b];
    Wx = std::max(Wx, widths[b]);
    K = std::max(K, ks[b]);
  }
  for (size_t b = 0; b < B; ++b) same &= widths[b] == Wx && ks[b] == K;
  const int64_t F = P_eidx.size(2);
  TORCH_CHECK(index.numel() == R, "nexus_call: index must hold one row per group");

  // Engine._run_batch: the batch's [R, ...] inputs.
  at::Tensor new_pos, attn, last, edge_pos, edge_w;
  std::vector<at::Tensor> priors;
  if (same) {  // the steady state of a decode loop: one concatenation per field
    std::vector<at::Tensor> np;
    for (size_t b = 0; b < B; ++b) np.push_back(new_pos_in[b].to(at::kLong).expand({groups[b], K}));
    new_pos = at::cat(np);
    attn = at::cat(attn_in).to(at::kFloat);
    last = at::cat(last_in).to(at::kFloat);
    edge_pos = at::cat(edge_pos_in).to(at::kLong);
    edge_w = at::cat(edge_w_in).to(at::kFloat);
    for (const auto& p : priors_in) priors.push_back(at::cat(p).to(at::kFloat));
  } else {
    attn = at::zeros({R, Wx}, f32);
    last = at::zeros({R, Wx}, f32);
    for (size_t i = 0; i < priors_in.size(); ++i) priors.push_back(at::zeros({R, Wx}, f32));
    new_pos = at::full({R, K}, -1, i64);
    edge_pos = at::full({R, K, F}, -1, i64);
    edge_w = at::zeros({R, K, F}, f32);
    int64_t r0 = 0;
    for (size_t b = 0; b < B; ++b) {
      const int64_t g = groups[b], w = widths[b], k = ks[b];
      attn.narrow(0, r0, g).narrow(1, 0, w).copy_(attn_in[b]);
      last.narrow(0, r0, g).narrow(1, 0, w).copy_(last_in[b]);
      new_pos.narrow(0, r0, g).narrow(1, 0, k).copy_(new_pos_in[b]);
      edge_pos.narrow(0, r0, g).narrow(1, 0, k).copy_(edge_pos_in[b]);
      edge_w.narrow(0, r0, g).narrow(1, 0, k).copy_(edge_w_in[b]);
      for (size_t i = 0; i < priors.size(); ++i) priors[i].narrow(0, r0, g).narrow(1, 0, w).copy_(priors_in[i][b]);
      r0 += g;
    }
  }
  std::vector<int64_t> nn;
  for (size_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < groups[b]; ++g) nn.push_back(ks[b]);
  at::Tensor n_new = at::tensor(nn, i64);

  // step.py validate_rows.
  at::Tensor code = value_codes(attn, last, priors, prior_codes, prior_lo, prior_hi);
  auto flag = [&code](const at::Tensor& cond, int64_t value) {
    code.copy_(at::where(code.eq(0).logical_and(cond), at::full_like(code, value), code));
  };
  at::Tensor ew = edge_w.reshape({R, -1});
  flag(ew.isfinite().logical_not().logical_or(ew.lt(0)).any(1), 5);
  at::Tensor live = at::arange(K, i64).lt(n_new.unsqueeze(1));
  at::Tensor used = P_used.index_select(0, index);
  const int64_t vwidth = std::max<int64_t>(used_max, 1);
  at::Tensor vpos = rows_get(P_pos, index, first, vwidth).contiguous();
  at::Tensor valive = rows_get(P_alive, index, first, vwidth);
  at::Tensor prev_max = at::where(used.gt(0), vpos.gather(1, (used - 1).clamp_min(0).unsqueeze(1)).squeeze(1), -1);
  at::Tensor first_ok = live.select(1, 0).logical_not().logical_or(new_pos.select(1, 0).gt(prev_max));
  at::Tensor steps_ok = live.narrow(1, 1, K - 1).logical_not()
                            .logical_or(new_pos.narrow(1, 1, K - 1).gt(new_pos.narrow(1, 0, K - 1))).all(1);
  flag(first_ok.logical_and(steps_ok).logical_not(), 7);
  at::Tensor tgt = edge_pos.reshape({R, -1}).contiguous();
  at::Tensor sidx = at::searchsorted(vpos, tgt).clamp_max(vwidth - 1);
  at::Tensor old_ok = vpos.gather(1, sidx).eq(tgt).logical_and(valive.gather(1, sidx));
  at::Tensor new_sorted = at::where(live, new_pos, kInt64Max).contiguous();
  at::Tensor new_idx = at::searchsorted(new_sorted, tgt).clamp_max(K - 1);
  at::Tensor new_ok = new_pos.gather(1, new_idx).eq(tgt);
  at::Tensor src = new_pos.unsqueeze(-1).expand_as(edge_pos).reshape({R, -1});
  at::Tensor ok = tgt.eq(-1).logical_or(old_ok.logical_or(new_ok).logical_and(tgt.ge(0)).logical_and(tgt.le(src)));
  ok = ok.logical_or(live.unsqueeze(-1).expand_as(edge_pos).reshape({R, -1}).logical_not());
  flag(ok.all(1).logical_not(), 6);
  if (code.any().item<bool>()) return {code};
  at::Tensor target_col = at::where(old_ok, sidx, used.unsqueeze(1) + new_idx).reshape(edge_pos.sizes());

  // step.py _insert.
  {
    at::Tensor col = used.unsqueeze(1) + at::arange(K, i64);
    at::Tensor r_idx = index.unsqueeze(1).expand({R, K}).index({live});
    at::Tensor c_idx = col.index({live});
    P_pos.index_put_({r_idx, c_idx}, new_pos.index({live}));
    P_alive.index_put_({r_idx, c_idx}, at::scalar_tensor(true, opts.dtype(at::kBool)));
    P_birth.index_put_({r_idx, c_idx}, P_call.index({r_idx}));
    P_memory.index_put_({r_idx, c_idx}, at::scalar_tensor(0.0, f32));
    if (token_fixed) {
      // hashing.uniforms at call 0 for every new position (bit-exact integer hash), then gumbel().
      at::Tensor seed = P_seed.index_select(0, index), group = P_group.index_select(0, index);
      at::Tensor unit = new_pos.clamp_min(0).contiguous();
      at::Tensor u = at::empty({R, K}, opts.dtype(at::kDouble));
      const int64_t* sd = seed.data_ptr<int64_t>();
      const int64_t* gr = group.data_ptr<int64_t>();
      const int64_t* un = unit.data_ptr<int64_t>();
      double* uu = u.data_ptr<double>();
      for (int64_t r = 0; r < R; ++r) {
        const uint64_t key = row_key(sd[r], gr[r], 0);
        for (int64_t j = 0; j < K; ++j) uu[r * K + j] = uniform(key, un[r * K + j]);
      }
      P_gumbel.index_put_({r_idx, c_idx}, at::log(at::log(u.index({live})).neg()).neg());
    }
    at::Tensor has = edge_pos.ge(0).logical_and(edge_w.gt(0));
    at::Tensor own = col.unsqueeze(-1).expand_as(target_col);
    P_eidx.index_put_({r_idx, c_idx}, at::where(has, target_col, own).index({live}));
    P_ew.index_put_({r_idx, c_idx}, at::where(has, edge_w, 0.0).index({live}));
    P_used.index_put_({index}, used + n_new);
    P_count.index_put_({index}, P_count.index({index}) + n_new);
  }

  // step_fused.py run_step_fused (Nexus scores, token selection).
  at::Tensor budget = P_budget.index_select(0, index), slack = P_slack.index_select(0, index);
  at::Tensor sinks = P_sinks.index_select(0, index), recent = P_recent.index_select(0, index);
  at::Tensor seed = P_seed.index_select(0, index), group = P_group.index_select(0, index);
  at::Tensor call = P_call.index_select(0, index);
  at::Tensor pos = rows_get(P_pos, index, first, width);
  at::Tensor alive = rows_get(P_alive, index, first, width);
  at::Tensor n = P_count.index({index});
  std::vector<at::Tensor> ins = {attn, last};
  if (read_prior >= 0) ins.push_back(priors.at(read_prior));
  std::vector<at::Tensor> lay = layout(alive, rows_get(P_birth, index, first, width), call, sinks, recent, n, ins, width);
  at::Tensor ext = lay[0], cand = lay[2], age = lay[3], attn_l = lay[4], last_l = lay[5];
  at::Tensor memory = rows_get(P_memory, index, first, width);
  c10::optional<at::Tensor> eidx, eww, prior;
  if (use_walk) {
    eidx = rows_get(P_eidx, index, first, width);
    eww = rows_get(P_ew, index, first, width);
  }
  if (read_prior >= 0 && mix > 0) prior = lay[6];
  at::Tensor react_t = at::full({R}, react, opts.dtype(at::kBool));
  at::Tensor weight = nexus_score(attn_l, last_l, memory, age, alive, cand, ext, n, n_new, prior, react_t, eidx, eww,
                                  denom, prior_kind, mix, sharpness, gamma, beta, iterations, attn_mean);
  rows_put(P_memory, index, first, memory);
  at::Tensor need = at::where(n.gt(budget + slack), n - budget, at::zeros_like(n));
  at::Tensor sel_call = per_call ? call : at::zeros_like(call);
  c10::optional<at::Tensor> noise;
  if (token_fixed && mode == 1) noise = rows_get(P_gumbel, index, first, width);
  at::Tensor evict = select_token(weight, cand, need, mode, mode == 1 ? tau : 0.0, noise, pos, seed, group, sel_call);
  std::vector<at::Tensor> fin = finish(alive, evict, ext, pos, age, attn_l, Wx);
  rows_put(P_alive, index, first, alive);
  P_count.index_put_({index}, fin[4]);
  P_call.index_put_({index}, call + 1);
  return {code, fin[0], fin[1], fin[2], fin[3], fin[4]};
}

using NoGil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU kernels of the Nexus sidecar engine (see engine/step_fused.py)";
  // Every kernel runs with the GIL released (arguments are converted before, results after): a
  // call never holds up the event loop, and nexus_call re-takes the GIL once per engine call.
  m.def("nexus_call", &nexus_call, "one whole Nexus engine call (inputs, validation, insert, scores, selection)",
        NoGil());
  m.def("value_codes", &value_codes, "validate_rows's value checks of attn, last and the priors, per row", NoGil());
  m.def("layout", &layout, "arena layout of a call: ext, protected, cand, age and the laid-out inputs", NoGil());
  m.def("walk", &walk, "the Nexus walk (walk.py) in one pass per iteration and row", NoGil());
  m.def("nexus_score", &nexus_score, "Nexus scores (policies/nexus.py), walk included; writes memory in place", NoGil());
  m.def("select_token", &select_token, "token-granularity eviction selection (selection.py)", NoGil());
  m.def("prior_mass", &prior_mass, "float32(exp(min(z - top, 0) * sharpness)) per slot, as policies/nexus.py", NoGil());
  m.def("finish", &finish, "keep mask in place, outputs in call-slot order, retained mass, counts", NoGil());
}
