// The integer kernels' 16 lanes, one per output row of a weight block, on each instruction-set family pocketlm
// builds for (pocketlm/kernels/__init__.py's TARGETS). cpu.cpp writes int4_linear and int8_packed_linear once
// over these types; each target says here how it holds 16 lanes and how it multiplies bytes:
//
//   avx512-vnni   one 512-bit register; vpdpbusd (4 u8 x s8 products summed into each int32 lane)
//   avx2-vnni     two 256-bit registers; AVX-VNNI's 256-bit vpdpbusd
//   avx2          two 256-bit registers; vpmaddubsw + vpmaddwd, llama.cpp's AVX2 dot products (ggml-cpu's
//                 mul_sum_us8_pairs_float): codes times activations into int16 pairs, pairs into int32
//   neon-dotprod  four 128-bit registers; sdot (4 s8 x s8 products into each int32 lane), ARMv8.2's dot product
//   scalar        plain arrays and loops: the reference every other target equals bit for bit
//
// Every target computes the same integers (exact in any order) and the same float operations per lane in the same
// order, fused where the others fuse (std::fma), so a layer's result is bit for bit the same on every target
// (tests/test_kernels.py checks each target this CPU runs against the scalar build, and aarch64 under qemu).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define POCKETLM_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define POCKETLM_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define POCKETLM_NEON 1
#include <arm_neon.h>
#endif

#if defined(POCKETLM_AVX512)
static constexpr const char *TARGET = "avx512-vnni";
#elif defined(POCKETLM_AVX2) && (defined(__AVXVNNI__) || defined(POCKETLM_AVXVNNI_AS_EVEX))
static constexpr const char *TARGET = "avx2-vnni";
#elif defined(POCKETLM_AVX2)
static constexpr const char *TARGET = "avx2";
#elif defined(POCKETLM_NEON)
static constexpr const char *TARGET = "neon-dotprod";
#else
static constexpr const char *TARGET = "scalar";
#endif

static inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// IEEE fp16 <-> fp32, rounding to nearest even: c10::Half's conversions (Marat Dukhan's FP16 library,
// fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value), so a key the kernels write equals the one torch writes
static inline float half_to_float(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_to_float(sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized)));
}

static inline uint16_t float_to_half(float f) {
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base), nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline void prefetch(const void *p) {
#if defined(POCKETLM_AVX512) || defined(POCKETLM_AVX2)
    _mm_prefetch(static_cast<const char *>(p), _MM_HINT_T0);
#else
    __builtin_prefetch(p);
#endif
}

