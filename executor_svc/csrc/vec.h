/* What every CPU kernel source shares: vectors of 8 floats written with GCC's vector
 * extensions (one AVX2 register; under AVX-512 the compiler gives them its 32 registers and
 * EVEX encodings), bfloat16 loads and rounding, and the exp the softmaxes use.
 * Each source is compiled once per instruction set (executor_svc/cpu_build.py): the same code,
 * lowered by the compiler to the widest instructions the build names. */
#ifndef PAGEDSERVE_VEC_H
#define PAGEDSERVE_VEC_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads */
typedef uint16_t h8u __attribute__((vector_size(16), aligned(2))); /* 8 bfloat16, unaligned */
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));
typedef uint16_t h8 __attribute__((vector_size(16)));

/* Eight values from element i of an array of float32 or (bf16) bfloat16 values, as float32:
 * a bfloat16 is the top half of the float32 with the same bits. */
static inline __attribute__((always_inline)) v8 load8(const void *p, int64_t i, const int bf16) {
    if (!bf16) return *(const v8u *)((const float *)p + i);
    return (v8)(__builtin_convertvector(*(const h8u *)((const uint16_t *)p + i), i8) << 16);
}

/* float32 to bfloat16 as torch rounds it: to nearest, ties to even; NaN to 0x7fc0. */
static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* to_bf16 of each lane of x, for vectors of any width: U its lanes as uint32, H as uint16. */
#define TO_BF16_LANES(U, H, x) ({                                                         \
    const U bits_ = (U)(x);                                                               \
    const U nan_ = (U)((bits_ & 0x7fffffffu) > 0x7f800000u); /* all ones where NaN */     \
    const U rounded_ = (bits_ + 0x7fffu + ((bits_ >> 16) & 1u)) >> 16;                    \
    __builtin_convertvector((rounded_ & ~nan_) | (0x7fc0u & nan_), H);                    \
})

/* to_bf16 of eight values: one instruction where the CPU has AVX512_BF16 (vcvtneps2bf16, the
 * same rounding; a NaN stays a NaN with its sign and payload, not 0x7fc0). */
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>
static inline __attribute__((always_inline)) h8 to_bf16x8(v8 x) {
    return (h8)(__m128i)_mm256_cvtneps_pbh((__m256)x);
}
#else
static inline __attribute__((always_inline)) h8 to_bf16x8(v8 x) {
    return TO_BF16_LANES(u8, h8, x);
}
#endif

/* Stores eight values at element i of an array of float32 or (bf16) bfloat16 ones. */
static inline __attribute__((always_inline)) void store8(void *p, int64_t i, v8 x,
                                                         const int bf16) {
    if (bf16) *(h8u *)((uint16_t *)p + i) = to_bf16x8(x);
    else *(v8u *)((float *)p + i) = x;
}

