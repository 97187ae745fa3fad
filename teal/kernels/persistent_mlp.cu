// Persistent sparse MLP block in one launch (prototype; teal.kernels.persistent compiles it with NVRTC).
//
//   h  = rms_norm(x) * w_norm                                  (engine roundings: fp32 norm, cast, scale)
//   gu = [mask_g(h) @ W_gu[:, :I], mask_u(h) @ W_gu[:, I:]]     mask_j(v) = v * (|v| > t_j), fp32 sums
//   a  = silu(gu[:I]) * gu[I:]                                 (eager PyTorch's roundings)
//   y  = mask_d(a) @ W_d                                       W_gu [K, 2I], W_d [I, H], transposed layout
//
// One grid of G programs (G = resident programs per SM x SMs, from the occupancy API) works through a
// host-built list of work items, each program claiming the next item from one atomic ticket. Items:
//   NORM (ks)     : the RMS statistic of the whole x, then slice ks of h (K / KS rows) thresholded for gate
//                   and up; the slice's two survivor lists (ascending row, fp32 value) and counts are
//                   published, then flag_norm[ks] is released.
//   GATE_UP (cb,ks): waits for flag_norm[ks]; streams the listed rows of slice ks for the GU_BN gate columns
//                   and the GU_BN up columns of column block cb, writes its fp32 partial sums. The last of
//                   the KS tiles of cb (a counter) adds the partials in slice order, rounds gate and up,
//                   forms a = silu(gate) * up for those GU_BN channels, thresholds it and publishes the
//                   channels' survivor list as slice cb of down's input (flag_mid[cb]).
//   DOWN (g,cd)   : for each slice s of group g (D_GROUP slices), waits for flag_mid[s] and streams its listed
//                   rows for the D_BN output columns of block cd; the last group to finish column block cd
//                   adds the groups' partials in order and stores y.
// Every item waits only for items earlier in the list (the host checks it), and an item is claimed only by
// a running program, so the waits cannot deadlock whatever the number of resident programs.
//
// Control words (int32, zero between calls: finishers reset their counters, the last program to leave
// resets the ticket, the exit count and the flags): see CTRL_* below. A spin that exceeds spin_limit polls
// records (1, item, what, index, program) at ctrl[CTRL_ERR..] and gives up; every other spin then gives up
// too, so a broken schedule returns with a report instead of hanging.
// TIMING: per item, globaltimer at claim, after its (first) wait, at its end, and (SM id, program) -> stamps.
//
// No header is included (NVRTC may run without the CUDA include directory). Macros, set by the host:
//   ELEM 0 bf16, 1 fp16, 2 fp32; WARPS warps per program; GU_VECS / D_VECS 16-byte vectors per lane and row
//   of the gate|up / down tiles; UNROLL rows per warp and step; TIMING 0/1; MIN_BLOCKS launch bound.

#if ELEM == 2
typedef float elem_t;
#define EPV 4
#else
typedef unsigned short elem_t;
#define EPV 8
#endif

#define THREADS (WARPS * 32)
#define GU_BN (32 * EPV * GU_VECS)
#define D_BN (32 * EPV * D_VECS)
#define MAX_BN (GU_BN > D_BN ? GU_BN : D_BN)

#define OP_NORM 0
#define OP_GATE_UP 1
#define OP_DOWN 2

#define CTRL_TICKET 0
#define CTRL_EXITED 32
#define CTRL_ERR 64
#define CTRL_FLAG_NORM 128   // [KS], KS <= 64
#define CTRL_FLAG_MID 256    // [NCB], NCB <= 512
#define CTRL_CNT_GU 1024     // [NCB]
#define CTRL_CNT_D 1536      // [NCD], NCD <= 512
#define CTRL_WORDS 2048

struct alignas(16) vec_u32x4 { unsigned x, y, z, w; };
struct alignas(16) item_t { int op, a, b, pad; };

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

__device__ __forceinline__ float round_elem(float f) { return to_f32(from_f32(f)); }

// Weights: streamed through the read-only path (never written during the kernel).
__device__ __forceinline__ vec_u32x4 load_stream(const elem_t* p, bool pred) {
    vec_u32x4 v;
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %5, 0;\n\t"
        "mov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\tmov.b32 %2, 0;\n\tmov.b32 %3, 0;\n\t"
        "@p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n\t}"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "r"((int)pred));
    return v;
}

