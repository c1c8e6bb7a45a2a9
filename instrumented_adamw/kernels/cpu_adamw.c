/*
 * Single-pass AdamW step on CPU for InstrumentedAdamW: the update of torch's fused CPU AdamW
 * (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, ADAMW mode) and, in the same read of p, g, m, v, the three
 * force reductions <W,u>, |u|^2, |W|^2 of every tracked tensor (W before the step, u = m_hat / (sqrt(v_hat) + eps)).
 *
 * Bitwise equality with torch: torch's kernel does the arithmetic below in the parameter's dtype, but the binary
 * it ships rounds some products once (a fused multiply-add chosen by the C++ compiler that built it) and others
 * twice, and its vectorised body and its scalar tail (the last numel % width elements of a tensor) made different
 * choices. Each site where that can happen is a "variant" here: the lerp of the first moment, the update of the
 * second moment, and decay + step. This file is compiled with -ffp-contract=off, so every product is rounded
 * exactly as the variant says; cpu_adamw.py finds the variants the installed torch uses by running its kernel on
 * probe data, and only uses this kernel where every probe matches bit for bit.
 *
 * Reductions are accumulated in double, in blocks of BLOCK elements whose partial sums are added in a fixed order
 * after the parallel loop: the result does not depend on the number of threads.
 *
 * iadamw_reduce3_*: the same three reductions of a given W and u in one read of both (InstrumentedMuon's O, and
 * every CPU path that has u in hand), where torch would take three passes and a temporary.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define IADAMW_ABI 2
/* Elements per work item. A multiple of every vector width torch uses, so blocks never split its vectors. */
#define BLOCK 8192

typedef struct {
  int64_t k;                     /* tensors */
  void *const *param;            /* k data pointers each; max_exp_avg_sq is NULL unless amsgrad */
  void *const *grad;
  void *const *exp_avg;
  void *const *exp_avg_sq;
  void *const *max_exp_avg_sq;
  const int64_t *numel;
  const double *step;            /* each tensor's step count after this step's increment */
  const uint8_t *tracked;        /* 1: compute the reductions of this tensor */
  double *out;                   /* [k][3]: <W,u>, |u|^2, |W|^2; zero for untracked tensors */
  double lr, beta1, beta2, weight_decay, eps;
  int32_t amsgrad, maximize;
  int32_t body_variant;          /* rounding variant of torch's vectorised loop, 0..11 (see VARIANT below) */
  int32_t tail_variant;          /* and of its scalar tail */
  int64_t tail_width;            /* the last numel % tail_width elements of each tensor take the tail variant */
  int32_t threads;
} iadamw_args;

/* variant = lerp + 2 * second_moment + 6 * decay_step:
 *   lerp         0: base + coeff * (g - m)               1: fma(coeff, g - m, base)
 *   second_moment 0: v * b2 + (c2 * g) * g                1: fma(c2 * g, g, v * b2)    2: fma(v, b2, (c2 * g) * g)
 *   decay_step   0: p * (1 - lr * wd) + x                 1: fma(p, 1 - lr * wd, x)     with x = (-step_size * m) / d
 */
#define N_VARIANTS 12

int iadamw_abi(void) { return IADAMW_ABI; }

/* One element. LERP, VM, PF: the variant's three choices; MAXNAN: torch's vectorised maximum (NaN wins) or
 * std::max of its scalar tail; TR: accumulate the reductions. */
#define IADAMW_ELEM(T, FMA, SQRT, LERP, VM, PF, AMS, MAXNAN, TR)                                            \
  {                                                                                                          \
    const T w = p[i];                                                                                        \
    const T gr = g[i] * sgn;                                                                                 \
    const T mo = m[i];                                                                                       \
    const T base = small ? mo : gr;                                                                          \
    const T diff = gr - mo;                                                                                  \
    const T mn = (LERP) ? FMA(coeff, diff, base) : base + coeff * diff;                                      \
    const T c2g = c2 * gr;                                                                                   \
    const T vn = (VM) == 2 ? FMA(v[i], b2, c2g * gr) : ((VM) == 1 ? FMA(c2g, gr, v[i] * b2)                \
                                                                   : v[i] * b2 + c2g * gr);                  \
    m[i] = mn;                                                                                               \
    v[i] = vn;                                                                                               \
    T vh = vn;                                                                                               \
    if (AMS) {                                                                                               \
      const T o = vm[i];                                                                                     \
      vh = (MAXNAN) ? ((o != o || vn != vn) ? (T)NAN : (o > vn ? o : vn)) : (o < vn ? vn : o);              \
      vm[i] = vh;                                                                                            \
    }                                                                                                        \
    const T d = SQRT(vh) / bc2s + epsv;                                                                      \
    const T x = (nss * mn) / d;                                                                              \
    p[i] = (PF) ? FMA(w, wdf, x) : w * wdf + x;                                                              \
    if (TR) {                                                                                                \
      const double u = (double)(mn / d), wd64 = (double)w;                                                   \
      wu += wd64 * u;                                                                                        \
      uu += u * u;                                                                                           \
      ww += wd64 * wd64;                                                                                     \
    }                                                                                                        \
  }

