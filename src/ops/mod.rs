//! Training ops whose backward computes the gradient of the *input only*.
//!
//! Why: candle's `Matmul` backward always computes `dX` and `dW`, and keeps `dW` (and the
//! activation-sized gradients of frozen bias adds, norm weights and masks) in the `GradStore`,
//! even for plain frozen tensors. The fused `layer_norm`/`rms_norm`/`softmax_last_dim`/`rope`
//! kernels are fast but have no backward at all, so gradients vanish silently.
//!
//! Every op here runs its forward with candle's fast (fused) ops on a *detached* input, then
//! re-attaches the result to the graph through [`InputGrad`], a `CustomOp1` on the input whose
//! backward is written out analytically:
//!
//! | op              | forward                        | backward (g = dL/dy)                             |
//! |-----------------|--------------------------------|--------------------------------------------------|
//! | `frozen_linear` | `y = x W + b`  (W: (in, out))  | `dx = g W^T`                                     |
//! | `layer_norm`    | `y = x̂ γ + β`                 | `dx = (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)) / σ`, `ĝ = gγ` |
//! | `rms_norm`      | `y = x r γ`, `r = 1/rms(x)`    | `dx = r ĝ - x r³ mean(ĝ x)`                      |
//! | `masked_softmax`| `y = softmax(s + mask)`        | `ds = y (g - Σ g y)`                             |
//! | `rope`          | rotate pairs by θ              | rotate `g` by -θ                                 |
//! | `cross_entropy` | `l_i = lse(z_i) - z_i[t_i]`    | `dz_i = g_i (softmax(z_i) - onehot(t_i))`        |
//!
//! | `act::gelu`, `act::silu` | one pass on f32 CPU tensors | `dx = g f'(x)` (`act.rs`)                     |
//! | `attention::packed_self_attention` | GPT-2 attention from the packed qkv | SDPA's backward (`attention.rs`) |
//! | `family::softcap`, `family::gelu_erf` | `c·tanh(x/c)`, exact GELU | `dx = g f'(x)` (`family.rs`)      |
//! | `family::heads` | (B, T, n, D) -> per-head norm, (B, n, T, D), rope | the three backwards in reverse |
//! | `family::gated` | `act(gate) · up` (SwiGLU / GeGLU)  | `d gate = g·up·act'(gate)`, `d up = g·act(gate)` |
//!
//! [`grad3_op`] does the same for a node with three inputs (the fused LoRA linear,
//! `linear.rs`). `tests/ops.rs` checks every op against candle's composed ops; the model
//! and LoRA gradients are checked against torch (`tests/reference.rs`).
//!
//! ## Device-specific code: every branch, and its generic twin
//!
//! A branch that only one device takes is tested only where that device runs. CI has no GPU, so
//! every CPU fast path asks [`fast_cpu`] (never `is_cpu()` itself), and the test knob
//! `LORAFIT_GENERIC_OPS=1` (read once, [`generic_ops`]) makes it answer false: the CPU then runs
//! the device-generic twin, the code CUDA runs, and CI runs the op, reference and training tests
//! that way too (`.ci/run`). In that mode [`matmul`] also refuses the operand layouts cuBLAS
//! refuses (candle's CPU GEMM takes any strides; its CUDA one does not).
//! `tests/generic_ops.rs` fails on a raw device test (`is_cpu()`, `is_cuda()`, `Storage::Cpu`,
//! `Device::Cpu =>`, ...) in `src/` that is not in this table, and on a caller of `fast_cpu` that is not
//! in it either. Add the row with the branch.
//!
//! | where (file, what)                          | device-specific branch                        | generic twin (what CUDA runs)                  |
//! |---------------------------------------------|-----------------------------------------------|------------------------------------------------|
//! | `src/ops/act.rs` (fast_cpu) `act`, `act_fwd`, `act_bwd` | one-pass f32 GELU / SiLU ops (`Act`, `ActGrad`) | `Pre` of candle's `gelu`/`silu` + the derivative as tensor ops |
//! | `src/ops/fused_cpu.rs` (fast_cpu) `usable`: `linear.rs` dropout, LoRA update, dx; `layer_norm_pre` / `rms_norm_pre` backward; `lm_head_cross_entropy`'s softmax | one-pass f32 kernels (`drop_mul`, `add_dropped`, `norm_backward`) (`add_matmul`: candle's GEMM, then one pass), `softmax_xent` | the same formulas as tensor ops (`mask.to_dtype * keep * x`, `matmul * s + y`, the norms' composed backward, max/exp/sum/div/scatter_add) |
//! | `src/lora/mod.rs` (fast_cpu) `Linear::store_for_gemm` | a dense f32 weight held in the orientation whose larger-k GEMM has a row-major right-hand side (`fused_cpu::transpose2` at load) | the checkpoint's orientation (cuBLAS takes either at full speed) |
//! | `src/ops/gemv.rs` (fast_cpu) `gemv`                    | AVX2 + FMA one-row f32 matrix-vector product  | `matmul_rows`' GEMM                             |
//! | `src/ops/mod.rs` `matmul` (every GEMM in `ops/`)       | none; in generic mode it first checks cuBLAS's layout rule | candle's `matmul` (cuBLAS strided batched GEMM) |
//! | `src/ops/mod.rs` `Precomputed::cpu` / `::cuda`         | candle's backend dispatch (`cpu_fwd` / `cuda_fwd`): not a fast path, one body (`Precomputed::storage`), the backend only picks the storage variant | the `cuda` arm, compiled by `scripts/check-cuda.sh` only |
//! | `src/runtime.rs` (raw 1) `parse_dtype`                 | `--dtype auto`: f32 on CPU, bf16 on a GPU     | a default, not an op path (generic mode keeps f32 on CPU) |
//! | `src/merge.rs` (raw 1) `check_and_write`               | merging runs on the CPU by design (reads the CPU buffer) | none: no merge on a GPU                       |
//!
//! Candle's own per-device kernels (GEMM, softmax, norms, rope, reductions) are not ours and are
//! checked on a GPU only (`scripts/gpu-bench.sh`'s `correctness` and `training-correctness` stages).
use std::sync::{Arc, Mutex, OnceLock};

