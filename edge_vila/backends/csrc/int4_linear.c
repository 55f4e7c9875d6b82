/* edge_vila.Int4Linear: Y = X W^T (+ bias), W in 4 bits with a scale and a zero point per block
 * of `block_size` input channels (AWQ / RTN weights as the bundle stores them). It replaces
 * MatMulNBits in the fast CPU graph, where decode is 86% MatMulNBits and streamed the weights at
 * ~27 GB/s on two cores of a host whose copy bandwidth is ~70 GB/s (issue #8).
 *
 * The weights are packed for AVX-512 VNNI (ort_fast.pack_int4_tiles): 16 output rows form a
 * tile, one lane per row; a 64-byte load holds 8 input channels of each of the 16 rows (low
 * nibbles channels 0-3, high nibbles 4-7), so one load feeds two VPDPBUSD (unsigned 4-bit
 * weights x signed 8-bit activations, 4 channels per lane) with no shuffles and no horizontal
 * sums. Activations are quantized per block to int8 (as MatMulNBits' accuracy level 4 does);
 * per block the integer dot is corrected for the zero point (dot - z * sum(x_q)) and scaled.
 *
 * Inputs: 0 X float [..., K] ([..., 2K] with activation=1); 1 W uint8 [tiles, blocks, block_size * 8];
 *         2 scales float or float16 [tiles, blocks, 16]; 3 zeros uint8 [tiles, blocks, 16] (optional:
 *         absent, every zero point is 8, the symmetric form);
 *         4 bias float [N] (optional); 5 skip float [..., K] (optional); 6 norm_weight float [K] (optional)
 * Outputs: 0 Y float [..., N]; 1 the sum X + skip (optional: the residual stream, for the next layer)
 * With norm_weight the linear reads RMSNorm(X (+ skip)) * norm_weight (attribute epsilon), the
 * SkipSimplifiedLayerNormalization ORT ran before it as its own node (5 us each, 47 per token).  Attributes: K, N, block_size (a multiple of 8, at most 1024),
 * activation (0: none; 1: SwiGLU, the input is gate | up and the linear reads silu(gate) * up -
 * Llama's down projection reading the fused gate/up output without three elementwise nodes).
 * Rows past N (the last tile) have scale 0; channels past K meet zero activations.
 *
 * Decode reads every weight once per token and is bound by memory bandwidth (on a 2-core Zen 3 the
 * AVX2 kernel streamed 15-20 GB/s where a plain AVX2 read loop got 14-18), so the bytes per
 * weight are the speed: at block 32, float32 scales and a zero byte per 32 weights cost 1.25
 * bits on top of 4; float16 scales and no zeros (symmetric) 0.5 - Q4_0's 4.5 bits.
 */
#include "ort_op.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define INT4_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define INT4_AVX2 1
#endif
#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define INT4_NEON 1
#endif
#if defined(INT4_AVX512) || defined(INT4_AVX2)
#include <immintrin.h>
#endif
/* software prefetch distance in the decode loop, bytes of weights ahead: one core's hardware
 * prefetch alone kept ~30 GB/s; 2-4 KB ahead read 35-39 GB/s on one core, 47-59 on two (Zen 4).
 * Non-temporal: weights are read once per token, and kept out of the caches they leave room for
 * the KV cache (SmolLM2 decode ~10% faster than with T0, 1024 context no slower). */
#ifndef PF_W
#define PF_W 4096
#endif
#if !defined(PF_HINT) && (defined(INT4_AVX512) || defined(INT4_AVX2))
#define PF_HINT _MM_HINT_NTA
#endif

typedef struct {
  int64_t K, N, bs, activation;
  float epsilon;
} Kernel;

static const int INPUT_TYPES[] = {T_FLOAT, T_UINT8, T_ANY /* float or float16 */, T_UINT8, T_FLOAT, T_FLOAT, T_FLOAT};

typedef struct {
  const uint8_t *w;
  const void *scales; /* float, or IEEE half (uint16) with scale_f16 */
  const uint8_t *zeros; /* NULL: all 8 */
  const float *bias;
  const int8_t *xq; /* [M, Kp] */
  const float *xs;  /* [M, nb] activation scale per block */
  const int32_t *xsum; /* [M, nb] sum of the int8 activations per block */
  const float *x;
  float *y;
  int64_t M, K, N, Kp, nb, bs, activation;
  int kernel; /* EV_*: the code path (ev_kernel(), or the one a caller forces) */
  int scale_f16;
} Job;

/* IEEE half -> float (the portable and fallback paths; the vector ones convert in hardware) */
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  uint32_t bits;
  float f;
  if (e == 0) { /* zero or subnormal: m * 2^-24 */
    f = (float)m * 5.9604645e-8f;
    memcpy(&bits, &f, 4);
    bits |= sign;
  } else {
    bits = sign | (e == 31 ? 0x7F800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
  }
  memcpy(&f, &bits, 4);
  return f;
}

