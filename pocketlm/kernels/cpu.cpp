// The decode step's CPU kernels: pocketlm/kernels/__init__.py builds this file once with the system compiler
// (-O3 -march=native -fopenmp) and calls it through ctypes. Every function takes fp32 activations and writes
// fp32 results, so a layer's output equals the PyTorch reference up to the order of summation (and, for int4,
// the activations' rounding to 16 bits).
//
// Why hand-written: one decoded token is about 10 small matrix-vector products per layer, and aten's int4 CPU
// kernel (_weight_int4pack_mm_for_cpu) streams 4 GB/s at one row, a quarter of what the memory gives; the
// dozen dispatched ops of attention, RoPE and the norms cost more than their arithmetic, and so do the Python
// calls between them. llama.cpp's ggml does the same: one fused function per operation of the graph
// (ggml-cpu/ops.cpp), run through the whole graph per token without an interpreter (decode_step, at the end).
//
// Layouts (all row-major, contiguous):
//   int4: codes (N, K/2) uint8, element 2j in the low nibble of byte j; scales_and_zeros (K/g, N, 2) bf16;
//         w[n, k] = (q - 8) * scale + zero (pocketlm/quant/int4.py), repacked for the kernel by int4_pack;
//         a GGUF's Q4_0, Q4_K and Q6_K tensors go into layouts of their own, their blocks' bytes (int4_pack_gguf)
//   int8: weight (N, K) int8, scales (N) bf16; w[n, k] = q * scale  (pocketlm/quant/int8.py)
//   KV cache of one layer, batch row 0: (n_kv, S, hd) fp32, or fp16 (kv_half; a quantized model's cache holds
//         half the bytes a decoded token reads, as llama.cpp's f16 cache)  (pocketlm/models/llama.py's KVCache)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "simd.h"

// The weight kernels ask for the cache line this many bytes ahead of the one they read: the hardware's own
// prefetcher alone leaves a 2-core read at 10-12 GB/s, this at 16-18 (a 24-layer C++ harness, 2048 beat 1024 and 4096)
static constexpr int64_t PREFETCH = 2048;

// A KV cache element: fp32, or fp16 as its bits
static inline float kv_float(float x) { return x; }
static inline float kv_float(uint16_t h) { return half_to_float(h); }

// n floats into the cache
static inline void kv_store(const float *x, int64_t n, float *out) { std::memcpy(out, x, n * sizeof(float)); }
static inline void kv_store(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
#if defined(POCKETLM_VEC)
    for (; i + LANES <= n; i += LANES) v_store(out + i, v_load(x + i));
#endif
    for (; i < n; i++) out[i] = float_to_half(x[i]);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

// exp of n floats in place (softmax's and the activations' exponentials: the scalar expf would cost more than
// all of attention's multiplications)
static void exp_inplace(float *x, int64_t n) {
    int64_t i = 0;
#if defined(POCKETLM_VEC)
    for (; i + LANES <= n; i += LANES) v_store(x + i, v_exp(v_load(x + i)));
#endif
    for (; i < n; i++) x[i] = std::exp(x[i]);
}

// x = exp(x - max x) in place (softmax's numerators) -> their sum. The max and the sum LANES at a time: as
// scalar loops, chains of dependent float operations (4 cycles a position), they cost a decode row's attention
// (SmolLM2's 9 heads at 300 positions, one thread, a C++ harness) 30 -> 24 us a layer with the cache in L2, 49-57
// -> 42-51 us with 240 layers' caches read from memory
static float exp_shifted_sum(float *x, int64_t n) {
    float best = -INFINITY, total = 0.f;
    int64_t i = 0;
#if defined(POCKETLM_VEC)
    Vec top = v_set1(-INFINITY);
    for (; i + LANES <= n; i += LANES) top = v_max(top, v_load(x + i));
    best = v_max_lane(top);
#endif
    for (; i < n; i++) best = std::max(best, x[i]);
    i = 0;
#if defined(POCKETLM_VEC)
    Vec sum = v_zero();
    for (; i + LANES <= n; i += LANES) {
        const Vec e = v_exp(v_sub(v_load(x + i), v_set1(best)));
        v_store(x + i, e);
        sum = v_add(sum, e);
    }
    total = v_sum(sum);
#endif
    for (; i < n; i++) total += x[i] = std::exp(x[i] - best);
    return total;
}

// ------------------------------------------------------------------------------------------ int4 x int8

// The int4 weights are multiplied in integers, as llama.cpp's Q4 x Q8 dot products (ggml_vec_dot_q4_1_q8_1):
// 4-bit codes times int8 activations, 4 products summed into each int32 lane per instruction on every target
// (simd.h: vpdpbusd, vpmaddubsw + vpmaddwd, sdot), instead of three conversions and a float FMA per weight.
//
// Activations in two passes: each block of 32 is rounded to int8 with its scale d = max|x| / 127, and what
// that leaves (at most d/2) is rounded again with the scale d / 254, so x = d hi + d/254 lo within
// max|x| / 64516 (16 bits; bf16, aten's kernel's activations, keeps 8). One pass (llama.cpp's Q8_1) flips
// SmolLM2's near-tie first token on "What is the capital of France?"; two passes double only the integer
// multiplies, which cost a fraction of reading the weights.
//
// Weights are laid out for the kernel once, when a layer is built (int4_pack): 16 output rows per block, so
// one 64-byte load feeds 16 rows' dot products lane by lane and no row needs a horizontal sum. A block is a
// stream of its groups, each [16 scales bf16 | 16 zeros bf16 | g/8 steps of 64 bytes], a step holding each
// row's 8 codes for columns k..k+7 in its 4-byte lane: byte j = code[k + j] | code[k + 4 + j] << 4 (the low
// nibbles meet activations k..k+3, the high ones k+4..k+7). Rows past N (the last block) are zero. The layout
// is the same on every target (16 lanes are one 512-bit register, two 256-bit or four 128-bit ones).
//   w[n, k] = (q - 8) * scale + zero, so sum_k w x = scale * sum_k q x + (zero - 8 scale) * sum_k x per group.
// Two more layouts hold a GGUF's blocks as they are (int4_pack_gguf), groups of 32, the same steps of codes:
//   INT4_Q4_0  each group [16 scales fp16 (block_q4_0's d) | steps]: w = (q - 8) * d, 4.5 bits a weight
//   INT4_Q4_K  each super-block of 8 groups [16 d fp16 | 16 dmin fp16], then its groups [16 scales u8 | 16 mins u8 |
//              steps] (block_q4_K's 6-bit sub-scales unpacked): w = (d sc) q - dmin m, 4.625 bits a weight
//   INT4_Q6_K  each super-block of 8 groups [16 d fp16], then its groups [16 scales + 128 u8 (sub-block 0) | the same
//              (sub-block 1) | steps (the codes' low 4 bits) | 2 planes of 64 bytes (their high 2 bits)]: block_q6_K's
//              6-bit codes q in 0..63 with an int8 scale per 16 values, w = d sc (q - 32), 6.5625 bits a weight. Plane
//              P holds steps 2P and 2P + 1: byte j of a row's lane has code k + j's high bits in bits 0-1 and k + 4 + j's
//              in 2-3 for step 2P (k its first column), 4-5 and 6-7 for step 2P + 1.
// where the scales and zeros make 5, and int8 rows 8 and a scale. Decode reads every weight byte once per token, so
// fewer bytes are a faster step; and the weights are the file's exactly (ggml-quants.c's dequantize_row_q4_0 / _q4_K /
// _q6_K arithmetic).

extern "C" const char *kernel_target() { return TARGET; }  // simd.h: the instruction sets this build uses

// Whether this CPU runs this build (pocketlm/kernels/__init__.py checks before it calls anything else; the compiler
// may use the target's instructions in any function, so this one is built for the oldest x86-64)
#if defined(__x86_64__)
#define OLDEST_CPU __attribute__((target("arch=x86-64")))
#else
#define OLDEST_CPU
#endif
extern "C" OLDEST_CPU int cpu_runs_target() {
#if defined(POCKETLM_AVX512)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(POCKETLM_AVX2)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")
#if defined(__AVXVNNI__)
           && __builtin_cpu_supports("avxvnni")
#elif defined(POCKETLM_AVXVNNI_AS_EVEX)
           && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")
#endif
        ;
#else
    return 1;  // scalar, and NEON with the dot product, whose features the loader reads from /proc/cpuinfo
#endif
}

static constexpr int ROWS = 16;  // output rows per block: one per lane of simd.h's 16

enum Int4Layout { INT4_ZEROS = 0, INT4_Q4_0 = 1, INT4_Q4_K = 2, INT4_Q6_K = 3 };  // pocketlm/kernels/__init__.py's INT4_LAYOUTS

// a super-block's header for 16 rows: Q4_K's d and dmin, Q6_K's d (fp16); none in the other layouts
static constexpr int64_t super_header(int layout) { return layout == INT4_Q4_K ? 64 : layout == INT4_Q6_K ? 32 : 0; }

// a group: its scales (and zeros, or mins), then its codes (and Q6_K's planes of high bits)
static inline int64_t int4_group_bytes(int64_t g, int layout) {
    return layout == INT4_ZEROS ? 64 + g * 8 : layout == INT4_Q6_K ? 32 + g * 12 : 32 + g * 8;
}

// where group gi of a block of 16 rows begins (after its super-block's header)
static inline int64_t int4_group_offset(int64_t gi, int64_t g, int layout) {
    return gi * int4_group_bytes(g, layout) + (gi / 8 + 1) * super_header(layout);
}

extern "C" int64_t int4_packed_bytes(int64_t N, int64_t K, int64_t g, int layout) {
    return (N + ROWS - 1) / ROWS * (int4_group_offset(K / g, g, layout) - super_header(layout));
}

// codes (N, K/2) uint8, element 2j in the low nibble of byte j; scales_and_zeros (K/g, N, 2) bf16
// (pocketlm/quant/int4.py) -> out (int4_packed_bytes) in the layout above.
extern "C" void int4_pack(const uint8_t *codes, const uint16_t *scales_and_zeros, int64_t N, int64_t K, int64_t g, uint8_t *out) {
    const int64_t G = K / g, blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t gi = 0; gi < G; gi++) {
            uint8_t *p = out + (b * G + gi) * int4_group_bytes(g, INT4_ZEROS);
            std::memset(p, 0, int4_group_bytes(g, INT4_ZEROS));  // the last block's rows past N stay zero
            uint16_t *sz = reinterpret_cast<uint16_t *>(p);
            for (int r = 0; r < ROWS && b * ROWS + r < N; r++) {
                const int64_t n = b * ROWS + r;
                sz[r] = scales_and_zeros[(gi * N + n) * 2], sz[ROWS + r] = scales_and_zeros[(gi * N + n) * 2 + 1];
                const uint8_t *row = codes + n * (K / 2) + gi * g / 2;
                for (int64_t step = 0; step < g / 8; step++) {
                    // bytes c0..c3 hold codes k..k+7 (k = gi g + 8 step), low nibble first; byte j of the step
                    // takes code k + j in its low nibble and code k + 4 + j in its high one. Bytes, not nibbles,
                    // at a time: this runs at every load of an int4 model (a nibble loop took 0.25 s of SmolLM2's start)
                    const uint8_t *c = row + step * 4;
                    uint8_t *o = p + 64 + step * 64 + r * 4;
                    o[0] = uint8_t((c[0] & 0x0F) | (c[2] & 0x0F) << 4), o[1] = uint8_t((c[0] >> 4) | (c[2] & 0xF0));
                    o[2] = uint8_t((c[1] & 0x0F) | (c[3] & 0x0F) << 4), o[3] = uint8_t((c[1] >> 4) | (c[3] & 0xF0));
                }
            }
        }
}

