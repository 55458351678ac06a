/* Forced into every C++ file of the engine's build (`-include`, scripts/engine-build.sh) when
 * GCC compiles llama.cpp's AMX kernels, that is with -march=native on a CPU with AMX (Intel
 * Sapphire Rapids and later).
 *
 * Why: GCC's _tile_loadconfig (amxtileintrin.h, GCC 12 and others) hands ldtilecfg its
 * operand as `"m" (*(const void **)config)`, an 8-byte read, while the instruction reads all
 * 64 bytes of the tile configuration. At -O2 and above the compiler then drops the stores
 * that fill in the rest as dead (ggml-cpu/amx/mmq.cpp, ggml_tile_config_init), ldtilecfg
 * loads whatever was on the stack, and the first decode of a quantized model dies of a
 * general protection fault (SIGSEGV). _tile_storeconfig has the mirror fault. These two
 * replacements name the whole 64 bytes; clang's intrinsics are builtins and need nothing.
 *
 * What must stay true: this file only replaces the two intrinsics, with the same meaning;
 * it is harmless where GCC's own are right.
 */
#if defined(__cplusplus) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

struct pollama_tile_config_bytes {
    unsigned char bytes[64];
};

#undef _tile_loadconfig
#undef _tile_storeconfig
#define _tile_loadconfig(config) \
    __asm__ volatile("ldtilecfg\t%0" ::"m"(*(const struct pollama_tile_config_bytes *)(config)))
#define _tile_storeconfig(config) \
    __asm__ volatile("sttilecfg\t%0" : "=m"(*(struct pollama_tile_config_bytes *)(config)))
#endif
