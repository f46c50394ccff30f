//! The sparse 3x3 stencils of the lean convolution (LEAN_SPEC.md section 1).

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