// bf16 of an fp32, rounded to nearest even (c10::BFloat16's round_to_nearest_even; scales are never NaN)
static inline uint16_t float_to_bf16(float f) {
    const uint32_t u = float_to_bits(f);
    return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// The inverse of int4_pack: the kernel's layout -> codes (N, K/2) and scales_and_zeros (K/g, N, 2), for a layer that
// keeps only the kernel's layout (pocketlm/quant/int4.py) when it is saved or trained. A GGUF's layouts give their
// scales and zeros rounded to bf16 (Int4Linear's buffers hold bf16): Q4_0's zeros 0, Q4_K's 8 d sc - dmin m. Not
// INT4_Q6_K, whose codes are not 4-bit (pocketlm/quant/int8.py reads that layout in torch).
extern "C" void int4_unpack(const uint8_t *packed, int64_t N, int64_t K, int64_t g, int layout, uint8_t *codes, uint16_t *scales_and_zeros) {
    const int64_t G = K / g, blocks = (N + ROWS - 1) / ROWS, header = layout == INT4_ZEROS ? 64 : 32;
    const int64_t block_bytes = int4_packed_bytes(ROWS, K, g, layout);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t gi = 0; gi < G; gi++) {
            const uint8_t *p = packed + b * block_bytes + int4_group_offset(gi, g, layout);
            const uint16_t *sz = reinterpret_cast<const uint16_t *>(p);
            const uint16_t *dd = layout == INT4_Q4_K ? reinterpret_cast<const uint16_t *>(p - (gi % 8) * int4_group_bytes(g, layout) - super_header(layout)) : nullptr;
            for (int r = 0; r < ROWS && b * ROWS + r < N; r++) {
                const int64_t n = b * ROWS + r;
                uint16_t scale = sz[r], zero = sz[ROWS + r];
                if (layout == INT4_Q4_0) scale = float_to_bf16(half_to_float(sz[r])), zero = 0;
                if (layout == INT4_Q4_K) {
                    const float d_sc = half_to_float(dd[r]) * float(p[r]);
                    scale = float_to_bf16(d_sc), zero = float_to_bf16(8.f * d_sc - half_to_float(dd[ROWS + r]) * float(p[ROWS + r]));
                }
                scales_and_zeros[(gi * N + n) * 2] = scale, scales_and_zeros[(gi * N + n) * 2 + 1] = zero;
                uint8_t *row = codes + n * (K / 2) + gi * g / 2;
                for (int64_t step = 0; step < g / 8; step++) {
                    const uint8_t *o = p + header + step * 64 + r * 4;
                    uint8_t *c = row + step * 4;
                    c[0] = uint8_t((o[0] & 0x0F) | (o[1] & 0x0F) << 4), c[2] = uint8_t((o[0] >> 4) | (o[1] & 0xF0));
                    c[1] = uint8_t((o[2] & 0x0F) | (o[3] & 0x0F) << 4), c[3] = uint8_t((o[2] >> 4) | (o[3] & 0xF0));
                }
            }
        }
}

enum GGMLType { GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q4_K = 12, GGML_Q6_K = 14 };  // ggml.h's type ids

// Group gi (32 values) of row n of a GGML Q4_0, Q4_1 or Q4_K tensor with K columns -> its codes (0..15), scale and
// zero in fp32, w = (q - 8) scale + zero; the arithmetic of pocketlm/quant/from_gguf.py's grid_groups. Blocks as
// ggml-common.h's block_q4_0 (d | qs[16]: value j < 16 the low nibble of qs[j], j + 16 its high one), block_q4_1
// (d | m | qs[16]), block_q4_K (d | dmin | scales[12] | qs[128]: 8 groups of 32, group s in the low (even s) or high
// nibbles of qs[32 (s / 2) ..], its 6-bit scale and min unpacked as ggml-quants.c's get_scale_min_k4).
static inline void q4_k_scale_min(const uint8_t *block, int s, uint8_t &scale6, uint8_t &min6) {
    const uint8_t *sc = block + 4;
    scale6 = s < 4 ? sc[s] & 63 : (sc[s + 4] & 0x0F) | ((sc[s - 4] >> 6) << 4);
    min6 = s < 4 ? sc[s + 4] & 63 : (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
}

static void gguf_group(const uint8_t *data, int type, int64_t K, int64_t n, int64_t gi, uint8_t *codes, float &scale, float &zero) {
    auto f16 = [](const uint8_t *p) { uint16_t h; std::memcpy(&h, p, 2); return half_to_float(h); };
    if (type == GGML_Q4_0 || type == GGML_Q4_1) {
        const int64_t size = type == GGML_Q4_0 ? 18 : 20;
        const uint8_t *block = data + (n * (K / 32) + gi) * size, *qs = block + size - 16;
        for (int e = 0; e < 16; e++) codes[e] = qs[e] & 0x0F, codes[e + 16] = qs[e] >> 4;
        scale = f16(block);
        zero = type == GGML_Q4_0 ? 0.f : f16(block + 2) + 8.f * scale;  // w = d q + m
        return;
    }
    const uint8_t *block = data + (n * (K / 256) + gi / 8) * 144;
    const int s = int(gi % 8);
    uint8_t scale6, min6;
    q4_k_scale_min(block, s, scale6, min6);
    const uint8_t *qs = block + 16 + (s / 2) * 32;
    for (int e = 0; e < 32; e++) codes[e] = s % 2 ? qs[e] >> 4 : qs[e] & 0x0F;
    scale = f16(block) * float(scale6);
    zero = 8.f * scale - f16(block + 2) * float(min6);  // w = (d sc) q - dmin m
}

// Value k (0..255) of a block_q6_K (ql[128] | qh[64] | scales[16] int8 | d fp16) -> its code 0..63, as
// ggml-quants.c's dequantize_row_q6_K reads it: each half of 128 values takes 64 bytes of ql and 32 of qh, its
// quarter s (32 values) the low (s < 2) or high nibbles of ql[32 (s % 2) ..] and bits 2s, 2s + 1 of qh[..]
static inline uint8_t q6_k_code(const uint8_t *block, int64_t k) {
    const int64_t half = k / 128, l = k % 32, quarter = k % 128 / 32;
    const uint8_t ql = block[half * 64 + quarter % 2 * 32 + l], qh = block[128 + half * 32 + l];
    return uint8_t((quarter < 2 ? ql & 0x0F : ql >> 4) | ((qh >> (2 * quarter)) & 3) << 4);
}

// Row n's group gi of a Q6_K tensor into INT4_Q6_K's group p (row r), and its super-block's d into dd
static void q6_k_group(const uint8_t *data, int64_t K, int64_t n, int64_t gi, int r, uint8_t *p, uint16_t *dd) {
    const uint8_t *block = data + (n * (K / 256) + gi / 8) * 210;
    const int64_t first = gi % 8 * 32;  // the group's first value in its block
    for (int sub = 0; sub < 2; sub++) p[sub * ROWS + r] = uint8_t(block[192 + first / 16 + sub] ^ 0x80);  // sc + 128
    if (gi % 8 == 0) std::memcpy(&dd[r], block + 208, 2);
    uint8_t codes[32];
    for (int e = 0; e < 32; e++) codes[e] = q6_k_code(block, first + e);
    for (int step = 0; step < 4; step++)
        for (int j = 0; j < 4; j++) p[32 + step * 64 + r * 4 + j] = uint8_t((codes[8 * step + j] & 0x0F) | (codes[8 * step + 4 + j] & 0x0F) << 4);
    for (int plane = 0; plane < 2; plane++)
        for (int j = 0; j < 4; j++) {
            uint8_t bits = 0;  // steps 2 plane (low, high nibble's codes), 2 plane + 1 (low, high)
            for (int q = 0; q < 4; q++) bits |= uint8_t((codes[16 * plane + 8 * (q / 2) + 4 * (q % 2) + j] >> 4) << (2 * q));
            p[32 + 256 + plane * 64 + r * 4 + j] = bits;
        }
}

// A GGML Q4_0, Q4_1, Q4_K or Q6_K tensor (N, K) -> the kernel's layout with groups of 32, straight from the file's
// blocks (no plain codes in between), its row i taken from the tensor's row order[i] (order null: as they are), in
// `layout`: INT4_ZEROS (Q4_0, Q4_1 or Q4_K), or the tensor's own type's (INT4_Q4_0, INT4_Q4_K, INT4_Q6_K).
extern "C" void int4_pack_gguf(const uint8_t *data, int type, int64_t N, int64_t K, const int64_t *order, int layout, uint8_t *out) {
    const int64_t G = K / 32, blocks = (N + ROWS - 1) / ROWS, header = layout == INT4_ZEROS ? 64 : 32;
    const int64_t block_bytes = int4_packed_bytes(ROWS, K, 32, layout);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t gi = 0; gi < G; gi++) {
            uint8_t *p = out + b * block_bytes + int4_group_offset(gi, 32, layout);
            std::memset(p, 0, int4_group_bytes(32, layout));  // the last block's rows past N stay zero
            uint16_t *sz = reinterpret_cast<uint16_t *>(p), *dd = reinterpret_cast<uint16_t *>(p - super_header(layout));
            if (super_header(layout) && gi % 8 == 0) std::memset(dd, 0, super_header(layout));
            for (int r = 0; r < ROWS && b * ROWS + r < N; r++) {
                const int64_t n = order ? order[b * ROWS + r] : b * ROWS + r;
                if (layout == INT4_Q6_K) {
                    q6_k_group(data, K, n, gi, r, p, dd);
                    continue;
                }
                uint8_t codes[32];
                float scale, zero;
                gguf_group(data, type, K, n, gi, codes, scale, zero);
                if (layout == INT4_ZEROS) sz[r] = float_to_bf16(scale), sz[ROWS + r] = float_to_bf16(zero);
                if (layout == INT4_Q4_0) std::memcpy(&sz[r], data + (n * (K / 32) + gi) * 18, 2);  // block_q4_0's d
                if (layout == INT4_Q4_K) {
                    const uint8_t *block = data + (n * (K / 256) + gi / 8) * 144;  // block_q4_K: d | dmin | scales | qs
                    q4_k_scale_min(block, int(gi % 8), p[r], p[ROWS + r]);
                    if (gi % 8 == 0) std::memcpy(&dd[r], block, 2), std::memcpy(&dd[ROWS + r], block + 2, 2);
                }
                for (int step = 0; step < 4; step++)
                    for (int j = 0; j < 4; j++) p[header + step * 64 + r * 4 + j] = uint8_t(codes[8 * step + j] | codes[8 * step + 4 + j] << 4);
            }
        }
}

