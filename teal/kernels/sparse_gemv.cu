// Fused threshold + sparse GEMV in CUDA C++ for 1..8 input rows (teal.kernels.cuda compiles it at run time
// with NVRTC).
//
//   y[b, seg_j] = (x[b] * (|x[b]| * c_j > t_j)) @ w_t[:, seg_j]      x [B, K], w_t [K, N] row-major, y [B, N]
//
// With B > 1 a warp lists the union of the rows' survivors (a weight row is read once for the whole
// batch; each input row keeps its own mask), so the bytes read follow the union's density and the kernel
// never reads more than a dense product would.
//
// Grid (column blocks, SPLIT). The SPLIT programs of one column block form a thread-block cluster: each
// owns rows_per_split consecutive rows of w_t, every warp of it a contiguous share of those rows. A warp
// lists the surviving rows of its share with ballots (indices and fp32 values, ascending, in shared
// memory), then streams only those weight rows: each lane loads VECS 16-byte vectors per row, UNROLL rows
// per step, all loads of a step issued before any product, and accumulates in fp32. The warps' sums meet
// in shared memory; the cluster's partial sums are added over distributed shared memory, in rank order
// (deterministic), each program finishing an equal slice of the block's columns. One launch, no
// workspace, no atomics, no zero-fill.
//
// No header is included (NVRTC may run without the CUDA include directory). Macros, set by the host:
//   ELEM      0 bf16, 1 fp16, 2 fp32 (x, w_t and y share it)
//   WARPS     warps per program         UNROLL   rows per warp and step      VECS  16-byte vectors per lane
//   SPLIT     programs per column block (the cluster size, 1..8)
//   BATCH     input rows (1..8); GLU only with BATCH 1
//   LIST_STEP input entries per lane loaded before their ballots (the host covers a warp's rows in one
//             round where it can: every load of the listing phase in flight at once)
//   HAS_SCALE weight-aware rule: the score is |x_i| * scale[j * K + i]
//   GLU       the input is a gate|up row [2K]; x_i = silu(gate_i) * up_i with eager PyTorch's roundings
//   PDL       0: plain launch; 1: let the next kernel launch at once; 2: let it launch after the weight loop.
//             With 1 or 2 the program waits for the previous kernel (griddepcontrol) before reading x.
//   MMA       0, or 2 / 4 (16-bit elements, VECS 1): the inner product on tensor cores over MMA slots of 64
//             columns (BLOCK_N = 64 * MMA), 16 listed rows per warp and step:
//             y^T[cols, rows] += W^T[cols, k16] x^T[k16, rows] with mma.m16n8k16 (the weight tile is the A
//             operand, so its 16 output columns fill the fragment; the input rows are the 8 columns of B).
//             Lane t (group g = t / 4, q = t % 4) loads listed rows 2q, 2q+1, 2q+8, 2q+9 of the step at
//             columns s * 64 + g * 8 .. + 8 of each slot s; byte permutes pair two rows' values of
//             one column into a fragment register, so no shared memory staging is needed. It keeps the
//             batch's products off the FMA pipes, which bound the FMA loop at 4-8 rows.
//   WFMT      weights: 0 in the element type; 1 int8 codes, one scale per output column (y = scale * sum);
//             2 int4 codes, two per byte along N (low nibble first), with a (scale, zero) pair per group of
//             GROUP input rows and output column: w = (q - zero) * scale (teal/quant.py). A lane's 8 columns
//             are 8 (int8) or 4 (int4) code bytes per row, so the column blocks are those of 16-bit weights.
//             16-bit inputs, no MMA, no GLU. int8: UNROLL rows per step, a code becomes fp32 exactly by a
//             byte permute (2^23 + code + 128, minus 2^23 + 128). int4: a step never crosses a group (it ends
//             at the group's last listed row, found by one ballot; UNROLL <= 32), so the unrolled step is one
//             block of straight code with an exit check every INT4_CHUNK rows (in the loads and in the
//             products, so a step that ends early issues neither for the rows past its end); a code becomes
//             the fp32 128 + q by one byte permute under the exponent byte 0x43, no subtraction per code; the
//             step's sum of x is one warp reduction, and a row's address one wide multiply-add. Per group it
//             sums x * (128 + q) and x, and between steps folds scale * (sum x (128 + q) - (128 + zero) * sum x)
//             in (the constant 128 joins the zero point), the next group's pair loaded while the current one
//             is summed.
//   QPIPE     0, or S >= 2 (int4, VECS 1, BATCH 1): the int4 loop's code words go through a ring of S steps per
//             warp in shared memory by cp.async (4 bytes per lane and row) instead of registers, the loads of
//             S - 1 steps ahead issued before a step's products, so a warp has loads in flight while it
//             multiplies and registers no longer bound the rows in flight. A lane reads back only the words it
//             copied itself (cp.async.wait_group orders them for the copying thread: no barrier). The ring
//             follows the lists in shared memory: WARPS * S * UNROLL * 32 words.
//   STAMPS    0, or 1: a per-stage timeline of each program, for measuring only (the work is unchanged; each
//             stamp is one %globaltimer read and one store by lane 0). An extra last argument `stamps`, int64
//             [programs][WARPS + 1][5], program = blockIdx.x * SPLIT + blockIdx.y; row w < WARPS is warp w's
//             stages: start, previous kernel waited for, rows listed, first weight step's first load
//             returned (the read waits on that load's register), weight loop done; row WARPS the program's:
//             SM id, every warp's loop done, warp sums added in shared memory (thread 0's share), cluster's
//             partial sums ready, end (stored, last cluster barrier passed). 16-bit FMA loop only (no MMA,
//             no WFMT). teal.kernels.cuda.STAMP_FIELDS names the fields.
// Host contract: N, every segment width and w_t's row stride are multiples of the elements per vector,
// w_t and y are 16-byte aligned, K * N < 2^31 (checked in teal/kernels/cuda.py); with WFMT, N and the
// widths are multiples of 8, the codes 8-byte (int8) or 4-byte (int4) aligned, scales and zeros 16-byte.

