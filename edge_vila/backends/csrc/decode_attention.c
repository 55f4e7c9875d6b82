/* edge_vila.DecodeAttention: causal GQA attention over an INT8 KV cache, as an ONNX Runtime
 * custom op for the fast CPU graph (ort_fast.py). It replaces GroupQueryAttention there because
 * ORT's CPU kernel spends 60-80 us per layer at 1024 cached positions, which kept decode at
 * 1024 context well under 0.8x of decode at 64 (issue #5).
 *
 * Inputs (the GroupQueryAttention inputs the fast graph already feeds, K cache transposed):
 *   0 qkv        float [1, S, (num_heads + 2 kv_heads) * head_dim]   q | k | v, before RoPE
 *   1 past_key   int8  [1, kv_heads, blocks, head_dim, 64]   blocks of 64 positions, channel-major
 *                inside a block: the scores of 16 positions are one vector op, and a block's keys
 *                are one contiguous 64 x head_dim run (one stream for the prefetcher; a plain
 *                transposed cache has head_dim strided streams and decode waited on memory)
 *   2 past_value int8  [1, kv_heads, max_seq, head_dim]
 *   3 seqlens_k  int32 [1]      total length - 1 (the S new tokens are its last S positions)
 *   4 total_sequence_length int32 scalar
 *   5 cos_cache, 6 sin_cache  float [rows, head_dim / 2]   RoPE, rotate-half (not interleaved)
 *   7 k_scale, 8 v_scale      float [1, kv_heads, 1, head_dim]   static per-channel INT8 scales
 * Outputs: 0 attn float [1, S, num_heads * head_dim]; 1 present_key, 2 present_value: the same
 * buffers as past_* when the caller binds them so (the backend does): the new positions are
 * written in place, nothing else is copied.
 * Attributes: num_heads, kv_num_heads (int), scale (float), parallel (int, default 0): 1 splits the
 * KV heads over our thread pool - set in graphs whose linears are ours too (ORT then runs one
 * thread); with ORT's own pool spinning on the other cores, ours would fight it.
 */
#include "ort_op.h"

#define KB 64 /* positions per key-cache block */
static const int INPUT_TYPES[] = {T_FLOAT, T_INT8, T_INT8, T_INT32, T_INT32, T_FLOAT, T_FLOAT, T_FLOAT, T_FLOAT};

typedef struct {
  int64_t num_heads, kv_heads, parallel;
  float scale;
} Kernel;

/* ------------------------------------------------------------------------------------------ */
/* exp for x <= 0 (softmax after subtracting the max), vectorizable: 2^x = 2^floor * poly(frac),
 * degree-5 fit, relative error < 1e-7 */
static inline float exp_neg(float x) {
  float t = fmaxf(x, -87.0f) * 1.44269504f;
  float fl = floorf(t), f = t - fl;
  float p = 0.0018762329f;
  p = p * f + 0.0089925844f;
  p = p * f + 0.0558236055f;
  p = p * f + 0.2401545346f;
  p = p * f + 0.6931529641f;
  p = p * f + 0.9999999404f;
  int32_t bits = ((int32_t)fl + 127) << 23;
  float two;
  memcpy(&two, &bits, 4);
  return p * two;
}

