// What the CPU this process runs on can do, for the kernels with hand-written x86 intrinsics
// (each such function carries its own target attribute and is called only after these checks).
#pragma once

namespace genfast {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GENFAST_X86_INTRINSICS 1
inline bool cpu_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
inline bool cpu_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}
#else
#define GENFAST_X86_INTRINSICS 0
inline bool cpu_avx2_fma() { return false; }
inline bool cpu_avx512() { return false; }
#endif

}  // namespace genfast