#if ELEM == 2
typedef float elem_t;
#define EPV 4
#else
typedef unsigned short elem_t;
#define EPV 8
#endif

// 16 bytes of weights, and four fp32 sums (own types: no vector_types.h under NVRTC).
struct alignas(16) vec_u32x4 { unsigned x, y, z, w; };
struct alignas(16) vec_f32x4 { float x, y, z, w; };

#ifndef BATCH
#define BATCH 1
#endif
#if GLU && BATCH > 1
#error "the SiLU-gated input is fused at batch 1 only"
#endif
#ifndef MMA
#define MMA 0
#endif
#if MMA && (ELEM == 2 || VECS != 1 || GLU || (MMA != 2 && MMA != 4))
#error "the tensor-core inner product takes 16-bit elements, 2 or 4 slots (block_n 128 or 256) and no GLU"
#endif
#ifndef WFMT
#define WFMT 0
#endif
#ifndef GROUP
#define GROUP 128
#endif
#if WFMT && (MMA || ELEM == 2 || GLU)
#error "quantized weights take 16-bit inputs, the FMA inner product and no fused GLU"
#endif
#if WFMT == 2 && UNROLL > 32
#error "the int4 loop takes at most 32 rows per step (one listed row per lane)"
#endif
#ifndef QPIPE
#define QPIPE 0
#endif
#if QPIPE && (WFMT != 2 || VECS != 1 || BATCH != 1 || QPIPE < 2)
#error "the cp.async ring (QPIPE >= 2) takes int4 codes, one code word per lane (block_n 256) and one input row"
#endif
// The int4 decode: a nibble q in byte 2 under the exponent byte INT4_EXP is the fp32
// INT4_BIAS + q (2^7 + q: exponent 134, the nibble's lowest bit weighs 1); byte j of the masked word is
// selected by INT4_SELECT | (j << 8) (bytes 3, 1, 0 from the constant). Rows per exit check: INT4_CHUNK.
#define INT4_EXP 0x43000000u
#define INT4_BIAS 128.0f
#define INT4_SELECT 0x7044
#define INT4_CHUNK 8
#ifndef STAMPS
#define STAMPS 0
#endif
#if STAMPS && (MMA || WFMT)
#error "stage stamps are taken in the 16-bit FMA loop only"
#endif
#if WFMT
typedef unsigned char weight_t;  // codes
#else
typedef elem_t weight_t;
#endif

#define LANE_COLS (EPV * VECS)
#if MMA
#define SLOTS MMA  // 64-column slots per lane group
#define BLOCK_N (64 * SLOTS)
#else
#define BLOCK_N (32 * LANE_COLS)
#endif
#define THREADS (WARPS * 32)
#ifndef LIST_STEP
#define LIST_STEP 4  // input entries per lane loaded before their ballots (host: enough for one round)
#endif

__device__ __forceinline__ float to_f32(elem_t v) {
#if ELEM == 0
    return __uint_as_float(((unsigned)v) << 16);
#elif ELEM == 1
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#else
    return v;
#endif
}

__device__ __forceinline__ elem_t from_f32(float f) {
#if ELEM == 0
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#elif ELEM == 1
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    return f;
#endif
}

// Round an fp32 value to the element type and back (eager PyTorch's intermediate roundings).
__device__ __forceinline__ float round_elem(float f) { return to_f32(from_f32(f)); }

__device__ __forceinline__ float input_at(const elem_t* __restrict__ x, int i, int K) {
#if GLU
    const float g = to_f32(x[i]);
    const float act = round_elem(g / (1.0f + expf(-g)));
    return round_elem(act * to_f32(x[K + i]));
#else
    return to_f32(x[i]);
#endif
}

// One 16-byte vector of weights if `pred`, else zeros; streamed (read-only path, not kept in L1). Not
// volatile, so the compiler may issue a step's loads together, ahead of their products.
__device__ __forceinline__ vec_u32x4 load_stream(const elem_t* p, bool pred) {
    vec_u32x4 v;
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %5, 0;\n\t"
        "mov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\tmov.b32 %2, 0;\n\tmov.b32 %3, 0;\n\t"
        "@p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n\t}"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "r"((int)pred));
    return v;
}

// The EPV elements of a vector as fp32.
__device__ __forceinline__ void unpack_vector(float* out, vec_u32x4 v) {
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#if ELEM == 0
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        out[2 * e] = __uint_as_float(u[e] << 16);
        out[2 * e + 1] = __uint_as_float(u[e] & 0xffff0000u);
    }