/* One value of either kind, for the tails past the last whole vector. */
static inline __attribute__((always_inline)) float load1(const void *p, int64_t i,
                                                         const int bf16) {
    if (!bf16) return ((const float *)p)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline __attribute__((always_inline)) void store1(void *p, int64_t i, float x,
                                                         const int bf16) {
    if (bf16) ((uint16_t *)p)[i] = to_bf16(x);
    else ((float *)p)[i] = x;
}

/* x as the nearest bfloat16 value (still a float32) where bf16, else x itself: what a bf16
 * model's torch operator rounds its result to before the next one reads it. */
static inline __attribute__((always_inline)) v8 round8(v8 x, const int bf16) {
    if (!bf16) return x;
    return (v8)(__builtin_convertvector(to_bf16x8(x), i8) << 16);
}

static inline __attribute__((always_inline)) float round1(float x, const int bf16) {
    if (!bf16) return x;
    const uint16_t h = to_bf16(x);
    return load1(&h, 0, 1);
}


static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline float hsum(v8 x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* The sums of eight vectors' lanes, as the lanes of one: three rounds of pairwise shuffles
 * and adds, where eight separate horizontal sums take three times the instructions.
 * __builtin_shufflevector needs GCC 12 or clang; older compilers sum lane by lane. */
#if defined(__clang__) || __GNUC__ >= 12
static inline v8 pair_sums(v8 x, v8 y, int round) {
    switch (round) { /* each lane ends up with the sum of two of x's or y's partial sums */
    case 0:
        return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
    case 1:
        return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    default:
        return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

static inline v8 hsum8(const v8 a[8]) {
    const v8 s01 = pair_sums(a[0], a[1], 0), s23 = pair_sums(a[2], a[3], 0);
    const v8 s45 = pair_sums(a[4], a[5], 0), s67 = pair_sums(a[6], a[7], 0);
    return pair_sums(pair_sums(s01, s23, 1), pair_sums(s45, s67, 1), 2);
}
#else
static inline v8 hsum8(const v8 a[8]) {
    return (v8){hsum(a[0]), hsum(a[1]), hsum(a[2]), hsum(a[3]),
                hsum(a[4]), hsum(a[5]), hsum(a[6]), hsum(a[7])};
}
#endif

/* exp for x <= 0 (scores minus their running max): Cody-Waite reduction to r in
 * [-ln2/2, ln2/2], a degree-6 polynomial, then 2^n through the exponent bits. Below -87 it
 * returns about 1e-38 instead of 0, far under float32 resolution of a sum that holds 1.
 * The one body serves every width: V a vector of floats, I of int32s with as many lanes
 * (exp8 here; attention.c's AMX path takes 16 lanes). */
#define EXP_NONPOSITIVE(V, I, x_in) ({                                                    \
    const V lo_ = (V){} - 87.0f;                                                          \
    const I below_ = (x_in) < lo_; /* all ones where true */                              \
    const V x_ = (V)(((I)lo_ & below_) | ((I)(x_in) & ~below_));                          \
    const V magic_ = (V){} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */ \
    const V n_ = (x_ * 1.44269504088896341f + magic_) - magic_;                           \
    V r_ = x_ - n_ * 0.693359375f;                                                        \
    r_ = r_ - n_ * -2.12194440e-4f;                                                       \
    V p_ = r_ * 1.9875691500e-4f + 1.3981999507e-3f;                                      \
    p_ = p_ * r_ + 8.3334519073e-3f;                                                      \
    p_ = p_ * r_ + 4.1665795894e-2f;                                                      \
    p_ = p_ * r_ + 1.6666665459e-1f;                                                      \
    p_ = p_ * r_ + 5.0000001201e-1f;                                                      \
    p_ = p_ * r_ * r_ + r_ + 1.0f;                                                        \
    p_ * (V)((__builtin_convertvector(n_, I) + 127) << 23);                               \
})

static inline v8 exp8(v8 x) { return EXP_NONPOSITIVE(v8, i8, x); }

#ifdef __AVX512F__
/* Vectors of 16 floats (one AVX-512 register), for the kernels that take 16 lanes where the
 * build has them (greedy sampling, the AMX attention's softmax). */
#include <immintrin.h>
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

/* EXP_NONPOSITIVE on 16 lanes with AVX-512's own steps where they save instructions: the
 * clamp a max, n rounded by vrndscaleps, and 2^n applied by vscalefps (one instruction for
 * the exponent's conversion, add, shift and product). The same values bit for bit (n >= -126
 * after the clamp, so p x 2^n is exact either way; checked with the builds' flags over 3e7
 * inputs in [-200, 0], -inf and NaN); a bf16 prompt's attention on AMX 2.7% faster
 * (BENCHMARKS.md). */
static inline __attribute__((always_inline)) v16 exp16(v16 x_in) {
    /* NaN stays NaN (maxps returns its second operand where either is NaN), as the compare
     * and blend of EXP_NONPOSITIVE keep it */
    const __m512 x = _mm512_max_ps(_mm512_set1_ps(-87.0f), (__m512)x_in);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v16 r = (v16)_mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f),
                                        _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return (v16)_mm512_scalef_ps((__m512)p, n);
}

typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint16_t h16u __attribute__((vector_size(32), aligned(2))); /* unaligned */
typedef uint32_t u16v __attribute__((vector_size(64)));

/* to_bf16x8 of sixteen values. */
#ifdef __AVX512BF16__
static inline __attribute__((always_inline)) h16 to_bf16x16(v16 x) {
    return (h16)(__m256i)_mm512_cvtneps_pbh((__m512)x);
}
#else
static inline __attribute__((always_inline)) h16 to_bf16x16(v16 x) {
    return TO_BF16_LANES(u16v, h16, x);
}
#endif

/* Sixteen bfloat16 values as float32. */
static inline __attribute__((always_inline)) v16 widen16(h16 h) {
    return (v16)(__builtin_convertvector(h, i16v) << 16);
}

/* store8 and round8 of sixteen values. */
static inline __attribute__((always_inline)) void store16(void *p, int64_t i, v16 x,
                                                          const int bf16) {
    if (bf16) *(h16u *)((uint16_t *)p + i) = to_bf16x16(x);
    else _mm512_storeu_ps((float *)p + i, (__m512)x);
}

static inline __attribute__((always_inline)) v16 round16(v16 x, const int bf16) {
    return bf16 ? widen16(to_bf16x16(x)) : x;
}

/* Sixteen values from element i of float32 or (bf16) bfloat16 values, as float32 (load8's). */
static inline __attribute__((always_inline)) v16 load16(const void *p, int64_t i, const int bf16) {
    if (!bf16) return (v16)_mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
#endif

/* silu(g) * u, as silu_mul computes it wherever it runs (layer.c's rows, or the GEMMs' store
 * of a gate/up projection): sigmoid(g) through e = exp(-|g|), 1 / (1 + e) for g >= 0, else
 * e / (1 + e), so EXP only ever sees x <= 0. The one body serves every width, as
 * EXP_NONPOSITIVE's does: V a vector of floats, I of int32s with as many lanes, EXP their exp
 * (exp8's and exp16's values are the same, so are silu_mul8's and silu_mul16's). */
#define SILU_MUL_LANES(V, I, EXP, g_in, u_in) ({                                          \
    const V g_ = (g_in);                                                                  \
    const I negative_ = g_ < 0.0f;                                                        \
    const V e_ = EXP((V)((I)g_ | INT32_MIN)); /* exp(-|g|): the sign bit set */           \
    const V numerator_ = (V)(((I)e_ & negative_) | ((I)((V){} + 1.0f) & ~negative_));    \
    g_ * (numerator_ / (1.0f + e_)) * (u_in);                                             \
})

static inline __attribute__((always_inline)) v8 silu_mul8(v8 g, v8 u) {
    return SILU_MUL_LANES(v8, i8, exp8, g, u);
}

#ifdef __AVX512F__
static inline __attribute__((always_inline)) v16 silu_mul16(v16 g, v16 u) {
    return SILU_MUL_LANES(v16, i16v, exp16, g, u);
}
#endif

/* Work below this many floats runs on the calling thread: forking the team would cost more
 * than the work. */
#define PARALLEL_MIN_FLOATS 65536

#endif
