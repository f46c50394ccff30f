//! The configuration of a lean convolution ([`LeanConv2dConfig`]): channels, stencil, group
//! size, stride, dilation, bias, initialisation; its validation, shapes and cost.

use crate::cost::{Cost, CostModel};
use crate::error::{config_err, shape_err, Result};
use crate::kernels::conv_sum::ConvSum;
use crate::kernels::gemm_conv::ConvGeom;
use crate::kernels::stencil::StencilGeom;
use crate::stencil::{LeanInit, Stencil};

/// Configuration of a [`crate::LeanConv2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeanConv2dConfig {
    /// Input channels Cin.
    pub in_channels: usize,
    /// Output channels Cout; must be a multiple of Cin / group_size.
    pub out_channels: usize,
    /// The stencil of the grouped branch.
    pub stencil: Stencil,
    /// Input channels per group g (1 = depthwise, Cin = full coupling); must divide Cin.
    pub group_size: usize,
    /// Stride of both branches (>= 1).
    pub stride: usize,
    /// Dilation of the stencil, also its zero padding (>= 1).
    pub dilation: usize,
    /// Whether the layer adds a bias.
    pub bias: bool,
    /// How [`LeanConv2d::new`] draws new weights.
    pub init: LeanInit,
}

impl LeanConv2dConfig {
    /// A five-point, depthwise (g = 1), stride-1 lean convolution without bias.
    pub fn new(in_channels: usize, out_channels: usize) -> Self {
        LeanConv2dConfig {
            in_channels,
            out_channels,
            stencil: Stencil::Five,
            group_size: 1,
            stride: 1,
            dilation: 1,
            bias: false,
            init: LeanInit::Balanced,
        }
    }
    config_setters! {
        /// Sets the stencil.
        stencil: Stencil;
        /// Sets the group size g.
        group_size: usize;
        /// Sets the stride.
        stride: usize;
        /// Sets the dilation.
        dilation: usize;
        /// Turns the bias on or off.
        bias: bool;
        /// Sets the initialisation of new weights.
        init: LeanInit;
    }

    /// The standard deviations (pointwise, stencil) of new weights under `self.init`.
    pub fn init_stds(&self) -> (f64, f64) {
        let (cin, cout) = (self.in_channels as f64, self.out_channels as f64);
        let taps = self.stencil.len() as f64;
        let g = self.group_size.max(1) as f64;
        match self.init {
            LeanInit::Balanced => ((1.0 / cout).sqrt(), (cin / (g * taps * cout)).sqrt()),
            LeanInit::Fanout => {
                let fan_out = cout + cout / self.groups().max(1) as f64 * taps;
                let s = (2.0 / fan_out).sqrt();
                (s, s)
            }
        }
    }

    /// Number of groups of the stencil branch: Cin / g.
    pub fn groups(&self) -> usize {
        self.in_channels / self.group_size.max(1)
    }

    /// Checks the divisibility rules and ranges of the spec.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "lean_conv2d";
        let c = self;
        if c.in_channels == 0 || c.out_channels == 0 {
            return Err(config_err(
                OP,
                format!(
                    "channels must be positive, got in={} out={}",
                    c.in_channels, c.out_channels
                ),
            ));
        }
        if c.group_size == 0 || c.in_channels % c.group_size != 0 {
            return Err(config_err(
                OP,
                format!("group_size {} must divide in_channels {}", c.group_size, c.in_channels),
            ));
        }
        if c.out_channels % c.groups() != 0 {
            return Err(config_err(
                OP,
                format!(
                    "out_channels {} must be a multiple of the number of groups {} (= in_channels {} / group_size {})",
                    c.out_channels,
                    c.groups(),
                    c.in_channels,
                    c.group_size
                ),
            ));
        }
        if c.stride == 0 {
            return Err(config_err(OP, "stride must be >= 1, got 0"));
        }
        if c.dilation == 0 {
            return Err(config_err(OP, "dilation must be >= 1, got 0"));
        }
        Ok(())
    }

    /// Output spatial size: floor((H - 1) / s) + 1.
    pub fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        ((h.max(1) - 1) / self.stride + 1, (w.max(1) - 1) / self.stride + 1)
    }

    /// Parameters: Cout·Cin + Cout·g·|S| (+ Cout with bias).
    pub fn num_params(&self) -> usize {
        self.out_channels * self.in_channels
            + self.out_channels * self.group_size * self.stencil.len()
            + if self.bias { self.out_channels } else { 0 }
    }

    /// Shape of the stored stencil weight: (Cout, g, |S|).
    pub fn stencil_shape(&self) -> (usize, usize, usize) {
        (self.out_channels, self.group_size, self.stencil.len())
    }

    pub(crate) fn geometry(&self, n: usize, h: usize, w: usize, with_pointwise: bool) -> ConvSum {
        let (ho, wo) = self.output_hw(h, w);
        let (cin, cout, s) = (self.in_channels, self.out_channels, self.stride);
        ConvSum {
            n,
            dense: with_pointwise.then_some(ConvGeom {
                cin,
                h,
                w,
                cout,
                kh: 1,
                kw: 1,
                stride: s,
                pad: 0,
                dil: 1,
                ho,
                wo,
            }),
            stencil: Some(StencilGeom {
                cin,
                h,
                w,
                cout,
                g: self.group_size,
                stride: s,
                dil: self.dilation,
                ho,
                wo,
                taps: self.stencil.taps(),
            }),
        }
    }
}

impl CostModel for LeanConv2dConfig {
    fn cost(&self, input: &[usize]) -> Result<(Cost, Vec<usize>)> {
        self.validate()?;
        let &[n, c, h, w] = input else {
            return Err(shape_err(
                "lean_conv2d",
                format!("expected an (N, C, H, W) input shape, got {input:?}"),
            ));
        };
        if c != self.in_channels {
            return Err(shape_err(
                "lean_conv2d",
                format!("expected {} input channels, got {c}", self.in_channels),
            ));
        }
        let (ho, wo) = self.output_hw(h, w);
        let per_pixel = self.out_channels * (self.in_channels + self.group_size * self.stencil.len());
        Ok((
            Cost::new(self.num_params() as u64, (n * ho * wo * per_pixel) as u64),
            vec![n, self.out_channels, ho, wo],
        ))
    }
}
