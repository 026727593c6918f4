//! Line plots of training curves as PNG (plotters, bitmap backend). The font is
//! embedded (DejaVu Sans, assets/fonts) so a plot renders the same on a machine
//! without fonts installed.

use crate::error::{Error, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One named curve: (x, y) points in x order.
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// The (x, y) points, in order.
    pub points: Vec<(f64, f64)>,
}

/// One panel of the figure: a title and the curves drawn on shared axes.
pub struct Panel {
    /// The panel's title.
    pub title: String,
    /// Its lines.
    pub series: Vec<Series>,
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut failed = false;
    ONCE.call_once(|| failed = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err());
    if failed {
        return Err(Error::msg("plot: the embedded font could not be read"));
    }
    Ok(())
}

/// Encodes an RGB buffer as PNG and writes it (temporary file, then rename).
fn write_rgb_png(path: &Path, w: u32, h: u32, buf: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| plot_err(path, "bad buffer"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).map_err(|e| plot_err(path, e))?;
    crate::io::atomic::write_bytes(path, png.get_ref())
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, None, format!("plot: {e}"))
}

/// Draws the panels side by side in rows of up to `columns` into a PNG at `path`
/// (written to a temporary file and renamed, like every other output).
pub fn write_png(path: &Path, x_label: &str, panels: &[Panel], columns: usize) -> Result<()> {
    register_font()?;
    if panels.is_empty() {
        return Err(plot_err(path, "nothing to plot"));
    }
    let columns = columns.clamp(1, panels.len());
    let rows = panels.len().div_ceil(columns);
    let (w, h) = (420 * columns as u32, 300 * rows as u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        for (area, panel) in root.split_evenly((rows, columns)).iter().zip(panels) {
            draw_panel(area, panel, x_label).map_err(|e| plot_err(path, e))?;
        }
        root.present().map_err(|e| plot_err(path, e))?;
    }
    write_rgb_png(path, w, h, buf)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    x_label: &str,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts: Vec<&(f64, f64)> = panel.series.iter().flat_map(|s| s.points.iter()).filter(finite).collect();
    let pad = |lo: f64, hi: f64| -> (f64, f64) {
        if !lo.is_finite() || !hi.is_finite() {
            (0.0, 1.0)
        } else if hi - lo < 1e-12 {
            (lo - 0.5, hi + 0.5)
        } else {
            let pad = 0.05 * (hi - lo);
            (lo - pad, hi + pad)
        }
    };
    let (x0, x1) = pad(
        pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min),
        pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max),
    );
    // Noisy losses: the y range covers the 1st to 99th percentile and points beyond
    // are drawn at its edge, so one spike does not flatten the curve.
    let mut ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
    ys.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| ys.get(((ys.len().saturating_sub(1)) as f64 * f).round() as usize).copied();
    let (y0, y1) = if ys.len() >= 100 {
        pad(q(0.01).unwrap_or(0.0), q(0.99).unwrap_or(1.0))
    } else {
        pad(ys.first().copied().unwrap_or(0.0), ys.last().copied().unwrap_or(1.0))
    };
    let clamp = |p: &(f64, f64)| (p.0, p.1.clamp(y0, y1));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart.configure_mesh().x_desc(x_label).label_style(("sans-serif", 12)).x_labels(6).y_labels(6).draw()?;
    for (i, s) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<(f64, f64)> = s.points.iter().filter(finite).map(clamp).collect();
        if points.len() > 100 {
            // The raw values faintly, a centred moving average on top.
            chart.draw_series(LineSeries::new(points.clone(), colour.mix(0.25).stroke_width(1)))?;
            let w = points.len() / 40;
            let smooth: Vec<(f64, f64)> = (0..points.len())
                .map(|j| {
                    let (a, b) = (j.saturating_sub(w), (j + w + 1).min(points.len()));
                    (points[j].0, points[a..b].iter().map(|p| p.1).sum::<f64>() / (b - a) as f64)
                })
                .collect();
            chart
                .draw_series(LineSeries::new(smooth, colour.stroke_width(2)))?
                .label(format!("{} (moving average)", s.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        } else {
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
            if points.len() <= 30 {
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            }
        }
    }
    if panel.series.len() > 1 {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// One named set of labelled points for [`write_scatter_png`].
pub struct Points {
    /// The legend entry.
    pub name: String,
    /// The (x, y) points.
    pub points: Vec<(f64, f64)>,
    /// A short label drawn beside each point (none when empty).
    pub labels: Vec<String>,
    /// Whether a line joins the points in the given order (a curve through them).
    pub line: bool,
}

/// Draws labelled point sets on one pair of axes into a PNG at `path` (atomic write):
/// e.g. alignment against diversity, one point per table row, a reference curve
/// drawn through its own points.
pub fn write_scatter_png(path: &Path, title: &str, x_label: &str, y_label: &str, sets: &[Points]) -> Result<()> {
    register_font()?;
    let pts: Vec<(f64, f64)> =
        sets.iter().flat_map(|s| s.points.iter().copied()).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    if pts.is_empty() {
        return Err(plot_err(path, "nothing to plot"));
    }
    let range = |v: Vec<f64>| {
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let pad = if hi - lo < 1e-12 { 0.5 } else { 0.08 * (hi - lo) };
        (lo - pad, hi + pad)
    };
    let (x0, x1) = range(pts.iter().map(|p| p.0).collect());
    let (y0, y1) = range(pts.iter().map(|p| p.1).collect());
    let (w, h) = (960u32, 680u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let draw = || -> std::result::Result<(), DrawingAreaErrorKind<_>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1, y0..y1)?;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .label_style(("sans-serif", 13))
                .x_labels(8)
                .y_labels(8)
                .draw()?;
            for (i, s) in sets.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                let points: Vec<(f64, f64)> =
                    s.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
                if s.line {
                    chart.draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?;
                }
                // The palette repeats after ten sets: the next ten get crosses, so that
                // sets of one colour stay apart.
                let marker = i / COLOURS.len() % 2 == 1;
                chart
                    .draw_series(points.iter().map(|&p| {
                        if marker {
                            Cross::new(p, 5, colour.stroke_width(2)).into_dyn()
                        } else {
                            Circle::new(p, 5, colour.filled()).into_dyn()
                        }
                    }))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        if marker {
                            Cross::new((x + 8, y), 5, colour.stroke_width(2)).into_dyn()
                        } else {
                            Circle::new((x + 8, y), 5, colour.filled()).into_dyn()
                        }
                    });
                let labelled = s.points.iter().zip(&s.labels).filter(|(p, _)| p.0.is_finite() && p.1.is_finite());
                chart.draw_series(labelled.map(|(&p, l)| {
                    EmptyElement::at(p) + Text::new(l.clone(), (7, -14), ("sans-serif", 12).into_font().color(&colour))
                }))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerLeft)
                .label_font(("sans-serif", 13))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
            root.present()
        };
        draw().map_err(|e| plot_err(path, e))?;
    }
    write_rgb_png(path, w, h, buf)
}
