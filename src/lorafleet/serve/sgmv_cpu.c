/* sgmv_cpu.c: compiled by lorafleet.native.build_library on first use,
 * after lorafleet/native.py's C_HELPERS (bf16 conversions, load_row). */
#include <stdlib.h>
#ifdef LF_AVX512
#define SGMV_AVX512 1
#ifdef __AVX512BF16__
#define SGMV_BF16DOT 1  /* bf16 shrink straight from the pages: vdpbf16ps, 32 products/op */
#endif
#endif

#define RB 4          /* rows per block: each weight vector is loaded once per RB rows */
#define KB 4          /* rank rows per shrink block: RB x KB accumulators in registers */
#define VL 16         /* floats per vector */

static inline long round_up(long n, long m) { return (n + m - 1) / m * m; }

/* y[0:n] = round(y + scale * acc), y fp32 or bf16 */
static void update_row(void *y, const float *acc, float scale, long n, int bf16) {
    long i = 0;
    if (!bf16) {
        float *yf = y;
        for (; i < n; i++) yf[i] = yf[i] + scale * acc[i];
        return;
    }
    uint16_t *yb = y;
#ifdef SGMV_AVX512
    const __m512 vs = _mm512_set1_ps(scale);
    const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    for (; i + VL <= n; i += VL) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(yb + i)));
        __m512 f = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                                 _mm512_mul_ps(vs, _mm512_loadu_ps(acc + i)));
        __m512i u = _mm512_castps_si512(f);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
        r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
        _mm256_storeu_si256((__m256i *)(yb + i), _mm512_cvtepi32_epi16(r));
    }
#endif
    for (; i < n; i++) yb[i] = to_bf16(from_bf16(yb[i]) + scale * acc[i]);
}

/* h[t * r4 + k] = xf[t] . a[k] for t < NT, k < r4; rows padded to inp (a multiple of VL).
 * NT is a constant at each call site (see block()), so the loops over t unroll. */
static inline __attribute__((always_inline)) void shrink_block(
        const float *xf, const float *a, float *h, long r4, long inp, const int NT) {
    for (long k = 0; k < r4; k += KB) {
#ifdef SGMV_AVX512
        __m512 c[RB][KB];
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < KB; q++) c[t][q] = _mm512_setzero_ps();
        for (long i = 0; i < inp; i += VL) {
            __m512 av[KB], xv[RB];
            for (int q = 0; q < KB; q++) av[q] = _mm512_loadu_ps(a + (k + q) * inp + i);
            for (int t = 0; t < NT; t++) xv[t] = _mm512_loadu_ps(xf + t * inp + i);
            for (int t = 0; t < NT; t++)
                for (int q = 0; q < KB; q++) c[t][q] = _mm512_fmadd_ps(xv[t], av[q], c[t][q]);
        }
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < KB; q++) h[t * r4 + k + q] = _mm512_reduce_add_ps(c[t][q]);
#else
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < KB; q++) {
                float lanes[VL] = {0}, sum = 0;
                for (long i = 0; i < inp; i += VL)
                    for (int l = 0; l < VL; l++)
                        lanes[l] += xf[t * inp + i + l] * a[(k + q) * inp + i + l];
                for (int l = 0; l < VL; l++) sum += lanes[l];
                h[t * r4 + k + q] = sum;
            }
#endif
    }
}

