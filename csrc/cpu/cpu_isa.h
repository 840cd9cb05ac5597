// The instruction sets the CPU kernels were built for, and the one a call uses.
// softmax_colsum (softmax_colsum.h) is compiled once per instruction set; cpu_isa() picks the
// best one this processor supports, or the one RETAKE_OPS_CPU_ISA names (read at every call,
// so tests can force each in turn).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace retake {

// acc[j] += softmax(s[r, :visible[r]])[j] over the rows of s (fp32 [rows, ld]): see softmax_colsum.h.
using SoftmaxColsumFn = void (*)(float* s, int64_t rows, int64_t ld, const int64_t* visible, float* acc);

struct CpuIsa {
  const char* name;             // RETAKE_OPS_CPU_ISA's value for it
  int vector_bytes;             // acc and the rows of s are padded to a multiple of this
  bool (*supported)();          // whether this processor (and OS) runs it
  SoftmaxColsumFn softmax_colsum;
};

// Every instruction set compiled into this build, baseline first.
const std::vector<CpuIsa>& compiled_cpu_isas();

// The instruction set a kernel call uses now: RETAKE_OPS_CPU_ISA's when set (ValueError if it
// names no compiled set, RuntimeError if this processor lacks it), else the best supported one.
const CpuIsa& cpu_isa();

// The names of the compiled sets this processor supports, baseline first.
std::vector<std::string> supported_cpu_isas();

}  // namespace retake