/* Loop-invariant values of one tensor, in the parameter's dtype, as torch's kernel forms them. */
#define IADAMW_CTX(T)                                                                                        \
  typedef struct {                                                                                           \
    T *p, *g, *m, *v, *vm;                                                                                   \
    T wdf, sgn, coeff, b2, c2, bc2s, epsv, nss;                                                              \
    int small;                                                                                               \
  } ctx_##T;

IADAMW_CTX(float)
IADAMW_CTX(double)

#define IADAMW_UNPACK(T)                                                                                     \
  T *restrict p = c->p, *restrict g = c->g, *restrict m = c->m, *restrict v = c->v, *restrict vm = c->vm;    \
  const T wdf = c->wdf, sgn = c->sgn, coeff = c->coeff, b2 = c->b2, c2 = c->c2, bc2s = c->bc2s;              \
  const T epsv = c->epsv, nss = c->nss;                                                                      \
  const int small = c->small;                                                                                \
  double wu = 0.0, uu = 0.0, ww = 0.0;                                                                       \
  (void)vm;

#define IADAMW_STORE_ACC                                                                                     \
  acc[0] += wu;                                                                                              \
  acc[1] += uu;                                                                                              \
  acc[2] += ww;

/* The vectorised body: one function per (dtype, variant, amsgrad, tracked). */
#define IADAMW_BODY(T, FMA, SQRT, L, V, P, AMS, TR)                                                          \
  static void body_##T##_##L##V##P##_##AMS##TR(const ctx_##T *c, int64_t s, int64_t e, double *acc) {       \
    IADAMW_UNPACK(T)                                                                                         \
    _Pragma("omp simd reduction(+ : wu, uu, ww)") for (int64_t i = s; i < e; i++)                            \
        IADAMW_ELEM(T, FMA, SQRT, L, V, P, AMS, 1, TR) IADAMW_STORE_ACC                                     \
  }

#define IADAMW_BODY4(T, FMA, SQRT, L, V, P)                                                                  \
  IADAMW_BODY(T, FMA, SQRT, L, V, P, 0, 0)                                                                   \
  IADAMW_BODY(T, FMA, SQRT, L, V, P, 0, 1)                                                                   \
  IADAMW_BODY(T, FMA, SQRT, L, V, P, 1, 0)                                                                   \
  IADAMW_BODY(T, FMA, SQRT, L, V, P, 1, 1)

#define IADAMW_BODIES(T, FMA, SQRT)                                                                          \
  IADAMW_BODY4(T, FMA, SQRT, 0, 0, 0)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 1, 0, 0)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 0, 1, 0)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 1, 1, 0)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 0, 2, 0)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 1, 2, 0)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 0, 0, 1)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 1, 0, 1)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 0, 1, 1)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 1, 1, 1)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 0, 2, 1)                                                                        \
  IADAMW_BODY4(T, FMA, SQRT, 1, 2, 1)

IADAMW_BODIES(float, fmaf, sqrtf)
IADAMW_BODIES(double, fma, sqrt)

