// The decode step's CPU kernels: pocketlm/kernels/__init__.py builds this file once with the system compiler
// (-O3 -march=native -fopenmp) and calls it through ctypes. Every function takes fp32 activations and writes
// fp32 results, so a layer's output equals the PyTorch reference up to the order of summation.
//
// Why hand-written: one decoded token is about 10 small matrix-vector products per layer, and aten's int4 CPU
// kernel (_weight_int4pack_mm_for_cpu) streams 4 GB/s at one row, a third of what the memory gives; the
// dozen dispatched ops of attention, RoPE and the norms cost more than their arithmetic. llama.cpp's ggml
// does the same: one fused function per operation of the graph (ggml-cpu/ops.cpp).
//
// Layouts (all row-major, contiguous):
//   int4: codes (N, K/2) uint8, element 2j in the low nibble of byte j; scales and zeros (N, K/g) fp32;
//         w[n, k] = (q - 8) * scale + zero  (pocketlm/quant/int4.py)
//   int8: weight (N, K) int8, scales (N) bf16; w[n, k] = q * scale  (pocketlm/quant/int8.py)
//   KV cache of one layer, batch row 0: (n_kv, S, hd) fp32  (pocketlm/models/llama.py's KVCache)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

#if defined(__AVX512F__)
// exp(x) for 16 floats, Cephes' expf (as ggml's and Eigen's vectorized exp): x = n ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-7 polynomial, then scaled by 2^n. Within 2 ulp of expf; inf above 88.7, 0 below -103.
static inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts, so r keeps its low bits
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

// exp of n floats in place (softmax's and the activations' exponentials: the scalar expf would cost more than
// all of attention's multiplications)
static void exp_inplace(float *x, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_loadu_ps(x + i)));
#endif
    for (; i < n; i++) x[i] = std::exp(x[i]);
}

// ------------------------------------------------------------------------------------------ int4 x int8

// As llama.cpp's Q4 x Q8 dot products (ggml_vec_dot_q4_1_q8_1): each block of 32 activations is rounded to
// int8 with its own scale d = max|x| / 127, so 64 weights at a time multiply in one VNNI instruction
// (vpdpbusd: 4 u8 codes x 4 s8 activations summed into each int32 lane) instead of three conversions and a
// float FMA per 16 weights. With x' the rounded activations (x' = d x8 per 32-block):
//   sum_k ((q - 8) s + z) x  ~  s sum_k q x'  -  8 s sum_k x'  +  z sum_k x
// The -8 s term takes the rounded sum, so the rounding errors meet the signed codes q - 8 as in the exact
// product (with the exact sum there, they would meet q in 0..15: twice the error). 0.3-0.6% of a layer's output
// on random inputs, about 2x bf16 activations' (aten's kernel); llama.cpp's Q4_1 x Q8_1 rounds the same way.

extern "C" int has_vnni() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return 1;
#else
    return 0;
#endif
}

// Activations of M rows prepared for the int4 kernel: the even and odd elements as int8 (M, C*64), zero padded
// to whole 64-byte chunks; each 32-block's scale d repeated in the 4 int32 lanes its chunk's dot product leaves
// it in (M, C, 16); each group's exact sum and rounded sum (M, G).
struct Int8Rows {
    int64_t C, stride;
    std::vector<int8_t> even, odd;
    std::vector<float> d, sum, rounded_sum;

    Int8Rows(const float *x, int64_t M, int64_t K, int64_t g) : C((K / 2 + 63) / 64), stride(C * 64) {
        const int64_t G = K / g;
        even.assign(M * stride, 0), odd.assign(M * stride, 0), d.assign(M * C * 16, 0.f);
        sum.assign(M * G, 0.f), rounded_sum.assign(M * G, 0.f);
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < K / 32; b++) {
                const float *xb = x + m * K + b * 32;
                float amax = 0.f, total = 0.f;
                for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(xb[i])), total += xb[i];
                const float inv = amax > 0.f ? 127.f / amax : 0.f;
                int32_t total8 = 0;
                for (int i = 0; i < 16; i++) {
                    const int8_t e = int8_t(std::nearbyint(xb[2 * i] * inv)), o = int8_t(std::nearbyint(xb[2 * i + 1] * inv));
                    even[m * stride + b * 16 + i] = e, odd[m * stride + b * 16 + i] = o;
                    total8 += e + o;
                }
                for (int lane = 0; lane < 4; lane++) d[(m * C + b / 4) * 16 + (b % 4) * 4 + lane] = amax / 127.f;
                sum[m * G + b * 32 / g] += total;
                rounded_sum[m * G + b * 32 / g] += amax / 127.f * float(total8);
            }
    }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// MT input rows (from row m0 of xq) against one weight row: K/2 bytes of codes, G scales and zero points.
