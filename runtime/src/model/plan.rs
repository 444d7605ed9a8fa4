//! The process's kernel plan: which variant of each kernel runs, measured per
//! SKU by `arqon bench kernels` and stored in the catalog (or given with
//! `--kernel-plan`). One device serves a process, so the plan is set once, at
//! start, before the first step; until then (and in processes that never set
//! one, such as the offline tools) every kernel runs its built-in choice.

use std::sync::OnceLock;

use arqon_kernels::quant::Path;
use arqon_kernels::KernelPlan;

use crate::error::{Error, Result};

static PLAN: OnceLock<KernelPlan> = OnceLock::new();

/// The plan set at start, if one was.
pub fn kernel_plan() -> Option<KernelPlan> {
    PLAN.get().copied()
}

/// Sets the process's plan: the CPU matmul path now, the CUDA kernels' variants
/// from their next launch. A CPU path this machine cannot run is refused
/// (nothing is set then); so is a second, different plan.
pub fn set_kernel_plan(plan: KernelPlan) -> Result<()> {
    if let Some(set) = PLAN.get() {
        return if *set == plan {
            Ok(())
        } else {
            Err(Error::InvalidRequest(format!("the kernel plan is already {set}; it is set once per process")))
        };
    }
    Path::prefer(plan.quant_matmul.path()).map_err(|e| Error::InvalidRequest(format!("kernel plan: {e}")))?;
    let _ = PLAN.set(plan);
    Ok(())
}
