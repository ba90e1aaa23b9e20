/* A stand-in for the AX650N board's C libraries (libax_sys.so, libax_engine.so and the PCIe card's
 * libaxcl_rt.so), so that the real pyaxengine Python code runs off-board in tests.
 *
 * It behaves like the board where the engine's correctness depends on it:
 * - CMM memory (AX_SYS_MemAllocCached) has a CPU view and an NPU view that are not coherent:
 *   CPU writes reach the NPU only through AX_SYS_MflushCache, NPU writes reach the CPU only through
 *   AX_SYS_MinvalidateCache, each over exactly the byte range given. A range that is not inside one
 *   allocation, or whose virtual and physical addresses do not match, is an error.
 * - New allocations hold garbage (random bytes, so bf16/fp32 NaN and Inf patterns occur).
 * - Models have shape groups and IO info as Pulsar2 reports them; a run checks every IO buffer's
 *   physical address and size against the group it runs, and the "NPU" reads only NPU-side bytes.
 * - AXCLRT (PCIe card) device memory is not mapped into the host: its addresses are non-canonical,
 *   so dereferencing one on the host faults; data moves only through axclrtMemcpy.
 * - AX_ENGINE_GetTotalOps is not exported, so pyaxengine takes the chip for an AX650 (MC50).
 *
 * The NPU computes the real layer: a stand-in .axmodel file (written by tests/axboard/pulsar2.py)
 * carries one ONNX graph per shape group, and a run calls the Python function run() of the module
 * named by $AXSTANDIN_NPU_MODULE (default axstandin_npu) with the group's ONNX bytes and the NPU-side
 * addresses of its inputs and outputs. The library is loaded into a Python process (pyaxengine),
 * so the Python C API is there; the GIL is taken around the call.
 *
 * Test-only. Built by tests/axboard/standin.py with the running interpreter's headers; one file
 * serves all three library names (symlinks), so the CMM table is shared between them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int32_t AX_S32;
typedef uint32_t AX_U32;
typedef unsigned long long AX_U64;
typedef signed char AX_S8;
typedef unsigned char AX_U8;
typedef char AX_CHAR;
typedef void AX_VOID;

#define AX_ERR 0x800B0001 /* a generic failure code */

/* ---- structures, laid out as pyaxengine's cffi declarations (64-bit) ---------------------------- */
typedef struct {
    AX_S32 eColorSpace;
    AX_U64 u64Reserved[18];
} AX_ENGINE_IO_META_EX_T;

typedef struct {
    AX_CHAR *pName;
    AX_S32 *pShape;
    AX_U8 nShapeSize;
    AX_S32 eLayout;
    AX_S32 eMemoryType;
    AX_S32 eDataType;
    AX_ENGINE_IO_META_EX_T *pExtraMeta;
    AX_U32 nSize;
    AX_U32 nQuantizationValue;
    AX_S32 *pStride;
    AX_U64 u64Reserved[9];
} AX_ENGINE_IO_META_T;

typedef struct {
    AX_ENGINE_IO_META_T *pInputs;
    AX_U32 nInputSize;
    AX_ENGINE_IO_META_T *pOutputs;
    AX_U32 nOutputSize;
    AX_U32 nMaxBatchSize;
    AX_S32 bDynamicBatchSize;
    AX_U64 u64Reserved[11];
} AX_ENGINE_IO_INFO_T;

typedef struct {
    AX_U64 phyAddr;
    AX_VOID *pVirAddr;
    AX_U32 nSize;
    AX_S32 *pStride;
    AX_U8 nStrideSize;
    AX_U64 u64Reserved[11];
} AX_ENGINE_IO_BUFFER_T;

typedef struct {
    AX_ENGINE_IO_BUFFER_T *pInputs;
    AX_U32 nInputSize;
    AX_ENGINE_IO_BUFFER_T *pOutputs;
    AX_U32 nOutputSize;
    AX_U32 nBatchSize;
    AX_VOID *pIoSetting;
    AX_U64 u64Reserved[10];
} AX_ENGINE_IO_T;

typedef struct {
    AX_S32 eHardMode;
    AX_U32 reserve[8];
} AX_ENGINE_NPU_ATTR_T;

typedef struct {
    AX_U32 nNpuSet;
    AX_S8 *pName;
    AX_U32 reserve[8];
} AX_ENGINE_HANDLE_EXTRA_T;

typedef struct {
    AX_U32 nCMMSize;
} AX_ENGINE_CMM_INFO_T;

/* ---- errors: counted, kept and printed, so a test can assert there were none --------------------- */
static int error_count;
static char last_error[512];

static AX_S32 fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    error_count++;
    fprintf(stderr, "[axstandin] error: %s\n", last_error);
    return (AX_S32)AX_ERR;
}