#elif ELEM == 1
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
            : "=f"(out[2 * e]), "=f"(out[2 * e + 1])
            : "r"(u[e]));
    }
#else
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = __uint_as_float(u[e]);
#endif
}

// acc[0..EPV) += xv * (the EPV elements of the vector).
__device__ __forceinline__ void fma_vector(float* acc, float xv, vec_u32x4 v) {
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#if ELEM == 0
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        acc[2 * e] = fmaf(xv, __uint_as_float(u[e] << 16), acc[2 * e]);
        acc[2 * e + 1] = fmaf(xv, __uint_as_float(u[e] & 0xffff0000u), acc[2 * e + 1]);
    }
#elif ELEM == 1
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float lo, hi;
        asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
            : "=f"(lo), "=f"(hi)
            : "r"(u[e]));
        acc[2 * e] = fmaf(xv, lo, acc[2 * e]);
        acc[2 * e + 1] = fmaf(xv, hi, acc[2 * e + 1]);
    }
#else
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = fmaf(xv, __uint_as_float(u[e]), acc[e]);
#endif
}

#if WFMT == 1
// The 8 int8 code bytes of one lane's columns.
struct qvec_t { unsigned u[2]; };

__device__ __forceinline__ qvec_t load_codes(const weight_t* p, bool pred) {
    qvec_t v;
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %3, 0;\n\tmov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\t"
        "@p ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n\t}"
        : "=r"(v.u[0]), "=r"(v.u[1])
        : "l"(p), "r"((int)pred));
    return v;
}

// Byte j of `word` as the fp32 2^23 + byte (exact): the byte under the exponent bits 0x4B.
__device__ __forceinline__ float biased_byte(unsigned word, int j) {
    return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7540 | j));
}

// The 8 int8 codes of a lane's columns as fp32, exactly (the signed code).
__device__ __forceinline__ void decode_codes(float* out, qvec_t v) {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        const unsigned biased = v.u[w] ^ 0x80808080u;  // code + 128 in each byte
#pragma unroll
        for (int j = 0; j < 4; ++j) out[4 * w + j] = biased_byte(biased, j) - 8388736.0f;  // 2^23 + 128
    }
}
#elif WFMT == 2
// The code word of one lane's columns at `col` + row * stride (one wide multiply-add) if `pred`; else the
// register is left as it was (the int4 loop multiplies such a row by x = 0, and every word decodes to a
// finite value).
__device__ __forceinline__ unsigned load_code_word(const weight_t* col, unsigned row, unsigned stride, bool pred) {
    unsigned long long a;
    unsigned v;
    asm("mad.wide.u32 %0, %1, %2, %3;" : "=l"(a) : "r"(row), "r"(stride), "l"(col));
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t"
        "@p ld.global.nc.L1::no_allocate.u32 %0, [%1];\n\t}"
        : "=r"(v)
        : "l"(a), "r"((int)pred));
    return v;
}

// The 8 int4 codes of a lane's columns (low nibble of byte j: column 2j, high: 2j + 1) as the fp32
// INT4_BIAS + code, exactly: two masks, then one byte permute per code.
__device__ __forceinline__ void decode_int4(float* out, unsigned word) {
    const unsigned lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        out[2 * j] = __uint_as_float(__byte_perm(lo, INT4_EXP, INT4_SELECT | (j << 8)));
        out[2 * j + 1] = __uint_as_float(__byte_perm(hi, INT4_EXP, INT4_SELECT | (j << 8)));
    }
}
#if QPIPE
// cp.async of the code word at `col` + row * stride into shared `dst` if `pred` (else nothing is copied: the slot
// keeps an earlier word, which decodes to a finite value and meets x = 0).
__device__ __forceinline__ void copy_code_word(unsigned dst, const weight_t* col, unsigned row, unsigned stride,
                                               bool pred) {
    unsigned long long a;
    asm("mad.wide.u32 %0, %1, %2, %3;" : "=l"(a) : "r"(row), "r"(stride), "l"(col));
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t"
                 "@p cp.async.ca.shared.global [%0], [%1], 4;\n\t}" :: "r"(dst), "l"(a), "r"((int)pred) : "memory");
}
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void copies_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
#endif
#endif

