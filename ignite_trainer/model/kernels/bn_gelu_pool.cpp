// BatchNorm -> exact GELU -> max-pool in one pass over the feature map, forward and backward (CPU, float32).
//
// Why: in the default trunk these three element-wise steps cost more than the convolutions, because each one
// reads and writes the whole full-resolution map (and max-pool's backward first zero-fills it). Done
// separately that is about ten passes over the largest tensor per training step; here it is three (statistics,
// forward, and one dense write of the input gradient), and nothing but the conv output and a one-byte argmax
// per pooled value is kept for the backward.
//
// Layout: every tensor is a channels-last [N, C, H, W] map, i.e. [N][H][W][C] in memory, with C a multiple of 8
// so that one 8-lane vector holds 8 channels of one pixel. Pooling windows are (ph, pw) with stride equal to the
// window and ceil mode, so they tile the map exactly once (edge windows may be partial).
//
// Reductions (batch statistics, parameter gradients) are summed per sample in double and then over samples in
// order, so the result does not depend on the number of threads. The maths is the unfused one; only float
// rounding differs (GELU's erf by the same rational approximation PyTorch's vectorised CPU kernel uses).
#include "kernels.h"

namespace {

// exp(x) for x <= 0 (Cephes single-precision polynomial; relative error about 1e-7).
inline v8f exp_nonpositive(v8f x) {
  x = select(x < splat(-87.0f), splat(-87.0f), x);
  v8f fx = x * splat(1.44269504088896341f) + splat(0.5f);
  v8i n = __builtin_convertvector(fx, v8i);                       // truncation toward zero
  v8f nf = __builtin_convertvector(n, v8f);
  nf = select(nf > fx, nf - splat(1.0f), nf);                        // floor
  n = __builtin_convertvector(nf, v8i);
  x = x - nf * splat(0.693359375f) + nf * splat(2.12194440e-4f);
  v8f y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * x * x + x + splat(1.0f);
  v8i bits = (n + 127) << 23;
  v8f pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return y * pow2;
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Phi(z) = (1 + erf(z / sqrt 2)) / 2 and phi(z) = exp(-z^2 / 2) / sqrt(2 pi), sharing one exp.
// erf(x) = sign(x) (1 - t r(t) exp(-x^2)), t = 1 / (1 + p |x|): Abramowitz & Stegun 7.1.26.
inline void normal_cdf_pdf(v8f z, v8f& cdf, v8f& pdf) {
  v8f x = z * splat(kInvSqrt2);
  v8f ax = select(x < splat(0.0f), -x, x);
  v8f t = splat(1.0f) / (splat(1.0f) + splat(0.3275911f) * ax);
  v8f r = splat(1.061405429f);
  r = r * t + splat(-1.453152027f);
  r = r * t + splat(1.421413741f);
  r = r * t + splat(-0.284496736f);
  r = r * t + splat(0.254829592f);
  v8f e = exp_nonpositive(-(x * x));
  v8f erf_abs = splat(1.0f) - r * t * e;
  v8f erf = select(x < splat(0.0f), -erf_abs, erf_abs);
  cdf = splat(0.5f) * (splat(1.0f) + erf);
  pdf = e * splat(kInvSqrt2Pi);
}

inline v8f gelu(v8f z) {
  v8f cdf, pdf;
  normal_cdf_pdf(z, cdf, pdf);
  return z * cdf;
}

inline v8f gelu_grad(v8f z) {
  v8f cdf, pdf;
  normal_cdf_pdf(z, cdf, pdf);
  return cdf + z * pdf;
}

struct Map {
  int64_t n, h, w, c;
};

Map check_map(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be a 4-d [N, C, H, W] map");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name, " must be channels-last contiguous");
  TORCH_CHECK(t.size(1) % 8 == 0, name, " needs a multiple of 8 channels");
  return Map{t.size(0), t.size(2), t.size(3), t.size(1)};
}

torch::Tensor channels_last_empty(int64_t n, int64_t c, int64_t h, int64_t w, const torch::TensorOptions& opt) {
  return torch::empty({n, c, h, w}, opt.memory_format(at::MemoryFormat::ChannelsLast));
}

std::vector<float> as_floats(const torch::Tensor& t, int64_t c, const char* name) {
  TORCH_CHECK(t.numel() == c, name, " must have one value per channel");
  auto f = t.to(torch::kFloat32).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + c);
}

// Sum over samples of per-sample [rows, C] double partials, in sample order.
torch::Tensor sum_over_samples(const std::vector<double>& partial, int64_t n, int64_t rows, int64_t c) {
  auto out = torch::zeros({rows, c}, torch::kFloat64);
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < rows * c; ++k) o[k] += partial[i * rows * c + k];
  return out;
}

