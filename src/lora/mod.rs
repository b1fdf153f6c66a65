//! LoRA with PEFT's semantics, attached at model construction.
//!
//! `y = W x + b + Σ_adapters  w_a · s · B A dropout(x)`, `s = lora_alpha / r` (or
//! `lora_alpha / sqrt(r)` with `use_rslora`), A: (r, in) Kaiming-uniform(a = √5), B: (out, r) zeros.
//! Reference: PEFT `tuners/lora/layer.py` (`Linear.forward`) and `tuners_utils.py`
//! (`check_target_module_exists`). The base output is never scaled (candle-lora's bug).
//!
//! Every LoRA-capable layer is a [`Linear`] built with [`Linear::load`], which asks each
//! [`Adapter`] in the [`AdapterSet`] whether it targets the layer's HF module path. The
//! frozen weight stays a plain tensor and goes through [`ops::linear`] (no `dW`); the
//! adapter tensors are f32 (Vars when trainable), whatever the base dtype.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

mod config;

use crate::error::Kind;
use crate::ops::{self, linear};
use crate::quant::{BaseQuant, Nf4};
use crate::rng::SeededRng;

pub use config::{parse_peft_key, peft_default_targets, peft_key, LoraConfig, TargetModules};

/// The LoRA matrices of one module. A: (r, in), B: (out, r), both f32.
#[derive(Clone)]
pub struct LoraTensors {
    pub path: String,
    pub a: Tensor,
    pub b: Tensor,
    /// Set when the adapter is trainable: the same storage as `a`/`b`, for the optimizer.
    pub vars: Option<(Var, Var)>,
    pub scaling: f64,
}

/// Where an adapter's weights come from.
enum Init {
    /// Tensors read from a PEFT file, keyed by PEFT key (f32).
    Loaded(HashMap<String, Tensor>),
    /// New adapter: A Kaiming-uniform from a seeded stream per module, B zeros.
    Fresh { seed: u64 },
}

/// One LoRA adapter: its PEFT config and the tensors attached to the model's layers.
pub struct Adapter {
    pub name: String,
    pub config: LoraConfig,
    /// Stacking weight: multiplies this adapter's contribution (1.0 = as trained).
    pub weight: f64,
    trainable: bool,
    active: AtomicBool,
    training: AtomicBool,
    dropout_rng: Mutex<SeededRng>,
    init: Init,
    modules: Mutex<Vec<LoraTensors>>,
    used_keys: Mutex<HashSet<String>>,
    /// Set when attached to a GPT-2 `Conv1D` layer: PEFT then records `fan_in_fan_out: true`.
    on_conv1d: AtomicBool,
}

impl Adapter {
    fn build(name: &str, config: LoraConfig, weight: f64, trainable: bool, init: Init, seed: u64) -> Result<Arc<Self>> {
        if matches!(init, Init::Fresh { .. }) {
            // A new adapter's settings come from the training config's `[lora]` section.
            config.check_values("lora.").with_context(|| format!("adapter {name:?}: invalid [lora] settings"))?;
            if config.lora_alpha <= 0.0 {
                anyhow::bail!("adapter {name:?}: lora.lora_alpha = {} must be positive (the scaling is lora_alpha / r)", config.lora_alpha)
            }
        }
        config.validate().with_context(|| format!("adapter {name:?}: unsupported adapter configuration"))?;
        Ok(Arc::new(Self {
            name: name.to_string(),
            config,
            weight,
            trainable,
            active: AtomicBool::new(true),
            training: AtomicBool::new(false),
            dropout_rng: Mutex::new(SeededRng::derive(seed, "lora_dropout")),
            init,
            modules: Mutex::new(vec![]),
            used_keys: Mutex::new(HashSet::new()),
            on_conv1d: AtomicBool::new(false),
        }))
    }

    /// A new trainable adapter, initialised from `seed` the way PEFT does.
    pub fn fresh(name: &str, config: LoraConfig, seed: u64) -> Result<Arc<Self>> {
        Self::build(name, config, 1.0, true, Init::Fresh { seed }, seed)
    }

