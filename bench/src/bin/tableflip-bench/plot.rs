//! The plots, as SVG files (plotters' SVG backend: no system fonts needed).
//!
//! Per-request data is far too large to draw point by point (hundreds of
//! thousands of requests), so latency plots draw, per time bucket, the
//! worst latency and the median; every failed request is drawn as a cross.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::Error;
use crate::load::{Mode, Outcome};
use crate::scenarios::{Generation, IntermittentResult, LatencyResult, LoadResult, UpgradeMark};
use crate::stats::quantile;

fn perr<E: std::fmt::Debug>(e: E) -> Error {
    Error::msg(format!("plot: {e:?}"))
}

const KEEP_ALIVE: RGBColor = RGBColor(31, 119, 180);
const KEEP_ALIVE_LIGHT: RGBColor = RGBColor(140, 190, 225);
const PER_REQUEST: RGBColor = RGBColor(255, 127, 14);
const PER_REQUEST_LIGHT: RGBColor = RGBColor(255, 195, 140);
const READY: RGBColor = RGBColor(44, 160, 44);
const GONE: RGBColor = RGBColor(120, 120, 120);
const FAIL: RGBColor = RGBColor(214, 39, 40);
const THIRD: RGBColor = RGBColor(148, 103, 189);
const THIRD_LIGHT: RGBColor = RGBColor(200, 175, 225);

/// Per bucket of `width` over `[lo, hi)`: (bucket middle, max, median).
fn buckets(points: &[(f64, f64)], lo: f64, hi: f64, width: f64) -> Vec<(f64, f64, f64)> {
    let n = ((hi - lo) / width).ceil().max(1.0) as usize;
    let mut bins: Vec<Vec<f64>> = vec![Vec::new(); n];
    for &(x, y) in points {
        if x >= lo && x < hi {
            let i = (((x - lo) / width) as usize).min(n - 1);
            bins[i].push(y);
        }
    }
    bins.into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(i, mut b)| {
            b.sort_by(f64::total_cmp);
            let x = lo + (i as f64 + 0.5) * width;
            (x, b[b.len() - 1], quantile(&b, 0.5))
        })
        .collect()
}

fn color_of(mode: Mode) -> (RGBColor, RGBColor) {
    match mode {
        Mode::KeepAlive => (KEEP_ALIVE, KEEP_ALIVE_LIGHT),
        Mode::PerRequest => (PER_REQUEST, PER_REQUEST_LIGHT),
    }
}

/// A shared y axis (ms) for the load results: a decade above the worst
/// latency, which leaves the legend room above the data.
fn y_max(loads: &[LoadResult]) -> f64 {
    let worst = loads
        .iter()
        .flat_map(|l| &l.samples)
        .map(|s| f64::from(s.latency_us) / 1e3)
        .fold(1.0, f64::max);
    10f64.powf(worst.log10().ceil() + 1.0)
}

