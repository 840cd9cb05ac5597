// softmax_colsum (softmax_colsum.h) for the build's baseline instruction set: 16-byte vectors,
// SSE2 on x86-64. AArch64 builds use softmax_colsum_neon.cpp instead.
#if !defined(__aarch64__)
#define RETAKE_ISA baseline
#define RETAKE_VEC_BYTES 16
#include "cpu/softmax_colsum.h"
#endif