static void rope(float *x, const float *cos, const float *sin, int half) {
  for (int i = 0; i < half; i++) {
    float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

/* One query token at position `pos` for the `G` query heads of one KV head: scores over
 * positions 0..pos, softmax, weighted sum of values. `qs` holds each head's query already
 * multiplied by the softmax scale and the key channel scales, so INT8 keys are used as they are. */
static void attend_portable(const float *qs, int G, int hd, const int8_t *Kt, const int8_t *V, int64_t pos, const float *vscale, float *scores, float *acc, float *out) {
  const int64_t T = pos + 1;
  memset(scores, 0, sizeof(float) * G * T);
  for (int64_t j0 = 0; j0 < T; j0 += KB) {
    const int64_t n = T - j0 < KB ? T - j0 : KB;
    for (int d = 0; d < hd; d++) {
      const int8_t *krow = Kt + j0 * hd + d * KB;
      for (int h = 0; h < G; h++) {
        const float q = qs[h * hd + d];
        float *s = scores + h * T + j0;
        for (int64_t j = 0; j < n; j++) s[j] += q * (float)krow[j];
      }
    }
  }
  for (int h = 0; h < G; h++) {
    float *s = scores + h * T;
    float m = s[0];
    for (int64_t j = 1; j < T; j++) m = s[j] > m ? s[j] : m;
    float sum = 0.f;
    for (int64_t j = 0; j < T; j++) {
      s[j] = exp_neg(s[j] - m);
      sum += s[j];
    }
    float *a = acc + h * hd;
    memset(a, 0, sizeof(float) * hd);
    for (int64_t j = 0; j < T; j++) {
      const int8_t *vrow = V + j * hd;
      float p = s[j];
      for (int d = 0; d < hd; d++) a[d] += p * (float)vrow[d];
    }
    float *o = out + h * hd;
    float inv = 1.f / sum;
    for (int d = 0; d < hd; d++) o[d] = a[d] * vscale[d] * inv;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ATT_AVX512 1
#endif
#if (defined(__AVX2__) && defined(__FMA__)) || (defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD))
#define ATT_VEC 1
#endif

#ifdef ATT_VEC
#if defined(__AVX2__)
#include <immintrin.h>
#else
#include <arm_neon.h>
#endif
/* The same maths on 8-float vectors (GCC's vector extensions: AVX2 ymm registers on x86, pairs
 * of NEON q registers on aarch64 - one source for both ISAs, held against the same reference),
 * register-blocked like the AVX-512 path below but for 16 registers: 32 positions x 2 heads of
 * scores, 32 channels x 2 heads of values. Needs head_dim % 32 == 0. */

/* 8 int8 -> 8 floats with the ISA's widening instructions (GCC scalarizes a generic
 * __builtin_convertvector from int8 to float: 8 extracts and 8 scalar converts, 5x slower) */
static inline vf8 widen8(const int8_t *p) {
#if defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
  vf8 v;
  memcpy(&v, &f, sizeof v);
  return v;
#else
  const int16x8_t w = vmovl_s8(vld1_s8(p));
  const float32x4_t lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), hi = vcvtq_f32_s32(vmovl_s16(vget_high_s16(w)));
  vf8 v;
  memcpy(&v, &lo, 16);
  memcpy((float *)&v + 4, &hi, 16);
  return v;
#endif
}
static inline float hmax8(vf8 v) {
  float m = v[0];
  for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
  return m;
}
static inline float hsum8(vf8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline __attribute__((always_inline)) void scores_half(int HN, const float *qs, int hd, const int8_t *Kt,
                                                              int64_t j, int half, float *s, int64_t Tp) {
  vf8 acc[2][4];
  for (int h = 0; h < HN; h++)
    for (int i = 0; i < 4; i++) acc[h][i] = splat(0.f);
  for (int d = 0; d < hd; d++) {
    const int8_t *kp = Kt + j * hd + d * KB + 32 * half;
    __builtin_prefetch(kp + 2 * KB * hd);  /* the block after next */
    const vf8 k[4] = {widen8(kp), widen8(kp + 8), widen8(kp + 16), widen8(kp + 24)};
    for (int h = 0; h < HN; h++) {
      const vf8 q = splat(qs[h * hd + d]);
      for (int i = 0; i < 4; i++) acc[h][i] += q * k[i];
    }
  }
  for (int h = 0; h < HN; h++)
    for (int i = 0; i < 4; i++) memcpy(s + h * Tp + j + 32 * half + 8 * i, &acc[h][i], sizeof(vf8));
}

static inline __attribute__((always_inline)) void values_chunk(int HN, const float *p, int64_t Tp, int64_t T,
                                                               const int8_t *V, int hd, int dc, const float *vscale,
                                                               const float *inv, float *out) {
  vf8 acc[2][4];
  for (int h = 0; h < HN; h++)
    for (int i = 0; i < 4; i++) acc[h][i] = splat(0.f);
  for (int64_t j = 0; j < T; j++) {
    const int8_t *vp = V + j * hd + dc;
    __builtin_prefetch(vp + 32 * hd);
    const vf8 v[4] = {widen8(vp), widen8(vp + 8), widen8(vp + 16), widen8(vp + 24)};
    for (int h = 0; h < HN; h++) {
      const vf8 w = splat(p[h * Tp + j]);
      for (int i = 0; i < 4; i++) acc[h][i] += w * v[i];
    }
  }
  for (int h = 0; h < HN; h++)
    for (int i = 0; i < 4; i++) {
      vf8 sc = splat(inv[h]);
      if (vscale) {
        vf8 vs;
        memcpy(&vs, vscale + dc + 8 * i, sizeof vs);
        sc *= vs;
      }
      const vf8 o = acc[h][i] * sc;
      memcpy(out + h * hd + dc + 8 * i, &o, sizeof o);
    }
}

/* softmax512's contract on 8 lanes (the scalar tail past the last whole vector) */
static float softmax_vec(float *s, int64_t T, float *mx_out, float *sum_out) {
  vf8 mv = splat(-3.0e38f);
  int64_t j = 0;
  for (; j + 8 <= T; j += 8) {
    vf8 v;
    memcpy(&v, s + j, sizeof v);
    mv = pick(v > mv, v, mv);
  }
  float m = hmax8(mv);
  for (int64_t i = j; i < T; i++) m = s[i] > m ? s[i] : m;
  vf8 sv = splat(0.f);
  for (j = 0; j + 8 <= T; j += 8) {
    vf8 v;
    memcpy(&v, s + j, sizeof v);
    v = exp8(v - splat(m));
    memcpy(s + j, &v, sizeof v);
    sv += v;
  }
  float total = hsum8(sv);
  for (; j < T; j++) total += (s[j] = exp_neg(s[j] - m));
  if (mx_out) *mx_out = m, *sum_out = total;
  return 1.f / total;
}

#define BY_HEADS2(HN, call) switch (HN) { case 1: call(1); break; default: call(2); }

/* attend_avx512's contract (see there) on the vector path */
static void attend_vec(const float *qs, int G, int hd, const int8_t *Kt, const int8_t *V, int64_t T,
                       const float *vscale, float *scores, float *out, float *mx, float *sum) {
  const int64_t Tp = (T + 63) / 64 * 64;
  float inv[2];
  for (int h0 = 0; h0 < G; h0 += 2) {
    const int hn = G - h0 < 2 ? G - h0 : 2;
    const float *q = qs + h0 * hd;
    for (int64_t j = 0; j < T; j += 64)
      for (int half = 0; half < 2 && j + 32 * half < T; half++) {
#define SCORES2(HN) scores_half(HN, q, hd, Kt, j, half, scores, Tp)
        BY_HEADS2(hn, SCORES2)
      }
    for (int h = 0; h < hn; h++)
      inv[h] = mx ? (softmax_vec(scores + h * Tp, T, mx + h0 + h, sum + h0 + h), 1.f)
                  : softmax_vec(scores + h * Tp, T, NULL, NULL);
    for (int dc = 0; dc < hd; dc += 32) {
#define VALUES2(HN) values_chunk(HN, scores, Tp, T, V, hd, dc, mx ? NULL : vscale, inv, out + h0 * hd)
      BY_HEADS2(hn, VALUES2)
    }
  }
}
#endif

#ifdef ATT_AVX512
#include <immintrin.h>
/* The same maths with AVX-512, register-blocked: 64 positions x up to 4 heads of scores stay in
 * 16 registers while all channels stream through, and each INT8 load is widened once for all
 * the heads of the group (the portable loops reload and re-widen it per head). */
/* software prefetch distances: decode streams the whole cache from DRAM every token (the INT4
 * weights in between evict it), and one core's hardware prefetch alone kept ~5 GB/s */
#ifndef PF_BLOCKS
#define PF_BLOCKS 2
#endif
#ifndef PF_ROWS
#define PF_ROWS 32
#endif
#define WIDEN(raw, i) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, i)))

static inline __attribute__((always_inline)) void scores_block(int HN, const float *qs, int hd, const int8_t *Kt,
                                                               int64_t j, __mmask64 m, float *s,
                                                               int64_t Tp) {
  __m512 acc[4][4];
  for (int h = 0; h < HN; h++)
    for (int i = 0; i < 4; i++) acc[h][i] = _mm512_setzero_ps();
  for (int d = 0; d < hd; d++) {
    _mm_prefetch((const char *)(Kt + (j + PF_BLOCKS * KB) * hd + d * KB), _MM_HINT_T0);  /* the block after next */
    __m512i raw = _mm512_maskz_loadu_epi8(m, Kt + j * hd + d * KB);
    __m512 k[4] = {WIDEN(raw, 0), WIDEN(raw, 1), WIDEN(raw, 2), WIDEN(raw, 3)};
    for (int h = 0; h < HN; h++) {
      __m512 q = _mm512_set1_ps(qs[h * hd + d]);
      for (int i = 0; i < 4; i++) acc[h][i] = _mm512_fmadd_ps(q, k[i], acc[h][i]);
    }
  }
  for (int h = 0; h < HN; h++)
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(s + h * Tp + j + 16 * i, acc[h][i]);
}

static inline __attribute__((always_inline)) void values_block(int HN, const float *p, int64_t Tp, int64_t T,
                                                               const int8_t *V, int hd, int dc, __mmask64 m,
                                                               const float *vscale, const float *inv, float *out) {
  __m512 acc[4][4];
  for (int h = 0; h < HN; h++)
    for (int i = 0; i < 4; i++) acc[h][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < T; j++) {
    _mm_prefetch((const char *)(V + (j + PF_ROWS) * hd + dc), _MM_HINT_T0);
    __m512i raw = _mm512_maskz_loadu_epi8(m, V + j * hd + dc);
    __m512 v[4] = {WIDEN(raw, 0), WIDEN(raw, 1), WIDEN(raw, 2), WIDEN(raw, 3)};
    for (int h = 0; h < HN; h++) {
      __m512 w = _mm512_set1_ps(p[h * Tp + j]);
      for (int i = 0; i < 4; i++) acc[h][i] = _mm512_fmadd_ps(w, v[i], acc[h][i]);
    }
  }
  for (int h = 0; h < HN; h++)
    for (int i = 0; i < 4 && dc + 16 * i < hd; i++) {
      __m512 sc = vscale ? _mm512_mul_ps(_mm512_loadu_ps(vscale + dc + 16 * i), _mm512_set1_ps(inv[h]))
                         : _mm512_set1_ps(inv[h]);
      _mm512_storeu_ps(out + h * hd + dc + 16 * i, _mm512_mul_ps(acc[h][i], sc));
    }
}


/* softmax numerators in place over s[0..T) (the padding up to a multiple of 16 becomes 0); returns
 * 1 / sum, and the max and the sum through `mx_out` / `sum_out` when given (partial softmax) */
static float softmax512(float *s, int64_t T, float *mx_out, float *sum_out) {
  __m512 mx = _mm512_set1_ps(-3.0e38f);
  for (int64_t j = 0; j < T; j += 16) {
    __mmask16 m = T - j >= 16 ? 0xffff : (__mmask16)((1u << (T - j)) - 1);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(s + j));
  }
  __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < T; j += 16) {
    __mmask16 m = T - j >= 16 ? 0xffff : (__mmask16)((1u << (T - j)) - 1);
    __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmax)));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float total = _mm512_reduce_add_ps(sum);
  if (mx_out) *mx_out = vmax[0], *sum_out = total;
  return 1.f / total;
}