#if MMA
// Two fp32 values (exactly representable: masked copies of 16-bit inputs) as one register of the element type,
// `lo` in the low half (the smaller k of a fragment pair).
__device__ __forceinline__ unsigned pack_pair(float lo, float hi) {
    unsigned r;
#if ELEM == 0
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

// Low halves of a and b as (lo, hi) of one register (selector 0x5410), or their high halves (0x7632).
__device__ __forceinline__ unsigned pair_low(unsigned a, unsigned b) { return __byte_perm(a, b, 0x5410); }
__device__ __forceinline__ unsigned pair_high(unsigned a, unsigned b) { return __byte_perm(a, b, 0x7632); }

// c[0..4) += A (16x16, four registers) * B (16x8, two registers), fp32 accumulation.
__device__ __forceinline__ void mma_16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                          unsigned b1) {
#if ELEM == 0
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
#endif
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

#if WFMT == 2
// The int4 loop's change of group: fold the current group's sums in, take the prefetched (scale, zero) vectors
// when the list enters the next group (else load group g's: the list skipped one), then prefetch group g + 1's.
template <int NV, typename Fold, typename Load>
__device__ __forceinline__ void enter_group(int g, int& group, int row_hi, vec_u32x4* s_cur, vec_u32x4* z_cur,
                                            vec_u32x4* s_nxt, vec_u32x4* z_nxt, Fold fold_group, Load load_group) {
    fold_group();
    if (g == group + 1) {
#pragma unroll
        for (int v = 0; v < NV; ++v) { s_cur[v] = s_nxt[v]; z_cur[v] = z_nxt[v]; }
    } else {
        load_group(s_cur, z_cur, g, true);
    }
    group = g;
    load_group(s_nxt, z_nxt, group + 1, (group + 1) * GROUP < row_hi);
}
#endif

#if WFMT == 2
// A step's sum of x per input row (one warp reduction each) into the group's `xsum`.
__device__ __forceinline__ void add_step_x(float* xsum, const float* xl) {
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
        float s = xl[b];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        xsum[b] += s;
    }
}
#endif

__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}

__device__ __forceinline__ void cluster_sync() {
#if SPLIT > 1
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}

#if SPLIT > 1
// The fp32 at shared address `addr` of the cluster's program `rank`.
__device__ __forceinline__ float load_cluster_shared(unsigned addr, unsigned rank) {
    unsigned remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}
#endif

#if STAMPS
#define STAMP_FIELDS 5
enum { STAMP_START, STAMP_WAITED, STAMP_LISTED, STAMP_FIRST, STAMP_STREAMED };  // a warp's row
enum { STAMP_SM, STAMP_MET, STAMP_SUMMED, STAMP_CLUSTERED, STAMP_END };          // the program's row

__device__ __forceinline__ unsigned long long global_time() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) : : "memory");
    return t;
}

// %globaltimer once the loaded register `word` has arrived: the read is predicated on a compare of it (0 if
// `word` is 0xffffffff, a pair of NaN weights). A warp issues in order, so the compare stalls until the load
// is back and the read comes after it (ptxas may turn the predicate into a select after an unpredicated
// read; tests/test_kernels_cuda.py checks in the SASS that the read follows the compare).
__device__ __forceinline__ unsigned long long global_time_after(unsigned word) {
    unsigned long long t;
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %1, 0xffffffff;\n\tmov.u64 %0, 0;\n\t"
                 "@p mov.u64 %0, %%globaltimer;\n\t}" : "=l"(t) : "r"(word) : "memory");
    return t;
}

#define STAMPS_ARG , unsigned long long* __restrict__ stamps
#define STAMP(field) do { if (lane == 0) stamp_warp[field] = global_time(); } while (0)
#define STAMP_AFTER(field, word) do { if (lane == 0) stamp_warp[field] = global_time_after(word); } while (0)
#define STAMP_PROGRAM(field) do { if (threadIdx.x == 0) stamp_program[field] = global_time(); } while (0)
#else
#define STAMPS_ARG
#define STAMP(field) do {} while (0)
#define STAMP_AFTER(field, word) do {} while (0)
#define STAMP_PROGRAM(field) do {} while (0)
#endif

#if SPLIT > 1
#define CLUSTER_DIMS __cluster_dims__(1, SPLIT, 1)
#else
#define CLUSTER_DIMS
#endif

