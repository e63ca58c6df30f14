/* FASTCONV_MULTIVERSION before a function: on x86-64 Linux with GCC or clang it is compiled for
 * x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and the baseline, and the loader picks the best
 * for the CPU, so one build runs on every x86-64. Elsewhere it builds once. */
#ifndef FASTCONV_MULTIVERSION_H
#define FASTCONV_MULTIVERSION_H

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FASTCONV_MULTIVERSION \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCONV_MULTIVERSION
#endif

/* Whether this CPU (and its OS) runs AVX-512 F/DQ/VL with FMA: the hand-written AVX-512 kernels
 * are chosen at run time by it, the portable ones otherwise, or when FASTCONV_DISABLE_AVX512 is
 * set (so the portable kernels are tested on AVX-512 machines too). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <stdlib.h>
#define FASTCONV_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,fma")))
static inline int cpu_has_avx512(void) {
    static int known = -1; /* the CPU does not change: ask once */
    if (known < 0) {
        __builtin_cpu_init();
        known = !getenv("FASTCONV_DISABLE_AVX512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vl") &&
                __builtin_cpu_supports("fma");
    }
    return known;
}
#else
static inline int cpu_has_avx512(void) { return 0; }
#endif

#endif
