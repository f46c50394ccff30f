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
    let win = t.narrow(r - 2, y0, (ho - 1) * s + 1)?.narrow(r - 1, x0, (wo - 1) * s + 1)?;
    if s == 1 {
        return Ok(win);
    }
    let dev = t.device();
    Ok(win.contiguous()?.index_select(&strided_index(ho, s, dev)?, r - 2)?.index_select(&strided_index(wo, s, dev)?, r - 1)?)
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
pub fn lean_conv2d(x: &Tensor, p: &Tensor, q: &Tensor, bias: Option<&Tensor>, cfg: &LeanConv2dConfig) -> Result<Tensor> {
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
    let qd = q.reshape((cout * g, taps.len()))?.matmul(&place)?.reshape((cout, g, 9))?;
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

