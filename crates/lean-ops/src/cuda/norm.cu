// Train-mode BatchNorm fused with its activation, and the residual add + activation, on CUDA
// (crates/lean-ops/src/cuda.rs), for f32 and f64, NCHW. The same semantics as the CPU ops in
// norm.rs and activation.rs: statistics in double with the channel's first value as a shift
// (one pass, no cancellation), the biased variance for normalising, act in {0 none, 1 ReLU,
// 2 ReLU6} and its gradient passed where 0 < y (< 6). Reductions are fixed-order trees: the
// results do not depend on scheduling.

template <typename T>
__device__ T act_apply(T v, int act) {
    if (act == 0) return v;
    v = v > T(0) ? v : T(0);
    return act == 2 && v > T(6) ? T(6) : v;
}

template <typename T>
__device__ T act_grad(T g, T y, int act) {
    if (act == 0) return g;
    return (y > T(0) && (act == 1 || y < T(6))) ? g : T(0);
}

// Sum of a and b over the block's threads, left in a[0], b[0] (blockDim.x a power of two).
__device__ void block_sum2(double* a, double* b) {
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            a[threadIdx.x] += a[threadIdx.x + stride];
            b[threadIdx.x] += b[threadIdx.x + stride];
        }
        __syncthreads();
    }
}

// stats (3, C): mean, biased variance, 1/sqrt(var + eps) of each channel; one block a channel.
template <typename T>
__device__ void bn_stats(const T* x, double* stats, int n, int c, int hw, double eps) {
    extern __shared__ double red[];
    double* s = red;
    double* q = red + blockDim.x;
    const long m = (long)n * hw;
    for (int ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const double k = m > 0 ? (double)x[(long)ch * hw] : 0.0;
        double ls = 0, lq = 0;
        for (long i = threadIdx.x; i < m; i += blockDim.x) {
            const double v = (double)x[((i / hw) * c + ch) * (long)hw + i % hw] - k;
            ls += v;
            lq += v * v;
        }
        s[threadIdx.x] = ls;
        q[threadIdx.x] = lq;
        block_sum2(s, q);
        if (threadIdx.x == 0) {
            const double d = s[0] / (double)m;
            double var = q[0] / (double)m - d * d;
            var = var > 0 ? var : 0;
            stats[ch] = k + d;
            stats[c + ch] = var;
            stats[2 * c + ch] = 1.0 / sqrt(var + eps);
        }
        __syncthreads();
    }
}

// y = act(x · scale + shift), scale = w · invstd, shift = b - mean · scale (in T, as on the CPU).
template <typename T>
__device__ void bn_apply(const T* x, const T* w, const T* b, const double* stats, T* y, int n, int c, int hw, int act) {
    const long total = (long)n * c * hw;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int ch = (i / hw) % c;
        const T scale = w[ch] * (T)stats[2 * c + ch];
        const T shift = b[ch] - (T)stats[ch] * scale;
        y[i] = act_apply<T>(x[i] * scale + shift, act);
    }
}

// sums (2, C): Σ gz and Σ gz · (x - mean), gz = the gradient before the activation.
template <typename T>
__device__ void bn_grad_sums(const T* gy, const T* y, const T* x, const double* stats, double* sums, int n, int c,
                             int hw, int act) {
    extern __shared__ double red[];
    double* s = red;
    double* sx = red + blockDim.x;
    const long m = (long)n * hw;
    for (int ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const double mean = stats[ch];
        double ls = 0, lx = 0;
        for (long i = threadIdx.x; i < m; i += blockDim.x) {
            const long at = ((i / hw) * c + ch) * (long)hw + i % hw;
            const double gz = (double)act_grad<T>(gy[at], y[at], act);
            ls += gz;
            lx += gz * ((double)x[at] - mean);
        }
        s[threadIdx.x] = ls;
        sx[threadIdx.x] = lx;
        block_sum2(s, sx);
        if (threadIdx.x == 0) {
            sums[ch] = s[0];
            sums[c + ch] = sx[0];
        }
        __syncthreads();
    }
}

// gx = w·invstd · (gz - Σgz/m - xhat · invstd·Σgz(x-mean)/m), xhat = (x - mean)·invstd.
// m: the number of values per channel the statistics span (n·hw, or more under SyncBN).
template <typename T>
__device__ void bn_grad_input(const T* gy, const T* y, const T* x, const T* w, const double* stats, const double* sums,
                              T* gx, int n, int c, int hw, int act, double m) {
    const long total = (long)n * c * hw;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int ch = (i / hw) % c;
        const double mean = stats[ch], is = stats[2 * c + ch];
        const double xhat = ((double)x[i] - mean) * is;
        const double gz = (double)act_grad<T>(gy[i], y[i], act);
        gx[i] = (T)((double)w[ch] * is * (gz - sums[ch] / m - xhat * is * sums[c + ch] / m));
    }
}

template <typename T>
__device__ void add_act(const T* a, const T* b, T* y, long long total, int act) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x)
        y[i] = act_apply<T>(a[i] + b[i], act);
}

template <typename T>
__device__ void act_backward(const T* gy, const T* y, T* gz, long long total, int act) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x)
        gz[i] = act_grad<T>(gy[i], y[i], act);
}

#define LEAN_NORM_KERNELS(T, SUFFIX)                                                                           \
    extern "C" __global__ void bn_stats_##SUFFIX(const T* x, double* stats, int n, int c, int hw, double eps) { \
        bn_stats<T>(x, stats, n, c, hw, eps);                                                                  \
    }                                                                                                          \
    extern "C" __global__ void bn_apply_##SUFFIX(const T* x, const T* w, const T* b, const double* stats, T* y,  \
                                                 int n, int c, int hw, int act) {                              \
        bn_apply<T>(x, w, b, stats, y, n, c, hw, act);                                                         \
    }                                                                                                          \
    extern "C" __global__ void bn_grad_sums_##SUFFIX(const T* gy, const T* y, const T* x, const double* stats,  \
                                                     double* sums, int n, int c, int hw, int act) {            \
        bn_grad_sums<T>(gy, y, x, stats, sums, n, c, hw, act);                                                 \
    }                                                                                                          \
    extern "C" __global__ void bn_grad_input_##SUFFIX(const T* gy, const T* y, const T* x, const T* w,         \
                                                      const double* stats, const double* sums, T* gx, int n,   \
                                                      int c, int hw, int act, double m) {                      \
        bn_grad_input<T>(gy, y, x, w, stats, sums, gx, n, c, hw, act, m);                                      \
    }                                                                                                          \
    extern "C" __global__ void add_act_##SUFFIX(const T* a, const T* b, T* y, long long total, int act) {            \
        add_act<T>(a, b, y, total, act);                                                                       \
    }                                                                                                          \
    extern "C" __global__ void act_backward_##SUFFIX(const T* gy, const T* y, T* gz, long long total, int act) {     \
        act_backward<T>(gy, y, gz, total, act);                                                                \
    }

LEAN_NORM_KERNELS(float, f32)
LEAN_NORM_KERNELS(double, f64)
