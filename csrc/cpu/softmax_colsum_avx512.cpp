// softmax_colsum (softmax_colsum.h) for AVX-512 (F, DQ, BW, VL) + FMA on x86-64: 64-byte
// vectors. The target is set after the system headers, so only this file's own functions use
// these instructions; they run only where cpu_isa.cpp found them all.
#if defined(__x86_64__)
#include <cstddef>
#include <cstdint>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#endif
#define RETAKE_ISA avx512
#define RETAKE_VEC_BYTES 64
#include "cpu/softmax_colsum.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