static inline float scale_at(const Job *j, int64_t i) {
  return j->scale_f16 ? half_to_float(((const uint16_t *)j->scales)[i]) : ((const float *)j->scales)[i];
}
static inline int32_t zero_at(const Job *j, int64_t i) { return j->zeros ? j->zeros[i] : 8; }

/* one block of activations (SwiGLU applied if asked) -> int8, its scale and its sum */
static void quantize_block_portable(const Job *j, const float *x, int64_t k0, int64_t k1, int8_t *q, float *scale,
                                    int32_t *total) {
  float a[1024];
  if (j->activation) /* SwiGLU: silu(gate) * up */
    for (int64_t k = k0; k < k1; k++) a[k - k0] = x[k] / (1.f + expf(-x[k])) * x[j->K + k];
  else
    memcpy(a, x + k0, sizeof(float) * (size_t)(k1 - k0));
  float amax = 0.f;
  for (int64_t k = k0; k < k1; k++) amax = fmaxf(amax, fabsf(a[k - k0]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0;
  for (int64_t k = k0; k < k1; k++) {
    const int32_t v = (int32_t)nearbyintf(a[k - k0] * inv);
    q[k - k0] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
    sum += q[k - k0];
  }
  *scale = amax / 127.f;
  *total = sum;
}

#ifdef INT4_AVX512

/* the same with AVX-512: the scalar loop took 7 us for 3584 channels (15 us with SwiGLU) on one
 * core while the other waited - 8% of a 0.52B model's decode step */
static void quantize_block_avx512(const Job *j, const float *x, int64_t k0, int64_t k1, int8_t *q, float *scale,
                                  int32_t *total) {
  __attribute__((aligned(64))) float a[1024];
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = k1 - k >= 16 ? 0xFFFF : (__mmask16)((1u << (k1 - k)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    if (j->activation) {
      const __m512 up = _mm512_maskz_loadu_ps(m, x + j->K + k);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), v));
      v = _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), e)), up);
    }
    _mm512_store_ps(a + (k - k0), v);
    vmax = _mm512_max_ps(vmax, _mm512_and_ps(v, sign));
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = k1 - k >= 16 ? 0xFFFF : (__mmask16)((1u << (k1 - k)) - 1);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(a + (k - k0)), inv)); /* nearest-even, as nearbyintf */
    v = _mm512_maskz_mov_epi32(m, _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127)));
    vsum = _mm512_add_epi32(vsum, v);
    _mm_mask_storeu_epi8(q + (k - k0), m, _mm512_cvtepi32_epi8(v));
  }
  *scale = amax / 127.f;
  *total = _mm512_reduce_add_epi32(vsum);
}
#endif

#if defined(INT4_AVX2) || defined(INT4_NEON)
/* quantize_block on 8-lane vectors (GCC vector extensions: AVX2 or NEON) for the AVX2 and NEON
 * kernels; the scalar loop cost 8% of a 0.52B decode step on AVX-512 before exp512 replaced it */