static inline int32_t load4(const int8_t *p) {  // 4 activations as one 32-bit word
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// ----------------------------------------------------------------------------------------------------- types
//   Bytes   64 weight bytes: lane r holds bytes 4r..4r+3 (a block's 16 rows' 4 bytes each)
//   Acc     16 running integer sums of products of code bytes (0..15) and activations (-127..127). ACC_SPLIT:
//           how many independent sums a row keeps per block and pass (AVX-512 VNNI's one-register Acc wants two
//           chains against vpdpbusd's 5-cycle latency; AVX2's int16 sums hold a block's 8 products of a pass, at
//           most 8 * 2 * 15 * 127 = 30480 < 32767)
//   Ints    16 int32
//   Floats  16 fp32 (load_bf16, load_f16, load_u8: 16 scales widened, exactly)
//   Weights8  64 bytes of int8_pack's layout (q + 128) made ready for dot4_u8 once, for every activation row
// six_bit_codes<SHIFT>(nibbles, plane): Q6_K's codes 0..63, each byte's low 4 bits from `nibbles` and its high 2
// from bits SHIFT, SHIFT + 1 of the same byte of `plane` (cpu.cpp's INT4_Q6_K). dot4 takes them as it takes
// 4-bit codes; AVX2's int16 sums then hold one step's two products a lane (2 * 2 * 63 * 127 = 32004 < 32767).
// ints_set1, sub_ints, mul_ints (the low 32 bits), load_u8_ints (16 bytes widened): Q6_K's sub-block scales applied
// in integers.

#if defined(POCKETLM_AVX512)
using Bytes = __m512i;
using Acc = __m512i;
using Ints = __m512i;
using Floats = __m512;
static constexpr int ACC_SPLIT = 2;

static inline Bytes load_bytes(const uint8_t *p) { return _mm512_loadu_si512(p); }
static inline Bytes low_nibbles(Bytes v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
static inline Bytes high_nibbles(Bytes v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
template <int SHIFT>  // bits SHIFT, SHIFT + 1 of a byte -> bits 4, 5 (16-bit shifts: the mask drops what crosses bytes)
static inline Bytes six_bit_codes(Bytes nibbles, Bytes plane) {
    const __m512i high = SHIFT <= 4 ? _mm512_slli_epi16(plane, 4 - SHIFT) : _mm512_srli_epi16(plane, SHIFT - 4);
    return _mm512_ternarylogic_epi32(nibbles, high, _mm512_set1_epi8(0x30), 0xF8);  // nibbles | (high & 0x30)
}
static inline Acc acc_zero() { return _mm512_setzero_si512(); }
// acc lane r += sum_j codes[4r + j] * x[j]; codes 0..15
static inline Acc dot4(Acc acc, Bytes codes, int32_t x) { return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(x)); }
static inline Ints acc_ints(Acc a) { return a; }
static inline Ints add_ints(Ints a, Ints b) { return _mm512_add_epi32(a, b); }
static inline Ints sub_ints(Ints a, Ints b) { return _mm512_sub_epi32(a, b); }
static inline Ints mul_ints(Ints a, Ints b) { return _mm512_mullo_epi32(a, b); }
static inline Ints ints_set1(int32_t v) { return _mm512_set1_epi32(v); }
static inline Ints load_u8_ints(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
// int8_pack's weights (q + 128, bytes 0..255): lane r += sum_j w[4r + j] * x[j], and at the end of a block of 32
// activations u8_offset makes it sum_k (q + 128) x whatever dot4_u8 summed (vpdpbusd multiplies q + 128 itself)
using Weights8 = Bytes;
static inline Weights8 prepare_u8(Bytes w) { return w; }
static inline Ints dot4_u8(Ints acc, const Weights8 &w, int32_t x) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x)); }
static inline Ints u8_offset(Ints acc, int32_t) { return acc; }
static inline Floats to_floats(Ints a) { return _mm512_cvtepi32_ps(a); }
static inline Floats f_zero() { return _mm512_setzero_ps(); }
static inline Floats f_set1(float v) { return _mm512_set1_ps(v); }
static inline Floats fma(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
static inline Floats fnma(Floats a, Floats b, Floats c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
static inline Floats f_add(Floats a, Floats b) { return _mm512_add_ps(a, b); }
static inline __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
static inline Floats load_bf16(const uint16_t *p, int64_t n = 16) {  // lanes past n: 0
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p)), 16));
}
static inline Floats load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
static inline Floats load_floats(const float *p, int64_t n = 16) { return _mm512_maskz_loadu_ps(first(n), p); }
static inline void store_floats(float *p, Floats v, int64_t n = 16) { _mm512_mask_storeu_ps(p, first(n), v); }

#elif defined(POCKETLM_AVX2)
struct Bytes { __m256i lo, hi; };  // rows 0-7, rows 8-15
struct Ints { __m256i lo, hi; };
struct Floats { __m256 lo, hi; };

static inline Bytes load_bytes(const uint8_t *p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)), _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + 32))};
}
static inline Bytes low_nibbles(Bytes v) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(v.lo, m), _mm256_and_si256(v.hi, m)};
}
static inline Bytes high_nibbles(Bytes v) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(_mm256_srli_epi16(v.lo, 4), m), _mm256_and_si256(_mm256_srli_epi16(v.hi, 4), m)};
}
template <int SHIFT>
static inline Bytes six_bit_codes(Bytes nibbles, Bytes plane) {
    const __m256i m = _mm256_set1_epi8(0x30);
    const __m256i lo = SHIFT <= 4 ? _mm256_slli_epi16(plane.lo, 4 - SHIFT) : _mm256_srli_epi16(plane.lo, SHIFT - 4);
    const __m256i hi = SHIFT <= 4 ? _mm256_slli_epi16(plane.hi, 4 - SHIFT) : _mm256_srli_epi16(plane.hi, SHIFT - 4);
    return {_mm256_or_si256(nibbles.lo, _mm256_and_si256(lo, m)), _mm256_or_si256(nibbles.hi, _mm256_and_si256(hi, m))};
}
static inline Ints add_ints(Ints a, Ints b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
static inline Ints sub_ints(Ints a, Ints b) { return {_mm256_sub_epi32(a.lo, b.lo), _mm256_sub_epi32(a.hi, b.hi)}; }
static inline Ints mul_ints(Ints a, Ints b) { return {_mm256_mullo_epi32(a.lo, b.lo), _mm256_mullo_epi32(a.hi, b.hi)}; }
static inline Ints ints_set1(int32_t v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
static inline Ints load_u8_ints(const uint8_t *p) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p + 8)))};
}

