/*
 * finefp8 CPU kernels: fused FP8 (E4M3) block / group quantization, dequantization and a
 * weight-only FP8 linear layer.  C for GCC/Clang (vector extensions; AVX2/F16C intrinsics
 * where the machine has them, portable code otherwise), written so that the compiler
 * vectorizes the inner loops (-O3 -march=native); every function works on a range of rows
 * so that the Python side (finefp8/kernels/cpu.py) can split a call over threads.  The
 * arithmetic is
 * the reference's (finefp8/quantization.py), bit for bit:
 *
 *   s = max(amax, amax_floor) / 448         (fp32; ue8m0: rounded up to a power of two)
 *   q = e4m3_rne_saturate(x_fp32 / s)       (the codes of the correctly rounded fp32
 *                                            quotient; see quant_run_avx2)
 *   x~ = dtype(decode(q) * s)               (fp32 product, one rounding to dtype)
 *
 * Input dtypes: 0 = float32, 1 = bfloat16, 2 = float16.  Output dtypes the same codes.
 */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE 1
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define FF8_HAVE_F16C 1
#if defined(__FMA__)
#define FF8_HAVE_GEMV 1
#endif
#endif

#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

#define E4M3_MIN_NORMAL_BITS 0x3C800000u /* 2^-6 */
#define F32_INF_BITS 0x7F800000u

int ff8_abi_version(void) { return 6; }

#if defined(FF8_HAVE_F16C) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512BF16__)
#define FF8_HAVE_AVX512BF16 1
#endif

/* The vector paths compiled in: 1 = AVX2 + F16C + FMA, 2 = AVX-512F/BW, 4 = AVX-512-BF16
 * (the bf16 dot-product linear layer); 8 = OpenMP (the *_mt entry points split a call over
 * threads).  0: the portable C code, one thread per call. */
int ff8_isa(void) {
    int bits = 0;
#ifdef FF8_HAVE_GEMV
    bits |= 1;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
    bits |= 2;
#endif
#ifdef FF8_HAVE_AVX512BF16
    bits |= 4;
#endif
#ifdef _OPENMP
    bits |= 8;
#endif
    return bits;
}

/* Ask the kernel to back the whole 2 MiB pages inside [p, p + nbytes) with huge pages when
 * they are first touched.  Fresh output tensors are not touched yet; with 4 KiB pages the
 * page faults of writing a new large tensor cost more than the kernels themselves on some
 * virtual machines.  Returns 0 on success or when not supported, -1 on an madvise error. */
int ff8_advise_hugepages(void *p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t b = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t e = ((uintptr_t)p + (uintptr_t)nbytes) & ~(huge - 1);
    if (e > b) return madvise((void *)b, (size_t)(e - b), MADV_HUGEPAGE);
#else
    (void)p; (void)nbytes;
#endif
    return 0;
}

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp32 -> E4M3 code, round to nearest even, saturating to +-448, NaN -> 0x7F | sign.
 *
 * The FPU does the rounding: with E = floor(log2|x|) clamped to [-6, 9] and c = 2^(E+20),
 * the sum |x| + c is rounded to a multiple of ulp(c) = 2^(E-3), the E4M3 spacing at |x|
 * (2^-9 in the subnormal range, where E is clamped to -6), ties to even.  The sum stays in
 * c's binade, so k = bits(|x| + c) - bits(c) is round(|x| / 2^(E-3)): 8..16 for normal |x|
 * (mantissa 8 + m; 16 carries into the next exponent), 0..8 for subnormal |x|.  The code
 * is (E + 6) * 8 + k, and (E + 6) * 8 = (bits(c) >> 20) - 1128.  |x| >= 2^9 gives k large,
 * so one unsigned min saturates every |x| > 448 (Inf included) to 0x7E. */
static inline uint8_t f32_to_e4m3(float f) {
    uint32_t u = f2u(f);
    uint32_t sign = (u >> 24) & 0x80u;
    uint32_t a = u & 0x7FFFFFFFu;
    uint32_t e = a & 0x7F800000u;
    e = e < E4M3_MIN_NORMAL_BITS ? E4M3_MIN_NORMAL_BITS : e;
    e = e > 0x44000000u ? 0x44000000u : e; /* 2^9 */
    uint32_t c = e + (20u << 23);
    uint32_t code = (c >> 20) - 1128u + (f2u(u2f(a) + u2f(c)) - c);
    code = code > 0x7Eu ? 0x7Eu : code;
    code = a > F32_INF_BITS ? 0x7Fu : code;
    return (uint8_t)(code | sign);
}

/* E4M3 code -> fp32 value (exact).  Codes 0x7F / 0xFF are NaN. */
static inline float e4m3_to_f32(uint8_t c) {
    uint32_t sign = ((uint32_t)c & 0x80u) << 24;
    uint32_t em = (uint32_t)c & 0x7Fu;
    float nrm = u2f((em << 20) + (120u << 23));
    float sub = (float)(em & 7u) * 0.001953125f;
    float v = em >= 8u ? nrm : sub;
    v = em == 0x7Fu ? u2f(0x7FC00000u) : v;
    return u2f(f2u(v) | sign);
}

/* out[i] = decode(q[i]) / 256 for i < n (exact); returns 1 if a NaN code (0x7F / 0xFF) was
 * seen, whose outputs are then not NaN: the caller must handle them.  With F16C, an E4M3
 * code is a float16 with the same sign, exponent and mantissa bits one exponent bit
 * narrower: (code << 8) >> 1 (arithmetic) with bit 14 cleared is that float16, whose
 * value is the E4M3 value / 256 (bias 15 against 7), subnormals included; the hardware
 * converts 8 of them to fp32 per instruction. */
static int decode_div256(const uint8_t *restrict q, float *restrict out, int64_t n) {
    int64_t i = 0;
    int nan = 0;
#ifdef FF8_HAVE_F16C
    const __m128i m7f = _mm_set1_epi8(0x7F);
    const __m256i clear14 = _mm256_set1_epi16((short)0xBFFF);
    __m128i nanacc = _mm_setzero_si128();
    for (; i + 16 <= n; i += 16) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(q + i));
        nanacc = _mm_or_si128(nanacc, _mm_cmpeq_epi8(_mm_and_si128(b, m7f), m7f));
        __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8);
        h = _mm256_and_si256(_mm256_srai_epi16(h, 1), clear14);
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
        _mm256_storeu_ps(out + i + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
    }
    nan = !_mm_testz_si128(nanacc, nanacc);
#endif
    for (; i < n; ++i) {
        out[i] = e4m3_to_f32(q[i]) * 0.00390625f;
        nan |= (q[i] & 0x7F) == 0x7F;
    }
    return nan;
}

static inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

/* fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (as torch does). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > F32_INF_BITS ? (uint16_t)0x7FC0u : (uint16_t)r;
}

/* fp16 -> fp32 (exact): rebias normals, scale subnormals by 2^-24, keep inf/NaN. */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t em = (uint32_t)h & 0x7FFFu;
    float nrm = u2f((em << 13) + (112u << 23));
    float sub = (float)em * 5.9604644775390625e-08f;
    float spec = u2f((em << 13) | F32_INF_BITS);
    float v = em >= 0x0400u ? nrm : sub;
    v = em >= 0x7C00u ? spec : v;
    return u2f(f2u(v) | sign);
}

/* fp32 -> fp16, round to nearest even, in integer steps (older compilers have no half
 * type).  Normal results rebias the exponent and round below the 10 kept mantissa bits;
 * |x| < 2^-14 is rounded to the fp16 subnormal step 2^-24 by adding 0.5 (whose ulp is
 * 2^-24); |x| >= 65520 overflows to Inf; NaN -> 0x7E00 | sign. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    uint32_t nrm = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3F000000u;
    uint32_t h = a < 0x38800000u ? sub : nrm;
    h = a >= 0x477FF000u ? 0x7C00u : h;
    h = a > F32_INF_BITS ? 0x7E00u : h;
    return (uint16_t)(h | sign);
}

/* Scale of one group from its amax: max(amax, floor) / 448, or rounded up to 2^k. */
static inline float scale_of(float amax, float amax_floor, int ue8m0) {
    float s = (amax < amax_floor ? amax_floor : amax) / 448.0f;
    if (ue8m0) {
        int e;
        float m = frexpf(s, &e);
        s = ldexpf(1.0f, m == 0.5f ? e - 1 : e);
    }
    return s;
}

/* amax bit pattern (of |x| in the input dtype) -> fp32 value; nonfinite -> sets *bad. */
static inline float amax_value(uint32_t bits, int dt, int64_t *bad) {
    if (dt == DT_F32) { if (bits >= F32_INF_BITS) ++*bad; return u2f(bits); }
    if (dt == DT_BF16) { if (bits >= 0x7F80u) ++*bad; return bf16_to_f32((uint16_t)bits); }
    if (bits >= 0x7C00u) ++*bad;
    return f16_to_f32((uint16_t)bits);
}

/* ------------------------------------------------------------------ row primitives */

/* colmax[c] = max(colmax[c], |x[c]| as bits) for c < n. */
static void absmax_row_f32(const float *restrict x, uint32_t *restrict colmax, int64_t n) {
    const uint32_t *xu = (const uint32_t *)x;
    for (int64_t c = 0; c < n; ++c) {
        uint32_t a = xu[c] & 0x7FFFFFFFu;
        colmax[c] = a > colmax[c] ? a : colmax[c];
    }
}

static void absmax_row_u16(const uint16_t *restrict x, uint16_t *restrict colmax, int64_t n) {
    for (int64_t c = 0; c < n; ++c) {
        uint16_t a = (uint16_t)(x[c] & 0x7FFFu);
        colmax[c] = a > colmax[c] ? a : colmax[c];
    }
}

/* max over |x[c]| bits, c < n. */
static inline uint32_t absmax_f32(const float *restrict x, int64_t n) {
    const uint32_t *xu = (const uint32_t *)x;
    uint32_t m = 0;
    for (int64_t c = 0; c < n; ++c) { uint32_t a = xu[c] & 0x7FFFFFFFu; m = a > m ? a : m; }
    return m;
}

static inline uint32_t absmax_u16(const uint16_t *restrict x, int64_t n) {
    uint32_t m = 0;
    for (int64_t c = 0; c < n; ++c) { uint32_t a = (uint32_t)(x[c] & 0x7FFFu); m = a > m ? a : m; }
    return m;
}

#ifdef FF8_HAVE_F16C
/* absmax_u16 / absmax_f32 of one 128-value group with AVX2: a tree of vector maxima, then
 * the 8 lanes of 16 bits by phminposuw on the complements (max v = ~min ~v). */
static inline uint32_t absmax128_u16(const uint16_t *x) {
    const __m256i m = _mm256_set1_epi16(0x7FFF);
    __m256i v[8];
    for (int k = 0; k < 8; ++k)
        v[k] = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + 16 * k)), m);
    for (int w = 4; w >= 1; w /= 2)
        for (int k = 0; k < w; ++k) v[k] = _mm256_max_epu16(v[k], v[k + w]);
    __m128i h = _mm_max_epu16(_mm256_castsi256_si128(v[0]), _mm256_extracti128_si256(v[0], 1));
    h = _mm_minpos_epu16(_mm_xor_si128(h, _mm_set1_epi16(-1)));
    return ~(uint32_t)_mm_cvtsi128_si32(h) & 0xFFFFu;
}

static inline uint32_t absmax128_f32(const float *x) {
    const __m256i m = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i v[16];
    for (int k = 0; k < 16; ++k)
        v[k] = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + 8 * k)), m);
    for (int w = 8; w >= 1; w /= 2)
        for (int k = 0; k < w; ++k) v[k] = _mm256_max_epu32(v[k], v[k + w]);
    __m128i h = _mm_max_epu32(_mm256_castsi256_si128(v[0]), _mm256_extracti128_si256(v[0], 1));
    h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(h);
}
#endif

/* q[c] = e4m3(x[c] / s). */
static inline void quant_run_f32(const float *restrict x, float s, uint8_t *restrict q, int64_t n) {
    for (int64_t c = 0; c < n; ++c) q[c] = f32_to_e4m3(x[c] / s);
}

static inline void quant_run_bf16(const uint16_t *restrict x, float s, uint8_t *restrict q, int64_t n) {
    for (int64_t c = 0; c < n; ++c) q[c] = f32_to_e4m3(bf16_to_f32(x[c]) / s);
}

static inline void quant_run_f16(const uint16_t *restrict x, float s, uint8_t *restrict q, int64_t n) {
    for (int64_t c = 0; c < n; ++c) q[c] = f32_to_e4m3(f16_to_f32(x[c]) / s);
}