static void quantize_block_vec8(const Job *j, const float *x, int64_t k0, int64_t k1, int8_t *q, float *scale,
                                int32_t *total) {
  float a[1024];
  const int64_t n = k1 - k0, n8 = n / 8 * 8;
  vf8 vmax = splat(0.f);
  for (int64_t k = 0; k < n8; k += 8) {
    vf8 v;
    memcpy(&v, x + k0 + k, sizeof v);
    if (j->activation) { /* SwiGLU: silu(gate) * up */
      vf8 up;
      memcpy(&up, x + j->K + k0 + k, sizeof up);
      v = v / (splat(1.f) + exp8(-v)) * up;
    }
    memcpy(a + k, &v, sizeof v);
    const vf8 av = (vf8)((vi8)v & 0x7FFFFFFF);
    vmax = pick(av > vmax, av, vmax);
  }
  float amax = 0.f;
  for (int i = 0; i < 8; i++) amax = fmaxf(amax, vmax[i]);
  for (int64_t k = n8; k < n; k++) {
    const float g = x[k0 + k];
    a[k] = j->activation ? g / (1.f + expf(-g)) * x[j->K + k0 + k] : g;
    amax = fmaxf(amax, fabsf(a[k]));
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  vi8 vsum = {0};
  for (int64_t k = 0; k < n8; k += 8) {
    vf8 v;
    memcpy(&v, a + k, sizeof v);
    v = (v * splat(inv) + splat(12582912.f)) - splat(12582912.f); /* nearest-even, as nearbyintf */
    v = pick(v > splat(127.f), splat(127.f), v);
    v = pick(v < splat(-127.f), splat(-127.f), v);
    const vi8 r = __builtin_convertvector(v, vi8);
    vsum += r;
    for (int i = 0; i < 8; i++) q[k + i] = (int8_t)r[i];
  }
  int32_t sum = 0;
  for (int i = 0; i < 8; i++) sum += vsum[i];
  for (int64_t k = n8; k < n; k++) {
    const int32_t v = (int32_t)nearbyintf(a[k] * inv);
    q[k] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
    sum += q[k];
  }
  *scale = amax / 127.f;
  *total = sum;
}
#endif

typedef struct {
  const float *x, *skip, *w;
  float *sum, *out;
  int64_t K;
  float eps;
  int kernel;
} NormJob;

/* rows [begin, end): s = x (+ skip), out = s / rms(s) * w */
static void norm_rows(void *arg, int64_t begin, int64_t end) {
  const NormJob *n = arg;
  for (int64_t m = begin; m < end; m++) {
    const float *x = n->x + m * n->K, *skip = n->skip ? n->skip + m * n->K : NULL;
    float *s = n->sum ? n->sum + m * n->K : n->out + m * n->K, *o = n->out + m * n->K;
    float ss = 0.f;
    int64_t k = 0;
#ifdef INT4_AVX512
    if (n->kernel == EV_AVX512) {
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= n->K; k += 16) {
      __m512 v = _mm512_loadu_ps(x + k);
      if (skip) v = _mm512_add_ps(v, _mm512_loadu_ps(skip + k));
      _mm512_storeu_ps(s + k, v);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    ss = _mm512_reduce_add_ps(acc);
    }
#endif
#if defined(INT4_AVX2) || defined(INT4_NEON)
    /* the same on 8 lanes: a scalar sum of squares cannot be vectorized by the compiler (float
     * addition is not associative), and it ran once per linear that carries a norm */
    if (n->kernel == EV_AVX2 || n->kernel == EV_NEON) {
      vf8 acc = splat(0.f);
      for (; k + 8 <= n->K; k += 8) {
        vf8 v;
        memcpy(&v, x + k, sizeof v);
        if (skip) {
          vf8 w;
          memcpy(&w, skip + k, sizeof w);
          v += w;
        }
        memcpy(s + k, &v, sizeof v);
        acc += v * v;
      }
      for (int i = 0; i < 8; i++) ss += acc[i];
    }
#endif
    for (; k < n->K; k++) {
      s[k] = x[k] + (skip ? skip[k] : 0.f);
      ss += s[k] * s[k];
    }
    const float r = 1.f / sqrtf(ss / (float)n->K + n->eps);
    for (k = 0; k < n->K; k++) o[k] = s[k] * r * n->w[k];
  }
}

static void quantize_rows(void *arg, int64_t begin, int64_t end) {
  const Job *j = arg;
  for (int64_t m = begin; m < end; m++) {
    const float *x = j->x + m * j->K * (j->activation ? 2 : 1);
    int8_t *q = (int8_t *)j->xq + m * j->Kp;
    for (int64_t b = 0; b < j->nb; b++) {
      const int64_t k0 = b * j->bs, k1 = k0 + j->bs < j->K ? k0 + j->bs : j->K;
      float *scale = (float *)j->xs + m * j->nb + b;
      int32_t *total = (int32_t *)j->xsum + m * j->nb + b;
#ifdef INT4_AVX512
      if (j->kernel == EV_AVX512)
        quantize_block_avx512(j, x, k0, k1, q + k0, scale, total);
      else
#endif
#if defined(INT4_AVX2) || defined(INT4_NEON)
      if (j->kernel == EV_AVX2 || j->kernel == EV_NEON)
        quantize_block_vec8(j, x, k0, k1, q + k0, scale, total);
      else
#endif
        quantize_block_portable(j, x, k0, k1, q + k0, scale, total);
      for (int64_t k = k1; k < k0 + j->bs; k++) q[k] = 0;
    }
  }
}

/* tiles [begin, end) for every row of X, plain C (ARM, older x86, and the reference the AVX-512
 * path is tested against) */
static void tiles_portable(void *arg, int64_t begin, int64_t end) {
  const Job *j = arg;
  const int64_t G = j->bs / 8;
  for (int64_t t = begin; t < end; t++) {
    for (int64_t m = 0; m < j->M; m++) {
      const int8_t *x = j->xq + m * j->Kp;
      float acc[16] = {0};
      for (int64_t b = 0; b < j->nb; b++) {
        const uint8_t *w = j->w + (t * j->nb + b) * G * 64;
        const int64_t sb = (t * j->nb + b) * 16;
        int32_t dot[16] = {0};
        for (int64_t g = 0; g < G; g++)
          for (int r = 0; r < 16; r++)
            for (int i = 0; i < 4; i++) {
              const uint8_t v = w[g * 64 + r * 4 + i];
              dot[r] += (v & 15) * x[b * j->bs + g * 8 + i] + (v >> 4) * x[b * j->bs + g * 8 + 4 + i];
            }
        const float xs = j->xs[m * j->nb + b];
        const int32_t xsum = j->xsum[m * j->nb + b];
        for (int r = 0; r < 16; r++) acc[r] += (float)(dot[r] - zero_at(j, sb + r) * xsum) * (scale_at(j, sb + r) * xs);
      }
      for (int r = 0; r < 16 && t * 16 + r < j->N; r++)
        j->y[m * j->N + t * 16 + r] = acc[r] + (j->bias ? j->bias[t * 16 + r] : 0.f);
    }
  }
}

#ifdef INT4_AVX512
static inline __m512 scales_avx512(const Job *j, int64_t sb) {
  return j->scale_f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)j->scales + sb * 16)))
                      : _mm512_loadu_ps((const float *)j->scales + sb * 16);
}
/* the 16 rows' zero points (8 each when the weights are symmetric and carry none) */
static inline __m512i zeros_avx512(const Job *j, int64_t sb) {
  return j->zeros ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(j->zeros + sb * 16))) : _mm512_set1_epi32(8);
}
/* z (zeros_avx512's) x the block's activation sum; symmetric: 8 x sum, no VPMULLD (two uops, long latency) */
static inline __m512i zsum_avx512(const Job *j, __m512i z, int32_t xsum) {
  return j->zeros ? _mm512_mullo_epi32(z, _mm512_set1_epi32(xsum)) : _mm512_set1_epi32(8 * xsum);
}