int standin_error_count(void) { return error_count; }
const char *standin_last_error(void) { return last_error; }

/* ---- memory ------------------------------------------------------------------------------------ */
typedef struct {
    AX_U64 phy;       /* physical (CMM) or device (AXCL) address */
    uint8_t *cpu;     /* CPU view (CMM only; NULL for AXCL device memory) */
    uint8_t *npu;     /* what the NPU sees */
    size_t size;
} Block;

static Block *blocks;
static size_t block_count, block_capacity;
static AX_U64 next_cmm = 0x100000000ULL;        /* physical addresses */
static AX_U64 next_axcl = 0xA000000000000000ULL; /* non-canonical: faults if the host dereferences it */
static uint64_t garbage_state = 0x9E3779B97F4A7C15ULL;

static void fill_garbage(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        garbage_state ^= garbage_state << 13;
        garbage_state ^= garbage_state >> 7;
        garbage_state ^= garbage_state << 17;
        p[i] = (uint8_t)(garbage_state >> 24);
    }
}

static Block *new_block(AX_U64 *next, size_t size, size_t align, int cpu_view) {
    if (block_count == block_capacity) {
        block_capacity = block_capacity ? 2 * block_capacity : 64;
        blocks = realloc(blocks, block_capacity * sizeof *blocks);
    }
    if (align < 64) align = 64;
    AX_U64 phy = (*next + align - 1) / align * align;
    *next = phy + size + 4096; /* a gap, so a range running past one block is in no block */
    Block *b = &blocks[block_count++];
    b->phy = phy;
    b->size = size;
    b->npu = malloc(size ? size : 1);
    fill_garbage(b->npu, size);
    b->cpu = NULL;
    if (cpu_view) { /* the CPU's cached view starts as the same garbage */
        b->cpu = aligned_alloc(align, (size + align - 1) / align * align);
        memcpy(b->cpu, b->npu, size);
    }
    return b;
}

/* The block holding [addr, addr + size), or NULL. */
static Block *find_block(AX_U64 addr, size_t size) {
    for (size_t i = 0; i < block_count; i++) {
        Block *b = &blocks[i];
        if (addr >= b->phy && addr + size <= b->phy + b->size) return b;
    }
    return NULL;
}

static void free_block(Block *b) {
    free(b->npu);
    free(b->cpu);
    *b = blocks[--block_count];
}

/* ---- libax_sys --------------------------------------------------------------------------------- */
static int sys_initialized;

AX_S32 AX_SYS_Init(AX_VOID) { sys_initialized = 1; return 0; }
AX_S32 AX_SYS_Deinit(AX_VOID) { sys_initialized = 0; return 0; }

AX_S32 AX_SYS_MemAllocCached(AX_U64 *phyaddr, AX_VOID **pviraddr, AX_U32 size, AX_U32 align, const AX_S8 *token) {
    (void)token;
    if (!sys_initialized) return fail("AX_SYS_MemAllocCached before AX_SYS_Init");
    Block *b = new_block(&next_cmm, size, align, 1);
    *phyaddr = b->phy;
    *pviraddr = b->cpu;
    return 0;
}

AX_S32 AX_SYS_MemFree(AX_U64 phyaddr, AX_VOID *pviraddr) {
    Block *b = find_block(phyaddr, 0);
    if (!b || b->phy != phyaddr || b->cpu != pviraddr) return fail("AX_SYS_MemFree of an unknown block %#llx", phyaddr);
    free_block(b);
    return 0;
}

/* The block and offset of a CPU-side range, checking that the virtual address matches. */
static Block *cmm_range(const char *what, AX_U64 phy, AX_VOID *vir, AX_U32 size, size_t *offset) {
    Block *b = find_block(phy, size);
    if (!b || !b->cpu) {
        fail("%s(%#llx, %p, %u): the range is not inside one CMM allocation", what, phy, vir, size);
        return NULL;
    }
    *offset = phy - b->phy;
    if ((uint8_t *)vir != b->cpu + *offset) {
        fail("%s(%#llx, %p, %u): virtual address does not match the physical one", what, phy, vir, size);
        return NULL;
    }
    return b;
}

AX_S32 AX_SYS_MflushCache(AX_U64 phyaddr, AX_VOID *pviraddr, AX_U32 size) {
    size_t off;
    Block *b = cmm_range("AX_SYS_MflushCache", phyaddr, pviraddr, size, &off);
    if (!b) return (AX_S32)AX_ERR;
    memcpy(b->npu + off, b->cpu + off, size); /* CPU cache lines written back: the NPU sees them now */
    return 0;
}