/* acc[t * outp + o] = sum_k h[t * r4 + k] * b[k * outp + o] for t < NT */
static inline __attribute__((always_inline)) void expand_block(
        const float *h, const float *b, float *acc, long r, long r4, long outp, const int NT) {
    long o = 0;
#ifdef SGMV_AVX512
    for (; o + 4 * VL <= outp; o += 4 * VL) {   /* 4 vectors of B^T per rank row: 4*NT FMAs */
        __m512 c[RB][4];
        for (int t = 0; t < NT; t++)
            for (int u = 0; u < 4; u++) c[t][u] = _mm512_setzero_ps();
        for (long k = 0; k < r; k++) {
            __m512 w[4];
            for (int u = 0; u < 4; u++) w[u] = _mm512_loadu_ps(b + k * outp + o + u * VL);
            for (int t = 0; t < NT; t++) {
                const __m512 ht = _mm512_set1_ps(h[t * r4 + k]);
                for (int u = 0; u < 4; u++) c[t][u] = _mm512_fmadd_ps(ht, w[u], c[t][u]);
            }
        }
        for (int t = 0; t < NT; t++)
            for (int u = 0; u < 4; u++) _mm512_storeu_ps(acc + t * outp + o + u * VL, c[t][u]);
    }
#endif
    for (; o < outp; o += VL) {
#ifdef SGMV_AVX512
        __m512 c[RB];
        for (int t = 0; t < NT; t++) c[t] = _mm512_setzero_ps();
        for (long k = 0; k < r; k++) {
            __m512 w = _mm512_loadu_ps(b + k * outp + o);
            for (int t = 0; t < NT; t++)
                c[t] = _mm512_fmadd_ps(_mm512_set1_ps(h[t * r4 + k]), w, c[t]);
        }
        for (int t = 0; t < NT; t++) _mm512_storeu_ps(acc + t * outp + o, c[t]);
#else
        for (int t = 0; t < NT; t++) {
            float c[VL] = {0};
            for (long k = 0; k < r; k++)
                for (int l = 0; l < VL; l++) c[l] += h[t * r4 + k] * b[k * outp + o + l];
            memcpy(acc + t * outp + o, c, sizeof c);
        }
#endif
    }
}

/* Ask for a weight row (its pieces over `ppr` pages) ahead of use: rows sit on scattered
 * pages of 2-8 KB, too short for the hardware prefetcher to ramp up on its own. */
static inline void prefetch_row(const char *pages, long page_bytes, const int32_t *ids, long ppr,
                                long bytes) {
    for (long j = 0, b0 = 0; b0 < bytes; j++, b0 += page_bytes) {
        const char *src = pages + (long)ids[j] * page_bytes;
        const long n = bytes - b0 < page_bytes ? bytes - b0 : page_bytes;
        for (long o = 0; o < n; o += 64) __builtin_prefetch(src + o);
    }
}

#ifdef SGMV_BF16DOT
/* h[t * r4 + k] = x[t] . A[k] for NT bf16 rows of x, A's rows read in place from their pages
 * (rows k >= r read `zero`): bf16 pair products summed in fp32 by vdpbf16ps. */
static inline __attribute__((always_inline)) void shrink_bf16dot(
        const uint16_t *pages, long H, const int32_t *ids, long ppr, long r, long r4,
        const uint16_t *x, long ldx, long in, const uint16_t *zero, float *h, const int NT) {
    for (long k = 0; k < r4; k += KB) {
        __m512 c[RB][KB];
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < KB; q++) c[t][q] = _mm512_setzero_ps();
        for (long q = KB; q < 2 * KB && k + q < r; q++)       /* the next block's rows */
            prefetch_row((const char *)pages, 2 * H, ids + (k + q) * ppr, ppr, 2 * in);
        for (long j = 0, d0 = 0; d0 < in; j++, d0 += H) {
            const long n = in - d0 < H ? in - d0 : H;
            const uint16_t *ap[KB];
            for (int q = 0; q < KB; q++)
                ap[q] = k + q < r ? pages + (long)ids[(k + q) * ppr + j] * H : zero;
            for (long i = 0; i < n; i += 32) {
                const __mmask32 m = n - i >= 32 ? 0xffffffffu : (1u << (n - i)) - 1;
                __m512bh av[KB], xv[RB];
                for (int q = 0; q < KB; q++)
                    av[q] = (__m512bh)_mm512_maskz_loadu_epi16(m, ap[q] + i);
                for (int t = 0; t < NT; t++)
                    xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * ldx + d0 + i);
                for (int t = 0; t < NT; t++)
                    for (int q = 0; q < KB; q++) c[t][q] = _mm512_dpbf16_ps(c[t][q], xv[t], av[q]);
            }
        }
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < KB; q++) h[t * r4 + k + q] = _mm512_reduce_add_ps(c[t][q]);
    }
}