static inline void store_tile(const Job *j, int64_t m, int64_t t, __m512 acc) {
  const __mmask16 mask = j->N - t * 16 >= 16 ? 0xFFFF : (__mmask16)((1u << (j->N - t * 16)) - 1);
  if (j->bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, j->bias + t * 16));
  _mm512_mask_storeu_ps(j->y + m * j->N + t * 16, mask, acc);
}

/* Decode (one row of X): four independent accumulators, since VPDPBUSD's latency would
 * otherwise bound the loop, not memory. */
static void tiles_avx512_m1(const Job *j, int64_t begin, int64_t end) {
  const int64_t G = j->bs / 8;
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  const int32_t *x32 = (const int32_t *)j->xq;
  for (int64_t t = begin; t < end; t++) {
    __m512 acc = _mm512_setzero_ps();
    const uint8_t *w = j->w + t * j->nb * G * 64;
    for (int64_t b = 0; b < j->nb; b++) {
      __m512i d0 = _mm512_setzero_si512(), d1 = d0, d2 = d0, d3 = d0;
      const int32_t *xb = x32 + b * j->bs / 4;
      int64_t g = 0;
      for (; g + 2 <= G; g += 2, w += 128) {
#if PF_W
        _mm_prefetch((const char *)w + PF_W, PF_HINT);
        _mm_prefetch((const char *)w + PF_W + 64, PF_HINT);
#endif
        const __m512i v0 = _mm512_loadu_si512(w), v1 = _mm512_loadu_si512(w + 64);
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(v0, lo4), _mm512_set1_epi32(xb[2 * g]));
        d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), lo4), _mm512_set1_epi32(xb[2 * g + 1]));
        d2 = _mm512_dpbusd_epi32(d2, _mm512_and_si512(v1, lo4), _mm512_set1_epi32(xb[2 * g + 2]));
        d3 = _mm512_dpbusd_epi32(d3, _mm512_and_si512(_mm512_srli_epi16(v1, 4), lo4), _mm512_set1_epi32(xb[2 * g + 3]));
      }
      for (; g < G; g++, w += 64) {
        const __m512i v0 = _mm512_loadu_si512(w);
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(v0, lo4), _mm512_set1_epi32(xb[2 * g]));
        d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), lo4), _mm512_set1_epi32(xb[2 * g + 1]));
      }
      const __m512i dot = _mm512_add_epi32(_mm512_add_epi32(d0, d1), _mm512_add_epi32(d2, d3));
      const int64_t sb = t * j->nb + b;
      const __m512i d = _mm512_sub_epi32(dot, zsum_avx512(j, zeros_avx512(j, sb), j->xsum[b]));
      const __m512 s = _mm512_mul_ps(scales_avx512(j, sb), _mm512_set1_ps(j->xs[b]));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc);
    }
    store_tile(j, 0, t, acc);
  }
}

/* Prefill: MT rows of X share each weight load (the tile's weights stay in L1/L2 while all row
 * groups pass over them, so prefill is bound by VPDPBUSD, not memory). */
static inline __attribute__((always_inline)) void rows_avx512(const Job *j, int64_t t, int64_t m0, const int MT) {
  const int64_t G = j->bs / 8;
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  __m512 acc[8];
#pragma GCC unroll 8
  for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
  const uint8_t *w = j->w + t * j->nb * G * 64;
  for (int64_t b = 0; b < j->nb; b++) {
    __m512i dot[8];
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++) dot[r] = _mm512_setzero_si512();
    for (int64_t g = 0; g < G; g++, w += 64) {
      const __m512i v = _mm512_loadu_si512(w);
      const __m512i lo = _mm512_and_si512(v, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
#pragma GCC unroll 8
      for (int r = 0; r < MT; r++) {
        const int32_t *xb = (const int32_t *)(j->xq + (m0 + r) * j->Kp + b * j->bs) + 2 * g;
        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(xb[0]));
        dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(xb[1]));
      }
    }
    const int64_t sb = t * j->nb + b;
    const __m512i z = zeros_avx512(j, sb);
    const __m512 sc = scales_avx512(j, sb);