#ifdef FF8_HAVE_F16C
/* f32_to_e4m3 on 8 lanes with AVX2 (the same steps; a NaN lane's code is 0x7E | 1). */
static inline __m256i e4m3_8(__m256 y) {
    const __m256i u = _mm256_castps_si256(y);
    const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i e = _mm256_and_si256(a, _mm256_set1_epi32((int)F32_INF_BITS));
    e = _mm256_max_epu32(e, _mm256_set1_epi32((int)E4M3_MIN_NORMAL_BITS));
    e = _mm256_min_epu32(e, _mm256_set1_epi32(0x44000000));
    const __m256i c = _mm256_add_epi32(e, _mm256_set1_epi32(20 << 23));
    const __m256i sum = _mm256_castps_si256(
        _mm256_add_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(c)));
    __m256i code = _mm256_add_epi32(_mm256_sub_epi32(_mm256_srli_epi32(c, 20), _mm256_set1_epi32(1128)),
                                    _mm256_sub_epi32(sum, c));
    code = _mm256_min_epu32(code, _mm256_set1_epi32(0x7E));
    const __m256i nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32((int)F32_INF_BITS));
    code = _mm256_or_si256(code, _mm256_and_si256(nan, _mm256_set1_epi32(1)));
    return _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
}

/* Store the low bytes of 4 x 8 codes as 32 bytes in order. */
static inline void store_codes32(uint8_t *q, __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
    const __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

static inline __m256 load_bf16_8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256 load_f16_8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));  /* exact, subnormals too */
}

/* 8 input values of dtype dt at x[i], as fp32 (exact). */
static inline __m256 load8(const void *x, int dt, int64_t i) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)x + i);
    if (dt == DT_BF16) return load_bf16_8((const uint16_t *)x + i);
    return load_f16_8((const uint16_t *)x + i);
}

/* One input value of dtype dt at x[i], as fp32 (exact). */
static inline float load1(const void *x, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)x)[i];
    if (dt == DT_BF16) return bf16_to_f32(((const uint16_t *)x)[i]);
    return f16_to_f32(((const uint16_t *)x)[i]);
}

/* e4m3_8 for lanes known to hold finite values y with |y| <= 464, whose E4M3 rounding is
 * at most 448: no saturation, no NaN, and E = floor(log2 |y|) <= 8 needs no upper clamp.
 * 12 vector operations against e4m3_8's 17: the quantizers' common case (quant_run_avx2). */
static inline __m256i e4m3_8_inrange(__m256 y) {
    const __m256i u = _mm256_castps_si256(y);
    const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i e = _mm256_max_epu32(_mm256_and_si256(a, _mm256_set1_epi32((int)F32_INF_BITS)),
                                       _mm256_set1_epi32((int)E4M3_MIN_NORMAL_BITS));
    const __m256i c = _mm256_add_epi32(e, _mm256_set1_epi32(20 << 23));
    const __m256i sum = _mm256_castps_si256(
        _mm256_add_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(c)));
    const __m256i code = _mm256_add_epi32(_mm256_sub_epi32(sum, c),
                                          _mm256_sub_epi32(_mm256_srli_epi32(c, 20), _mm256_set1_epi32(1128)));
    return _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
}

/* q[c] = e4m3(x[c] / s), the code of the correctly rounded fp32 quotient fl(x / s), for
 * c < n, 32 values per step.  Precondition (the quantizers'): |x[c]| <= A where
 * s = fl(A / 448) (A = max(amax, amax_floor)), or s a power of two >= that (ue8m0); NaN or
 * Inf inputs give meaningless codes (the callers discard them).
 *
 * For a normal s (>= 2^-126), s = (A / 448)(1 + d) with |d| <= 2^-24, so every quotient
 * obeys |x / s| < 448 (1 + 2^-23), fl(x / s) < 449 < 464 and the lean cast
 * e4m3_8_inrange applies; a subnormal or zero s (a tiny or zero amax_floor) takes the full
 * cast, which saturates and makes 0 / 0 a NaN code as the reference does.
 *
 * When s is a power of two in [2^-126, 2^126), r = 1 / s is an fp32 number exactly, so
 * x * r and x / s are the same real number and fl(x * r) = fl(x / s) bit for bit,
 * subnormal results included: those runs (every ue8m0 scale) multiply instead of
 * dividing.  Other scales divide: a reciprocal multiply y = fl(x * fl(1/s)) is within
 * (3u + u^2)|x/s| + 2^-149 of fl(x / s) (u = 2^-24) and gives the same code unless an
 * E4M3 rounding midpoint lies within 2^(E-21) of y; flagging those lanes and dividing
 * them again is exact, but on this AVX2 machine the extra vector operations cost more
 * than the divider, which works beside the cast's integer operations
 * (docs/benchmarks.md, "Division, reciprocal and the cast"). */
static inline __attribute__((always_inline)) void quant_run_avx2(const void *x, int dt, float s,
                                                                 uint8_t *restrict q, int64_t n) {
    const uint32_t sb = f2u(s);
    const __m256 sv = _mm256_set1_ps(s);
    int64_t i = 0;
    if (sb >= 0x00800000u && sb < 0x7E800000u && (sb & 0x007FFFFFu) == 0) {
        const __m256 rv = _mm256_set1_ps(1.0f / s);  /* exact: s is a power of two */
        for (; i + 32 <= n; i += 32)
            store_codes32(q + i, e4m3_8_inrange(_mm256_mul_ps(load8(x, dt, i), rv)),
                          e4m3_8_inrange(_mm256_mul_ps(load8(x, dt, i + 8), rv)),
                          e4m3_8_inrange(_mm256_mul_ps(load8(x, dt, i + 16), rv)),
                          e4m3_8_inrange(_mm256_mul_ps(load8(x, dt, i + 24), rv)));
    } else if (sb >= 0x00800000u && sb < F32_INF_BITS) {
        for (; i + 32 <= n; i += 32)
            store_codes32(q + i, e4m3_8_inrange(_mm256_div_ps(load8(x, dt, i), sv)),
                          e4m3_8_inrange(_mm256_div_ps(load8(x, dt, i + 8), sv)),
                          e4m3_8_inrange(_mm256_div_ps(load8(x, dt, i + 16), sv)),
                          e4m3_8_inrange(_mm256_div_ps(load8(x, dt, i + 24), sv)));
    }
    for (; i + 32 <= n; i += 32)
        store_codes32(q + i, e4m3_8(_mm256_div_ps(load8(x, dt, i), sv)),
                      e4m3_8(_mm256_div_ps(load8(x, dt, i + 8), sv)),
                      e4m3_8(_mm256_div_ps(load8(x, dt, i + 16), sv)),
                      e4m3_8(_mm256_div_ps(load8(x, dt, i + 24), sv)));
    for (; i < n; ++i) q[i] = f32_to_e4m3(load1(x, dt, i) / s);
}

static void quant_run_f32_avx2(const float *x, float s, uint8_t *q, int64_t n) {
    quant_run_avx2(x, DT_F32, s, q, n);
}
static void quant_run_bf16_avx2(const uint16_t *x, float s, uint8_t *q, int64_t n) {
    quant_run_avx2(x, DT_BF16, s, q, n);
}
static void quant_run_f16_avx2(const uint16_t *x, float s, uint8_t *q, int64_t n) {
    quant_run_avx2(x, DT_F16, s, q, n);
}
#endif