// Data written by other programs during this launch: read at L2 (never a stale L1 line).
__device__ __forceinline__ int load_cg_int(const int* p) {
    int v;
    asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ float load_cg_f32(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ int load_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void store_release(int* p, int v) {
    asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Atomics and the sleep in PTX (NVRTC without headers: no dependence on which builtins it declares).
__device__ __forceinline__ int atomic_add(int* p, int v) {
    int old;
    asm volatile("atom.add.gpu.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}
__device__ __forceinline__ int atomic_cas(int* p, int expected, int desired) {
    int old;
    asm volatile("atom.cas.gpu.global.b32 %0, [%1], %2, %3;" : "=r"(old) : "l"(p), "r"(expected), "r"(desired) : "memory");
    return old;
}
__device__ __forceinline__ void sleep_ns(unsigned ns) { asm volatile("nanosleep.u32 %0;" ::"r"(ns)); }
__device__ __forceinline__ unsigned long long global_time() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned sm_id() {
    unsigned s;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
    return s;
}

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

// Thread 0 waits until *flag is set. False when the spin gave up (the report is in ctrl[CTRL_ERR..]).
__device__ bool wait_flag(const int* flag, int* ctrl, long long spin_limit, int item, int what, int index) {
    long long n = 0;
    while (load_acquire(flag) == 0) {
        if ((++n & 255) == 0 && load_cg_int(ctrl + CTRL_ERR) != 0) return false;  // someone else gave up
        if (n > spin_limit) {
            if (atomic_cas(ctrl + CTRL_ERR, 0, 1) == 0) {
                ctrl[CTRL_ERR + 1] = item;
                ctrl[CTRL_ERR + 2] = what;
                ctrl[CTRL_ERR + 3] = index;
                ctrl[CTRL_ERR + 4] = blockIdx.x;
                __threadfence();
            }
            return false;
        }
        sleep_ns(100);
    }
    return true;
}

// Block-wide ordered compaction: this thread's slot among the kept entries (valid where keep), and the total.
__device__ __forceinline__ int compact_slot(bool keep, int* s_warp, int* total) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const unsigned kept = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) s_warp[warp] = __popc(kept);
    __syncthreads();
    int before = 0, all = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        const int c = s_warp[w];
        before += w < warp ? c : 0;
        all += c;
    }
    __syncthreads();  // s_warp is reused by the next call
    *total = all;
    return before + __popc(kept & ((1u << lane) - 1u));
}

// acc[0 .. VECS*EPV) += sum over list entries [lo, hi) of val * w[idx * stride + col .. + VECS*EPV): each lane
// loads the entries 32 at a time, then UNROLL rows per step are broadcast and all their loads issued first.
template <int VECS>
__device__ __forceinline__ void stream_rows(float* acc, const int* __restrict__ lidx, const float* __restrict__ lval,
                                            int lo, int hi, const elem_t* __restrict__ wcol, long long stride) {
    const int lane = threadIdx.x & 31;
    for (int i0 = lo; i0 < hi; i0 += 32) {
        const int e = i0 + lane;
        const bool in = e < hi;
        const int my_idx = in ? load_cg_int(lidx + e) : 0;
        const float my_val = in ? load_cg_f32(lval + e) : 0.0f;
        const int n = min(32, hi - i0);
        for (int j = 0; j < n; j += UNROLL) {
            vec_u32x4 tile[UNROLL][VECS];
            float xv[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const bool live = j + u < n;
                const int r = __shfl_sync(0xffffffffu, my_idx, (j + u) & 31);
                const float v = __shfl_sync(0xffffffffu, my_val, (j + u) & 31);
                xv[u] = live ? v : 0.0f;
#pragma unroll
                for (int q = 0; q < VECS; ++q) tile[u][q] = load_stream(wcol + (long long)r * stride + q * 32 * EPV, live);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                for (int q = 0; q < VECS; ++q) fma_vector(acc + q * EPV, xv[u], tile[u][q]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) teal_persistent_mlp(
    const elem_t* __restrict__ x, const elem_t* __restrict__ norm_w, const elem_t* __restrict__ w_gu,
    const elem_t* __restrict__ w_d, elem_t* __restrict__ h_out, elem_t* __restrict__ gu_out, elem_t* __restrict__ y,
    const float* __restrict__ thr, int* list_norm_idx, float* list_norm_val, int* count_norm, int* list_mid_idx,
    float* list_mid_val, int* count_mid, float* part_gu, float* part_d, int* ctrl, const item_t* __restrict__ items,
    int n_items, int K, int I, int H, int KS, int d_group, float eps, long long spin_limit,
    unsigned long long* stamps) {
    __shared__ float sums[WARPS * 2 * MAX_BN];
    __shared__ float s_red[WARPS];
    __shared__ int s_warp[WARPS];
    __shared__ int s_item;
    __shared__ int s_flag;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rows_norm = K / KS;
    const int ncb = I / GU_BN;
    const int ngroups = (ncb + d_group - 1) / d_group;
    bool failed = false;

    for (;;) {
        if (tid == 0) s_item = atomic_add(ctrl + CTRL_TICKET, 1);
        __syncthreads();
        const int t = s_item;
        __syncthreads();
        if (t >= n_items || failed) break;
        const item_t it = items[t];
#if TIMING
        if (tid == 0) stamps[4 * t] = global_time();
#endif
        if (it.op == OP_NORM) {
            // ---- RMS statistic of the whole x, then this slice of h, thresholded for gate and up.
            const int ks = it.a;
            float ss = 0.0f;
            for (int i = tid; i < K; i += THREADS) {
                const float v = to_f32(x[i]);
                ss = fmaf(v, v, ss);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            if (lane == 0) s_red[warp] = ss;
            __syncthreads();
            float total_ss = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) total_ss += s_red[w];
            const float r = rsqrtf(total_ss / (float)K + eps);
            const float tg = thr[0], tu = thr[1];
            const int lo = ks * rows_norm, hi = lo + rows_norm;
            int cg = 0, cu = 0;
            for (int base = lo; base < hi; base += THREADS) {
                const int i = base + tid;
                const bool in = i < hi;
                const float hv = in ? round_elem(round_elem(to_f32(x[i]) * r) * to_f32(norm_w[i])) : 0.0f;
                if (in) h_out[i] = from_f32(hv);
                const bool kg = in && fabsf(hv) > tg;
                const bool ku = in && fabsf(hv) > tu;
                int ng, nu;
                const int sg = compact_slot(kg, s_warp, &ng);
                const int su = compact_slot(ku, s_warp, &nu);
                if (kg) { list_norm_idx[lo + cg + sg] = i; list_norm_val[lo + cg + sg] = hv; }
                if (ku) { list_norm_idx[K + lo + cu + su] = i; list_norm_val[K + lo + cu + su] = hv; }
                cg += ng;
                cu += nu;
            }
            if (tid == 0) { count_norm[ks] = cg; count_norm[KS + ks] = cu; }
            __threadfence();
            __syncthreads();
#if TIMING
            if (tid == 0) stamps[4 * t + 1] = global_time();
#endif
            if (tid == 0) store_release(ctrl + CTRL_FLAG_NORM + ks, 1);
        } else if (it.op == OP_GATE_UP) {
            // ---- gate and up columns of block cb over the listed rows of slice ks.
            const int cb = it.a, ks = it.b;
            if (tid == 0) s_flag = wait_flag(ctrl + CTRL_FLAG_NORM + ks, ctrl, spin_limit, t, OP_NORM, ks);
            __syncthreads();
            if (!s_flag) { failed = true; continue; }
#if TIMING
            if (tid == 0) stamps[4 * t + 1] = global_time();
#endif
            const int lo = ks * rows_norm;
            for (int seg = 0; seg < 2; ++seg) {
                const int cnt = load_cg_int(count_norm + seg * KS + ks);
                const int chunk = (cnt + WARPS - 1) / WARPS;
                const int a = min(cnt, warp * chunk), b = min(cnt, a + chunk);
                float acc[GU_VECS * EPV];
#pragma unroll
                for (int c = 0; c < GU_VECS * EPV; ++c) acc[c] = 0.0f;
                stream_rows<GU_VECS>(acc, list_norm_idx + seg * K + lo, list_norm_val + seg * K + lo, a, b,
                                     w_gu + seg * I + cb * GU_BN + lane * EPV, 2LL * I);
                float* dst = sums + (warp * 2 + seg) * MAX_BN;
#pragma unroll
                for (int q = 0; q < GU_VECS; ++q)
#pragma unroll
                    for (int e = 0; e < EPV; ++e) dst[q * 32 * EPV + lane * EPV + e] = acc[q * EPV + e];
            }
            __syncthreads();
            for (int c = tid; c < 2 * GU_BN; c += THREADS) {
                const int seg = c / GU_BN, col = c % GU_BN;
                float s = 0.0f;
#pragma unroll
                for (int w = 0; w < WARPS; ++w) s += sums[(w * 2 + seg) * MAX_BN + col];
                part_gu[(long long)ks * 2 * I + seg * I + cb * GU_BN + col] = s;
            }
            __threadfence();
            __syncthreads();
            if (tid == 0) s_flag = atomic_add(ctrl + CTRL_CNT_GU + cb, 1) == KS - 1;
            __syncthreads();
            if (s_flag) {  // the last slice of column block cb: SiLU * up, threshold, publish slice cb of down's input
                __threadfence();
                const float td = thr[2];
                int cm = 0;
                for (int base = 0; base < GU_BN; base += THREADS) {
                    const int col = base + tid;
                    const bool in = col < GU_BN;
                    float a = 0.0f;
                    if (in) {
                        float g = 0.0f, u = 0.0f;
                        for (int q = 0; q < KS; ++q) {
                            g += load_cg_f32(part_gu + (long long)q * 2 * I + cb * GU_BN + col);
                            u += load_cg_f32(part_gu + (long long)q * 2 * I + I + cb * GU_BN + col);
                        }
                        const elem_t gb = from_f32(g), ub = from_f32(u);
                        gu_out[cb * GU_BN + col] = gb;
                        gu_out[I + cb * GU_BN + col] = ub;
                        const float gf = to_f32(gb);
                        a = round_elem(round_elem(gf / (1.0f + expf(-gf))) * to_f32(ub));
                    }
                    const bool keep = in && fabsf(a) > td;
                    int nk;
                    const int slot = compact_slot(keep, s_warp, &nk);
                    if (keep) {
                        list_mid_idx[cb * GU_BN + cm + slot] = cb * GU_BN + col;
                        list_mid_val[cb * GU_BN + cm + slot] = a;
                    }
                    cm += nk;
                }
                if (tid == 0) { count_mid[cb] = cm; ctrl[CTRL_CNT_GU + cb] = 0; }
                __threadfence();
                __syncthreads();
                if (tid == 0) store_release(ctrl + CTRL_FLAG_MID + cb, 1);
            }
        } else {
            // ---- down: output columns of block cd over the listed channels of the group's slices.
            const int g = it.a, cd = it.b;
            float acc[D_VECS * EPV];
#pragma unroll
            for (int c = 0; c < D_VECS * EPV; ++c) acc[c] = 0.0f;
            const int s_end = min(ncb, (g + 1) * d_group);
            for (int s = g * d_group; s < s_end; ++s) {
                if (tid == 0) s_flag = wait_flag(ctrl + CTRL_FLAG_MID + s, ctrl, spin_limit, t, OP_GATE_UP, s);
                __syncthreads();
                if (!s_flag) { failed = true; break; }
#if TIMING
                if (tid == 0 && s == g * d_group) stamps[4 * t + 1] = global_time();  // first slice ready
#endif
                const int cnt = load_cg_int(count_mid + s);
                const int chunk = (cnt + WARPS - 1) / WARPS;
                const int a = min(cnt, warp * chunk), b = min(cnt, a + chunk);
                stream_rows<D_VECS>(acc, list_mid_idx + s * GU_BN, list_mid_val + s * GU_BN, a, b,
                                    w_d + cd * D_BN + lane * EPV, (long long)H);
            }
            if (failed) continue;
#pragma unroll
            for (int q = 0; q < D_VECS; ++q)
#pragma unroll
                for (int e = 0; e < EPV; ++e) sums[warp * MAX_BN + q * 32 * EPV + lane * EPV + e] = acc[q * EPV + e];
            __syncthreads();
            for (int c = tid; c < D_BN; c += THREADS) {
                float s = 0.0f;
#pragma unroll
                for (int w = 0; w < WARPS; ++w) s += sums[w * MAX_BN + c];
                part_d[(long long)g * H + cd * D_BN + c] = s;
            }
            __threadfence();
            __syncthreads();
            if (tid == 0) s_flag = atomic_add(ctrl + CTRL_CNT_D + cd, 1) == ngroups - 1;
            __syncthreads();
            if (s_flag) {  // the last group of column block cd: add the groups' partials in order, store y
                __threadfence();
                for (int c = tid; c < D_BN; c += THREADS) {
                    float s = 0.0f;
                    for (int q = 0; q < ngroups; ++q) s += load_cg_f32(part_d + (long long)q * H + cd * D_BN + c);
                    y[cd * D_BN + c] = from_f32(s);
                }
                if (tid == 0) ctrl[CTRL_CNT_D + cd] = 0;
            }
        }
#if TIMING
        if (tid == 0) {
            stamps[4 * t + 2] = global_time();
            stamps[4 * t + 3] = ((unsigned long long)sm_id() << 32) | blockIdx.x;
        }
#endif
        __syncthreads();  // sums / s_flag are reused by the next item
    }

    // The last program to leave resets the ticket, the exit count and the flags for the next call.
    if (tid == 0) {
        __threadfence();
        if (atomic_add(ctrl + CTRL_EXITED, 1) == (int)gridDim.x - 1) {
            __threadfence();
            for (int i = 0; i < KS; ++i) ctrl[CTRL_FLAG_NORM + i] = 0;
            for (int i = 0; i < ncb; ++i) ctrl[CTRL_FLAG_MID + i] = 0;
            ctrl[CTRL_TICKET] = 0;
            ctrl[CTRL_EXITED] = 0;
            __threadfence();
        }
    }
}
