// softmax_colsum for one instruction set. Each csrc/cpu/softmax_colsum_<isa>.cpp defines
// RETAKE_ISA (the namespace: baseline, avx2, avx512, neon) and RETAKE_VEC_BYTES (16, 32 or 64),
// sets the compiler's target, then includes this file: the same source, one build per ISA.
//
//   acc[j] += exp(s[r,j] - m_r) / l_r   for every row r and j < visible[r],
//   m_r = max_{j < visible[r]} s[r,j],  l_r = sum_{j < visible[r]} exp(s[r,j] - m_r)
//
// s: fp32 [rows, ld] (logits, already scaled), overwritten with exp(s - m); acc: fp32, at least
// round_up(max visible, 16) long; ld >= that length too (a row's last vector is read whole). Entries past a row's visible count are
// never read as logits. A row with a NaN logit, a +inf maximum or no finite logit (its softmax
// is NaN) adds NaN to its visible keys only. Logits more than 87.3 below their row's maximum
// count as 87.3 below it (a term of ~1e-38 instead of less). GCC/Clang vector extensions, no intrinsics and no
// headers with inline code of their own: nothing compiled here for one ISA can be picked by the
// linker for another translation unit.
#include <cstddef>
#include <cstdint>

namespace retake {
namespace isa {
namespace RETAKE_ISA {
namespace {

constexpr int W = RETAKE_VEC_BYTES / 4;  // fp32 lanes
typedef float vf __attribute__((vector_size(RETAKE_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(RETAKE_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(RETAKE_VEC_BYTES)));
constexpr int kGroup = 4;  // rows summed into acc per pass over it

inline vf splat(float x) {
  vf v;
  for (int i = 0; i < W; ++i) v[i] = x;
  return v;
}
inline vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }

// max(a, b) as one instruction (maxps takes b when either is NaN): a NaN in b passes through.
inline vf max_keep_nan(vf a, vf b) { return a > b ? a : b; }

// e^x for x <= 0 or NaN (x = s - max): e^r on r = x - n ln2 (|r| <= ln2 / 2) by a degree-5
// polynomial (relative error 1.1e-7, about one fp32 ulp: coefficients fitted for minimal
// relative error), times 2^n written into the exponent bits. x is first raised to -87.3, where
// 2^n would leave the normal range: e^x below it reads as e^-87.3 ~ 1e-38, nothing a sum of
// softmax terms can see. NaN stays NaN.
inline vf exp_nonpositive(vf x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = max_keep_nan(splat(-87.3f), x);
  const vf t = x * splat(1.44269504088896341f) + splat(magic);
  const vf n = t - splat(magic);
  const vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);  // ln2 in two parts
  vf p = splat(8.312525227665901e-3f);
  p = p * r + splat(4.1890114545822144e-2f);
  p = p * r + splat(1.6667114198207855e-1f);
  p = p * r + splat(4.99992311000824e-1f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  // t's bits are the magic's plus n: n + 127 shifted into the exponent field is the float 2^n.
  // Unsigned: lanes that are masked off later (NaN, padding) may shift bits out, which is
  // undefined for signed lanes before C++20.
  const vu two_n = ((vu)t + (127u - 0x4B400000u)) << 23;
  return p * (vf)two_n;
}

// Lanes [0, n) of v, the others `pad`: rows are padded to whole vectors, so the last partial
// vector of a row is loaded whole and its lanes past the row's end masked.
inline vf keep_lanes(vf v, int64_t n, float pad) {
  vi lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  return lane < static_cast<int32_t>(n) ? v : splat(pad);
}

// max over s[0, n); NaN logits are skipped here and caught by the row sum (exp_row).
inline float row_max(const float* s, int64_t n) {
  const float neg_inf = -__builtin_inff();
  vf m = splat(neg_inf);
  int64_t j = 0;
  for (; j + W <= n; j += W) m = max_keep_nan(m, load(s + j));
  if (j < n) m = max_keep_nan(m, keep_lanes(load(s + j), n - j, neg_inf));
  float best = m[0];
  for (int i = 1; i < W; ++i) best = m[i] > best ? m[i] : best;
  return best;
}

// s[0, n) = exp(s - m) in place, returning their sum.
inline float exp_row(float* s, int64_t n, float m) {
  const vf vm = splat(m);
  vf sum = splat(0.0f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf e = exp_nonpositive(load(s + j) - vm);
    store(s + j, e);
    sum += e;
  }
  if (j < n) {
    const vf e = keep_lanes(exp_nonpositive(load(s + j) - vm), n - j, 0.0f);
    store(s + j, e);
    sum += e;
  }
  float total = 0.0f;
  for (int i = 0; i < W; ++i) total += sum[i];
  return total;
}

// acc[0, len) += sum over the group's rows of w[r] * e[r][0, len), len a multiple of W.
inline void add_rows(float* acc, float* const* e, const float* w, int rows, int64_t len) {
  vf wv[kGroup];
  for (int r = 0; r < rows; ++r) wv[r] = splat(w[r]);
  for (int64_t j = 0; j < len; j += W) {
    vf a = load(acc + j);
    for (int r = 0; r < rows; ++r) a += wv[r] * load(e[r] + j);
    store(acc + j, a);
  }
}

}  // namespace

void softmax_colsum(float* s, int64_t rows, int64_t ld, const int64_t* visible, float* acc) {
  float* e[kGroup];
  float w[kGroup];
  int64_t n[kGroup];
  int ready = 0;
  auto flush = [&] {
    int64_t len = 0;
    for (int r = 0; r < ready; ++r) len = n[r] > len ? n[r] : len;
    len = round_up(len);
    for (int r = 0; r < ready; ++r)  // a shorter row's tail (hidden keys, padding) adds nothing
      for (int64_t j = n[r]; j < len; ++j) e[r][j] = 0.0f;
    add_rows(acc, e, w, ready, len);
    ready = 0;
  };
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    const int64_t count = visible[r];
    if (count <= 0) continue;
    const float l = exp_row(row, count, row_max(row, count));
    // l >= 1 (the maximum's own term) unless the softmax is NaN: a NaN logit, a +inf maximum
    // (inf - inf) or no finite logit (-inf - -inf) each make a NaN term.
    if (!(l < __builtin_inff())) {
      for (int64_t j = 0; j < count; ++j) acc[j] += __builtin_nanf("");
      continue;
    }
    e[ready] = row;
    w[ready] = 1.0f / l;
    n[ready] = count;
    if (++ready == kGroup) flush();
  }
  if (ready) flush();
}

}  // namespace RETAKE_ISA
}  // namespace isa
}  // namespace retake