/* q[c] = e4m3(x[c] / s) for one run of n values of dtype dt (128: the common group). */
static void quant_run(const void *x, int dt, float s, uint8_t *q, int64_t n) {
#ifdef FF8_HAVE_F16C
    if (dt == DT_BF16) { quant_run_bf16_avx2((const uint16_t *)x, s, q, n); return; }
    if (dt == DT_F32) { quant_run_f32_avx2((const float *)x, s, q, n); return; }
    quant_run_f16_avx2((const uint16_t *)x, s, q, n);
    return;
#endif
    if (n == 128 && dt == DT_BF16) { quant_run_bf16((const uint16_t *)x, s, q, 128); return; }
    if (n == 128 && dt == DT_F32) { quant_run_f32((const float *)x, s, q, 128); return; }
    if (dt == DT_F32) quant_run_f32((const float *)x, s, q, n);
    else if (dt == DT_BF16) quant_run_bf16((const uint16_t *)x, s, q, n);
    else quant_run_f16((const uint16_t *)x, s, q, n);
}

/* out[c] = dtype(decode(q[c]) * s), through chunks decoded by decode_div256: buf * 256 is
 * the decoded value exactly, so (buf * 256) * s rounds like the reference's q.float() * s. */
static void dequant_run(const uint8_t *restrict q, float s, void *out, int dt, int64_t n) {
    float buf[256];
    for (int64_t c0 = 0; c0 < n; c0 += 256) {
        const int64_t len = imin(256, n - c0);
        if (decode_div256(q + c0, buf, len)) {  /* NaN codes (rare): decode exactly instead */
            for (int64_t c = 0; c < len; ++c) buf[c] = e4m3_to_f32(q[c0 + c]) * 0.00390625f;
        }
        if (dt == DT_F32) {
            float *restrict o = (float *)out + c0;
            for (int64_t c = 0; c < len; ++c) o[c] = (buf[c] * 256.0f) * s;
        } else if (dt == DT_BF16) {
            uint16_t *restrict o = (uint16_t *)out + c0;
            for (int64_t c = 0; c < len; ++c) o[c] = f32_to_bf16((buf[c] * 256.0f) * s);
        } else {
            uint16_t *restrict o = (uint16_t *)out + c0;
            for (int64_t c = 0; c < len; ++c) o[c] = f32_to_f16((buf[c] * 256.0f) * s);
        }
    }
}

static inline int64_t esize(int dt) { return dt == DT_F32 ? 4 : 2; }

/* q[i] = e4m3(x[i]): the saturating round-to-nearest-even cast alone, for i < n. */
void ff8_cast_e4m3(const float *restrict x, uint8_t *restrict q, int64_t n) {
#ifdef FF8_HAVE_F16C
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        store_codes32(q + i, e4m3_8(_mm256_loadu_ps(x + i)), e4m3_8(_mm256_loadu_ps(x + i + 8)),
                      e4m3_8(_mm256_loadu_ps(x + i + 16)), e4m3_8(_mm256_loadu_ps(x + i + 24)));
    for (; i < n; ++i) q[i] = f32_to_e4m3(x[i]);
#else
    for (int64_t i = 0; i < n; ++i) q[i] = f32_to_e4m3(x[i]);
#endif
}

/* ------------------------------------------------------------------ block quantization */

/* Quantize block rows [br0, br1) of the row-major [M, N] matrix x with bm x bn blocks.
 * q: [M, N] codes; scale: [ceil(M/bm), ceil(N/bn)] fp32.  Two passes per strip of bm rows,
 * both reading whole rows front to back (the order memory prefetchers follow): the amax
 * pass keeps a running |x| maximum per column, reduced per block into the scales; the
 * quantization pass then reads the strip again, now from the cache.  Returns the number
 * of blocks holding NaN or Inf (their codes and scales are then meaningless: the caller
 * falls back to the reference), or -1 when scratch memory could not be allocated. */
int64_t ff8_quant_block(const void *x, int dt, int64_t M, int64_t N, int64_t bm, int64_t bn,
                        int64_t br0, int64_t br1, float amax_floor, int ue8m0,
                        uint8_t *q, float *scale) {
    const int64_t es = esize(dt);
    const int64_t gn = (N + bn - 1) / bn;
    uint32_t *colmax = (uint32_t *)malloc((size_t)N * sizeof(uint32_t));
    if (!colmax) return -1;
    int64_t bad = 0;
    const char *xb = (const char *)x;
    for (int64_t bi = br0; bi < br1; ++bi) {
        const int64_t r0 = bi * bm, r1 = imin(r0 + bm, M);
        float *srow = scale + bi * gn;
        uint16_t *colmax16 = (uint16_t *)colmax;  /* 16-bit inputs keep 16-bit maxima */
        memset(colmax, 0, (size_t)N * sizeof(uint32_t));
        for (int64_t r = r0; r < r1; ++r) {
            const char *row = xb + r * N * es;
            if (dt == DT_F32) absmax_row_f32((const float *)row, colmax, N);
            else absmax_row_u16((const uint16_t *)row, colmax16, N);
        }
        for (int64_t j = 0; j < gn; ++j) {
            uint32_t m = 0;
            for (int64_t c = j * bn; c < imin((j + 1) * bn, N); ++c) {
                const uint32_t v = dt == DT_F32 ? colmax[c] : colmax16[c];
                m = v > m ? v : m;
            }
            srow[j] = scale_of(amax_value(m, dt, &bad), amax_floor, ue8m0);
        }
        for (int64_t r = r0; r < r1; ++r) {
            for (int64_t j = 0; j < gn; ++j) {
                const int64_t cs = j * bn, n = imin(bn, N - cs);
                quant_run(xb + (r * N + cs) * es, dt, srow[j], q + r * N + cs, n);
            }
        }
    }
    free(colmax);
    return bad;
}

/* Quantize rows [t0, t1) of the row-major [T, K] activation x in groups of g channels.
 * q: [T, K] codes; scale: [T, ceil(K/g)].  Returns the number of groups with NaN/Inf. */