#pragma GCC unroll 8
    for (int r = 0; r < MT; r++) {
      const int64_t mb = (m0 + r) * j->nb + b;
      const __m512i d = _mm512_sub_epi32(dot[r], zsum_avx512(j, z, j->xsum[mb]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sc, _mm512_set1_ps(j->xs[mb])), acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MT; r++) store_tile(j, m0 + r, t, acc[r]);
}

static void tiles_avx512(void *arg, int64_t begin, int64_t end) {
  const Job *j = arg;
  if (j->M == 1) {
    tiles_avx512_m1(j, begin, end);
    return;
  }
  for (int64_t t = begin; t < end; t++) {
    int64_t m = 0;
    for (; m + 8 <= j->M; m += 8) rows_avx512(j, t, m, 8);
    for (; m + 4 <= j->M; m += 4) rows_avx512(j, t, m, 4);
    for (; m < j->M; m++) rows_avx512(j, t, m, 1);
  }
}
#endif

#ifdef INT4_AVX2
/* AVX2 (no VNNI): a 32-byte half of a 64-byte group holds 8 rows x 4 bytes. VPMADDUBSW multiplies
 * the unsigned 4-bit weights by the int8 activations into int16 pair sums - at most 2 x 15 x 127
 * = 3810, and the low and high nibbles' sums added 7620, so nothing saturates - and VPMADDWD
 * with ones widens each row's pairs into its int32 lane. */
static inline __m256i dot8_avx2(__m256i v, __m256i xa, __m256i xc) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, lo4), xa),
                                     _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), lo4), xc));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* 8 scales from index i (F16C converts halves: every AVX2 CPU has it, x86-64-v3 includes it) */
static inline __m256 scales_avx2(const Job *j, int64_t i) {
  if (j->scale_f16) {
#ifdef __F16C__
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)j->scales + i)));
#else
    float f[8];
    for (int k = 0; k < 8; k++) f[k] = half_to_float(((const uint16_t *)j->scales)[i + k]);
    return _mm256_loadu_ps(f);
#endif
  }
  return _mm256_loadu_ps((const float *)j->scales + i);
}
/* 8 rows' zero points from index i (8 each when the weights are symmetric and carry none) */
static inline __m256i zeros_avx2(const Job *j, int64_t i) {
  return j->zeros ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(j->zeros + i))) : _mm256_set1_epi32(8);
}
/* z (zeros_avx2's) x the block's activation sum; symmetric: 8 x sum, no VPMULLD (two uops, long latency) */
static inline __m256i zsum_avx2(const Job *j, __m256i z, int32_t xsum) {
  return j->zeros ? _mm256_mullo_epi32(z, _mm256_set1_epi32(xsum)) : _mm256_set1_epi32(8 * xsum);
}

static inline void store_tile_avx2(const Job *j, int64_t m, int64_t t, __m256 a0, __m256 a1) {
  float out[16];
  _mm256_storeu_ps(out, a0);
  _mm256_storeu_ps(out + 8, a1);
  for (int r = 0; r < 16 && t * 16 + r < j->N; r++)
    j->y[m * j->N + t * 16 + r] = out[r] + (j->bias ? j->bias[t * 16 + r] : 0.f);
}

/* MT rows of X against tile t (MT 1: decode, two accumulators per half hide the latency) */
static inline __attribute__((always_inline)) void rows_avx2(const Job *j, int64_t t, int64_t m0, const int MT) {
  const int64_t G = j->bs / 8;
  __m256 acc[4][2];
#pragma GCC unroll 4
  for (int r = 0; r < MT; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const uint8_t *w = j->w + t * j->nb * G * 64;
  for (int64_t b = 0; b < j->nb; b++) {
    __m256i d[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < MT; r++) d[r][0] = d[r][1] = _mm256_setzero_si256();
    for (int64_t g = 0; g < G; g++, w += 64) {
#if PF_W
      if (MT == 1) _mm_prefetch((const char *)w + PF_W, PF_HINT);
#endif
      const __m256i v0 = _mm256_loadu_si256((const __m256i *)w), v1 = _mm256_loadu_si256((const __m256i *)(w + 32));
#pragma GCC unroll 4
      for (int r = 0; r < MT; r++) {
        const int32_t *xb = (const int32_t *)(j->xq + (m0 + r) * j->Kp + b * j->bs) + 2 * g;
        const __m256i xa = _mm256_set1_epi32(xb[0]), xc = _mm256_set1_epi32(xb[1]);
        d[r][0] = _mm256_add_epi32(d[r][0], dot8_avx2(v0, xa, xc));
        d[r][1] = _mm256_add_epi32(d[r][1], dot8_avx2(v1, xa, xc));
      }
    }
    const int64_t sb = t * j->nb + b;
    const __m256i z0 = zeros_avx2(j, sb * 16), z1 = zeros_avx2(j, sb * 16 + 8);
    const __m256 s0 = scales_avx2(j, sb * 16), s1 = scales_avx2(j, sb * 16 + 8);
#pragma GCC unroll 4
    for (int r = 0; r < MT; r++) {
      const int64_t mb = (m0 + r) * j->nb + b;
      const __m256 sx = _mm256_set1_ps(j->xs[mb]);
      acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d[r][0], zsum_avx2(j, z0, j->xsum[mb]))),
                                  _mm256_mul_ps(s0, sx), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d[r][1], zsum_avx2(j, z1, j->xsum[mb]))),
                                  _mm256_mul_ps(s1, sx), acc[r][1]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MT; r++) store_tile_avx2(j, m0 + r, t, acc[r][0], acc[r][1]);
}