// Shared memory (dynamic): per warp `rows_per_warp` survivor slots (int index + BATCH masked fp32 values),
// reused for the warps' column sums [WARPS][BATCH][BLOCK_N]; then the program's partial sums
// [BATCH][BLOCK_N].
extern "C" __global__ void __launch_bounds__(THREADS, 1) CLUSTER_DIMS teal_sparse_gemv(
    const elem_t* __restrict__ x, const weight_t* __restrict__ w, elem_t* __restrict__ y,
    const float* __restrict__ thresholds, const float* __restrict__ scale,
    int K, int stride_w, int rows_per_split, int rows_per_warp,
    int off1, int off2, int off3, int cb1, int cb2, int cb3, int n_end, int stride_x, int stride_y,
    const elem_t* __restrict__ qscale, const elem_t* __restrict__ qzero, int stride_q STAMPS_ARG) {
    extern __shared__ vec_f32x4 smem_vec[];  // 16-byte aligned
    unsigned char* smem = reinterpret_cast<unsigned char*>(smem_vec);
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int cb = blockIdx.x;
#if STAMPS
    unsigned long long* stamp_program = stamps + (blockIdx.x * gridDim.y + blockIdx.y) * (WARPS + 1) * STAMP_FIELDS;
    unsigned long long* stamp_warp = stamp_program + warp * STAMP_FIELDS;
    stamp_program += WARPS * STAMP_FIELDS;
    STAMP(STAMP_START);
    if (threadIdx.x == 0) {
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        stamp_program[STAMP_SM] = sm;
    }
#endif

    // This column block's segment, its first column and where the segment ends.
    const int seg = (cb >= cb1) + (cb >= cb2) + (cb >= cb3);
    const int seg_col = seg == 0 ? 0 : seg == 1 ? off1 : seg == 2 ? off2 : off3;
    const int seg_cb = seg == 0 ? 0 : seg == 1 ? cb1 : seg == 2 ? cb2 : cb3;
    const int seg_end = seg == 0 ? off1 : seg == 1 ? off2 : seg == 2 ? off3 : n_end;
    const int col0 = seg_col + (cb - seg_cb) * BLOCK_N;

    const int split_row = blockIdx.y * rows_per_split;
    const int row_lo = min(K, split_row + warp * rows_per_warp);
    const int row_hi = min(min(K, split_row + rows_per_split), row_lo + rows_per_warp);

    int* list_idx = reinterpret_cast<int*>(smem) + warp * rows_per_warp;
    float* list_val = reinterpret_cast<float*>(smem) + WARPS * rows_per_warp + warp * rows_per_warp * BATCH;
#if QPIPE
    const int ring_offset = (4 * (1 + BATCH) * WARPS * rows_per_warp + 15) & ~15;  // after the lists
#endif

#if WFMT
    // The lane's code columns, and the first scales (and zeros) it needs: loaded before the wait for the
    // previous kernel (they do not depend on it), so their latency hides behind the listing phase.
    bool col_ok[VECS];
    const weight_t* wcol[VECS];
    int qcol[VECS];
#pragma unroll
    for (int v = 0; v < VECS; ++v) {
        const int col = col0 + v * 32 * EPV + lane * EPV;
        col_ok[v] = col < seg_end;
        wcol[v] = w + (WFMT == 1 ? col : col / 2);
        qcol[v] = col;
    }
    vec_u32x4 s_cur[VECS];
#if WFMT == 1
#pragma unroll
    for (int v = 0; v < VECS; ++v) s_cur[v] = load_stream(qscale + qcol[v], col_ok[v]);
#else
    vec_u32x4 z_cur[VECS], s_nxt[VECS], z_nxt[VECS];
    int group = (unsigned)row_lo / GROUP;
    auto load_group = [&](vec_u32x4* sv, vec_u32x4* zv, int g, bool pred) {
#pragma unroll
        for (int v = 0; v < VECS; ++v) {
            sv[v] = load_stream(qscale + (long long)g * stride_q + qcol[v], pred && col_ok[v]);
            zv[v] = load_stream(qzero + (long long)g * stride_q + qcol[v], pred && col_ok[v]);
        }
    };
    load_group(s_cur, z_cur, group, row_lo < row_hi);
    load_group(s_nxt, z_nxt, group + 1, (group + 1) * GROUP < row_hi);
#endif
#endif
#if PDL == 1
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#if PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    STAMP(STAMP_WAITED);
    const float thr = thresholds[seg];

    // 1. List this warp's surviving rows (ascending; with BATCH > 1 the union, each value masked by its
    //    own row's rule): LIST_STEP rows per lane loaded, then ballots.
    int count = 0;
    const unsigned lanes_below = (1u << lane) - 1u;
    for (int base = row_lo; base < row_hi; base += 32 * LIST_STEP) {
        float v[LIST_STEP][BATCH];
        bool keep[LIST_STEP];
#pragma unroll
        for (int q = 0; q < LIST_STEP; ++q) {
            const int r = base + q * 32 + lane;
            const bool in = r < row_hi;
#if HAS_SCALE
            const float c = in ? scale[seg * K + r] : 0.0f;
#endif
            keep[q] = false;
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
                const float value = in ? input_at(x + b * stride_x, r, K) : 0.0f;
                float score = fabsf(value);
#if HAS_SCALE
                score *= c;
#endif
                const bool kept_b = in && score > thr;
                v[q][b] = kept_b ? value : 0.0f;
                keep[q] |= kept_b;
            }
        }
#pragma unroll
        for (int q = 0; q < LIST_STEP; ++q) {
            const unsigned kept = __ballot_sync(0xffffffffu, keep[q]);
            if (keep[q]) {
                const int slot = count + __popc(kept & lanes_below);
                list_idx[slot] = base + q * 32 + lane;
#pragma unroll
                for (int b = 0; b < BATCH; ++b) list_val[slot * BATCH + b] = v[q][b];
            }
            count += __popc(kept);
        }
    }
    __syncwarp();
    STAMP(STAMP_LISTED);
    if (count == 0) STAMP(STAMP_FIRST);  // no weight step: an empty stage

#if MMA
    // 2'. Stream the listed rows 16 per step into tensor-core products (see MMA above). Fragment of slot s,
    //     pair p: A rows (output columns) g and g + 8 are the lane's columns 2p and 2p + 1; k 2q, 2q+1 are
    //     its rows 0, 1 and k 2q+8, 2q+9 its rows 2, 3; B column g is input row g (zero when g >= BATCH);
    //     C holds columns 2p (c0, c1) and 2p + 1 (c2, c3) of input rows 2q (c0, c2) and 2q + 1 (c1, c3).
    const int q4 = lane & 3;
    const int g8 = lane >> 2;
    float acc[SLOTS][4][4];
#pragma unroll
    for (int sl = 0; sl < SLOTS; ++sl)
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[sl][p][c] = 0.0f;
    bool col_ok[SLOTS];
    const elem_t* wcol[SLOTS];