// The read bandwidth decode is bound by, for `pocketlm bench`'s roofline: x (n floats, n a multiple of 16) summed on
// nthreads threads (the sum keeps the loads). 16 running sums the compiler keeps in vector registers; software
// prefetch made this loop slower, not faster, and torch's sum read about half as fast (9 against 16-30 GB/s, Zen 4)
extern "C" float read_floats(const float *x, int64_t n, int nthreads) {
    float total = 0.f;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        float acc[16] = {};
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i += 16)
            for (int j = 0; j < 16; j++) acc[j] += x[i + j];
        for (int j = 0; j < 16; j++) total += acc[j];
    }
    return total;
}

// One row (K values) of a GGML tensor -> fp32, each type's arithmetic in pocketlm/formats/gguf_quants.py's order (which
// is gguf-py's and ggml-quants.c's dequantize_row_*: products and sums as separate roundings), so the values are those
// the torch dequantizers give, bit for bit. Types: ggml.h's ids.
enum GGMLRowType { GGML_F32 = 0, GGML_F16 = 1, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8, GGML_Q5_K = 13, GGML_BF16 = 30 };  // and GGMLType's

static void gguf_row(const uint8_t *row, int type, int64_t K, float *out) {
    auto f16 = [](const uint8_t *p) { uint16_t h; std::memcpy(&h, p, 2); return half_to_float(h); };
    if (type == GGML_F32) { std::memcpy(out, row, K * 4); return; }
    if (type == GGML_F16) { for (int64_t k = 0; k < K; k++) out[k] = f16(row + 2 * k); return; }
    if (type == GGML_BF16) {
        for (int64_t k = 0; k < K; k++) { uint16_t h; std::memcpy(&h, row + 2 * k, 2); out[k] = bits_to_float(uint32_t(h) << 16); }
        return;
    }
    if (type == GGML_Q8_0)  // d | qs[32] int8: y = q d
        for (int64_t b = 0; b < K / 32; b++, row += 34) {
            const float d = f16(row);
            for (int e = 0; e < 32; e++) out[b * 32 + e] = float(int8_t(row[2 + e])) * d;
        }
    else if (type == GGML_Q4_0 || type == GGML_Q4_1 || type == GGML_Q5_0 || type == GGML_Q5_1)
        // d | (m) | (qh: the 5th bit of element j at bit j) | qs[16]: element j < 16 the low nibble of qs[j], j + 16 the
        // high one; y = (q - 8) d, q d + m, (q - 16) d, q d + m
        for (int64_t b = 0; b < K / 32; b++) {
            const bool has_min = type == GGML_Q4_1 || type == GGML_Q5_1, five = type == GGML_Q5_0 || type == GGML_Q5_1;
            const int64_t size = (type == GGML_Q4_0 ? 18 : type == GGML_Q4_1 ? 20 : type == GGML_Q5_0 ? 22 : 24);
            const uint8_t *block = row + b * size, *qs = block + size - 16;
            const float d = f16(block), m = has_min ? f16(block + 2) : 0.f;
            uint32_t qh = 0;
            if (five) std::memcpy(&qh, block + (has_min ? 4 : 2), 4);
            for (int e = 0; e < 32; e++) {
                int q = e < 16 ? qs[e] & 0x0F : qs[e - 16] >> 4;
                if (five) q |= int((qh >> e) & 1) << 4;
                out[b * 32 + e] = has_min ? float(q) * d + m : (float(q) - (five ? 16.f : 8.f)) * d;
            }
        }
    else if (type == GGML_Q4_K || type == GGML_Q5_K)
        // d | dmin | scales[12] | (qh[32]: sub-block s's 5th bits at bit s) | qs[128]: sub-block s of 32 in the low (even
        // s) or high nibbles of qs[32 (s / 2) ..]; y = (d sc) q - (dmin m)
        for (int64_t b = 0; b < K / 256; b++) {
            const int64_t size = type == GGML_Q4_K ? 144 : 176;
            const uint8_t *block = row + b * size, *sc = block + 4, *qh = block + 16, *qs = block + (type == GGML_Q4_K ? 16 : 48);
            const float d = f16(block), dmin = f16(block + 2);
            for (int s = 0; s < 8; s++) {
                const int scale6 = s < 4 ? sc[s] & 63 : (sc[s + 4] & 0x0F) | ((sc[s - 4] >> 6) << 4);
                const int min6 = s < 4 ? sc[s + 4] & 63 : (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
                const float ds = d * float(scale6), dm = dmin * float(min6);
                for (int e = 0; e < 32; e++) {
                    int q = s % 2 ? qs[(s / 2) * 32 + e] >> 4 : qs[(s / 2) * 32 + e] & 0x0F;
                    if (type == GGML_Q5_K) q |= ((qh[e] >> s) & 1) << 4;
                    out[b * 256 + s * 32 + e] = float(q) * ds - dm;
                }
            }
        }
    else  // GGML_Q6_K: ql[128] | qh[64] | scales[16] int8 | d; in each half of 128, elements l, l + 32, l + 64, l + 96
          // take their low 4 bits from ql[l], ql[l + 32], ql[l] >> 4, ql[l + 32] >> 4 and their high 2 from qh[l] >> 0,
          // 2, 4, 6 (ggml-quants.c's dequantize_row_q6_K); y = (q - 32) (d scale), a scale for each 16
        for (int64_t b = 0; b < K / 256; b++) {
            const uint8_t *block = row + b * 210;
            const float d = f16(block + 208);
            float ds[16];
            for (int i = 0; i < 16; i++) ds[i] = d * float(int8_t(block[192 + i]));
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = block + 64 * h, *qh = block + 128 + 32 * h;
                float *y = out + b * 256 + 128 * h;
                for (int l = 0; l < 32; l++) {
                    y[l] = (float((ql[l] & 0x0F) | (qh[l] & 3) << 4) - 32.f) * ds[8 * h + l / 16];
                    y[l + 32] = (float((ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4) - 32.f) * ds[8 * h + 2 + l / 16];
                    y[l + 64] = (float((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32.f) * ds[8 * h + 4 + l / 16];
                    y[l + 96] = (float((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32.f) * ds[8 * h + 6 + l / 16];
                }
            }
        }
}

// A GGML tensor (N, K) of any type gguf_row reads -> int8 rows w (N, K) and bf16 scales (N), each row rounded on its
// own symmetric grid, max |w| / 127: pocketlm/quant/int8.py's int8_rows, one row at a time (no float copy of the tensor)
extern "C" void int8_rows_gguf(const uint8_t *data, int type, int64_t N, int64_t K, int8_t *w, uint16_t *scales) {
    const int64_t row_bytes = type == GGML_F32 ? K * 4 : type == GGML_F16 || type == GGML_BF16 ? K * 2
                            : type == GGML_Q8_0 ? K / 32 * 34 : type == GGML_Q4_0 ? K / 32 * 18 : type == GGML_Q4_1 ? K / 32 * 20
                            : type == GGML_Q5_0 ? K / 32 * 22 : type == GGML_Q5_1 ? K / 32 * 24 : type == GGML_Q4_K ? K / 256 * 144
                            : type == GGML_Q5_K ? K / 256 * 176 : K / 256 * 210;
#pragma omp parallel
    {
        std::vector<float> x(K);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            gguf_row(data + n * row_bytes, type, K, x.data());
            float amax = 0.f;
            for (int64_t k = 0; k < K; k++) amax = std::max(amax, std::fabs(x[k]));
            const float s = std::max(amax, 1e-12f) / 127.f;
            for (int64_t k = 0; k < K; k++) w[n * K + k] = int8_t(std::clamp(std::nearbyint(x[k] / s), -127.f, 127.f));
            scales[n] = float_to_bf16(s);
        }
    }
}

// Activations of M rows rounded for the kernel: hi and lo (M, K) int8, their scales d and d/254 per block of 32
// (M, K/32), and each group's sum of the rounded values (M, K/g). Several rows are rounded one (row, group) unit at
// a time by the kernel's threads, inside its parallel region, before they share out the weight blocks
// (round_in_team): rounded by one thread before the team started, a batch's rows had cost SmolLM2's 8-row step
// 1.1 ms (120 calls of 9 us while the other thread waited). One row is rounded here, in about the time a barrier
// takes.
#if defined(POCKETLM_AVX2)
// 4 x 8 int32 (each in -127..127) -> 32 int8 in order: the packs interleave 128-bit halves, the permute undoes it
static inline void store_int8x32(int8_t *out, const __m256i *v) {
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(out), ordered);
}
#endif

struct Int8Rows {
    std::vector<int8_t> hi, lo;
    std::vector<float> d, d_lo, group_sum;
    std::vector<int32_t> block_sum_hi, block_sum_lo;  // the rounded values' sums per block of 32 (simd.h's u8_offset)
    std::vector<int32_t> sub_sum_hi, sub_sum_lo;      // and per 16 (INT4_Q6_K's sub-blocks)
    const float *x;
    const int64_t M, K, g;

    Int8Rows(const float *x, int64_t M, int64_t K, int64_t g)
        : hi(M * K), lo(M * K), d(M * K / 32), d_lo(M * K / 32), group_sum(M * K / g), block_sum_hi(M * K / 32),
          block_sum_lo(M * K / 32), sub_sum_hi(M * K / 16), sub_sum_lo(M * K / 16), x(x), M(M), K(K), g(g) {
        if (M == 1)
            for (int64_t u = 0; u < units(); u++) round(u);
    }

    int64_t units() const { return int64_t(group_sum.size()); }

    // Called by every thread of the kernel's parallel region: several rows' units shared out (an orphaned `omp for`,
    // whose end waits for every unit); nothing for one row.
    void round_in_team() {
        if (M == 1) return;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units(); u++) round(u);
    }

    void round(int64_t unit) {  // row unit / (K / g), group unit % (K / g)
        const int64_t m = unit / (K / g), first = unit % (K / g) * (g / 32);
        float total = 0.f;
        for (int64_t b = first; b < first + g / 32; b++) {
            const int64_t at = m * K + b * 32;
            float amax = 0.f, sub_hi[2] = {}, sub_lo[2] = {};  // the sums of rounded values per 16: integers, exact in any order
#if defined(POCKETLM_AVX512)
            // 16 lanes at a time: the rounding is the scalar loop's (round to nearest even)
            const __m512 x0 = _mm512_loadu_ps(x + at), x1 = _mm512_loadu_ps(x + at + 16);
            amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
#elif defined(POCKETLM_AVX2)
            __m256 xs[4], top = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                xs[i] = _mm256_loadu_ps(x + at + 8 * i);
                top = _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.f), xs[i]));  // |x|
            }
            amax = v_max_lane(top);
#else
            for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(x[at + i]));