// Every pooling window of a map, rows of windows spread over threads: ``body(sample, h0, h1, w0, w1, o)`` with
// [h0, h1) x [w0, w1) the window clipped to the map (ceil mode) and o the offset of its pooled pixel.
template <class Body>
void for_each_window(const Map& m, int64_t ph, int64_t pw, Body&& body) {
  const int64_t hp = (m.h + ph - 1) / ph, wp = (m.w + pw - 1) / pw;
  at::parallel_for(0, m.n * hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row / hp, oh = row % hp;
      const int64_t h0 = oh * ph, h1 = std::min(h0 + ph, m.h);
      for (int64_t ow = 0; ow < wp; ++ow) {
        const int64_t w0 = ow * pw, w1 = std::min(w0 + pw, m.w);
        body(i, h0, h1, w0, w1, ((i * hp + oh) * wp + ow) * m.c);
      }
    }
  });
}

}  // namespace

// One sample's shifted sums for channel vectors [k0, k0 + KV): pixels outer, the KV vectors inner, so the
// accumulators stay in registers and each pixel's channels are read together.
template <int KV>
void sample_sums(const float* base, const Map& m, int64_t k0, double* out) {
  v8f shift[KV];
  for (int k = 0; k < KV; ++k) shift[k] = load(base + (k0 + k) * 8);
  for (int64_t r = 0; r < m.h; ++r) {
    v8f a1[KV], a2[KV];
    for (int k = 0; k < KV; ++k) a1[k] = a2[k] = splat(0.0f);
    const float* px = base + r * m.w * m.c + k0 * 8;
    for (int64_t col = 0; col < m.w; ++col, px += m.c)
      for (int k = 0; k < KV; ++k) {
        const v8f d = load(px + k * 8) - shift[k];
        a1[k] += d;
        a2[k] += d * d;
      }
    for (int k = 0; k < KV; ++k)
      for (int l = 0; l < 8; ++l) { out[m.c + (k0 + k) * 8 + l] += a1[k][l]; out[2 * m.c + (k0 + k) * 8 + l] += a2[k][l]; }
  }
  for (int k = 0; k < KV; ++k)
    for (int l = 0; l < 8; ++l) out[(k0 + k) * 8 + l] = shift[k][l];
}

// Per-channel mean and biased variance of a map: [2, C] float64. Each sample is summed around its channels'
// first value (so a large mean does not cancel the variance away), in float along a row and in double above.
torch::Tensor batch_stats(const torch::Tensor& y) {
  const Map m = check_map(y, "input");
  const float* py = y.data_ptr<float>();
  const int64_t c8 = m.c / 8;
  std::vector<double> partial(m.n * 3 * m.c, 0.0);  // per sample: shift, sum (y - shift), sum (y - shift)^2
  at::parallel_for(0, m.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* base = py + i * m.h * m.w * m.c;
      double* out = partial.data() + i * 3 * m.c;
      int64_t k = 0;
      for (; k + 4 <= c8; k += 4) sample_sums<4>(base, m, k, out);
      for (; k + 2 <= c8; k += 2) sample_sums<2>(base, m, k, out);
      for (; k < c8; ++k) sample_sums<1>(base, m, k, out);
    }
  });
  // Combine samples exactly as one shifted sum: per sample, move its sums from its own shift to sample 0's.
  const double count = static_cast<double>(m.h * m.w), total = count * m.n;
  auto stats = torch::empty({2, m.c}, torch::kFloat64);
  double* mean = stats.data_ptr<double>();
  double* var = mean + m.c;
  for (int64_t ch = 0; ch < m.c; ++ch) {
    const double ref = partial[ch];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t i = 0; i < m.n; ++i) {
      const double* p = partial.data() + i * 3 * m.c;
      const double delta = p[ch] - ref, a = p[m.c + ch], b = p[2 * m.c + ch];
      s1 += a + count * delta;                              // sum (y - ref)
      s2 += b + 2.0 * delta * a + count * delta * delta;   // sum (y - ref)^2
    }
    const double mu = s1 / total;
    mean[ch] = ref + mu;
    var[ch] = std::max(s2 / total - mu * mu, 0.0);
  }
  return stats;
}

