/* The library's entry point (RegisterCustomOps), the shared tensor helpers and the thread pool
 * our ops split their work over. See ort_op.h. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "ort_op.h"

OrtApiTable edge_vila_api;

OrtStatus *get_input(OrtKernelContext *ctx, size_t index, Tensor *t, const char *op, const char *name, int want_type,
                     size_t want_rank, int optional) {
  char msg[256]; /* CreateStatus copies it */
  const OrtValue *v = NULL;
  memset(t, 0, sizeof *t);
  OrtStatus *st = CALL(SLOT_KernelContext_GetInput, OrtStatus *(*)(OrtKernelContext *, size_t, const OrtValue **))(
      ctx, index, &v);
  if (st) return st;
  if (!v) {
    if (optional) return NULL;
    snprintf(msg, sizeof msg, "%s: required input %s is missing", op, name);
    return error(msg);
  }
  OrtTypeShape *info = NULL;
  if ((st = CALL(SLOT_GetTensorTypeAndShape, OrtStatus *(*)(const OrtValue *, OrtTypeShape **))(v, &info))) return st;
  CALL(SLOT_GetTensorElementType, OrtStatus *(*)(const OrtTypeShape *, int *))(info, &t->type);
  CALL(SLOT_GetDimensionsCount, OrtStatus *(*)(const OrtTypeShape *, size_t *))(info, &t->rank);
  if (t->rank <= 8) CALL(SLOT_GetDimensions, OrtStatus *(*)(const OrtTypeShape *, int64_t *, size_t))(info, t->dims, t->rank);
  CALL(SLOT_ReleaseTensorTypeAndShapeInfo, void (*)(OrtTypeShape *))(info);
  if ((want_type != T_ANY && t->type != want_type) || (want_rank != ANY_RANK && t->rank != want_rank)) {
    snprintf(msg, sizeof msg, "%s: input %s has element type %d and rank %zu, expected %d and %zu", op, name,
             t->type, t->rank, want_type, want_rank);
    return error(msg);
  }
  t->v = v;
  return CALL(SLOT_GetTensorMutableData, OrtStatus *(*)(OrtValue *, void **))((OrtValue *)v, &t->data);
}

/* whether an attribute read succeeded; a failed read's status (the attribute is absent) is released */
static int attr_found(OrtStatus *st) {
  if (st) CALL(SLOT_ReleaseStatus, void (*)(OrtStatus *))(st);
  return !st;
}

int64_t attr_int_or(const OrtKernelInfo *info, const char *name, int64_t fallback) {
  typedef OrtStatus *(*GetInt)(const OrtKernelInfo *, const char *, int64_t *);
  int64_t v;
  return attr_found(CALL(SLOT_KernelInfoGetAttribute_int64, GetInt)(info, name, &v)) ? v : fallback;
}

float attr_float_or(const OrtKernelInfo *info, const char *name, float fallback) {
  typedef OrtStatus *(*GetFloat)(const OrtKernelInfo *, const char *, float *);
  float v;
  return attr_found(CALL(SLOT_KernelInfoGetAttribute_float, GetFloat)(info, name, &v)) ? v : fallback;
}

const char *op_cpu_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
void op_free_kernel(void *kernel) { free(kernel); }
int op_default_memory(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return 0; }
int op_required(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return 0; }
int op_one(const OrtCustomOp *op) { (void)op; return 1; }

OrtStatus *get_output(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t rank, void **data) {
  OrtValue *out = NULL;
  typedef OrtStatus *(*GetOutput)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
  OrtStatus *st = CALL(SLOT_KernelContext_GetOutput, GetOutput)(ctx, index, dims, rank, &out);
  if (st) return st;
  return CALL(SLOT_GetTensorMutableData, OrtStatus *(*)(OrtValue *, void **))(out, data);
}

/* ---------------------------------------------------------------------------------------------
 * Thread pool. Decode runs ~100 of our ops per token, a few microseconds to ~100 us each, so
 * waking workers through the kernel every time would cost a visible share of the step: workers
 * spin (with pause) for a while after each job and only then sleep on a condition variable.
 * The backend runs ONNX Runtime's own pool with one thread while our ops are in the graph, so
 * the two pools never spin against each other.
 *
 * A job is claimed chunk by chunk through one 64-bit word: [job id: 24][chunks: 20][next: 20].
 * A worker that wakes late for a finished job fails the claim (the id moved on, or next reached
 * chunks) and never reads a half-published job. The caller claims chunks like any worker, so a
 * job always completes even with no worker running. A child after fork() has none of the
 * parent's workers: an atfork handler gives it a fresh pool (see pool_reset_in_child). */
