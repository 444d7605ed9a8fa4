//! The emulator against what CUDA defines (tests/probe.cu): indices, warp
//! shuffles, barriers and returned threads, 16-bit float arithmetic; and the
//! mistakes it must report: barriers not every thread reaches, full-mask
//! shuffles after lanes returned, shared memory read without its barrier (in
//! one of the two thread orders), reads past a buffer's end.

use arqon_kernels_emu::{Buffer, Emulator, Order};
use half::{bf16, f16};

fn emu() -> &'static Emulator {
    Emulator::get().unwrap()
}

/// Entry `name` of the probe module as `F`.
///
/// # Safety
/// `F` must be the entry's signature in tests/probe.cu.
unsafe fn probe<F: Copy>(name: &str) -> F {
    // SAFETY: forwarded to the caller.
    unsafe { emu().entry("probe", name) }.unwrap()
}

const ORDERS: [Order; 2] = [Order::Forward, Order::Reverse];

#[test]
fn every_thread_sees_its_own_indices() {
    // SAFETY: probe_indices(int* out).
    let f: unsafe extern "C" fn(*mut i32) = unsafe { probe("probe_indices") };
    let (gx, gy, bx) = (3u32, 2u32, 96u32);
    let n = (gx * gy * bx) as usize;
    for order in ORDERS {
        let out = Buffer::<i32>::uninit(emu(), 6 * n);
        // SAFETY: out holds 6 ints per thread of the grid.
        emu().launch("probe_indices", (gx, gy, 1), bx, order, &|| unsafe { f(out.at(0)) }).unwrap();
        let v = out.to_vec();
        for g in 0..n {
            let (t, b) = (g % bx as usize, g / bx as usize);
            let want = [t, b % gx as usize, b / gx as usize, bx as usize, gx as usize, gy as usize];
            assert_eq!(&v[6 * g..6 * g + 6], want.map(|x| x as i32), "thread {g} ({order:?})");
        }
    }
}

#[test]
fn shuffles_exchange_within_each_warp() {
    // SAFETY: probe_shuffle(int* sum, float* partner).
    let f: unsafe extern "C" fn(*mut i32, *mut f32) = unsafe { probe("probe_shuffle") };
    for order in ORDERS {
        let (sum, partner) = (Buffer::<i32>::uninit(emu(), 128), Buffer::<f32>::uninit(emu(), 128));
        // SAFETY: both hold one value per thread.
        emu().launch("probe_shuffle", (1, 1, 1), 128, order, &|| unsafe { f(sum.at(0), partner.at(0)) }).unwrap();
        assert!(sum.to_vec().iter().all(|&s| s == 496), "{order:?}: {:?}", sum.to_vec());
        let want: Vec<f32> = (0..128).map(|t| (t ^ 5) as f32 * 0.5).collect();
        assert_eq!(partner.to_vec(), want, "{order:?}");
    }
}

#[test]
fn atomic_adds_see_each_other() {
    // SAFETY: probe_atomic(unsigned int* old, int* total, int* global).
    let f: unsafe extern "C" fn(*mut u32, *mut i32, *mut i32) = unsafe { probe("probe_atomic") };
    let n = 256u32;
    for order in ORDERS {
        let (old, total, global) = (
            Buffer::<u32>::uninit(emu(), n as usize),
            Buffer::<i32>::uninit(emu(), 1),
            Buffer::from_slice(emu(), &[0i32]),
        );
        // SAFETY: old holds one value per thread, total and global one each.
        emu()
            .launch("probe_atomic", (3, 1, 1), n, order, &|| unsafe { f(old.at(0), total.at(0), global.at(0)) })
            .unwrap();
        assert_eq!(total.to_vec(), [(n * (n + 1) / 2) as i32], "{order:?}");
        assert_eq!(global.to_vec(), [3 * n as i32], "{order:?}: every block's adds");
        // Each add saw the sum of those before it: distinct values, the first 0.
        let mut seen = old.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), n as usize, "{order:?}");
        assert_eq!(seen[0], 0, "{order:?}");
    }
}