#if defined(__AVXVNNI__) || defined(POCKETLM_AVXVNNI_AS_EVEX)
// POCKETLM_AVXVNNI_AS_EVEX: the same instruction in its AVX-512 VL encoding, so that a CPU with AVX-512 VNNI but
// no AVX-VNNI (AMD's Zen 4) runs this target's code in tests (tests/test_kernel_targets.py)
#if defined(__AVXVNNI__)
#define DPBUSD256 _mm256_dpbusd_avx_epi32
#else
#define DPBUSD256 _mm256_dpbusd_epi32
#endif
using Acc = Ints;
static constexpr int ACC_SPLIT = 1;  // two registers an Acc are two chains already; two rows' Accs fill the 16 registers
static inline Acc acc_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline Acc dot4(Acc acc, Bytes codes, int32_t x) {
    const __m256i xv = _mm256_set1_epi32(x);
    return {DPBUSD256(acc.lo, codes.lo, xv), DPBUSD256(acc.hi, codes.hi, xv)};
}
static inline Ints acc_ints(Acc a) { return a; }
#else
struct Acc { __m256i lo, hi; };  // int16 sums of product pairs
static constexpr int ACC_SPLIT = 1;
static inline Acc acc_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline Acc dot4(Acc acc, Bytes codes, int32_t x) {  // codes * x <= 2 * 15 * 127 a pair: no saturation
    const __m256i xv = _mm256_set1_epi32(x);
    return {_mm256_add_epi16(acc.lo, _mm256_maddubs_epi16(codes.lo, xv)), _mm256_add_epi16(acc.hi, _mm256_maddubs_epi16(codes.hi, xv))};
}
static inline Ints acc_ints(Acc a) {  // int16 pairs -> int32 lanes
    const __m256i ones = _mm256_set1_epi16(1);
    return {_mm256_madd_epi16(a.lo, ones), _mm256_madd_epi16(a.hi, ones)};
}
#endif

// w stored as q + 128 (0..255) times x: vpmaddubsw would saturate (255 * 127 * 2 > 32767), so as llama.cpp's
// q8_0 dot product: |q| times x with q's sign (each pair <= 2 * 127 * 127) sums q x; u8_offset adds 128 sum x
// once a block, giving sum (q + 128) x, which int8_packed_linear's arithmetic expects
struct Weights8 { __m256i abs_lo, abs_hi, q_lo, q_hi; };  // |q| and q (int8) of rows 0-7 and 8-15
static inline Weights8 prepare_u8(Bytes w) {
    const __m256i flip = _mm256_set1_epi8(char(0x80));  // q + 128 -> q as int8
    const __m256i q_lo = _mm256_xor_si256(w.lo, flip), q_hi = _mm256_xor_si256(w.hi, flip);
    return {_mm256_abs_epi8(q_lo), _mm256_abs_epi8(q_hi), q_lo, q_hi};
}
static inline Ints dot4_u8(Ints acc, const Weights8 &w, int32_t x) {
    const __m256i xv = _mm256_set1_epi32(x), ones = _mm256_set1_epi16(1);
    const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(w.abs_lo, _mm256_sign_epi8(xv, w.q_lo)), ones);
    const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(w.abs_hi, _mm256_sign_epi8(xv, w.q_hi)), ones);
    return {_mm256_add_epi32(acc.lo, lo), _mm256_add_epi32(acc.hi, hi)};
}
static inline Ints u8_offset(Ints acc, int32_t x_sum) {
    const __m256i offset = _mm256_set1_epi32(128 * x_sum);
    return {_mm256_add_epi32(acc.lo, offset), _mm256_add_epi32(acc.hi, offset)};
}
static inline Floats to_floats(Ints a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
static inline Floats f_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline Floats f_set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
static inline Floats fma(Floats a, Floats b, Floats c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
static inline Floats fnma(Floats a, Floats b, Floats c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
static inline Floats f_add(Floats a, Floats b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline Floats load_bf16(const uint16_t *p, int64_t n = 16) {
    uint16_t tmp[16] = {};
    if (n < 16) p = static_cast<const uint16_t *>(std::memcpy(tmp, p, n * 2));
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16))};
}
static inline Floats load_f16(const uint16_t *p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p + 8)))};
}
static inline Floats load_floats(const float *p, int64_t n = 16) {
    float tmp[16] = {};
    if (n < 16) p = static_cast<const float *>(std::memcpy(tmp, p, n * 4));
    return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
static inline void store_floats(float *p, Floats v, int64_t n = 16) {
    if (n >= 16) {
        _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi);
        return;
    }
    float tmp[16];
    _mm256_storeu_ps(tmp, v.lo), _mm256_storeu_ps(tmp + 8, v.hi);
    std::memcpy(p, tmp, n * 4);
}