AX_S32 AX_SYS_MinvalidateCache(AX_U64 phyaddr, AX_VOID *pviraddr, AX_U32 size) {
    size_t off;
    Block *b = cmm_range("AX_SYS_MinvalidateCache", phyaddr, pviraddr, size, &off);
    if (!b) return (AX_S32)AX_ERR;
    memcpy(b->cpu + off, b->npu + off, size); /* stale CPU lines dropped: the CPU reads what the NPU wrote */
    return 0;
}

/* ---- models ------------------------------------------------------------------------------------ */
enum { DT_UINT8 = 1, DT_UINT16 = 2, DT_FLOAT32 = 3, DT_SINT16 = 4, DT_SINT8 = 5, DT_SINT32 = 6, DT_UINT32 = 7,
       DT_BFLOAT16 = 9 };
static const struct { const char *name; int ax, axcl, size; } DTYPES[] = {
    {"u8", DT_UINT8, 4, 1}, {"s8", DT_SINT8, 3, 1}, {"u16", DT_UINT16, 6, 2}, {"s16", DT_SINT16, 5, 2},
    {"u32", DT_UINT32, 8, 4}, {"s32", DT_SINT32, 7, 4}, {"f32", DT_FLOAT32, 15, 4}, {"bf16", DT_BFLOAT16, 14, 2},
};
#define MAX_IO 16
#define MAX_DIMS 8

typedef struct {
    char name[64];
    int dtype; /* index into DTYPES */
    int ndim;
    AX_S32 shape[MAX_DIMS];
    size_t nbytes;
} Tensor;

typedef struct {
    int nin, nout;
    Tensor in[MAX_IO], out[MAX_IO];
    size_t onnx_offset, onnx_size;
    AX_ENGINE_IO_META_T meta_in[MAX_IO], meta_out[MAX_IO];
    AX_ENGINE_IO_INFO_T info;
} Group;

typedef struct {
    int ngroups;
    Group *groups;
    uint8_t *blob; /* the groups' ONNX graphs, copied in as the NPU driver copies a model */
    size_t blob_size;
    uint64_t contexts;
    unsigned long long serial; /* unique per loaded model: the NPU caches its graphs by it */
} Model;

static unsigned long long model_serial;

static int dtype_index(const char *name) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof *DTYPES; i++)
        if (!strcmp(DTYPES[i].name, name)) return (int)i;
    return -1;
}

static void free_model(Model *m) {
    if (!m) return;
    free(m->groups);
    free(m->blob);
    free(m);
}

/* Parse a stand-in .axmodel: a text header ("AXSTANDIN-MODEL 1", "groups N", per group
 * "group I OFFSET SIZE" then "in|out NAME DTYPE NDIM D0 D1 ...", finally "end"), then the blob. */
static Model *parse_model(const uint8_t *data, size_t size) {
    const char *magic = "AXSTANDIN-MODEL 1\n";
    if (size < strlen(magic) || memcmp(data, magic, strlen(magic))) {
        fail("not a model file (no AXSTANDIN-MODEL header)");
        return NULL;
    }
    Model *m = calloc(1, sizeof *m);
    m->serial = ++model_serial;
    size_t pos = strlen(magic);
    Group *g = NULL;
    char line[512];
    for (;;) {
        size_t end = pos;
        while (end < size && data[end] != '\n') end++;
        if (end >= size || end - pos >= sizeof line) {
            fail("truncated model header");
            free_model(m);
            return NULL;
        }
        memcpy(line, data + pos, end - pos);
        line[end - pos] = 0;
        pos = end + 1;
        int n, index;
        size_t offset, length;
        char kind[8], name[64], dtype[8];
        if (!strcmp(line, "end")) break;
        if (sscanf(line, "groups %d", &n) == 1 && n > 0 && !m->groups) {
            m->ngroups = n;
            m->groups = calloc(n, sizeof *m->groups);
        } else if (sscanf(line, "group %d %zu %zu", &index, &offset, &length) == 3 && m->groups && index >= 0 &&
                   index < m->ngroups) {
            g = &m->groups[index];
            g->onnx_offset = offset;
            g->onnx_size = length;
        } else if (g && sscanf(line, "%7s %63s %7s %d%n", kind, name, dtype, &n, &index) == 4 && n > 0 &&
                   n <= MAX_DIMS && dtype_index(dtype) >= 0 && (!strcmp(kind, "in") || !strcmp(kind, "out"))) {
            int is_in = !strcmp(kind, "in");
            if ((is_in ? g->nin : g->nout) == MAX_IO) {
                fail("too many inputs or outputs");
                free_model(m);
                return NULL;
            }
            Tensor *t = is_in ? &g->in[g->nin++] : &g->out[g->nout++];
            snprintf(t->name, sizeof t->name, "%s", name);
            t->dtype = dtype_index(dtype);
            t->ndim = n;
            t->nbytes = DTYPES[t->dtype].size;
            const char *p = line + index;
            for (int d = 0; d < n; d++) {
                int used;
                if (sscanf(p, "%d%n", &t->shape[d], &used) != 1) {
                    fail("bad shape in line '%s'", line);
                    free_model(m);
                    return NULL;
                }
                p += used;
                t->nbytes *= t->shape[d];
            }
        } else {
            fail("bad model header line '%s'", line);
            free_model(m);
            return NULL;
        }
    }
    if (!m->groups) {
        fail("model header has no groups");
        free_model(m);
        return NULL;
    }
    m->blob_size = size - pos;
    m->blob = malloc(m->blob_size ? m->blob_size : 1);
    memcpy(m->blob, data + pos, m->blob_size);
    for (int i = 0; i < m->ngroups; i++) {
        Group *gr = &m->groups[i];
        if (!gr->nin || !gr->nout || gr->nin != m->groups[0].nin || gr->nout != m->groups[0].nout ||
            gr->onnx_offset + gr->onnx_size > m->blob_size) {
            fail("group %d is missing or inconsistent", i);
            free_model(m);
            return NULL;
        }
        for (int k = 0; k < gr->nin + gr->nout; k++) {
            Tensor *t = k < gr->nin ? &gr->in[k] : &gr->out[k - gr->nin];
            AX_ENGINE_IO_META_T *meta = k < gr->nin ? &gr->meta_in[k] : &gr->meta_out[k - gr->nin];
            meta->pName = t->name;
            meta->pShape = t->shape;
            meta->nShapeSize = (AX_U8)t->ndim;
            meta->eLayout = 0;
            meta->eMemoryType = 0;
            meta->eDataType = DTYPES[t->dtype].ax;
            meta->nSize = (AX_U32)t->nbytes;
        }
        gr->info.pInputs = gr->meta_in;
        gr->info.nInputSize = gr->nin;
        gr->info.pOutputs = gr->meta_out;
        gr->info.nOutputSize = gr->nout;
        gr->info.nMaxBatchSize = 1;
    }
    return m;
}

