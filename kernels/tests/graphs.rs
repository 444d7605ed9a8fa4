//! CUDA graphs of our launches ([`StepGraph`]) on device 0: a capture runs
//! nothing and its replay does what the eager launch does, bit for bit; and
//! however a capture fails (its recording returns an error, panics, or leaves
//! an error in cudarc's context) the stream leaves capture mode and runs
//! work as before, so serving can fall back to eager steps.
//!
//! GPU only (`--features cuda`, run on the GPU machine by
//! `kernels/scripts/gpu-check.sh`); without a device each test says it
//! skipped, which that script counts as a failure.
#![cfg(feature = "cuda")]

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use arqon_kernels::cuda::graph::{CaptureError, StepGraph};
use arqon_kernels::cuda::launch::PackedRmsNormBuffers;
use arqon_kernels::cuda::CudaKernels;
use arqon_kernels::plan::RmsNormVariant;
use cudarc::driver::sys::{CUresult, CUstreamCaptureStatus};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};

const ROWS: usize = 3;
const DIM: usize = 576;

/// Our kernels on device 0's per-thread default stream, the one candle's
/// device (so serving) captures on; the legacy default stream cannot capture.
fn kernels(test: &str) -> Option<CudaKernels> {
    match CudaContext::new(0) {
        Ok(ctx) => Some(CudaKernels::on_stream(ctx.per_thread_stream()).expect("load our kernels")),
        Err(e) => {
            eprintln!("skipped {test} on cuda: no device ({e})");
            None
        }
    }
}

/// One packed add + RMSNorm: inputs on the device, and its output buffer.
struct Norm {
    x: CudaSlice<f32>,
    residual: CudaSlice<f32>,
    weight: CudaSlice<f32>,
    out: CudaSlice<f32>,
}

impl Norm {
    fn new(s: &Arc<CudaStream>) -> Norm {
        let wave = |n: usize, a: f32| (0..n).map(|i| ((i as f32) * a).sin()).collect::<Vec<f32>>();
        Norm {
            x: s.clone_htod(&wave(ROWS * DIM, 0.37)).unwrap(),
            residual: s.clone_htod(&wave(ROWS * DIM, 0.11)).unwrap(),
            weight: s.clone_htod(&wave(DIM, 0.05)).unwrap(),
            out: s.alloc_zeros::<f32>(2 * ROWS * DIM).unwrap(),
        }
    }

    fn launch(&mut self, k: &CudaKernels) -> Result<(), String> {
        let b = PackedRmsNormBuffers {
            x: self.x.slice(..),
            residual: self.residual.slice(..),
            weight: self.weight.slice(..),
            out: &mut self.out,
        };
        k.add_rms_norm_packed(RmsNormVariant::BlockPerRow, b, 1e-5).map_err(|e| e.to_string())
    }

    fn out(&self, s: &Arc<CudaStream>) -> Vec<f32> {
        s.clone_dtoh(&self.out).unwrap()
    }

    fn clear(&mut self, s: &Arc<CudaStream>) {
        s.memset_zeros(&mut self.out).unwrap();
        s.synchronize().unwrap();
    }
}

/// The stream captures nothing now, and an eager launch on it gives `want`.
fn stream_runs_eagerly(k: &CudaKernels, n: &mut Norm, want: &[f32]) {
    let s = k.stream();
    assert_eq!(s.capture_status().unwrap(), CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE);
    n.clear(s);
    n.launch(k).expect("an eager launch after the failed capture");
    assert_eq!(n.out(s), want, "the eager launch after the failed capture");
}

/// Every test's start: the kernels, their stream, a norm's buffers and its
/// eager output (what the test compares with); `None` without a device.
fn setup(test: &str) -> Option<(CudaKernels, Arc<CudaStream>, Norm, Vec<f32>)> {
    let k = kernels(test)?;
    let s = k.stream().clone();
    let mut n = Norm::new(&s);
    n.launch(&k).unwrap();
    let want = n.out(&s);
    assert!(want.iter().any(|v| *v != 0.0), "the launch wrote its output");
    Some((k, s, n, want))
}

#[test]
fn a_captured_launch_runs_nothing_and_its_replay_matches_the_eager_launch() {
    let Some((k, s, mut n, want)) = setup("a_captured_launch_runs_nothing_and_its_replay_matches_the_eager_launch")
    else {
        return;
    };
    n.clear(&s);
    let graph = StepGraph::capture(&s, || n.launch(&k)).expect("capture");
    assert_eq!(graph.nodes().map(|g| g.kernels), Some(1), "one kernel node");
    assert!(n.out(&s).iter().all(|v| *v == 0.0), "a capture runs nothing");
    for _ in 0..3 {
        graph.launch().unwrap();
        assert_eq!(n.out(&s), want, "a replay");
    }
}

#[test]
fn a_recording_that_fails_ends_the_capture() {
    let Some((k, s, mut n, want)) = setup("a_recording_that_fails_ends_the_capture") else { return };
    let got = StepGraph::capture(&s, || {
        n.launch(&k)?;
        Err::<(), String>("the recording stops here".into())
    });
    assert!(matches!(got, Err(CaptureError::Record(ref e)) if e == "the recording stops here"), "{got:?}");
    stream_runs_eagerly(&k, &mut n, &want);
}

#[test]
fn an_error_cudarc_kept_during_the_capture_fails_it_and_ends_it() {
    let Some((k, s, mut n, want)) = setup("an_error_cudarc_kept_during_the_capture_fails_it_and_ends_it") else {
        return;
    };
    // What a buffer's free that failed mid-capture leaves: an error cudarc stores in the context,
    // which its end_capture returns before ending anything.
    let got = StepGraph::capture(&s, || {
        n.launch(&k)?;
        s.context().record_err::<()>(Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)));
        Ok::<(), String>(())
    });
    match got {
        Err(CaptureError::Driver(e)) => assert!(e.to_string().contains("INVALID_VALUE"), "{e}"),
        other => panic!("expected the stored error, got {other:?}"),
    }
    stream_runs_eagerly(&k, &mut n, &want);
}

#[test]
fn a_panic_while_recording_ends_the_capture() {
    let Some((k, s, mut n, want)) = setup("a_panic_while_recording_ends_the_capture") else { return };
    let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
        StepGraph::capture(&s, || -> Result<(), String> {
            n.launch(&k)?;
            panic!("while recording")
        })
        .map(|_| ())
    }));
    assert!(caught.is_err(), "the panic reached the caller");
    stream_runs_eagerly(&k, &mut n, &want);
}