pub mod act;
pub mod attention;
pub mod family;
pub mod fused_cpu;
mod gemv;
pub mod linear;

use candle_core::{backend::BackendStorage, CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D};

/// The test knob: `LORAFIT_GENERIC_OPS=1` makes every op take its device-generic branch (what
/// CUDA runs) on the CPU too. Read once per process; `0`, `false`, `no`, `off` or empty = off.
pub const GENERIC_OPS_ENV: &str = "LORAFIT_GENERIC_OPS";

/// Whether `LORAFIT_GENERIC_OPS` is on (read once, on first use).
pub fn generic_ops() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let v = std::env::var(GENERIC_OPS_ENV).unwrap_or_default();
        let on = !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no" | "off");
        if on {
            tracing::info!("{GENERIC_OPS_ENV}={v}: every op takes its device-generic (CUDA) branch, CPU fast paths are off");
        }
        on
    })
}

/// Whether a CPU-only fast path may run on `device`: on the CPU, unless `LORAFIT_GENERIC_OPS`
/// is on. The one place a device decides an op's branch (see the table in this module's header).
pub fn fast_cpu(device: &Device) -> bool {
    device.is_cpu() && !generic_ops()
}

/// `a.matmul(b)`. Under `LORAFIT_GENERIC_OPS` it first refuses, on any device, the operand
/// layouts that candle's CUDA GEMM refuses (`MatMulNonContiguous`) although its CPU GEMM takes
/// them: so a layout that would fail only on a GPU fails in CI.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if generic_ops() {
        cublas_layout_ok(a, b)?;
    }
    if crate::prof::enabled() {
        // 2·m·k·n per matrix: every row of a (batch · m of them) dots k values into n outputs.
        crate::prof::flops(2 * a.elem_count() as u64 * b.dim(D::Minus1)? as u64);
    }
    a.matmul(b)
}

/// candle 0.11's `gemm_config` (cuda_backend/mod.rs): each operand's last two strides must
/// describe a row-major or a transposed row-major matrix (a size-1 dim excepted), and its batch
/// dims (at most 2) must be evenly strided.
fn cublas_layout_ok(a: &Tensor, b: &Tensor) -> candle_core::Result<()> {
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || ra != rb {
        return Ok(()); // candle's own shape error follows
    }
    let (m, k, n) = (a.dim(ra - 2)?, a.dim(ra - 1)?, b.dim(rb - 1)?);
    // (rows, cols) of one matrix, its strides, and whether cuBLAS can read it.
    let mat_ok = |rows: usize, cols: usize, s: &[usize]| {
        let (s_col, s_row) = (s[s.len() - 1], s[s.len() - 2]);
        ((s_col == 1 || cols == 1) && (s_row == cols || rows == 1)) || ((s_col == rows || cols == 1) && (s_row == 1 || rows == 1))
    };
    let batch_ok = |t: &Tensor| {
        let (s, d) = (t.stride(), t.dims());
        match s.len() - 2 {
            0 | 1 => true,
            2 => s[0] == s[1] * d[1] || d[0] == 1 || d[1] == 1,
            _ => false,
        }
    };
    if mat_ok(m, k, a.stride()) && mat_ok(k, n, b.stride()) && batch_ok(a) && batch_ok(b) {
        return Ok(());
    }
    candle_core::bail!(
        "matmul: a {:?} (stride {:?}) @ b {:?} (stride {:?}): cuBLAS cannot read this layout (candle's CUDA GEMM fails with MatMulNonContiguous); make the operand contiguous ({GENERIC_OPS_ENV} check)",
        a.dims(),
        a.stride(),
        b.dims(),
        b.stride()
    )
}

