/* edge_vila.Int8Linear: Y = act(X W + bias), W int8 with a scale per output channel (the INT8
 * ViT's weights as the bundle stores them, symmetric; -128 is taken too). For x86 CPUs without VNNI,
 * where ONNX Runtime's fast U8S8 GEMM saturates (VPMADDUBSW adds pairs of u8 x s8 products into
 * int16: 2 x 255 x 127 does not fit; the ViT's features' cosine to fp32 fell to 0.94 on a Zen 3)
 * and its exact U8U8 GEMM was only ~1.3x its fp32 one (issue #25).
 *
 * Activations are quantized per row (token) at run time to 7 bits, [0, 127] over the row's own
 * [min, max] with a zero point: VPMADDUBSW's pair sums are then at most 2 x 127 x 128 = 32512
 * and never saturate, at the instruction mix of ORT's U8S8 kernel (VPMADDUBSW, VPMADDWD, VPADDD).
 * A row's own range makes up for most of the bit given up against the bundle's static 8-bit
 * scales, calibrated for every token of every image (random SigLIP-B/16: features' cosine to fp32
 * 0.9995 mean, U8U8 0.99965). Exact 8-bit products by |x| * (sign(x) w) cost a VPSIGNB per
 * multiply on the multiply ports and ran at 2/3 of this speed. The zero point is taken out once
 * per output: acc - z * (sum of the channel's weights), then one float scale.
 *
 * The weights are packed (vision_cpu.pack_int8_panels) into panels of 16 output channels: per
 * 4 input channels 64 bytes, channels 0-7 then 8-15, 4 consecutive input channels per output
 * channel (one int32 lane). K is padded to a multiple of 4 and N to 16 with zeros.
 *
 * Inputs: 0 X float [..., K]; 1 W int8 [panels, Kp * 16]; 2 scales float [panels * 16];
 *         3 weight_sums int32 [panels * 16]; 4 bias float [N] (optional)
 * Output: 0 Y float [..., N]. Attributes: K, N, activation (0 none, 1 GELU, tanh form).
 */
#include "ort_op.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define INT8_AVX2 1
#ifndef ROWS
#define ROWS 4
#endif
#endif

typedef struct {
  int64_t K, N, activation;
} Kernel;

typedef struct {
  const int8_t *w;
  const float *wscale, *bias, *x;
  const int32_t *wsum; /* per output channel: the sum of its int8 weights */
  uint8_t *xq; /* per row, Kp bytes: x / scale + zero, in [0, 127] */
  float *xs;   /* per-row scale */
  int32_t *xz; /* per-row zero point */
  float *y;
  int64_t M, K, N, Kp, activation;
} Job;

static inline float gelu_tanh(float v) {
  return 0.5f * v * (1.f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
}

/* Row m's scale and zero point: the range [min, max] (holding 0, so zeros stay exact) in 127 steps */
static inline float row_range(const Job *j, int64_t m, float lo, float hi) {
  const float inv = hi > lo ? 127.f / (hi - lo) : 0.f;
  j->xs[m] = (hi - lo) / 127.f;
  j->xz[m] = (int32_t)nearbyintf(-lo * inv);
  return inv;
}

static void quantize_rows(void *arg, int64_t begin, int64_t end) {
  const Job *j = arg;
  for (int64_t m = begin; m < end; m++) {
    const float *x = j->x + m * j->K;
    uint8_t *q = j->xq + m * j->Kp;
    int64_t k0 = 0;
    float lo = 0.f, hi = 0.f;
#ifdef INT8_AVX2
    __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
    for (; k0 + 8 <= j->K; k0 += 8) {
      const __m256 v = _mm256_loadu_ps(x + k0);
      vlo = _mm256_min_ps(vlo, v), vhi = _mm256_max_ps(vhi, v);
    }
    float l8[8], h8[8];
    _mm256_storeu_ps(l8, vlo), _mm256_storeu_ps(h8, vhi);
    for (int i = 0; i < 8; i++) lo = fminf(lo, l8[i]), hi = fmaxf(hi, h8[i]);
#endif
    for (int64_t k = k0; k < j->K; k++) lo = fminf(lo, x[k]), hi = fmaxf(hi, x[k]);
    const float inv = row_range(j, m, lo, hi);
    const int z = j->xz[m];
    int64_t k = 0;
#ifdef INT8_AVX2
    /* round to nearest even (the MXCSR default, as nearbyintf), + z, saturated to [0, 127] */
    const __m256 vi = _mm256_set1_ps(inv);
    const __m256i vz = _mm256_set1_epi32(z), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; k + 32 <= j->K; k += 32) {
      __m256i r[4];
      for (int i = 0; i < 4; i++)
        r[i] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), vi)), vz);
      const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
      _mm256_storeu_si256((__m256i *)(q + k),
                          _mm256_min_epu8(_mm256_permutevar8x32_epi32(b, order), _mm256_set1_epi8(127)));
    }
