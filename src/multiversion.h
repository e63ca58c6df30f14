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

#endif