#[test]
fn barriers_order_shared_memory_in_both_thread_orders() {
    // SAFETY: probe_barrier(int* out).
    let f: unsafe extern "C" fn(*mut i32) = unsafe { probe("probe_barrier") };
    let (blocks, n) = (3usize, 256usize);
    for order in ORDERS {
        let out = Buffer::<i32>::uninit(emu(), blocks * n);
        // SAFETY: out holds one int per thread.
        emu().launch("probe_barrier", (blocks as u32, 1, 1), n as u32, order, &|| unsafe { f(out.at(0)) }).unwrap();
        let v = out.to_vec();
        for b in 0..blocks {
            for t in 0..n {
                // s[t] = -(value of thread t+1) then read s[t+1] = -(value of thread t+2).
                let want = -((1000 * b + (t + 2) % n) as i32);
                assert_eq!(v[b * n + t], want, "block {b} thread {t} ({order:?})");
            }
        }
    }
}

#[test]
fn a_missing_barrier_shows_in_one_of_the_two_orders() {
    // SAFETY: probe_missing_barrier(int* out).
    let f: unsafe extern "C" fn(*mut i32) = unsafe { probe("probe_missing_barrier") };
    let run = |order| {
        let out = Buffer::<i32>::uninit(emu(), 64);
        // SAFETY: out holds one int per thread.
        emu().launch("probe_missing_barrier", (1, 1, 1), 64, order, &|| unsafe { f(out.at(0)) }).unwrap();
        out.to_vec()
    };
    let (fwd, rev) = (run(Order::Forward), run(Order::Reverse));
    // Forward: thread t runs before t + 1 writes, so it reads the 7 from before the barrier; reverse: t + 1
    // has written already. Thread 63 reads thread 0, the other way round.
    let right: Vec<i32> = (0..64).map(|t| (t + 1) % 64).collect();
    assert_ne!(fwd, right);
    assert_eq!(fwd[..63], [7; 63]);
    assert_eq!(rev[..63], right[..63]);
}

#[test]
fn a_race_between_blocks_shows_in_one_of_the_two_orders() {
    // SAFETY: probe_block_race(int* mark, int* seen).
    let f: unsafe extern "C" fn(*mut i32, *mut i32) = unsafe { probe("probe_block_race") };
    let run = |order| {
        let (mark, seen) = (Buffer::<i32>::uninit(emu(), 8), Buffer::<i32>::uninit(emu(), 8));
        // SAFETY: both hold one int per block.
        emu().launch("probe_block_race", (8, 1, 1), 32, order, &|| unsafe { f(mark.at(0), seen.at(0)) }).unwrap();
        seen.to_vec()
    };
    // Forward, block b + 1 has not run when b reads its mark (still 0xff bytes); reversed, it has.
    let right: Vec<i32> = (1..=8).collect();
    assert_eq!(run(Order::Forward)[..7], [-1; 7]);
    assert_eq!(run(Order::Reverse), right);
}

#[test]
fn returned_threads_do_not_hold_up_a_barrier() {
    // SAFETY: probe_early_return(int* out, int live).
    let f: unsafe extern "C" fn(*mut i32, i32) = unsafe { probe("probe_early_return") };
    for order in ORDERS {
        let out = Buffer::<i32>::uninit(emu(), 128);
        // SAFETY: out holds one int per thread; live = 64 (whole warps return).
        emu().launch("probe_early_return", (1, 1, 1), 128, order, &|| unsafe { f(out.at(0), 64) }).unwrap();
        let v = out.to_vec();
        assert_eq!(v[..64], (0..64).map(|t| (t + 1) % 64).collect::<Vec<i32>>()[..], "{order:?}");
        assert_eq!(v[64..], [-1; 64], "{order:?}: returned threads wrote nothing (0xff bytes)");
    }
}

#[test]
fn barriers_some_threads_never_reach_are_errors() {
    // SAFETY: probe_divergent_barrier(int* out).
    let f: unsafe extern "C" fn(*mut i32) = unsafe { probe("probe_divergent_barrier") };
    let out = Buffer::<i32>::uninit(emu(), 64);
    // SAFETY: out holds one int per thread.
    let e = emu().launch("probe_divergent_barrier", (1, 1, 1), 64, Order::Forward, &|| unsafe { f(out.at(0)) });
    let e = e.unwrap_err();
    assert!(e.contains("no thread can go on") && e.contains("__syncthreads") && e.contains("warp shuffle"), "{e}");
}

#[test]
fn full_mask_shuffles_after_lanes_returned_are_errors() {
    // SAFETY: probe_shuffle_after_return(int* out).
    let f: unsafe extern "C" fn(*mut i32) = unsafe { probe("probe_shuffle_after_return") };
    let out = Buffer::<i32>::uninit(emu(), 32);
    // SAFETY: out holds one int per thread.
    let e = emu().launch("probe_shuffle_after_return", (1, 1, 1), 32, Order::Forward, &|| unsafe { f(out.at(0)) });
    let e = e.unwrap_err();
    assert!(e.contains("16 of its lanes returned"), "{e}");
}

