//! The sparse 3x3 stencils of the lean convolution and their tap order (docs/lean-conv.md).

use std::fmt;
use std::str::FromStr;

/// Which taps of a 3x3 kernel the grouped branch of a lean convolution uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Stencil {
    /// Centre and its 4 neighbours, the "+" (the default).
    #[default]
    Five,
    /// The 4 neighbours without the centre (LeanResNet).
    Four,
    /// A horizontal 1x3 line.
    H3,
    /// A vertical 3x1 line.
    V3,
    /// All 9 taps.
    Full,
}

impl Stencil {
    /// Every stencil, in the order of the spec's table.
    pub const ALL: [Stencil; 5] = [Stencil::Five, Stencil::Four, Stencil::H3, Stencil::V3, Stencil::Full];

    /// The taps as (dy, dx) offsets, in the order used by the stored weight layout.
    pub fn taps(self) -> &'static [(isize, isize)] {
        match self {
            Stencil::Five => &[(-1, 0), (0, -1), (0, 0), (0, 1), (1, 0)],
            Stencil::Four => &[(-1, 0), (0, -1), (0, 1), (1, 0)],
            Stencil::H3 => &[(0, -1), (0, 0), (0, 1)],
            Stencil::V3 => &[(-1, 0), (0, 0), (1, 0)],
            Stencil::Full => &[
                (-1, -1),
                (-1, 0),
                (-1, 1),
                (0, -1),
                (0, 0),
                (0, 1),
                (1, -1),
                (1, 0),
                (1, 1),
            ],
        }
    }

    /// Number of taps |S|.
    pub fn len(self) -> usize {
        self.taps().len()
    }

    /// Always false: every stencil has taps (present for clippy's `len_without_is_empty`).
    pub fn is_empty(self) -> bool {
        false
    }

    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Stencil::Five => "five",
            Stencil::Four => "four",
            Stencil::H3 => "h3",
            Stencil::V3 => "v3",
            Stencil::Full => "full",
        }
    }
}

impl fmt::Display for Stencil {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stencil {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Stencil::ALL.into_iter().find(|st| st.name() == s).ok_or_else(|| {
            crate::error::config_err(
                "stencil",
                format!("unknown stencil `{s}` (expected one of five, four, h3, v3, full)"),
            )
        })
    }
}

/// How a new [`LeanConv2d`](crate::LeanConv2d) draws its two weights.
///
/// With input channels Cin, output channels Cout, group size g and |S| stencil taps, an output
/// of the pointwise branch sums Cin products and one of the stencil branch g·|S| products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LeanInit {
    /// Each branch scaled on its own fan (the default): P ~ N(0, 1/Cout) and
    /// Q ~ N(0, Cin/(g·|S|·Cout)). For unit-variance inputs each branch then carries Cin/Cout of
    /// output variance, half of the sum 2·Cin/Cout that Kaiming fan-out init gives a dense 3x3
    /// convolution, so spatial mixing starts on an equal footing with channel mixing.
    #[default]
    Balanced,
    /// One Kaiming-normal std over the fan-out of the combined operator for both weights,
    /// N(0, 2/(Cout + Cout/groups·|S|)). The pointwise branch then carries Cin/(g·|S|) times the
    /// stencil branch's variance (13x at 64 channels): a fresh network is in effect a 1x1
    /// network, and learns slowly. Kept for ablations and to reproduce older runs.
    Fanout,
}

impl LeanInit {
    /// Every initialisation.
    pub const ALL: [LeanInit; 2] = [LeanInit::Balanced, LeanInit::Fanout];

    /// The name used on the command line, in tags and configs.
    pub fn name(self) -> &'static str {
        match self {
            LeanInit::Balanced => "balanced",
            LeanInit::Fanout => "fanout",
        }
    }
}

impl fmt::Display for LeanInit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LeanInit {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        LeanInit::ALL.into_iter().find(|i| i.name() == s).ok_or_else(|| {
            crate::error::config_err(
                "lean_init",
                format!("unknown lean init `{s}` (expected balanced or fanout)"),
            )
        })
    }
}
