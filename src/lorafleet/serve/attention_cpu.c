/* attention_cpu.c: compiled by lorafleet.native.build_library on first use,
 * after lorafleet/native.py's C_HELPERS (bf16 conversions, load_row). */
#include <math.h>
#include <stdlib.h>

/* e^x for x <= 0 (softmax after subtracting the max), to ~2 ulp: Cephes' expf reduction and
 * polynomial, branch-free so the loop vectorizes (libm's expf is a call per element). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale; memcpy(&scale, &bits, 4);
    return e * scale;
}
static inline float dot(const float *a, const float *b, long n) {
    long d = 0;
    float sum = 0;
#ifdef LF_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= n; d += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; d < n; d++) sum += a[d] * b[d];
    return sum;
}

/* out[b, h] = softmax_l(scale * q[b, h] . K[b, l, g]) @ V[b, l, g] over l < lens[b], with
 * g = h / (nh / nkv). Row l of sequence b: kv[k_slots[b * max_len + l]] (kv: [rows, kv_dim],
 * head g at columns g * hd .. (g + 1) * hd). q, out: [B, nh, hd] contiguous.
 * Each K and V row is read once, whole, for all heads (rows are 2-4 cache lines). */
void paged_decode(const void *kv, long kv_dim, const int64_t *k_slots, const int64_t *v_slots,
                  const int64_t *lens, long B, long max_len, const void *q, void *out,
                  long nh, long nkv, long hd, float scale, int bf16, long nthreads) {
    const long rep = nh / nkv, es = bf16 ? 2 : 4;
    #pragma omp parallel num_threads(nthreads < B ? nthreads : B)
    {
    float *scores = malloc(sizeof(float) * nh * max_len), *row = malloc(sizeof(float) * kv_dim);
    float *qf = malloc(sizeof(float) * nh * hd), *acc = malloc(sizeof(float) * nh * hd);
    #pragma omp for schedule(dynamic)
    for (long b = 0; b < B; b++) {
        const long len = lens[b];
        const int64_t *ks = k_slots + b * max_len, *vs = v_slots + b * max_len;
        load_row((const char *)q + b * nh * hd * es, qf, nh * hd, bf16);
        for (long l = 0; l < len; l++) {
            if (l + 2 < len) __builtin_prefetch((const char *)kv + ks[l + 2] * kv_dim * es);
            load_row((const char *)kv + ks[l] * kv_dim * es, row, kv_dim, bf16);
            for (long h = 0; h < nh; h++)
                scores[h * max_len + l] = scale * dot(qf + h * hd, row + (h / rep) * hd, hd);
        }
        for (long h = 0; h < nh; h++) {
            float *s = scores + h * max_len, m = -INFINITY, total = 0;
            for (long l = 0; l < len; l++) m = s[l] > m ? s[l] : m;
            for (long l = 0; l < len; l++) { s[l] = exp_nonpositive(s[l] - m); total += s[l]; }
            const float inv = 1.0f / total;
            for (long l = 0; l < len; l++) s[l] *= inv;
        }
        memset(acc, 0, sizeof(float) * nh * hd);
        for (long l = 0; l < len; l++) {
            if (l + 2 < len) __builtin_prefetch((const char *)kv + vs[l + 2] * kv_dim * es);
            load_row((const char *)kv + vs[l] * kv_dim * es, row, kv_dim, bf16);
            for (long h = 0; h < nh; h++) {
                const float p = scores[h * max_len + l], *v = row + (h / rep) * hd;
                float *a = acc + h * hd;
                for (long d = 0; d < hd; d++) a[d] += p * v[d];
            }
        }
        if (bf16) {
            uint16_t *o = (uint16_t *)out + b * nh * hd;
            for (long d = 0; d < nh * hd; d++) o[d] = to_bf16(acc[d]);
        } else {
            memcpy((float *)out + b * nh * hd, acc, sizeof(float) * nh * hd);
        }
    }
    free(scores); free(row); free(qf); free(acc);
    }
}
