//! A captured CUDA graph that an engine thread owns: what the runtime's
//! decode graphs (`arqon_runtime::model::graph`) replay. Here, not in the
//! runtime, because making it `Send` takes the one `unsafe` line.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUgraphInstantiate_flags, CUgraphNodeType, CUstreamCaptureMode};
use cudarc::driver::{result, CudaGraph, CudaStream};

use crate::KernelError;

/// The launches one closure enqueued on a stream, captured and instantiated,
/// and what the capture holds.
pub struct StepGraph(CudaGraph, Option<GraphNodes>);

/// A captured graph's nodes by kind: what one replay launches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphNodes {
    /// Kernel launches (ours, candle's, cuBLAS's).
    pub kernels: usize,
    /// Copies.
    pub copies: usize,
    /// Memsets.
    pub memsets: usize,
    /// Anything else (allocations, frees, events, empty nodes).
    pub other: usize,
}

impl GraphNodes {
    /// Every node.
    pub fn total(&self) -> usize {
        self.kernels + self.copies + self.memsets + self.other
    }

    /// Counts `graph`'s nodes, or `None` when the driver will not list them.
    fn of(graph: &CudaGraph) -> Option<GraphNodes> {
        let g = graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: a live graph handle; a null node array asks for the count only, written to `n`.
        unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }.result().ok()?;
        let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` has room for the `n` handles the driver writes (it writes at most `n`, updating `n`).
        unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }.result().ok()?;
        let mut counts = GraphNodes::default();
        for node in &nodes[..n.min(nodes.len())] {
            // Read as the u32 the C enum is, not as cudarc's Rust enum: a newer driver may name a kind
            // this cudarc does not know.
            let mut kind = u32::MAX;
            // SAFETY: a node of the live graph; the driver writes one CUgraphNodeType (a 32-bit C enum) there.
            unsafe { sys::cuGraphNodeGetType(*node, (&mut kind as *mut u32).cast::<CUgraphNodeType>()) }
                .result()
                .ok()?;
            match kind {
                k if k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL as u32 => counts.kernels += 1,
                k if k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY as u32 => counts.copies += 1,
                k if k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET as u32 => counts.memsets += 1,
                _ => counts.other += 1,
            }
        }
        Some(counts)
    }
}

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
    /// However the capture ends (an error, a refused capture, a panic in
    /// `record`), the stream leaves capture mode: work after it runs as usual.
    pub fn capture<E>(
        stream: &Arc<CudaStream>,
        record: impl FnOnce() -> Result<(), E>,
    ) -> Result<StepGraph, CaptureError<E>> {
        let cu = |e: cudarc::driver::DriverError| CaptureError::Driver(KernelError::Cuda(e.to_string()));
        // Without stream-ordered allocation cudarc frees with a synchronising cuMemFree, which a capture refuses.
        if !stream.context().has_async_alloc() {
            return Err(CaptureError::Driver(KernelError::Cuda(
                "the device has no stream-ordered allocator (memory pools), which a captured step's buffers need"
                    .into(),
            )));
        }
        // An error cudarc kept from before (a free on another thread: the slot is the context's) would fail the
        // capture below as if it were this one's: name it for what it is.
        if let Err(e) = stream.context().check_err() {
            return Err(CaptureError::Driver(KernelError::Cuda(format!(
                "an earlier CUDA call failed, before this capture began: {e}"
            ))));
        }
        stream.synchronize().map_err(cu)?;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(cu)?;
        let open = OpenCapture(stream);
        let recorded = record();
        // cudarc keeps an error from a call that cannot return one (a buffer's free, as `record`'s
        // temporaries drop) in the context, and its `end_capture` returns that error before it ends
        // the capture: take it here, as this capture's failure.
        let dropped = stream.context().check_err();
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        drop(open);
        recorded.map_err(CaptureError::Record)?;
        dropped.map_err(cu)?;
        let graph = graph
            .map_err(cu)?
            .ok_or_else(|| CaptureError::Driver(KernelError::Cuda("the capture recorded nothing".into())))?;
        graph.upload().map_err(cu)?;
        let nodes = GraphNodes::of(&graph);
        Ok(StepGraph(graph, nodes))
    }

    /// What one replay launches, by kind (`None` when the driver would not list the nodes).
    pub fn nodes(&self) -> Option<GraphNodes> {
        self.1
    }

    /// Replays the graph on the stream it was captured on.
    pub fn launch(&self) -> Result<(), KernelError> {
        self.0.launch().map_err(|e| KernelError::Cuda(e.to_string()))
    }
}

/// A capture begun on a stream: dropped while the stream still captures (`end_capture` failed
/// before ending it, or `record` panicked), it ends the capture and destroys what it recorded.
struct OpenCapture<'a>(&'a Arc<CudaStream>);

impl Drop for OpenCapture<'_> {
    fn drop(&mut self) {
        let s = self.0.cu_stream();
        // SAFETY: `s` is the live stream borrowed for this guard's lifetime, its context current on
        // this thread (the capture began here). The calls go to the driver directly, not through
        // cudarc's wrappers, which return a stored error first and would end nothing.
        unsafe {
            let capturing = result::stream::is_capturing(s)
                .is_ok_and(|c| c != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE);
            if capturing {
                if let Ok(graph) = result::stream::end_capture(s) {
                    if !graph.is_null() {
                        let _ = result::graph::destroy(graph);
                    }
                }
            }
        }
    }
}
