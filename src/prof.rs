//! Where a training step's milliseconds go: a tiny global profiler for `lorafit bench sft --profile`.
//!
//! A step is cut into phases (forward, backward, optimizer: [`phase`]); each phase records its
//! wall time, the process's CPU time (`getrusage` utime + stime: CPU/wall above 1 is parallel
//! work, below the thread count is waiting) and its minor page faults (`ru_minflt`: fresh buffers
//! faulted in). Inside a phase our own ops time themselves by kind ([`scope`]): frozen linear
//! GEMMs, the LoRA path, attention, norms/activations, the loss head, the optimizer. Scopes nest;
//! each one's time is *exclusive* (an inner scope's time is taken out of the outer one), so the
//! kinds of a phase sum to at most its wall time, and the remainder is candle's own element-wise
//! ops and autograd bookkeeping ("other"). [`crate::ops::matmul`] adds `2·m·n·k` per GEMM to the
//! innermost open scope ([`flops`]), or to the phase's "other" when none is open.
//!
//! Off (the default) every hook is one relaxed atomic load: nothing is timed, nothing allocated,
//! and no tensor is touched either way, so a step is bit-identical with and without profiling
//! (tests/bench_profile.rs). Scopes are per thread (our ops run on the caller's thread; candle's
//! GEMM and rayon workers inside them are covered by the caller's scope).
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The kinds of work a step's time is split into (`Other` is what no scope claimed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cat {
    /// `x W (+ b)` and `g Wᵀ` of the frozen linears (the base model's GEMMs).
    FrozenGemm,
    /// The LoRA path: dropout, `x Aᵀ`, `z Bᵀ`, the scale and add; backward `gz`, `dA`, `dB`, its `dx`.
    Lora,
    /// Self-attention (scores, softmax, `P V`, head split/merge) and its backward.
    Attention,
    /// LayerNorm / RMSNorm, GELU / SiLU and the other activations, forward and backward.
    NormAct,
    /// The LM head + cross-entropy (`ops::lm_head_cross_entropy`, `ops::cross_entropy`).
    LossHead,
    /// AdamW's update.
    Optimizer,
    /// Not claimed by any scope: candle's element-wise ops (residual adds, bias, casts), the
    /// embedding lookup, gradient accumulation and the autograd bookkeeping.
    Other,
}

impl Cat {
    pub const ALL: [Cat; 7] = [Cat::FrozenGemm, Cat::Lora, Cat::Attention, Cat::NormAct, Cat::LossHead, Cat::Optimizer, Cat::Other];

    /// The key in `--json` (and in scripts/bench/torch_profile_sft.py).
    pub fn key(self) -> &'static str {
        match self {
            Cat::FrozenGemm => "frozen_gemm",
            Cat::Lora => "lora",
            Cat::Attention => "attention",
            Cat::NormAct => "norm_act",
            Cat::LossHead => "loss_head",
            Cat::Optimizer => "optimizer",
            Cat::Other => "other",
        }
    }

    fn idx(self) -> usize {
        self as usize
    }
}

/// The phases of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
    Optimizer,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Forward, Phase::Backward, Phase::Optimizer];

    pub fn key(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Acc {
    ns: u64,
    calls: u64,
    flops: u64,
}

#[derive(Clone, Copy, Default)]
struct PhaseAcc {
    wall_ns: u64,
    cpu_ns: u64,
    minflt: u64,
}

struct State {
    /// The open phase: which, since when, and the rusage then.
    cur: Option<(Phase, Instant, Usage)>,
    phases: [PhaseAcc; 3],
    /// [phase][cat]; `Other` holds the FLOPs of GEMMs outside any scope (its time is derived).
    cats: [[Acc; 7]; 3],
}

static STATE: Mutex<State> = Mutex::new(State { cur: None, phases: [PhaseAcc { wall_ns: 0, cpu_ns: 0, minflt: 0 }; 3], cats: [[Acc { ns: 0, calls: 0, flops: 0 }; 7]; 3] });

struct Frame {
    cat: Cat,
    start: Instant,
    /// Time of the scopes nested in this one (taken out of its own).
    child_ns: u64,
    flops: u64,
}

thread_local! {
    static STACK: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

/// Whether profiling is on (one relaxed load).
#[inline(always)]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[derive(Clone, Copy)]
struct Usage {
    cpu_ns: u64,
    minflt: u64,
}

/// The process's CPU time (user + system) and minor page faults so far.
fn usage() -> Usage {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
            return Usage { cpu_ns: tv(ru.ru_utime) + tv(ru.ru_stime), minflt: ru.ru_minflt as u64 };
        }
    }
    Usage { cpu_ns: 0, minflt: 0 }
}

