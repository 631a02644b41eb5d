// Every header the per-ISA kernel copies use, included by each kernels_*.cpp before its `#pragma GCC target`.
// Functions defined in these headers are thereby compiled for the baseline in every translation unit: were one of
// them first seen under an AVX2 or AVX-512 target, its out-of-line copy (one mangled name, merged by the linker
// across all objects) could carry wide instructions into code that runs on any CPU.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "../../conv_geometry.h"
#include "dispatch.h"

// Whether this compiler can build the AVX2 / AVX-512 copies: GCC's target pragmas on x86-64. Elsewhere (aarch64,
// clang) only the baseline copy exists and dispatch always picks it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PTD_ISA_X86_COPIES 1
// The masked stores of the AVX2 and AVX-512 copies (wide::store_first); usable under their target pragmas.
#include <immintrin.h>
#else
#define PTD_ISA_X86_COPIES 0
#endif