#define BY_HEADS(HN, call) switch (HN) { case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; default: call(4); }

/* Positions 0..T-1 of one KV head's cache (Kt, V may point at a block-aligned slice of it).
 * Without `mx`: the normalized output times the value scales. With `mx`/`sum`: the partial of a
 * split softmax (flash-decoding) - each head's unnormalized sum of p_j v_j with its max and sum. */
static void attend_avx512(const float *qs, int G, int hd, const int8_t *Kt, const int8_t *V, int64_t T,
                          const float *vscale, float *scores, float *out, float *mx, float *sum) {
  const int64_t Tp = (T + 63) / 64 * 64;  /* scores rows padded to whole blocks */
  float inv[4];
  for (int h0 = 0; h0 < G; h0 += 4) {
    const int hn = G - h0 < 4 ? G - h0 : 4;
    const float *q = qs + h0 * hd;
    for (int64_t j = 0; j < T; j += 64) {
      const __mmask64 m = T - j >= 64 ? ~0ULL : (1ULL << (T - j)) - 1;
#define SCORES(HN) scores_block(HN, q, hd, Kt, j, m, scores, Tp)
      BY_HEADS(hn, SCORES)
    }
    for (int h = 0; h < hn; h++)
      inv[h] = mx ? (softmax512(scores + h * Tp, T, mx + h0 + h, sum + h0 + h), 1.f) : softmax512(scores + h * Tp, T, NULL, NULL);
    for (int dc = 0; dc < hd; dc += 64) {
      const __mmask64 m = hd - dc >= 64 ? ~0ULL : (1ULL << (hd - dc)) - 1;
#define VALUES(HN) values_block(HN, scores, Tp, T, V, hd, dc, m, mx ? NULL : vscale, inv, out + h0 * hd)
      BY_HEADS(hn, VALUES)
    }
  }
}
#endif

