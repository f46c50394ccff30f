// Runs the CUDA stencil kernels of src/cuda/stencil.cu on the host, one emulated thread per
// block and one block (their grid-stride loops then cover every element), against oracles
// that share no code with them: a dense 3x3 convolution with the stencil scattered into its
// kernel (the spec's definition of the operator), and for the two gradients the adjoint
// identities <gx, x> = <gy, y(x)> and <gq, q> = <gy, y(q)> (the op is linear in each).
// Exercises the index arithmetic, not the parallel reduction (tests/cuda.rs does that on a GPU).
// Prints one line per case and exits non-zero on the first mismatch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

struct Dim3 { long x; };
static Dim3 blockIdx{0}, threadIdx{0}, blockDim{1}, gridDim{1};
#define __device__
#define __global__
#define __shared__
static inline void __syncthreads() {}
unsigned char smem[1 << 16];

#include "../../src/cuda/stencil.cu"

static unsigned long long rng = 88172645463325252ull;
static double uniform() {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

struct Case { const char* name; int n, cin, h, w, cout, g, s, d; std::vector<int> taps; };

static double dot(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0; for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i]; return s;
}

static bool run(const Case& k) {
    const int nt = (int)k.taps.size() / 2, groups = k.cin / k.g, opg = k.cout / groups;
    const int ho = (k.h - 1) / k.s + 1, wo = (k.w - 1) / k.s + 1;
    std::vector<double> x((size_t)k.n * k.cin * k.h * k.w), q((size_t)k.cout * k.g * nt),
        gy((size_t)k.n * k.cout * ho * wo), y(gy.size()), gx(x.size()), gq(q.size());
    for (auto* v : {&x, &q, &gy}) for (auto& e : *v) e = uniform();
    stencil_fwd_f64(x.data(), q.data(), y.data(), k.taps.data(), k.n, k.cin, k.h, k.w, k.cout, ho, wo, k.g, opg, k.s, k.d, nt);
    // Oracle: dense 3x3 (dilation d, padding d, stride s) with kernel K[o, c, 1+dy, 1+dx].
    std::vector<double> K((size_t)k.cout * k.cin * 9, 0.0);
    for (int o = 0; o < k.cout; ++o)
        for (int j = 0; j < k.g; ++j)
            for (int t = 0; t < nt; ++t) {
                const int c = (o / opg) * k.g + j;
                K[((size_t)o * k.cin + c) * 9 + (1 + k.taps[2 * t]) * 3 + (1 + k.taps[2 * t + 1])] += q[((size_t)o * k.g + j) * nt + t];
            }
    double worst = 0;
    for (int b = 0; b < k.n; ++b)
        for (int o = 0; o < k.cout; ++o)
            for (int oh = 0; oh < ho; ++oh)
                for (int ow = 0; ow < wo; ++ow) {
                    double acc = 0;
                    for (int c = 0; c < k.cin; ++c)
                        for (int ky = 0; ky < 3; ++ky)
                            for (int kx = 0; kx < 3; ++kx) {
                                const int iy = oh * k.s + (ky - 1) * k.d, ix = ow * k.s + (kx - 1) * k.d;
                                if (iy < 0 || iy >= k.h || ix < 0 || ix >= k.w) continue;
                                acc += K[((size_t)o * k.cin + c) * 9 + ky * 3 + kx] * x[(((size_t)b * k.cin + c) * k.h + iy) * k.w + ix];
                            }
                    const double got = y[(((size_t)b * k.cout + o) * ho + oh) * wo + ow];
                    worst = std::fmax(worst, std::fabs(got - acc));
                }
    stencil_grad_input_f64(gy.data(), q.data(), gx.data(), k.taps.data(), k.n, k.cin, k.h, k.w, k.cout, ho, wo, k.g, opg, k.s, k.d, nt);
    stencil_grad_weight_f64(gy.data(), x.data(), gq.data(), k.taps.data(), k.n, k.cin, k.h, k.w, k.cout, ho, wo, k.g, opg, k.s, k.d, nt);
    const double gyy = dot(gy, y);
    const double e_in = std::fabs(dot(gx, x) - gyy) / std::fmax(1.0, std::fabs(gyy));
    const double e_w = std::fabs(dot(gq, q) - gyy) / std::fmax(1.0, std::fabs(gyy));
    // f32 instantiation: the same kernels in single precision against the f64 output.
    std::vector<float> xf(x.begin(), x.end()), qf(q.begin(), q.end()), yf(y.size());
    stencil_fwd_f32(xf.data(), qf.data(), yf.data(), k.taps.data(), k.n, k.cin, k.h, k.w, k.cout, ho, wo, k.g, opg, k.s, k.d, nt);
    double e_f32 = 0;
    for (size_t i = 0; i < y.size(); ++i) e_f32 = std::fmax(e_f32, std::fabs(yf[i] - y[i]));
    const bool ok = worst < 1e-12 && e_in < 1e-12 && e_w < 1e-12 && e_f32 < 1e-4;
    std::printf("%-28s forward %.1e  <gx,x> %.1e  <gq,q> %.1e  f32 %.1e  %s\n", k.name, worst, e_in, e_w, e_f32, ok ? "ok" : "MISMATCH");
    return ok;
}

int main() {
    const std::vector<int> five{-1, 0, 0, -1, 0, 0, 0, 1, 1, 0}, four{-1, 0, 0, -1, 0, 1, 1, 0},
        full{-1, -1, -1, 0, -1, 1, 0, -1, 0, 0, 0, 1, 1, -1, 1, 0, 1, 1}, h3{0, -1, 0, 0, 0, 1};
    const std::vector<Case> cases{
        {"depthwise five", 2, 4, 5, 6, 4, 1, 1, 1, five},
        {"depthwise five stride 2", 2, 4, 7, 5, 4, 1, 2, 1, five},
        {"channel multiplier 2", 1, 3, 6, 6, 6, 1, 1, 1, five},
        {"grouped g=2 four", 2, 4, 5, 5, 8, 2, 1, 1, four},
        {"grouped g=4 stride 2", 1, 8, 8, 7, 16, 4, 2, 1, five},
        {"channel-reducing g=4", 1, 8, 5, 5, 4, 4, 1, 1, five},
        {"full stencil dilation 2", 2, 2, 7, 7, 2, 1, 1, 2, full},
        {"h3 dilation 2 stride 2", 1, 6, 9, 8, 6, 2, 2, 2, h3},
        {"one pixel", 3, 2, 1, 1, 4, 2, 1, 1, five},
    };
    for (const auto& c : cases) if (!run(c)) return 1;
    return 0;
}
