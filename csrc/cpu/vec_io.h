// Vector loads and stores in the accumulation type. float/double load one
// at::vec::Vectorized<acc_t> per step; bfloat16/float16 load one
// Vectorized<T> and widen it to two Vectorized<float> in registers, so the
// half types never round-trip through memory as float.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// Loads and stores sit inside every step; at the AVX-512 width GCC kept
// some out of line, passing the vectors through memory.
#define BNEXT_IO __attribute__((always_inline)) static inline

namespace bnext::cpu {

using at::vec::Vectorized;

// Fetches the line `ahead` elements past p into L2. The address is formed
// as an integer: past a tensor's last block it lies beyond the allocation,
// where pointer arithmetic would be undefined; a prefetch of it never
// faults, and its line is never read.
template <typename T>
__attribute__((always_inline)) inline void prefetch_l2(const T* p, int64_t ahead) {
  const uintptr_t at =
      reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead) * sizeof(T);
  __builtin_prefetch(reinterpret_cast<const void*>(at), 0, 2);
}

// One full vector to p. With `stream`, and p aligned to the vector width, a
// non-temporal store: outputs larger than the last-level cache would be
// evicted before anyone reads them, and a normal store first reads each
// line from memory (write-allocate), a third stream beside the load and
// the write-back.
template <typename T>
__attribute__((always_inline)) inline void store_vec(T* p, const Vectorized<T>& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr uintptr_t kAlign = sizeof(Vectorized<T>) - 1;
  if (stream && (reinterpret_cast<uintptr_t>(p) & kAlign) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, v);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(p, v);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
    }
#else
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, v);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, v);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
    }
#endif
    return;
  }
#endif
  v.store(p);
}

// Whether a partial vector is loaded and stored with AVX-512 masks
// (Vectorized::loadu(p, n) / store(p, n) are vmovups/vmovdqu16 with a k
// mask there). Elsewhere the partial store is AVX2's vmaskmovps,
// microcoded and slow on AMD Zen, or scalar, so it goes through a buffer
// and the planar walks end a run with an overlapping full step instead
// (plane_steps).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kMaskedPartialSteps = true;
#else
constexpr bool kMaskedPartialSteps = false;
#endif

// The first n (< size) lanes of v to p.
template <typename T>
__attribute__((always_inline)) inline void store_first(T* p, const Vectorized<T>& v, int64_t n) {
  if constexpr (kMaskedPartialSteps) {
    v.store(p, n);
  } else {
    alignas(64) T buf[Vectorized<T>::size()];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }
}

// Orders a thread's streaming stores before whatever follows (they are
// weakly ordered; the end of a parallel region must publish them).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename scalar_t>
struct VecIO {
  using scalar_type = scalar_t;
  using acc_t = scalar_t;
  using V = Vectorized<acc_t>;
  static constexpr int kParts = 1;                 // acc vectors per step
  static constexpr int64_t kStep = V::size();      // elements per step
  BNEXT_IO void load(const scalar_t* p, V* out) { out[0] = V::loadu(p); }
  BNEXT_IO void store(scalar_t* p, const V* in) { in[0].store(p); }
  // First n (<= kStep) elements; the other lanes load as zero.
  BNEXT_IO void load_n(const scalar_t* p, V* out, int64_t n) {
    out[0] = n == kStep ? V::loadu(p) : V::loadu(p, n);
  }
  BNEXT_IO void store_n(scalar_t* p, const V* in, int64_t n, bool stream = false) {
    if (n == kStep) {
      store_vec(p, in[0], stream);
    } else {
      store_first(p, in[0], n);
    }
  }
};

// Two float vectors rounded (to nearest even) into one half vector. With
// AVX512_BF16 (setup.py), bfloat16 takes vcvtne2ps2bf16: one instruction
// for 32 lanes where torch's emulation takes 14. That instruction treats subnormal inputs as zero (DAZ and
// FTZ, whatever MXCSR says), so a vector holding any float32 subnormal
// takes torch's exact path instead: results stay bitwise those of
// torch's conversion for every finite and infinite input. NaN stays NaN
// (the instruction keeps the sign and payload, torch writes 0xffff).
template <typename scalar_t>
BNEXT_IO Vectorized<scalar_t> round_from_float(const Vectorized<float>& lo, const Vectorized<float>& hi) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    constexpr int kSubnormal = 0x20;  // VFPCLASSPS category bit
    const __mmask16 sub = _mm512_fpclass_ps_mask(lo, kSubnormal) |
        _mm512_fpclass_ps_mask(hi, kSubnormal);
    if (__builtin_expect(sub == 0, 1)) {
      return Vectorized<scalar_t>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
#endif
  return at::vec::convert_from_float<scalar_t>(lo, hi);
}

template <typename scalar_t>
struct VecIOHalf {
  using scalar_type = scalar_t;
  using acc_t = float;
  using V = Vectorized<float>;
  static constexpr int kParts = 2;
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();
  static_assert(kStep == 2 * V::size(), "half vectors widen to two float vectors");
  BNEXT_IO void load(const scalar_t* p, V* out) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    out[0] = lo;
    out[1] = hi;
  }
  BNEXT_IO void store(scalar_t* p, const V* in) {
    round_from_float<scalar_t>(in[0], in[1]).store(p);
  }
  BNEXT_IO void load_n(const scalar_t* p, V* out, int64_t n) {
    const auto h = n == kStep ? Vectorized<scalar_t>::loadu(p)
                              : Vectorized<scalar_t>::loadu(p, n);
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(h);
    out[0] = lo;
    out[1] = hi;
  }
  BNEXT_IO void store_n(scalar_t* p, const V* in, int64_t n, bool stream = false) {
    const Vectorized<scalar_t> h = round_from_float<scalar_t>(in[0], in[1]);
    if (n == kStep) {
      store_vec(p, h, stream);
    } else {
      store_first(p, h, n);
    }
  }
};