/* the vector paths' shared signature: full attention (mx NULL) or a split-softmax partial */
typedef void (*attend_fn)(const float *qs, int G, int hd, const int8_t *Kt, const int8_t *V, int64_t T,
                          const float *vscale, float *scores, float *out, float *mx, float *sum);

/* the kernel in force's vector path for this head_dim, or NULL (the portable loops) */
static attend_fn vector_path(int64_t hd) {
  const int k = ev_kernel();
  (void)k, (void)hd;
#ifdef ATT_AVX512
  if (k == EV_AVX512 && hd % 16 == 0) return attend_avx512;
#endif
#ifdef ATT_VEC
  if ((k == EV_AVX2 || k == EV_NEON || k == EV_AVX512) && hd % 32 == 0) return attend_vec;
#endif
  return NULL;
}

static void attend(const float *qs, int G, int hd, const int8_t *Kt, const int8_t *V, int64_t pos,
                   const float *vscale, float *scores, float *acc, float *out) {
  const attend_fn f = vector_path(hd);
  if (f)
    f(qs, G, hd, Kt, V, pos + 1, vscale, scores, out, NULL, NULL);
  else
    attend_portable(qs, G, hd, Kt, V, pos, vscale, scores, acc, out);
}

static int8_t quant(float x, float inv_scale) {
  float q = nearbyintf(x * inv_scale);
  return (int8_t)(q > 127.f ? 127.f : (q < -127.f ? -127.f : q));
}