static void tiles_avx2(void *arg, int64_t begin, int64_t end) {
  const Job *j = arg;
  for (int64_t t = begin; t < end; t++) {
    int64_t m = 0;
    for (; m + 4 <= j->M; m += 4) rows_avx2(j, t, m, 4);
    for (; m < j->M; m++) rows_avx2(j, t, m, 1);
  }
}
#endif

#ifdef INT4_NEON
/* NEON with the dot-product instructions (Armv8.2+, an Orin's Cortex-A78AE): a 64-byte group is
 * four 16-byte vectors of 4 rows x 4 bytes; SDOT adds each row's 4 products into its int32 lane
 * (the 4-bit weights, 0..15, are valid int8). */
static inline __attribute__((always_inline)) void rows_neon(const Job *j, int64_t t, int64_t m0, const int MT) {
  const int64_t G = j->bs / 8;
  const uint8x16_t lo4 = vdupq_n_u8(0x0F);
  float32x4_t acc[4][4];
#pragma GCC unroll 4
  for (int r = 0; r < MT; r++)
    for (int q = 0; q < 4; q++) acc[r][q] = vdupq_n_f32(0.f);
  const uint8_t *w = j->w + t * j->nb * G * 64;
  for (int64_t b = 0; b < j->nb; b++) {
    int32x4_t d[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < MT; r++)
      for (int q = 0; q < 4; q++) d[r][q] = vdupq_n_s32(0);
    for (int64_t g = 0; g < G; g++, w += 64) {
      __builtin_prefetch(w + 1024, 0, 0);
      int8x16_t lo[4], hi[4];
      for (int q = 0; q < 4; q++) {
        const uint8x16_t v = vld1q_u8(w + 16 * q);
        lo[q] = vreinterpretq_s8_u8(vandq_u8(v, lo4));
        hi[q] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
      }
#pragma GCC unroll 4
      for (int r = 0; r < MT; r++) {
        const int32_t *xb = (const int32_t *)(j->xq + (m0 + r) * j->Kp + b * j->bs) + 2 * g;
        const int8x16_t xa = vreinterpretq_s8_s32(vdupq_n_s32(xb[0])), xc = vreinterpretq_s8_s32(vdupq_n_s32(xb[1]));
        for (int q = 0; q < 4; q++) d[r][q] = vdotq_s32(vdotq_s32(d[r][q], lo[q], xa), hi[q], xc);
      }
    }
    const int64_t sb = t * j->nb + b;
    int32x4_t z[4];
    float32x4_t s[4];
    if (j->zeros) {
      const uint16x8_t z16a = vmovl_u8(vld1_u8(j->zeros + sb * 16)), z16b = vmovl_u8(vld1_u8(j->zeros + sb * 16 + 8));
      z[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(z16a)));
      z[1] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(z16a)));
      z[2] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(z16b)));
      z[3] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(z16b)));
    } else {
      z[0] = z[1] = z[2] = z[3] = vdupq_n_s32(8);
    }
    for (int q = 0; q < 4; q++)
      s[q] = j->scale_f16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)j->scales + sb * 16 + 4 * q)))
                          : vld1q_f32((const float *)j->scales + sb * 16 + 4 * q);
#pragma GCC unroll 4
    for (int r = 0; r < MT; r++) {
      const int64_t mb = (m0 + r) * j->nb + b;
      for (int q = 0; q < 4; q++) {
        const int32x4_t dq = vmlsq_n_s32(d[r][q], z[q], j->xsum[mb]);
        const float32x4_t sq = vmulq_n_f32(s[q], j->xs[mb]);
        acc[r][q] = vfmaq_f32(acc[r][q], vcvtq_f32_s32(dq), sq);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MT; r++) {
    float out[16];
    for (int q = 0; q < 4; q++) vst1q_f32(out + 4 * q, acc[r][q]);
    for (int i = 0; i < 16 && t * 16 + i < j->N; i++)
      j->y[(m0 + r) * j->N + t * 16 + i] = out[i] + (j->bias ? j->bias[t * 16 + i] : 0.f);
  }
}