#define IADAMW_ROW(T, L, V, P)                                                                               \
  {{body_##T##_##L##V##P##_00, body_##T##_##L##V##P##_01}, {body_##T##_##L##V##P##_10, body_##T##_##L##V##P##_11}}

/* Indexed [variant][amsgrad][tracked], variant = lerp + 2 * second_moment + 6 * decay_step. */
#define IADAMW_TABLE(T)                                                                                      \
  typedef void (*body_fn_##T)(const ctx_##T *, int64_t, int64_t, double *);                                 \
  static const body_fn_##T bodies_##T[N_VARIANTS][2][2] = {                                                 \
      IADAMW_ROW(T, 0, 0, 0), IADAMW_ROW(T, 1, 0, 0), IADAMW_ROW(T, 0, 1, 0), IADAMW_ROW(T, 1, 1, 0),        \
      IADAMW_ROW(T, 0, 2, 0), IADAMW_ROW(T, 1, 2, 0), IADAMW_ROW(T, 0, 0, 1), IADAMW_ROW(T, 1, 0, 1),        \
      IADAMW_ROW(T, 0, 1, 1), IADAMW_ROW(T, 1, 1, 1), IADAMW_ROW(T, 0, 2, 1), IADAMW_ROW(T, 1, 2, 1)};

IADAMW_TABLE(float)
IADAMW_TABLE(double)

/* The scalar tail, with the variant as run-time flags (a few elements per tensor; also what the probes in
 * cpu_adamw.py run, with tail_width larger than every tensor, to find the body's variant). */
#define IADAMW_TAIL(T, FMA, SQRT)                                                                            \
  static void tail_##T(const ctx_##T *c, int64_t s, int64_t e, int variant, int ams, int tr, double *acc) {  \
    IADAMW_UNPACK(T)                                                                                         \
    const int lerp = variant % 2, vmode = (variant / 2) % 3, pf = variant / 6;                              \
    for (int64_t i = s; i < e; i++) IADAMW_ELEM(T, FMA, SQRT, lerp, vmode, pf, ams, 0, tr)                  \
    IADAMW_STORE_ACC                                                                                         \
  }

IADAMW_TAIL(float, fmaf, sqrtf)
IADAMW_TAIL(double, fma, sqrt)

typedef struct {
  int64_t tensor, start, end;
} work_item;

/* The step over all tensors of one dtype. Returns 0, or 1 if scratch memory could not be allocated (nothing has
 * been touched then), or 2 for a variant out of range. */
#define IADAMW_STEP(T, SQRT)                                                                                 \
  int iadamw_step_##T(const iadamw_args *a) {                                                                \
    if (a->body_variant < 0 || a->body_variant >= N_VARIANTS || a->tail_variant < 0 ||                      \
        a->tail_variant >= N_VARIANTS || a->tail_width < 1)                                                  \
      return 2;                                                                                              \
    int64_t n_items = 0;                                                                                     \
    for (int64_t t = 0; t < a->k; t++) n_items += (a->numel[t] + BLOCK - 1) / BLOCK;                         \
    work_item *items = malloc(sizeof(work_item) * (size_t)(n_items > 0 ? n_items : 1));                      \
    double *partial = calloc((size_t)(n_items > 0 ? n_items : 1) * 3, sizeof(double));                       \
    ctx_##T *ctx = malloc(sizeof(ctx_##T) * (size_t)(a->k > 0 ? a->k : 1));                                  \
    if (!items || !partial || !ctx) {                                                                        \
      free(items);                                                                                           \
      free(partial);                                                                                         \
      free(ctx);                                                                                             \
      return 1;                                                                                              \
    }                                                                                                        \
    const T lw = (T)(1.0 - a->beta1);                                                                        \
    const int small = (lw < 0 ? -lw : lw) < (T)0.5;                                                          \
    int64_t j = 0;                                                                                           \
    for (int64_t t = 0; t < a->k; t++) {                                                                     \
      /* As torch's kernel: bias corrections in double from the step read as a float. */                   \
      const double bc1 = 1.0 - pow(a->beta1, a->step[t]);                                                    \
      const double bc2 = 1.0 - pow(a->beta2, a->step[t]);                                                    \
      ctx_##T *c = &ctx[t];                                                                                  \
      c->p = (T *)a->param[t];                                                                               \
      c->g = (T *)a->grad[t];                                                                                \
      c->m = (T *)a->exp_avg[t];                                                                             \
      c->v = (T *)a->exp_avg_sq[t];                                                                          \
      c->vm = a->amsgrad ? (T *)a->max_exp_avg_sq[t] : NULL;                                                 \
      c->wdf = a->weight_decay != 0.0 ? (T)(1.0 - a->lr * a->weight_decay) : (T)1;                           \
      c->sgn = a->maximize ? (T)-1 : (T)1;                                                                   \
      c->coeff = small ? lw : lw - (T)1;                                                                     \
      c->small = small;                                                                                      \
      c->b2 = (T)a->beta2;                                                                                   \
      c->c2 = (T)(1.0 - a->beta2);                                                                           \
      c->bc2s = (T)sqrt(bc2);                                                                                \
      c->epsv = (T)a->eps;                                                                                   \
      c->nss = (T)(-(a->lr / bc1));                                                                          \
      for (int64_t s = 0; s < a->numel[t]; s += BLOCK) {                                                     \
        items[j].tensor = t;                                                                                 \
        items[j].start = s;                                                                                  \
        items[j].end = s + BLOCK < a->numel[t] ? s + BLOCK : a->numel[t];                                    \
        j++;                                                                                                 \
      }                                                                                                      \
    }                                                                                                        \
    const body_fn_##T *body = bodies_##T[a->body_variant][a->amsgrad != 0];                                  \
    _Pragma("omp parallel for schedule(static) num_threads(a->threads > 0 ? a->threads : 1)")                \
    for (int64_t i = 0; i < n_items; i++) {                                                                  \
      const int64_t t = items[i].tensor, s = items[i].start, e = items[i].end;                               \
      const int tr = a->tracked[t] != 0;                                                                     \
      const int64_t split = a->numel[t] - a->numel[t] % a->tail_width;                                       \
      const int64_t mid = e < split ? e : (s > split ? s : split);                                           \
      double *acc = &partial[3 * i];                                                                         \
      if (mid > s) body[tr](&ctx[t], s, mid, acc);                                                           \
      if (e > mid) tail_##T(&ctx[t], mid, e, a->tail_variant, a->amsgrad != 0, tr, acc);                     \
    }                                                                                                        \
    for (int64_t t = 0; t < 3 * a->k; t++) a->out[t] = 0.0;                                                  \
    for (int64_t i = 0; i < n_items; i++) {                                                                  \
      double *o = &a->out[3 * items[i].tensor];                                                              \
      o[0] += partial[3 * i];                                                                                \
      o[1] += partial[3 * i + 1];                                                                            \
      o[2] += partial[3 * i + 2];                                                                            \
    }                                                                                                        \
    for (int64_t t = 0; t < a->k; t++) { /* u = m_hat / (sqrt(v_hat) + eps): divide by bias correction 1 */ \
      const double bc1 = 1.0 - pow(a->beta1, a->step[t]);                                                    \
      a->out[3 * t] /= bc1;                                                                                  \
      a->out[3 * t + 1] /= bc1 * bc1;                                                                        \
    }                                                                                                        \
    free(items);                                                                                             \
    free(partial);                                                                                           \
    free(ctx);                                                                                               \
    return 0;                                                                                                \
  }