/* ------------------------------------------------------------------------------------------ */
typedef struct {
  const Kernel *k;
  const float *qkv, *cosc, *sinc, *ks, *vs;
  const int8_t *Kt, *V;
  float *attn;
  int64_t S, past, total, nh, nkv, hd, W, kstride, max_seq;
  int failed;
} AttendJob;

/* The G queries that share KV head g for new token t: rotated at its position, scaled by the
 * softmax scale and the key scales (the int8 keys are then dotted unscaled) */
static void head_queries(const AttendJob *j, int64_t g, int64_t t, float *qs) {
  const int64_t G = j->nh / j->nkv, hd = j->hd, half = hd / 2, pos = j->past + t;
  for (int64_t h = 0; h < G; h++) {
    float *q = qs + h * hd;
    memcpy(q, j->qkv + t * j->W + (g * G + h) * hd, sizeof(float) * hd);
    rope(q, j->cosc + pos * half, j->sinc + pos * half, (int)half);
    for (int64_t d = 0; d < hd; d++) q[d] *= j->k->scale * j->ks[g * hd + d];
  }
}

/* KV heads [g0, g1): every new token's queries of those heads against their cache */
static void attend_heads(void *arg, int64_t g0, int64_t g1) {
  AttendJob *j = arg;
  const int64_t G = j->nh / j->nkv, hd = j->hd;
  const int64_t Tp = (j->total + 63) / 64 * 64; /* score rows padded to whole 64-position blocks */
  float *work = malloc(sizeof(float) * (size_t)(G * Tp + G * hd + G * hd));
  if (!work) {
    j->failed = 1;
    return;
  }
  float *scores = work, *acc = scores + G * Tp, *qs = acc + G * hd;
  for (int64_t g = g0; g < g1; g++)
    for (int64_t t = 0; t < j->S; t++) {
      head_queries(j, g, t, qs);
      attend(qs, (int)G, (int)hd, j->Kt + g * j->kstride, j->V + g * j->max_seq * hd, j->past + t, j->vs + g * hd,
             scores, acc, j->attn + t * j->nh * hd + g * G * hd);
    }
  free(work);
}

