/*
 * hwcompress NPU stub simulator: interprets a version-1 command stream
 * (docs/npu-command-stream.md) in integer arithmetic, bit-exact with
 * hwcompress/codegen/npu/reference.py.
 *
 * Portable C99 that is also valid C++: TVM's export_library compiles ".c" sources with
 * the C++ compiler, and the same file is cross-compiled for aarch64. No dependency but
 * the TVM FFI C ABI header (tvm/ffi/c_api.h, which brings dlpack.h; as C it needs C11
 * for its anonymous unions).
 * runtime.py appends, per external function, the embedded stream and an exported
 * __tvm_ffi_<symbol> that calls hwc_npu_invoke.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

#define HWC_NPU_HEADER 40
#define HWC_NPU_TENSOR 32
#define HWC_NPU_MAX_FIELDS 32

typedef struct {
  int dtype, kind, rank; /* dtype 1 = int8, 2 = int32; kind 1 = constant */
  int32_t zp;
  int64_t dims[4], numel;
  const uint8_t* data; /* constants: inside the stream */
} hwc_tensor;

typedef struct {
  const uint8_t* s;
  size_t size;
  uint32_t flags, nt, ni, no, nc, data_off, data_size;
  const uint8_t *inputs, *outputs, *cmds;
  hwc_tensor* t;
  int8_t** buf;  /* activation buffers by tensor id; NULL until written */
  int8_t** ext;  /* caller's buffers of the program inputs and outputs */
  char* owned;   /* buf[i] was allocated here (intermediate tensors) */
  char* err;
} hwc_prog;