int64_t ff8_quant_group(const void *x, int dt, int64_t T, int64_t K, int64_t g,
                        int64_t t0, int64_t t1, float amax_floor, int ue8m0,
                        uint8_t *q, float *scale) {
    (void)T;
    const int64_t es = esize(dt);
    const int64_t gk = (K + g - 1) / g;
    const char *xb = (const char *)x;
    int64_t bad = 0;
    for (int64_t t = t0; t < t1; ++t) {
        for (int64_t j = 0; j < gk; ++j) {
            const int64_t cs = j * g, n = imin(g, K - cs);
            const char *p = xb + (t * K + cs) * es;
            uint32_t m;
#ifdef FF8_HAVE_F16C
            if (n == 128) m = dt == DT_F32 ? absmax128_f32((const float *)p) : absmax128_u16((const uint16_t *)p);
#else
            if (n == 128) m = dt == DT_F32 ? absmax_f32((const float *)p, 128) : absmax_u16((const uint16_t *)p, 128);
#endif
            else m = dt == DT_F32 ? absmax_f32((const float *)p, n) : absmax_u16((const uint16_t *)p, n);
            float s = scale_of(amax_value(m, dt, &bad), amax_floor, ue8m0);
            scale[t * gk + j] = s;
            quant_run(p, dt, s, q + t * K + cs, n);
        }
    }
    return bad;
}

/* ------------------------------------------------------------------ dequantization */

/* out[r, c] = dtype(decode(q[r, c]) * scale[r / bm, c / bn]) for block rows [br0, br1). */
void ff8_dequant_block(const uint8_t *q, const float *scale, int64_t M, int64_t N, int64_t bm,
                       int64_t bn, int64_t br0, int64_t br1, void *out, int dt) {
    const int64_t es = esize(dt);
    const int64_t gn = (N + bn - 1) / bn;
    char *ob = (char *)out;
    for (int64_t r = br0 * bm; r < imin(br1 * bm, M); ++r) {
        const float *srow = scale + (r / bm) * gn;
        for (int64_t j = 0; j < gn; ++j) {
            const int64_t cs = j * bn, n = imin(bn, N - cs);
            dequant_run(q + r * N + cs, srow[j], ob + (r * N + cs) * es, dt, n);
        }
    }
}

/* out[t, c] = dtype(decode(q[t, c]) * scale[t, c / g]) for rows [t0, t1). */
void ff8_dequant_group(const uint8_t *q, const float *scale, int64_t T, int64_t K, int64_t g,
                       int64_t t0, int64_t t1, void *out, int dt) {
    (void)T;
    const int64_t es = esize(dt);
    const int64_t gk = (K + g - 1) / g;
    char *ob = (char *)out;
    for (int64_t t = t0; t < t1; ++t) {
        for (int64_t j = 0; j < gk; ++j) {
            const int64_t cs = j * g, n = imin(g, K - cs);
            dequant_run(q + t * K + cs, scale[t * gk + j], ob + (t * K + cs) * es, dt, n);
        }
    }
}

/* ------------------------------------------------------------------ weight-only linear */

typedef float v8f __attribute__((vector_size(32)));

static inline v8f ld8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#define LIN_R 4  /* weight rows per micro-tile */

#ifdef FF8_HAVE_GEMV
/* One token (T = 1), rows [n0, n1): each weight row is streamed once, its codes decoded in
 * registers (F16C, as decode_div256) and multiplied into four 8-lane fp32 accumulators;
 * each K block's sum is scaled by 256 * s and added to the row total.  x as in
 * ff8_linear_w8 ([gk, bnp], zero-padded blocks). */
static void linear_gemv(const float *x, int64_t K, const uint8_t *q, const float *scale,
                        int64_t N, int64_t bm, int64_t bn, int64_t bnp, int64_t n0, int64_t n1,
                        float *y) {
    (void)N;
    const int64_t gk = (K + bn - 1) / bn;
    const __m128i m7f = _mm_set1_epi8(0x7F);
    const __m256i clear14 = _mm256_set1_epi16((short)0xBFFF);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *qr = q + n * K;
        const float *srow = scale + (n / bm) * gk;
        __m256 tot = _mm256_setzero_ps();
        float tot_tail = 0.0f;
        for (int64_t kb = 0; kb < gk; ++kb) {
            const int64_t k0 = kb * bn, len = imin(bn, K - k0);
            const uint8_t *qb = qr + k0;
            const float *xb = x + kb * bnp;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            __m128i nanacc = _mm_setzero_si128();
            int64_t c = 0;
            for (; c + 32 <= len; c += 32) {
                const __m128i b0 = _mm_loadu_si128((const __m128i *)(qb + c));
                const __m128i b1 = _mm_loadu_si128((const __m128i *)(qb + c + 16));
                nanacc = _mm_or_si128(nanacc, _mm_cmpeq_epi8(_mm_and_si128(b0, m7f), m7f));
                nanacc = _mm_or_si128(nanacc, _mm_cmpeq_epi8(_mm_and_si128(b1, m7f), m7f));
                __m256i h0 = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b0), 8);
                __m256i h1 = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b1), 8);
                h0 = _mm256_and_si256(_mm256_srai_epi16(h0, 1), clear14);
                h1 = _mm256_and_si256(_mm256_srai_epi16(h1, 1), clear14);
                a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h0)), _mm256_loadu_ps(xb + c), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1)), _mm256_loadu_ps(xb + c + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h1)), _mm256_loadu_ps(xb + c + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1)), _mm256_loadu_ps(xb + c + 24), a3);
            }
            int nan = !_mm_testz_si128(nanacc, nanacc);
            float tail = 0.0f;  /* the last < 32 channels, in true values */
            for (; c < len; ++c) {
                tail += e4m3_to_f32(qb[c]) * xb[c];
                nan |= (qb[c] & 0x7F) == 0x7F;
            }
            const float sc = nan ? NAN : srow[kb];
            const __m256 blk = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                             _mm256_set1_ps(256.0f));
            tot = _mm256_fmadd_ps(blk, _mm256_set1_ps(sc), tot);
            tot_tail += tail * sc;
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(tot), _mm256_extractf128_ps(tot, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        y[n] = _mm_cvtss_f32(h) + tot_tail;
    }
}
#endif

#ifdef FF8_HAVE_AVX512BF16
/* linear_gemv with 512-bit vectors: 32 codes per step, decoded as in decode_div256 (F16C on
 * 16 lanes) and multiplied into two 16-lane fp32 accumulators; same sums per K block. */
