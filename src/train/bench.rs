//! `lorafit bench sft`: the speed and memory of SFT steps on random tokens, for
//! docs/BENCHMARKS.md (compared there with PyTorch + PEFT doing the same work).
//! A step is forward, backward and the AdamW update of one batch (B x T, every token but the
//! first learned); the first step is a warm-up, the median of the others is reported.
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;

use super::optim::AdamW;
use super::sft::{label_nll_sum, make_batch, SftExample};
use super::{forward_backward, GradAccum};
use crate::lora::{Adapter, AdapterSet, LoraConfig, TargetModules};
use crate::model::Model;
use crate::rng::SeededRng;
use crate::runtime::{parse_device, parse_dtype, peak_rss_bytes};
use crate::weights::ModelFiles;

#[derive(Debug, Serialize)]
pub struct SftBench {
    pub tool: &'static str,
    pub model: String,
    pub batch: usize,
    pub seq: usize,
    pub targets: Vec<String>,
    pub r: usize,
    pub grad_checkpointing: bool,
    pub trainable_params: usize,
    pub step_s_median: f64,
    pub step_s_all: Vec<f64>,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
    pub rss_after_load_bytes: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
pub fn bench_sft(
    model_name: &str,
    dtype: &str,
    device: &str,
    batch: usize,
    seq: usize,
    steps: usize,
    targets: &[String],
    r: usize,
    grad_checkpointing: bool,
) -> Result<SftBench> {
    let device = parse_device(device)?;
    let dtype = parse_dtype(dtype, &device)?;
    let files = ModelFiles::resolve(model_name)?;
    let cfg = LoraConfig { r, lora_alpha: 2.0 * r as f64, target_modules: TargetModules::List(targets.to_vec()), ..Default::default() };
    let adapter = Adapter::fresh("bench", cfg, 0)?;
    let model = Model::load(&files, dtype, &device, AdapterSet::new(vec![adapter.clone()]))?;
    let rss_after_load = peak_rss_bytes();
    model.adapters.set_training(true);
    let train = super::config::TrainSection::default();
    let mut opt = AdamW::new(adapter.vars(), &train)?;
    let vocab = model.arch.vocab_size();
    let mut rng = SeededRng::new(1);
    let ex: Vec<SftExample> = (0..batch)
        .map(|_| SftExample { ids: (0..seq).map(|_| (rng.uniform_f32() * vocab as f32) as u32 % vocab as u32).collect(), prompt_len: 1 })
        .collect();
    let b = make_batch(&ex.iter().collect::<Vec<_>>(), 0, &Device::Cpu)?;
    let b = super::sft::Batch {
        ids: b.ids.to_device(&device)?,
        pos: b.pos.to_device(&device)?,
        mask: b.mask.to_device(&device)?,
        select: b.select.to_device(&device)?,
        targets: b.targets.to_device(&device)?,
        tokens: b.tokens,
    };
    let denom = b.targets.dim(0)? as f64;
    let mut times = vec![];
    for _ in 0..steps + 1 {
        let t0 = Instant::now();
        let mut acc = GradAccum::new(opt.vars.len());
        let f = |h: &candle_core::Tensor| -> Result<candle_core::Tensor> { Ok((label_nll_sum(&model, h, &b, 256)? / denom)?) };
        forward_backward(&model, &b.ids, &b.pos, b.mask.clone(), grad_checkpointing, &f, &opt.vars, &mut acc)?;
        let grads = acc.finish(&opt.vars)?;
        opt.step(&grads, 1e-4)?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let all = times[1..].to_vec();
    let mut sorted = all.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(SftBench {
        tool: "lorafit",
        model: model_name.into(),
        batch,
        seq,
        targets: targets.to_vec(),
        r,
        grad_checkpointing,
        trainable_params: adapter.num_params(),
        step_s_median: median,
        step_s_all: all,
        tokens_per_s: (batch * seq) as f64 / median,
        peak_rss_bytes: peak_rss_bytes(),
        rss_after_load_bytes: rss_after_load,
    })
}