#elif defined(POCKETLM_NEON)
struct Bytes { int8x16_t v[4]; };  // rows 0-3, 4-7, 8-11, 12-15
struct Ints { int32x4_t v[4]; };
struct Floats { float32x4_t v[4]; };
using Acc = Ints;
static constexpr int ACC_SPLIT = 1;  // an Acc's four registers are four chains; two rows' Accs and the codes fit in 32

static inline Bytes load_bytes(const uint8_t *p) {
    Bytes b;
    for (int i = 0; i < 4; i++) b.v[i] = vreinterpretq_s8_u8(vld1q_u8(p + 16 * i));
    return b;
}
static inline Bytes low_nibbles(Bytes v) {
    for (int i = 0; i < 4; i++) v.v[i] = vandq_s8(v.v[i], vdupq_n_s8(0x0F));
    return v;
}
static inline Bytes high_nibbles(Bytes v) {
    for (int i = 0; i < 4; i++) v.v[i] = vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(v.v[i]), 4));
    return v;
}
template <int SHIFT>
static inline Bytes six_bit_codes(Bytes nibbles, Bytes plane) {
    for (int i = 0; i < 4; i++) {
        const uint8x16_t bits = vreinterpretq_u8_s8(plane.v[i]);
        const uint8x16_t high = SHIFT < 4 ? vshlq_n_u8(bits, SHIFT < 4 ? 4 - SHIFT : 1) : SHIFT > 4 ? vshrq_n_u8(bits, SHIFT > 4 ? SHIFT - 4 : 1) : bits;
        nibbles.v[i] = vorrq_s8(nibbles.v[i], vreinterpretq_s8_u8(vandq_u8(high, vdupq_n_u8(0x30))));
    }
    return nibbles;
}
static inline Acc acc_zero() {
    Acc a;
    for (int i = 0; i < 4; i++) a.v[i] = vdupq_n_s32(0);
    return a;
}
// codes 0..15 are the same bytes signed or not: sdot multiplies signed by signed
static inline Acc dot4(Acc acc, Bytes codes, int32_t x) {
    const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(x));
    for (int i = 0; i < 4; i++) acc.v[i] = vdotq_s32(acc.v[i], codes.v[i], xv);
    return acc;
}
static inline Ints acc_ints(Acc a) { return a; }
static inline Ints add_ints(Ints a, Ints b) {
    for (int i = 0; i < 4; i++) a.v[i] = vaddq_s32(a.v[i], b.v[i]);
    return a;
}
static inline Ints sub_ints(Ints a, Ints b) {
    for (int i = 0; i < 4; i++) a.v[i] = vsubq_s32(a.v[i], b.v[i]);
    return a;
}
static inline Ints mul_ints(Ints a, Ints b) {
    for (int i = 0; i < 4; i++) a.v[i] = vmulq_s32(a.v[i], b.v[i]);
    return a;
}
static inline Ints ints_set1(int32_t v) {
    Ints a;
    for (int i = 0; i < 4; i++) a.v[i] = vdupq_n_s32(v);
    return a;
}
static inline Ints load_u8_ints(const uint8_t *p) {
    const uint8x16_t b = vld1q_u8(p);
    const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_u8(vget_high_u8(b));
    return {{vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo))), vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(lo))),
             vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi))), vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(hi)))}};
}
// (q + 128) x = q x + 128 x: sdot sums q x (q = w ^ 0x80, signed), u8_offset adds 128 sum x once a block
using Weights8 = Bytes;
static inline Weights8 prepare_u8(Bytes w) {
    for (int i = 0; i < 4; i++) w.v[i] = veorq_s8(w.v[i], vdupq_n_s8(int8_t(0x80)));
    return w;
}
static inline Ints dot4_u8(Ints acc, const Weights8 &w, int32_t x) {
    const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(x));
    for (int i = 0; i < 4; i++) acc.v[i] = vdotq_s32(acc.v[i], w.v[i], xv);
    return acc;
}
static inline Ints u8_offset(Ints acc, int32_t x_sum) {
    for (int i = 0; i < 4; i++) acc.v[i] = vaddq_s32(acc.v[i], vdupq_n_s32(128 * x_sum));
    return acc;
}
static inline Floats to_floats(Ints a) {
    Floats f;
    for (int i = 0; i < 4; i++) f.v[i] = vcvtq_f32_s32(a.v[i]);
    return f;
}
static inline Floats f_set1(float x) {
    Floats f;
    for (int i = 0; i < 4; i++) f.v[i] = vdupq_n_f32(x);
    return f;
}
static inline Floats f_zero() { return f_set1(0.f); }
static inline Floats fma(Floats a, Floats b, Floats c) {
    for (int i = 0; i < 4; i++) c.v[i] = vfmaq_f32(c.v[i], a.v[i], b.v[i]);
    return c;
}
static inline Floats fnma(Floats a, Floats b, Floats c) {
    for (int i = 0; i < 4; i++) c.v[i] = vfmsq_f32(c.v[i], a.v[i], b.v[i]);
    return c;
}
static inline Floats f_add(Floats a, Floats b) {
    for (int i = 0; i < 4; i++) a.v[i] = vaddq_f32(a.v[i], b.v[i]);
    return a;
}
static inline Floats load_bf16(const uint16_t *p, int64_t n = 16) {
    uint16_t tmp[16] = {};
    std::memcpy(tmp, p, (n < 16 ? n : 16) * 2);
    Floats f;
    for (int i = 0; i < 4; i++) f.v[i] = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(tmp + 4 * i), 16));
    return f;
}
static inline Floats load_f16(const uint16_t *p) {
    Floats f;
    for (int i = 0; i < 4; i++) f.v[i] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * i)));
    return f;
}
static inline Floats load_floats(const float *p, int64_t n = 16) {
    float tmp[16] = {};
    std::memcpy(tmp, p, (n < 16 ? n : 16) * 4);
    Floats f;
    for (int i = 0; i < 4; i++) f.v[i] = vld1q_f32(tmp + 4 * i);
    return f;
}
static inline void store_floats(float *p, Floats v, int64_t n = 16) {
    float tmp[16];
    for (int i = 0; i < 4; i++) vst1q_f32(tmp + 4 * i, v.v[i]);
    std::memcpy(p, tmp, (n < 16 ? n : 16) * 4);
}