static void linear_gemv512(const float *x, int64_t K, const uint8_t *q, const float *scale,
                           int64_t bm, int64_t bn, int64_t bnp, int64_t n0, int64_t n1, float *y) {
    const int64_t gk = (K + bn - 1) / bn;
    const __m256i m7f = _mm256_set1_epi8(0x7F);
    const __m512i clear14 = _mm512_set1_epi16((short)0xBFFF);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *qr = q + n * K;
        const float *srow = scale + (n / bm) * gk;
        __m512 tot = _mm512_setzero_ps();
        float tot_tail = 0.0f;
        for (int64_t kb = 0; kb < gk; ++kb) {
            const int64_t k0 = kb * bn, len = imin(bn, K - k0);
            const uint8_t *qb = qr + k0;
            const float *xb = x + kb * bnp;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;
            __mmask32 nanm = 0;
            int64_t c = 0;
            for (; c + 32 <= len; c += 32) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(qb + c));
                nanm |= _mm256_cmpeq_epi8_mask(_mm256_and_si256(b, m7f), m7f);
                __m512i h = _mm512_slli_epi16(_mm512_cvtepu8_epi16(b), 8);
                h = _mm512_and_si512(_mm512_srai_epi16(h, 1), clear14);
                a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), _mm512_loadu_ps(xb + c), a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), _mm512_loadu_ps(xb + c + 16), a1);
            }
            int nan = nanm != 0;
            float tail = 0.0f;  /* the last < 32 channels, in true values */
            for (; c < len; ++c) {
                tail += e4m3_to_f32(qb[c]) * xb[c];
                nan |= (qb[c] & 0x7F) == 0x7F;
            }
            const float sc = nan ? NAN : srow[kb];
            tot = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(256.0f)),
                                  _mm512_set1_ps(sc), tot);
            tot_tail += tail * sc;
        }
        y[n] = _mm512_reduce_add_ps(tot) + tot_tail;
    }
}
#endif

/* y[t, n] = sum_k x[t, k] * decode(q[n, k]) * scale[n / bm, k / bn] for rows [n0, n1).
 *
 * x:  [T, gk, bnp] fp32, the activations with each K block zero-padded to bnp (a multiple
 *     of 8 >= bn) channels; gk = ceil(K / bn).
 * q:  [N, K] E4M3 codes; scale: [ceil(N / bm), gk] fp32; y: [T, N] fp32.
 *
 * Per tile of LIN_R weight rows and one K block the codes are decoded once into a small
 * fp32 buffer (1 byte read per weight), then every token pair runs an 8-lane dot product
 * against it; each block's partial sums are multiplied by the block scale and added to
 * per-(row, token) vector totals, summed across lanes at the end of the row.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int ff8_linear_w8(const float *x, int64_t T, int64_t K, const uint8_t *q, const float *scale,
                  int64_t N, int64_t bm, int64_t bn, int64_t bnp, int64_t n0, int64_t n1,
                  float *y) {
#ifdef FF8_HAVE_AVX512BF16
    if (T == 1) { linear_gemv512(x, K, q, scale, bm, bn, bnp, n0, n1, y); return 0; }
#endif
#ifdef FF8_HAVE_GEMV
    if (T == 1) { linear_gemv(x, K, q, scale, N, bm, bn, bnp, n0, n1, y); return 0; }
#endif
    const int64_t gk = (K + bn - 1) / bn;
    void *wmem = NULL, *tmem = NULL;  /* 64-byte aligned: v8f loads/stores need 32 */
    if (posix_memalign(&wmem, 64, (size_t)(LIN_R * bnp) * sizeof(float)) != 0) wmem = NULL;
    if (posix_memalign(&tmem, 64, (size_t)(LIN_R * T) * sizeof(v8f)) != 0) tmem = NULL;
    if (!wmem || !tmem) { free(wmem); free(tmem); return -1; }
    float *wbuf = (float *)wmem;
    v8f *tot = (v8f *)tmem;
    for (int64_t n = n0; n < n1; n += LIN_R) {
        const int64_t rows = imin(LIN_R, n1 - n);
        memset(tot, 0, (size_t)(LIN_R * T) * sizeof(v8f));
        for (int64_t kb = 0; kb < gk; ++kb) {
            const int64_t k0 = kb * bn, len = imin(bn, K - k0);
            float s[LIN_R];
            for (int64_t r = 0; r < LIN_R; ++r) {
                float *wr = wbuf + r * bnp;
                if (r < rows) {
                    const uint8_t *qr = q + (n + r) * K + k0;
                    /* prefetch this row 8 blocks ahead: the rows are 4 interleaved streams */
                    if (k0 + 8 * bn < K) {
                        for (int64_t c = 0; c < len; c += 64) __builtin_prefetch(qr + 8 * bn + c, 0, 0);
                    }
                    const int nan = decode_div256(qr, wr, len);
                    for (int64_t c = len; c < bnp; ++c) wr[c] = 0.0f;
                    s[r] = nan ? NAN : scale[((n + r) / bm) * gk + kb];
                } else {
                    memset(wr, 0, (size_t)bnp * sizeof(float));
                    s[r] = 0.0f;
                }
            }
            int64_t t = 0;
            for (; t + 1 < T; t += 2) {  /* token pairs: 8 accumulators */
                const float *xa = x + (t * gk + kb) * bnp, *xb = x + ((t + 1) * gk + kb) * bnp;
                v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
                for (int64_t c = 0; c < bnp; c += 8) {
                    const v8f xv = ld8(xa + c), yv = ld8(xb + c);
                    const v8f w0 = ld8(wbuf + c), w1 = ld8(wbuf + bnp + c);
                    const v8f w2 = ld8(wbuf + 2 * bnp + c), w3 = ld8(wbuf + 3 * bnp + c);
                    a0 += xv * w0; a1 += xv * w1; a2 += xv * w2; a3 += xv * w3;
                    b0 += yv * w0; b1 += yv * w1; b2 += yv * w2; b3 += yv * w3;
                }
                /* the decoded weights are value / 256: * 256 restores the exact partial sums */
                v8f *ta = tot + t * LIN_R, *tb = tot + (t + 1) * LIN_R;
                ta[0] += (a0 * 256.0f) * s[0]; ta[1] += (a1 * 256.0f) * s[1];
                ta[2] += (a2 * 256.0f) * s[2]; ta[3] += (a3 * 256.0f) * s[3];
                tb[0] += (b0 * 256.0f) * s[0]; tb[1] += (b1 * 256.0f) * s[1];
                tb[2] += (b2 * 256.0f) * s[2]; tb[3] += (b3 * 256.0f) * s[3];
            }
            if (t < T) {  /* the last odd token: two accumulators per row */
                const float *xa = x + (t * gk + kb) * bnp;
                v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0};
                int64_t c = 0;
                for (; c + 16 <= bnp; c += 16) {
                    const v8f xv = ld8(xa + c), yv = ld8(xa + c + 8);
                    a0 += xv * ld8(wbuf + c); a1 += xv * ld8(wbuf + bnp + c);
                    a2 += xv * ld8(wbuf + 2 * bnp + c); a3 += xv * ld8(wbuf + 3 * bnp + c);
                    e0 += yv * ld8(wbuf + c + 8); e1 += yv * ld8(wbuf + bnp + c + 8);
                    e2 += yv * ld8(wbuf + 2 * bnp + c + 8); e3 += yv * ld8(wbuf + 3 * bnp + c + 8);
                }
                for (; c < bnp; c += 8) {
                    const v8f xv = ld8(xa + c);
                    a0 += xv * ld8(wbuf + c); a1 += xv * ld8(wbuf + bnp + c);
                    a2 += xv * ld8(wbuf + 2 * bnp + c); a3 += xv * ld8(wbuf + 3 * bnp + c);
                }
                v8f *ta = tot + t * LIN_R;
                ta[0] += ((a0 + e0) * 256.0f) * s[0]; ta[1] += ((a1 + e1) * 256.0f) * s[1];
                ta[2] += ((a2 + e2) * 256.0f) * s[2]; ta[3] += ((a3 + e3) * 256.0f) * s[3];
            }
        }
        for (int64_t t = 0; t < T; ++t)
            for (int64_t r = 0; r < rows; ++r) y[t * N + n + r] = hsum8(tot[t * LIN_R + r]);
    }
    free(wbuf);
    free(tot);
    return 0;
}