#endif
            const float step = amax / 127.f, step_lo = step / 254.f;
            const float inv = amax > 0.f ? 127.f / amax : 0.f, inv_lo = amax > 0.f ? 254.f * 127.f / amax : 0.f;
#if defined(POCKETLM_AVX512)
            const __m512 xs[2] = {x0, x1};
            for (int half = 0; half < 2; half++) {
                constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                const __m512 h = _mm512_roundscale_ps(_mm512_mul_ps(xs[half], _mm512_set1_ps(inv)), nearest);
                __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_fnmadd_ps(h, _mm512_set1_ps(step), xs[half]), _mm512_set1_ps(inv_lo)), nearest);
                l = _mm512_min_ps(_mm512_max_ps(l, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
                _mm_storeu_si128(reinterpret_cast<__m128i *>(&hi[at + 16 * half]), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(h)));
                _mm_storeu_si128(reinterpret_cast<__m128i *>(&lo[at + 16 * half]), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(l)));
                sub_hi[half] = _mm512_reduce_add_ps(h), sub_lo[half] = _mm512_reduce_add_ps(l);
            }
#elif defined(POCKETLM_AVX2)
            // 8 lanes at a time, as the AVX-512 path
            __m256i h_int[4], l_int[4];
            __m256 sum_hi[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, sum_lo[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int i = 0; i < 4; i++) {
                constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                const __m256 h = _mm256_round_ps(_mm256_mul_ps(xs[i], _mm256_set1_ps(inv)), nearest);
                __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_fnmadd_ps(h, _mm256_set1_ps(step), xs[i]), _mm256_set1_ps(inv_lo)), nearest);
                l = _mm256_min_ps(_mm256_max_ps(l, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
                h_int[i] = _mm256_cvtps_epi32(h), l_int[i] = _mm256_cvtps_epi32(l);
                sum_hi[i / 2] = _mm256_add_ps(sum_hi[i / 2], h), sum_lo[i / 2] = _mm256_add_ps(sum_lo[i / 2], l);
            }
            store_int8x32(&hi[at], h_int), store_int8x32(&lo[at], l_int);
            for (int half = 0; half < 2; half++) sub_hi[half] = v_sum(sum_hi[half]), sub_lo[half] = v_sum(sum_lo[half]);
#else
            for (int i = 0; i < 32; i++) {
                const float h = std::nearbyint(x[at + i] * inv);
                const float l = std::clamp(std::nearbyint(std::fma(-h, step, x[at + i]) * inv_lo), -127.f, 127.f);  // fused, as above
                hi[at + i] = int8_t(h), lo[at + i] = int8_t(l);
                sub_hi[i / 16] += h, sub_lo[i / 16] += l;
            }
#endif
            const float total_hi = sub_hi[0] + sub_hi[1], total_lo = sub_lo[0] + sub_lo[1];
            for (int half = 0; half < 2; half++)
                sub_sum_hi[(m * K + b * 32) / 16 + half] = int32_t(sub_hi[half]), sub_sum_lo[(m * K + b * 32) / 16 + half] = int32_t(sub_lo[half]);
            d[m * (K / 32) + b] = step, d_lo[m * (K / 32) + b] = step_lo;
            block_sum_hi[m * (K / 32) + b] = int32_t(total_hi), block_sum_lo[m * (K / 32) + b] = int32_t(total_lo);
            total += step * total_hi + step_lo * total_lo;
        }
        group_sum[unit] = total;
    }
};

// How many activation rows share each loaded weight vector, and whether several rows take the weight blocks two
// at a time: as many as the target's registers hold without spilling (AVX-512: 32 of 16 lanes; AVX2's 16 and
// NEON's 32 registers hold 8 of them)
#if defined(POCKETLM_AVX512)
static constexpr int INT4_ROW_TILE = 4, INT8_ROW_TILE = 8;
static constexpr bool INT4_BLOCK_PAIRS = true;
#else
static constexpr int INT4_ROW_TILE = 2, INT8_ROW_TILE = 2;
static constexpr bool INT4_BLOCK_PAIRS = false;
#endif

// MT activation rows (from row m0) against NB consecutive blocks of 16 weight rows, each block_bytes long, from p
// -> res[m * NB + i] lane r = output row (first block + i) * 16 + r. Each broadcast activation quad feeds NB
// blocks' dot products: with one broadcast load per instruction (NB 1) a batch's rows ran at the load ports'
// rate, 1.5-1.8 G instructions/s per core, where NB 2 runs 2.2-2.5 of the 4.7 the VNNI ports take (AVX-512;
// K 576, N 3072, 8 rows, one thread, L2-resident weights). BPG: blocks of 32 columns per group (g / 32), a
// constant so no division runs in the loops (a 64-bit idiv per block had made a batch of 8 rows 3x slower
// than its arithmetic). Every row's arithmetic is its own: the result does not depend on MT or NB.
// LAYOUT: INT4_ZEROS (bf16 scales and zeros), or a GGUF's INT4_Q4_0 / INT4_Q4_K / INT4_Q6_K (BPG 1).

// INT4_Q6_K: block blk (32 columns) of MT rows against NB blocks of 16 weight rows -> group[m * NB + i] += its dot
// products, w = d sc (q - 32) with d left to int4_tile (once per group). Per sub-block of 16 columns (two steps) and
// pass (the activations' high, low): S = sum_k q x less 32 sum_k x, times sc, all in int32 (|S| <= 16 * 32 * 127,
// times |sc| <= 128, two sub-blocks: < 2^24, so exact in fp32 too), then the block's two passes in float as int4's.
// AVX2's int16 sums (an Acc that is not Ints) are widened to int32 every step: they hold one step's products.
template <int MT, int NB>
static inline void q6_k_block(const Int8Rows &xq, int64_t m0, int64_t K, const uint8_t *p, int64_t block_bytes, int64_t ahead,
                              int64_t blk, Floats *group) {
    Ints scaled[MT][NB][2] = {};  // per row, block and pass: sum over the sub-blocks of sc S
    for (int sub = 0; sub < 2; sub++) {
        Ints sums[MT][NB][2] = {};
        for (int step = 2 * sub; step < 2 * sub + 2; step++) {
            Bytes lo[NB], hi[NB];
            for (int i = 0; i < NB; i++) {
                const uint8_t *codes = p + i * block_bytes + 32 + step * 64, *plane = p + i * block_bytes + 32 + 256 + sub * 64;
                prefetch(codes + ahead);
                const Bytes v = load_bytes(codes), high_bits = load_bytes(plane);
                if (step % 2 == 0) {  // the plane's bits 0-3; the odd step takes 4-7
                    prefetch(plane + ahead);
                    lo[i] = six_bit_codes<0>(low_nibbles(v), high_bits), hi[i] = six_bit_codes<2>(high_nibbles(v), high_bits);
                } else {
                    lo[i] = six_bit_codes<4>(low_nibbles(v), high_bits), hi[i] = six_bit_codes<6>(high_nibbles(v), high_bits);
                }
            }
            for (int m = 0; m < MT; m++) {
                const int64_t k = (m0 + m) * K + blk * 32 + step * 8;
                const int32_t h0 = load4(&xq.hi[k]), h4 = load4(&xq.hi[k + 4]), l0 = load4(&xq.lo[k]), l4 = load4(&xq.lo[k + 4]);
                for (int i = 0; i < NB; i++) {
                    if constexpr (std::is_same_v<Acc, Ints>) {  // int32 sums: the dot products add into them
                        sums[m][i][0] = dot4(dot4(sums[m][i][0], lo[i], h0), hi[i], h4);
                        sums[m][i][1] = dot4(dot4(sums[m][i][1], lo[i], l0), hi[i], l4);
                    } else {
                        sums[m][i][0] = add_ints(sums[m][i][0], acc_ints(dot4(dot4(acc_zero(), lo[i], h0), hi[i], h4)));
                        sums[m][i][1] = add_ints(sums[m][i][1], acc_ints(dot4(dot4(acc_zero(), lo[i], l0), hi[i], l4)));
                    }
                }
            }
        }
        for (int i = 0; i < NB; i++) {
            const Ints sc = sub_ints(load_u8_ints(p + i * block_bytes + sub * ROWS), ints_set1(128));
            for (int m = 0; m < MT; m++) {
                const int64_t at = (m0 + m) * (K / 16) + blk * 2 + sub;
                const Ints hi_part = sub_ints(sums[m][i][0], ints_set1(32 * xq.sub_sum_hi[at]));
                const Ints lo_part = sub_ints(sums[m][i][1], ints_set1(32 * xq.sub_sum_lo[at]));
                scaled[m][i][0] = add_ints(scaled[m][i][0], mul_ints(sc, hi_part));
                scaled[m][i][1] = add_ints(scaled[m][i][1], mul_ints(sc, lo_part));
            }
        }
    }
    for (int m = 0; m < MT; m++)
        for (int i = 0; i < NB; i++) {
            const int64_t b = (m0 + m) * (K / 32) + blk;
            group[m * NB + i] = fma(to_floats(scaled[m][i][0]), f_set1(xq.d[b]), group[m * NB + i]);
            group[m * NB + i] = fma(to_floats(scaled[m][i][1]), f_set1(xq.d_lo[b]), group[m * NB + i]);
        }
}