#else  // scalar: the reference
struct Bytes { uint8_t b[64]; };
struct Ints { int32_t v[16]; };
struct Floats { float v[16]; };
using Acc = Ints;
static constexpr int ACC_SPLIT = 1;

static inline Bytes load_bytes(const uint8_t *p) {
    Bytes b;
    std::memcpy(b.b, p, 64);
    return b;
}
static inline Bytes low_nibbles(Bytes v) {
    for (int i = 0; i < 64; i++) v.b[i] &= 0x0F;
    return v;
}
static inline Bytes high_nibbles(Bytes v) {
    for (int i = 0; i < 64; i++) v.b[i] >>= 4;
    return v;
}
template <int SHIFT>
static inline Bytes six_bit_codes(Bytes nibbles, Bytes plane) {
    for (int i = 0; i < 64; i++) nibbles.b[i] |= uint8_t(((plane.b[i] >> SHIFT) & 3) << 4);
    return nibbles;
}
static inline Acc acc_zero() { return Ints{}; }
static inline Acc dot4(Acc acc, Bytes codes, int32_t x) {
    int8_t b[4];
    std::memcpy(b, &x, 4);
    for (int r = 0; r < 16; r++)
        for (int j = 0; j < 4; j++) acc.v[r] += int32_t(codes.b[4 * r + j]) * b[j];
    return acc;
}
static inline Ints acc_ints(Acc a) { return a; }
static inline Ints add_ints(Ints a, Ints b) {
    for (int r = 0; r < 16; r++) a.v[r] += b.v[r];
    return a;
}
static inline Ints sub_ints(Ints a, Ints b) {
    for (int r = 0; r < 16; r++) a.v[r] -= b.v[r];
    return a;
}
static inline Ints mul_ints(Ints a, Ints b) {
    for (int r = 0; r < 16; r++) a.v[r] *= b.v[r];
    return a;
}
static inline Ints ints_set1(int32_t v) {
    Ints a;
    for (int r = 0; r < 16; r++) a.v[r] = v;
    return a;
}
static inline Ints load_u8_ints(const uint8_t *p) {
    Ints a;
    for (int r = 0; r < 16; r++) a.v[r] = p[r];
    return a;
}
using Weights8 = Bytes;
static inline Weights8 prepare_u8(Bytes w) { return w; }
static inline Ints dot4_u8(Ints acc, const Weights8 &w, int32_t x) { return dot4(acc, w, x); }  // (q + 128) x itself
static inline Ints u8_offset(Ints acc, int32_t) { return acc; }
static inline Floats to_floats(Ints a) {
    Floats f;
    for (int r = 0; r < 16; r++) f.v[r] = float(a.v[r]);
    return f;
}
static inline Floats f_set1(float x) {
    Floats f;
    for (int r = 0; r < 16; r++) f.v[r] = x;
    return f;
}
static inline Floats f_zero() { return f_set1(0.f); }
static inline Floats fma(Floats a, Floats b, Floats c) {
    for (int r = 0; r < 16; r++) c.v[r] = std::fma(a.v[r], b.v[r], c.v[r]);
    return c;
}
static inline Floats fnma(Floats a, Floats b, Floats c) {
    for (int r = 0; r < 16; r++) c.v[r] = std::fma(-a.v[r], b.v[r], c.v[r]);
    return c;
}
static inline Floats f_add(Floats a, Floats b) {
    for (int r = 0; r < 16; r++) a.v[r] += b.v[r];
    return a;
}
static inline Floats load_bf16(const uint16_t *p, int64_t n = 16) {
    Floats f;
    for (int r = 0; r < 16; r++) {
        const uint32_t u = r < n ? uint32_t(p[r]) << 16 : 0;
        std::memcpy(&f.v[r], &u, 4);
    }
    return f;
}
static inline Floats load_f16(const uint16_t *p) {  // 16 fp16 values, each exact in fp32
    Floats f;
    for (int r = 0; r < 16; r++) f.v[r] = half_to_float(p[r]);
    return f;
}
static inline Floats load_floats(const float *p, int64_t n = 16) {
    Floats f;
    for (int r = 0; r < 16; r++) f.v[r] = r < n ? p[r] : 0.f;
    return f;
}
static inline void store_floats(float *p, Floats v, int64_t n = 16) { std::memcpy(p, v.v, (n < 16 ? n : 16) * 4); }
#endif

