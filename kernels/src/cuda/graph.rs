//! A captured CUDA graph that an engine thread owns: what the runtime's
//! decode graphs (`arqon_runtime::model::graph`) replay. Here, not in the
//! runtime, because making it `Send` takes the one `unsafe` line.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};

use crate::KernelError;

/// The launches one closure enqueued on a stream, captured and instantiated.
pub struct StepGraph(CudaGraph);

// SAFETY: a graph and its executable are driver handles, usable from any
// thread with their context bound, which `CudaGraph::launch` does. A
// `StepGraph` is moved to the engine thread that owns it and launched only
// there (`&self` launches are never concurrent: the owner holds it by `&mut`).
unsafe impl Send for StepGraph {}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepGraph")
    }
}

/// Why a capture produced no graph.
#[derive(Debug)]
pub enum CaptureError<E> {
    /// What `record` returned.
    Record(E),
    /// The driver refused the capture, its instantiation or its upload.
    Driver(KernelError),
}

impl<E: std::fmt::Display> std::fmt::Display for CaptureError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaptureError::Record(e) => write!(f, "while capturing: {e}"),
            CaptureError::Driver(e) => write!(f, "{e}"),
        }
    }
}

impl StepGraph {
    /// Captures what `record` enqueues on `stream` (nothing runs; relaxed
    /// mode, so other threads' CUDA calls are not refused meanwhile) after
    /// waiting for the stream's work, then instantiates and uploads it.
    /// Allocations left unfreed by the capture are freed at each relaunch.
    pub fn capture<E>(
        stream: &Arc<CudaStream>,
        record: impl FnOnce() -> Result<(), E>,
    ) -> Result<StepGraph, CaptureError<E>> {
        let cu = |e: cudarc::driver::DriverError| CaptureError::Driver(KernelError::Cuda(e.to_string()));
        stream.synchronize().map_err(cu)?;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(cu)?;
        let recorded = record();
        // Ended whatever happened, so the stream leaves capture mode.
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        recorded.map_err(CaptureError::Record)?;
        let graph = graph
            .map_err(cu)?
            .ok_or_else(|| CaptureError::Driver(KernelError::Cuda("the capture recorded nothing".into())))?;
        graph.upload().map_err(cu)?;
        Ok(StepGraph(graph))
    }

    /// Replays the graph on the stream it was captured on.
    pub fn launch(&self) -> Result<(), KernelError> {
        self.0.launch().map_err(|e| KernelError::Cuda(e.to_string()))
    }
}