#pragma unroll
    for (int sl = 0; sl < SLOTS; ++sl) {
        const int col = col0 + sl * 64 + g8 * 8;
        col_ok[sl] = col < seg_end;
        wcol[sl] = w + col;
    }
    for (int i = 0; i < count; i += 16) {
        vec_u32x4 tile[4][SLOTS];  // [row of the lane][slot]
        float xv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int at = i + 2 * q4 + (j & 1) + (j >> 1) * 8;
            const bool live = at < count;
            const int r = live ? list_idx[at] : 0;
#pragma unroll
            for (int sl = 0; sl < SLOTS; ++sl) tile[j][sl] = load_stream(wcol[sl] + (long long)r * stride_w, live && col_ok[sl]);
            xv[j] = (live && g8 < BATCH) ? list_val[at * BATCH + g8] : 0.0f;
        }
        const unsigned b0 = pack_pair(xv[0], xv[1]);
        const unsigned b1 = pack_pair(xv[2], xv[3]);
#pragma unroll
        for (int sl = 0; sl < SLOTS; ++sl) {
            const unsigned u0[4] = {tile[0][sl].x, tile[0][sl].y, tile[0][sl].z, tile[0][sl].w};
            const unsigned u1[4] = {tile[1][sl].x, tile[1][sl].y, tile[1][sl].z, tile[1][sl].w};
            const unsigned u2[4] = {tile[2][sl].x, tile[2][sl].y, tile[2][sl].z, tile[2][sl].w};
            const unsigned u3[4] = {tile[3][sl].x, tile[3][sl].y, tile[3][sl].z, tile[3][sl].w};
#pragma unroll
            for (int p = 0; p < 4; ++p)
                mma_16816(acc[sl][p], pair_low(u0[p], u1[p]), pair_high(u0[p], u1[p]), pair_low(u2[p], u3[p]),
                          pair_high(u2[p], u3[p]), b0, b1);
        }
    }
#elif WFMT
    // 2''. Stream the listed rows' codes: at most UNROLL rows per step, every load of a step issued first, then
    //      decoded and multiplied (int4: into the group's sums, folded in at each change of group).
    float acc[BATCH][LANE_COLS];
#pragma unroll
    for (int b = 0; b < BATCH; ++b)
#pragma unroll
        for (int c = 0; c < LANE_COLS; ++c) acc[b][c] = 0.0f;
#if WFMT == 2
    float gsum[BATCH][LANE_COLS];  // sum of x * q over the current group's listed rows
    float xsum[BATCH];             // sum of x over them
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
        xsum[b] = 0.0f;
#pragma unroll
        for (int c = 0; c < LANE_COLS; ++c) gsum[b][c] = 0.0f;
    }
    auto fold_group = [&]() {  // acc += scale * (sum x (128 + q) - (128 + zero) * sum x), then the sums restart
#pragma unroll
        for (int v = 0; v < VECS; ++v) {
            float sv[EPV], zv[EPV];
            unpack_vector(sv, s_cur[v]);
            unpack_vector(zv, z_cur[v]);
#pragma unroll
            for (int b = 0; b < BATCH; ++b)
#pragma unroll
                for (int e = 0; e < EPV; ++e) {
                    const int c = v * EPV + e;
                    // the sums hold x * (128 + q): the constant joins the zero point
                    acc[b][c] = fmaf(sv[e], fmaf(-(zv[e] + INT4_BIAS), xsum[b], gsum[b][c]), acc[b][c]);
                    gsum[b][c] = 0.0f;
                }
        }
#pragma unroll
        for (int b = 0; b < BATCH; ++b) xsum[b] = 0.0f;
    };
    // The int4 loop (see WFMT): a step takes the listed rows from i on, at most UNROLL, up to the
    // last one of row i's group. Lane l holds listed row i + l (its index, and its values, zero where it is not
    // in the step); the rows of a step are a prefix of the list from i (the list ascends), counted by a ballot.
    // Row u's index and values reach every lane by shuffles, so a row past the step's end multiplies x = 0
    // and needs no predicate (its load is off).
#if QPIPE
    // The same steps through the ring (QPIPE above): a producer cursor `pi` copies step t + QPIPE - 1's words into
    // stage (t + QPIPE - 1) % QPIPE and commits them as one group, then the consumer waits until step t's group is
    // complete and multiplies it. The step past the list commits an empty group, so the count of groups in flight
    // is the same in every iteration.
    const unsigned ring = shared_address(smem + ring_offset) + 4u * (warp * QPIPE * UNROLL * 32 + lane);
    auto step_rows = [&](int i, int& g, int& my_row, bool& mine) {  // rows of the step at list position i: n
        g = (unsigned)list_idx[i] / GROUP;
        const int mine_at = i + lane;
        const bool listed = lane < UNROLL && mine_at < count;
        my_row = listed ? list_idx[mine_at] : 0;
        mine = listed && my_row < (g + 1) * GROUP;
        return __popc(__ballot_sync(0xffffffffu, mine));
    };
    int pi = 0;
    auto issue = [&](int stage) {
        if (pi < count) {  // the same in every lane
            int g, my_row;
            bool mine;
            const int n = step_rows(pi, g, my_row, mine);
            const unsigned dst = ring + 4u * (stage * UNROLL * 32);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (u % INT4_CHUNK == 0 && u >= n) break;
                const unsigned r = (unsigned)__shfl_sync(0xffffffffu, my_row, u);
                copy_code_word(dst + 4u * (u * 32), wcol[0], r, (unsigned)stride_w, u < n && col_ok[0]);
            }
            pi += n;
        }
        copies_commit();
    };
