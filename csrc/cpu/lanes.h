// Helpers for CPU loops that the compiler can vectorise: independent float lanes, flushed into
// double accumulators every block so long reductions keep better-than-fp32 accuracy.
#pragma once

#include <cstdint>

// The hot loops are compiled twice, for baseline x86-64 (SSE2) and for x86-64-v3 (AVX2, FMA, F16C),
// and the loader picks the best one for the running CPU (GCC function multiversioning): the wheel
// stays portable while bf16/fp16 conversions and the float lanes use 256-bit vectors where available.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CRAFT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CRAFT_CPU_CLONES
#endif

namespace craft::cpu {

constexpr int kLanes = 16;      // independent accumulators: no reassociation needed to vectorise
constexpr int64_t kFlush = 256; // elements summed in float before flushing to double

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// Fixed-size chunks make the reduction order independent of the thread count (determinism).
constexpr int64_t kChunk = int64_t{1} << 16;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

}  // namespace craft::cpu
