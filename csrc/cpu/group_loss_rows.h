// Row loops of the CPU group loss (csrc/cpu/group_loss.cpp), 8 float lanes at a time.
// No include guard on purpose: group_loss.cpp includes this file twice, inside namespace
// `base` (baseline ISA, GCC vector extensions) and inside namespace `avx2` under
// `#pragma GCC target("avx2,fma")` with FASTDG_GL_FMA=1, where exp uses FMA intrinsics.

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
constexpr int kW = 8;

FASTDG_GL_INLINE v8 splat(float v) { return v8{v, v, v, v, v, v, v, v}; }

FASTDG_GL_INLINE v8 loadu(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FASTDG_GL_INLINE void storeu(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0 (softmax arguments: z - max, z - lse), 8 lanes. x = n ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite split of ln2), exp(r) by its degree-7 Taylor polynomial (truncation
// < 1e-8 relative), 2^n from the exponent bits. Below -86 the result is 0 (a term under 5e-38
// cannot change a softmax sum). The clamp is -86, not ln(FLT_MIN): clamped lanes are still
// computed before they are zeroed, and near ln(FLT_MIN) the product p * 2^n is subnormal, which
// costs a microcode assist (~100 cycles) on every masked or padded lane (-inf logits, row tails).
// NaN stays NaN, since every clamp is a select that a NaN fails; x > 0 is clamped to 0 (callers
// never pass it).
#if FASTDG_GL_FMA
FASTDG_GL_INLINE v8 exp_neg(v8 xv) {
  // The same steps as below, with fused multiply-adds. max/min return their second operand
  // when one is NaN, so the operand order keeps NaN as NaN.
  const __m256 lo = _mm256_set1_ps(-86.0f);
  __m256 x = (__m256)xv;
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_setzero_ps(), _mm256_max_ps(lo, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return (v8)_mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}
#else
FASTDG_GL_INLINE v8 exp_neg(v8 x) {
  const v8 lo = splat(-86.0f);
  x = x > splat(0.0f) ? splat(0.0f) : x;
  const v8 under = x < lo ? splat(1.0f) : splat(0.0f);
  x = x < lo ? lo : x;
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8 n = (x * splat(1.44269504089f) + magic) - magic;
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const v8 out = p * scale;
  return under > splat(0.5f) ? splat(0.0f) : out;
}
#endif

FASTDG_GL_INLINE float hsum(v8 v) {  // fixed pairwise order
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

FASTDG_GL_INLINE float hmax(v8 v) {
  float m = v[0];
  for (int j = 1; j < kW; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// The last n = K % 8 values of a row in one vector, the other lanes `fill` (-inf: no max, and an
// exp of 0; 0: no sum): one vector step instead of a scalar loop with a full exp per element.
// `overread`: the 8 floats from p may be read (rows are contiguous: the lanes past this row's end
// belong to the next row, or to a padded buffer), so one load and a select; else lane by lane.
// (AVX2 masked loads were tried: ~100 cycles a row on this EPYC.) Stores never go past the row:
// the next row may be another thread's.
FASTDG_GL_INLINE v8 load_tail(const float* p, int64_t n, float fill, bool overread) {
  if (overread) {
    const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return lane < static_cast<int32_t>(n) ? loadu(p) : splat(fill);
  }
  v8 v = splat(fill);
  for (int64_t j = 0; j < n; ++j) v[j] = p[j];
  return v;
}

FASTDG_GL_INLINE void store_tail(float* p, v8 v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = v[j];
}

// log(x) for 8 lanes of x >= FLT_MIN (row sums of exp: >= 1), NaN stays NaN: x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172, by its odd series
// to t^9 (truncation < 1e-9 relative). One vector step for 8 rows: std::log per row cost more than
// the row's exps at DomainBed's 65 classes.
FASTDG_GL_INLINE v8 log_pos(v8 x) {
  vi8 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  vi8 e = ((bits >> 23) & 0xff) - 127;
  const vi8 mbits = (bits & 0x7fffff) | 0x3f800000;
  v8 m;
  std::memcpy(&m, &mbits, sizeof(m));
  const vi8 big = m > splat(1.41421356f);  // lanes of -1 where m is past sqrt(2)
  m = big ? m * splat(0.5f) : m;
  e = e - big;
  const v8 t = (m - splat(1.0f)) / (m + splat(1.0f));
  const v8 t2 = t * t;
  v8 poly = splat(1.0f / 9);
  poly = poly * t2 + splat(1.0f / 7);
  poly = poly * t2 + splat(1.0f / 5);
  poly = poly * t2 + splat(1.0f / 3);
  poly = poly * t2 + splat(1.0f);
  const v8 ef = __builtin_convertvector(e, v8);
  const v8 out = ef * splat(0.693145751953125f) + (ef * splat(1.4286068203094173e-6f) + splat(2.0f) * t * poly);
  return x == x ? out : x;
}

// lse[i] = m[i] + log(s[i]) for n rows.
FASTDG_GL_INLINE void log_rows_impl(const float* m, const float* s, int64_t n, float* lse) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) storeu(lse + i, loadu(m + i) + log_pos(loadu(s + i)));
  if (i < n)
    store_tail(lse + i, load_tail(m + i, n - i, 0.0f, false) + log_pos(load_tail(s + i, n - i, 1.0f, false)), n - i);
}

// max_k z and sum_k z of one row.
FASTDG_GL_INLINE void row_max_sum(const float* z, int64_t K, float* m_out, float* zsum_out, bool overread) {
  const float ninf = -std::numeric_limits<float>::infinity();
  v8 vm = splat(ninf), vs = splat(0.0f);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    const v8 v = loadu(z + k);
    vm = v > vm ? v : vm;
    vs += v;
  }
  if (k < K) {
    const v8 v = load_tail(z + k, K - k, ninf, overread);
    vm = v > vm ? v : vm;
    vs += load_tail(z + k, K - k, 0.0f, overread);
  }
  *m_out = hmax(vm);
  *zsum_out = hsum(vs);
}

// max_k z, sum_k z, sum_k exp(z - max) of one row.
FASTDG_GL_INLINE void row_stats_impl(const float* z, int64_t K, float* m_out, float* zsum_out, float* s_out,
                                     bool overread) {
  float m;
  row_max_sum(z, K, &m, zsum_out, overread);
  v8 ve = splat(0.0f);
  const v8 vmax = splat(m);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) ve += exp_neg(loadu(z + k) - vmax);
  if (k < K) ve += exp_neg(load_tail(z + k, K - k, -std::numeric_limits<float>::infinity(), overread) - vmax);
  *m_out = m;
  *s_out = hsum(ve);
}

// out_k = scale * (exp(z_k - lse) - off) for every k (the caller fixes the target column).
FASTDG_GL_INLINE void row_grad_impl(const float* z, int64_t K, float lse, float scale, float off, float* out,
                                    bool overread) {
  const v8 vl = splat(lse), vs = splat(scale), vo = splat(off);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) storeu(out + k, vs * (exp_neg(loadu(z + k) - vl) - vo));
  if (k < K) store_tail(out + k, vs * (exp_neg(load_tail(z + k, K - k, 0.0f, overread) - vl) - vo), K - k);
}

// As row_stats_impl, and also writes the row's softmax p_k = exp(z_k - m) / s to `p` (the forward
// saves it so that the backward is a streaming pass with no second exp).
FASTDG_GL_INLINE void row_probs_impl(const float* z, int64_t K, float* m_out, float* zsum_out, float* s_out,
                                     float* p, bool overread) {
  float m;
  row_max_sum(z, K, &m, zsum_out, overread);
  v8 ve = splat(0.0f);
  const v8 vmax = splat(m);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    const v8 e = exp_neg(loadu(z + k) - vmax);
    storeu(p + k, e);
    ve += e;
  }
  if (k < K) {
    const v8 e = exp_neg(load_tail(z + k, K - k, -std::numeric_limits<float>::infinity(), overread) - vmax);
    store_tail(p + k, e, K - k);
    ve += e;
  }
  const float se = hsum(ve);
  const v8 inv = splat(1.0f / se);  // the row is still in L1: normalising costs a pass over it
  for (k = 0; k + kW <= K; k += kW) storeu(p + k, loadu(p + k) * inv);
  for (; k < K; ++k) p[k] *= inv[0];
  *m_out = m;
  *s_out = se;
}

// out_k = scale * (p_k - off) for every k (the caller fixes the target column).
FASTDG_GL_INLINE void row_probs_grad_impl(const float* p, int64_t K, float scale, float off, float* out) {
  const v8 vs = splat(scale), vo = splat(off);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) storeu(out + k, vs * (loadu(p + k) - vo));
  for (; k < K; ++k) out[k] = scale * (p[k] - off);
}

// Out-of-line entry points (RowLoops takes their addresses).
void row_stats(const float* z, int64_t K, float* m, float* zs, float* s, bool overread) {
  row_stats_impl(z, K, m, zs, s, overread);
}
void row_grad(const float* z, int64_t K, float l, float sc, float off, float* out, bool overread) {
  row_grad_impl(z, K, l, sc, off, out, overread);
}
void row_probs(const float* z, int64_t K, float* m, float* zs, float* s, float* p, bool overread) {
  row_probs_impl(z, K, m, zs, s, p, overread);
}
void row_probs_grad(const float* p, int64_t K, float sc, float off, float* out) {
  row_probs_grad_impl(p, K, sc, off, out);
}
void log_rows(const float* m, const float* s, int64_t n, float* lse) { log_rows_impl(m, s, n, lse); }