/// Clears every accumulator and turns profiling on.
pub fn start() {
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    s.cur = None;
    s.phases = Default::default();
    s.cats = Default::default();
    ENABLED.store(true, Ordering::Relaxed);
}

fn close_phase(s: &mut State) {
    if let Some((p, t0, u0)) = s.cur.take() {
        let u = usage();
        let acc = &mut s.phases[p as usize];
        acc.wall_ns += t0.elapsed().as_nanos() as u64;
        acc.cpu_ns += u.cpu_ns.saturating_sub(u0.cpu_ns);
        acc.minflt += u.minflt.saturating_sub(u0.minflt);
    }
}

/// Ends the open phase (if any) and opens `p`. A no-op when profiling is off.
pub fn phase(p: Phase) {
    if !enabled() {
        return;
    }
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    close_phase(&mut s);
    s.cur = Some((p, Instant::now(), usage()));
}

/// Ends the open phase, turns profiling off and returns what was recorded.
pub fn stop() -> Report {
    ENABLED.store(false, Ordering::Relaxed);
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    close_phase(&mut s);
    let phases = Phase::ALL
        .iter()
        .map(|&p| {
            let pa = s.phases[p as usize];
            let c = &s.cats[p as usize];
            let claimed: u64 = Cat::ALL.iter().filter(|&&k| k != Cat::Other).map(|k| c[k.idx()].ns).sum();
            let cats = Cat::ALL
                .iter()
                .map(|&k| {
                    let a = c[k.idx()];
                    let ns = if k == Cat::Other { pa.wall_ns.saturating_sub(claimed) } else { a.ns };
                    CatReport { cat: k.key(), ms: ns as f64 / 1e6, calls: a.calls, flops: a.flops }
                })
                .collect();
            PhaseReport { phase: p.key(), wall_ms: pa.wall_ns as f64 / 1e6, cpu_ms: pa.cpu_ns as f64 / 1e6, minor_faults: pa.minflt, cats }
        })
        .collect();
    Report { phases }
}

/// An open scope; its time is added to its kind when dropped.
pub struct Scope(bool);

/// Opens a scope of kind `cat` on this thread (nothing when profiling is off).
#[inline]
pub fn scope(cat: Cat) -> Scope {
    if !enabled() {
        return Scope(false);
    }
    STACK.with(|st| st.borrow_mut().push(Frame { cat, start: Instant::now(), child_ns: 0, flops: 0 }));
    Scope(true)
}

impl Drop for Scope {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        let Some(f) = STACK.with(|st| st.borrow_mut().pop()) else { return };
        let total = f.start.elapsed().as_nanos() as u64;
        STACK.with(|st| {
            if let Some(parent) = st.borrow_mut().last_mut() {
                parent.child_ns += total;
            }
        });
        let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let Some((p, _, _)) = s.cur else { return };
        let a = &mut s.cats[p as usize][f.cat.idx()];
        a.ns += total.saturating_sub(f.child_ns);
        a.calls += 1;
        a.flops += f.flops;
    }
}

/// Adds `n` floating-point operations to the innermost open scope (or to the phase's "other").
#[inline]
pub fn flops(n: u64) {
    if !enabled() {
        return;
    }
    let claimed = STACK.with(|st| match st.borrow_mut().last_mut() {
        Some(f) => {
            f.flops += n;
            true
        }
        None => false,
    });
    if !claimed {
        let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, _, _)) = s.cur {
            s.cats[p as usize][Cat::Other.idx()].flops += n;
        }
    }
}

/// One kind of work within a phase.
#[derive(Clone, Debug, Serialize)]
pub struct CatReport {
    pub cat: &'static str,
    pub ms: f64,
    /// Scopes closed (0 for `other`).
    pub calls: u64,
    /// GEMM FLOPs (2·m·n·k each) run in this kind.
    pub flops: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    pub phase: &'static str,
    pub wall_ms: f64,
    /// Process CPU time (user + system, all threads) during the phase.
    pub cpu_ms: f64,
    pub minor_faults: u64,
    pub cats: Vec<CatReport>,
}

/// What [`stop`] returns: per phase, its totals and its kinds.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub phases: Vec<PhaseReport>,
}