#endif
    for (; k < j->Kp; k++) {
      const int v = k < j->K ? (int)nearbyintf(x[k] * inv) + z : z;
      q[k] = (uint8_t)(v < 0 ? 0 : v > 127 ? 127 : v);
    }
  }
}

static inline void finish(const Job *j, int64_t m, int64_t n0, const int32_t *acc) {
  float *y = j->y + m * j->N;
  for (int r = 0; r < 16 && n0 + r < j->N; r++) {
    float v = (float)(acc[r] - j->xz[m] * j->wsum[n0 + r]) * j->xs[m] * j->wscale[n0 + r] + (j->bias ? j->bias[n0 + r] : 0.f);
    y[n0 + r] = j->activation ? gelu_tanh(v) : v;
  }
}

static void panels_portable(void *arg, int64_t begin, int64_t end) {
  const Job *j = arg;
  for (int64_t p = begin; p < end; p++)
    for (int64_t m = 0; m < j->M; m++) {
      int32_t acc[16] = {0};
      const int8_t *w = j->w + p * j->Kp * 16;
      const uint8_t *q = j->xq + m * j->Kp;
      for (int64_t k4 = 0; k4 < j->Kp / 4; k4++, w += 64)
        for (int c = 0; c < 16; c++)
          for (int i = 0; i < 4; i++) acc[c] += (int32_t)q[k4 * 4 + i] * w[(c / 8) * 32 + (c % 8) * 4 + i];
      finish(j, m, p * 16, acc);
    }
}

#ifdef INT8_AVX2
/* GELU, tanh form, on 8 lanes: tanh(u) = 1 - 2 / (e^2u + 1) (exp8 clamps, so +-1 at the ends) */
static inline __m256 gelu8(__m256 v) {
  const vf8 x = (vf8)v, u = splat(0.7978845608f) * (x + splat(0.044715f) * x * x * x);
  const vf8 t = splat(1.f) - splat(2.f) / (exp8(u + u) + splat(1.f));
  return (__m256)(splat(0.5f) * x * (splat(1.f) + t));
}

