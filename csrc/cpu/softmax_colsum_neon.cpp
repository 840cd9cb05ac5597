// softmax_colsum (softmax_colsum.h) for AArch64: 16-byte NEON vectors, part of the AArch64 baseline.
#if defined(__aarch64__)
#define RETAKE_ISA neon
#define RETAKE_VEC_BYTES 16
#include "cpu/softmax_colsum.h"
#endif