/* B^T's rows 2p and 2p+1 interleaved, bp[p][o] = (B^T[2p][o], B^T[2p+1][o]) as bf16 pairs
 * (row r zero when the rank is odd): what vdpbf16ps multiplies by a pair of h values.
 * bp: [pairs, stride, 2] uint16, stride >= round_up(dim, 64) + 32 (tails written as zeros). */
static void gather_pairs(const uint16_t *pages, long H, const int32_t *ids, long rank,
                         long ppr, long dim, const uint16_t *zero, uint16_t *bp, long stride) {
    static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i lo = _mm512_loadu_si512(lo_idx);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (long p = 0; 2 * p < rank; p++) {
        uint16_t *dst = bp + p * stride * 2;
        for (long q = 2 * p + 2; q < 2 * p + 4 && q < rank; q++)   /* the next pair's rows */
            prefetch_row((const char *)pages, 2 * H, ids + q * ppr, ppr, 2 * dim);
        for (long j = 0, d0 = 0; d0 < dim; j++, d0 += H) {
            const long n = dim - d0 < H ? dim - d0 : H;
            const uint16_t *r0 = pages + (long)ids[2 * p * ppr + j] * H;
            const uint16_t *r1 = 2 * p + 1 < rank ? pages + (long)ids[(2 * p + 1) * ppr + j] * H
                                                  : zero;
            for (long o = 0; o < n; o += 32) {
                const __mmask32 m = n - o >= 32 ? 0xffffffffu : (1u << (n - o)) - 1;
                const __m512i v0 = _mm512_maskz_loadu_epi16(m, r0 + o);
                const __m512i v1 = _mm512_maskz_loadu_epi16(m, r1 + o);
                _mm512_storeu_si512(dst + (d0 + o) * 2, _mm512_permutex2var_epi16(v0, lo, v1));
                _mm512_storeu_si512(dst + (d0 + o) * 2 + 32,
                                    _mm512_permutex2var_epi16(v0, hi, v1));
            }
        }
        memset(dst + dim * 2, 0, sizeof(uint16_t) * 2 * (stride - dim));
    }
}

/* acc[t * outp + o] = sum_p (h[t, 2p], h[t, 2p+1]) . bp[p][o] for t < NT: h rounded to bf16
 * (as a bf16 lora_A output is in PEFT), products summed in fp32 by vdpbf16ps. */
static inline __attribute__((always_inline)) void expand_bf16dot(
        const float *h, const uint16_t *bp, float *acc, long r, long r4, long stride,
        long outp, const int NT) {
    const long pairs = (r + 1) / 2;
    uint32_t hp[RB][64];                       /* max_rank <= 128 (checked by the caller) */
    for (int t = 0; t < NT; t++)
        for (long p = 0; p < pairs; p++)
            hp[t][p] = to_bf16(h[t * r4 + 2 * p])
                       | (uint32_t)(2 * p + 1 < r ? to_bf16(h[t * r4 + 2 * p + 1]) : 0) << 16;
    long o = 0;
    for (; o + 4 * VL <= outp; o += 4 * VL) {
        __m512 c[RB][4];
        for (int t = 0; t < NT; t++)
            for (int u = 0; u < 4; u++) c[t][u] = _mm512_setzero_ps();
        for (long p = 0; p < pairs; p++) {
            __m512bh w[4];
            for (int u = 0; u < 4; u++)
                w[u] = (__m512bh)_mm512_loadu_si512(bp + (p * stride + o + u * VL) * 2);
            for (int t = 0; t < NT; t++) {
                const __m512bh ht = (__m512bh)_mm512_set1_epi32((int)hp[t][p]);
                for (int u = 0; u < 4; u++) c[t][u] = _mm512_dpbf16_ps(c[t][u], ht, w[u]);
            }
        }
        for (int t = 0; t < NT; t++)
            for (int u = 0; u < 4; u++) _mm512_storeu_ps(acc + t * outp + o + u * VL, c[t][u]);
    }
    for (; o < outp; o += VL) {
        __m512 c[RB];
        for (int t = 0; t < NT; t++) c[t] = _mm512_setzero_ps();
        for (long p = 0; p < pairs; p++) {
            const __m512bh w = (__m512bh)_mm512_loadu_si512(bp + (p * stride + o) * 2);
            for (int t = 0; t < NT; t++)
                c[t] = _mm512_dpbf16_ps(c[t], (__m512bh)_mm512_set1_epi32((int)hp[t][p]), w);
        }
        for (int t = 0; t < NT; t++) _mm512_storeu_ps(acc + t * outp + o, c[t]);
    }
}
#endif

