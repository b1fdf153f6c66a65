//! f32 rows into GGML blocks, and back: the bytes ggml's `ggml_quantize_chunk` writes.
//!
//! Blocks are candle's GGML formats (`candle_core::quantized::k_quants`): q8_0, q4_0, q5_0 and q5_1
//! are quantized by candle, every type is dequantized by candle. q4_k, q5_k and q6_k are
//! quantized here with ggml's current reference (`quantize_row_q{4,5,6}_K_ref`: `make_qkx2_quants`,
//! a weighted search of scale and min; `make_qx_quants`) because candle's `from_float` ports older
//! versions (`make_qkx1_quants`) whose blocks differ from llama-quantize's and are less accurate.
//! Every type gives ggml's bytes exactly (tests/gguf_export.rs, against `ggml_quantize_chunk`).
use anyhow::{bail, ensure, Result};
use candle_core::quantized::k_quants;
use rayon::prelude::*;

use super::quant::GgmlType;

/// Reinterprets candle's `#[repr(C)]` blocks as their bytes (the GGML layout).
fn block_bytes<B>(blocks: &[B]) -> &[u8] {
    // SAFETY: candle's block types are #[repr(C)] structs of f16/u8/i8 arrays without padding
    // (candle asserts their sizes against ggml's), so every byte is initialised.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks)) }
}

fn with_candle<B: k_quants::GgmlType>(xs: &[f32], out: &mut [u8]) {
    let mut blocks = vec![B::zeros(); xs.len() / B::BLCK_SIZE];
    B::from_float(xs, &mut blocks);
    out.copy_from_slice(block_bytes(&blocks));
}