/* ------------------------------------------------------------------ weight-only linear, bf16 */

#ifdef FF8_HAVE_AVX512BF16
#define LINB_R 4  /* weight rows per micro-tile */

/* 32 E4M3 codes -> 32 bf16 values decode(q) / 256, exact (the F16C step of decode_div256,
 * then fp32 -> bf16, exact for these 4-significant-bit values); *nan |= a NaN code seen. */
static inline __m512bh decode32_bf16(const uint8_t *q, __mmask32 *nan) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)q);
    const __m256i m7f = _mm256_set1_epi8(0x7F);
    *nan |= _mm256_cmpeq_epi8_mask(_mm256_and_si256(b, m7f), m7f);
    __m512i h = _mm512_slli_epi16(_mm512_cvtepu8_epi16(b), 8);
    h = _mm512_and_si512(_mm512_srai_epi16(h, 1), _mm512_set1_epi16((short)0xBFFF));
    const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
    return _mm512_cvtne2ps_pbh(hi, lo);
}
#endif

/* y[t, n] = sum_k x[t, k] * decode(q[n, k]) * scale[n / bm, k / bn] for rows [n0, n1), with
 * bfloat16 activations and the CPU's bf16 dot-product instruction (AVX-512-BF16 vdpbf16ps).
 *
 * x:  [T, gk, bnp] bf16, each K block zero-padded to bnp (a multiple of 32) channels.
 * q:  [N, K] E4M3 codes; scale: [ceil(N / bm), gk] fp32; y: [T, N] fp32.
 *
 * Per tile of LINB_R weight rows and one K block, the codes are decoded once into bf16 in a
 * buffer that stays in L1 (E4M3 values are exact in bf16); every token then runs LINB_R
 * 16-lane dot products against it.  Each product of a bf16 activation and a decoded weight is
 * exact in fp32 and accumulated in fp32 (vdpbf16ps rounds to nearest even and treats bf16
 * subnormal inputs as zero); each block's partial sum is scaled by 256 * s and added to the
 * (row, token) total.  Returns 0, -1 when scratch memory could not be allocated, -2 when
 * the library was built without AVX-512-BF16 (the caller then uses ff8_linear_w8). */
int ff8_linear_w8_bf16(const uint16_t *x, int64_t T, int64_t K, const uint8_t *q,
                       const float *scale, int64_t N, int64_t bm, int64_t bn, int64_t bnp,
                       int64_t n0, int64_t n1, float *y) {
#ifndef FF8_HAVE_AVX512BF16
    (void)x; (void)T; (void)K; (void)q; (void)scale; (void)N; (void)bm; (void)bn; (void)bnp;
    (void)n0; (void)n1; (void)y;
    return -2;
#else
    const int64_t gk = (K + bn - 1) / bn;
    const int64_t nv = bnp / 32;
    void *wmem = NULL, *tmem = NULL;
    if (posix_memalign(&wmem, 64, (size_t)(LINB_R * nv) * sizeof(__m512bh)) != 0) wmem = NULL;
    if (posix_memalign(&tmem, 64, (size_t)(LINB_R * T) * sizeof(__m512)) != 0) tmem = NULL;
    if (!wmem || !tmem) { free(wmem); free(tmem); return -1; }
    __m512bh *w = (__m512bh *)wmem;
    __m512 *tot = (__m512 *)tmem;
    uint8_t tail[32];
    for (int64_t n = n0; n < n1; n += LINB_R) {
        const int64_t rows = imin(LINB_R, n1 - n);
        for (int64_t i = 0; i < LINB_R * T; ++i) tot[i] = _mm512_setzero_ps();
        for (int64_t kb = 0; kb < gk; ++kb) {
            const int64_t k0 = kb * bn, len = imin(bn, K - k0);
            __m512 sv[LINB_R];
            for (int64_t r = 0; r < LINB_R; ++r) {
                __m512bh *wr = w + r * nv;
                if (r < rows) {
                    const uint8_t *qr = q + (n + r) * K + k0;
                    if (k0 + 8 * bn < K) {
                        for (int64_t c = 0; c < len; c += 64) __builtin_prefetch(qr + 8 * bn + c, 0, 0);
                    }
                    __mmask32 nan = 0;
                    for (int64_t v = 0; v < nv; ++v) {
                        const int64_t c = v * 32;
                        if (c + 32 <= len) {
                            wr[v] = decode32_bf16(qr + c, &nan);
                        } else {
                            memset(tail, 0, sizeof tail);
                            if (c < len) memcpy(tail, qr + c, (size_t)(len - c));
                            wr[v] = decode32_bf16(tail, &nan);
                        }
                    }
                    const float s = scale[((n + r) / bm) * gk + kb];
                    sv[r] = _mm512_set1_ps(nan ? NAN : s * 256.0f);
                } else {
                    for (int64_t v = 0; v < nv; ++v) wr[v] = (__m512bh)_mm512_setzero_si512();
                    sv[r] = _mm512_setzero_ps();
                }
            }
            if (nv == 4) {  /* bn = 128 (the common block): the tile's 16 vectors in registers */
                const __m512bh w00 = w[0], w01 = w[1], w02 = w[2], w03 = w[3];
                const __m512bh w10 = w[4], w11 = w[5], w12 = w[6], w13 = w[7];
                const __m512bh w20 = w[8], w21 = w[9], w22 = w[10], w23 = w[11];
                const __m512bh w30 = w[12], w31 = w[13], w32 = w[14], w33 = w[15];
                for (int64_t t = 0; t < T; ++t) {
                    const uint16_t *xb = x + (t * gk + kb) * bnp;
                    const __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)xb);
                    const __m512bh x1 = (__m512bh)_mm512_loadu_si512((const void *)(xb + 32));
                    const __m512bh x2 = (__m512bh)_mm512_loadu_si512((const void *)(xb + 64));
                    const __m512bh x3 = (__m512bh)_mm512_loadu_si512((const void *)(xb + 96));
                    const __m512 z = _mm512_setzero_ps();
                    __m512 a0 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(z, x0, w00), x1, w01);
                    __m512 a1 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(z, x0, w10), x1, w11);
                    __m512 a2 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(z, x0, w20), x1, w21);
                    __m512 a3 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(z, x0, w30), x1, w31);
                    a0 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a0, x2, w02), x3, w03);
                    a1 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a1, x2, w12), x3, w13);
                    a2 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a2, x2, w22), x3, w23);
                    a3 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a3, x2, w32), x3, w33);
                    __m512 *tt = tot + t * LINB_R;
                    tt[0] = _mm512_fmadd_ps(a0, sv[0], tt[0]);
                    tt[1] = _mm512_fmadd_ps(a1, sv[1], tt[1]);
                    tt[2] = _mm512_fmadd_ps(a2, sv[2], tt[2]);
                    tt[3] = _mm512_fmadd_ps(a3, sv[3], tt[3]);
                }
                continue;
            }
            for (int64_t t = 0; t < T; ++t) {
                const uint16_t *xb = x + (t * gk + kb) * bnp;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t v = 0; v < nv; ++v) {
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + 32 * v));
                    a0 = _mm512_dpbf16_ps(a0, xv, w[v]);
                    a1 = _mm512_dpbf16_ps(a1, xv, w[nv + v]);
                    a2 = _mm512_dpbf16_ps(a2, xv, w[2 * nv + v]);
                    a3 = _mm512_dpbf16_ps(a3, xv, w[3 * nv + v]);
                }
                __m512 *tt = tot + t * LINB_R;
                tt[0] = _mm512_fmadd_ps(a0, sv[0], tt[0]);
                tt[1] = _mm512_fmadd_ps(a1, sv[1], tt[1]);
                tt[2] = _mm512_fmadd_ps(a2, sv[2], tt[2]);
                tt[3] = _mm512_fmadd_ps(a3, sv[3], tt[3]);
            }
        }
        for (int64_t t = 0; t < T; ++t)
            for (int64_t r = 0; r < rows; ++r) y[t * N + n + r] = _mm512_reduce_add_ps(tot[t * LINB_R + r]);
    }
    free(wmem);
    free(tmem);
    return 0;