/* Copy `rank` rows of `dim` numbers, each spread over `ppr` pages, into buf [r4, dimp] fp32,
 * zero-padded to r4 rows and dimp columns. */
static void gather_rows(const char *pages, long page_bytes, long H, const int32_t *ids,
                        long rank, long ppr, long dim, float *buf, long r4, long dimp,
                        int bf16) {
    for (long k = 0; k < rank; k++) {
        for (long j = 0, d0 = 0; d0 < dim; j++, d0 += H)
            load_row(pages + (long)ids[k * ppr + j] * page_bytes, buf + k * dimp + d0,
                     dim - d0 < H ? dim - d0 : H, bf16);
        memset(buf + k * dimp + dim, 0, sizeof(float) * (dimp - dim));
    }
    memset(buf + rank * dimp, 0, sizeof(float) * (r4 - rank) * dimp);
}

/* y [T, out] += per segment s: scale_s * (x[rows_s] @ A_s^T) @ B_s^T, A_s and B_s^T read from
 * pool pages through page_ids (PagedModuleLora). Element type fp32 (bf16 = 0) or bf16. */
#define CHUNK 16      /* rows per work item: threads take items, a segment may span several */

static void sgmv(const void *pages_, long H, const void *x_, long ldx, void *y_, long ldy,
                 long in, long out, long nseg, const int32_t *seg_rows,
                 const int32_t *seg_rank, const float *seg_scale, const int32_t *seg_a,
                 const int32_t *seg_b, const int32_t *page_ids, long a_ppr, long b_ppr,
                 long max_rank, int bf16, long nthreads) {
    const long es = bf16 ? 2 : 4, inp = round_up(in, VL), outp = round_up(out, VL);
    const long r4max = round_up(max_rank, KB);
    const char *pages = pages_, *x = x_;
    char *y = y_;
    /* work items: (segment, first row) of CHUNK rows; items of one thread are contiguous
     * (static schedule), so a thread gathers a segment's weights once for all its chunks */
    long nitems = 0;
    for (long s = 0; s < nseg; s++)
        if (seg_rank[s] > 0) nitems += (seg_rows[2 * s + 1] - seg_rows[2 * s] + CHUNK - 1) / CHUNK;
    long *items = malloc(sizeof(long) * 2 * (nitems + 1));
    for (long s = 0, i = 0; s < nseg; s++)
        if (seg_rank[s] > 0)    /* rank 0: the segment's adapter does not adapt this module */
            for (long t = seg_rows[2 * s]; t < seg_rows[2 * s + 1]; t += CHUNK, i++) {
                items[2 * i] = s;
                items[2 * i + 1] = t;
            }
    #pragma omp parallel num_threads(nthreads < nitems ? nthreads : (nitems ? nitems : 1))
    {
    float *a = malloc(sizeof(float) * r4max * inp), *b = malloc(sizeof(float) * r4max * outp);
    float *xf = malloc(sizeof(float) * RB * inp), *acc = malloc(sizeof(float) * RB * outp);
    float *h = malloc(sizeof(float) * RB * r4max);
#ifdef SGMV_BF16DOT
    const int dot = bf16 && max_rank <= 128;      /* expand_bf16dot's pair buffer */
    uint16_t *zero = calloc(H, sizeof(uint16_t));
    const long pstride = round_up(out, 4 * VL) + 32;
    uint16_t *bp = dot ? malloc(sizeof(uint16_t) * 2 * pstride * ((r4max + 1) / 2)) : 0;
#else
    const int dot = 0;
    void *zero = 0;
#endif
    long gathered = -1;                           /* the segment whose weights are in a, b */
    #pragma omp for schedule(static)
    for (long item = 0; item < nitems; item++) {
        const long s = items[2 * item];
        const long r = seg_rank[s], r4 = round_up(r, KB);
        if (s != gathered) {
            if (!dot)
                gather_rows(pages, H * es, H, page_ids + seg_a[s], r, a_ppr, in, a, r4, inp,
                            bf16);
#ifdef SGMV_BF16DOT
            if (dot)
                gather_pairs(pages_, H, page_ids + seg_b[s], r, b_ppr, out, zero, bp, pstride);
            else
#endif
            gather_rows(pages, H * es, H, page_ids + seg_b[s], r, b_ppr, out, b, r4, outp,
                        bf16);
            gathered = s;
        }
        const long end = seg_rows[2 * s + 1] < items[2 * item + 1] + CHUNK
                         ? seg_rows[2 * s + 1] : items[2 * item + 1] + CHUNK;
        for (long t0 = items[2 * item + 1]; t0 < end; t0 += RB) {
            const long nt = end - t0 < RB ? end - t0 : RB;
            /* decode segments are mostly 1-2 rows: kernels specialised per row count */
#ifdef SGMV_BF16DOT
            if (dot) {
                const uint16_t *xt = (const uint16_t *)x + t0 * ldx;
                const int32_t *a_ids = page_ids + seg_a[s];
#define SHRINK(NT) shrink_bf16dot(pages_, H, a_ids, a_ppr, r, r4, xt, ldx, in, zero, h, NT)
                switch (nt) {
                    case 1: SHRINK(1); break;
                    case 2: SHRINK(2); break;
                    case 3: SHRINK(3); break;
                    default: SHRINK(RB); break;
                }
#undef SHRINK
            } else
#endif
            {
                for (long t = 0; t < nt; t++) {
                    load_row(x + (t0 + t) * ldx * es, xf + t * inp, in, bf16);
                    memset(xf + t * inp + in, 0, sizeof(float) * (inp - in));
                }
                switch (nt) {
                    case 1: shrink_block(xf, a, h, r4, inp, 1); break;
                    case 2: shrink_block(xf, a, h, r4, inp, 2); break;
                    case 3: shrink_block(xf, a, h, r4, inp, 3); break;
                    default: shrink_block(xf, a, h, r4, inp, RB); break;
                }
            }
#ifdef SGMV_BF16DOT
            if (dot) {
#define EXPAND(NT) expand_bf16dot(h, bp, acc, r, r4, pstride, outp, NT)
                switch (nt) {
                    case 1: EXPAND(1); break;
                    case 2: EXPAND(2); break;
                    case 3: EXPAND(3); break;
                    default: EXPAND(RB); break;
                }
#undef EXPAND
            } else
#endif
            switch (nt) {
                case 1: expand_block(h, b, acc, r, r4, outp, 1); break;
                case 2: expand_block(h, b, acc, r, r4, outp, 2); break;
                case 3: expand_block(h, b, acc, r, r4, outp, 3); break;
                default: expand_block(h, b, acc, r, r4, outp, RB); break;
            }
            for (long t = 0; t < nt; t++)
                update_row(y + (t0 + t) * ldy * es, acc + t * outp, seg_scale[s], out, bf16);
        }
    }
#ifdef SGMV_BF16DOT
    free(bp);
#endif
    free(a); free(b); free(xf); free(acc); free(h); free(zero);
    }
    free(items);
}

#define ENTRY(NAME, BF16)                                                                      \
void NAME(const void *pages, long H, const void *x, long ldx, void *y, long ldy, long in,     \
          long out, long nseg, const int32_t *seg_rows, const int32_t *seg_rank,             \
          const float *seg_scale, const int32_t *seg_a, const int32_t *seg_b,                \
          const int32_t *page_ids, long a_ppr, long b_ppr, long max_rank, long nthreads) {   \
    sgmv(pages, H, x, ldx, y, ldy, in, out, nseg, seg_rows, seg_rank, seg_scale, seg_a,      \
         seg_b, page_ids, a_ppr, b_ppr, max_rank, BF16, nthreads);                           \
}
ENTRY(sgmv_f32, 0)
ENTRY(sgmv_bf16, 1)