static void tiles_neon(void *arg, int64_t begin, int64_t end) {
  const Job *j = arg;
  for (int64_t t = begin; t < end; t++) {
    int64_t m = 0;
    for (; m + 2 <= j->M; m += 2) rows_neon(j, t, m, 2);
    for (; m < j->M; m++) rows_neon(j, t, m, 1);
  }
}
#endif

/* Exported for tests and benchmarks (ctypes, no ORT): y[M, N] = x[M, K] W^T with the packed
 * weights (x [M, 2K] with activation 1); `kernel` (an EV_* bit, 0: the one in force) picks the
 * code path; -3 when that kernel is not available here. `scales` are halves with scale_f16, and
 * `zeros` may be NULL (all 8). */
__attribute__((visibility("default"))) int edge_vila_int4_linear(const float *x, int64_t M, int64_t K, int64_t N,
                                                                 int64_t bs, const uint8_t *w, const void *scales,
                                                                 const uint8_t *zeros,
                                                                 const float *bias, float *y, int activation,
                                                                 const float *skip, const float *norm_weight,
                                                                 float epsilon, float *sum, int kernel, int scale_f16) {
  if (bs <= 0 || bs % 8 || bs > 1024 || K <= 0 || N <= 0 || M < 0 || activation < 0 || activation > 1 ||
      (norm_weight && activation) || ((skip || sum) && !norm_weight))
    return -1;
  if (kernel && (kernel & (kernel - 1) || !(kernel & edge_vila_kernels()))) return -3;
  if (!kernel) kernel = ev_kernel();
  const int64_t nb = (K + bs - 1) / bs, Kp = nb * bs, tiles = (N + 15) / 16;
  if (M == 0) return 0;
  float *normed = NULL;
  if (norm_weight) {
    if (!(normed = malloc(sizeof(float) * (size_t)(M * K)))) return -2;
    NormJob n = {x, skip, norm_weight, sum, normed, K, epsilon, kernel};
    parallel_for(M, 16, norm_rows, &n);
    x = normed;
  }
  int8_t *xq = aligned_alloc(64, (size_t)((M * Kp + 63) / 64 * 64));
  float *xs = malloc(sizeof(float) * (size_t)(M * nb));
  int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(M * nb));
  if (!xq || !xs || !xsum) {
    free(xq), free(xs), free(xsum), free(normed);
    return -2;
  }
  Job j = {w, scales, zeros, bias, xq, xs, xsum, x, y, M, K, N, Kp, nb, bs, activation, kernel, scale_f16 != 0};
  parallel_for(M, 16, quantize_rows, &j);
  /* chunks of >= ~32 KB of weights: smaller ones cost more in hand-off than they balance */
  const int64_t grain = 1 + 32768 / (Kp * 8);
  parallel_fn fn = tiles_portable;
#ifdef INT4_AVX512
  if (kernel == EV_AVX512) fn = tiles_avx512;
#endif
#ifdef INT4_AVX2
  if (kernel == EV_AVX2) fn = tiles_avx2;
#endif
#ifdef INT4_NEON
  if (kernel == EV_NEON) fn = tiles_neon;