/// An op's output computed before the op is applied, handed over once by its forward.
struct Precomputed {
    name: &'static str,
    out: Mutex<Option<Tensor>>,
}

impl Precomputed {
    fn new(name: &'static str, y: Tensor) -> Self {
        Self { name, out: Mutex::new(Some(y)) }
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        let out = self.out.lock().unwrap().take();
        let out = out.ok_or_else(|| candle_core::Error::Msg(format!("{}: forward run twice", self.name)))?;
        out.contiguous()
    }

    /// The output's storage for the backend candle dispatched to (`cpu_fwd` / `cuda_fwd`): one
    /// body for every device; the backend only picks its storage variant (`pick`).
    fn storage<S: BackendStorage>(&self, device: &str, pick: impl FnOnce(&Storage) -> Option<&S>) -> candle_core::Result<(S, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            None => candle_core::bail!("{}: output is not on the {device}", self.name),
        }
    }

    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        self.storage("cpu", |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        self.storage("gpu", |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }
}

type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// Attaches a precomputed output `y = f(x)` to the graph as a node with input `x`, whose
/// backward is `bwd(x, y, g)`. The output is held only until the forward copies it in.
struct InputGrad {
    y: Precomputed,
    bwd: Backward,
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        self.y.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(&x.detach(), &y.detach(), g)?))
    }
}

type Backward3 = Box<
    dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync,
>;

/// [`InputGrad`] for a node with three inputs (e.g. x and the two LoRA matrices).
struct Grad3 {
    y: Precomputed,
    bwd: Backward3,
}

impl CustomOp3 for Grad3 {
    fn name(&self) -> &'static str {
        self.y.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(&a1.detach(), &a2.detach(), &a3.detach(), g)
    }
}

/// Attaches a precomputed `y = f(a1, a2, a3)` to the graph as ONE node with three inputs,
/// whose backward `bwd(a1, a2, a3, g)` returns the gradient of each input (None: not needed).
pub fn grad3_op(
    name: &'static str,
    args: (&Tensor, &Tensor, &Tensor),
    y: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> candle_core::Result<Tensor> {
    let op = Grad3 { y: Precomputed::new(name, y), bwd: Box::new(bwd) };
    args.0.apply_op3_arc(args.1, args.2, Arc::new(Box::new(op)))
}

/// Computes `fwd(x)` without a graph, then attaches it with an input-only backward.
/// When `x` is not part of a graph (inference), the result is returned as is.
pub fn input_grad_op(
    name: &'static str,
    x: &Tensor,
    fwd: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    let y = fwd(&x.detach())?;
    if !x.track_op() {
        return Ok(y);
    }
    let op = InputGrad { y: Precomputed::new(name, y), bwd: Box::new(bwd) };
    x.apply_op1_arc(Arc::new(Box::new(op)))
}

/// A row-wise or elementwise op applied to a linear layer's input inside the layer's fused node
/// (`linear.rs`) and recomputed in the backward instead of kept: the LayerNorm before
/// `c_attn` / `c_fc`, GELU before the MLP's `c_proj`, LLaMA's RMSNorms. Per token this saves
/// the op's output (C or F values) for as long as the graph lives.
#[derive(Clone)]
pub struct Pre {
    pub fwd: Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>,
    /// (x, dL/d pre(x)) -> dL/dx.
    pub bwd: Arc<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>,
}

impl Pre {
    /// The op as a graph node of its own (its output is then kept by the next node).
    pub fn apply(&self, name: &'static str, x: &Tensor) -> candle_core::Result<Tensor> {
        let (fwd, bwd) = (self.fwd.clone(), self.bwd.clone());
        input_grad_op(name, x, move |x| fwd(x), move |x, _y, g| bwd(x, g))
    }
}

/// `softplus(x) = log(1 + e^x)`, written stably as `relu(x) + log(1 + e^-|x|)`; with
/// `x = -d` it is the pairwise reward loss `-log σ(d)`.
pub fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// `x @ w` for x: (..., k) and a 2-D w: (k, n) as ONE 2-D GEMM over the flattened rows.
/// (candle's `broadcast_matmul` would broadcast w over the batch, and copies it per batch
/// entry when x is not contiguous.)
pub fn matmul_rows(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / k.max(1);
    let x2 = x.contiguous()?.reshape((rows, k))?;
    let y = if let Some(y) = if rows == 1 { gemv::gemv(&x2, w)? } else { None } {
        y // one row, no graph: a streaming matrix-vector product (ops/gemv.rs)
    } else if rows <= 16 && !w.is_contiguous() && w.t()?.is_contiguous() {
        // Decoding (a few rows) against a transposed weight (the tied LM head, LLaMA's (out, in)
        // linears): gemm's small-M kernels on a transposed right-hand side run 2-5x slower than
        // the same product swapped, (W xᵀ)ᵀ, with the weight as a row-major left-hand side.
        matmul(&w.t()?, &x2.t()?)?.t()?.contiguous()?
    } else {
        matmul(&x2, w)?
    };
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(1)?;
    y.reshape(out)
}

/// `y = x @ w + b` for a frozen weight `w` of shape (in, out) (a transposed view is fine).
/// x: (..., in) -> y: (..., out). No gradient is computed or kept for `w` or `b`.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let w = w.clone();
    linear::lora_linear(x, None, Arc::new(move |_| Ok(w.clone())), b.cloned(), vec![], None)
}

