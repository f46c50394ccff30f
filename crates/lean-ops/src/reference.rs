//! Reference implementations composed from candle primitives only.
//!
//! They run on every device (the fast paths are CPU kernels; CUDA and Metal use these) and serve
//! as a second, independent implementation in the tests. All are differentiable through candle's
//! own autograd.

use crate::error::Result;
use crate::lean_conv::LeanConv2dConfig;
use candle_core::{Device, IndexOp, Tensor};

/// Positions 0, s, 2s, ... (`count` of them) as a u32 index tensor.
fn strided_index(count: usize, s: usize, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = (0..count).map(|i| (i * s) as u32).collect();
    Ok(Tensor::from_vec(idx, count, device)?)
}

/// The (ho x wo) window of `t` (.., H, W) starting at (y0, x0) with stride `s`.
pub(crate) fn strided_window(t: &Tensor, y0: usize, x0: usize, ho: usize, wo: usize, s: usize) -> Result<Tensor> {
    let r = t.rank();
    let win = t
        .narrow(r - 2, y0, (ho - 1) * s + 1)?
        .narrow(r - 1, x0, (wo - 1) * s + 1)?;
    if s == 1 {
        return Ok(win);
    }
    let dev = t.device();
    Ok(win
        .contiguous()?
        .index_select(&strided_index(ho, s, dev)?, r - 2)?
        .index_select(&strided_index(wo, s, dev)?, r - 1)?)
}

/// The grouped sparse-stencil convolution from pad / index_select / narrow / mul / add.
pub fn grouped_stencil_conv2d(x: &Tensor, q: &Tensor, cfg: &LeanConv2dConfig) -> Result<Tensor> {
    cfg.validate()?;
    let (_, _, h, w) = x.dims4()?;
    let (ho, wo) = cfg.output_hw(h, w);
    let (d, s, g) = (cfg.dilation, cfg.stride, cfg.group_size);
    let opg = cfg.out_channels / cfg.groups();
    let xp = x.pad_with_zeros(2, d, d)?.pad_with_zeros(3, d, d)?;
    let mut acc: Option<Tensor> = None;
    for j in 0..g {
        // Output channel o reads input channel grp(o)·g + j.
        let idx: Vec<u32> = (0..cfg.out_channels).map(|o| ((o / opg) * g + j) as u32).collect();
        let idx = Tensor::from_vec(idx, cfg.out_channels, x.device())?;
        let xj = xp.index_select(&idx, 1)?;
        for (t, &(dy, dx)) in cfg.stencil.taps().iter().enumerate() {
            let y0 = (d as isize + dy * d as isize) as usize;
            let x0 = (d as isize + dx * d as isize) as usize;
            let win = strided_window(&xj, y0, x0, ho, wo, s)?;
            let wt = q.i((.., j, t))?.reshape((1, cfg.out_channels, 1, 1))?;
            let term = win.broadcast_mul(&wt)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    Ok(acc.expect("a stencil has at least one tap"))
}

/// The lean convolution from candle's 1x1 `conv2d` and [`grouped_stencil_conv2d`].
pub fn lean_conv2d(
    x: &Tensor,
    p: &Tensor,
    q: &Tensor,
    bias: Option<&Tensor>,
    cfg: &LeanConv2dConfig,
) -> Result<Tensor> {
    let y = (x.conv2d(p, 0, cfg.stride, 1, 1)? + grouped_stencil_conv2d(x, q, cfg)?)?;
    crate::conv::add_channel_bias("lean_conv2d", y, bias)
}

/// The dense 3x3 kernel K (Cout, Cin, 3, 3) equal to a lean convolution (the spec's oracle):
/// P on the centre tap plus Q scattered onto the stencil taps of each output's group.
/// Built with matmuls of constant 0/1 matrices, so gradients flow back to P and Q.
pub fn lean_dense_kernel(p: &Tensor, q: &Tensor, cfg: &LeanConv2dConfig) -> Result<Tensor> {
    cfg.validate()?;
    let (cout, cin, g) = (cfg.out_channels, cfg.in_channels, cfg.group_size);
    let taps = cfg.stencil.taps();
    let (dev, dt) = (p.device(), p.dtype());
    let mut place = vec![0f32; taps.len() * 9];
    for (t, &(dy, dx)) in taps.iter().enumerate() {
        place[t * 9 + ((dy + 1) * 3 + dx + 1) as usize] = 1.0;
    }
    let place = Tensor::from_vec(place, (taps.len(), 9), dev)?.to_dtype(dt)?;
    let qd = q
        .reshape((cout * g, taps.len()))?
        .matmul(&place)?
        .reshape((cout, g, 9))?;
    let opg = cout / cfg.groups();
    let mut expand = vec![0f32; cout * cin * g];
    for o in 0..cout {
        for j in 0..g {
            expand[(o * cin + (o / opg) * g + j) * g + j] = 1.0;
        }
    }
    let expand = Tensor::from_vec(expand, (cout, cin, g), dev)?.to_dtype(dt)?;
    let kq = expand.matmul(&qd)?;
    let mut centre = vec![0f32; 9];
    centre[4] = 1.0;
    let centre = Tensor::from_vec(centre, (1, 9), dev)?.to_dtype(dt)?;
    let kp = p.reshape((cout * cin, 1))?.matmul(&centre)?.reshape((cout, cin, 9))?;
    Ok((kq + kp)?.reshape((cout, cin, 3, 3))?)
}

/// The lean convolution as one dense 3x3 candle `conv2d` with [`lean_dense_kernel`]: the oracle.
pub fn lean_conv2d_dense_oracle(x: &Tensor, p: &Tensor, q: &Tensor, cfg: &LeanConv2dConfig) -> Result<Tensor> {
    let k = lean_dense_kernel(p, q, cfg)?;
    Ok(x.conv2d(&k, cfg.dilation, cfg.stride, cfg.dilation, 1)?)
}

/// Train-mode BatchNorm from candle reductions: (y, batch mean, biased batch variance).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    act: crate::Activation,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    let xt = x.transpose(0, 1)?.flatten_from(1)?; // (C, N·H·W)
    let mean = xt.mean_keepdim(1)?;
    let centred = xt.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    let shape = (1, c, 1, 1);
    let xhat = x
        .broadcast_sub(&mean.reshape(shape)?)?
        .broadcast_div(&(var.reshape(shape)? + eps)?.sqrt()?)?;
    let y = xhat
        .broadcast_mul(&weight.reshape(shape)?)?
        .broadcast_add(&bias.reshape(shape)?)?;
    Ok((act.apply_tensor(&y)?, mean.flatten_all()?, var.flatten_all()?))
}

/// Stacks the k·k strided windows of a padded input along a new last dimension.
fn pool_windows(xp: &Tensor, cfg: &crate::Pool2dConfig, ho: usize, wo: usize) -> Result<Tensor> {
    let k = cfg.kernel_size;
    let mut wins = Vec::with_capacity(k * k);
    for ky in 0..k {
        for kx in 0..k {
            wins.push(strided_window(xp, ky, kx, ho, wo, cfg.stride)?.unsqueeze(4)?);
        }
    }
    Ok(Tensor::cat(&wins, 4)?)
}

/// Max pooling from strided windows and a max reduction; padding never wins because the input
/// is shifted to be positive before zero padding.
pub fn max_pool2d(x: &Tensor, cfg: &crate::Pool2dConfig) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ho, wo) = cfg.output_hw("max_pool2d", h, w)?;
    let p = cfg.padding;
    let lo = (x.min_all()?.detach() - 1.0)?;
    let shifted = x.broadcast_sub(&lo)?;
    let xp = shifted.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    Ok(pool_windows(&xp, cfg, ho, wo)?.max(4)?.broadcast_add(&lo)?)
}