template <int MT>
static void int4_row(const Int8Rows &xq, int64_t m0, int64_t K2, int64_t G, int64_t g, const __m512i group_of_lane,
                     const uint8_t *codes, const float *scales, const float *zeros, float *res) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const int64_t groups_per_chunk = 128 / g, C = xq.C, stride = xq.stride;
    const int8_t *even = xq.even.data() + m0 * stride, *odd = xq.odd.data() + m0 * stride;
    const float *d = xq.d.data() + m0 * C * 16;
    __m512 acc[MT];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    // 64 bytes of codes (128 weights) per step; the last step of a row whose K/2 is not a multiple of 64 loads
    // fewer bytes and scales, the rest zero (the activations' padding is zero too)
    for (int64_t c = 0; c < C; c++) {
        const int64_t j = c * 64, g0 = c * groups_per_chunk;
        const bool whole = j + 64 <= K2;
        const __m512i v = _mm512_maskz_loadu_epi8(whole ? ~0ULL : (1ULL << (K2 - j)) - 1, codes + j);
        const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        const __mmask8 have = whole ? (1u << groups_per_chunk) - 1 : (1u << (G - g0)) - 1;
        const __m512 s = _mm512_permutexvar_ps(group_of_lane, _mm512_castps128_ps512(_mm_maskz_loadu_ps(have, scales + g0)));
        for (int m = 0; m < MT; m++) {
            __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(even + m * stride + j));
            isum = _mm512_dpbusd_epi32(isum, hi, _mm512_loadu_si512(odd + m * stride + j));
            const __m512 dm = _mm512_loadu_ps(d + (m * C + c) * 16);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(s, dm), acc[m]);
        }
    }
    for (int m = 0; m < MT; m++)
        res[m] = _mm512_reduce_add_ps(acc[m]) - 8.f * dot(scales, &xq.rounded_sum[(m0 + m) * G], G) + dot(zeros, &xq.sum[(m0 + m) * G], G);
}
#endif

// out (M, N) = x (M, K) @ w^T + bias. codes (N, K/2); scales, zeros (N, K/g) fp32; g 32, 64 or 128.
// Only with has_vnni() (pocketlm/kernels/__init__.py's int4_kernel_on checks).
extern "C" void int4_linear(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scales,
                            const float *zeros, int64_t N, int64_t g, const float *bias, float *out, int nthreads) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    const int64_t K2 = K / 2, G = K / g;
    const Int8Rows xq(x, M, K, g);
    alignas(64) int32_t lanes[16];
    for (int l = 0; l < 16; l++) lanes[l] = 8 * l / g;  // int32 lane l sums elements 8l..8l+7 of its chunk
    const __m512i group_of_lane = _mm512_load_si512(lanes);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * K2;
        const float *s = scales + n * G, *o = zeros + n * G;
        float res[4];
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {  // four input rows share each loaded weight vector
            int4_row<4>(xq, m, K2, G, g, group_of_lane, row, s, o, res);
            for (int i = 0; i < 4; i++) out[(m + i) * N + n] = res[i];
        }
        for (; m < M; m++) {
            int4_row<1>(xq, m, K2, G, g, group_of_lane, row, s, o, res);
            out[m * N + n] = res[0];
        }
        if (bias)
            for (int64_t i = 0; i < M; i++) out[i * N + n] += bias[n];
    }
#endif
}

// ------------------------------------------------------------------------------------------ int8 x fp32

template <int MT>
static void int8_row(const float *x, int64_t K, const int8_t *w, float *res) {
    float tail[MT] = {};
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 acc[MT];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        for (int m = 0; m < MT; m++) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < MT; m++) tail[m] = _mm512_reduce_add_ps(acc[m]);
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
static void norm_rope(const float *x, const float *norm, float eps, const float *cos, const float *sin, int64_t hd,
                      float *scratch, float *y) {
    if (norm) {
        rms_norm_row(x, hd, norm, eps, 1.f, scratch);
        x = scratch;
    }
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        y[i] = x[i] * cos[i] - x[i + half] * sin[i];
        y[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

// Decode attention: the positions are split between the threads (flash-decoding's split, so a model with one
// key/value head still uses every core); within a thread, each query head holds its query and output in
// registers while it streams its key/value head's rows, which stay in L2 for the next query head of the group.

// scores p[h * L + s] = q_h . K_{h / group}[s] * scale for s in [s0, s1)
template <int H16>
static void scores_range(const float *q, const float *K, int64_t S, int64_t hd, int64_t nh, int64_t n_kv, int64_t L,
                         int64_t s0, int64_t s1, float scale, float *p) {
    for (int64_t h = 0; h < nh; h++) {
        const float *Kh = K + (h / (nh / n_kv)) * S * hd, *qh = q + h * hd;
        float *ph = p + h * L;
#if defined(__AVX512F__)
        if (H16) {
            __m512 qv[H16 ? H16 : 1];
            for (int i = 0; i < H16; i++) qv[i] = _mm512_loadu_ps(qh + 16 * i);
            for (int64_t s = s0; s < s1; s++) {
                const float *row = Kh + s * hd;
                __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(row)), b = _mm512_setzero_ps();  // two chains
                for (int i = 1; i < H16; i++)
                    if (i % 2) b = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(row + 16 * i), b);
                    else a = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(row + 16 * i), a);
                ph[s] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
            }
            continue;
        }
#endif
        for (int64_t s = s0; s < s1; s++) ph[s] = dot(qh, Kh + s * hd, hd) * scale;
    }
}