    /// An adapter from tensors keyed by PEFT key. `trainable` makes them Vars (to continue training).
    pub fn from_tensors(
        name: &str,
        config: LoraConfig,
        tensors: HashMap<String, Tensor>,
        weight: f64,
        trainable: bool,
    ) -> Result<Arc<Self>> {
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::build(name, config, weight, trainable, Init::Loaded(tensors), 0)
    }

    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// Switches this adapter on or off (for PPO's role switching).
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::SeqCst)
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// The dropout stream's position (checkpoints; recomputation in activation checkpointing).
    pub fn dropout_rng(&self) -> SeededRng {
        self.dropout_rng.lock().unwrap().clone()
    }

    pub fn set_dropout_rng(&self, rng: SeededRng) {
        *self.dropout_rng.lock().unwrap() = rng;
    }

    /// Training mode enables LoRA dropout.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::SeqCst)
    }

    /// The modules this adapter was attached to, in construction order.
    pub fn modules(&self) -> Vec<LoraTensors> {
        self.modules.lock().unwrap().clone()
    }

    /// Trainable variables with their PEFT keys, in a stable order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut out = vec![];
        for m in self.modules.lock().unwrap().iter() {
            if let Some((a, b)) = &m.vars {
                out.push((peft_key(&m.path, "lora_A"), a.clone()));
                out.push((peft_key(&m.path, "lora_B"), b.clone()));
            }
        }
        out
    }

    /// All tensors keyed by PEFT key (what `adapter_model.safetensors` holds).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for m in self.modules.lock().unwrap().iter() {
            out.push((peft_key(&m.path, "lora_A"), m.a.clone()));
            out.push((peft_key(&m.path, "lora_B"), m.b.clone()));
        }
        out
    }

    /// True when attached to Conv1D layers (GPT-2), where PEFT sets `fan_in_fan_out`.
    pub fn on_conv1d(&self) -> bool {
        self.on_conv1d.load(Ordering::SeqCst)
    }

    /// Number of LoRA parameters attached.
    pub fn num_params(&self) -> usize {
        self.modules.lock().unwrap().iter().map(|m| m.a.elem_count() + m.b.elem_count()).sum()
    }

    /// Creates or looks up the LoRA tensors for the module at `path` (in -> out features).
    fn attach(&self, path: &str, in_dim: usize, out_dim: usize, dev: &Device) -> Result<LoraTensors> {
        let (r, scaling) = self.config.rank_and_scaling(path);
        let (a, b) = match &self.init {
            Init::Fresh { seed } => {
                // Kaiming-uniform with a = √5 on (r, in): bound = gain·√(3/fan_in) = 1/√in.
                let bound = 1.0 / (in_dim as f32).sqrt();
                let mut rng = SeededRng::derive(*seed, path);
                let a = rng.uniform(&[r, in_dim], -bound, bound, dev)?;
                let b = Tensor::zeros((out_dim, r), DType::F32, dev)?;
                (a, b)
            }
            Init::Loaded(map) => {
                let get = |which: &str, want: (usize, usize)| -> Result<Tensor> {
                    let key = peft_key(path, which);
                    let Some(t) = map.get(&key) else {
                        crate::bail_kind!(Kind::AdapterModelMismatch, "adapter {:?} targets {path} but has no tensor {key}", self.name)
                    };
                    if t.dims() != [want.0, want.1] {
                        crate::bail_kind!(
                            Kind::AdapterModelMismatch,
                            "adapter {:?}: tensor {key} has shape {:?}, the model needs [{}, {}] \
                             (was the adapter trained on another base model?)",
                            self.name,
                            t.dims(),
                            want.0,
                            want.1
                        )
                    }
                    self.used_keys.lock().unwrap().insert(key);
                    Ok(t.to_device(dev)?)
                };
                let a = get("lora_A", (r, in_dim))?;
                let b = get("lora_B", (out_dim, r))?;
                (a, b)
            }
        };
        let (a, b, vars) = if self.trainable {
            let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
            (va.as_tensor().clone(), vb.as_tensor().clone(), Some((va, vb)))
        } else {
            (a, b, None)
        };
        let t = LoraTensors { path: path.to_string(), a, b, vars, scaling };
        self.modules.lock().unwrap().push(t.clone());
        Ok(t)
    }

    /// After construction: every loaded tensor must have found its module, and the adapter
    /// must have attached somewhere. Loud errors here replace PEFT's silent no-op adapters.
    /// `offered`: the names of the model's LoRA-capable layers (listed when nothing matched).
    fn check_complete(&self, offered: &[String]) -> Result<()> {
        if self.modules.lock().unwrap().is_empty() {
            let targets = serde_json::to_string(&self.config.target_modules).unwrap_or_default();
            let names = if offered.is_empty() { "none".to_string() } else { offered.join(", ") };
            if matches!(self.init, Init::Loaded(_)) {
                crate::bail_kind!(
                    Kind::AdapterModelMismatch,
                    "adapter {:?}: target_modules {targets} match no layer of this model, whose linear layers are {names} \
                     (the adapter was made for {}; was that another architecture?)",
                    self.name,
                    self.config.base_model_name_or_path.as_deref().unwrap_or("an unrecorded base model")
                )
            }
            crate::bail_kind!(
                Kind::TargetsMatchNothing,
                "adapter {:?}: target_modules {targets} match no layer of this model; its linear layers are named: {names}",
                self.name
            )
        }
        if let Init::Loaded(map) = &self.init {
            let used = self.used_keys.lock().unwrap();
            let mut unused: Vec<&String> = map.keys().filter(|k| !used.contains(*k)).collect();
            unused.sort();
            if let Some(k) = unused.first() {
                crate::bail_kind!(
                    Kind::AdapterModelMismatch,
                    "adapter {:?}: tensor {k} matches no LoRA layer of this model ({} unmatched keys in all); \
                     check that the adapter was trained on this base model and that target_modules lists its module",
                    self.name,
                    unused.len()
                )
            }
        }
        Ok(())
    }
}