/// LayerNorm over the last dim with frozen `gamma`, `beta` (computed in f32, returned in x's dtype).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    layer_norm_pre(gamma, beta, eps)?.apply("layer_norm", x)
}

/// [`layer_norm`] as a [`Pre`].
pub fn layer_norm_pre(gamma: &Tensor, beta: &Tensor, eps: f64) -> candle_core::Result<Pre> {
    let (g32, b32) = (gamma.to_dtype(DType::F32)?, beta.to_dtype(DType::F32)?);
    let gamma_bwd = g32.clone();
    Ok(Pre {
        fwd: Arc::new(move |x| {
            let _p = crate::prof::scope(crate::prof::Cat::NormAct);
            let dt = x.dtype();
            let x32 = x.to_dtype(DType::F32)?.contiguous()?;
            candle_nn::ops::layer_norm(&x32, &g32, &b32, eps as f32)?.to_dtype(dt)
        }),
        bwd: Arc::new(move |x, g| {
            let _p = crate::prof::scope(crate::prof::Cat::NormAct);
            if fused_cpu::usable(&[x, g]) {
                return fused_cpu::norm_backward(fused_cpu::Norm::Layer, x, g, &gamma_bwd, eps);
            }
            let dt = x.dtype();
            let x = x.to_dtype(DType::F32)?;
            let g = g.to_dtype(DType::F32)?;
            let mu = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mu)?;
            let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let xhat = xc.broadcast_mul(&rstd)?;
            let gh = g.broadcast_mul(&gamma_bwd)?;
            let m1 = gh.mean_keepdim(D::Minus1)?;
            let m2 = (&gh * &xhat)?.mean_keepdim(D::Minus1)?;
            let dx = gh.broadcast_sub(&m1)?.sub(&xhat.broadcast_mul(&m2)?)?.broadcast_mul(&rstd)?;
            dx.to_dtype(dt)
        }),
    })
}

/// RMSNorm over the last dim with a frozen `gamma`, LLaMA-style: normalise in f32, cast back
/// to x's dtype, then scale by gamma.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    rms_norm_pre(gamma, eps)?.apply("rms_norm", x)
}

