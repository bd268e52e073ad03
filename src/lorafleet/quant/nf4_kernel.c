/* nf4_kernel.c: compiled by lorafleet.native.build_library on first use. */
#include <stdint.h>
#include <immintrin.h>
#ifndef __AVX512F__
#error "needs AVX-512F"
#endif
/* y[t, o] = sum_b sum_k cb[code(o, b, k)] * s[o, b] * x[t, b*bs + k], fp32 accumulation.
 * codes: [out, in/2] bytes, element 2j in the high nibble of byte j (bitsandbytes order).
 * xs: x split per block into its even and odd elements, [tokens, in/bs, 2, bs/2] fp32, so the
 * high nibbles of 16 bytes meet 16 even x and the low nibbles 16 odd x: no lane shuffles. */
/* Block scale i: stored fp32 (absmax), or double-quantized: dmap[code] * scale + offset, in that
 * fp32 order (built with -ffp-contract=off: the same bits as NF4Tensor.scales()). */
typedef struct { const float *absmax; const uint8_t *codes; const float *scale; float offset;
                 const float *dmap; } scales_t;

static inline float block_scale(const scales_t *sc, long i) {
    return sc->absmax ? sc->absmax[i] : sc->dmap[sc->codes[i]] * sc->scale[i / 256] + sc->offset;
}

static inline __attribute__((always_inline)) void rows_nt(
        const uint8_t *codes, const scales_t *scales, const float *xs, float *y, long out,
        long in, long bs, long t0, const long nt, __m512 book) {
    const long nb = in / bs, half = bs / 2;
    const __m512i low = _mm512_set1_epi32(15);
    for (long o = 0; o < out; o++) {
        const uint8_t *row = codes + o * (in / 2);
        /* four independent accumulators per token: the FMA latency, not the port, binds */
        __m512 acc[3][4];
        #pragma GCC unroll 3
        for (long t = 0; t < nt; t++)
            for (int a = 0; a < 4; a++) acc[t][a] = _mm512_setzero_ps();
        for (long b = 0; b < nb; b++) {
            const __m512 s = _mm512_set1_ps(block_scale(scales, o * nb + b));
            for (long j = 0; j < half; j += 32) {
                const uint8_t *p = row + b * half + j;
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
                __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)));
                __m512 h0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), book), s);
                __m512 l0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v0, low), book), s);
                __m512 h1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), book), s);
                __m512 l1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v1, low), book), s);
                #pragma GCC unroll 3
                for (long t = 0; t < nt; t++) {
                    const float *xb = xs + ((t0 + t) * nb + b) * bs + j;
                    acc[t][0] = _mm512_fmadd_ps(h0, _mm512_loadu_ps(xb), acc[t][0]);
                    acc[t][1] = _mm512_fmadd_ps(h1, _mm512_loadu_ps(xb + 16), acc[t][1]);
                    acc[t][2] = _mm512_fmadd_ps(l0, _mm512_loadu_ps(xb + half), acc[t][2]);
                    acc[t][3] = _mm512_fmadd_ps(l1, _mm512_loadu_ps(xb + half + 16), acc[t][3]);
                }
            }
        }
        #pragma GCC unroll 3
        for (long t = 0; t < nt; t++)
            y[(t0 + t) * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
    }
}

/* bs a multiple of 64; tokens are taken three at a time: the codes are decoded once per group,
 * and three tokens' 12 accumulators + the decoded values fit in the 32 registers (groups of 2
 * and 4 measured 10-35% slower at 3..16 tokens). */