/* The stream is little-endian whatever the host: read byte by byte (also no alignment). */
static uint32_t hwc_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static int32_t hwc_i32(const uint8_t* p) {
  uint32_t u = hwc_u32(p);
  return u <= 0x7fffffffu ? (int32_t)u : (int32_t)(u - 0x80000000u) - 0x7fffffff - 1;
}
static uint16_t hwc_u16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* floor(x / 2^s): '>>' on negative signed values is implementation-defined in C99. */
static int64_t hwc_floor_shift(int64_t x, int s) {
  return x >= 0 ? (x >> s) : -(((-(x + 1)) >> s)) - 1;
}
static int64_t hwc_round_shift(int64_t x, int s) {
  return s > 0 ? hwc_floor_shift(x + ((int64_t)1 << (s - 1)), s) : x;
}
static int64_t hwc_floor_div(int64_t a, int64_t b) { /* b > 0 */
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
static int64_t hwc_clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

static int hwc_fail(hwc_prog* p, const char* msg, long a) {
  snprintf(p->err, 256, msg, a);
  return -1;
}

/* Element i of an int32 constant of length 1 (broadcast) or more. */
static int64_t hwc_const32(const hwc_tensor* t, int64_t i) {
  return hwc_i32(t->data + 4 * (t->numel == 1 ? 0 : i));
}

static int hwc_parse(hwc_prog* p) {
  const uint8_t* s = p->s;
  uint32_t i, pos;
  if (p->size < HWC_NPU_HEADER || memcmp(s, "HWNP", 4) != 0) return hwc_fail(p, "npu: bad magic (%ld)", 0);
  if (hwc_u16(s + 4) != 1 || hwc_u16(s + 6) > 0) return hwc_fail(p, "npu: unsupported stream version %ld", hwc_u16(s + 4));
  p->flags = hwc_u32(s + 8);
  if (hwc_u32(s + 12) != p->size) return hwc_fail(p, "npu: stream size mismatch (%ld)", (long)p->size);
  p->nt = hwc_u32(s + 16); p->ni = hwc_u32(s + 20); p->no = hwc_u32(s + 24); p->nc = hwc_u32(s + 28);
  p->data_off = hwc_u32(s + 32); p->data_size = hwc_u32(s + 36);
  if ((uint64_t)p->data_off + p->data_size > p->size || p->nt > (1u << 20) || p->ni + p->no > p->nt ||
      HWC_NPU_HEADER + 4ull * (p->ni + p->no) + (uint64_t)HWC_NPU_TENSOR * p->nt > p->data_off)
    return hwc_fail(p, "npu: truncated stream (%ld)", (long)p->size);
  p->inputs = s + HWC_NPU_HEADER;
  p->outputs = p->inputs + 4 * p->ni;
  pos = HWC_NPU_HEADER + 4 * (p->ni + p->no);
  p->t = (hwc_tensor*)calloc(p->nt ? p->nt : 1, sizeof(hwc_tensor));
  p->buf = (int8_t**)calloc(p->nt ? p->nt : 1, sizeof(int8_t*));
  p->ext = (int8_t**)calloc(p->nt ? p->nt : 1, sizeof(int8_t*));
  p->owned = (char*)calloc(p->nt ? p->nt : 1, 1);
  if (!p->t || !p->buf || !p->ext || !p->owned) return hwc_fail(p, "npu: out of memory (%ld)", 0);
  for (i = 0; i < p->nt; ++i, pos += HWC_NPU_TENSOR) {
    hwc_tensor* t = &p->t[i];
    int d;
    t->dtype = s[pos]; t->kind = s[pos + 1]; t->rank = s[pos + 2];
    t->zp = hwc_i32(s + pos + 4);
    if (t->rank < 1 || t->rank > 4 || (t->dtype != 1 && t->dtype != 2)) return hwc_fail(p, "npu: tensor %ld: bad rank/dtype", (long)i);
    t->numel = 1;
    for (d = 0; d < 4; ++d) {
      t->dims[d] = d < t->rank ? hwc_u32(s + pos + 8 + 4 * d) : 1;
      t->numel *= t->dims[d];
    }
    if (t->numel < 1 || t->numel > ((int64_t)1 << 40)) return hwc_fail(p, "npu: tensor %ld: bad shape", (long)i);
    if (t->kind == 1) {
      uint32_t off = hwc_u32(s + pos + 24), sz = hwc_u32(s + pos + 28);
      if ((uint64_t)off + sz > p->data_size || (int64_t)sz != t->numel * (t->dtype == 1 ? 1 : 4))
        return hwc_fail(p, "npu: tensor %ld: constant out of bounds", (long)i);
      t->data = s + p->data_off + off;
    } else if (t->dtype != 1) {
      return hwc_fail(p, "npu: tensor %ld: activations must be int8", (long)i);
    }
  }
  p->cmds = s + pos;
  return 0;
}

/* Checks a tensor id: in range, of the given kind (-1: any) and rank (0: any). */
static int hwc_id(hwc_prog* p, int32_t id, int kind, int rank) {
  if (id < 0 || (uint32_t)id >= p->nt) return 0;
  if (kind >= 0 && p->t[id].kind != kind) return 0;
  if (rank && p->t[id].rank != rank) return 0;
  return kind == 1 || p->buf[id] != NULL; /* activations must have been written */
}

static int hwc_output(hwc_prog* p, int32_t id, int64_t n, int64_t h, int64_t w, int64_t c, int rank) {
  hwc_tensor* t;
  if (id < 0 || (uint32_t)id >= p->nt || p->t[id].kind != 0 || p->t[id].rank != rank) return 0;
  t = &p->t[id];
  if (rank == 4 ? (t->dims[0] != n || t->dims[1] != h || t->dims[2] != w || t->dims[3] != c)
                : (t->dims[0] != n || t->dims[1] != c))
    return 0;
  if (p->buf[id]) return 0; /* each activation is written once, inputs never */
  p->buf[id] = p->ext[id];
  if (!p->buf[id]) {
    p->buf[id] = (int8_t*)malloc((size_t)t->numel);
    p->owned[id] = 1;
  }
  return p->buf[id] != NULL;
}

/* CONV2D (depthwise = groups == C_in) and DENSE (a 1x1 "conv" on [N, 1, 1, C]). */
static int hwc_conv(hwc_prog* p, const int32_t* f, int dense) {
  int32_t in = f[0], wt = f[1], bias = f[2], mul = f[3], sh = f[4], out = f[5];
  int32_t strh = 1, strw = 1, pt = 0, pl = 0, pb = 0, pr = 0, dh = 1, dw = 1, g = 1, lo, hi;
  int64_t n, H, W, C, CO, KH = 1, KW = 1, CIG, OH, OW, b, oh, ow, oc, i, j, ic;
  const hwc_tensor *x, *w;
  if (!dense) { strh = f[6]; strw = f[7]; pt = f[8]; pl = f[9]; pb = f[10]; pr = f[11]; dh = f[12]; dw = f[13]; g = f[14]; }
  lo = f[dense ? 6 : 15]; hi = f[dense ? 7 : 16];
  if (!hwc_id(p, in, 0, dense ? 0 : 4) || (dense && p->t[in].rank != 2 && p->t[in].rank != 4) || !hwc_id(p, wt, 1, dense ? 2 : 4) || !hwc_id(p, mul, 1, 0) ||
      !hwc_id(p, sh, 1, 0) || (bias != -1 && !hwc_id(p, bias, 1, 0)))
    return hwc_fail(p, "npu: conv/dense: bad tensor ids (output %ld)", (long)out);
  x = &p->t[in]; w = &p->t[wt];
  /* dense reads an NHWC input as [N, H * W * C] */
  n = x->dims[0]; H = dense ? 1 : x->dims[1]; W = dense ? 1 : x->dims[2]; C = dense ? x->numel / n : x->dims[3];
  CO = w->dims[0];
  if (!dense) { KH = w->dims[1]; KW = w->dims[2]; }
  CIG = w->dims[dense ? 1 : 3];
  if (g < 1 || strh < 1 || strw < 1 || dh < 1 || dw < 1 || pt < 0 || pl < 0 || pb < 0 || pr < 0 ||
      C % g || CO % g || CIG != C / g || w->dtype != 1 || w->zp != 0)
    return hwc_fail(p, "npu: conv/dense: bad parameters (output %ld)", (long)out);
  if ((bias != -1 && (p->t[bias].dtype != 2 || p->t[bias].numel != CO)) || p->t[mul].dtype != 2 ||
      p->t[sh].dtype != 2 || (p->t[mul].numel != 1 && p->t[mul].numel != CO) || p->t[mul].numel != p->t[sh].numel)
    return hwc_fail(p, "npu: conv/dense: bad bias/requant constants (output %ld)", (long)out);
  OH = (H + pt + pb - dh * (KH - 1) - 1) / strh + 1;
  OW = (W + pl + pr - dw * (KW - 1) - 1) / strw + 1;
  if (H + pt + pb - dh * (KH - 1) < 1 || W + pl + pr - dw * (KW - 1) < 1 ||
      !hwc_output(p, out, n, OH, OW, CO, dense ? 2 : 4))
    return hwc_fail(p, "npu: conv/dense: bad output tensor %ld", (long)out);
  {
    const int8_t* X = p->buf[in];
    const int8_t* Wd = (const int8_t*)w->data;
    int8_t* Y = p->buf[out];
    int64_t zx = x->zp, zy = p->t[out].zp, cog = CO / g;
    for (oc = 0; oc < CO; ++oc) {
      int64_t m = hwc_const32(&p->t[mul], oc), s = hwc_const32(&p->t[sh], oc);
      int64_t bv = bias == -1 ? 0 : hwc_const32(&p->t[bias], oc), c0 = (oc / cog) * CIG;
      if (m < 0 || m > 0x7fffffff || s < 0 || s > 62)
        return hwc_fail(p, "npu: requant parameters out of range (channel %ld)", (long)oc);
      for (b = 0; b < n; ++b)
        for (oh = 0; oh < OH; ++oh)
          for (ow = 0; ow < OW; ++ow) {
            int64_t acc = bv;
            for (i = 0; i < KH; ++i) {
              int64_t ih = oh * strh - pt + i * dh;
              if (ih < 0 || ih >= H) continue; /* padding holds the zero point: adds 0 */
              for (j = 0; j < KW; ++j) {
                int64_t iw = ow * strw - pl + j * dw;
                const int8_t *xp, *wp;
                if (iw < 0 || iw >= W) continue;
                xp = X + ((b * H + ih) * W + iw) * C + c0;
                wp = Wd + ((oc * KH + i) * KW + j) * CIG;
                for (ic = 0; ic < CIG; ++ic) acc += ((int64_t)xp[ic] - zx) * wp[ic];
              }
            }
            acc = hwc_clamp(acc, -2147483647 - 1, 2147483647); /* the int32 accumulator saturates */
            Y[((b * OH + oh) * OW + ow) * CO + oc] = (int8_t)hwc_clamp(zy + hwc_round_shift(acc * m, (int)s), lo, hi);
          }
    }
  }
  return 0;
}

static int hwc_pool(hwc_prog* p, const int32_t* f, int avg) {
  int32_t in = f[0], out = f[1], kh = f[2], kw = f[3], strh = f[4], strw = f[5];
  int32_t pt = f[6], pl = f[7], pb = f[8], pr = f[9], lo = f[10], hi = f[11], incl = avg ? f[12] : 0;
  int64_t n, H, W, C, OH, OW, b, oh, ow, c, i, j;
  if (!hwc_id(p, in, 0, 4)) return hwc_fail(p, "npu: pool: bad input tensor (output %ld)", (long)out);
  n = p->t[in].dims[0]; H = p->t[in].dims[1]; W = p->t[in].dims[2]; C = p->t[in].dims[3];
  if (kh < 1 || kw < 1 || strh < 1 || strw < 1 || pt < 0 || pl < 0 || pb < 0 || pr < 0 || pt >= kh ||
      pb >= kh || pl >= kw || pr >= kw || H + pt + pb < kh || W + pl + pr < kw)
    return hwc_fail(p, "npu: pool: bad parameters (output %ld)", (long)out);
  OH = (H + pt + pb - kh) / strh + 1;
  OW = (W + pl + pr - kw) / strw + 1;
  if (!hwc_output(p, out, n, OH, OW, C, 4) || p->t[out].zp != p->t[in].zp)
    return hwc_fail(p, "npu: pool: bad output tensor %ld", (long)out);
  {
    const int8_t* X = p->buf[in];
    int8_t* Y = p->buf[out];
    int64_t zx = p->t[in].zp;
    for (b = 0; b < n; ++b)
      for (oh = 0; oh < OH; ++oh)
        for (ow = 0; ow < OW; ++ow)
          for (c = 0; c < C; ++c) {
            int64_t best = -129, sum = 0, count = 0, y;
            for (i = 0; i < kh; ++i) {
              int64_t ih = oh * strh - pt + i;
              if (ih < 0 || ih >= H) continue;
              for (j = 0; j < kw; ++j) {
                int64_t iw = ow * strw - pl + j, v;
                if (iw < 0 || iw >= W) continue;
                v = X[((b * H + ih) * W + iw) * C + c];
                best = v > best ? v : best;
                sum += v - zx;
                ++count;
              }
            }
            if (avg) {
              if (incl) count = (int64_t)kh * kw;
              y = zx + hwc_floor_div(sum + count / 2, count); /* round half up */
            } else {
              y = best;
            }
            Y[((b * OH + oh) * OW + ow) * C + c] = (int8_t)hwc_clamp(y, lo, hi);
          }
  }
  return 0;
}

static int hwc_add(hwc_prog* p, const int32_t* f) {
  int32_t a = f[0], bb = f[1], out = f[2], s = f[5], lo = f[6], hi = f[7];
  int64_t ma = f[3], mb = f[4], i, za, zb, zy;
  const hwc_tensor* ta;
  if (!hwc_id(p, a, 0, 0) || !hwc_id(p, bb, 0, 0) || ma < 0 || mb < 0 || s < 0 || s > 62)
    return hwc_fail(p, "npu: add: bad inputs or requant parameters (output %ld)", (long)out);
  ta = &p->t[a];
  if (memcmp(ta->dims, p->t[bb].dims, sizeof ta->dims) != 0 || ta->rank != p->t[bb].rank ||
      !hwc_output(p, out, ta->dims[0], ta->dims[1], ta->dims[2], ta->rank == 4 ? ta->dims[3] : ta->dims[1], ta->rank) ||
      (ta->rank != 2 && ta->rank != 4))
    return hwc_fail(p, "npu: add: shape mismatch (output %ld)", (long)out);
  za = ta->zp; zb = p->t[bb].zp; zy = p->t[out].zp;
  for (i = 0; i < ta->numel; ++i) {
    int64_t acc = ((int64_t)p->buf[a][i] - za) * ma + ((int64_t)p->buf[bb][i] - zb) * mb;
    p->buf[out][i] = (int8_t)hwc_clamp(zy + hwc_round_shift(acc, s), lo, hi);
  }
  return 0;
}

static int hwc_exec(hwc_prog* p) {
  const uint8_t* c = p->cmds;
  const uint8_t* end = p->s + p->data_off;
  uint32_t k, i;
  for (k = 0; k < p->nc; ++k) {
    int32_t f[HWC_NPU_MAX_FIELDS];
    uint16_t op, nf;
    int rc;
    static const uint16_t expected[6] = {0, 17, 8, 12, 13, 8};
    static const int act_at[6] = {0, 15, 6, 10, 10, 6};
    if (c + 4 > end) return hwc_fail(p, "npu: truncated command %ld", (long)k);
    op = hwc_u16(c); nf = hwc_u16(c + 2);
    if (op < 1 || op > 5 || nf != expected[op] || c + 4 + 4 * nf > end)
      return hwc_fail(p, "npu: bad or truncated command %ld", (long)k);
    for (i = 0; i < nf; ++i) f[i] = hwc_i32(c + 4 + 4 * i);
    c += 4 + 4 * nf;
    /* act_min, act_max: where they sit in each opcode's fields */
    if (f[act_at[op]] < -128 || f[act_at[op]] > f[act_at[op] + 1] || f[act_at[op] + 1] > 127)
      return hwc_fail(p, "npu: command %ld: bad activation bounds", (long)k);
    rc = op == 1 ? hwc_conv(p, f, 0) : op == 2 ? hwc_conv(p, f, 1) : op == 5 ? hwc_add(p, f) : hwc_pool(p, f, op == 4);
    if (rc) return rc;
  }
  return 0;
}

static DLTensor* hwc_dltensor(const TVMFFIAny* a) {
  /* The Relax VM passes ffi::Tensor objects (the DLTensor follows the object header);
     direct callers may pass a raw DLTensor*. */
  if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;
  if (a->type_index == kTVMFFITensor) return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
  return NULL;
}

/* Binds argument k to program tensor `id` after checking dtype, shape, device, layout. */
static int hwc_bind(hwc_prog* p, const TVMFFIAny* args, int32_t k, uint32_t id) {
  DLTensor* d = hwc_dltensor(&args[k]);
  const hwc_tensor* t;
  int i;
  if (id >= p->nt || p->t[id].kind != 0) return hwc_fail(p, "npu: bad input/output tensor id (argument %ld)", (long)k);
  t = &p->t[id];
  if (!d) return hwc_fail(p, "npu: argument %ld is not a tensor", (long)k);
  if (d->device.device_type != kDLCPU || d->dtype.code != kDLInt || d->dtype.bits != 8 || d->dtype.lanes != 1 ||
      d->ndim != t->rank)
    return hwc_fail(p, "npu: argument %ld must be an int8 CPU tensor of the program's rank", (long)k);
  for (i = 0; i < d->ndim; ++i) {
    int64_t stride = 1, j;
    for (j = i + 1; j < d->ndim; ++j) stride *= d->shape[j];
    if (d->shape[i] != t->dims[i]) return hwc_fail(p, "npu: argument %ld has the wrong shape", (long)k);
    if (d->strides && d->shape[i] > 1 && d->strides[i] != stride)
      return hwc_fail(p, "npu: argument %ld is not compact", (long)k);
  }
  p->ext[id] = (int8_t*)((char*)d->data + d->byte_offset);
  return 0;
}

/* Runs one embedded stream on packed arguments (inputs..., outputs...; DPS style). */
static int hwc_npu_invoke(const char* name, const uint8_t* stream, size_t size, const TVMFFIAny* args,
                          int32_t num_args) {
  char err[256], msg[320];
  hwc_prog p;
  uint32_t i;
  int rc;
  memset(&p, 0, sizeof p);
  p.s = stream; p.size = size; p.err = err;
  rc = hwc_parse(&p);
  if (!rc && (uint32_t)num_args != p.ni + p.no)
    rc = hwc_fail(&p, "npu: expected inputs + outputs arguments, got %ld", (long)num_args);
  for (i = 0; !rc && i < p.ni + p.no; ++i) rc = hwc_bind(&p, args, (int32_t)i, hwc_u32(p.inputs + 4 * i));
  for (i = 0; !rc && i < p.ni; ++i) p.buf[hwc_u32(p.inputs + 4 * i)] = p.ext[hwc_u32(p.inputs + 4 * i)];
  if (!rc) rc = hwc_exec(&p);
  for (i = 0; !rc && i < p.no; ++i)
    if (p.buf[hwc_u32(p.outputs + 4 * i)] == NULL) rc = hwc_fail(&p, "npu: output %ld is never written", (long)i);
  for (i = 0; p.owned && i < p.nt; ++i)
    if (p.owned[i]) free(p.buf[i]);
  free(p.owned);
  free(p.ext);
  free(p.buf);
  free(p.t);
  if (rc) {
    snprintf(msg, sizeof msg, "%s: %s", name, err);
    TVMFFIErrorSetRaisedFromCStr("ValueError", msg);
    return -1;
  }
  return 0;
}