/* Decode at long context, split over positions too (flash-decoding): KV heads alone leave a
 * thread idle whenever there are fewer of them than threads x a few (SmolLM2: 3 on 2 cores).
 * Task g * chunks + c attends head g's positions of chunk c; the caller merges the partials. */
#define CHUNK_MIN 256
typedef struct {
  const AttendJob *a;
  attend_fn fn;
  int64_t chunks, chunk;  /* positions per chunk, a multiple of the key block */
  float *acc, *mx, *sum;  /* [kv_heads][chunks][G](x head_dim) */
  int failed;
} SplitJob;

static void attend_chunks(void *arg, int64_t t0, int64_t t1) {
  SplitJob *sj = arg;
  const AttendJob *j = sj->a;
  const int64_t G = j->nh / j->nkv, hd = j->hd, T = j->total;
  float *work = malloc(sizeof(float) * (size_t)(G * sj->chunk + G * hd));
  if (!work) {
    sj->failed = 1;
    return;
  }
  float *scores = work, *qs = scores + G * sj->chunk;
  for (int64_t t = t0; t < t1; t++) {
    const int64_t g = t / sj->chunks, c = t % sj->chunks, b = c * sj->chunk;
    const int64_t n = T - b < sj->chunk ? T - b : sj->chunk;
    head_queries(j, g, 0, qs);  /* one new token */
    sj->fn(qs, (int)G, (int)hd, j->Kt + g * j->kstride + b * hd, j->V + (g * j->max_seq + b) * hd, n, NULL,
           scores, sj->acc + t * G * hd, sj->mx + t * G, sj->sum + t * G);
  }
  free(work);
}