// out = maxpool(gelu(y * scale + shift)) and, when wanted, the argmax's index inside its window (uint8).
std::vector<torch::Tensor> forward(const torch::Tensor& y, const torch::Tensor& scale_t, const torch::Tensor& shift_t,
                                   int64_t ph, int64_t pw, bool with_index) {
  const Map m = check_map(y, "input");
  TORCH_CHECK(ph >= 1 && pw >= 1 && ph * pw <= 255, "pooling window out of range");
  const int64_t hp = (m.h + ph - 1) / ph, wp = (m.w + pw - 1) / pw, c8 = m.c / 8;
  const auto scale = as_floats(scale_t, m.c, "scale"), shift = as_floats(shift_t, m.c, "shift");
  auto out = channels_last_empty(m.n, m.c, hp, wp, y.options());
  torch::Tensor index = with_index ? channels_last_empty(m.n, m.c, hp, wp, y.options().dtype(torch::kUInt8))
                                   : torch::Tensor();
  const float* py = y.data_ptr<float>();
  float* po = out.data_ptr<float>();
  uint8_t* pi = with_index ? index.data_ptr<uint8_t>() : nullptr;
  for_each_window(m, ph, pw, [&](int64_t i, int64_t h0, int64_t h1, int64_t w0, int64_t w1, int64_t o) {
    for (int64_t k = 0; k < c8; ++k) {
      const v8f sc = load(&scale[k * 8]), sh = load(&shift[k * 8]);
      // GELU falls on (-inf, z*] and rises on [z*, inf) (z* ~ -0.75, where it is about -0.17), so the
      // largest GELU of a window is at its largest or at its smallest z: two GELUs per window at most, and
      // one where the largest z is >= 0 (its GELU is then >= 0 > the GELU of any negative z).
      v8f zmax = splat(-INFINITY), zmin = splat(INFINITY);
      v8i max_at = v8i{0, 0, 0, 0, 0, 0, 0, 0};
      v8i min_at = max_at, nan_seen = max_at;
      int32_t pos = 0;
      for (int64_t hh = h0; hh < h1; ++hh) {
        const float* src = py + ((i * m.h + hh) * m.w + w0) * m.c + k * 8;
        for (int64_t ww = w0; ww < w1; ++ww, ++pos, src += m.c) {
          const v8f z = load(src) * sc + sh;
          const v8i is_nan = z != z;
          // the first maximum wins, and a NaN wins over everything (as torch's max-pool does)
          const v8i take = ((z > zmax) | is_nan) & ~nan_seen;
          nan_seen |= is_nan;
          zmax = select(take, z, zmax);
          max_at = take ? v8i{pos, pos, pos, pos, pos, pos, pos, pos} : max_at;
          const v8i low = z < zmin;
          zmin = select(low, z, zmin);
          min_at = low ? v8i{pos, pos, pos, pos, pos, pos, pos, pos} : min_at;
        }
      }
      v8f best = gelu(zmax);
      v8i best_at = max_at;
      const v8i negative = ~(zmax >= splat(0.0f)) & ~nan_seen;
      bool any_negative = false;
      for (int l = 0; l < 8; ++l) any_negative |= negative[l] != 0;
      if (any_negative) {
        const v8f g = gelu(zmin);
        // on equal GELUs the element seen first wins
        const v8i take = negative & ((g > best) | ((g == best) & (min_at < max_at)));
        best = select(take, g, best);
        best_at = take ? min_at : best_at;
      }
      store(po + o + k * 8, best);
      if (pi) store_index(pi + o + k * 8, best_at);
    }
  });
  return {out, index};
}

struct PooledGrad {
  Map m;
  int64_t ph, pw, hp, wp;
  const float* y;
  const float* grad_out;
  const uint8_t* index;
  float* dz;
  const float* scale;
  const float* shift;
};

// One sample's dz = grad_out * gelu'(z at the argmax) for channel vectors [k0, k0 + KV), and its sums.
template <int KV>
void pooled_sums(const PooledGrad& g, int64_t i, int64_t k0, double* out) {
  const Map& m = g.m;
  v8f sc[KV], sh[KV];
  for (int k = 0; k < KV; ++k) { sc[k] = load(g.scale + (k0 + k) * 8); sh[k] = load(g.shift + (k0 + k) * 8); }
  for (int64_t oh = 0; oh < g.hp; ++oh) {
    v8f a1[KV], a2[KV];
    for (int k = 0; k < KV; ++k) a1[k] = a2[k] = splat(0.0f);
    const int64_t h0 = oh * g.ph, h1 = std::min(h0 + g.ph, m.h);
    for (int64_t ow = 0; ow < g.wp; ++ow) {
      const int64_t w0 = ow * g.pw, w1 = std::min(w0 + g.pw, m.w);
      const int64_t o = ((i * g.hp + oh) * g.wp + ow) * m.c + k0 * 8;
      for (int k = 0; k < KV; ++k) {
        const v8i at = load_index(g.index + o + k * 8);
        v8f ysel = splat(0.0f);
        int32_t pos = 0;
        for (int64_t hh = h0; hh < h1; ++hh)
          for (int64_t ww = w0; ww < w1; ++ww, ++pos)
            ysel = select(at == pos, load(g.y + ((i * m.h + hh) * m.w + ww) * m.c + (k0 + k) * 8), ysel);
        const v8f d = load(g.grad_out + o + k * 8) * gelu_grad(ysel * sc[k] + sh[k]);
        store(g.dz + o + k * 8, d);
        a1[k] += d;
        a2[k] += d * ysel;
      }
    }
    for (int k = 0; k < KV; ++k)
      for (int l = 0; l < 8; ++l) { out[(k0 + k) * 8 + l] += a1[k][l]; out[m.c + (k0 + k) * 8 + l] += a2[k][l]; }
  }
}

