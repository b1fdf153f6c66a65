//! The run's plot (`loss.png`, PPO's `reward.png`): one panel per figure, each with the
//! logged values (thin), their smoothed curve (an exponential moving average, debiased as
//! TensorBoard does), optional eval points, a title (stage, run folder, model), axis labels,
//! ticks at round numbers with grid lines, and a legend. Drawn into an RGB buffer with a 5x7
//! bitmap font and written with the `png` crate: no font files or system libraries needed.
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

/// One panel: the metric drawn as a line (and smoothed), and optional eval points.
pub struct PanelSpec {
    pub y_label: &'static str,
    /// (metrics key, legend label) of the line.
    pub line: (&'static str, &'static str),
    /// (metrics key, legend label) of the eval points.
    pub dots: Option<(&'static str, &'static str)>,
}

const W: usize = 800;
const PANEL_H: usize = 300;
const TOP: usize = 44;
const LEFT: usize = 78;
const RIGHT: usize = 24;
const BOTTOM: usize = 52;
const GAP: usize = 36;

/// Classic 5x7 glyphs for ASCII 32..=126: five columns each, bit 0 at the top.
#[rustfmt::skip]
const FONT: [[u8; 5]; 95] = [
    [0x00,0x00,0x00,0x00,0x00],[0x00,0x00,0x5F,0x00,0x00],[0x00,0x07,0x00,0x07,0x00],[0x14,0x7F,0x14,0x7F,0x14],
    [0x24,0x2A,0x7F,0x2A,0x12],[0x23,0x13,0x08,0x64,0x62],[0x36,0x49,0x56,0x20,0x50],[0x00,0x08,0x07,0x03,0x00],
    [0x00,0x1C,0x22,0x41,0x00],[0x00,0x41,0x22,0x1C,0x00],[0x2A,0x1C,0x7F,0x1C,0x2A],[0x08,0x08,0x3E,0x08,0x08],
    [0x00,0x80,0x70,0x30,0x00],[0x08,0x08,0x08,0x08,0x08],[0x00,0x00,0x60,0x60,0x00],[0x20,0x10,0x08,0x04,0x02],
    [0x3E,0x51,0x49,0x45,0x3E],[0x00,0x42,0x7F,0x40,0x00],[0x72,0x49,0x49,0x49,0x46],[0x21,0x41,0x49,0x4D,0x33],
    [0x18,0x14,0x12,0x7F,0x10],[0x27,0x45,0x45,0x45,0x39],[0x3C,0x4A,0x49,0x49,0x31],[0x41,0x21,0x11,0x09,0x07],
    [0x36,0x49,0x49,0x49,0x36],[0x46,0x49,0x49,0x29,0x1E],[0x00,0x00,0x14,0x00,0x00],[0x00,0x40,0x34,0x00,0x00],
    [0x00,0x08,0x14,0x22,0x41],[0x14,0x14,0x14,0x14,0x14],[0x00,0x41,0x22,0x14,0x08],[0x02,0x01,0x59,0x09,0x06],
    [0x3E,0x41,0x5D,0x59,0x4E],[0x7C,0x12,0x11,0x12,0x7C],[0x7F,0x49,0x49,0x49,0x36],[0x3E,0x41,0x41,0x41,0x22],
    [0x7F,0x41,0x41,0x41,0x3E],[0x7F,0x49,0x49,0x49,0x41],[0x7F,0x09,0x09,0x09,0x01],[0x3E,0x41,0x41,0x51,0x73],
    [0x7F,0x08,0x08,0x08,0x7F],[0x00,0x41,0x7F,0x41,0x00],[0x20,0x40,0x41,0x3F,0x01],[0x7F,0x08,0x14,0x22,0x41],
    [0x7F,0x40,0x40,0x40,0x40],[0x7F,0x02,0x1C,0x02,0x7F],[0x7F,0x04,0x08,0x10,0x7F],[0x3E,0x41,0x41,0x41,0x3E],
    [0x7F,0x09,0x09,0x09,0x06],[0x3E,0x41,0x51,0x21,0x5E],[0x7F,0x09,0x19,0x29,0x46],[0x26,0x49,0x49,0x49,0x32],
    [0x03,0x01,0x7F,0x01,0x03],[0x3F,0x40,0x40,0x40,0x3F],[0x1F,0x20,0x40,0x20,0x1F],[0x3F,0x40,0x38,0x40,0x3F],
    [0x63,0x14,0x08,0x14,0x63],[0x03,0x04,0x78,0x04,0x03],[0x61,0x59,0x49,0x4D,0x43],[0x00,0x7F,0x41,0x41,0x41],
    [0x02,0x04,0x08,0x10,0x20],[0x00,0x41,0x41,0x41,0x7F],[0x04,0x02,0x01,0x02,0x04],[0x40,0x40,0x40,0x40,0x40],
    [0x00,0x03,0x07,0x08,0x00],[0x20,0x54,0x54,0x78,0x40],[0x7F,0x28,0x44,0x44,0x38],[0x38,0x44,0x44,0x44,0x28],
    [0x38,0x44,0x44,0x28,0x7F],[0x38,0x54,0x54,0x54,0x18],[0x00,0x08,0x7E,0x09,0x02],[0x18,0xA4,0xA4,0x9C,0x78],
    [0x7F,0x08,0x04,0x04,0x78],[0x00,0x44,0x7D,0x40,0x00],[0x20,0x40,0x40,0x3D,0x00],[0x7F,0x10,0x28,0x44,0x00],
    [0x00,0x41,0x7F,0x40,0x00],[0x7C,0x04,0x78,0x04,0x78],[0x7C,0x08,0x04,0x04,0x78],[0x38,0x44,0x44,0x44,0x38],
    [0xFC,0x18,0x24,0x24,0x18],[0x18,0x24,0x24,0x18,0xFC],[0x7C,0x08,0x04,0x04,0x08],[0x48,0x54,0x54,0x54,0x24],
    [0x04,0x04,0x3F,0x44,0x24],[0x3C,0x40,0x40,0x20,0x7C],[0x1C,0x20,0x40,0x20,0x1C],[0x3C,0x40,0x30,0x40,0x3C],
    [0x44,0x28,0x10,0x28,0x44],[0x4C,0x90,0x90,0x90,0x7C],[0x44,0x64,0x54,0x4C,0x44],[0x00,0x08,0x36,0x41,0x00],
    [0x00,0x00,0x77,0x00,0x00],[0x00,0x41,0x36,0x08,0x00],[0x02,0x01,0x02,0x04,0x02],
];