template <>
struct VecIO<c10::BFloat16> : VecIOHalf<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : VecIOHalf<c10::Half> {};

// v with lanes [0, z) set to zero (0 <= z <= size): the last step of a
// planar run is loaded whole, ending at the run's end, and the lanes an
// earlier step already counted are dropped. Cheaper than a partial load
// (AVX2's goes through memory) or a scalar tail (17 bfloat16 elements of
// every 7x7 plane at the AVX-512 width).
inline Vectorized<float> zero_lanes_below(const Vectorized<float>& v, int64_t z) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(0xffffu << z), v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keep = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(static_cast<int>(z) - 1));
  return _mm256_and_ps(v, _mm256_castsi256_ps(keep));
#else
  return Vectorized<float>::set(v, Vectorized<float>(0.f), z);
#endif
}

inline Vectorized<double> zero_lanes_below(const Vectorized<double>& v, int64_t z) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_maskz_mov_pd(static_cast<__mmask8>(0xffu << z), v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i keep = _mm256_cmpgt_epi64(lane, _mm256_set1_epi64x(z - 1));
  return _mm256_and_pd(v, _mm256_castsi256_pd(keep));
#else
  return Vectorized<double>::set(v, Vectorized<double>(0.0), z);
#endif
}

// The same over a step's P acc vectors (lanes in order across them).
template <int P, typename V>
inline void zero_step_lanes_below(V* v, int64_t z) {
  constexpr int64_t W = V::size();
#pragma GCC unroll 4
  for (int j = 0; j < P; ++j) {
    v[j] = zero_lanes_below(v[j], std::clamp<int64_t>(z - j * W, 0, W));
  }
}

// Horizontal sum as a shuffle tree: a store and a serial chain of scalar
// adds sat on the critical path of every 7x7 plane's statistics.
inline float hsum(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  return at::vec::vec_reduce_all<float>(
      [](const Vectorized<float>& a, const Vectorized<float>& b) { return a + b; }, v);
#endif
}

inline double hsum(const Vectorized<double>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_pd(v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256d x = v;
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
#else
  return at::vec::vec_reduce_all<double>(
      [](const Vectorized<double>& a, const Vectorized<double>& b) { return a + b; }, v);
#endif
}

}  // namespace bnext::cpu

namespace bnext::cpu {

// Widens one accumulation vector to double vectors (2 for float, 1 for
// double), for sums that must not lose precision.
template <typename acc_t>
struct ToDouble {
  static constexpr int kParts = std::is_same_v<acc_t, double> ? 1 : 2;
  static void apply(const Vectorized<acc_t>& v, Vectorized<double>* out) {
    if constexpr (std::is_same_v<acc_t, double>) {
      out[0] = v;
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      const __m512 f = v;
      out[0] = Vectorized<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(f)));
      out[1] = Vectorized<double>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
      const __m256 f = v;
      out[0] = Vectorized<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(f)));
      out[1] = Vectorized<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
#else
      static_assert(Vectorized<float>::size() == 2 * Vectorized<double>::size());
      alignas(64) float fb[Vectorized<float>::size()];
      alignas(64) double db[Vectorized<float>::size()];
      v.store(fb);
      for (int64_t i = 0; i < Vectorized<float>::size(); ++i) db[i] = fb[i];
      out[0] = Vectorized<double>::loadu(db);
      out[1] = Vectorized<double>::loadu(db + Vectorized<double>::size());
#endif
    }
  }
};

}  // namespace bnext::cpu

namespace bnext::cpu {

// Narrows two double vectors (lanes in order) to one float vector.
inline Vectorized<float> to_float(const Vectorized<double>& lo, const Vectorized<double>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vectorized<float>(_mm512_insertf32x8(
      _mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vectorized<float>(_mm256_insertf128_ps(
      _mm256_castps128_ps256(_mm256_cvtpd_ps(lo)), _mm256_cvtpd_ps(hi), 1));
#else
  alignas(64) double db[Vectorized<float>::size()];
  alignas(64) float fb[Vectorized<float>::size()];
  lo.store(db);
  hi.store(db + Vectorized<double>::size());
  for (int64_t i = 0; i < Vectorized<float>::size(); ++i) fb[i] = static_cast<float>(db[i]);
  return Vectorized<float>::loadu(fb);
#endif
}

// ps[c + k] += sg[k] and pst[c + k] += sgt[k] over one acc vector's lanes,
// widened to double: how the channels-inner walks (backward sums,
// statistics) move their float sums into a thread's double partials.
template <typename acc_t>
__attribute__((always_inline)) inline void add_widened(
    double* ps, double* pst, int64_t c, const Vectorized<acc_t>& sg,
    const Vectorized<acc_t>& sgt) {
  using D = Vectorized<double>;
  using Widen = ToDouble<acc_t>;
  D a[Widen::kParts], b[Widen::kParts];
  Widen::apply(sg, a);
  Widen::apply(sgt, b);
#pragma GCC unroll 4
  for (int q = 0; q < Widen::kParts; ++q) {
    double* pa = ps + c + q * D::size();
    double* pb = pst + c + q * D::size();
    (D::loadu(pa) + a[q]).store(pa);
    (D::loadu(pb) + b[q]).store(pb);
  }
}

}  // namespace bnext::cpu