// o[h] = sum_s p[h * L + s] V_{h / group}[s] for s in [s0, s1); o (nh, hd)
template <int H16>
static void values_range(const float *p, const float *V, int64_t S, int64_t hd, int64_t nh, int64_t n_kv, int64_t L,
                         int64_t s0, int64_t s1, float *o) {
    for (int64_t h = 0; h < nh; h++) {
        const float *Vh = V + (h / (nh / n_kv)) * S * hd, *ph = p + h * L;
        float *oh = o + h * hd;
#if defined(__AVX512F__)
        if (H16) {
            __m512 acc[H16 ? H16 : 1];
            for (int i = 0; i < H16; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t s = s0; s < s1; s++) {
                const __m512 w = _mm512_set1_ps(ph[s]);
                for (int i = 0; i < H16; i++) acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(Vh + s * hd + 16 * i), acc[i]);
            }
            for (int i = 0; i < H16; i++) _mm512_storeu_ps(oh + 16 * i, acc[i]);
            continue;
        }
#endif
        std::fill(oh, oh + hd, 0.f);
        for (int64_t s = s0; s < s1; s++)
#pragma omp simd
            for (int64_t i = 0; i < hd; i++) oh[i] += ph[s] * Vh[s * hd + i];
    }
}

template <int H16>
static void attend(const float *q, const float *K, const float *V, int64_t S, int64_t hd, int64_t nh, int64_t n_kv,
                   int64_t L, float scale, float *out, int nthreads) {
    std::vector<float> p(nh * L), partial(int64_t(nthreads) * nh * hd, 0.f), inv(nh);
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t s0 = L * t / T, s1 = L * (t + 1) / T;
        scores_range<H16>(q, K, S, hd, nh, n_kv, L, s0, s1, scale, p.data());
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t h = 0; h < nh; h++) {  // softmax per head (exponentials in place, 1 / sum kept)
            float *ph = p.data() + h * L, best = -INFINITY, total = 0.f;
            for (int64_t s = 0; s < L; s++) best = std::max(best, ph[s]);
            for (int64_t s = 0; s < L; s++) ph[s] -= best;
            exp_inplace(ph, L);
            for (int64_t s = 0; s < L; s++) total += ph[s];
            inv[h] = 1.f / total;
        }
        values_range<H16>(p.data(), V, S, hd, nh, n_kv, L, s0, s1, partial.data() + t * nh * hd);
    }
    for (int64_t i = 0; i < nh * hd; i++) {
        float total = 0.f;
        for (int t = 0; t < nthreads; t++) total += partial[t * nh * hd + i];
        out[i] = total * inv[i / hd];
    }
}

// One decoded token of one sequence, all heads: q (nh * hd), k, v (n_kv * hd) from the projections; q_norm,
// k_norm (hd) or null (Gemma 3's per-head RMSNorm, unit offset 1, before RoPE); cos, sin (hd) at position pos.
// Writes the new key and value into the cache (n_kv, S, hd) at pos, then attends over cache positions
// begin..pos (a sliding window starts after 0). out (nh * hd). Matches SDPA with enable_gqa: query head h
// reads key/value head h / (nh / n_kv).
extern "C" void attend_decode(const float *q, const float *k_new, const float *v_new, int64_t nh, int64_t n_kv, int64_t hd,
                              const float *cos, const float *sin, const float *q_norm, const float *k_norm, float norm_eps,
                              float *k_cache, float *v_cache, int64_t S, int64_t pos, int64_t begin, float scale,
                              float *out, int nthreads) {
    std::vector<float> scratch(hd), qr(nh * hd);
    for (int64_t h = 0; h < n_kv; h++) {
        norm_rope(k_new + h * hd, k_norm, norm_eps, cos, sin, hd, scratch.data(), k_cache + (h * S + pos) * hd);
        std::memcpy(v_cache + (h * S + pos) * hd, v_new + h * hd, hd * sizeof(float));
    }
    for (int64_t h = 0; h < nh; h++) norm_rope(q + h * hd, q_norm, norm_eps, cos, sin, hd, scratch.data(), qr.data() + h * hd);
    const int64_t L = pos + 1 - begin;
    const float *K = k_cache + begin * hd, *V = v_cache + begin * hd;
    nthreads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, L / 64)));  // a short context is not worth a split
    switch (hd) {
        case 64: return attend<4>(qr.data(), K, V, S, hd, nh, n_kv, L, scale, out, nthreads);
        case 128: return attend<8>(qr.data(), K, V, S, hd, nh, n_kv, L, scale, out, nthreads);
        case 256: return attend<16>(qr.data(), K, V, S, hd, nh, n_kv, L, scale, out, nthreads);
        default: return attend<0>(qr.data(), K, V, S, hd, nh, n_kv, L, scale, out, nthreads);
    }
}