IADAMW_STEP(float, sqrtf)
IADAMW_STEP(double, sqrt)

/* <w,u>, |u|^2, |w|^2 of two contiguous arrays of n elements into out[0..2], accumulated in double (the products
 * of two floats are exact in double) in blocks summed in a fixed order. Returns 0, or 1 without scratch memory. */
#define IADAMW_REDUCE3(T)                                                                                    \
  int iadamw_reduce3_##T(const T *restrict w, const T *restrict u, int64_t n, double *out, int32_t threads) { \
    const int64_t nb = (n + BLOCK - 1) / BLOCK;                                                              \
    double local[3 * 8];                                                                                     \
    double *partial = nb <= 8 ? local : malloc(sizeof(double) * 3 * (size_t)nb);                             \
    if (!partial) return 1;                                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(threads > 0 && nb > 1 ? threads : 1)")            \
    for (int64_t b = 0; b < nb; b++) {                                                                       \
      const int64_t s = b * BLOCK, e = s + BLOCK < n ? s + BLOCK : n;                                        \
      double wu = 0.0, uu = 0.0, ww = 0.0;                                                                   \
      _Pragma("omp simd reduction(+ : wu, uu, ww)") for (int64_t i = s; i < e; i++) {                        \
        const double a = (double)w[i], c = (double)u[i];                                                     \
        wu += a * c;                                                                                         \
        uu += c * c;                                                                                         \
        ww += a * a;                                                                                         \
      }                                                                                                      \
      partial[3 * b] = wu;                                                                                   \
      partial[3 * b + 1] = uu;                                                                               \
      partial[3 * b + 2] = ww;                                                                               \
    }                                                                                                        \
    out[0] = out[1] = out[2] = 0.0;                                                                          \
    for (int64_t b = 0; b < nb; b++) {                                                                       \
      out[0] += partial[3 * b];                                                                              \
      out[1] += partial[3 * b + 1];                                                                          \
      out[2] += partial[3 * b + 2];                                                                          \
    }                                                                                                        \
    if (partial != local) free(partial);                                                                     \
    return 0;                                                                                                \
  }

IADAMW_REDUCE3(float)
IADAMW_REDUCE3(double)