/// [`rms_norm`] as a [`Pre`].
pub fn rms_norm_pre(gamma: &Tensor, eps: f64) -> candle_core::Result<Pre> {
    let g32 = gamma.to_dtype(DType::F32)?;
    let gamma_bwd = g32.clone();
    Ok(Pre {
        fwd: Arc::new(move |x| {
            let _p = crate::prof::scope(crate::prof::Cat::NormAct);
            let dt = x.dtype();
            let x32 = x.to_dtype(DType::F32)?.contiguous()?;
            candle_nn::ops::rms_norm(&x32, &g32, eps as f32)?.to_dtype(dt)
        }),
        bwd: Arc::new(move |x, g| {
            let _p = crate::prof::scope(crate::prof::Cat::NormAct);
            if fused_cpu::usable(&[x, g]) {
                return fused_cpu::norm_backward(fused_cpu::Norm::Rms, x, g, &gamma_bwd, eps);
            }
            let dt = x.dtype();
            let x = x.to_dtype(DType::F32)?;
            let gh = g.to_dtype(DType::F32)?.broadcast_mul(&gamma_bwd)?;
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let m = (&gh * &x)?.mean_keepdim(D::Minus1)?;
            let dx = gh.broadcast_mul(&r)?.sub(&x.broadcast_mul(&(r.powf(3.0)? * m)?)?)?;
            dx.to_dtype(dt)
        }),
    })
}

/// `softmax(scores + mask)` over the last dim, computed in f32 and returned in the scores'
/// dtype. `mask` is additive (0 or a large negative) and broadcast to `scores`.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let mask = mask.clone();
    input_grad_op(
        "masked_softmax",
        scores,
        move |s| {
            let dt = s.dtype();
            let s = s.to_dtype(DType::F32)?.broadcast_add(&mask)?;
            candle_nn::ops::softmax_last_dim(&s)?.to_dtype(dt)
        },
        |_s, y, g| {
            let dt = y.dtype();
            let (y, g) = (y.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
            let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
            (y * g.broadcast_sub(&dot)?)?.to_dtype(dt)
        },
    )
}

/// Rotates the first `2 · cos.dim(-1)` values of the last dim of x by (cos, sin), HF's
/// non-interleaved ("rotate_half") form; the rest pass through (partial rotary). No graph.
/// x: (B, H, T, D); cos, sin: (B, T, R/2), contiguous. The output is contiguous.
pub(crate) fn rope_rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (r, d) = (2 * cos.dim(D::Minus1)?, x.dim(D::Minus1)?);
    if r == d {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
    }
    let rot = candle_nn::rotary_emb::rope(&x.narrow(D::Minus1, 0, r)?.contiguous()?, cos, sin)?;
    Tensor::cat(&[&rot, &x.narrow(D::Minus1, r, d - r)?], D::Minus1)?.contiguous()
}

/// Rotary embedding, HF's non-interleaved ("rotate_half") form.
/// x: (B, H, T, D); cos, sin: (B, T, R/2), gathered at each row's positions. With R < D (partial
/// rotary: GPT-NeoX, Phi-3) only the first R values of each head rotate; the rest pass through.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let (cos_b, neg_sin) = (cos.clone(), sin.neg()?);
    input_grad_op(
        "rope",
        x,
        move |x| rope_rotate(x, &cos, &sin),
        // The transpose of a rotation by θ is the rotation by -θ.
        move |_x, _y, g| rope_rotate(g, &cos_b, &neg_sin),
    )
}

/// Per-row cross-entropy `lse(z_i) - z_i[t_i]` (f32), logits z: (N, V), targets: (N,) u32.
/// Never materialises more than one extra (N, V) f32 buffer.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.unsqueeze(1)?; // (N, 1)
    let t_bwd = targets.clone();
    input_grad_op(
        "cross_entropy",
        logits,
        move |z| {
            let _p = crate::prof::scope(crate::prof::Cat::LossHead);
            let z = z.to_dtype(DType::F32)?;
            let max = z.max_keepdim(D::Minus1)?;
            let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
            let picked = z.gather(&targets, D::Minus1)?;
            (lse - picked)?.squeeze(1)
        },
        move |z, _y, g| {
            let _p = crate::prof::scope(crate::prof::Cat::LossHead);
            let dt = z.dtype();
            let p = candle_nn::ops::softmax_last_dim(&z.to_dtype(DType::F32)?)?;
            let onehot = p.zeros_like()?.scatter_add(&t_bwd, &t_bwd.ones_like()?.to_dtype(DType::F32)?, D::Minus1)?;
            (p - onehot)?.broadcast_mul(&g.to_dtype(DType::F32)?.unsqueeze(1)?)?.to_dtype(dt)
        },
    )
}

