/* What our ONNX Runtime custom ops share: the C-API entries they call, the OrtCustomOp layout,
 * tensor checks and a small thread pool (ops.c).
 *
 * ORT's pip wheel ships libonnxruntime but no C headers, so the few C-API entries used here are
 * called through their slot numbers in the OrtApi function table. These are all version-1 slots;
 * the C API is append-only, so they are the same in every ORT release since 1.0. The slot
 * numbers and the struct layout are facts read from the public onnxruntime_c_api.h; the
 * declarations are written here.
 */
#ifndef EDGE_VILA_ORT_OP_H
#define EDGE_VILA_ORT_OP_H
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTypeShape OrtTypeShape;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef void *const *OrtApiTable;

typedef struct {
  OrtApiTable (*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

/* OrtApi slots (version 1 part of the table) */
enum {
  SLOT_CreateStatus = 0, SLOT_CreateCustomOpDomain = 26, SLOT_CustomOpDomain_Add = 27, SLOT_AddCustomOpDomain = 28,
  SLOT_GetTensorMutableData = 51, SLOT_GetTensorElementType = 60, SLOT_GetDimensionsCount = 61,
  SLOT_GetDimensions = 62, SLOT_GetTensorTypeAndShape = 65, SLOT_KernelInfoGetAttribute_float = 85,
  SLOT_KernelInfoGetAttribute_int64 = 86, SLOT_KernelContext_GetOutputCount = 89, SLOT_KernelContext_GetInput = 90, SLOT_KernelContext_GetOutput = 91,
  SLOT_ReleaseStatus = 93, SLOT_ReleaseTensorTypeAndShapeInfo = 99,
};
enum { ORT_INVALID_ARGUMENT = 2, T_ANY = 0, T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3, T_INT32 = 6, T_FLOAT16 = 10 };

extern OrtApiTable edge_vila_api;
#define CALL(slot, type) ((type)edge_vila_api[slot])

static inline OrtStatus *error(const char *msg) {
  return CALL(SLOT_CreateStatus, OrtStatus *(*)(int, const char *))(ORT_INVALID_ARGUMENT, msg);
}

/* OrtCustomOp, field for field (version 16 layout: V2 create/compute return a status). */
typedef struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct OrtCustomOp *, OrtApiTable, const OrtKernelInfo *);
  const char *(*GetName)(const struct OrtCustomOp *);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
  int (*GetInputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
  int (*GetOutputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
  void (*KernelCompute)(void *, OrtKernelContext *);
  void (*KernelDestroy)(void *);
  int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);  /* 0 required, 1 optional */
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
  int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
  OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, OrtApiTable, const OrtKernelInfo *, void **);
  OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
} OrtCustomOp;

extern OrtCustomOp edge_vila_decode_attention_op, edge_vila_int4_linear_op, edge_vila_int8_linear_op;

typedef struct {
  const OrtValue *v;
  void *data;
  int type;
  size_t rank;
  int64_t dims[8];
} Tensor;

/* Input `index` of the kernel context, checked for element type (T_ANY: the caller checks) and
 * rank (ANY_RANK: any); a missing input is an error unless `optional` (then t->v is NULL). Errors
 * name the op and input. */
#define ANY_RANK ((size_t)-1)
OrtStatus *get_input(OrtKernelContext *ctx, size_t index, Tensor *t, const char *op, const char *name, int want_type,
                     size_t want_rank, int optional);
/* An optional attribute: its value, or `fallback` when the node does not set it. */
int64_t attr_int_or(const OrtKernelInfo *info, const char *name, int64_t fallback);
float attr_float_or(const OrtKernelInfo *info, const char *name, float fallback);

/* OrtCustomOp callbacks both ops share: CPU provider, kernel freed with free(), inputs in CPU
 * memory, every input/output required (an op overrides that where some are optional), arity 1. */
const char *op_cpu_provider(const OrtCustomOp *op);
void op_free_kernel(void *kernel);
int op_default_memory(const OrtCustomOp *op, size_t i);
int op_required(const OrtCustomOp *op, size_t i);
int op_one(const OrtCustomOp *op);

/* Output `index` with the given shape, and its data pointer. */
OrtStatus *get_output(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t rank, void **data);

/* The thread pool: fn(arg, begin, end) over [0, n) in chunks of at least `grain` items, on the
 * calling thread and the pool's workers. Nested or concurrent calls (two sessions at once) run
 * on the caller alone. */
typedef void (*parallel_fn)(void *arg, int64_t begin, int64_t end);
void parallel_for(int64_t n, int64_t grain, parallel_fn fn, void *arg);

/* kernel ids (bits): which code path an op runs (ops.c) */
enum { EV_PORTABLE = 1, EV_AVX2 = 2, EV_AVX512 = 4, EV_NEON = 8 };
int ev_kernel(void); /* the kernel in force: forced by edge_vila_use_kernel, else the best available */
int edge_vila_kernels(void); /* the EV_* bits compiled in and supported by this CPU */
#if defined(__aarch64__)
#include <sys/auxv.h>
#define EV_HWCAP_ASIMDDP (1UL << 20) /* <asm/hwcap.h>'s HWCAP_ASIMDDP: the dot-product instructions */
#endif

#if (defined(__AVX2__) && defined(__FMA__)) || (defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD))
/* 8-float vectors (GCC's vector extensions: AVX2 ymm registers on x86, pairs of NEON q registers
 * on aarch64) for the AVX2 and NEON paths of both ops */
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
static inline vf8 splat(float x) { return (vf8){x, x, x, x, x, x, x, x}; }
/* lanes of a where m (a comparison's all-ones lanes), else b: C has no vector ?: */
static inline vf8 pick(vi8 m, vf8 a, vf8 b) { return (vf8)(((vi8)a & m) | ((vi8)b & ~m)); }

/* e^x on 8 lanes for x in [-87, 88]: 2^floor * a degree-5 fit of 2^frac (exp512's) */
static inline vf8 exp8(vf8 x) {
  x = pick(x < splat(-87.f), splat(-87.f), x);
  x = pick(x > splat(88.f), splat(88.f), x);
  const vf8 t = x * splat(1.44269504f);
  vf8 fl = __builtin_convertvector(__builtin_convertvector(t, vi8), vf8); /* toward zero */
  fl = pick(fl > t, fl - splat(1.f), fl);                                  /* floor */
  const vf8 f = t - fl;
  vf8 p = splat(0.0018762329f);
  p = p * f + splat(0.0089925844f);
  p = p * f + splat(0.0558236055f);
  p = p * f + splat(0.2401545346f);
  p = p * f + splat(0.6931529641f);
  p = p * f + splat(0.9999999404f);
  return p * (vf8)((__builtin_convertvector(fl, vi8) + 127) << 23);
}
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
/* e^x on 16 lanes for x in [-87, 88]: 2^floor * a degree-5 fit of 2^frac (relative error < 1e-7) */
static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 fl = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, fl);
  __m512 p = _mm512_set1_ps(0.0018762329f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0089925844f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0558236055f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2401545346f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931529641f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999999404f));
  return _mm512_scalef_ps(p, fl);
}
#endif
#endif