#endif
  parallel_for(tiles, grain, fn, &j);
  free(xq), free(xs), free(xsum), free(normed);
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  static const char *names[] = {"X", "W", "scales", "zeros", "bias", "skip", "norm_weight"};
  static const size_t ranks[] = {0, 3, 3, 3, 1, 0, 1};
  const Kernel *k = kernel;
  char msg[256];
  Tensor in[7];
  OrtStatus *st;
  for (int i = 0; i < 7; i++)
    if ((st = get_input(ctx, i, &in[i], "Int4Linear", names[i], INPUT_TYPES[i], ranks[i] ? ranks[i] : ANY_RANK, i >= 3)))
      return st;
  if (in[2].type != T_FLOAT && in[2].type != T_FLOAT16)
    return error("Int4Linear: input scales must be float or float16");
  if (in[0].rank < 1 || in[0].rank > 8) return error("Int4Linear: input X must have rank 1 to 8");
  const int64_t nb = (k->K + k->bs - 1) / k->bs, tiles = (k->N + 15) / 16;
  int skip_ok = !in[5].v || in[5].rank == in[0].rank;
  for (size_t i = 0; skip_ok && in[5].v && i < in[0].rank; i++) skip_ok = in[5].dims[i] == in[0].dims[i];
  if (in[0].dims[in[0].rank - 1] != k->K * (k->activation ? 2 : 1) || in[1].dims[0] != tiles || in[1].dims[1] != nb ||
      in[1].dims[2] != k->bs * 8 || in[2].dims[0] != tiles || in[2].dims[1] != nb || in[2].dims[2] != 16 ||
      (in[3].v && (in[3].dims[0] != tiles || in[3].dims[1] != nb || in[3].dims[2] != 16)) ||
      (in[4].v && in[4].dims[0] != k->N) ||
      !skip_ok || (in[6].v && in[6].dims[0] != k->K) || (in[5].v && !in[6].v) || (in[6].v && k->activation)) {
    snprintf(msg, sizeof msg, "Int4Linear: shapes do not fit K=%lld N=%lld block_size=%lld activation=%lld (X last dim "
             "%lld, W [%lld, %lld, %lld]; skip needs norm_weight [K] and X's shape; no norm with activation)",
             (long long)k->K, (long long)k->N, (long long)k->bs, (long long)k->activation,
             (long long)in[0].dims[in[0].rank - 1], (long long)in[1].dims[0], (long long)in[1].dims[1],
             (long long)in[1].dims[2]);
    return error(msg);
  }
  int64_t odims[8], M = 1;
  for (size_t i = 0; i + 1 < in[0].rank; i++) M *= (odims[i] = in[0].dims[i]);
  odims[in[0].rank - 1] = k->N;
  void *y, *sum = NULL;
  if ((st = get_output(ctx, 0, odims, in[0].rank, &y))) return st;
  size_t outputs = 0;
  if ((st = CALL(SLOT_KernelContext_GetOutputCount, OrtStatus *(*)(const OrtKernelContext *, size_t *))(ctx, &outputs)))
    return st;
  if (outputs > 1) {
    if (!in[5].v) return error("Int4Linear: output 1 (X + skip) needs the skip input");
    if ((st = get_output(ctx, 1, in[0].dims, in[0].rank, &sum))) return st;
  }
  int rc = edge_vila_int4_linear(in[0].data, M, k->K, k->N, k->bs, in[1].data, in[2].data,
                                 in[3].v ? in[3].data : NULL, in[4].v ? in[4].data : NULL, y, (int)k->activation,
                                 in[5].v ? in[5].data : NULL, in[6].v ? in[6].data : NULL, k->epsilon, sum, 0,
                                 in[2].type == T_FLOAT16);
  return rc ? error("Int4Linear: out of memory") : NULL;
}

static OrtStatus *create(const OrtCustomOp *op, OrtApiTable a, const OrtKernelInfo *info, void **out) {
  (void)op, (void)a;
  Kernel *k = calloc(1, sizeof(Kernel));
  if (!k) return error("Int4Linear: out of memory");
  typedef OrtStatus *(*GetInt)(const OrtKernelInfo *, const char *, int64_t *);
  OrtStatus *st = CALL(SLOT_KernelInfoGetAttribute_int64, GetInt)(info, "K", &k->K);
  if (!st) st = CALL(SLOT_KernelInfoGetAttribute_int64, GetInt)(info, "N", &k->N);
  if (!st) st = CALL(SLOT_KernelInfoGetAttribute_int64, GetInt)(info, "block_size", &k->bs);
  if (!st) { /* optional attributes: absent means none / ORT's default epsilon */
    k->activation = attr_int_or(info, "activation", 0);
    k->epsilon = attr_float_or(info, "epsilon", 1e-5f);
  }
  if (!st && (k->K <= 0 || k->N <= 0 || k->bs <= 0 || k->bs % 8 || k->bs > 1024 || k->activation < 0 || k->activation > 1))
    st = error("Int4Linear: K and N must be positive, block_size a multiple of 8 up to 1024, activation 0 or 1");
  if (st) {
    free(k);
    return st;
  }
  *out = k;
  return NULL;
}
static const char *op_name(const OrtCustomOp *op) { (void)op; return "Int4Linear"; }
static int in_type(const OrtCustomOp *op, size_t i) { (void)op; return INPUT_TYPES[i]; }
static size_t in_count(const OrtCustomOp *op) { (void)op; return 7; }
static int out_type(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return T_FLOAT; }
static size_t out_count(const OrtCustomOp *op) { (void)op; return 2; }
static int in_characteristic(const OrtCustomOp *op, size_t i) { (void)op; return i >= 3; /* zeros, bias, skip, norm optional */ }
static int out_characteristic(const OrtCustomOp *op, size_t i) { (void)op; return i >= 1; /* the sum optional */ }
OrtCustomOp edge_vila_int4_linear_op = {
    .version = 16, .CreateKernel = NULL, .GetName = op_name, .GetExecutionProviderType = op_cpu_provider,
    .GetInputType = in_type, .GetInputTypeCount = in_count, .GetOutputType = out_type,
    .GetOutputTypeCount = out_count, .KernelCompute = NULL, .KernelDestroy = op_free_kernel,
    .GetInputCharacteristic = in_characteristic, .GetOutputCharacteristic = out_characteristic,
    .GetInputMemoryType = op_default_memory, .GetVariadicInputMinArity = op_one,
    .GetVariadicInputHomogeneity = op_one, .GetVariadicOutputMinArity = op_one,
    .GetVariadicOutputHomogeneity = op_one, .CreateKernelV2 = create,
    .KernelComputeV2 = compute,
};
