// Host driver for tests/test_batchnorm_act_common.py: the statistics reduction of the CUDA
// kernels (csrc/cuda/batchnorm_act.cu, bn_fwd_stats_kernel), run on the host with the same
// csrc/common functions: T threads each take every T-th run of R values, reduce it in acc_t
// (sum_partial_of_run) and merge it into a double partial (sum_partial_merge_with), then the
// threads' partials merge pairwise in a tree (sum_partial_merge), as warps and blocks do.
//
//   bn_stats_driver <float|double> <R> <T> < values   (raw little-endian values on stdin)
// prints: count mean m2 (the merged statistics, sum_partial_stats) as %.17g.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "common/batchnorm_act.h"

using genfast::SumPartial;

template <typename acc_t>
int run(const std::vector<char>& bytes, int64_t R, int64_t T) {
  const int64_t n = static_cast<int64_t>(bytes.size() / sizeof(acc_t));
  std::vector<acc_t> x(n);
  std::memcpy(x.data(), bytes.data(), n * sizeof(acc_t));
  const int64_t runs = (n + R - 1) / R;
  std::vector<SumPartial<double>> part(T, SumPartial<double>{0, 0.0, 0.0});
  for (int64_t t = 0; t < T; ++t) {
    SumPartial<double>& w = part[t];
    for (int64_t k = t; k < runs; k += T) {
      const int64_t lo = k * R, hi = std::min(n, lo + R), cnt = hi - lo;
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(cnt);
      acc_t s = 0;
      for (int64_t i = lo; i < hi; ++i) s += x[i];
      const acc_t m = s * inv_n;
      acc_t sd = 0, q = 0;
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t d = x[i] - m;
        sd += d;
        q += d * d;
      }
      const SumPartial<double> r = genfast::sum_partial_of_run<double, acc_t>(cnt, inv_n, s, m, sd, q);
      w = w.count == 0 ? r
                       : genfast::sum_partial_merge_with<double>(w, r, genfast::sum_partial_merge_factor<double>(w.count, cnt));
    }
  }
  for (int64_t step = 1; step < T; step *= 2)
    for (int64_t t = 0; t + step < T; t += 2 * step) part[t] = genfast::sum_partial_merge<double>(part[t], part[t + step]);
  const auto st = genfast::sum_partial_stats<double>(part[0]);
  std::printf("%lld %.17g %.17g\n", static_cast<long long>(st.count), st.mean, st.m2);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s <float|double> <R> <T> < values\n", argv[0]);
    return 2;
  }
  std::freopen(nullptr, "rb", stdin);
  std::vector<char> bytes((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  const int64_t R = std::stoll(argv[2]), T = std::stoll(argv[3]);
  if (std::string(argv[1]) == "float") return run<float>(bytes, R, T);
  return run<double>(bytes, R, T);
}