/* ---- the NPU: the group's ONNX graph on NPU-side bytes, in Python ------------------------------- */
static PyObject *tensor_list(const Tensor *tensors, int n, uint8_t *const *where) {
    PyObject *list = PyList_New(n);
    for (int i = 0; i < n; i++) {
        const Tensor *t = &tensors[i];
        PyObject *shape = PyTuple_New(t->ndim);
        for (int d = 0; d < t->ndim; d++) PyTuple_SET_ITEM(shape, d, PyLong_FromLong(t->shape[d]));
        PyList_SET_ITEM(list, i, Py_BuildValue("(ssNKn)", t->name, DTYPES[t->dtype].name, shape,
                                               (unsigned long long)(uintptr_t)where[i], (Py_ssize_t)t->nbytes));
    }
    return list;
}

static AX_S32 npu_compute(Model *m, int group, uint8_t *const *in, uint8_t *const *out) {
    Group *g = &m->groups[group];
    const char *module = getenv("AXSTANDIN_NPU_MODULE");
    PyGILState_STATE gil = PyGILState_Ensure();
    AX_S32 ret = 0;
    PyObject *mod = PyImport_ImportModule(module ? module : "axstandin_npu");
    PyObject *result = NULL;
    if (mod) {
        PyObject *ins = tensor_list(g->in, g->nin, in), *outs = tensor_list(g->out, g->nout, out);
        result = PyObject_CallMethod(mod, "run", "(KiKnNN)", m->serial, group,
                                     (unsigned long long)(uintptr_t)(m->blob + g->onnx_offset),
                                     (Py_ssize_t)g->onnx_size, ins, outs);
    }
    if (!result) {
        PyErr_Print();
        ret = fail("the NPU failed running group %d", group);
    }
    Py_XDECREF(result);
    Py_XDECREF(mod);
    PyGILState_Release(gil);
    return ret;
}

/* ---- libax_engine ------------------------------------------------------------------------------ */
static int engine_initialized;
static AX_S32 npu_mode;

const AX_CHAR *AX_ENGINE_GetVersion(AX_VOID) { return "2.18.0 (axstandin)"; }
AX_VOID AX_ENGINE_NPUReset(AX_VOID) {}

AX_S32 AX_ENGINE_Init(AX_ENGINE_NPU_ATTR_T *attr) {
    if (!sys_initialized) return fail("AX_ENGINE_Init before AX_SYS_Init");
    npu_mode = attr ? attr->eHardMode : 0;
    engine_initialized = 1;
    return 0;
}