static inline __attribute__((always_inline)) void rows_avx2(const Job *j, int64_t p, int64_t m0, const int MR) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[ROWS][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const int8_t *w = j->w + p * j->Kp * 16;
  const int32_t *xq = (const int32_t *)(j->xq + m0 * j->Kp);
  const int64_t K4 = j->Kp / 4;
  for (int64_t k = 0; k < K4; k++, w += 64) {
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)w), w1 = _mm256_loadu_si256((const __m256i *)(w + 32));
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
      const __m256i a = _mm256_set1_epi32(xq[r * K4 + k]);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w0), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w1), ones));
    }
  }
  const int64_t n0 = p * 16;
  const __m256 ws0 = _mm256_loadu_ps(j->wscale + n0), ws1 = _mm256_loadu_ps(j->wscale + n0 + 8);
  const __m256i c0 = _mm256_loadu_si256((const __m256i *)(j->wsum + n0)),
                c1 = _mm256_loadu_si256((const __m256i *)(j->wsum + n0 + 8));
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) {
    const int64_t m = m0 + r;
    if (n0 + 16 > j->N) {
      int32_t out[16];
      _mm256_storeu_si256((__m256i *)out, acc[r][0]);
      _mm256_storeu_si256((__m256i *)(out + 8), acc[r][1]);
      finish(j, m, n0, out);
      continue;
    }
    const __m256 sx = _mm256_set1_ps(j->xs[m]);
    const __m256i z = _mm256_set1_epi32(j->xz[m]);
    __m256 y0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][0], _mm256_mullo_epi32(z, c0))),
                              _mm256_mul_ps(ws0, sx));
    __m256 y1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][1], _mm256_mullo_epi32(z, c1))),
                              _mm256_mul_ps(ws1, sx));
    if (j->bias) {
      y0 = _mm256_add_ps(y0, _mm256_loadu_ps(j->bias + n0));
      y1 = _mm256_add_ps(y1, _mm256_loadu_ps(j->bias + n0 + 8));
    }
    if (j->activation) y0 = gelu8(y0), y1 = gelu8(y1);
    _mm256_storeu_ps(j->y + m * j->N + n0, y0);
    _mm256_storeu_ps(j->y + m * j->N + n0 + 8, y1);
  }
}

static void panels_avx2(void *arg, int64_t begin, int64_t end) {
  const Job *j = arg;
  for (int64_t p = begin; p < end; p++) {
    int64_t m = 0;
    for (; m + ROWS <= j->M; m += ROWS) rows_avx2(j, p, m, ROWS);
    for (; m < j->M; m++) rows_avx2(j, p, m, 1);
  }
}
#endif

/* Y = act(X W + bias) for X [M, K], through the kernel given (an EV_* bit; 0: the one in force;
 * every x86 kernel runs the AVX2 loops, the op has no AVX-512 or NEON path because ORT's U8S8
 * GEMM is accurate there). `wsum` [panels * 16]: each output channel's sum of weights. 0, or -1
 * bad arguments, -2 out of memory, -3 kernel not available. Exported for tests and benchmarks. */
__attribute__((visibility("default"))) int edge_vila_int8_linear(const float *x, int64_t M, int64_t K, int64_t N,
                                                                 const int8_t *w, const float *wscale,
                                                                 const int32_t *wsum, const float *bias, float *y,
                                                                 int activation, int kernel) {
  if (K <= 0 || N <= 0 || M < 0 || activation < 0 || activation > 1) return -1;
  if (kernel && (kernel & (kernel - 1) || !(kernel & edge_vila_kernels()))) return -3;
  if (!kernel) kernel = ev_kernel();
  if (M == 0) return 0;
  const int64_t Kp = (K + 3) / 4 * 4, panels = (N + 15) / 16;
  uint8_t *xq = malloc((size_t)(M * Kp));
  float *xs = malloc(sizeof(float) * (size_t)M);
  int32_t *xz = malloc(sizeof(int32_t) * (size_t)M);
  if (!xq || !xs || !xz) {
    free(xq), free(xs), free(xz);
    return -2;
  }
  Job j = {w, wscale, bias, x, wsum, xq, xs, xz, y, M, K, N, Kp, activation};
  parallel_for(M, 16, quantize_rows, &j);
  parallel_fn fn = panels_portable;
#ifdef INT8_AVX2
  if (kernel != EV_PORTABLE) fn = panels_avx2;
#endif
  parallel_for(panels, 1, fn, &j);
  free(xq), free(xs), free(xz);
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
static const int INPUT_TYPES[] = {T_FLOAT, T_INT8, T_FLOAT, T_INT32, T_FLOAT};

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  static const char *names[] = {"X", "W", "scales", "weight_sums", "bias"};
  static const size_t ranks[] = {0, 2, 1, 1, 1};
  const Kernel *k = kernel;
  char msg[256];
  Tensor in[5];
  OrtStatus *st;
  for (int i = 0; i < 5; i++)
    if ((st = get_input(ctx, i, &in[i], "Int8Linear", names[i], INPUT_TYPES[i], ranks[i] ? ranks[i] : ANY_RANK, i >= 4)))
      return st;
  if (in[0].rank < 1 || in[0].rank > 8) return error("Int8Linear: input X must have rank 1 to 8");
  const int64_t panels = (k->N + 15) / 16, Kp = (k->K + 3) / 4 * 4;
  if (in[0].dims[in[0].rank - 1] != k->K || in[1].dims[0] != panels || in[1].dims[1] != Kp * 16 ||
      in[2].dims[0] != panels * 16 || in[3].dims[0] != panels * 16 || (in[4].v && in[4].dims[0] != k->N)) {
    snprintf(msg, sizeof msg, "Int8Linear: shapes do not fit K=%lld N=%lld (X last dim %lld, W [%lld, %lld], "
             "expected W [%lld, %lld], scales and weight_sums [%lld], bias [N])", (long long)k->K, (long long)k->N,
             (long long)in[0].dims[in[0].rank - 1], (long long)in[1].dims[0], (long long)in[1].dims[1],
             (long long)panels, (long long)(Kp * 16), (long long)(panels * 16));
    return error(msg);
  }
  int64_t odims[8], M = 1;
  for (size_t i = 0; i + 1 < in[0].rank; i++) M *= (odims[i] = in[0].dims[i]);
  odims[in[0].rank - 1] = k->N;
  void *y;
  if ((st = get_output(ctx, 0, odims, in[0].rank, &y))) return st;
  int rc = edge_vila_int8_linear(in[0].data, M, k->K, k->N, in[1].data, in[2].data, in[3].data,
                                 in[4].v ? in[4].data : NULL, y,
                                 (int)k->activation, 0);
  return rc ? error("Int8Linear: out of memory") : NULL;
}