template <int MT, int NB, int BPG, int LAYOUT>
static void int4_tile(const Int8Rows &xq, int64_t m0, int64_t K, const uint8_t *p, int64_t block_bytes, int64_t ahead, Floats *res) {
    const int64_t g = BPG * 32, G = K / g, B = K / 32, header = LAYOUT == INT4_ZEROS ? 64 : 32;
    Floats d[NB], dmin[NB];  // INT4_Q4_K: the super-block's, for its 8 groups
    for (int m = 0; m < MT * NB; m++) res[m] = f_zero();
    for (int64_t gi = 0; gi < G; gi++, p += int4_group_bytes(g, LAYOUT)) {
        if (super_header(LAYOUT) && gi % 8 == 0) {
            for (int i = 0; i < NB; i++) {
                const uint16_t *dd = reinterpret_cast<const uint16_t *>(p + i * block_bytes);
                d[i] = load_f16(dd);
                if (LAYOUT == INT4_Q4_K) dmin[i] = load_f16(dd + ROWS);
            }
            p += super_header(LAYOUT);
        }
        Floats group[MT * NB];
        for (int m = 0; m < MT * NB; m++) group[m] = f_zero();
        if constexpr (LAYOUT == INT4_Q6_K) {
            q6_k_block<MT, NB>(xq, m0, K, p, block_bytes, ahead, gi, group);
            for (int i = 0; i < NB; i++)
                for (int m = 0; m < MT; m++) res[m * NB + i] = fma(d[i], group[m * NB + i], res[m * NB + i]);
            continue;
        }
        for (int j = 0; j < BPG; j++) {
            const int64_t blk = gi * BPG + j;
            // per row and block, each pass (the activations' high, low) keeps ACC_SPLIT independent sums (simd.h)
            Acc acc[MT][NB][2][ACC_SPLIT];
            for (int m = 0; m < MT; m++)
                for (int i = 0; i < NB; i++)
                    for (int pass = 0; pass < 2; pass++)
                        for (int c = 0; c < ACC_SPLIT; c++) acc[m][i][pass][c] = acc_zero();
            for (int step = 0; step < 4; step++) {
                Bytes lo[NB], hi[NB];
                for (int i = 0; i < NB; i++) {
                    const uint8_t *codes = p + i * block_bytes + header + j * 256 + step * 64;
                    prefetch(codes + ahead);
                    const Bytes v = load_bytes(codes);
                    lo[i] = low_nibbles(v), hi[i] = high_nibbles(v);
                }
                for (int m = 0; m < MT; m++) {
                    const int64_t k = (m0 + m) * K + blk * 32 + step * 8;
                    const int32_t h0 = load4(&xq.hi[k]), h4 = load4(&xq.hi[k + 4]), l0 = load4(&xq.lo[k]), l4 = load4(&xq.lo[k + 4]);
                    for (int i = 0; i < NB; i++) {
                        Acc *hi_pass = acc[m][i][0], *lo_pass = acc[m][i][1];
                        hi_pass[0] = dot4(hi_pass[0], lo[i], h0);
                        hi_pass[ACC_SPLIT - 1] = dot4(hi_pass[ACC_SPLIT - 1], hi[i], h4);
                        lo_pass[0] = dot4(lo_pass[0], lo[i], l0);
                        lo_pass[ACC_SPLIT - 1] = dot4(lo_pass[ACC_SPLIT - 1], hi[i], l4);
                    }
                }
            }
            for (int m = 0; m < MT; m++)
                for (int i = 0; i < NB; i++) {
                    Ints sums[2];
                    for (int pass = 0; pass < 2; pass++) {
                        sums[pass] = acc_ints(acc[m][i][pass][0]);
                        for (int c = 1; c < ACC_SPLIT; c++) sums[pass] = add_ints(sums[pass], acc_ints(acc[m][i][pass][c]));
                    }
                    Floats &gr = group[m * NB + i];
                    gr = fma(to_floats(sums[0]), f_set1(xq.d[(m0 + m) * B + blk]), gr);
                    gr = fma(to_floats(sums[1]), f_set1(xq.d_lo[(m0 + m) * B + blk]), gr);
                }
        }
        for (int i = 0; i < NB; i++) {
            const uint8_t *h = p + i * block_bytes;
            const uint16_t *scales = reinterpret_cast<const uint16_t *>(h);
            Floats s, offset;  // w = s q + offset
            if (LAYOUT == INT4_ZEROS) s = load_bf16(scales), offset = fnma(f_set1(8.f), s, load_bf16(scales + ROWS));  // zero - 8 s
            if (LAYOUT == INT4_Q4_0) s = load_f16(scales), offset = fnma(f_set1(8.f), s, f_zero());  // -8 d
            if (LAYOUT == INT4_Q4_K) s = fma(d[i], load_u8(h), f_zero()), offset = fnma(dmin[i], load_u8(h + ROWS), f_zero());  // d sc, -dmin m
            for (int m = 0; m < MT; m++) {
                res[m * NB + i] = fma(s, group[m * NB + i], res[m * NB + i]);
                res[m * NB + i] = fma(offset, f_set1(xq.group_sum[(m0 + m) * G + gi]), res[m * NB + i]);
            }
        }
    }
}

// All M rows of x through NB blocks from block b on -> out (M, N) row-major: tiles of MT rows, then single rows.
template <int MT, int NB, int LAYOUT>
static void int4_blocks(const Int8Rows &xq, int64_t M, int64_t K, int64_t g, const uint8_t *packed, int64_t N, int64_t b,
                        const float *bias, float *out) {
    const int64_t block_bytes = int4_packed_bytes(ROWS, K, g, LAYOUT);
    const uint8_t *p = packed + b * block_bytes;
    // One block (a single row): prefetch PREFETCH bytes ahead in its stream. Two blocks (several rows, tile after
    // tile over the same weights): the same place in the next pair. At 4-8 rows the model's step still waits on
    // memory and arithmetic in turn; 2048 bytes ahead, 2 or 4 blocks ahead, into L1 or L2, or spread over the
    // tiles all measured alike (docs/BENCHMARKS.md). Past the last pair it names no memory: prefetches never fault.
    const int64_t ahead = NB == 1 ? PREFETCH : NB * block_bytes;
    Floats res[MT * NB];
    auto tile = [&](auto rows, int64_t m) {
        constexpr int R = decltype(rows)::value;
        if constexpr (LAYOUT != INT4_ZEROS) int4_tile<R, NB, 1, LAYOUT>(xq, m, K, p, block_bytes, ahead, res);  // g 32
        else if (g == 32) int4_tile<R, NB, 1, LAYOUT>(xq, m, K, p, block_bytes, ahead, res);
        else if (g == 64) int4_tile<R, NB, 2, LAYOUT>(xq, m, K, p, block_bytes, ahead, res);
        else int4_tile<R, NB, 4, LAYOUT>(xq, m, K, p, block_bytes, ahead, res);
        for (int i = 0; i < NB; i++) {
            const int64_t n0 = (b + i) * ROWS, n = std::min<int64_t>(ROWS, N - n0);
            const Floats bias_v = bias ? load_floats(bias + n0, n) : f_zero();
            for (int r = 0; r < R; r++) store_floats(out + (m + r) * N + n0, f_add(res[r * NB + i], bias_v), n);
        }
    };
    int64_t m = 0;
    for (; m + MT <= M; m += MT) tile(std::integral_constant<int, MT>(), m);  // MT input rows share each loaded weight vector
    for (; m < M; m++) tile(std::integral_constant<int, 1>(), m);
}

template <int LAYOUT>
static void int4_unit(const Int8Rows &xq, int64_t M, int64_t K, int64_t g, const uint8_t *packed, int64_t N, int64_t u,
                      int64_t pairs, const float *bias, float *out) {
    if (u < pairs) int4_blocks<2, 2, LAYOUT>(xq, M, K, g, packed, N, 2 * u, bias, out);
    else int4_blocks<INT4_ROW_TILE, 1, LAYOUT>(xq, M, K, g, packed, N, u + pairs, bias, out);
}

// out (M, N) = x (M, K) @ w^T + bias, w packed by int4_pack (layout INT4_ZEROS; g 32, 64 or 128) or int4_pack_gguf
// (g 32). One row (a decode step of one sequence) reads each block once; several rows take tiles of INT4_ROW_TILE
// rows, and on AVX-512 the blocks two at a time (int4_tile).
extern "C" void int4_linear(const float *x, int64_t M, int64_t K, const uint8_t *packed, int64_t N, int64_t g, int layout,
                            const float *bias, float *out, int nthreads) {
    Int8Rows xq(x, M, K, g);
    const int64_t blocks = (N + ROWS - 1) / ROWS, pairs = INT4_BLOCK_PAIRS && M > 1 ? blocks / 2 : 0;
#pragma omp parallel num_threads(nthreads)
    {
        xq.round_in_team();
#pragma omp for schedule(static)
        for (int64_t u = 0; u < blocks - pairs; u++) {  // pairs of blocks first, then the blocks left
            if (layout == INT4_Q4_0) int4_unit<INT4_Q4_0>(xq, M, K, g, packed, N, u, pairs, bias, out);
            else if (layout == INT4_Q4_K) int4_unit<INT4_Q4_K>(xq, M, K, g, packed, N, u, pairs, bias, out);
            else if (layout == INT4_Q6_K) int4_unit<INT4_Q6_K>(xq, M, K, g, packed, N, u, pairs, bias, out);
            else int4_unit<INT4_ZEROS>(xq, M, K, g, packed, N, u, pairs, bias, out);
        }
    }
}

// ------------------------------------------------------------------------------------------ int8 x int8

// int8 weights multiplied in integers like the int4 weights above, with the same two-pass activations
// (Int8Rows): a batch's rows then cost integer dot products, 4 products a lane per instruction, instead of a
// float FMA per weight (int8_linear below: SmolLM2's 49k x 576 head, 8 rows 5.9 ms there against 3.6 here on
// AVX-512). One row reads the same bytes as int8_linear's and is no slower (SmolLM2's head 0.85 against 1.19 ms;
// Gemma 3's 168 MB alike within the noise); bench/bench_kernels.py's last table.
//
// Layout (int8_pack): blocks of 16 output rows, each K/4 steps of 64 bytes, a step holding each row's four
// weights k..k+3 in its 4-byte lane, stored as q + 128 (vpdpbusd multiplies unsigned bytes by signed ones, and
// the activations are the signed side); rows past N hold 128, a zero weight. So
//   sum_k q x = sum_k (q + 128) x - 128 sum_k x, the last sum Int8Rows' group_sum with one group (g = K).

