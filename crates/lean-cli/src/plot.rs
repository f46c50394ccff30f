//! PNG charts (plotters, with an embedded DejaVu Sans so that no system font is needed).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // The embedded font is a valid TrueType file; a failure would only lose the labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

/// The series of [`training_curves`]: per epoch, the losses and the evaluation score.
pub struct Curves<'a> {
    /// Epochs (x).
    pub epochs: &'a [f64],
    /// Mean training loss.
    pub train_loss: &'a [f64],
    /// Evaluation loss.
    pub eval_loss: &'a [f64],
    /// Evaluation score, percent.
    pub score: &'a [f64],
    /// Its name (`top-1`, `mIoU`).
    pub score_name: &'a str,
}

/// Draws to a temporary PNG beside `path`, renamed over it once complete.
fn draw_atomic(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    lean_models::fs::write_atomic_with(path, |tmp| draw(tmp).map_err(|e| format!("{e:#}")))
        .map_err(|(p, msg)| anyhow!("cannot write {}: {msg}", p.display()))
}

/// Training curves of a run: losses and the evaluation score against the epoch.
pub fn training_curves(path: &Path, curves: &Curves) -> Result<()> {
    register_font();
    let Curves {
        epochs,
        train_loss,
        eval_loss,
        score: top1,
        score_name,
    } = *curves;
    draw_atomic(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(450);
        let xmax = epochs.last().copied().unwrap_or(1.0).max(1.0);
        let lmax = train_loss.iter().chain(eval_loss).copied().fold(0.0, f64::max) * 1.1 + 1e-9;
        let mut c = ChartBuilder::on(&left)
            .caption("loss", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..xmax, 0.0..lmax)
            .map_err(err)?;
        c.configure_mesh().x_desc("epoch").draw().map_err(err)?;
        for (series, color, name) in [(train_loss, &BLUE, "train"), (eval_loss, &RED, "eval")] {
            c.draw_series(LineSeries::new(
                epochs.iter().copied().zip(series.iter().copied()),
                color,
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
        c.configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        let lo = top1.iter().copied().fold(100.0, f64::min).min(90.0).max(0.0).floor();
        let mut c = ChartBuilder::on(&right)
            .caption(format!("eval {score_name} (%)"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..xmax, lo..100.0)
            .map_err(err)?;
        c.configure_mesh().x_desc("epoch").draw().map_err(err)?;
        c.draw_series(LineSeries::new(
            epochs.iter().copied().zip(top1.iter().copied()),
            &GREEN,
        ))
        .map_err(err)?;
        c.draw_series(
            epochs
                .iter()
                .zip(top1)
                .map(|(x, y)| Circle::new((*x, *y), 3, GREEN.filled())),
        )
        .map_err(err)?;
        root.present().map_err(err)?;
        Ok(())
    })
}

/// One labelled point of a scatter plot.
#[derive(Clone, Debug)]
pub struct Point {
    /// Label.
    pub label: String,
    /// x (MACs in millions, or latency; drawn on a log scale, so > 0).
    pub x: f64,
    /// y (accuracy, %).
    pub y: f64,
    /// Series index (colour).
    pub series: usize,
}

/// A labelled scatter plot (accuracy against MACs), written to `path`.
pub fn scatter(path: &Path, title: &str, xdesc: &str, ydesc: &str, points: &[Point]) -> Result<()> {
    register_font();
    draw_atomic(path, |tmp| {
        let root = BitMapBackend::new(tmp, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        // Log-scale x: MACs and latencies of the compared models span over a decade.
        let xmin = points.iter().map(|p| p.x).fold(f64::INFINITY, f64::min).max(1e-9) / 1.5;
        let xmax = points.iter().map(|p| p.x).fold(0.0, f64::max).max(xmin) * 2.5;
        let ymin = points.iter().map(|p| p.y).fold(100.0, f64::min);
        let ymax = points.iter().map(|p| p.y).fold(0.0, f64::max);
        let pad = ((ymax - ymin) * 0.2).max(1.0);
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d((xmin..xmax).log_scale(), (ymin - pad).max(0.0)..(ymax + pad).min(100.0))
            .map_err(err)?;
        c.configure_mesh().x_desc(xdesc).y_desc(ydesc).draw().map_err(err)?;
        let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for p in points {
            let col = palette[p.series % palette.len()];
            let font = ("sans-serif", 13).into_font().color(&col);
            // The label sits beside its marker, not on it.
            let marker = EmptyElement::at((p.x, p.y))
                + Circle::new((0, 0), 5, col.filled())
                + Text::new(p.label.clone(), (8, -6), font);
            c.draw_series(std::iter::once(marker)).map_err(err)?;
        }
        root.present().map_err(err)?;
        Ok(())
    })
}