AX_S32 AX_ENGINE_GetVNPUAttr(AX_ENGINE_NPU_ATTR_T *attr) {
    if (!engine_initialized) return (AX_S32)AX_ERR; /* not an error to count: pyaxengine probes this */
    attr->eHardMode = npu_mode;
    return 0;
}

AX_S32 AX_ENGINE_Deinit(AX_VOID) { engine_initialized = 0; return 0; }

AX_S32 AX_ENGINE_GetModelType(const AX_VOID *data, AX_U32 size, AX_S32 *type) {
    Model *m = parse_model(data, size);
    if (!m) return (AX_S32)AX_ERR;
    free_model(m);
    *type = 0; /* single core */
    return 0;
}

AX_S32 AX_ENGINE_CreateHandleV2(uint64_t **handle, const AX_VOID *data, AX_U32 size, AX_ENGINE_HANDLE_EXTRA_T *extra) {
    (void)extra;
    if (!engine_initialized) return fail("AX_ENGINE_CreateHandleV2 before AX_ENGINE_Init");
    Model *m = parse_model(data, size);
    if (!m) return (AX_S32)AX_ERR;
    *handle = (uint64_t *)m;
    return 0;
}

AX_S32 AX_ENGINE_DestroyHandle(uint64_t *handle) {
    free_model((Model *)handle);
    return 0;
}

AX_S32 AX_ENGINE_GetGroupIOInfoCount(uint64_t *handle, AX_U32 *count) {
    *count = (AX_U32)((Model *)handle)->ngroups;
    return 0;
}

AX_S32 AX_ENGINE_GetGroupIOInfo(uint64_t *handle, AX_U32 index, AX_ENGINE_IO_INFO_T **info) {
    Model *m = (Model *)handle;
    if (index >= (AX_U32)m->ngroups) return fail("AX_ENGINE_GetGroupIOInfo: no group %u", index);
    *info = &m->groups[index].info;
    return 0;
}

AX_S32 AX_ENGINE_GetIOInfo(uint64_t *handle, AX_ENGINE_IO_INFO_T **info) {
    return AX_ENGINE_GetGroupIOInfo(handle, 0, info);
}

AX_S32 AX_ENGINE_GetHandleModelType(uint64_t *handle, AX_S32 *type) { (void)handle; *type = 0; return 0; }

AX_S32 AX_ENGINE_CreateContextV2(uint64_t *handle, uint64_t **context) {
    Model *m = (Model *)handle;
    *context = &m->contexts;
    return 0;
}

/* The NPU side of one IO buffer, checked against what the group reads or writes. */
static uint8_t *npu_side(const char *what, int index, const AX_ENGINE_IO_BUFFER_T *buffer, const Tensor *t) {
    if (buffer->nSize < t->nbytes) {
        fail("%s %d (%s): buffer of %u bytes, the group needs %zu", what, index, t->name, buffer->nSize, t->nbytes);
        return NULL;
    }
    Block *b = find_block(buffer->phyAddr, t->nbytes);
    if (!b || !b->cpu) {
        fail("%s %d (%s): physical address %#llx is not a CMM allocation of %zu bytes", what, index, t->name,
             buffer->phyAddr, t->nbytes);
        return NULL;
    }
    return b->npu + (buffer->phyAddr - b->phy);
}

AX_S32 AX_ENGINE_RunGroupIOSync(uint64_t *handle, uint64_t *context, AX_U32 group, AX_ENGINE_IO_T *io) {
    Model *m = (Model *)handle;
    if (!m || context != &m->contexts) return fail("run with an unknown handle or context");
    if (group >= (AX_U32)m->ngroups) return fail("run: no shape group %u (the model has %d)", group, m->ngroups);
    Group *g = &m->groups[group];
    if (io->nInputSize != (AX_U32)g->nin || io->nOutputSize != (AX_U32)g->nout)
        return fail("run: %u inputs and %u outputs given, the model has %d and %d", io->nInputSize, io->nOutputSize,
                    g->nin, g->nout);
    uint8_t *in[MAX_IO], *out[MAX_IO];
    for (int i = 0; i < g->nin; i++)
        if (!(in[i] = npu_side("input", i, &io->pInputs[i], &g->in[i]))) return (AX_S32)AX_ERR;
    for (int i = 0; i < g->nout; i++)
        if (!(out[i] = npu_side("output", i, &io->pOutputs[i], &g->out[i]))) return (AX_S32)AX_ERR;
    return npu_compute(m, (int)group, in, out);
}

AX_S32 AX_ENGINE_RunSyncV2(uint64_t *handle, uint64_t *context, AX_ENGINE_IO_T *io) {
    return AX_ENGINE_RunGroupIOSync(handle, context, 0, io);
}