/* one new token: every head's chunks in parallel, then the softmax merge; 0 if out of memory */
static int attend_split(const AttendJob *a, attend_fn fn) {
  const int64_t G = a->nh / a->nkv, hd = a->hd, T = a->total;
  int64_t chunks = (T + CHUNK_MIN - 1) / CHUNK_MIN;
  if (chunks > 8) chunks = 8;
  const int64_t chunk = ((T + chunks - 1) / chunks + KB - 1) / KB * KB;
  chunks = (T + chunk - 1) / chunk;
  const int64_t tasks = a->nkv * chunks;
  float *buf = malloc(sizeof(float) * (size_t)(tasks * G * (hd + 2)));
  if (!buf) return 0;
  SplitJob sj = {a, fn, chunks, chunk, buf, buf + tasks * G * hd, buf + tasks * G * hd + tasks * G, 0};
  parallel_for(tasks, 1, attend_chunks, &sj);
  for (int64_t g = 0; g < a->nkv && !sj.failed; g++)
    for (int64_t h = 0; h < G; h++) {
      float m = -3.0e38f, l = 0.f;
      for (int64_t c = 0; c < chunks; c++) m = fmaxf(m, sj.mx[(g * chunks + c) * G + h]);
      float *o = a->attn + (g * G + h) * hd;
      memset(o, 0, sizeof(float) * hd);
      for (int64_t c = 0; c < chunks; c++) {
        const int64_t t = (g * chunks + c) * G + h;
        const float w = exp_neg(sj.mx[t] - m);
        l += w * sj.sum[t];
        for (int64_t d = 0; d < hd; d++) o[d] += w * sj.acc[t * hd + d];
      }
      for (int64_t d = 0; d < hd; d++) o[d] *= a->vs[g * hd + d] / l;
    }
  free(buf);
  return !sj.failed;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  static const char *names[] = {"qkv", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                                "cos_cache", "sin_cache", "k_scale", "v_scale"};
  static const size_t ranks[] = {3, 5, 4, 1, 0, 2, 2, 4, 4};
  char msg[256];  /* CreateStatus copies it */
  const Kernel *k = kernel;
  Tensor in[9];
  OrtStatus *st;
  for (int i = 0; i < 9; i++)
    if ((st = get_input(ctx, i, &in[i], "DecodeAttention", names[i], INPUT_TYPES[i], ranks[i], 0))) return st;
  const int64_t nh = k->num_heads, nkv = k->kv_heads;
  const int64_t S = in[0].dims[1], hd = in[1].dims[3], max_seq = in[2].dims[2], half = hd / 2;
  const int64_t total = ((const int32_t *)in[4].data)[0], past = total - S;
  if (in[0].dims[0] != 1 || in[0].dims[2] != (nh + 2 * nkv) * hd || in[1].dims[1] != nkv ||
      in[1].dims[4] != KB || in[1].dims[2] * KB < max_seq || in[2].dims[1] != nkv || in[2].dims[3] != hd || in[5].dims[1] != half ||
      in[6].dims[1] != half || in[7].dims[1] != nkv || in[7].dims[3] != hd || in[8].dims[1] != nkv ||
      in[8].dims[3] != hd || hd % 2) {
    snprintf(msg, sizeof msg, "DecodeAttention: shapes do not fit num_heads=%lld kv_num_heads=%lld "
             "(qkv last dim %lld, key cache [1, %lld, %lld, %lld, %lld], value cache [1, %lld, %lld, %lld])",
             (long long)nh, (long long)nkv, (long long)in[0].dims[2], (long long)in[1].dims[1],
             (long long)in[1].dims[2], (long long)in[1].dims[3], (long long)in[1].dims[4], (long long)in[2].dims[1],
             (long long)in[2].dims[2], (long long)in[2].dims[3]);
    return error(msg);
  }
  if (((const int32_t *)in[3].data)[0] != total - 1 || past < 0 || total > max_seq || total > in[5].dims[0]) {
    snprintf(msg, sizeof msg, "DecodeAttention: total length %lld (seqlens_k %d) with %lld new tokens does not fit "
             "the cache (%lld positions) or the RoPE table (%lld rows)", (long long)total,
             ((const int32_t *)in[3].data)[0], (long long)S, (long long)max_seq, (long long)in[5].dims[0]);
    return error(msg);
  }
  void *optr[3];
  const int64_t odims[3] = {1, S, nh * hd};
  const size_t cache_bytes[3] = {0, (size_t)(nkv * in[1].dims[2] * hd * KB), (size_t)(nkv * max_seq * hd)};
  if ((st = get_output(ctx, 0, odims, 3, &optr[0]))) return st;
  for (int i = 1; i < 3; i++)
    if ((st = get_output(ctx, i, in[i].dims, in[i].rank, &optr[i]))) return st;
  for (int i = 1; i < 3; i++)  /* not bound to the same buffer: carry the cache over (slow path) */
    if (optr[i] != in[i].data) memcpy(optr[i], in[i].data, cache_bytes[i]);
  int8_t *Kt = optr[1], *V = optr[2];
  const int64_t kstride = in[1].dims[2] * hd * KB;  /* one KV head's key blocks */
  const float *qkv = in[0].data, *cosc = in[5].data, *sinc = in[6].data, *ks = in[7].data, *vs = in[8].data;
  float *attn = optr[0];
  const int64_t W = (nh + 2 * nkv) * hd;
  float kv[1024];
  if (hd > 1024) return error("DecodeAttention: head_dim above 1024");
  /* write the S new keys/values first (RoPE on keys, INT8), then attend */
  for (int64_t t = 0; t < S; t++) {
    const int64_t pos = past + t;
    const float *row = qkv + t * W;
    for (int64_t g = 0; g < nkv; g++) {
      memcpy(kv, row + (nh + g) * hd, sizeof(float) * hd);
      rope(kv, cosc + pos * half, sinc + pos * half, (int)half);
      int8_t *kb = Kt + g * kstride + (pos / KB) * hd * KB + pos % KB;
      for (int64_t d = 0; d < hd; d++) kb[d * KB] = quant(kv[d], 1.f / ks[g * hd + d]);
      const float *v = row + (nh + nkv + g) * hd;
      int8_t *vg = V + (g * max_seq + pos) * hd;
      for (int64_t d = 0; d < hd; d++) vg[d] = quant(v[d], 1.f / vs[g * hd + d]);
    }
  }
  /* the KV heads in parallel (each reads only its own cache) */
  AttendJob job = {k, qkv, cosc, sinc, ks, vs, Kt, V, attn, S, past, total, nh, nkv, hd, W, kstride, max_seq, 0};
  const attend_fn vec = vector_path(hd);
  if (k->parallel && S == 1 && total >= 2 * CHUNK_MIN && vec) {
    if (!attend_split(&job, vec)) return error("DecodeAttention: out of memory");
    return NULL;
  }
  if (k->parallel)
    parallel_for(nkv, 1, attend_heads, &job);
  else
    attend_heads(&job, 0, nkv);
  if (job.failed) return error("DecodeAttention: out of memory");
  return NULL;
}