/// Average pooling from strided windows; the divisor counts padding or not as configured.
pub fn avg_pool2d(x: &Tensor, cfg: &crate::Pool2dConfig) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ho, wo) = cfg.output_hw("avg_pool2d", h, w)?;
    let p = cfg.padding;
    let sum = pool_windows(&x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?, cfg, ho, wo)?.sum(4)?;
    let div = if cfg.count_include_pad {
        // Only padding positions inside the padded border count (never beyond it).
        let ones = Tensor::ones((1, 1, h + 2 * p, w + 2 * p), x.dtype(), x.device())?;
        pool_windows(&ones, cfg, ho, wo)?.sum(4)?
    } else {
        let ones = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?
            .pad_with_zeros(2, p, p)?
            .pad_with_zeros(3, p, p)?;
        pool_windows(&ones, cfg, ho, wo)?.sum(4)?
    };
    Ok(sum.broadcast_div(&div)?)
}

/// The (out x in) bilinear interpolation matrix along one axis.
fn interp_matrix(input: usize, output: usize, align_corners: bool, like: &Tensor) -> Result<Tensor> {
    let mut m = vec![0f64; output * input];
    for (o, (i0, i1, l)) in crate::resample::interp_taps(input, output, align_corners)
        .into_iter()
        .enumerate()
    {
        m[o * input + i0] += 1.0 - l;
        m[o * input + i1] += l;
    }
    Ok(Tensor::from_vec(m, (output, input), like.device())?.to_dtype(like.dtype())?)
}

/// Bilinear upsampling as two matmuls with interpolation matrices: y = A_h · x · A_wᵀ.
pub fn upsample_bilinear2d(x: &Tensor, out_h: usize, out_w: usize, align_corners: bool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let ah = interp_matrix(h, out_h, align_corners, x)?;
    let aw = interp_matrix(w, out_w, align_corners, x)?;
    let t = x.broadcast_matmul(&aw.t()?)?; // (N, C, H, Wo)
    Ok(ah.broadcast_matmul(&t)?)
}

/// Channel shuffle as reshape / transpose / reshape (torchvision's formulation).
pub fn channel_shuffle(x: &Tensor, groups: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok(x.reshape((n, groups, c / groups, h, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, c, h, w))?)
}

/// Cross-entropy from candle's log-softmax and a one-hot mask.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, cfg: &crate::CrossEntropyConfig) -> Result<Tensor> {
    let (t, n, c, s) = crate::loss::read_targets(logits, targets, cfg)?;
    // (N, C, S) -> (N·S, C)
    let z = logits.reshape((n, c, s))?.transpose(1, 2)?.reshape((n * s, c))?;
    let logp = candle_nn::ops::log_softmax(&z, 1)?;
    let eps = cfg.label_smoothing;
    let mut target = vec![0f64; n * s * c];
    let mut keep = 0usize;
    for (p, &ti) in t.iter().enumerate() {
        if cfg.ignore_index == Some(ti) {
            continue;
        }
        keep += 1;
        for k in 0..c {
            target[p * c + k] = eps / c as f64 + if k as i64 == ti { 1.0 - eps } else { 0.0 };
        }
    }
    let target = Tensor::from_vec(target, (n * s, c), logits.device())?.to_dtype(logits.dtype())?;
    Ok(((logp * target)?.sum_all()?.neg()? / keep.max(1) as f64)?)
}