extern "C" int64_t int8_packed_bytes(int64_t N, int64_t K) { return (N + ROWS - 1) / ROWS * ROWS * K; }

// w (N, K) int8 -> out (int8_packed_bytes) in the layout above
extern "C" void int8_pack(const int8_t *w, int64_t N, int64_t K, uint8_t *out) {
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        uint8_t *o = out + b * ROWS * K;  // written in order: a step of 4 bytes from each of the 16 rows
        for (int64_t step = 0; step < K / 4; step++)
            for (int r = 0; r < ROWS; r++, o += 4) {
                uint32_t v = 0;  // rows past N: 0 ^ 0x80 = 128, a zero weight
                if (b * ROWS + r < N) std::memcpy(&v, w + (b * ROWS + r) * K + step * 4, 4);
                v ^= 0x80808080u;  // q + 128 in each byte (two's complement int8 -> offset binary)
                std::memcpy(o, &v, 4);
            }
    }
}

// The inverse of int8_pack: the kernel's layout -> w (N, K) int8, for a layer that keeps only the kernel's layout
// (pocketlm/quant/int8.py) when its rows are read (saving, a prompt's float matmul)
extern "C" void int8_unpack(const uint8_t *packed, int64_t N, int64_t K, int8_t *w) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *p = packed + n / ROWS * ROWS * K + n % ROWS * 4;
        for (int64_t k = 0; k < K; k++) w[n * K + k] = int8_t(int(p[k / 4 * 64 + k % 4]) - 128);
    }
}

// MT activation rows (from row m0) against one block of 16 weight rows -> res[m] lane r = sum_k (q + 128) x
template <int MT>
static void int8_block(const Int8Rows &xq, int64_t m0, int64_t K, const uint8_t *p, Floats *res) {
    const int64_t B = K / 32;
    for (int m = 0; m < MT; m++) res[m] = f_zero();
    for (int64_t blk = 0; blk < B; blk++, p += 8 * 64) {
        Ints acc[MT][2];  // per row: the activations' high pass, their low pass
        for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = acc_ints(acc_zero());
        for (int step = 0; step < 8; step++) {
            prefetch(p + step * 64 + PREFETCH);
            const Weights8 v = prepare_u8(load_bytes(p + step * 64));
            for (int m = 0; m < MT; m++) {
                const int64_t k = (m0 + m) * K + blk * 32 + step * 4;
                acc[m][0] = dot4_u8(acc[m][0], v, load4(&xq.hi[k]));
                acc[m][1] = dot4_u8(acc[m][1], v, load4(&xq.lo[k]));
            }
        }
        for (int m = 0; m < MT; m++) {
            acc[m][0] = u8_offset(acc[m][0], xq.block_sum_hi[(m0 + m) * B + blk]);
            acc[m][1] = u8_offset(acc[m][1], xq.block_sum_lo[(m0 + m) * B + blk]);
            res[m] = fma(to_floats(acc[m][0]), f_set1(xq.d[(m0 + m) * B + blk]), res[m]);
            res[m] = fma(to_floats(acc[m][1]), f_set1(xq.d_lo[(m0 + m) * B + blk]), res[m]);
        }
    }
}