/* ------------------------------------------------------------------------------------------ */
static OrtStatus *create(const OrtCustomOp *op, OrtApiTable a, const OrtKernelInfo *info, void **out) {
  (void)op;
  (void)a;
  Kernel *k = calloc(1, sizeof(Kernel));
  if (!k) return error("DecodeAttention: out of memory");
  typedef OrtStatus *(*GetInt)(const OrtKernelInfo *, const char *, int64_t *);
  typedef OrtStatus *(*GetFloat)(const OrtKernelInfo *, const char *, float *);
  OrtStatus *st = CALL(SLOT_KernelInfoGetAttribute_int64, GetInt)(info, "num_heads", &k->num_heads);
  if (!st) st = CALL(SLOT_KernelInfoGetAttribute_int64, GetInt)(info, "kv_num_heads", &k->kv_heads);
  if (!st) st = CALL(SLOT_KernelInfoGetAttribute_float, GetFloat)(info, "scale", &k->scale);
  if (!st) k->parallel = attr_int_or(info, "parallel", 0);
  if (!st && (k->kv_heads <= 0 || k->num_heads % k->kv_heads))
    st = error("DecodeAttention: num_heads must be a positive multiple of kv_num_heads");
  if (st) {
    free(k);
    return st;
  }
  *out = k;
  return NULL;
}

static const char *op_name(const OrtCustomOp *op) { (void)op; return "DecodeAttention"; }
static int in_type(const OrtCustomOp *op, size_t i) { (void)op; return INPUT_TYPES[i]; }
static size_t in_count(const OrtCustomOp *op) { (void)op; return 9; }
static int out_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? T_FLOAT : T_INT8; }
static size_t out_count(const OrtCustomOp *op) { (void)op; return 3; }

OrtCustomOp edge_vila_decode_attention_op = {
    .version = 16, .CreateKernel = NULL, .GetName = op_name, .GetExecutionProviderType = op_cpu_provider,
    .GetInputType = in_type, .GetInputTypeCount = in_count, .GetOutputType = out_type,
    .GetOutputTypeCount = out_count, .KernelCompute = NULL, .KernelDestroy = op_free_kernel,
    .GetInputCharacteristic = op_required, .GetOutputCharacteristic = op_required,
    .GetInputMemoryType = op_default_memory, .GetVariadicInputMinArity = op_one,
    .GetVariadicInputHomogeneity = op_one, .GetVariadicOutputMinArity = op_one,
    .GetVariadicOutputHomogeneity = op_one, .CreateKernelV2 = create, .KernelComputeV2 = compute,
};
