// The grouped sparse-stencil convolution of a lean convolution on CUDA (docs/lean-conv.md):
// forward, input gradient and stencil-weight gradient, for f32 and f64. Compiled at run time by
// NVRTC (crates/lean-ops/src/cuda.rs). Every kernel gathers (no atomics): results do not depend
// on scheduling, and each output element is written by exactly one thread.
//
// Geometry: x (N, Cin, H, W), q (Cout, g, T), y (N, Cout, Ho, Wo); the groups are Cin / g, each
// of Cout / groups = opg outputs; output o reads input channels (o / opg)·g + j, j < g, at the
// taps (dy, dx) of the stencil: input row ho·s + dy·d, column wo·s + dx·d (zero outside).
// taps[2t], taps[2t+1] = dy, dx of tap t.

template <typename T>
__device__ void stencil_fwd(const T* x, const T* q, T* y, const int* taps, int n, int cin, int h, int w,
                            int cout, int ho, int wo, int g, int opg, int s, int d, int nt) {
    const long total = (long)n * cout * ho * wo;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int ow = i % wo;
        const int oh = (i / wo) % ho;
        const int o = (i / ((long)wo * ho)) % cout;
        const long b = i / ((long)wo * ho * cout);
        const int c0 = (o / opg) * g;
        T acc = 0;
        for (int j = 0; j < g; ++j) {
            const T* xp = x + (b * cin + c0 + j) * (long)h * w;
            const T* qp = q + ((long)o * g + j) * nt;
            for (int t = 0; t < nt; ++t) {
                const int iy = oh * s + taps[2 * t] * d;
                const int ix = ow * s + taps[2 * t + 1] * d;
                if (iy >= 0 && iy < h && ix >= 0 && ix < w) acc += qp[t] * xp[(long)iy * w + ix];
            }
        }
        y[i] = acc;
    }
}

// gx[b, c, iy, ix] = sum over the outputs o of c's group and the taps t that read (iy, ix) from
// an output pixel (oh, ow) of q[o, c mod g, t] · gy[b, o, oh, ow].
template <typename T>
__device__ void stencil_grad_input(const T* gy, const T* q, T* gx, const int* taps, int n, int cin, int h, int w,
                                   int cout, int ho, int wo, int g, int opg, int s, int d, int nt) {
    const long total = (long)n * cin * h * w;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int ix = i % w;
        const int iy = (i / w) % h;
        const int c = (i / ((long)w * h)) % cin;
        const long b = i / ((long)w * h * cin);
        const int grp = c / g, j = c % g;
        T acc = 0;
        for (int t = 0; t < nt; ++t) {
            const int py = iy - taps[2 * t] * d, px = ix - taps[2 * t + 1] * d;
            if (py < 0 || px < 0 || py % s != 0 || px % s != 0) continue;
            const int oh = py / s, ow = px / s;
            if (oh >= ho || ow >= wo) continue;
            for (int k = 0; k < opg; ++k) {
                const int o = grp * opg + k;
                acc += q[((long)o * g + j) * nt + t] * gy[((b * cout + o) * ho + oh) * (long)wo + ow];
            }
        }
        gx[i] = acc;
    }
}

// gq[o, j, t] = sum over b, oh, ow of gy[b, o, oh, ow] · x[b, (o / opg)·g + j, tap]: one block per
// weight, a fixed-order tree reduction over its threads.
template <typename T>
__device__ void stencil_grad_weight(const T* gy, const T* x, T* gq, const int* taps, int n, int cin, int h, int w,
                                    int cout, int ho, int wo, int g, int opg, int s, int d, int nt) {
    extern __shared__ unsigned char smem[];
    T* part = reinterpret_cast<T*>(smem);
    const long weights = (long)cout * g * nt;
    for (long e = blockIdx.x; e < weights; e += gridDim.x) {
        const int t = e % nt;
        const int j = (e / nt) % g;
        const int o = e / ((long)nt * g);
        const int c = (o / opg) * g + j;
        const int dy = taps[2 * t] * d, dx = taps[2 * t + 1] * d;
        T acc = 0;
        const long pixels = (long)n * ho * wo;
        for (long p = threadIdx.x; p < pixels; p += blockDim.x) {
            const int ow = p % wo;
            const int oh = (p / wo) % ho;
            const long b = p / ((long)wo * ho);
            const int iy = oh * s + dy, ix = ow * s + dx;
            if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                acc += gy[((b * cout + o) * ho + oh) * (long)wo + ow] * x[((b * cin + c) * h + iy) * (long)w + ix];
        }
        part[threadIdx.x] = acc;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
            if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
            __syncthreads();
        }
        if (threadIdx.x == 0) gq[e] = part[0];
        __syncthreads();
    }
}

#define LEAN_STENCIL_KERNELS(T, SUFFIX)                                                                        \
    extern "C" __global__ void stencil_fwd_##SUFFIX(const T* x, const T* q, T* y, const int* taps, int n,     \
                                                    int cin, int h, int w, int cout, int ho, int wo, int g,     \
                                                    int opg, int s, int d, int nt) {                            \
        stencil_fwd<T>(x, q, y, taps, n, cin, h, w, cout, ho, wo, g, opg, s, d, nt);                          \
    }                                                                                                          \
    extern "C" __global__ void stencil_grad_input_##SUFFIX(const T* gy, const T* q, T* gx, const int* taps,   \
                                                           int n, int cin, int h, int w, int cout, int ho,      \
                                                           int wo, int g, int opg, int s, int d, int nt) {      \
        stencil_grad_input<T>(gy, q, gx, taps, n, cin, h, w, cout, ho, wo, g, opg, s, d, nt);                 \
    }                                                                                                          \
    extern "C" __global__ void stencil_grad_weight_##SUFFIX(const T* gy, const T* x, T* gq, const int* taps,  \
                                                            int n, int cin, int h, int w, int cout, int ho,     \
                                                            int wo, int g, int opg, int s, int d, int nt) {     \
        stencil_grad_weight<T>(gy, x, gq, taps, n, cin, h, w, cout, ho, wo, g, opg, s, d, nt);                \
    }

LEAN_STENCIL_KERNELS(float, f32)
LEAN_STENCIL_KERNELS(double, f64)
