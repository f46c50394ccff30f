//! Model arguments shared by subcommands. The model options themselves are the library's
//! [`lean_models::ModelOptions`], flattened into each command (its `clap` feature).

use anyhow::{bail, Context, Result};

/// Parses `C,H,W`.
pub fn parse_input_size(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--input-size `{s}`: expected C,H,W"))?;
    match v[..] {
        [c, h, w] if c * h * w > 0 => Ok([c, h, w]),
        _ => bail!("--input-size `{s}`: expected three positive numbers C,H,W"),
    }
}
