// A process-wide "auto" / "always" / "never" choice of one of genfast's own CPU products
// (set_cpu_winograd, set_cpu_tap_gemm, set_cpu_linear_gemm).
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <string>

namespace genfast {

class KernelMode {
 public:
  static constexpr int kAuto = 0, kAlways = 1, kNever = 2;

  int get() const { return mode_.load(std::memory_order_relaxed); }

  // mode: "auto", "always" or "never"; anything else raises ValueError naming `setter` (the
  // Python-facing function) and leaves the mode as it was
  void set(const char* setter, const std::string& mode) {
    TORCH_CHECK_VALUE(mode == "auto" || mode == "always" || mode == "never", setter,
                      ": mode must be 'auto', 'always' or 'never', got '", mode, "'");
    mode_.store(mode == "auto" ? kAuto : (mode == "always" ? kAlways : kNever), std::memory_order_relaxed);
  }

  std::string name() const {
    static const char* const names[] = {"auto", "always", "never"};
    return names[get()];
  }

 private:
  std::atomic<int> mode_{kAuto};
};

}  // namespace genfast