void nf4_linear(const uint8_t *codes, const float *absmax, const uint8_t *scodes,
                const float *sscale, float soffset, const float *dmap, const float *cb,
                const float *xs, float *y, long out, long in, long bs, long tokens) {
    const scales_t sc = {absmax, scodes, sscale, soffset, dmap}, *scales = &sc;
    const __m512 book = _mm512_loadu_ps(cb);
    for (long t0 = 0; t0 < tokens; t0 += 3) {
        switch (tokens - t0 < 3 ? tokens - t0 : 3) {
            case 1: rows_nt(codes, scales, xs, y, out, in, bs, t0, 1, book); break;
            case 2: rows_nt(codes, scales, xs, y, out, in, bs, t0, 2, book); break;
            default: rows_nt(codes, scales, xs, y, out, in, bs, t0, 3, book); break;
        }
    }
}
#ifdef __AVX512BF16__
/* bf16 inputs (AVX512-BF16): each 16 bytes of codes give 32 weights cb * s, rounded to bf16 (as
 * the reference's dequantized weight is) and packed [16 high-nibble values, 16 low-nibble ones];
 * x is packed the same way, so one vdpbf16ps does 32 multiply-adds into 16 fp32 lanes (twice the
 * fp32 FMA's work, and half the x bytes). Up to 8 tokens per pass: decoding once per 8 tokens
 * is what makes 8-32 tokens cheap. xp: [tokens, in/bs, bs/32, 2, 16] bf16. */
static inline __attribute__((always_inline)) void rows_bf16(
        const uint8_t *codes, const scales_t *scales, const uint16_t *xp, float *y, long out,
        long in, long bs, long t0, const long nt, __m512 book) {
    const long nb = in / bs, half = bs / 2;
    const __m512i low = _mm512_set1_epi32(15);
    for (long o = 0; o < out; o++) {
        const uint8_t *row = codes + o * (in / 2);
        __m512 acc[8][2];
        #pragma GCC unroll 8
        for (long t = 0; t < nt; t++) { acc[t][0] = _mm512_setzero_ps(); acc[t][1] = _mm512_setzero_ps(); }
        for (long b = 0; b < nb; b++) {
            const __m512 s = _mm512_set1_ps(block_scale(scales, o * nb + b));
            for (long j = 0; j < half; j += 32) {
                const uint8_t *p = row + b * half + j;
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
                __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)));
                __m512bh w0 = _mm512_cvtne2ps_pbh(
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v0, low), book), s),
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), book), s));
                __m512bh w1 = _mm512_cvtne2ps_pbh(
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v1, low), book), s),
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), book), s));
                #pragma GCC unroll 8
                for (long t = 0; t < nt; t++) {
                    const uint16_t *xb = xp + ((t0 + t) * nb + b) * bs + 2 * j;
                    acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, (__m512bh)_mm512_loadu_si512(xb));
                    acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, (__m512bh)_mm512_loadu_si512(xb + 32));
                }
            }
        }
        #pragma GCC unroll 8
        for (long t = 0; t < nt; t++)
            y[(t0 + t) * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
    }
}

void nf4_linear_bf16(const uint8_t *codes, const float *absmax, const uint8_t *scodes,
                     const float *sscale, float soffset, const float *dmap, const float *cb,
                     const uint16_t *xp, float *y, long out, long in, long bs, long tokens) {
    const scales_t sc = {absmax, scodes, sscale, soffset, dmap}, *scales = &sc;
    const __m512 book = _mm512_loadu_ps(cb);
    for (long t0 = 0; t0 < tokens; t0 += 8) {
        switch (tokens - t0 < 8 ? tokens - t0 : 8) {
            case 1: rows_bf16(codes, scales, xp, y, out, in, bs, t0, 1, book); break;
            case 2: rows_bf16(codes, scales, xp, y, out, in, bs, t0, 2, book); break;
            case 3: rows_bf16(codes, scales, xp, y, out, in, bs, t0, 3, book); break;
            case 4: rows_bf16(codes, scales, xp, y, out, in, bs, t0, 4, book); break;
            case 5: rows_bf16(codes, scales, xp, y, out, in, bs, t0, 5, book); break;
            case 6: rows_bf16(codes, scales, xp, y, out, in, bs, t0, 6, book); break;
            case 7: rows_bf16(codes, scales, xp, y, out, in, bs, t0, 7, book); break;
            default: rows_bf16(codes, scales, xp, y, out, in, bs, t0, 8, book); break;
        }
    }
}
#endif