// out (M, N) = x (M, K) @ w^T + bias, w packed by int8_pack with one bf16 scale per output row; K a multiple of 32.
extern "C" void int8_packed_linear(const float *x, int64_t M, int64_t K, const uint8_t *packed, const uint16_t *scales,
                                   int64_t N, const float *bias, float *out, int nthreads) {
    Int8Rows xq(x, M, K, K);
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(nthreads)
    {
        xq.round_in_team();  // one unit a row (g = K)
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *p = packed + b * ROWS * K;
            const int64_t n0 = b * ROWS, n = std::min<int64_t>(ROWS, N - n0);
            const Floats s = load_bf16(scales + n0, n), bias_v = bias ? load_floats(bias + n0, n) : f_zero();
            auto store = [&](int64_t m, Floats r) {  // (sum (q + 128) x - 128 sum x) * scale + bias
                r = fnma(f_set1(128.f), f_set1(xq.group_sum[m]), r);
                store_floats(out + m * N + n0, fma(r, s, bias_v), n);
            };
            // tiles of 8, 4, 2 rows (as many as INT8_ROW_TILE allows), then one: written out, since through a
            // lambda the compiler kept the 8-row tile's sums in memory (SmolLM2's head, 8 rows: 9.3 -> 12.9 ms)
            Floats res[8];
            int64_t m = 0;
            for (; INT8_ROW_TILE >= 8 && m + 8 <= M; m += 8) {
                int8_block<INT8_ROW_TILE >= 8 ? 8 : 1>(xq, m, K, p, res);
                for (int i = 0; i < 8; i++) store(m + i, res[i]);
            }
            for (; INT8_ROW_TILE >= 4 && m + 4 <= M; m += 4) {
                int8_block<INT8_ROW_TILE >= 4 ? 4 : 1>(xq, m, K, p, res);
                for (int i = 0; i < 4; i++) store(m + i, res[i]);
            }
            for (; INT8_ROW_TILE >= 2 && m + 2 <= M; m += 2) {  // a speculative check's two rows, a batch's last two
                int8_block<2>(xq, m, K, p, res);
                for (int i = 0; i < 2; i++) store(m + i, res[i]);
            }
            for (; m < M; m++) {
                int8_block<1>(xq, m, K, p, res);
                store(m, res[0]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------ int8 x fp32

template <int MT>
static void int8_row(const float *x, int64_t K, const int8_t *w, float *res) {
    float tail[MT] = {};
    int64_t k = 0;
#if defined(POCKETLM_VEC)
    // four sums per row over alternate LANES-column steps: one chain of FMAs would wait out each one's 4-cycle
    // latency (a single row then reads 11 GB/s per core, under what the memory gives two cores)
    Vec acc[MT][4];
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = v_zero();
    for (; k + 4 * LANES <= K; k += 4 * LANES) {
        prefetch(w + k + PREFETCH);
        for (int c = 0; c < 4; c++) {
            const Vec wv = v_load_i8(w + k + LANES * c);
            for (int m = 0; m < MT; m++) acc[m][c] = v_fma(wv, v_load(x + m * K + k + LANES * c), acc[m][c]);
        }
    }
    for (; k + LANES <= K; k += LANES) {
        const Vec wv = v_load_i8(w + k);
        for (int m = 0; m < MT; m++) acc[m][0] = v_fma(wv, v_load(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < MT; m++) tail[m] = v_sum(v_add(v_add(acc[m][0], acc[m][1]), v_add(acc[m][2], acc[m][3])));
#endif
    for (; k < K; k++)
        for (int m = 0; m < MT; m++) tail[m] += float(w[k]) * x[m * K + k];
    for (int m = 0; m < MT; m++) res[m] = tail[m];
}

// out (M, N) = x (M, K) @ w^T + bias, w int8 with one bf16 scale per output row.
extern "C" void int8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const uint16_t *scales, int64_t N,
                            const float *bias, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = w + n * K;
        const float s = bf16_to_float(scales[n]), b = bias ? bias[n] : 0.f;
        float res[4];
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            int8_row<4>(x + m * K, K, row, res);
            for (int i = 0; i < 4; i++) out[(m + i) * N + n] = res[i] * s + b;
        }
        for (; m < M; m++) {
            int8_row<1>(x + m * K, K, row, res);
            out[m * N + n] = res[0] * s + b;
        }
    }
}

// out (M, N) = x (M, K) @ w^T + bias for a float model's weight (N, K) fp32 (decode_step's few rows: each weight
// row is read once for all of them)
static void fp32_linear(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) out[m * N + n] = dot(x + m * K, w + n * K, K) + (bias ? bias[n] : 0.f);
}

// ------------------------------------------------------------------------------------------ norms, MLP

// out = x * rsqrt(mean(x^2) + eps) * (w + unit_offset) per row of D: LlamaRMSNorm (unit_offset 0) and
// Gemma3RMSNorm (unit_offset 1, its (1 + weight)), both in fp32.
static void rms_norm_row(const float *x, int64_t D, const float *w, float eps, float unit_offset, float *out) {
    const float r = 1.f / std::sqrt(dot(x, x, D) / float(D) + eps);
#pragma omp simd
    for (int64_t i = 0; i < D; i++) out[i] = x[i] * r * (w[i] + unit_offset);
}

extern "C" void rms_norm(const float *x, int64_t M, int64_t D, const float *w, float eps, float unit_offset, float *out) {
    for (int64_t m = 0; m < M; m++) rms_norm_row(x + m * D, D, w, eps, unit_offset, out + m * D);
}

// out (M, F) = act(gate) * up for gate_up (M, 2F) = [gate | up]: SwiGLU (gelu 0: silu, LlamaMLP) or GeGLU
// (gelu 1: gelu with the tanh approximation, Gemma3MLP, torch's formula). Both are gate * sigmoid(a):
// a = gate for silu, and 0.5 (1 + tanh(u)) = sigmoid(2u) for gelu-tanh, u = sqrt(2/pi) (g + 0.044715 g^3).
extern "C" void gated_act(const float *gate_up, int64_t M, int64_t F, int gelu, float *out) {
    std::vector<float> e(F);
    for (int64_t m = 0; m < M; m++) {
        const float *gate = gate_up + m * 2 * F, *up = gate + F;
        float *o = out + m * F;
        for (int64_t i = 0; i < F; i++) {
            const float g = gate[i];
            e[i] = gelu ? -2.f * 0.7978845608028654f * (g + 0.044715f * g * g * g) : -g;
        }
        exp_inplace(e.data(), F);  // exp(-a)
        for (int64_t i = 0; i < F; i++) o[i] = gate[i] / (1.f + e[i]) * up[i];
    }
}

// ------------------------------------------------------------------------------------------ attention

// RoPE, NeoX half-split layout (HF's apply_rotary_pos_emb): y = x * cos + rotate_half(x) * sin; a query or key
// head is first normalized when norm (hd) is given (Gemma 3's q_norm/k_norm, unit offset 1). scratch: hd floats.
// RoPE on the first rd channels of a head (cos, sin (rd), their halves rotated together as HF's rotate_half), the
// other hd - rd passed through (Phi-3's partial rotary; rd = hd elsewhere)
static void norm_rope(const float *x, const float *norm, float eps, const float *cos, const float *sin, int64_t hd, int64_t rd,
                      float *scratch, float *y) {
    if (norm) {
        rms_norm_row(x, hd, norm, eps, 1.f, scratch);
        x = scratch;
    }
    const int64_t half = rd / 2;
    for (int64_t i = 0; i < half; i++) {
        y[i] = x[i] * cos[i] - x[i + half] * sin[i];
        y[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
    std::copy(x + rd, x + hd, y + rd);
}

// Decode attention: the positions are split between the threads (flash-decoding's split, so a model with one
// key/value head still uses every core); within a thread, each query head holds its query and output in
// registers while it streams its key/value head's rows, which stay in L2 for the next query head of the group.

template <typename C>
static inline float dot_kv(const float *q, const C *k, int64_t n) {
    if constexpr (std::is_same_v<C, float>) {
        return dot(q, k, n);
    } else {
        float total = 0.f;
        for (int64_t i = 0; i < n; i++) total += q[i] * kv_float(k[i]);
        return total;
    }
}

// scores p[h * L + s] = q_h . K_{h / group}[s] * scale for s in [s0, s1); C: the cache's element (float, or fp16 bits)
template <int NV, typename C>  // NV: vectors of LANES floats per head (hd / LANES), 0 where no vector path runs
static void scores_range(const float *q, const C *K, int64_t S, int64_t hd, int64_t nh, int64_t n_kv, int64_t L,
                         int64_t s0, int64_t s1, float scale, float *p) {
    for (int64_t h = 0; h < nh; h++) {
        const C *Kh = K + (h / (nh / n_kv)) * S * hd;
        const float *qh = q + h * hd;
        float *ph = p + h * L;
#if defined(POCKETLM_VEC)
        if (NV) {
            Vec qv[NV ? NV : 1];
            for (int i = 0; i < NV; i++) qv[i] = v_load(qh + LANES * i);
            int64_t s = s0;
            for (; s + LANES <= s1; s += LANES) {  // LANES positions, their sums folded together (v_reduce)
                Vec acc[LANES];
                for (int j = 0; j < LANES; j++) {
                    const C *row = Kh + (s + j) * hd;
                    Vec a = v_mul(qv[0], v_load(row));
                    for (int i = 1; i < NV; i++) a = v_fma(qv[i], v_load(row + LANES * i), a);
                    acc[REDUCE_ORDER[j]] = a;
                }
                v_store(ph + s, v_mul(v_reduce(acc), v_set1(scale)));
            }
            for (; s < s1; s++) {
                const C *row = Kh + s * hd;
                Vec a = v_mul(qv[0], v_load(row)), b = v_zero();  // two chains
                for (int i = 1; i < NV; i++)
                    if (i % 2) b = v_fma(qv[i], v_load(row + LANES * i), b);
                    else a = v_fma(qv[i], v_load(row + LANES * i), a);
                ph[s] = v_sum(v_add(a, b)) * scale;
            }
            continue;
        }
#endif
        for (int64_t s = s0; s < s1; s++) ph[s] = dot_kv(qh, Kh + s * hd, hd) * scale;
    }
}

// o[h] = sum_s p[h * L + s] V_{h / group}[s] for s in [s0, s1); o (nh, hd)
template <int NV, typename C>
static void values_range(const float *p, const C *Vc, int64_t S, int64_t hd, int64_t nh, int64_t n_kv, int64_t L,
                         int64_t s0, int64_t s1, float *o) {
    for (int64_t h = 0; h < nh; h++) {
        const C *Vh = Vc + (h / (nh / n_kv)) * S * hd;
        const float *ph = p + h * L;
        float *oh = o + h * hd;
#if defined(POCKETLM_VEC)
        if (NV) {
            Vec acc[NV ? NV : 1];
            for (int i = 0; i < NV; i++) acc[i] = v_zero();
            for (int64_t s = s0; s < s1; s++) {
                const Vec w = v_set1(ph[s]);
                for (int i = 0; i < NV; i++) acc[i] = v_fma(w, v_load(Vh + s * hd + LANES * i), acc[i]);
            }
            for (int i = 0; i < NV; i++) v_store(oh + LANES * i, acc[i]);
            continue;
        }
#endif
        std::fill(oh, oh + hd, 0.f);
        for (int64_t s = s0; s < s1; s++)
#pragma omp simd
            for (int64_t i = 0; i < hd; i++) oh[i] += ph[s] * kv_float(Vh[s * hd + i]);
    }
}

// softcap > 0: each score s becomes tanh(s / softcap) * softcap before the softmax (Gemma 2's attention logit
// soft-capping, as transformers' Gemma2 eager_attention_forward); 0: scores as they are
template <int NV, typename C>
static void attend(const float *q, const C *K, const C *V, int64_t S, int64_t hd, int64_t nh, int64_t n_kv,
                   int64_t L, float scale, float softcap, float *out, int nthreads) {
    std::vector<float> p(nh * L), partial(int64_t(nthreads) * nh * hd, 0.f), inv(nh);
    auto softmax = [&](int64_t h) {
        float *ph = p.data() + h * L;
        if (softcap > 0.f)
            for (int64_t s = 0; s < L; s++) ph[s] = std::tanh(ph[s] / softcap) * softcap;
        inv[h] = 1.f / exp_shifted_sum(ph, L);  // 1 / sum kept
    };
    if (nthreads == 1) {  // a batch's row inside decode_step's parallel loop, or a short context: no team of one
        // (opening one cost about as much as the arithmetic at SmolLM2's 100 positions); the same arithmetic
        scores_range<NV, C>(q, K, S, hd, nh, n_kv, L, 0, L, scale, p.data());
        for (int64_t h = 0; h < nh; h++) softmax(h);
        values_range<NV, C>(p.data(), V, S, hd, nh, n_kv, L, 0, L, partial.data());
    } else {
#pragma omp parallel num_threads(nthreads)
        {
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t s0 = L * t / T, s1 = L * (t + 1) / T;
            scores_range<NV, C>(q, K, S, hd, nh, n_kv, L, s0, s1, scale, p.data());
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t h = 0; h < nh; h++) softmax(h);
            values_range<NV, C>(p.data(), V, S, hd, nh, n_kv, L, s0, s1, partial.data() + t * nh * hd);
        }
    }
    for (int64_t i = 0; i < nh * hd; i++) {
        float total = 0.f;
        for (int t = 0; t < nthreads; t++) total += partial[t * nh * hd + i];
        out[i] = total * inv[i / hd];
    }
}

template <typename C>
static void attend_decode_kv(const float *q, const float *k_new, const float *v_new, int64_t nh, int64_t n_kv, int64_t hd,
                             const float *cos, const float *sin, int64_t rd, const float *q_norm, const float *k_norm, float norm_eps,
                             C *k_cache, C *v_cache, int64_t S, int64_t pos, int64_t begin, float scale, float softcap, float *out,
                             int nthreads) {
    std::vector<float> scratch(hd), rotated(hd), qr(nh * hd);
    for (int64_t h = 0; h < n_kv; h++) {
        norm_rope(k_new + h * hd, k_norm, norm_eps, cos, sin, hd, rd, scratch.data(), rotated.data());
        kv_store(rotated.data(), hd, k_cache + (h * S + pos) * hd);
        kv_store(v_new + h * hd, hd, v_cache + (h * S + pos) * hd);
    }
    for (int64_t h = 0; h < nh; h++) norm_rope(q + h * hd, q_norm, norm_eps, cos, sin, hd, rd, scratch.data(), qr.data() + h * hd);
    const int64_t L = pos + 1 - begin;
    const C *K = k_cache + begin * hd, *V = v_cache + begin * hd;
    nthreads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, L / 64)));  // a short context is not worth a split
#if defined(POCKETLM_VEC)
    switch (hd) {  // a head in registers: hd / LANES vectors
        case 64: return attend<64 / LANES, C>(qr.data(), K, V, S, hd, nh, n_kv, L, scale, softcap, out, nthreads);
        case 128: return attend<128 / LANES, C>(qr.data(), K, V, S, hd, nh, n_kv, L, scale, softcap, out, nthreads);
        case 256: return attend<256 / LANES, C>(qr.data(), K, V, S, hd, nh, n_kv, L, scale, softcap, out, nthreads);
    }
#endif
    attend<0, C>(qr.data(), K, V, S, hd, nh, n_kv, L, scale, softcap, out, nthreads);
}


// One decoded token of one sequence, all heads: q (nh * hd), k, v (n_kv * hd) from the projections; q_norm,
// k_norm (hd) or null (Gemma 3's per-head RMSNorm, unit offset 1, before RoPE); cos, sin (rd) at position pos: RoPE on
// the first rd channels of each head (rd = hd but for Phi-3's partial rotary).
// Writes the new key and value into the cache (n_kv, S, hd; fp32, or fp16 with kv_half) at pos, then attends
// over cache positions begin..pos (a sliding window starts after 0), its scores soft-capped when softcap > 0 (Gemma 2).
// out (nh * hd). Matches SDPA with enable_gqa: query head h reads key/value head h / (nh / n_kv).
extern "C" void attend_decode(const float *q, const float *k_new, const float *v_new, int64_t nh, int64_t n_kv, int64_t hd,
                              const float *cos, const float *sin, int64_t rd, const float *q_norm, const float *k_norm, float norm_eps,
                              void *k_cache, void *v_cache, int kv_half, int64_t S, int64_t pos, int64_t begin, float scale,
                              float softcap, float *out, int nthreads) {
    if (kv_half)
        attend_decode_kv(q, k_new, v_new, nh, n_kv, hd, cos, sin, rd, q_norm, k_norm, norm_eps, static_cast<uint16_t *>(k_cache),
                         static_cast<uint16_t *>(v_cache), S, pos, begin, scale, softcap, out, nthreads);
    else
        attend_decode_kv(q, k_new, v_new, nh, n_kv, hd, cos, sin, rd, q_norm, k_norm, norm_eps, static_cast<float *>(k_cache),
                         static_cast<float *>(v_cache), S, pos, begin, scale, softcap, out, nthreads);
}


// ------------------------------------------------------------------------------------------ the decode step

// One decoded token of each of n sequences (or n consecutive tokens of one sequence: a speculative verify pass)
// through the whole model in one call: what pocketlm/models/llama.py and gemma3.py compute for the same input
// with a cache, op for op with the kernels above, without a Python call per layer (about 200 of them per token,
// 8 ms of SmolLM2's 18). The n rows share each weight read (the linear kernels' tiles of 4 rows do each row's
// own arithmetic, so a sequence's numbers do not depend on its neighbours); attention is per row, in its cache
// row at its own position.
// pocketlm/models/fused_step.py fills these structs from a model's modules and keeps their tensors alive.

