// Helpers for CPU loops that the compiler can vectorise: independent float lanes, flushed into
// double accumulators every block so long reductions keep better-than-fp32 accuracy, and float16
// blocks converted to float in hardware.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

// The hot loops are compiled twice, for baseline x86-64 (SSE2) and for x86-64-v3 (AVX2, FMA, F16C),
// and the loader picks the best one for the running CPU (GCC function multiversioning): the wheel
// stays portable while bf16 conversions and the float lanes use 256-bit vectors where available.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CRAFT_X86_MULTIVERSION 1
#include <immintrin.h>
#define CRAFT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CRAFT_CPU_CLONES
#endif

namespace craft::cpu {

constexpr int kLanes = 16;       // independent accumulators: no reassociation needed to vectorise
constexpr int64_t kFlush = 256;  // elements summed in float before flushing to double; also the block
                                 // of float16 values converted at once (a few such blocks fit in L1)

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// Fixed-size chunks make the reduction order independent of the thread count (determinism).
constexpr int64_t kChunk = int64_t{1} << 16;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Elements below which the work stays on the calling thread: waking another one costs more than it
// saves (and far more on an oversubscribed machine, where an OpenMP barrier can wait a time slice).
constexpr int64_t kGrain = 2 * kChunk;

// float16 <-> float32 for a block of values. c10::Half converts in software, one value at a time, and
// the compiler does not vectorise it (about 10x a copy's time): on CPUs with F16C the conversion runs
// 8 values per instruction, rounding to nearest even like c10::Half. GCC picks the version at load time.
// The float16 kernels convert a block into a stack buffer and run the float32 kernel on it.
#ifdef CRAFT_X86_MULTIVERSION
__attribute__((target("default"), unused)) static void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
__attribute__((target("avx2,f16c"), unused)) static void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}
__attribute__((target("default"), unused)) static void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
__attribute__((target("avx2,f16c"), unused)) static void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = c10::Half(_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT), c10::Half::from_bits());
}
#else
[[maybe_unused]] static void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
[[maybe_unused]] static void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#endif

}  // namespace craft::cpu
