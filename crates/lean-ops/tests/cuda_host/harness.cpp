// Runs the CUDA stencil kernels of src/cuda/stencil.cu on the host, one emulated thread per
// block and one block (their grid-stride loops then cover every element), against oracles
// that share no code with them: a dense 3x3 convolution with the stencil scattered into its
// kernel (the spec's definition of the operator), and for the two gradients the adjoint
// identities <gx, x> = <gy, y(x)> and <gq, q> = <gy, y(q)> (the op is linear in each).
// The BatchNorm kernels of src/cuda/norm.cu go against a plain double-precision BatchNorm and,
// for their gradients, central differences of a random linear loss; the residual add against
// its definition. Exercises the index arithmetic, not the parallel reductions (tests/cuda.rs
// does that on a GPU).
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
double red[2];

#include "../../src/cuda/stencil.cu"
#include "../../src/cuda/norm.cu"

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

// BatchNorm (train mode) + activation: forward against a plain implementation, the gradients
// of L = Σ r·y against central differences.
static bool run_bn(const char* name, int n, int c, int hw, int act) {
    const double eps = 1e-5, m = (double)n * hw;
    std::vector<double> x((size_t)n * c * hw), w(c), b(c), r(x.size());
    for (auto& v : x) v = 3.0 * uniform() + 0.5;
    for (auto& v : w) v = 1.5 + uniform();
    for (auto& v : b) v = uniform();
    for (auto& v : r) v = uniform();
    auto forward = [&](const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& b,
                       std::vector<double>& y, std::vector<double>& stats) {
        stats.assign(3 * c, 0.0);
        y.assign(x.size(), 0.0);
        bn_stats_f64(x.data(), stats.data(), n, c, hw, eps);
        bn_apply_f64(x.data(), w.data(), b.data(), stats.data(), y.data(), n, c, hw, act);
    };
    auto loss = [&](const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& b) {
        std::vector<double> y, st;
        forward(x, w, b, y, st);
        return dot(r, y);
    };
    std::vector<double> y, stats;
    forward(x, w, b, y, stats);
    double e_fwd = 0;
    for (int ch = 0; ch < c; ++ch) {
        double mean = 0, var = 0;
        for (int i = 0; i < n; ++i) for (int p = 0; p < hw; ++p) mean += x[((size_t)i * c + ch) * hw + p];
        mean /= m;
        for (int i = 0; i < n; ++i) for (int p = 0; p < hw; ++p) var += std::pow(x[((size_t)i * c + ch) * hw + p] - mean, 2);
        var /= m;
        e_fwd = std::fmax(e_fwd, std::fabs(stats[ch] - mean) + std::fabs(stats[c + ch] - var));
        for (int i = 0; i < n; ++i)
            for (int p = 0; p < hw; ++p) {
                const size_t at = ((size_t)i * c + ch) * hw + p;
                double v = (x[at] - mean) / std::sqrt(var + eps) * w[ch] + b[ch];
                if (act >= 1) v = std::fmax(v, 0.0);
                if (act == 2) v = std::fmin(v, 6.0);
                e_fwd = std::fmax(e_fwd, std::fabs(y[at] - v));
            }
    }
    std::vector<double> sums(2 * c), gx(x.size());
    bn_grad_sums_f64(r.data(), y.data(), x.data(), stats.data(), sums.data(), n, c, hw, act);
    bn_grad_input_f64(r.data(), y.data(), x.data(), w.data(), stats.data(), sums.data(), gx.data(), n, c, hw, act, m);
    // The module's parameter gradients: Σ gz·xhat and Σ gz (cuda.rs forms them from `sums`).
    std::vector<double> gw(c), gb(c);
    for (int ch = 0; ch < c; ++ch) { gw[ch] = sums[c + ch] * stats[2 * c + ch]; gb[ch] = sums[ch]; }
    const double h = 1e-6;
    double e_grad = 0;
    auto fd = [&](std::vector<double>& v, size_t i) {
        const double keep = v[i];
        v[i] = keep + h; const double up = loss(x, w, b);
        v[i] = keep - h; const double down = loss(x, w, b);
        v[i] = keep;
        return (up - down) / (2 * h);
    };
    for (size_t i = 0; i < x.size(); i += 7) e_grad = std::fmax(e_grad, std::fabs(fd(x, i) - gx[i]));
    for (int ch = 0; ch < c; ++ch) {
        e_grad = std::fmax(e_grad, std::fabs(fd(w, ch) - gw[ch]));
        e_grad = std::fmax(e_grad, std::fabs(fd(b, ch) - gb[ch]));
    }
    const bool ok = e_fwd < 1e-12 && e_grad < 1e-5;
    std::printf("%-28s forward %.1e  gradients vs differences %.1e  %s\n", name, e_fwd, e_grad, ok ? "ok" : "MISMATCH");
    return ok;
}

static bool run_add_act(int act) {
    const long long total = 37;
    std::vector<double> a(total), b(total), y(total), gy(total), gz(total);
    for (long long i = 0; i < total; ++i) { a[i] = 4 * uniform(); b[i] = 4 * uniform(); gy[i] = uniform(); }
    add_act_f64(a.data(), b.data(), y.data(), total, act);
    act_backward_f64(gy.data(), y.data(), gz.data(), total, act);
    bool ok = true;
    for (long long i = 0; i < total; ++i) {
        const double s = a[i] + b[i];
        const double want = act == 0 ? s : act == 1 ? std::fmax(s, 0.0) : std::fmin(std::fmax(s, 0.0), 6.0);
        const double pass = act == 0 || (s > 0 && (act == 1 || s < 6));
        ok = ok && y[i] == want && gz[i] == (pass ? gy[i] : 0.0);
    }
    std::printf("add + activation %-11d %s\n", act, ok ? "ok" : "MISMATCH");
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
    if (!run_bn("batch norm", 3, 4, 5, 0) || !run_bn("batch norm + relu", 2, 3, 7, 1) ||
        !run_bn("batch norm + relu6 1x1", 5, 2, 1, 2))
        return 1;
    for (int act = 0; act < 3; ++act) if (!run_add_act(act)) return 1;
    return 0;
}
