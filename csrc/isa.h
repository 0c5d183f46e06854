// fastattn: the instruction set this module is compiled for, and the namespace that keeps it apart.
//
// The same sources are compiled once per instruction set (setup.py: _C_portable, _C_avx2, _C_avx512); the
// FASTATTN_HAVE_* macros the build defines, never the build machine's -march, select the SIMD code.
// Everything lives in fastattn::FASTATTN_NS (isa_avx512, isa_avx2 or isa_portable) so that the three
// modules' inline and template symbols stay distinct.
#pragma once

#if defined(FASTATTN_HAVE_AVX512) || defined(FASTATTN_HAVE_AVX2)
#include <immintrin.h>
#endif

#ifndef FASTATTN_ISA_NAME
#define FASTATTN_ISA_NAME "portable"
#endif

#if defined(FASTATTN_NS)
// set by the build (an A/B benchmark variant of a module)
#elif defined(FASTATTN_HAVE_AVX512)
#define FASTATTN_NS isa_avx512
#elif defined(FASTATTN_HAVE_AVX2)
#define FASTATTN_NS isa_avx2
#else
#define FASTATTN_NS isa_portable
#endif

#if defined(__GNUC__)
#define FASTATTN_INLINE inline __attribute__((always_inline))
#define FASTATTN_RESTRICT __restrict__
#else
#define FASTATTN_INLINE inline
#define FASTATTN_RESTRICT
#endif