struct Linear {  // one (N, K) weight: kind 0 fp32 (N, K); 1 int8 (N, K) with bf16 scales (N); 2 int4_pack's layout;
                 // 3 int8_pack's layout with bf16 scales (N); 4, 5 and 6 int4_pack_gguf's Q4_0, Q4_K and Q6_K layouts
    int64_t kind, N, K, g;
    const void *weight;
    const uint16_t *scales;
    const float *bias;  // or null
};

// out (M, N) = x (M, K) @ w^T + bias, for out rows `stride` floats apart (linears' side-by-side outputs)
static void linear(const Linear &l, const float *x, int64_t M, float *out, int64_t stride, std::vector<float> &tmp, int nthreads) {
    float *y = stride == l.N ? out : (tmp.resize(M * l.N), tmp.data());
    if (l.kind == 0) fp32_linear(x, M, l.K, static_cast<const float *>(l.weight), l.N, l.bias, y, nthreads);
    else if (l.kind == 1) int8_linear(x, M, l.K, static_cast<const int8_t *>(l.weight), l.scales, l.N, l.bias, y, nthreads);
    else if (l.kind == 2 || l.kind >= 4)  // int4_linear: INT4_ZEROS, INT4_Q4_0, INT4_Q4_K, INT4_Q6_K
        int4_linear(x, M, l.K, static_cast<const uint8_t *>(l.weight), l.N, l.g, l.kind == 2 ? INT4_ZEROS : int(l.kind) - 3, l.bias, y, nthreads);
    else int8_packed_linear(x, M, l.K, static_cast<const uint8_t *>(l.weight), l.scales, l.N, l.bias, y, nthreads);
    if (y != out)
        for (int64_t m = 0; m < M; m++) std::memcpy(out + m * stride, y + m * l.N, l.N * sizeof(float));
}

// Linears whose outputs lie side by side (q, k, v unfused: 3 of them; fused by fuse_projections: 1)
static void linears(const Linear *ls, int64_t count, const float *x, int64_t M, float *out, std::vector<float> &tmp, int nthreads) {
    int64_t stride = 0;
    for (int64_t i = 0; i < count; i++) stride += ls[i].N;
    for (int64_t i = 0, col = 0; i < count; col += ls[i].N, i++) linear(ls[i], x, M, out + col, stride, tmp, nthreads);
}

struct Layer {
    const float *attn_norm, *mlp_norm;             // input_layernorm; post_attention_layernorm (Llama) or pre_feedforward_layernorm (Gemma 3)
    const float *post_attn_norm, *post_mlp_norm;  // Gemma 3's post_attention_layernorm, post_feedforward_layernorm; else null
    const float *q_norm, *k_norm;                 // Gemma 3's; else null
    Linear qkv[3], gate_up[2], o, down;
    int64_t n_qkv, n_gate_up;                     // 1 when fused (fuse_projections), else 3 and 2
    void *k_cache, *v_cache;                      // (B, n_kv, S, hd): the layer's KVCache, fp32 or fp16 (Model's kv_half)
    const float *cos, *sin;                       // RoPE tables (positions, rd) of the layer's kind
    int64_t window;                               // sliding window in positions; 0: full causal attention
};

// out (D) = the embedding's row of token times scale: (V, D) fp32, or int8 with bf16 scales (V) (Int8Embedding)
static void embed_row(const void *embed, const uint16_t *embed_scales, int64_t token, int64_t D, float scale, float *out) {
    if (embed_scales) {
        const int8_t *row = static_cast<const int8_t *>(embed) + token * D;
        const float s = bf16_to_float(embed_scales[token]) * scale;
        for (int64_t j = 0; j < D; j++) out[j] = float(row[j]) * s;
    } else {
        const float *row = static_cast<const float *>(embed) + token * D;
        for (int64_t j = 0; j < D; j++) out[j] = row[j] * scale;
    }
}

struct Model {
    int64_t n_layers, D, nh, n_kv, hd, F, S;  // F: MLP width; S: cache positions
    float eps, norm_offset;                   // RMSNorm: weight + norm_offset (Gemma 3: 1)
    float attn_scale, embed_scale;
    int64_t gelu;                             // MLP activation: 0 silu, 1 gelu-tanh
    const void *embed;                        // (V, D) fp32, or int8 with embed_scales (V) bf16 (Int8Embedding)
    const uint16_t *embed_scales;
    const float *final_norm;
    Linear head;
    const Layer *layers;
    int64_t kv_half;                          // the caches hold fp16
    float attn_softcap;                       // Gemma 2's attention logit soft-capping; 0: none
    int64_t rd;                               // rotary channels of a head: hd, or fewer (Phi-3's partial rotary)
};

// logits (n_logits, V) of the last n_logits of tokens[i] at position pos[i] of cache row rows[i] (a decode step
// wants all n; a prompt chunk its last); each layer's keys and values at those positions are written into its cache.
// hidden (n_logits, D), when not null, receives those rows' final-norm hidden states (what a draft head reads).
extern "C" void decode_step(const Model *m, int64_t n, const int64_t *tokens, const int64_t *pos, const int64_t *rows,
                            float *logits, int64_t n_logits, float *hidden, int nthreads) {
    const int64_t D = m->D, F = m->F, q_dim = m->nh * m->hd, kv_dim = m->n_kv * m->hd, qkv_dim = q_dim + 2 * kv_dim;
    std::vector<float> x(n * D), h(n * D), qkv(n * qkv_dim), y(n * q_dim), gate_up(n * 2 * F), act(n * F), out(n * D), tmp;
    for (int64_t i = 0; i < n; i++) embed_row(m->embed, m->embed_scales, tokens[i], D, m->embed_scale, x.data() + i * D);
    bool distinct_rows = n > 1;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < i; j++) distinct_rows &= rows[i] != rows[j];
    auto norm = [&](const float *w, const float *in, float *o) {
        for (int64_t i = 0; i < n; i++) rms_norm_row(in + i * D, D, w, m->eps, m->norm_offset, o + i * D);
    };
    // Gemma 3 normalizes a block's output before adding it; Llama adds it as it is
    auto add = [&](const float *post_norm, float *v) {
        if (post_norm) norm(post_norm, v, v);
        for (int64_t j = 0; j < n * D; j++) x[j] += v[j];
    };
    for (int64_t l = 0; l < m->n_layers; l++) {
        const Layer &L = m->layers[l];
        norm(L.attn_norm, x.data(), h.data());
        linears(L.qkv, L.n_qkv, h.data(), n, qkv.data(), tmp, nthreads);
        auto attend_row = [&](int64_t i, int threads) {
            const float *qi = qkv.data() + i * qkv_dim;
            const int64_t p = pos[i], begin = L.window ? std::max<int64_t>(0, p - L.window + 1) : 0;
            const int64_t row = rows[i] * m->n_kv * m->S * m->hd * (m->kv_half ? 2 : 4);  // bytes
            attend_decode(qi, qi + q_dim, qi + q_dim + kv_dim, m->nh, m->n_kv, m->hd, L.cos + p * m->rd, L.sin + p * m->rd, m->rd, L.q_norm,
                          L.k_norm, m->eps, static_cast<char *>(L.k_cache) + row, static_cast<char *>(L.v_cache) + row, int(m->kv_half),
                          m->S, p, begin, m->attn_scale, m->attn_softcap, y.data() + i * q_dim, threads);
        };
        if (distinct_rows) {  // sequences of a batch: one per thread (a short context leaves attend_decode one thread)
#pragma omp parallel for num_threads(nthreads) schedule(dynamic)
            for (int64_t i = 0; i < n; i++) attend_row(i, 1);
        } else {  // tokens of one sequence: each attends to the keys the ones before it wrote, so in order
            for (int64_t i = 0; i < n; i++) attend_row(i, nthreads);
        }
        linear(L.o, y.data(), n, out.data(), D, tmp, nthreads);
        add(L.post_attn_norm, out.data());
        norm(L.mlp_norm, x.data(), h.data());
        linears(L.gate_up, L.n_gate_up, h.data(), n, gate_up.data(), tmp, nthreads);
        gated_act(gate_up.data(), n, F, int(m->gelu), act.data());
        linear(L.down, act.data(), n, out.data(), D, tmp, nthreads);
        add(L.post_mlp_norm, out.data());
    }
    const int64_t first = n - n_logits;  // the head, the largest matrix, runs on the rows whose logits are wanted
    for (int64_t i = first; i < n; i++) rms_norm_row(x.data() + i * D, D, m->final_norm, m->eps, m->norm_offset, h.data() + i * D);
    linear(m->head, h.data() + first * D, n_logits, logits, m->head.N, tmp, nthreads);
    if (hidden) std::copy(h.data() + first * D, h.data() + n * D, hidden);
}

// A draft head's step (pocketlm/models/draft_head.py, DraftHead.step) in one call: state (D) := state +
// down(silu(gate) * up) of gate_up([norm(state); norm(embed(token))]), then logits (n_tokens) := head(state). The
// modules' Python glue cost about as much as reading their int4 weights (0.3 of 0.8 ms a step, SmolLM2's head).
struct DraftHead {
    int64_t D, F;
    float eps;
    const float *state_norm, *token_norm;
    Linear gate_up, down, head;
    const void *embed;  // the target's token embedding, as Model's
    const uint16_t *embed_scales;
};

extern "C" void draft_head_step(const DraftHead *m, int64_t token, float *state, float *logits, int nthreads) {
    const int64_t D = m->D, F = m->F;
    std::vector<float> e(D), z(2 * D), gate_up(2 * F), act(F), out(D), tmp;
    embed_row(m->embed, m->embed_scales, token, D, 1.f, e.data());
    rms_norm_row(state, D, m->state_norm, m->eps, 0.f, z.data());
    rms_norm_row(e.data(), D, m->token_norm, m->eps, 0.f, z.data() + D);
    linear(m->gate_up, z.data(), 1, gate_up.data(), 2 * F, tmp, nthreads);
    gated_act(gate_up.data(), 1, F, 0, act.data());
    linear(m->down, act.data(), 1, out.data(), D, tmp, nthreads);
    for (int64_t j = 0; j < D; j++) state[j] += out[j];
    linear(m->head, state, 1, logits, m->head.N, tmp, nthreads);
}