AX_S32 AX_ENGINE_SetAffinity(uint64_t *handle, AX_U32 set) { (void)handle; (void)set; return 0; }
AX_S32 AX_ENGINE_GetAffinity(uint64_t *handle, AX_U32 *set) { (void)handle; *set = 1; return 0; }
AX_S32 AX_ENGINE_GetCMMUsage(uint64_t *handle, AX_ENGINE_CMM_INFO_T *info) {
    Model *m = (Model *)handle;
    info->nCMMSize = (AX_U32)m->blob_size;
    return 0;
}
const AX_CHAR *AX_ENGINE_GetModelToolsVersion(uint64_t *handle) { (void)handle; return "axstandin-pulsar2"; }
/* AX_ENGINE_GetTotalOps is deliberately absent: pyaxengine then identifies the chip as the AX650's MC50. */

/* ---- libaxcl_rt (the PCIe card) ---------------------------------------------------------------- */
typedef struct {
    AX_U64 in[MAX_IO], out[MAX_IO];
    uint64_t in_size[MAX_IO], out_size[MAX_IO];
    int nin, nout;
} AxclIO;

typedef struct {
    uint32_t num;
    int32_t devices[256];
} axclrtDeviceList;

typedef struct {
    int32_t dimCount;
    int32_t dims[32];
} axclrtEngineIODims;

enum { AXCL_MEMCPY_HOST_TO_HOST, AXCL_MEMCPY_HOST_TO_DEVICE, AXCL_MEMCPY_DEVICE_TO_HOST, AXCL_MEMCPY_DEVICE_TO_DEVICE };
#define AXCL_DEVICE_ID 129

static int axcl_initialized, axcl_device, axcl_engine;
static int axcl_context_token;

int32_t axclInit(const char *config) { (void)config; axcl_initialized = 1; return 0; }
int32_t axclFinalize(void) { axcl_initialized = 0; return 0; }
int32_t axclrtGetVersion(int32_t *major, int32_t *minor, int32_t *patch) { *major = 3; *minor = 4; *patch = 0; return 0; }
const char *axclrtGetSocName(void) { return "AX650N (axstandin)"; }

int32_t axclrtGetDeviceList(axclrtDeviceList *list) {
    if (!axcl_initialized) return fail("axclrtGetDeviceList before axclInit");
    list->num = 1;
    list->devices[0] = AXCL_DEVICE_ID;
    return 0;
}

int32_t axclrtSetDevice(int32_t id) {
    if (id != AXCL_DEVICE_ID) return fail("axclrtSetDevice: no device %d", id);
    axcl_device = id;
    return 0;
}
int32_t axclrtResetDevice(int32_t id) { (void)id; axcl_device = 0; return 0; }
int32_t axclrtCreateContext(void **context, int32_t id) { (void)id; *context = &axcl_context_token; return 0; }
int32_t axclrtDestroyContext(void *context) { (void)context; return 0; }
int32_t axclrtSetCurrentContext(void *context) {
    return context == &axcl_context_token ? 0 : fail("axclrtSetCurrentContext: unknown context");
}
int32_t axclrtGetCurrentContext(void **context) {
    if (!axcl_device) return fail("axclrtGetCurrentContext without a device");
    *context = &axcl_context_token;
    return 0;
}
int32_t axclrtGetDefaultContext(void **context, int32_t id) { (void)id; *context = &axcl_context_token; return 0; }

int32_t axclrtEngineInit(int32_t kind) {
    if (!axcl_device) return fail("axclrtEngineInit without a device");
    npu_mode = kind;
    axcl_engine = 1;
    return 0;
}
int32_t axclrtEngineGetVNpuKind(int32_t *kind) {
    if (!axcl_engine) return (AX_S32)AX_ERR;
    *kind = npu_mode;
    return 0;
}
int32_t axclrtEngineFinalize(void) { axcl_engine = 0; return 0; }

int32_t axclrtMalloc(void **ptr, size_t size, int32_t policy) {
    (void)policy;
    if (!axcl_device) return fail("axclrtMalloc without a device");
    *ptr = (void *)(uintptr_t)new_block(&next_axcl, size, 128, 0)->phy;
    return 0;
}
int32_t axclrtMallocCached(void **ptr, size_t size, int32_t policy) { return axclrtMalloc(ptr, size, policy); }

static Block *axcl_range(const void *ptr, size_t size) {
    Block *b = find_block((AX_U64)(uintptr_t)ptr, size);
    return b && !b->cpu ? b : NULL;
}

int32_t axclrtFree(void *ptr) {
    Block *b = axcl_range(ptr, 0);
    if (!b || b->phy != (AX_U64)(uintptr_t)ptr) return fail("axclrtFree of unknown device memory %p", ptr);
    free_block(b);
    return 0;
}