#endif
}

/* ------------------------------------------------------------------ threads (OpenMP)
 *
 * Each *_mt function runs its kernel over the whole range, cut into contiguous chunks (4 per
 * thread) handed out dynamically to `threads` OpenMP threads.  Built with -fopenmp, the library
 * needs libgomp.so.1; loaded into a process where PyTorch already loaded its own libgomp.so.1,
 * the dynamic loader reuses that one, so these regions run on the same OpenMP threads as
 * PyTorch's own operators (no second pool competing for the cores, no spinning threads to
 * wait behind).  Without OpenMP the pragmas are ignored and the loop runs on one thread. */

static inline int64_t ff8_chunks(int64_t n, int threads) {
    if (threads <= 1 || n <= 1) return n < 1 ? 0 : 1;
    return n < 4 * (int64_t)threads ? n : 4 * (int64_t)threads;
}

int64_t ff8_quant_block_mt(const void *x, int dt, int64_t M, int64_t N, int64_t bm, int64_t bn,
                           float amax_floor, int ue8m0, uint8_t *q, float *scale, int threads) {
    const int64_t gm = (M + bm - 1) / bm, nc = ff8_chunks(gm, threads);
    int64_t bad = 0, fail = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(+ : bad) \
    reduction(| : fail) if (nc > 1)
    for (int64_t c = 0; c < nc; ++c) {
        const int64_t r = ff8_quant_block(x, dt, M, N, bm, bn, gm * c / nc, gm * (c + 1) / nc,
                                          amax_floor, ue8m0, q, scale);
        if (r < 0) fail |= 1; else bad += r;
    }
    return fail ? -1 : bad;
}

int64_t ff8_quant_group_mt(const void *x, int dt, int64_t T, int64_t K, int64_t g,
                           float amax_floor, int ue8m0, uint8_t *q, float *scale, int threads) {
    const int64_t nc = ff8_chunks(T, threads);
    int64_t bad = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(+ : bad) if (nc > 1)
    for (int64_t c = 0; c < nc; ++c)
        bad += ff8_quant_group(x, dt, T, K, g, T * c / nc, T * (c + 1) / nc, amax_floor, ue8m0,
                               q, scale);
    return bad;
}

void ff8_dequant_block_mt(const uint8_t *q, const float *scale, int64_t M, int64_t N, int64_t bm,
                          int64_t bn, void *out, int dt, int threads) {
    const int64_t gm = (M + bm - 1) / bm, nc = ff8_chunks(gm, threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (nc > 1)
    for (int64_t c = 0; c < nc; ++c)
        ff8_dequant_block(q, scale, M, N, bm, bn, gm * c / nc, gm * (c + 1) / nc, out, dt);
}

void ff8_dequant_group_mt(const uint8_t *q, const float *scale, int64_t T, int64_t K, int64_t g,
                          void *out, int dt, int threads) {
    const int64_t nc = ff8_chunks(T, threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (nc > 1)
    for (int64_t c = 0; c < nc; ++c)
        ff8_dequant_group(q, scale, T, K, g, T * c / nc, T * (c + 1) / nc, out, dt);
}

/* ff8_linear_w8 (bf16 = 0) or ff8_linear_w8_bf16 (bf16 = 1) over all N rows; chunks are
 * multiples of 4 rows (the micro-tile).  Returns 0, -1 (no scratch memory) or -2. */
int ff8_linear_mt(const void *x, int bf16, int64_t T, int64_t K, const uint8_t *q,
                  const float *scale, int64_t N, int64_t bm, int64_t bn, int64_t bnp, float *y,
                  int threads) {
    const int64_t tiles = (N + 3) / 4, nc = ff8_chunks(tiles, threads);
    int fail = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : fail) if (nc > 1)
    for (int64_t c = 0; c < nc; ++c) {
        const int64_t n0 = imin(N, 4 * (tiles * c / nc)), n1 = imin(N, 4 * (tiles * (c + 1) / nc));
        const int r = bf16 ? ff8_linear_w8_bf16((const uint16_t *)x, T, K, q, scale, N, bm, bn, bnp,
                                                n0, n1, y)
                           : ff8_linear_w8((const float *)x, T, K, q, scale, N, bm, bn, bnp, n0, n1, y);
        fail |= r;
    }
    return fail;
}