/// The latency of requests around each upgrade, all upgrades overlaid,
/// time 0 being the `SIGHUP`: one panel per library.
pub(crate) fn around_upgrades(loads: &[LoadResult], path: &Path) -> Result<(), Error> {
    let (lo, hi, width) = (-200.0, 1200.0, 5.0);
    let root = SVGBackend::new(path, (1000, 360 * loads.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let ymax = y_max(loads);
    for (area, load) in root.split_evenly((loads.len(), 1)).iter().zip(loads) {
        let mut points: Vec<Vec<(f64, f64)>> = vec![Vec::new(), Vec::new()];
        let mut failures = Vec::new();
        for up in &load.upgrades {
            for s in &load.samples {
                let x = (s.start_us as f64 - up.hup_us as f64) / 1e3;
                if x < lo || x >= hi {
                    continue;
                }
                let y = f64::from(s.latency_us) / 1e3;
                if s.outcome == Outcome::Ok {
                    points[usize::from(s.mode == Mode::PerRequest)].push((x, y));
                } else {
                    failures.push((x, y.max(0.011)));
                }
            }
        }
        let (ready, gone) = ready_and_gone(&load.upgrades);
        let caption = format!(
            "{}: request latency around each of {} upgrades (overlaid; {} failed)",
            load.kind.name(),
            load.upgrades.len(),
            load.modes.iter().map(|m| m.failed).sum::<usize>()
        );
        latency_panel(
            area,
            &caption,
            "ms since SIGHUP (5 ms buckets)",
            (lo, hi),
            ymax,
            &points,
            width,
            &failures,
            &[
                (ready, "new generation ready (median)", READY),
                (gone, "old generation gone (median)", GONE),
            ],
        )?;
    }
    root.present().map_err(perr)
}

/// The whole load run, one panel per library: latency over time, each
/// upgrade's `SIGHUP` marked.
pub(crate) fn timeline(loads: &[LoadResult], path: &Path) -> Result<(), Error> {
    let root = SVGBackend::new(path, (1000, 360 * loads.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let ymax = y_max(loads);
    let span = loads.iter().map(|l| l.duration_s).fold(1.0, f64::max);
    for (area, load) in root.split_evenly((loads.len(), 1)).iter().zip(loads) {
        let mut points: Vec<Vec<(f64, f64)>> = vec![Vec::new(), Vec::new()];
        let mut failures = Vec::new();
        for s in &load.samples {
            let x = s.start_us as f64 / 1e6;
            let y = f64::from(s.latency_us) / 1e3;
            if s.outcome == Outcome::Ok {
                points[usize::from(s.mode == Mode::PerRequest)].push((x, y));
            } else {
                failures.push((x, y.max(0.011)));
            }
        }
        let caption = format!(
            "{}: request latency during the load run ({} upgrades, grey lines: SIGHUP)",
            load.kind.name(),
            load.upgrades.len()
        );
        let marks: Vec<(f64, &str, RGBColor)> = load
            .upgrades
            .iter()
            .map(|u| (u.hup_us as f64 / 1e6, "", GONE))
            .collect();
        latency_panel(
            area,
            &caption,
            "seconds since the start of the load (20 ms buckets)",
            (0.0, span),
            ymax,
            &points,
            0.02,
            &failures,
            &marks,
        )?;
    }
    root.present().map_err(perr)
}

/// Intermittent clients around upgrades, one panel per library: every
/// request placed at its start time from the nearest `SIGHUP` before it
/// (or from the next one, when that is less than 1 s away), so that each
/// request appears once; per 20 ms bucket the median and the worst
/// latency, and every failed request as a cross.
pub(crate) fn intermittent(results: &[IntermittentResult], path: &Path) -> Result<(), Error> {
    if results.is_empty() {
        return Ok(());
    }
    let (lo, hi, width) = (-1000.0, 5000.0, 20.0);
    let root = SVGBackend::new(path, (1000, 360 * results.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let worst = results
        .iter()
        .flat_map(|r| &r.samples)
        .map(|s| f64::from(s.latency_us) / 1e3)
        .fold(1.0, f64::max);
    let ymax = 10f64.powf(worst.log10().ceil() + 1.0);
    for (area, r) in root.split_evenly((results.len(), 1)).iter().zip(results) {
        let hups: Vec<f64> = r.upgrades.iter().map(|u| u.hup_us as f64 / 1e3).collect();
        let mut points = Vec::new();
        let mut failures = Vec::new();
        for s in &r.samples {
            let t = s.start_us as f64 / 1e3;
            let Some(x) = since_nearest_hup(&hups, t, -lo) else {
                continue;
            };
            let y = f64::from(s.latency_us) / 1e3;
            if s.outcome == Outcome::Ok {
                points.push((x, y));
            } else {
                failures.push((x, y.max(0.011)));
            }
        }
        let (ready, gone) = ready_and_gone(&r.upgrades);
        let caption = format!(
            "{}: {} intermittent keep-alive clients, {} upgrades overlaid; {} of {} requests failed",
            r.kind.name(),
            r.clients,
            r.upgrades.len(),
            r.stats.failed,
            r.stats.requests
        );
        latency_panel(
            area,
            &caption,
            "ms since SIGHUP (20 ms buckets)",
            (lo, hi),
            ymax,
            &[points, Vec::new()],
            width,
            &failures,
            &[
                (ready, "new generation ready (median)", READY),
                (gone, "old generation gone (median)", GONE),
            ],
        )?;
    }
    root.present().map_err(perr)
}

/// `t` (ms) from the last of `hups` (ms, ascending) at or before it, or
/// from the next one when that is less than `before` ms after it; `None`
/// when neither applies.
fn since_nearest_hup(hups: &[f64], t: f64, before: f64) -> Option<f64> {
    let next = hups.partition_point(|&h| h <= t);
    if let Some(&h) = hups.get(next) {
        if h - t < before {
            return Some(t - h);
        }
    }
    next.checked_sub(1).map(|i| t - hups[i])
}

/// Medians of SIGHUP → ready and SIGHUP → gone over `upgrades`, ms.
fn ready_and_gone(upgrades: &[UpgradeMark]) -> (f64, f64) {
    let since_hup = |at: fn(&UpgradeMark) -> u64| {
        median(upgrades.iter().map(|u| (at(u) - u.hup_us) as f64 / 1e3))
    };
    (since_hup(|u| u.ready_us), since_hup(|u| u.gone_us))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    quantile(&v, 0.5)
}

#[allow(clippy::too_many_arguments)]
fn latency_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    x_desc: &str,
    (lo, hi): (f64, f64),
    ymax: f64,
    points: &[Vec<(f64, f64)>],
    width: f64,
    failures: &[(f64, f64)],
    marks: &[(f64, &str, RGBColor)],
) -> Result<(), Error> {
    let ymin = 0.01;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, (ymin..ymax).log_scale())
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("latency (ms, log)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(perr)?;
    for (mode, pts) in [Mode::KeepAlive, Mode::PerRequest].into_iter().zip(points) {
        if pts.is_empty() {
            continue;
        }
        let (dark, light) = color_of(mode);
        let b = buckets(pts, lo, hi, width);
        chart
            .draw_series(LineSeries::new(
                b.iter().map(|&(x, _, p50)| (x, p50)),
                light,
            ))
            .map_err(perr)?
            .label(format!("{}: median", mode.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light));
        chart
            .draw_series(LineSeries::new(b.iter().map(|&(x, max, _)| (x, max)), dark))
            .map_err(perr)?
            .label(format!("{}: worst", mode.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], dark));
    }
    let mut labelled = std::collections::HashSet::new();
    for &(x, label, color) in marks {
        let series = chart
            .draw_series(LineSeries::new(
                vec![(x, ymin), (x, ymax)],
                color.stroke_width(1),
            ))
            .map_err(perr)?;
        if !label.is_empty() && labelled.insert(label) {
            series
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if !failures.is_empty() {
        chart
            .draw_series(
                failures
                    .iter()
                    .map(|&(x, y)| Cross::new((x, y), 4, FAIL.stroke_width(2))),
            )
            .map_err(perr)?
            .label(format!("failed request ({})", failures.len()))
            .legend(|(x, y)| Cross::new((x + 10, y), 4, FAIL.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(perr)
}

/// Cumulative distributions of upgrade latency (`SIGHUP` → ready, and
/// `SIGHUP` → old generation gone) and of the exec floor.
pub(crate) fn latency_cdf(results: &[LatencyResult], path: &Path) -> Result<(), Error> {
    let root = SVGBackend::new(path, (1000, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let panels = root.split_evenly((1, 2));
    let colors = [KEEP_ALIVE, PER_REQUEST, THIRD];
    let lights = [KEEP_ALIVE_LIGHT, PER_REQUEST_LIGHT, THIRD_LIGHT];
    let mut ready_series = Vec::new();
    let mut gone_series = Vec::new();
    for (i, r) in results.iter().enumerate() {
        ready_series.push((
            format!("{}: SIGHUP → ready", r.kind.name()),
            r.upgrades.ready.clone(),
            colors[i % 3],
        ));
        ready_series.push((
            format!("{}: fresh start (floor)", r.kind.name()),
            r.floor.clone(),
            lights[i % 3],
        ));
        gone_series.push((
            format!("{}: SIGHUP → old gone", r.kind.name()),
            r.upgrades.gone.clone(),
            colors[i % 3],
        ));
    }
    cdf_panel(&panels[0], "new generation ready", &ready_series)?;
    cdf_panel(&panels[1], "old generation gone", &gone_series)?;
    root.present().map_err(perr)
}

fn cdf_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    series: &[(String, Vec<f64>, RGBColor)],
) -> Result<(), Error> {
    let max = series
        .iter()
        .flat_map(|(_, v, _)| v)
        .fold(0.1f64, |a, &b| a.max(b));
    let min = series
        .iter()
        .flat_map(|(_, v, _)| v)
        .fold(max, |a, &b| a.min(b));
    let lo = 10f64.powf(min.log10().floor());
    let hi = 10f64.powf(max.log10().ceil());
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc("ms (log)")
        .y_desc("fraction of upgrades")
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(perr)?;
    for (label, values, color) in series {
        let mut v = values.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                v.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)),
                color.stroke_width(2),
            ))
            .map_err(perr)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(perr)
}

/// Open fds and RSS of each generation, over consecutive upgrades.
pub(crate) fn generations(series: &[(&str, &[Generation])], path: &Path) -> Result<(), Error> {
    let root = SVGBackend::new(path, (1000, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let panels = root.split_evenly((1, 2));
    let colors = [KEEP_ALIVE, PER_REQUEST, THIRD];
    let last = series
        .iter()
        .map(|(_, g)| g.len())
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let rss_max = series
        .iter()
        .flat_map(|(_, g)| g.iter())
        .map(|g| g.usage.rss_kib as f64 / 1024.0)
        .fold(1.0, f64::max)
        * 1.2;
    let fd_max = series
        .iter()
        .flat_map(|(_, g)| g.iter())
        .map(|g| g.usage.fds as f64)
        .fold(1.0, f64::max)
        * 1.3;
    for (panel, (title, y_desc, ymax)) in panels.iter().zip([
        ("RSS of each generation", "RSS (MiB)", rss_max),
        ("open fds of each generation", "fds", fd_max),
    ]) {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..last, 0.0..ymax)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("generation")
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(WHITE)
            .draw()
            .map_err(perr)?;
        for (i, (name, gens)) in series.iter().enumerate() {
            let color = colors[i % 3];
            let value = |g: &Generation| {
                if y_desc == "fds" {
                    g.usage.fds as f64
                } else {
                    g.usage.rss_kib as f64 / 1024.0
                }
            };
            chart
                .draw_series(LineSeries::new(
                    gens.iter().map(|g| (g.index as f64, value(g))),
                    color.stroke_width(2),
                ))
                .map_err(perr)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(perr)?;
    }
    root.present().map_err(perr)
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_are_placed_from_the_nearest_sighup() {
        let hups = [1000.0, 5000.0];
        let at = |t| super::since_nearest_hup(&hups, t, 1000.0);
        assert_eq!(at(500.0), Some(-500.0));
        assert_eq!(at(-100.0), None);
        assert_eq!(at(1000.0), Some(0.0));
        assert_eq!(at(3000.0), Some(2000.0));
        assert_eq!(at(4200.0), Some(-800.0));
        assert_eq!(at(9000.0), Some(4000.0));
    }

    #[test]
    fn buckets_keep_max_and_median() {
        let pts = [(0.5, 1.0), (0.6, 3.0), (0.7, 2.0), (2.5, 9.0), (7.0, 1.0)];
        let b = super::buckets(&pts, 0.0, 5.0, 1.0);
        assert_eq!(b, vec![(0.5, 3.0, 2.0), (2.5, 9.0, 9.0)]);
    }
}
