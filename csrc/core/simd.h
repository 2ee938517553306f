// Function multiversioning for the loops where wider vectors pay (GCC on x86-64): the loader
// picks the AVX-512, AVX2 or baseline clone for the CPU at hand. The project compiles without
// FMA contraction (-ffp-contract=off), so a clone that keeps the scalar code's order of
// operations per lane gives the same bits as the baseline. CK_INLINE forces a clone's helpers
// into it, so that they compile for the clone's ISA.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define CK_INLINE __attribute__((always_inline)) inline
#else
#define CK_SIMD_CLONES
#define CK_INLINE inline
#endif