#define MAX_THREADS 64
#define SPIN_ROUNDS 20000 /* ~100-200 us of pause before sleeping */

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  atomic_uint gen;       /* bumped once per job, wakes workers */
  atomic_int sleeping;
  atomic_ullong claim;   /* see above */
  atomic_llong done;     /* chunks finished in the current job */
  atomic_flag busy;
  atomic_int threads;    /* wanted, including the caller */
  int started;           /* workers running */
  parallel_fn fn;
  void *arg;
  int64_t n, chunk;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, ATOMIC_FLAG_INIT, 0, 0, 0, 0, 0, 0};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* claim and run chunks of job `id` until none is left; the caller of the job waits on `done` */
static void run_chunks(unsigned id) {
  for (;;) {
    unsigned long long c = atomic_load_explicit(&pool.claim, memory_order_acquire);
    for (;;) {
      if ((unsigned)(c >> 40) != (id & 0xFFFFFF) || (c & 0xFFFFF) >= ((c >> 20) & 0xFFFFF)) return;
      if (atomic_compare_exchange_weak_explicit(&pool.claim, &c, c + 1, memory_order_acq_rel, memory_order_acquire))
        break;
    }
    const int64_t i = (int64_t)(c & 0xFFFFF), b = i * pool.chunk, e = b + pool.chunk < pool.n ? b + pool.chunk : pool.n;
    pool.fn(pool.arg, b, e);
    atomic_fetch_add_explicit(&pool.done, 1, memory_order_acq_rel);
  }
}

static void *worker(void *p) {
  const int index = (int)(intptr_t)p; /* 1.. ; the caller is 0 */
  unsigned seen = atomic_load(&pool.gen);
  for (;;) {
    unsigned g;
    int spins = 0;
    while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
      if (++spins < SPIN_ROUNDS) {
        cpu_relax();
        continue;
      }
      pthread_mutex_lock(&pool.mu);
      atomic_fetch_add(&pool.sleeping, 1);
      while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
      atomic_fetch_sub(&pool.sleeping, 1);
      pthread_mutex_unlock(&pool.mu);
    }
    seen = g;
    if (index < atomic_load(&pool.threads)) run_chunks(g);
  }
  return NULL;
}

static int default_threads(void) {
  const char *env = getenv("EDGE_VILA_THREADS");
  int n = env ? atoi(env) : 0;
  if (n <= 0) {
    cpu_set_t set;
    n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  }
  return n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : n);
}

/* Threads our ops use, the caller included (default: $EDGE_VILA_THREADS, else the CPUs this
 * process may run on). Called by the backend through ctypes; returns the count in force. */
__attribute__((visibility("default"))) int edge_vila_set_threads(int n) {
  if (n <= 0) n = default_threads();
  atomic_store(&pool.threads, n > MAX_THREADS ? MAX_THREADS : n);
  return atomic_load(&pool.threads);
}

__attribute__((visibility("default"))) int edge_vila_get_threads(void) {
  if (atomic_load(&pool.threads) == 0) edge_vila_set_threads(0);
  return atomic_load(&pool.threads);
}

/* In a child after fork(): the workers did not come along, and the copied mutex and condition
 * variable may still count them as waiters (a broadcast could then wait for threads that do not
 * exist), so the child starts an empty pool that parallel_for fills again. Safe to register
 * because the library is never unloaded (-z nodelete). */
static void pool_reset_in_child(void) {
  pthread_mutex_init(&pool.mu, NULL);
  pthread_cond_init(&pool.cv, NULL);
  atomic_store(&pool.sleeping, 0);
  pool.started = 0;
  atomic_flag_clear(&pool.busy); /* held, if at all, by a parent thread that is not here */
}

/* once, when the library is loaded (not on parallel_for's path, which runs ~100 times a token) */
__attribute__((constructor)) static void pool_register_atfork(void) {
  pthread_atfork(NULL, NULL, pool_reset_in_child);
}

