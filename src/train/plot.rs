//! `loss.png`: the training loss (blue) and eval loss (red dots) against the step, drawn
//! directly into an RGB buffer and written with the `png` crate (no font or system library
//! needed; numbers use a built-in 3x5 digit font: y range at the left, last step at the right).
use std::path::Path;

use anyhow::Result;

const W: usize = 640;
const H: usize = 400;
const PAD: usize = 40;

/// 3x5 glyphs for `0-9 . - e`, one row of 3 bits each.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        _ => [0; 5],
    }
}

struct Canvas(Vec<u8>);

impl Canvas {
    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.0[i..i + 3].copy_from_slice(&rgb);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), rgb: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for k in 0..=n {
            let t = k as f64 / n as f64;
            self.set((x0 + t * (x1 - x0)) as i64, (y0 + t * (y1 - y0)) as i64, rgb);
        }
    }

    fn text(&mut self, x: usize, y: usize, s: &str) {
        for (k, c) in s.chars().enumerate() {
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set((x + k * 8 + col * 2 + dx) as i64, (y + row * 2 + dy) as i64, [0, 0, 0]);
                        }
                    }
                }
            }
        }
    }
}

/// Draws `train` (step, loss) as a line and `eval` (step, loss) as dots into `path`.
pub fn write_loss_png(path: &Path, train: &[(f64, f64)], eval: &[(f64, f64)]) -> Result<()> {
    let mut c = Canvas(vec![255; W * H * 3]);
    let all = train.iter().chain(eval);
    let (mut xmax, mut ymin, mut ymax) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if !ymin.is_finite() {
        (ymin, ymax) = (0.0, 1.0);
    }
    if ymax - ymin < 1e-9 {
        ymax = ymin + 1.0;
    }
    let (pw, ph) = ((W - 2 * PAD) as f64, (H - 2 * PAD) as f64);
    let px = |x: f64| PAD as f64 + x / xmax * pw;
    let py = |y: f64| PAD as f64 + (ymax - y) / (ymax - ymin) * ph;
    c.line((PAD as f64, PAD as f64), (PAD as f64, (H - PAD) as f64), [0, 0, 0]);
    c.line((PAD as f64, (H - PAD) as f64), ((W - PAD) as f64, (H - PAD) as f64), [0, 0, 0]);
    for w in train.windows(2) {
        c.line((px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), [30, 90, 200]);
    }
    for &(x, y) in eval {
        for dx in -2..=2 {
            for dy in -2..=2 {
                c.set(px(x) as i64 + dx, py(y) as i64 + dy, [210, 40, 40]);
            }
        }
    }
    c.text(4, PAD - 12, &format!("{ymax:.3}"));
    c.text(4, H - PAD + 4, &format!("{ymin:.3}"));
    c.text(W - PAD - 24, H - PAD + 8, &format!("{}", xmax as usize));
    let mut bytes = vec![];
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&c.0)?;
    }
    crate::io::atomic_write(path, &bytes)
}
