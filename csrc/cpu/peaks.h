// What local_peaks_cpu and dpselect_cpu share besides the peak rule (csrc/ranking.h).
#pragma once
#include <cstdint>

#include "ranking.h"

namespace retake {

// Rows per parallel task so that each task has enough elements to outweigh scheduling.
inline int64_t rows_grain(int64_t T) { return T >= 16384 ? 1 : 16384 / (T > 0 ? T : 1); }

}  // namespace retake