static OrtStatus *create(const OrtCustomOp *op, OrtApiTable a, const OrtKernelInfo *info, void **out) {
  (void)op, (void)a;
  Kernel *k = calloc(1, sizeof(Kernel));
  if (!k) return error("Int8Linear: out of memory");
  typedef OrtStatus *(*GetInt)(const OrtKernelInfo *, const char *, int64_t *);
  OrtStatus *st = CALL(SLOT_KernelInfoGetAttribute_int64, GetInt)(info, "K", &k->K);
  if (!st) st = CALL(SLOT_KernelInfoGetAttribute_int64, GetInt)(info, "N", &k->N);
  if (!st) k->activation = attr_int_or(info, "activation", 0);
  if (!st && (k->K <= 0 || k->N <= 0 || k->activation < 0 || k->activation > 1))
    st = error("Int8Linear: K and N must be positive, activation 0 (none) or 1 (GELU, tanh form)");
  if (st) {
    free(k);
    return st;
  }
  *out = k;
  return NULL;
}
static const char *op_name(const OrtCustomOp *op) { (void)op; return "Int8Linear"; }
static int in_type(const OrtCustomOp *op, size_t i) { (void)op; return INPUT_TYPES[i]; }
static size_t in_count(const OrtCustomOp *op) { (void)op; return 5; }
static int out_type(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return T_FLOAT; }
static size_t out_count(const OrtCustomOp *op) { (void)op; return 1; }
static int in_characteristic(const OrtCustomOp *op, size_t i) { (void)op; return i >= 4; /* bias optional */ }
OrtCustomOp edge_vila_int8_linear_op = {
    .version = 16, .CreateKernel = NULL, .GetName = op_name, .GetExecutionProviderType = op_cpu_provider,
    .GetInputType = in_type, .GetInputTypeCount = in_count, .GetOutputType = out_type,
    .GetOutputTypeCount = out_count, .KernelCompute = NULL, .KernelDestroy = op_free_kernel,
    .GetInputCharacteristic = in_characteristic, .GetOutputCharacteristic = op_required,
    .GetInputMemoryType = op_default_memory, .GetVariadicInputMinArity = op_one,
    .GetVariadicInputHomogeneity = op_one, .GetVariadicOutputMinArity = op_one,
    .GetVariadicOutputHomogeneity = op_one, .CreateKernelV2 = create,
    .KernelComputeV2 = compute,
};