void parallel_for(int64_t n, int64_t grain, parallel_fn fn, void *arg) {
  if (n <= 0) return;
  const int threads = edge_vila_get_threads();
  int64_t chunks = (n + grain - 1) / grain;
  if (chunks > 4 * threads) chunks = 4 * threads; /* a few per thread: uneven cores even out */
  if (threads == 1 || chunks <= 1 || atomic_flag_test_and_set_explicit(&pool.busy, memory_order_acquire)) {
    fn(arg, 0, n); /* one thread, one chunk, or the pool is busy with another session's op */
    return;
  }
  while (pool.started < threads - 1) { /* under `busy`: only one caller starts workers */
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int ok = pthread_create(&t, &attr, worker, (void *)(intptr_t)(pool.started + 1)) == 0;
    pthread_attr_destroy(&attr);
    if (!ok) break;
    pool.started++;
  }
  if (pool.started == 0) {
    atomic_flag_clear_explicit(&pool.busy, memory_order_release);
    fn(arg, 0, n);
    return;
  }
  const unsigned id = atomic_load(&pool.gen) + 1;
  pool.fn = fn;
  pool.arg = arg;
  pool.n = n;
  pool.chunk = (n + chunks - 1) / chunks;
  chunks = (n + pool.chunk - 1) / pool.chunk;
  atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
  atomic_store_explicit(&pool.claim, ((unsigned long long)(id & 0xFFFFFF) << 40) | ((unsigned long long)chunks << 20),
                        memory_order_release);
  atomic_store(&pool.gen, id); /* seq_cst with the load of `sleeping` below (a sleeper sees it or is woken) */
  if (atomic_load(&pool.sleeping) > 0) {
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
  }
  run_chunks(id);
  while (atomic_load_explicit(&pool.done, memory_order_acquire) < chunks) cpu_relax();
  atomic_flag_clear_explicit(&pool.busy, memory_order_release);
}

/* Kernels: each op has plain C loops (portable) and SIMD paths, compiled where the compiler
 * targets the ISA (-march=native: this CPU's) and used only where the CPU reports it at run time
 * (a library cross-built with fixed flags may land on a smaller core). The best available one
 * runs unless edge_vila_use_kernel() forces another (tests, benchmarks, the build's calibration). */
static int cpu_kernels(void) {
  int k = EV_PORTABLE;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(__AVX2__) && defined(__FMA__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) k |= EV_AVX2;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"))
    k |= EV_AVX512;
#endif
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
  if (getauxval(AT_HWCAP) & EV_HWCAP_ASIMDDP) k |= EV_NEON;
#endif
  return k;
}

static atomic_int forced; /* 0: the best available */

__attribute__((visibility("default"))) int edge_vila_kernels(void) {
  static atomic_int mask;
  if (!atomic_load(&mask)) atomic_store(&mask, cpu_kernels());
  return atomic_load(&mask);
}

/* force kernel `k` (one EV_* bit) or 0 for the best; returns the kernel now in force, or -1
 * (nothing changed) when `k` is not available here */
__attribute__((visibility("default"))) int edge_vila_use_kernel(int k) {
  if (k && (k & (k - 1) || !(k & edge_vila_kernels()))) return -1;
  atomic_store(&forced, k);
  return ev_kernel();
}

__attribute__((visibility("default"))) int edge_vila_kernel_in_force(void) { return ev_kernel(); }

int ev_kernel(void) {
  const int f = atomic_load_explicit(&forced, memory_order_relaxed);
  if (f) return f;
  const int m = edge_vila_kernels();
  return m & EV_AVX512 ? EV_AVX512 : m & EV_AVX2 ? EV_AVX2 : m & EV_NEON ? EV_NEON : EV_PORTABLE;
}

/* The entry point ORT looks up in a custom-op library (SessionOptions.register_custom_ops_library). */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  edge_vila_api = base->GetApi(16);
  if (!edge_vila_api) return NULL; /* an ORT older than 1.16: no status can be made; session creation then fails on the op */
  OrtCustomOpDomain *domain = NULL;
  OrtStatus *st = CALL(SLOT_CreateCustomOpDomain, OrtStatus *(*)(const char *, OrtCustomOpDomain **))("edge_vila", &domain);
  typedef OrtStatus *(*Add)(OrtCustomOpDomain *, const OrtCustomOp *);
  if (!st) st = CALL(SLOT_CustomOpDomain_Add, Add)(domain, &edge_vila_decode_attention_op);
  if (!st) st = CALL(SLOT_CustomOpDomain_Add, Add)(domain, &edge_vila_int4_linear_op);
  if (!st) st = CALL(SLOT_CustomOpDomain_Add, Add)(domain, &edge_vila_int8_linear_op);
  if (!st) st = CALL(SLOT_AddCustomOpDomain, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))(options, domain);
  return st;
}
