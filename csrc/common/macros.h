// Shared by the C++ CPU and CUDA kernels: the same inline math compiles for host and device.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GENFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GENFAST_HOST_DEVICE inline
#endif

// CPU: inner loops marked GENFAST_SIMD_CLONES are compiled three times, for AVX-512
// (x86-64-v4), AVX2 + FMA (x86-64-v3) and the baseline, and the loader picks the one this CPU
// runs (GCC function multi-versioning, an ifunc per function): torch's own CPU kernels
// dispatch on the same capabilities. Only these loop functions carry the attribute (the lambdas passed to
// at::parallel_for call them), so no inline ATen function is ever emitted for a wider ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GENFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GENFAST_SIMD_CLONES
#endif
// Per-row helpers, inlined into each multi-versioned caller (compiled for the caller's ISA).
#if defined(__GNUC__)
#define GENFAST_INLINE inline __attribute__((always_inline))
#else
#define GENFAST_INLINE inline
#endif

