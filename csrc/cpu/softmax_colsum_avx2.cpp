// softmax_colsum (softmax_colsum.h) for AVX2 + FMA on x86-64: 32-byte vectors. The target is set
// after the system headers, so only this file's own functions use these instructions; they
// run only where cpu_isa.cpp found AVX2 and FMA.
#if defined(__x86_64__)
#include <cstddef>
#include <cstdint>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#define RETAKE_ISA avx2
#define RETAKE_VEC_BYTES 32
#include "cpu/softmax_colsum.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