#pragma unroll
    for (int d = 0; d < QPIPE - 1; ++d) issue(d);
    for (int i = 0, stage = 0; i < count; stage = stage + 1 == QPIPE ? 0 : stage + 1) {
        issue(stage == 0 ? QPIPE - 1 : stage - 1);  // (stage + QPIPE - 1) % QPIPE: consumed the step before
        int g, my_row;
        bool mine;
        const int n = step_rows(i, g, my_row, mine);
        if (g != group) enter_group<VECS>(g, group, row_hi, s_cur, z_cur, s_nxt, z_nxt, fold_group, load_group);
        const int mine_at = i + lane;
        float xl[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; ++b) xl[b] = mine ? list_val[mine_at * BATCH + b] : 0.0f;
        add_step_x(xsum, xl);  // the step's sum of x
        copies_wait<QPIPE - 1>();  // this step's group is complete (the lane's own copies)
        const unsigned src = ring + 4u * (stage * UNROLL * 32);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (u % INT4_CHUNK == 0 && u >= n) break;  // the same in every lane
            unsigned word;
            asm volatile("ld.shared.u32 %0, [%1];" : "=r"(word) : "r"(src + 4u * (u * 32)) : "memory");
            float xv[BATCH];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) xv[b] = __shfl_sync(0xffffffffu, xl[b], u);
            float q[EPV];
            decode_int4(q, word);
#pragma unroll
            for (int b = 0; b < BATCH; ++b)
#pragma unroll
                for (int e = 0; e < EPV; ++e) gsum[b][e] = fmaf(xv[b], q[e], gsum[b][e]);
        }
        i += n;
    }
    copies_wait<0>();  // nothing in flight when the shared memory becomes the warps' sums
#else
    for (int i = 0; i < count;) {
        const int g = (unsigned)list_idx[i] / GROUP;  // the same in every lane
        if (g != group) enter_group<VECS>(g, group, row_hi, s_cur, z_cur, s_nxt, z_nxt, fold_group, load_group);
        const int mine_at = i + lane;
        const bool listed = lane < UNROLL && mine_at < count;
        const int my_row = listed ? list_idx[mine_at] : 0;
        const bool mine = listed && my_row < (g + 1) * GROUP;
        const int n = __popc(__ballot_sync(0xffffffffu, mine));  // rows in this step, 1..UNROLL
        float xl[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; ++b) xl[b] = mine ? list_val[mine_at * BATCH + b] : 0.0f;
        unsigned tile[UNROLL][VECS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {  // every load of the step issued before any product
            if (u % INT4_CHUNK == 0 && u >= n) break;  // the same in every lane: short steps issue fewer loads
            const unsigned r = (unsigned)__shfl_sync(0xffffffffu, my_row, u);
#pragma unroll
            for (int v = 0; v < VECS; ++v) tile[u][v] = load_code_word(wcol[v], r, (unsigned)stride_w, u < n && col_ok[v]);
        }
        add_step_x(xsum, xl);  // the step's sum of x
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (u % INT4_CHUNK == 0 && u >= n) break;  // the same in every lane
            float xv[BATCH];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) xv[b] = __shfl_sync(0xffffffffu, xl[b], u);
#pragma unroll
            for (int v = 0; v < VECS; ++v) {
                float q[EPV];
                decode_int4(q, tile[u][v]);
#pragma unroll
                for (int b = 0; b < BATCH; ++b)
#pragma unroll
                    for (int e = 0; e < EPV; ++e) gsum[b][v * EPV + e] = fmaf(xv[b], q[e], gsum[b][v * EPV + e]);
            }
        }
        i += n;
    }
#endif
    fold_group();
#else
    for (int i = 0; i < count; i += UNROLL) {
        qvec_t tile[UNROLL][VECS];
        int rows[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const bool live = i + u < count;
            rows[u] = live ? list_idx[i + u] : 0;
#pragma unroll
            for (int v = 0; v < VECS; ++v)
                tile[u][v] = load_codes(wcol[v] + (long long)rows[u] * stride_w, live && col_ok[v]);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const bool live = i + u < count;
            float xv[BATCH];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) xv[b] = live ? list_val[(i + u) * BATCH + b] : 0.0f;
#pragma unroll
            for (int v = 0; v < VECS; ++v) {
                float q[EPV];
                decode_codes(q, tile[u][v]);
#pragma unroll
                for (int b = 0; b < BATCH; ++b)
#pragma unroll
                    for (int e = 0; e < EPV; ++e) acc[b][v * EPV + e] = fmaf(xv[b], q[e], acc[b][v * EPV + e]);
            }
        }
    }
#pragma unroll
    for (int v = 0; v < VECS; ++v) {  // int8: one scale per column, applied to the sum
        float sv[EPV];
        unpack_vector(sv, s_cur[v]);
#pragma unroll
        for (int b = 0; b < BATCH; ++b)
#pragma unroll
            for (int e = 0; e < EPV; ++e) acc[b][v * EPV + e] *= sv[e];
    }