type Rgb = [u8; 3];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [228, 228, 228];
const EVAL: Rgb = [210, 40, 40];
/// (raw, smoothed) colours of each panel's line.
const LINES: [(Rgb, Rgb); 3] = [([168, 190, 232], [30, 80, 190]), ([240, 196, 150], [215, 110, 20]), ([160, 214, 170], [30, 140, 60])];

/// A drawn plot: the pixels and every text on it (for tests).
pub struct Drawn {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    pub texts: Vec<String>,
}

impl Drawn {
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..self.width as i64).contains(&x) && (0..self.height as i64).contains(&y) {
            let i = (y as usize * self.width + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb, thick: bool) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (x, y) = ((x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64);
            self.set(x, y, c);
            if thick {
                self.set(x + 1, y, c);
                self.set(x, y + 1, c);
            }
        }
    }

    /// Width in pixels of `s` at `scale`.
    fn text_width(s: &str, scale: usize) -> usize {
        s.chars().count() * 6 * scale
    }

    /// Draws `s` with its top-left corner at (x, y); non-ASCII characters show as `?`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        self.texts.push(s.to_string());
        for (k, ch) in s.chars().enumerate() {
            let g = FONT[(if (' '..='~').contains(&ch) { ch } else { '?' }) as usize - 32];
            for (col, bits) in g.iter().enumerate() {
                for row in 0..8 {
                    if bits >> row & 1 == 1 {
                        let (px, py) = (x + ((k * 6 + col) * scale) as i64, y + (row * scale) as i64);
                        self.rect(px, py, px + scale as i64 - 1, py + scale as i64 - 1, c);
                    }
                }
            }
        }
    }

    /// Draws `s` rotated a quarter turn (reading upwards) with its bottom-left at (x, y).
    fn text_up(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        self.texts.push(s.to_string());
        for (k, ch) in s.chars().enumerate() {
            let g = FONT[(if (' '..='~').contains(&ch) { ch } else { '?' }) as usize - 32];
            for (col, bits) in g.iter().enumerate() {
                for row in 0..8 {
                    if bits >> row & 1 == 1 {
                        let (px, py) = (x + (row * scale) as i64, y - ((k * 6 + col) * scale) as i64);
                        self.rect(px, py - scale as i64 + 1, px + scale as i64 - 1, py, c);
                    }
                }
            }
        }
    }
}

