// SY_TARGET_CLONES: a function built for AVX-512, AVX2 and the baseline, the
// best the CPU runs chosen once at load time (an ifunc). The loops it marks
// are written so that every build computes the same bits.
//
// Under ThreadSanitizer (SWITCHYARD_TSAN, set by the TSan build) only the
// baseline is built: the ifunc resolver runs while the dynamic loader
// relocates the program, before TSan's runtime is up, and its instrumented
// code crashed every test binary at load.
#pragma once

#if defined(SWITCHYARD_TSAN)
#define SY_TARGET_CLONES
#else
#define SY_TARGET_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