/// The LM head and cross-entropy fused, chunked over rows: per-row `lse(h_i W) - (h_i W)[t_i]`
/// (f32) for h: (N, C), a frozen head w: (C, V) view, targets: (N,) u32.
///
/// Only `chunk` rows of logits exist at a time: the (N, V) logits matrix, the largest
/// activation of a small model with a big vocabulary (KoGPT2: 51,200), is never materialised.
/// When h is part of a graph, each chunk's input gradient per unit of loss,
/// `(softmax(h W) - onehot(t)) Wᵀ`, is computed right away from the chunk's logits (as Liger's
/// fused linear cross-entropy does) and kept, (N, C); the backward only scales its rows by g.
/// So the logits are computed once, not again in the backward: a third fewer head FLOPs.
pub fn lm_head_cross_entropy(h: &Tensor, w: &Tensor, targets: &Tensor, chunk: usize) -> candle_core::Result<Tensor> {
    lm_head_cross_entropy_capped(h, w, targets, chunk, None, 1.0)
}

/// [`lm_head_cross_entropy`] on soft-capped, scaled logits `z = s · c · tanh(h W / c)` (Gemma's
/// final soft-capping `c`, and `s = 1 / temperature`); with `cap = None`, `z = s · h W`.
/// Its input gradient per unit of loss is `((softmax(z) - onehot(t)) ⊙ s (1 - tanh²)) Wᵀ`.
pub fn lm_head_cross_entropy_capped(h: &Tensor, w: &Tensor, targets: &Tensor, chunk: usize, cap: Option<f64>, scale: f64) -> candle_core::Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?;
    let chunk = chunk.max(1);
    let rows = h.dim(0)?;
    let want_grad = h.track_op();
    let dh_saved: Arc<Mutex<Option<Tensor>>> = Arc::new(Mutex::new(None));
    let dh_fwd = dh_saved.clone();
    let w = w.clone();
    input_grad_op(
        "lm_head_cross_entropy",
        h,
        move |h| {
            let _p = crate::prof::scope(crate::prof::Cat::LossHead);
            let dt = h.dtype();
            let (mut nll, mut dh) = (Vec::new(), Vec::new());
            for s in (0..rows).step_by(chunk) {
                let n = chunk.min(rows - s);
                let hc = h.narrow(0, s, n)?;
                let mut z = matmul(&hc, &w)?.to_dtype(DType::F32)?; // (n, V)
                let t = targets.narrow(0, s, n)?; // (n,)
                if cap.is_none() && fused_cpu::usable(&[&z]) {
                    // One pass per row (ops/fused_cpu.rs), the same numbers as below.
                    let (l, p) = fused_cpu::softmax_xent(&z, &t, scale, want_grad)?;
                    drop(z);
                    nll.push(l);
                    if let Some(p) = p {
                        dh.push(matmul(&p.to_dtype(dt)?, &w.t()?)?);
                    }
                    continue;
                }
                // Soft-capping: keep tanh for the gradient's (1 - tanh²).
                let mut tanh = None;
                if let Some(c) = cap {
                    let t = (z / c)?.tanh()?;
                    z = (&t * c)?;
                    tanh = Some(t);
                }
                if scale != 1.0 {
                    z = (z * scale)?;
                }
                let t = t.unsqueeze(1)?; // (n, 1)
                let max = z.max_keepdim(D::Minus1)?;
                let e = z.broadcast_sub(&max)?.exp()?;
                let sum = e.sum_keepdim(D::Minus1)?;
                let lse = (sum.log()? + &max)?;
                nll.push((lse - z.gather(&t, D::Minus1)?)?.squeeze(1)?);
                if want_grad {
                    drop(z);
                    // softmax - onehot, then back through the head: (n, V) @ (V, C).
                    let p = e.broadcast_div(&sum)?;
                    let mut p = p.scatter_add(&t, &t.ones_like()?.to_dtype(DType::F32)?.neg()?, D::Minus1)?;
                    if let Some(th) = tanh {
                        p = (p * ((th.sqr()?.neg()? + 1.0)? * scale)?)?;
                    } else if scale != 1.0 {
                        p = (p * scale)?;
                    }
                    dh.push(matmul(&p.to_dtype(dt)?, &w.t()?)?);
                }
            }
            if want_grad {
                *dh_fwd.lock().unwrap() = Some(Tensor::cat(&dh, 0)?);
            }
            Tensor::cat(&nll, 0)
        },
        move |h, _y, g| {
            let _p = crate::prof::scope(crate::prof::Cat::LossHead);
            let dh = dh_saved.lock().unwrap().take().ok_or_else(|| candle_core::Error::Msg("lm_head_cross_entropy: backward run twice".into()))?;
            dh.broadcast_mul(&g.to_dtype(h.dtype())?.unsqueeze(1)?)
        },
    )
}