// 16 bytes, each a float (exact): every target's widening to int32, then its conversion
static inline Floats load_u8(const uint8_t *p) { return to_floats(load_u8_ints(p)); }

// --------------------------------------------------------------------------------- float vectors (Vec)
// The float kernels (attention, softmax, the activations, int8 x fp32 rows) at the machine's own width: LANES
// floats a register (16 on AVX-512, 8 on AVX2). Their sums come in another order than the scalar loops', so they
// match their references within float rounding, not bit for bit. NEON and scalar builds use the plain loops,
// which the compiler vectorizes.

#if defined(POCKETLM_AVX512)
#define POCKETLM_VEC 1
static constexpr int LANES = 16;
using Vec = __m512;
static inline Vec v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline Vec v_load(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
static inline Vec v_load_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)))); }
static inline void v_store(float *p, Vec v) { _mm512_storeu_ps(p, v); }
static inline void v_store(uint16_t *p, Vec v) {  // fp16, rounded to nearest even as float_to_half
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline Vec v_set1(float x) { return _mm512_set1_ps(x); }
static inline Vec v_zero() { return _mm512_setzero_ps(); }
static inline Vec v_add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
static inline Vec v_sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
static inline Vec v_mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
static inline Vec v_max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
static inline Vec v_fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline Vec v_fnma(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }
static inline Vec v_round(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline Vec v_times_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }  // p 2^n, n integral
static inline float v_sum(Vec a) { return _mm512_reduce_add_ps(a); }
static inline float v_max_lane(Vec a) { return _mm512_reduce_max_ps(a); }
// The sums of LANES vectors' lanes at once, for LANES positions' scores: a 16 x 16 transpose folded as it goes (30
// shuffles and adds, where 16 _mm512_reduce_add_ps take about 130). Lane i of the result sums a[REDUCE_ORDER[i]],
// an order that is its own inverse: a caller that puts position j into a[REDUCE_ORDER[j]] gets it in lane j.
static constexpr int REDUCE_ORDER[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
static inline Vec v_reduce(const Vec *a) {
    __m512 t[8], u[4], v[2];
    for (int j = 0; j < 8; j++) t[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 8], 0x44), _mm512_shuffle_f32x4(a[j], a[j + 8], 0xEE));
    for (int j = 0; j < 4; j++) u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[j], t[j + 4], 0x88), _mm512_shuffle_f32x4(t[j], t[j + 4], 0xDD));
    for (int j = 0; j < 2; j++) v[j] = _mm512_add_ps(_mm512_shuffle_ps(u[j], u[j + 2], 0x44), _mm512_shuffle_ps(u[j], u[j + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
}

#elif defined(POCKETLM_AVX2)
#define POCKETLM_VEC 1
static constexpr int LANES = 8;
using Vec = __m256;
static inline Vec v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline Vec v_load(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
static inline Vec v_load_i8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p)))); }
static inline void v_store(float *p, Vec v) { _mm256_storeu_ps(p, v); }
static inline void v_store(uint16_t *p, Vec v) {
    _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline Vec v_set1(float x) { return _mm256_set1_ps(x); }
static inline Vec v_zero() { return _mm256_setzero_ps(); }
static inline Vec v_add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
static inline Vec v_sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
static inline Vec v_mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
static inline Vec v_max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
static inline Vec v_fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vec v_fnma(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline Vec v_round(Vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p 2^n for integral n: 2^n built in the exponent field, n held to [-127, 128] (2^-127 reads as 0, 2^128 as inf:
// exp's results past its range are 0 and inf as with scalef, except in exp's last 0.3 below 88.72, which gives inf)
static inline Vec v_times_pow2(Vec p, Vec n) {
    n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-127.f)), _mm256_set1_ps(128.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
static inline float v_sum(Vec a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
static inline float v_max_lane(Vec a) {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
// The sums of 8 vectors' lanes at once, lane i = sum a[i] (three rounds of pairwise adds, then the halves)
static constexpr int REDUCE_ORDER[8] = {0, 1, 2, 3, 4, 5, 6, 7};
static inline Vec v_reduce(const Vec *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // each 128-bit half: a0..a3, a4..a7
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

#if defined(POCKETLM_VEC)
// exp(x) for LANES floats, Cephes' expf (as ggml's and Eigen's vectorized exp): x = n ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-7 polynomial, then scaled by 2^n. Within 2 ulp of expf; inf above 88.7, 0 below -103.
static inline Vec v_exp(Vec x) {
    const Vec n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    Vec r = v_fnma(n, v_set1(0.693359375f), x);  // ln2 in two parts, so r keeps its low bits
    r = v_fnma(n, v_set1(-2.12194440e-4f), r);
    Vec p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    p = v_add(v_fma(p, v_mul(r, r), r), v_set1(1.f));
    return v_times_pow2(p, n);
}
#endif