// The gradient at the argmax of each window, dz = grad_out * gelu'(z), and per channel sum(dz), sum(dz * y):
// returns dz (pooled shape) and a [2, C] float64 tensor of the two sums.
std::vector<torch::Tensor> backward_pooled(const torch::Tensor& grad_out, const torch::Tensor& y,
                                           const torch::Tensor& index, const torch::Tensor& scale_t,
                                           const torch::Tensor& shift_t, int64_t ph, int64_t pw) {
  const Map m = check_map(y, "input");
  const Map g = check_map(grad_out, "grad_out");
  const int64_t hp = (m.h + ph - 1) / ph, wp = (m.w + pw - 1) / pw, c8 = m.c / 8;
  TORCH_CHECK(g.n == m.n && g.c == m.c && g.h == hp && g.w == wp, "grad_out has the wrong shape");
  TORCH_CHECK(index.is_contiguous(at::MemoryFormat::ChannelsLast) && index.scalar_type() == torch::kUInt8,
              "index must be the forward's");
  const auto scale = as_floats(scale_t, m.c, "scale"), shift = as_floats(shift_t, m.c, "shift");
  auto dz = channels_last_empty(m.n, m.c, hp, wp, y.options());
  const float* py = y.data_ptr<float>();
  const float* pg = grad_out.data_ptr<float>();
  const uint8_t* pi = index.data_ptr<uint8_t>();
  float* pd = dz.data_ptr<float>();
  std::vector<double> partial(m.n * 2 * m.c, 0.0);
  const PooledGrad ctx{m, ph, pw, hp, wp, py, pg, pi, pd, scale.data(), shift.data()};
  at::parallel_for(0, m.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double* out = partial.data() + i * 2 * m.c;
      int64_t k = 0;
      for (; k + 4 <= c8; k += 4) pooled_sums<4>(ctx, i, k, out);
      for (; k + 2 <= c8; k += 2) pooled_sums<2>(ctx, i, k, out);
      for (; k < c8; ++k) pooled_sums<1>(ctx, i, k, out);
    }
  });
  return {dz, sum_over_samples(partial, m.n, 2, m.c)};
}

// The input gradient, dense: dy = b * y + d everywhere, plus a * dz at each window's argmax.
torch::Tensor backward_input(const torch::Tensor& y, const torch::Tensor& dz, const torch::Tensor& index,
                             const torch::Tensor& a_t, const torch::Tensor& b_t, const torch::Tensor& d_t,
                             int64_t ph, int64_t pw) {
  const Map m = check_map(y, "input");
  check_map(dz, "dz");
  const int64_t hp = (m.h + ph - 1) / ph, wp = (m.w + pw - 1) / pw, c8 = m.c / 8;
  const auto a = as_floats(a_t, m.c, "a"), b = as_floats(b_t, m.c, "b"), d = as_floats(d_t, m.c, "d");
  auto dy = channels_last_empty(m.n, m.c, m.h, m.w, y.options());
  const float* py = y.data_ptr<float>();
  const float* pd = dz.data_ptr<float>();
  const uint8_t* pi = index.data_ptr<uint8_t>();
  float* px = dy.data_ptr<float>();
  for_each_window(m, ph, pw, [&](int64_t i, int64_t h0, int64_t h1, int64_t w0, int64_t w1, int64_t o) {
    for (int64_t k = 0; k < c8; ++k) {
      const v8f va = load(&a[k * 8]), vb = load(&b[k * 8]), vd = load(&d[k * 8]);
      const v8i at = load_index(pi + o + k * 8);
      const v8f routed = va * load(pd + o + k * 8);
      int32_t pos = 0;
      for (int64_t hh = h0; hh < h1; ++hh)
        for (int64_t ww = w0; ww < w1; ++ww, ++pos) {
          const int64_t e = ((i * m.h + hh) * m.w + ww) * m.c + k * 8;
          const v8f v = vb * load(py + e) + vd;
          store(px + e, select(at == pos, v + routed, v));
        }
    }
  });
  return dy;
}