/// Round tick values covering [lo, hi]: steps of 1, 2 or 5 x 10^k, about `n` of them.
pub fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let raw = ((hi - lo) / n.max(1) as f64).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let mut v = vec![];
    let mut x = (lo / step).ceil() * step;
    while x <= hi + step * 1e-9 && v.len() < 50 {
        v.push(if x.abs() < step * 1e-9 { 0.0 } else { x });
        x += step;
    }
    (v, step)
}

/// A tick label with as many decimals as the tick step needs.
pub fn tick_label(x: f64, step: f64) -> String {
    if x != 0.0 && (x.abs() >= 1e5 || x.abs() < 1e-3) {
        return format!("{x:.1e}");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{x:.decimals$}")
}

/// Exponential moving average of `ys`, debiased (as TensorBoard's smoothing), weight by length.
pub fn smooth(ys: &[f64]) -> Vec<f64> {
    let beta = (1.0 - 10.0 / ys.len().max(1) as f64).clamp(0.0, 0.9);
    let (mut acc, mut out) = (0.0, Vec::with_capacity(ys.len()));
    for (i, y) in ys.iter().enumerate() {
        acc = beta * acc + (1.0 - beta) * y;
        out.push(acc / (1.0 - beta.powi(i as i32 + 1)));
    }
    out
}

/// (step, value) of `key` in each logged line that has a finite one.
fn points(logged: &[Value], key: &str) -> Vec<(f64, f64)> {
    logged.iter().filter_map(|v| Some((v["step"].as_f64()?, v.get(key)?.as_f64()?))).filter(|(_, y)| y.is_finite()).collect()
}

/// Draws `panels` of the metrics in `logged` under `title`.
pub fn render(title: &str, panels: &[PanelSpec], logged: &[Value]) -> Drawn {
    let height = TOP + panels.len() * PANEL_H + panels.len().saturating_sub(1) * GAP + 6;
    let mut d = Drawn { width: W, height, rgb: vec![255; W * height * 3], texts: vec![] };
    // Title, cut from the left to fit.
    let max_chars = (W - 20) / 12;
    let t: String = if title.chars().count() > max_chars {
        format!("...{}", title.chars().skip(title.chars().count() - max_chars + 3).collect::<String>())
    } else {
        title.to_string()
    };
    d.text(((W - Drawn::text_width(&t, 2)) / 2) as i64, 12, &t, 2, BLACK);
    let xmax = logged.iter().filter_map(|v| v["step"].as_f64()).fold(1f64, f64::max);
    for (pi, p) in panels.iter().enumerate() {
        let top = (TOP + pi * (PANEL_H + GAP)) as f64;
        let (x0, x1, y0, y1) = (LEFT as f64, (W - RIGHT) as f64, top, top + PANEL_H as f64 - BOTTOM as f64 + 10.0);
        let line = points(logged, p.line.0);
        let dots = p.dots.map(|(k, _)| points(logged, k)).unwrap_or_default();
        let (mut lo, mut hi) = line.iter().chain(&dots).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(_, y)| (a.min(y), b.max(y)));
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-9 {
            (lo, hi) = (lo - 0.5, hi + 0.5);
        }
        let pad = (hi - lo) * 0.05;
        (lo, hi) = (lo - pad, hi + pad);
        let px = |x: f64| x0 + x / xmax * (x1 - x0 - 8.0);
        let py = |y: f64| y1 - (y - lo) / (hi - lo) * (y1 - y0);
        // Grid, ticks and their labels.
        let (yt, ys) = ticks(lo, hi, 6);
        for &v in &yt {
            let y = py(v).round();
            d.line((x0, y), (x1, y), GRID, false);
            d.line((x0 - 4.0, y), (x0, y), BLACK, false);
            let s = tick_label(v, ys);
            d.text(x0 as i64 - 8 - Drawn::text_width(&s, 1) as i64, y as i64 - 3, &s, 1, BLACK);
        }
        let (xt, xs) = ticks(0.0, xmax, 6);
        for &v in &xt {
            let x = px(v).round();
            d.line((x, y0), (x, y1), GRID, false);
            d.line((x, y1), (x, y1 + 4.0), BLACK, false);
            let s = tick_label(v, xs.max(1.0));
            d.text(x as i64 - Drawn::text_width(&s, 1) as i64 / 2, y1 as i64 + 8, &s, 1, BLACK);
        }
        d.line((x0, y0), (x0, y1), BLACK, false);
        d.line((x0, y1), (x1, y1), BLACK, false);
        d.text(((x0 + x1) / 2.0) as i64 - 12, y1 as i64 + 22, "step", 2, BLACK);
        d.text_up(8, ((y0 + y1) / 2.0) as i64 + Drawn::text_width(p.y_label, 2) as i64 / 2, p.y_label, 2, BLACK);
        // The data: raw line, smoothed line, eval points.
        let (raw_c, smooth_c) = LINES[pi % LINES.len()];
        for w in line.windows(2) {
            d.line((px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), raw_c, false);
        }
        let sm: Vec<(f64, f64)> = line.iter().map(|p| p.0).zip(smooth(&line.iter().map(|p| p.1).collect::<Vec<_>>())).collect();
        for w in sm.windows(2) {
            d.line((px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), smooth_c, true);
        }
        if let [(x, y)] = sm.as_slice() {
            d.rect(px(*x) as i64 - 1, py(*y) as i64 - 1, px(*x) as i64 + 1, py(*y) as i64 + 1, smooth_c);
        }
        for &(x, y) in &dots {
            d.rect(px(x) as i64 - 3, py(y) as i64 - 3, px(x) as i64 + 3, py(y) as i64 + 3, EVAL);
        }
        // Legend, top right.
        let mut entries: Vec<(String, Rgb, bool)> = vec![(p.line.1.to_string(), raw_c, false), ("smoothed".to_string(), smooth_c, false)];
        if let Some((_, label)) = p.dots {
            entries.push((label.to_string(), EVAL, true));
        }
        let lw = entries.iter().map(|e| Drawn::text_width(&e.0, 1)).max().unwrap_or(0) as i64 + 40;
        let lh = 8 + 14 * entries.len() as i64;
        // The corner that hides the fewest data points.
        let corners = [(x1 as i64 - lw - 8, y0 as i64 + 8), (x1 as i64 - lw - 8, y1 as i64 - lh - 8), (x0 as i64 + 8, y0 as i64 + 8), (x0 as i64 + 8, y1 as i64 - lh - 8)];
        let hidden = |&(cx, cy): &(i64, i64)| {
            line.iter().chain(&dots).filter(|&&(x, y)| (cx - 4..=cx + lw + 4).contains(&(px(x) as i64)) && (cy - 4..=cy + lh + 4).contains(&(py(y) as i64))).count()
        };
        let (lx, ly) = corners.iter().copied().min_by_key(hidden).unwrap_or(corners[0]);
        d.rect(lx, ly, lx + lw, ly + 8 + 14 * entries.len() as i64, [255, 255, 255]);
        for (x, y) in [(lx, ly), (lx + lw, ly)] {
            d.line((x as f64, y as f64), (x as f64, (ly + 8 + 14 * entries.len() as i64) as f64), BLACK, false);
        }
        for y in [ly, ly + 8 + 14 * entries.len() as i64] {
            d.line((lx as f64, y as f64), ((lx + lw) as f64, y as f64), BLACK, false);
        }
        for (i, (label, c, dot)) in entries.iter().enumerate() {
            let y = ly + 10 + 14 * i as i64;
            if *dot {
                d.rect(lx + 14, y, lx + 20, y + 6, *c);
            } else {
                d.line(((lx + 8) as f64, (y + 3) as f64), ((lx + 28) as f64, (y + 3) as f64), *c, i == 1);
            }
            d.text(lx + 34, y, label, 1, BLACK);
        }
    }
    d
}

/// Renders the plot and writes it to `path` (atomically).
pub fn write_metrics_png(path: &Path, title: &str, panels: &[PanelSpec], logged: &[Value]) -> Result<()> {
    let d = render(title, panels, logged);
    let mut bytes = vec![];
    {
        let mut enc = png::Encoder::new(&mut bytes, d.width as u32, d.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&d.rgb)?;
    }
    crate::io::atomic_write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ticks() {
        let (t, s) = ticks(0.93, 2.41, 5);
        assert_eq!(s, 0.5);
        assert_eq!(t, vec![1.0, 1.5, 2.0]);
        assert_eq!(tick_label(1.5, 0.5), "1.5");
        assert_eq!(tick_label(20.0, 10.0), "20");
        let (t, _) = ticks(0.0, 66.0, 6);
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0]);
        assert_eq!(smooth(&[1.0, 1.0, 1.0]), vec![1.0, 1.0, 1.0]);
    }
}