/// What a model needs at construction to attach LoRA: the adapters, and the global switch
/// shared by every layer (see [`AdapterSet::disabled`]).
#[derive(Clone)]
pub struct AdapterSet {
    pub adapters: Vec<Arc<Adapter>>,
    enabled: Arc<AtomicBool>,
    /// False inside [`AdapterSet::no_grad`]: trainable tensors are used detached.
    grad: Arc<AtomicBool>,
    /// How the frozen block linears are stored (NF4 for a 4-bit base).
    pub base_quant: BaseQuant,
    /// The last component of every module path offered to the adapters at construction
    /// (`c_attn`, `q_proj`, ...), in order, once each: what `target_modules` can name.
    offered: Arc<Mutex<Vec<String>>>,
}

impl AdapterSet {
    pub fn new(adapters: Vec<Arc<Adapter>>) -> Self {
        Self {
            adapters,
            enabled: Arc::new(AtomicBool::new(true)),
            grad: Arc::new(AtomicBool::new(true)),
            base_quant: BaseQuant::None,
            offered: Arc::new(Mutex::new(vec![])),
        }
    }

    /// The same adapters over a base whose block linears are quantized (`lm_head` stays dense).
    pub fn with_base_quant(mut self, q: BaseQuant) -> Self {
        self.base_quant = q;
        self
    }

    pub fn none() -> Self {
        Self::new(vec![])
    }

    /// Turns every adapter off until the guard drops: the model is then exactly its base
    /// (PPO's reference pass, torchtune's `disable_adapter`).
    pub fn disabled(&self) -> DisabledGuard {
        let was = self.enabled.swap(false, Ordering::SeqCst);
        DisabledGuard { flag: self.enabled.clone(), was }
    }

    /// Records no graph until the guard drops: trainable adapters are used as constants
    /// (generation, eval, PPO's rollout). Without it, a KV cache would keep every step's graph alive.
    pub fn no_grad(&self) -> DisabledGuard {
        let was = self.grad.swap(false, Ordering::SeqCst);
        DisabledGuard { flag: self.grad.clone(), was }
    }

    /// Activates exactly the adapters named in `names` (PPO's roles over one base).
    pub fn activate(&self, names: &[&str]) {
        for a in &self.adapters {
            a.set_active(names.contains(&a.name.as_str()));
        }
    }

    /// The adapter called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Adapter>> {
        self.adapters.iter().find(|a| a.name == name)
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Sets LoRA dropout on or off in every adapter.
    pub fn set_training(&self, on: bool) {
        self.adapters.iter().for_each(|a| a.set_training(on))
    }

    /// The names of the LoRA-capable layers offered so far (`c_attn, c_proj, c_fc, lm_head`).
    pub fn offered_names(&self) -> Vec<String> {
        self.offered.lock().unwrap().clone()
    }

    /// Records a module path offered at construction (see [`AdapterSet::offered_names`]).
    fn offer(&self, path: &str) {
        let leaf = path.rsplit('.').next().unwrap_or(path);
        let mut names = self.offered.lock().unwrap();
        if !names.iter().any(|n| n == leaf) {
            names.push(leaf.to_string());
        }
    }