#endif
#else
    // 2. Stream the listed rows: UNROLL rows per step, every load of a step issued first.
    float acc[BATCH][LANE_COLS];
#pragma unroll
    for (int b = 0; b < BATCH; ++b)
#pragma unroll
        for (int c = 0; c < LANE_COLS; ++c) acc[b][c] = 0.0f;
    bool col_ok[VECS];
    const elem_t* wcol[VECS];
#pragma unroll
    for (int v = 0; v < VECS; ++v) {
        const int col = col0 + v * 32 * EPV + lane * EPV;
        col_ok[v] = col < seg_end;
        wcol[v] = w + col;
    }
    for (int i = 0; i < count; i += UNROLL) {
        vec_u32x4 tile[UNROLL][VECS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const bool live = i + u < count;
            const int r = live ? list_idx[i + u] : 0;
#pragma unroll
            for (int v = 0; v < VECS; ++v)
                tile[u][v] = load_stream(wcol[v] + (long long)r * stride_w, live && col_ok[v]);
        }
        if (i == 0) STAMP_AFTER(STAMP_FIRST, tile[0][0].x);  // lane 0's first vector is always loaded
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const bool live = i + u < count;
#if BATCH == 1
            const float xv = live ? list_val[i + u] : 0.0f;
#pragma unroll
            for (int v = 0; v < VECS; ++v) fma_vector(acc[0] + v * EPV, xv, tile[u][v]);
#else
#pragma unroll
            for (int v = 0; v < VECS; ++v) {
                float wv[EPV];
                unpack_vector(wv, tile[u][v]);
#pragma unroll
                for (int b = 0; b < BATCH; ++b) {
                    const float xv = live ? list_val[(i + u) * BATCH + b] : 0.0f;
#pragma unroll
                    for (int e = 0; e < EPV; ++e) acc[b][v * EPV + e] = fmaf(xv, wv[e], acc[b][v * EPV + e]);
                }
            }
#endif
        }
    }
#endif  // MMA
    STAMP(STAMP_STREAMED);

#if PDL == 2
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif

    // 3. The warps' sums, then this program's partial sums.
    __syncthreads();  // every warp is done with its list
    STAMP_PROGRAM(STAMP_MET);
    float* sums = reinterpret_cast<float*>(smem);                             // [WARPS][BATCH][BLOCK_N]
    float* partial = reinterpret_cast<float*>(smem) + WARPS * BATCH * BLOCK_N;  // [BATCH][BLOCK_N]
#if MMA
#pragma unroll
    for (int sl = 0; sl < SLOTS; ++sl)
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int b = 2 * q4 + h;
                if (b < BATCH) {
                    float* dst = sums + (warp * BATCH + b) * BLOCK_N + sl * 64 + g8 * 8 + 2 * p;
                    dst[0] = acc[sl][p][h];
                    dst[1] = acc[sl][p][2 + h];
                }
            }
#else
#pragma unroll
    for (int b = 0; b < BATCH; ++b)
#pragma unroll
        for (int v = 0; v < VECS; ++v) {
            vec_f32x4* dst = reinterpret_cast<vec_f32x4*>(sums + (warp * BATCH + b) * BLOCK_N + v * 32 * EPV + lane * EPV);
#pragma unroll
            for (int e = 0; e < EPV / 4; ++e)
                dst[e] = vec_f32x4{acc[b][v * EPV + 4 * e], acc[b][v * EPV + 4 * e + 1], acc[b][v * EPV + 4 * e + 2],
                                   acc[b][v * EPV + 4 * e + 3]};
        }
#endif
    __syncthreads();
    for (int c = threadIdx.x; c < BATCH * BLOCK_N; c += THREADS) {
        float s = 0.0f;
#pragma unroll
        for (int wi = 0; wi < WARPS; ++wi) s += sums[wi * BATCH * BLOCK_N + c];
        partial[c] = s;
    }
    STAMP_PROGRAM(STAMP_SUMMED);

    // 4. Add the cluster's partial sums (rank order) and store this program's slice of the columns.
    cluster_sync();
    STAMP_PROGRAM(STAMP_CLUSTERED);
#if SPLIT > 1
    unsigned rank;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const int slice = BLOCK_N / SPLIT;
    const unsigned base_addr = shared_address(partial);
    for (int t = threadIdx.x; t < BATCH * slice; t += THREADS) {
        const int b = t / slice;
        const int c = rank * slice + t % slice;
        float s = 0.0f;
#pragma unroll
        for (int q = 0; q < SPLIT; ++q) s += load_cluster_shared(base_addr + 4u * (b * BLOCK_N + c), q);
        const int col = col0 + c;
        if (col < seg_end) y[b * stride_y + col] = from_f32(s);
    }
    cluster_sync();  // no program leaves while another still reads its shared memory
#else
    for (int t = threadIdx.x; t < BATCH * BLOCK_N; t += THREADS) {
        const int b = t / BLOCK_N;
        const int col = col0 + t % BLOCK_N;
        if (col < seg_end) y[b * stride_y + col] = from_f32(partial[t]);
    }
#endif
    STAMP_PROGRAM(STAMP_END);
}