/// ggml's `quantize_row_q8_0_ref` for one block of 32: d = max|x| / 127 (as f16), q = roundf(x / d).
/// Written out (rather than candle's `BlockQ8_0::from_float`, same bytes) so that the rounding is
/// a truncating conversion and a compare, not a libm `roundf` call per value: ~3x faster.
fn q8_0_block(x: &[f32], o: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    o[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    for (q, v) in o[2..].iter_mut().zip(x) {
        *q = round_half_away(v * id) as i8 as u8;
    }
}

/// C's `roundf` (halves away from zero) for |v| < 2^23, exactly: the truncation `t` is exact
/// and so is `v - t`.
#[inline]
fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// Quantizes rows of f32 values (`xs.len()` a multiple of `row`, `row` of the type's block)
/// into `ty`'s bytes, rows in parallel.
pub fn quantize(ty: GgmlType, xs: &[f32], row: usize) -> Result<Vec<u8>> {
    ensure!(row > 0 && xs.len() % row == 0 && row % ty.block() == 0, "cannot write rows of {row} values as {}", ty.name());
    let row_bytes = ty.bytes(row);
    let mut out = vec![0u8; ty.bytes(xs.len())];
    // Chunks of whole rows, about 64k values each.
    let rows_per_chunk = (65536 / row).max(1);
    out.par_chunks_mut(row_bytes * rows_per_chunk).zip(xs.par_chunks(row * rows_per_chunk)).try_for_each(|(o, x)| quantize_chunk(ty, x, o))?;
    Ok(out)
}

fn quantize_chunk(ty: GgmlType, xs: &[f32], out: &mut [u8]) -> Result<()> {
    match ty {
        GgmlType::F32 => out.iter_mut().zip(xs.iter().flat_map(|x| x.to_le_bytes())).for_each(|(o, b)| *o = b),
        GgmlType::F16 => out.chunks_exact_mut(2).zip(xs).for_each(|(o, x)| o.copy_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
        GgmlType::BF16 => out.chunks_exact_mut(2).zip(xs).for_each(|(o, x)| o.copy_from_slice(&half::bf16::from_f32(*x).to_le_bytes())),
        GgmlType::Q8_0 => xs.chunks_exact(32).zip(out.chunks_exact_mut(34)).for_each(|(x, o)| q8_0_block(x, o)),
        GgmlType::Q4_0 => with_candle::<k_quants::BlockQ4_0>(xs, out),
        GgmlType::Q5_0 => with_candle::<k_quants::BlockQ5_0>(xs, out),
        GgmlType::Q5_1 => with_candle::<k_quants::BlockQ5_1>(xs, out),
        GgmlType::Q6_K => xs.chunks_exact(256).zip(out.chunks_exact_mut(210)).for_each(|(x, o)| q6k_block(x, o)),
        GgmlType::Q4_K => xs.chunks_exact(256).zip(out.chunks_exact_mut(144)).for_each(|(x, o)| q4k_block(x, o)),
        GgmlType::Q5_K => xs.chunks_exact(256).zip(out.chunks_exact_mut(176)).for_each(|(x, o)| q5k_block(x, o)),
        t => bail!("lorafit does not write {} tensors", t.name()),
    }
    Ok(())
}

/// Values of `bytes` of type `ty` (candle's dequantization).
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    fn go<B: k_quants::GgmlType>(bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() / std::mem::size_of::<B>();
        let mut blocks = vec![B::zeros(); n];
        // SAFETY: as in block_bytes; blocks is a fresh, exactly sized buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len()) };
        let mut ys = vec![0f32; n * B::BLCK_SIZE];
        B::to_float(&blocks, &mut ys);
        ys
    }
    ensure!(bytes.len() % ty.bytes(ty.block()) == 0, "{} bytes are not whole {} blocks", bytes.len(), ty.name());
    Ok(match ty {
        GgmlType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        GgmlType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        GgmlType::Q8_0 => go::<k_quants::BlockQ8_0>(bytes),
        GgmlType::Q4_0 => go::<k_quants::BlockQ4_0>(bytes),
        GgmlType::Q5_0 => go::<k_quants::BlockQ5_0>(bytes),
        GgmlType::Q5_1 => go::<k_quants::BlockQ5_1>(bytes),
        GgmlType::Q4_K => go::<k_quants::BlockQ4K>(bytes),
        GgmlType::Q5_K => go::<k_quants::BlockQ5K>(bytes),
        GgmlType::Q6_K => go::<k_quants::BlockQ6K>(bytes),
        t => bail!("lorafit does not read {} tensors", t.name()),
    })
}

/// ggml's `nearest_int`: round half to even through the float's mantissa.
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12582912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qkx2_quants` on the 8 sub-blocks of 32 of one q4_K / q5_K block at once: for
/// each, the scale and (negated) min for levels 0..=nmax that minimise the weighted squared
/// error, searching `nstep` scales around the min/max one. Each sub-block's float operations are
/// ggml's, in ggml's order (its bytes are reproduced); the 8 sub-blocks run side by side, stored
/// transposed (`x[i][j]`: value i of sub-block j), so their sums are 8 independent chains in
/// vector lanes instead of one sequential chain (the search is bound by those sums' latency).
#[allow(clippy::needless_range_loop)]
fn make_qkx2_quants_8(nmax: i32, x: &[[f32; 8]; 32], w: &[[f32; 8]; 32], l: &mut [[u8; 8]; 32], rmin: f32, rdelta: f32, nstep: i32) -> ([f32; 8], [f32; 8]) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = [0f32; 8];
    for j in 0..8 {
        sum_x[j] = w[0][j] * x[0][j];
    }
    for i in 1..32 {
        for j in 0..8 {
            if x[i][j] < min[j] {
                min[j] = x[i][j];
            }
            if x[i][j] > max[j] {
                max[j] = x[i][j];
            }
            sum_w[j] += w[i][j];
            sum_x[j] += w[i][j] * x[i][j];
        }
    }
    let mut flat = [false; 8];
    let mut iscale = [0f32; 8];
    let mut scale = [0f32; 8];
    for j in 0..8 {
        if min[j] > 0.0 {
            min[j] = 0.0;
        }
        flat[j] = max[j] == min[j];
        iscale[j] = nmax as f32 / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }
    let mut best = [0f32; 8];
    for i in 0..32 {
        for j in 0..8 {
            let li = nearest_int(iscale[j] * (x[i][j] - min[j])).clamp(0, nmax);
            l[i][j] = li as u8;
            let diff = scale[j] * li as f32 + min[j] - x[i][j];
            best[j] += w[i][j] * diff * diff;
        }
    }
    let mut laux = [[0f32; 8]; 32];
    for is in 0..=nstep {
        for j in 0..8 {
            iscale[j] = (rmin + rdelta * is as f32 + nmax as f32) / (max[j] - min[j]);
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for i in 0..32 {
            for j in 0..8 {
                let lf = nearest_int(iscale[j] * (x[i][j] - min[j])).clamp(0, nmax) as f32;
                laux[i][j] = lf;
                sum_l[j] += w[i][j] * lf;
                sum_l2[j] += w[i][j] * lf * lf;
                sum_xl[j] += w[i][j] * lf * x[i][j];
            }
        }
        let mut this_scale = [0f32; 8];
        let mut this_min = [0f32; 8];
        let mut ok = [false; 8];
        for j in 0..8 {
            let d = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            ok[j] = d > 0.0 && !flat[j];
            this_scale[j] = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / d;
            this_min[j] = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / d;
            if this_min[j] > 0.0 {
                this_min[j] = 0.0;
                this_scale[j] = sum_xl[j] / sum_l2[j];
            }
        }
        let mut cur = [0f32; 8];
        for i in 0..32 {
            for j in 0..8 {
                let diff = this_scale[j] * laux[i][j] + this_min[j] - x[i][j];
                cur[j] += w[i][j] * diff * diff;
            }
        }
        for j in 0..8 {
            if ok[j] && cur[j] < best[j] {
                for i in 0..32 {
                    l[i][j] = laux[i][j] as u8;
                }
                best[j] = cur[j];
                scale[j] = this_scale[j];
                min[j] = this_min[j];
            }
        }
    }
    for j in 0..8 {
        if flat[j] {
            for i in 0..32 {
                l[i][j] = 0;
            }
            scale[j] = 0.0;
        }
    }
    (scale, min.map(|m| -m))
}

fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The 6-bit scales and mins of a q4_K / q5_K block, levels `L` (0..=nmax) of its 256 values,
/// `d` and `dmin`: ggml's `quantize_row_q{4,5}_K_ref` up to the packing of the levels.
fn kquant_scales(x: &[f32], nmax: i32, rmin: f32, nstep: i32, scales_out: &mut [u8; 12], l: &mut [u8; 256]) -> (half::f16, half::f16) {
    // Transposed: xs[i][j] is value i of sub-block j.
    let mut xs = [[0f32; 8]; 32];
    let mut w = [[0f32; 8]; 32];
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = sub.iter().fold(0.0, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (i, v) in sub.iter().enumerate() {
            xs[i][j] = *v;
            w[i][j] = av_x + v.abs();
        }
    }
    let mut ls = [[0u8; 8]; 32];
    let (scales, mins) = make_qkx2_quants_8(nmax, &xs, &w, &mut ls, rmin, 0.1, nstep);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        for i in 0..32 {
            l[32 * j + i] = ls[i][j];
        }
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    *scales_out = [0; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            scales_out[j] = ls;
            scales_out[j + 4] = lm;
        } else {
            scales_out[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            scales_out[j - 4] |= (ls >> 4) << 6;
            scales_out[j] |= (lm >> 4) << 6;
        }
    }
    let d = half::f16::from_f32(max_scale / 63.0);
    let dmin = half::f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales_out);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin)
}

/// One q4_K block (256 values -> 144 bytes: d, dmin, 12 bytes of scales, 128 of 4-bit levels).
fn q4k_block(x: &[f32], out: &mut [u8]) {
    let (mut scales, mut l) = ([0u8; 12], [0u8; 256]);
    let (d, dmin) = kquant_scales(x, 15, -1.0, 20, &mut scales, &mut l);
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&scales);
    let q = &mut out[16..144];
    for (c, j) in (0..256).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// One q5_K block (256 values -> 176 bytes: d, dmin, scales, 32 bytes of high bits, 128 of low 4 bits).
fn q5k_block(x: &[f32], out: &mut [u8]) {
    let (mut scales, mut l) = ([0u8; 12], [0u8; 256]);
    let (d, dmin) = kquant_scales(x, 31, -0.5, 15, &mut scales, &mut l);
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&scales);
    let (qh, ql) = out[16..176].split_at_mut(32);
    qh.iter_mut().for_each(|b| *b = 0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (c, n) in (0..256).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// ggml's `make_qx_quants` (`rmse_type = 1`, no importance weights) on the 16 sub-blocks of 16 of
/// one q6_K block at once: for each a signed scale for levels -nmax..nmax-1 (stored + nmax in
/// `l`), searched around `-nmax / max`. ggml's float operations in ggml's order per sub-block,
/// the 16 side by side and transposed (`x[i][j]`: value i of sub-block j), as in
/// [`make_qkx2_quants_8`].
#[allow(clippy::needless_range_loop)]
fn make_qx_quants_16(nmax: i32, x: &[[f32; 16]; 16], l: &mut [[i8; 16]; 16]) -> [f32; 16] {
    let mut max = [0f32; 16];
    let mut amax = [0f32; 16];
    for i in 0..16 {
        for j in 0..16 {
            let ax = x[i][j].abs();
            if ax > amax[j] {
                amax[j] = ax;
                max[j] = x[i][j];
            }
        }
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = [0f32; 16];
    for j in 0..16 {
        iscale[j] = -(nmax as f32) / max[j];
    }
    let (mut sumlx, mut suml2) = ([0f32; 16], [0f32; 16]);
    for i in 0..16 {
        for j in 0..16 {
            let v = x[i][j];
            let li = level(iscale[j], v);
            l[i][j] = (li + nmax) as i8;
            let w = v * v;
            sumlx[j] += w * v * li as f32;
            suml2[j] += w * li as f32 * li as f32;
        }
    }
    let mut scale = [0f32; 16];
    let mut best = [0f32; 16];
    for j in 0..16 {
        scale[j] = if suml2[j] != 0.0 { sumlx[j] / suml2[j] } else { 0.0 };
        best[j] = scale[j] * sumlx[j];
    }
    let mut laux = [[0i8; 16]; 16];
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        for j in 0..16 {
            iscale[j] = -(nmax as f32 + 0.1 * is as f32) / max[j];
        }
        let (mut slx, mut sl2) = ([0f32; 16], [0f32; 16]);
        for i in 0..16 {
            for j in 0..16 {
                let v = x[i][j];
                let li = level(iscale[j], v);
                laux[i][j] = (li + nmax) as i8;
                let w = v * v;
                slx[j] += w * v * li as f32;
                sl2[j] += w * li as f32 * li as f32;
            }
        }
        for j in 0..16 {
            if sl2[j] > 0.0 && slx[j] * slx[j] > best[j] * sl2[j] {
                for i in 0..16 {
                    l[i][j] = laux[i][j];
                }
                scale[j] = slx[j] / sl2[j];
                best[j] = scale[j] * slx[j];
            }
        }
    }
    for j in 0..16 {
        if amax[j] < 1e-15 {
            for i in 0..16 {
                l[i][j] = 0;
            }
            scale[j] = 0.0;
        }
    }
    scale
}

/// One q6_K block (256 values -> 210 bytes: 128 bytes of low 4 bits, 64 of high 2 bits, 16
/// int8 scales, d): ggml's `quantize_row_q6_K_ref`.
fn q6k_block(x: &[f32], out: &mut [u8]) {
    let mut xs = [[0f32; 16]; 16]; // transposed: xs[i][j] is value i of sub-block j
    for (j, c) in x.chunks_exact(16).enumerate() {
        for (i, v) in c.iter().enumerate() {
            xs[i][j] = *v;
        }
    }
    let mut ls = [[0i8; 16]; 16];
    let scales = make_qx_quants_16(32, &xs, &mut ls);
    let mut l = [0i8; 256];
    for j in 0..16 {
        for i in 0..16 {
            l[16 * j + i] = ls[i][j];
        }
    }
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for sc in scales {
        if sc.abs() > max_abs {
            max_abs = sc.abs();
            max_scale = sc;
        }
    }
    out.iter_mut().for_each(|b| *b = 0);
    if max_abs < 1e-15 {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = half::f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..16 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (scales_out, d_out) = rest.split_at_mut(16);
    for (c, j) in (0..256).step_by(128).enumerate() {
        for i in 0..32 {
            let q = |k: usize| l[j + i + k] as u8;
            ql[64 * c + i] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
            ql[64 * c + i + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
            qh[32 * c + i] = (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
        }
    }
    scales_out.iter_mut().zip(sc).for_each(|(o, s)| *o = s as u8);
    d_out.copy_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::GgmlType as _;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SeededRng::new(seed);
        (0..n).map(|_| (r.uniform_f32() - 0.5) * 2.0 + if r.uniform_f32() < 0.01 { 4.0 } else { 0.0 }).collect()
    }

    #[test]
    fn blocks_round_trip_within_their_error() {
        // Relative RMS error bounds of each format on uniform-ish data (ggml's test-quantize-fns
        // uses absolute bounds of the same order: 0.002 q8_0 .. 0.02 for 4 bits).
        let xs = data(256 * 16, 3);
        let rms = (xs.iter().map(|v| v * v).sum::<f32>() / xs.len() as f32).sqrt();
        for (ty, bound) in [
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 5e-3),
            (GgmlType::Q8_0, 0.01),
            (GgmlType::Q6_K, 0.03),
            (GgmlType::Q5_K, 0.05),
            (GgmlType::Q5_0, 0.07),
            (GgmlType::Q5_1, 0.07),
            (GgmlType::Q4_K, 0.1),
            (GgmlType::Q4_0, 0.14),
        ] {
            let q = quantize(ty, &xs, 512).unwrap();
            assert_eq!(q.len(), ty.bytes(xs.len()));
            let back = dequantize(ty, &q).unwrap();
            let err = (xs.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / xs.len() as f32).sqrt() / rms;
            assert!(err < bound, "{}: relative RMS error {err} >= {bound}", ty.name());
        }
    }

    #[test]
    fn q4k_is_better_than_candles_older_search() {
        let xs = data(256 * 64, 5);
        let ours = dequantize(GgmlType::Q4_K, &quantize(GgmlType::Q4_K, &xs, 256).unwrap()).unwrap();
        let mut blocks = vec![k_quants::BlockQ4K::zeros(); xs.len() / 256];
        k_quants::BlockQ4K::from_float(&xs, &mut blocks);
        let candle = dequantize(GgmlType::Q4_K, block_bytes(&blocks)).unwrap();
        let sq = |v: &[f32]| xs.iter().zip(v).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
        assert!(sq(&ours) < sq(&candle), "{} vs {}", sq(&ours), sq(&candle));
    }
}