    /// Called by the model loader once all layers are built.
    pub fn check_complete(&self) -> Result<()> {
        let offered = self.offered_names();
        self.adapters.iter().try_for_each(|a| a.check_complete(&offered))
    }
}

/// Restores the adapters' previous on/off state when dropped.
pub struct DisabledGuard {
    flag: Arc<AtomicBool>,
    was: bool,
}

impl Drop for DisabledGuard {
    fn drop(&mut self) {
        self.flag.store(self.was, Ordering::SeqCst)
    }
}

/// How a checkpoint stores a linear layer's weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightLayout {
    /// `nn.Linear`: (out, in).
    Linear,
    /// GPT-2's `Conv1D`: (in, out).
    Conv1D,
}

struct LoraLayer {
    adapter: Arc<Adapter>,
    t: LoraTensors,
}

/// A frozen weight as stored in the checkpoint: (out, in) for Linear, (in, out) for Conv1D.
pub enum Frozen {
    Dense(Tensor),
    /// Quantized at load (`quant.rs`); dequantized per pass.
    Nf4(Nf4),
}

/// A frozen linear layer with its LoRA adapters (HF `nn.Linear` or GPT-2 `Conv1D`).
pub struct Linear {
    /// HF module path, e.g. `transformer.h.0.attn.c_attn`.
    pub path: String,
    pub weight: Frozen,
    /// Frozen bias, (out,).
    pub bias: Option<Tensor>,
    pub layout: WeightLayout,
    lora: Vec<LoraLayer>,
    enabled: Arc<AtomicBool>,
    grad: Arc<AtomicBool>,
}

impl Linear {
    /// Loads `weight` (and `bias`) at `vb`'s path and attaches every adapter that targets it.
    pub fn load(
        vb: &VarBuilder,
        adapters: &AdapterSet,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        layout: WeightLayout,
    ) -> Result<Self> {
        let path = vb.prefix();
        let weight = match layout {
            WeightLayout::Linear => vb.get((out_dim, in_dim), "weight"),
            WeightLayout::Conv1D => vb.get((in_dim, out_dim), "weight"),
        }
        .with_context(|| format!("loading {path}.weight"))?;
        let bias = if bias { Some(vb.get(out_dim, "bias").with_context(|| format!("loading {path}.bias"))?) } else { None };
        let mut layer = Self::from_weight(path, weight, bias, layout, adapters)?;
        if adapters.base_quant == BaseQuant::Nf4 && !layer.path.ends_with("lm_head") {
            if let Frozen::Dense(w) = &layer.weight {
                layer.weight = Frozen::Nf4(Nf4::quantize(w).with_context(|| format!("quantizing {}.weight", layer.path))?);
            }
        } else if !layer.path.ends_with("lm_head") && adapters.adapters.iter().any(|a| a.is_trainable()) {
            // Training runs the backward's `g Wᵀ`; inference keeps the checkpoint's orientation.
            layer.store_for_gemm(in_dim, out_dim).with_context(|| format!("transposing {}.weight", layer.path))?;
        }
        Ok(layer)
    }

    /// Builds the layer around an existing weight (e.g. the tied `lm_head` = `wte`).
    pub fn from_weight(
        path: String,
        weight: Tensor,
        bias: Option<Tensor>,
        layout: WeightLayout,
        adapters: &AdapterSet,
    ) -> Result<Self> {
        let (in_dim, out_dim) = match layout {
            WeightLayout::Linear => (weight.dim(1)?, weight.dim(0)?),
            WeightLayout::Conv1D => (weight.dim(0)?, weight.dim(1)?),
        };
        adapters.offer(&path);
        let mut lora = vec![];
        for adapter in &adapters.adapters {
            if adapter.config.targets(&path) {
                let t = adapter.attach(&path, in_dim, out_dim, weight.device())?;
                if layout == WeightLayout::Conv1D {
                    adapter.on_conv1d.store(true, Ordering::SeqCst);
                }
                lora.push(LoraLayer { adapter: adapter.clone(), t });
            }
        }
        let weight = Frozen::Dense(weight);
        Ok(Self { path, weight, bias, layout, lora, enabled: adapters.enabled.clone(), grad: adapters.grad.clone() })
    }