#[test]
fn launches_past_cuda_s_limits_are_errors() {
    // SAFETY: probe_indices(int* out); no thread runs.
    let f: unsafe extern "C" fn(*mut i32) = unsafe { probe("probe_indices") };
    let out = Buffer::<i32>::uninit(emu(), 1);
    for (grid, block) in [((1, 1, 1), 2048), ((1, 1, 1), 0), ((1, 70_000, 1), 32), ((0, 1, 1), 32)] {
        // SAFETY: rejected before any thread runs.
        let e = emu().launch("probe_indices", grid, block, Order::Forward, &|| unsafe { f(out.at(0)) });
        assert!(e.is_err(), "{grid:?} x {block}");
    }
    // SAFETY: the entry exists in no module under that name.
    assert!(unsafe { emu().entry::<unsafe extern "C" fn()>("probe", "no_such_entry") }.is_err());
}

/// Reading one element past a buffer stops the process, naming the kernel:
/// run in a child process (this test binary, filtered to the child's test).
#[test]
fn a_read_past_a_buffer_s_end_stops_the_process_naming_the_kernel() {
    if std::env::var_os("ARQON_EMU_PROBE_CHILD").is_some() {
        // SAFETY: probe_read_past_end(const float* x, float* out, int n), reading x[n] deliberately: the
        // guard page after x turns it into a fault, which is what the parent checks.
        let f: unsafe extern "C" fn(*const f32, *mut f32, i32) = unsafe { probe("probe_read_past_end") };
        let (x, out) = (Buffer::<f32>::from_slice(emu(), &[1.0; 16]), Buffer::<f32>::uninit(emu(), 1));
        // SAFETY: see above: the read past the end is the point, and faults before it returns anything.
        let _ = emu()
            .launch("probe_read_past_end", (1, 1, 1), 32, Order::Forward, &|| unsafe { f(x.at(0), out.at(0), 16) });
        return;
    }
    let me = std::env::current_exe().unwrap();
    let o = std::process::Command::new(me)
        .args(["--exact", "a_read_past_a_buffer_s_end_stops_the_process_naming_the_kernel", "--test-threads=1"])
        .env("ARQON_EMU_PROBE_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the child survived the read: {stderr}");
    assert!(stderr.contains("invalid access") && stderr.contains("probe_read_past_end"), "{stderr}");
}

#[test]
fn sixteen_bit_floats_round_as_the_half_crate_does() {
    // SAFETY: probe_halves(const float* in, float* out, int n).
    let f: unsafe extern "C" fn(*const f32, *mut f32, i32) = unsafe { probe("probe_halves") };
    let mut pairs = vec![1.0f32, 3.0, -2.5, 7.0, 65504.0, 2.0, 1e-6, 3e-7, 6.1e-5, -6.0e-8, 3.3e38, 1.0e-40];
    let mut s = 0x2545_f491u32;
    for _ in 0..2000 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        pairs.push(f32::from_bits(s & 0xbfff_ffff)); // any finite-or-not magnitude below 2^64, either sign
    }
    let n = pairs.len() / 2;
    let (inp, out) = (Buffer::from_slice(emu(), &pairs), Buffer::<f32>::uninit(emu(), 6 * n));
    // SAFETY: in holds 2n floats, out 6n.
    emu()
        .launch("probe_halves", (1, 1, 1), 128, Order::Forward, &|| unsafe { f(inp.at(0), out.at(0), n as i32) })
        .unwrap();
    let got = out.to_vec();
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
    for i in 0..n {
        let (a, b) = (pairs[2 * i], pairs[2 * i + 1]);
        let (ab, bb) = (bf16::from_f32(a), bf16::from_f32(b));
        let (ah, bh) = (f16::from_f32(a), f16::from_f32(b));
        let want = [
            ab.to_f32(),
            bf16::from_f32(ab.to_f32() * bb.to_f32()).to_f32(),
            bf16::from_f32(ab.to_f32() / bb.to_f32()).to_f32(),
            ah.to_f32(),
            f16::from_f32(ah.to_f32() + bh.to_f32()).to_f32(),
            f16::from_f32(-ah.to_f32() / bh.to_f32()).to_f32(),
        ];
        for (j, w) in want.iter().enumerate() {
            assert!(same(got[6 * i + j], *w), "pair {i} ({a:e}, {b:e}) result {j}: {} vs {w}", got[6 * i + j]);
        }
    }
}