int32_t axclrtMemcpy(void *dst, const void *src, size_t count, int32_t kind) {
    Block *d = NULL, *s = NULL;
    if (kind == AXCL_MEMCPY_HOST_TO_DEVICE || kind == AXCL_MEMCPY_DEVICE_TO_DEVICE)
        if (!(d = axcl_range(dst, count))) return fail("axclrtMemcpy: destination %p + %zu is not device memory", dst, count);
    if (kind == AXCL_MEMCPY_DEVICE_TO_HOST || kind == AXCL_MEMCPY_DEVICE_TO_DEVICE)
        if (!(s = axcl_range(src, count))) return fail("axclrtMemcpy: source %p + %zu is not device memory", src, count);
    if (kind > AXCL_MEMCPY_DEVICE_TO_DEVICE) return fail("axclrtMemcpy: copy kind %d is not supported here", kind);
    uint8_t *to = d ? d->npu + ((uintptr_t)dst - d->phy) : dst;
    const uint8_t *from = s ? s->npu + ((uintptr_t)src - s->phy) : src;
    memmove(to, from, count);
    return 0;
}
int32_t axclrtMemFlush(void *ptr, size_t size) { (void)ptr; (void)size; return 0; }

int32_t axclrtEngineLoadFromFile(const char *path, uint64_t *model_id) {
    if (!axcl_engine) return fail("axclrtEngineLoadFromFile before axclrtEngineInit");
    FILE *f = fopen(path, "rb");
    if (!f) return fail("axclrtEngineLoadFromFile: cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *data = malloc(size > 0 ? (size_t)size : 1);
    size_t got = fread(data, 1, (size_t)size, f);
    fclose(f);
    Model *m = got == (size_t)size ? parse_model(data, got) : NULL;
    free(data);
    if (!m) return (AX_S32)AX_ERR;
    *model_id = (uint64_t)(uintptr_t)m;
    return 0;
}

int32_t axclrtEngineLoadFromMem(const void *model, uint64_t size, uint64_t *model_id) {
    Block *b = axcl_range(model, size);
    if (!b) return fail("axclrtEngineLoadFromMem: the model is not in device memory");
    Model *m = parse_model(b->npu + ((uintptr_t)model - b->phy), size);
    if (!m) return (AX_S32)AX_ERR;
    *model_id = (uint64_t)(uintptr_t)m;
    return 0;
}

const char *axclrtEngineGetModelCompilerVersion(uint64_t model_id) { (void)model_id; return "axstandin-pulsar2"; }
int32_t axclrtEngineUnload(uint64_t model_id) { free_model((Model *)(uintptr_t)model_id); return 0; }
int32_t axclrtEngineGetIOInfo(uint64_t model_id, void **info) { *info = (void *)(uintptr_t)model_id; return 0; }
int32_t axclrtEngineGetShapeGroupsCount(void *info, int32_t *count) { *count = ((Model *)info)->ngroups; return 0; }
uint32_t axclrtEngineGetNumInputs(void *info) { return (uint32_t)((Model *)info)->groups[0].nin; }
uint32_t axclrtEngineGetNumOutputs(void *info) { return (uint32_t)((Model *)info)->groups[0].nout; }

static Tensor *axcl_tensor(void *info, uint32_t group, uint32_t index, int input) {
    Model *m = info;
    if (group >= (uint32_t)m->ngroups) return NULL;
    Group *g = &m->groups[group];
    if (index >= (uint32_t)(input ? g->nin : g->nout)) return NULL;
    return input ? &g->in[index] : &g->out[index];
}

uint64_t axclrtEngineGetInputSizeByIndex(void *info, uint32_t group, uint32_t index) {
    Tensor *t = axcl_tensor(info, group, index, 1);
    return t ? t->nbytes : 0;
}
uint64_t axclrtEngineGetOutputSizeByIndex(void *info, uint32_t group, uint32_t index) {
    Tensor *t = axcl_tensor(info, group, index, 0);
    return t ? t->nbytes : 0;
}

static int32_t dims_of(Tensor *t, axclrtEngineIODims *dims) {
    if (!t) return fail("axclrtEngineGet*Dims: no such group or index");
    dims->dimCount = t->ndim;
    for (int d = 0; d < t->ndim; d++) dims->dims[d] = t->shape[d];
    return 0;
}
int32_t axclrtEngineGetInputDims(void *info, uint32_t group, uint32_t index, axclrtEngineIODims *dims) {
    return dims_of(axcl_tensor(info, group, index, 1), dims);
}
int32_t axclrtEngineGetOutputDims(void *info, uint32_t group, uint32_t index, axclrtEngineIODims *dims) {
    return dims_of(axcl_tensor(info, group, index, 0), dims);
}
const char *axclrtEngineGetInputNameByIndex(void *info, uint32_t index) { return axcl_tensor(info, 0, index, 1)->name; }
const char *axclrtEngineGetOutputNameByIndex(void *info, uint32_t index) { return axcl_tensor(info, 0, index, 0)->name; }
int32_t axclrtEngineGetInputDataType(void *info, uint32_t index, int32_t *type) {
    *type = DTYPES[axcl_tensor(info, 0, index, 1)->dtype].axcl;
    return 0;
}
int32_t axclrtEngineGetOutputDataType(void *info, uint32_t index, int32_t *type) {
    *type = DTYPES[axcl_tensor(info, 0, index, 0)->dtype].axcl;
    return 0;
}
int32_t axclrtEngineGetInputDataLayout(void *info, uint32_t index, int32_t *layout) { (void)info; (void)index; *layout = 0; return 0; }
int32_t axclrtEngineGetOutputDataLayout(void *info, uint32_t index, int32_t *layout) { (void)info; (void)index; *layout = 0; return 0; }

int32_t axclrtEngineCreateIO(void *info, void **io) {
    AxclIO *x = calloc(1, sizeof *x);
    x->nin = ((Model *)info)->groups[0].nin;
    x->nout = ((Model *)info)->groups[0].nout;
    *io = x;
    return 0;
}
int32_t axclrtEngineDestroyIO(void *io) { free(io); return 0; }

static int32_t set_buffer(AX_U64 *addr, uint64_t *size, int n, uint32_t index, const void *ptr, uint64_t bytes) {
    if (index >= (uint32_t)n) return fail("axclrtEngineSet*BufferByIndex: no index %u", index);
    if (!axcl_range(ptr, bytes)) return fail("axclrtEngineSet*BufferByIndex: %p + %llu is not device memory", ptr,
                                             (unsigned long long)bytes);
    addr[index] = (AX_U64)(uintptr_t)ptr;
    size[index] = bytes;
    return 0;
}
int32_t axclrtEngineSetInputBufferByIndex(void *io, uint32_t index, const void *ptr, uint64_t size) {
    AxclIO *x = io;
    return set_buffer(x->in, x->in_size, x->nin, index, ptr, size);
}
int32_t axclrtEngineSetOutputBufferByIndex(void *io, uint32_t index, const void *ptr, uint64_t size) {
    AxclIO *x = io;
    return set_buffer(x->out, x->out_size, x->nout, index, ptr, size);
}
int32_t axclrtEngineGetInputBufferByIndex(void *io, uint32_t index, void **ptr, uint64_t *size) {
    AxclIO *x = io;
    if (index >= (uint32_t)x->nin) return fail("axclrtEngineGetInputBufferByIndex: no index %u", index);
    *ptr = (void *)(uintptr_t)x->in[index];
    *size = x->in_size[index];
    return 0;
}
int32_t axclrtEngineGetOutputBufferByIndex(void *io, uint32_t index, void **ptr, uint64_t *size) {
    AxclIO *x = io;
    if (index >= (uint32_t)x->nout) return fail("axclrtEngineGetOutputBufferByIndex: no index %u", index);
    *ptr = (void *)(uintptr_t)x->out[index];
    *size = x->out_size[index];
    return 0;
}

int32_t axclrtEngineCreateContext(uint64_t model_id, uint64_t *context) {
    *context = (uint64_t)(uintptr_t)&((Model *)(uintptr_t)model_id)->contexts;
    return 0;
}

int32_t axclrtEngineExecute(uint64_t model_id, uint64_t context, uint32_t group, void *io) {
    Model *m = (Model *)(uintptr_t)model_id;
    AxclIO *x = io;
    if (context != (uint64_t)(uintptr_t)&m->contexts) return fail("axclrtEngineExecute: unknown context");
    if (group >= (uint32_t)m->ngroups) return fail("axclrtEngineExecute: no shape group %u", group);
    Group *g = &m->groups[group];
    uint8_t *in[MAX_IO], *out[MAX_IO];
    for (int k = 0; k < g->nin + g->nout; k++) {
        int is_in = k < g->nin, i = is_in ? k : k - g->nin;
        Tensor *t = is_in ? &g->in[i] : &g->out[i];
        AX_U64 addr = is_in ? x->in[i] : x->out[i];
        uint64_t size = is_in ? x->in_size[i] : x->out_size[i];
        Block *b = size >= t->nbytes ? axcl_range((void *)(uintptr_t)addr, t->nbytes) : NULL;
        if (!b) return fail("axclrtEngineExecute: %s %d (%s) has no device buffer of %zu bytes", is_in ? "input" : "output",
                            i, t->name, t->nbytes);
        (is_in ? in : out)[i] = b->npu + (addr - b->phy);
    }
    return npu_compute(m, (int)group, in, out);
}