    /// Keeps a dense f32 CPU weight in the orientation that makes its larger-k product (the
    /// forward `x W` has k = in, the backward `g Wᵀ` k = out) a GEMM on a row-major right-hand
    /// side: the gemm crate runs a transposed right-hand side up to 2x slower, worst at large k
    /// (GPT-2's `c_fc` backward, 512 x 3072 x 768: 218 against 442 GFLOP/s; docs/BENCHMARKS.md).
    /// (in, out) when in > out, (out, in) when out > in. A one-time copy at load; the products'
    /// sums run in the same order either way, so every result keeps its bits. `layout` then
    /// says how the tensor is *held*; adapters keep the checkpoint's (`from_weight`).
    fn store_for_gemm(&mut self, in_dim: usize, out_dim: usize) -> Result<()> {
        let want = match in_dim.cmp(&out_dim) {
            std::cmp::Ordering::Greater => WeightLayout::Conv1D,
            std::cmp::Ordering::Less => WeightLayout::Linear,
            std::cmp::Ordering::Equal => return Ok(()),
        };
        let Frozen::Dense(w) = &self.weight else { return Ok(()) };
        if want == self.layout || !ops::fast_cpu(w.device()) || w.dtype() != DType::F32 {
            return Ok(());
        }
        self.weight = Frozen::Dense(ops::fused_cpu::transpose2(w)?);
        self.layout = want;
        Ok(())
    }

    /// True when some adapter is attached to this layer.
    pub fn has_lora(&self) -> bool {
        !self.lora.is_empty()
    }

    /// The weight as stored, dense (a dequantized copy for an NF4 layer).
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Frozen::Dense(w) => w.clone(),
            Frozen::Nf4(q) => q.dequantize(q.dtype)?,
        })
    }

    /// The weight as (in, out), for `x @ w` (a view, no copy, for a dense layer).
    pub fn w_in_out(&self) -> Result<Tensor> {
        let w = self.dense_weight()?;
        Ok(match self.layout {
            WeightLayout::Linear => w.t()?,
            WeightLayout::Conv1D => w,
        })
    }

    /// x: (..., in) in the base dtype -> (..., out): the frozen layer and every active adapter
    /// as one graph node (`ops/linear.rs`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_pre(x, None)
    }

    /// `forward(pre(x))` as one node: `pre` (the LayerNorm or activation before this layer) is
    /// recomputed in the backward rather than its output kept.
    pub fn forward_pre(&self, x: &Tensor, pre: Option<&ops::Pre>) -> Result<Tensor> {
        let enabled = self.enabled.load(Ordering::Relaxed);
        let active: Vec<&LoraLayer> = self.lora.iter().filter(|l| enabled && l.adapter.is_active()).collect();
        let grad = self.grad.load(Ordering::Relaxed);
        let (mut terms, mut trainable, mut extra) = (vec![], None, vec![]);
        for l in active {
            let p = l.adapter.config.lora_dropout as f32;
            let dropout = if p > 0.0 && l.adapter.training.load(Ordering::Relaxed) {
                let mask = l.adapter.dropout_rng.lock().unwrap().dropout_keep(x.dims(), p, x.device())?;
                Some((mask, 1.0 / (1.0 - p)))
            } else {
                None
            };
            let term = linear::Term { a: l.t.a.detach(), b: l.t.b.detach(), scale: l.t.scaling * l.adapter.weight, dropout };
            if grad && l.t.a.track_op() {
                if trainable.is_none() {
                    trainable = Some((terms.len(), l.t.a.clone(), l.t.b.clone()));
                } else {
                    extra.push((term, l.t.a.clone(), l.t.b.clone()));
                    continue;
                }
            }
            terms.push(term);
        }
        let w: linear::FrozenWeight = match &self.weight {
            Frozen::Dense(_) => {
                let w = self.w_in_out()?; // a view
                Arc::new(move |_| Ok(w.clone()))
            }
            Frozen::Nf4(q) => q.frozen_weight(self.layout == WeightLayout::Linear),
        };
        let mut y = linear::lora_linear(x, pre.cloned(), w, self.bias.clone(), terms, trainable)?;
        // A second trainable adapter on the same layer (unusual): one more node, on top.
        let xin = match pre {
            Some(p) if !extra.is_empty() => p.apply("pre", x)?,
            _ => x.clone(),
        };
        for (t, a, b) in extra {
            let h = t.drop(&xin.to_dtype(DType::F32)?)?;
            let delta = (ops::matmul_rows(&ops::matmul_rows(&h, &a.t()?)?, &b.t()?)? * t.scale)?;
            let dt = y.dtype();
            y = (y + delta.to_dtype(dt)?)?;
        }
        Ok(y)
    }
}
