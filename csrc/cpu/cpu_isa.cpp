// Instruction-set choice for the CPU kernels built once per instruction set (cpu_isa.h).
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace retake {
namespace isa {
#if defined(__aarch64__)
namespace neon { void softmax_colsum(float*, int64_t, int64_t, const int64_t*, float*); }
#else
namespace baseline { void softmax_colsum(float*, int64_t, int64_t, const int64_t*, float*); }
#endif
#if defined(__x86_64__)
namespace avx2 { void softmax_colsum(float*, int64_t, int64_t, const int64_t*, float*); }
namespace avx512 { void softmax_colsum(float*, int64_t, int64_t, const int64_t*, float*); }
#endif
}  // namespace isa

namespace {

bool always() { return true; }

#if defined(__x86_64__)
// __builtin_cpu_supports checks the OS saves the wider registers too (XGETBV), not only CPUID.
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#endif

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

}  // namespace

const std::vector<CpuIsa>& compiled_cpu_isas() {
  static const std::vector<CpuIsa> sets = {
#if defined(__aarch64__)
      {"neon", 16, always, isa::neon::softmax_colsum},
#else
      {"baseline", 16, always, isa::baseline::softmax_colsum},
#endif
#if defined(__x86_64__)
      {"avx2", 32, has_avx2, isa::avx2::softmax_colsum},
      {"avx512", 64, has_avx512, isa::avx512::softmax_colsum},
#endif
  };
  return sets;
}

const CpuIsa& cpu_isa() {
  const auto& sets = compiled_cpu_isas();
  const char* env = std::getenv("RETAKE_OPS_CPU_ISA");
  const std::string forced = env ? env : "";
  if (forced.empty()) {
    for (auto it = sets.rbegin(); it != sets.rend(); ++it)
      if (it->supported()) return *it;
  }
  for (const auto& set : sets) {
    if (forced != set.name) continue;
    TORCH_CHECK(set.supported(), "RETAKE_OPS_CPU_ISA=", forced, " but this processor does not support it; ",
                "it supports ", joined(supported_cpu_isas()));
    return set;
  }
  std::vector<std::string> all;
  for (const auto& set : sets) all.emplace_back(set.name);
  TORCH_CHECK_VALUE(false, "RETAKE_OPS_CPU_ISA must be one of ", joined(all), " (or unset for the best this ",
                    "processor supports), got '", forced, "'");
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> out;
  for (const auto& set : compiled_cpu_isas())
    if (set.supported()) out.emplace_back(set.name);
  return out;
}

}  // namespace retake
