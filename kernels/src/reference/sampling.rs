//! Sampling references (`cuda/sampling.cu`): greedy argmax and top-k/top-p
//! filtering with a draw, row by row, with the kernels' exact rules (see the
//! header of `sampling.cu`, restated on each function).

use crate::{Elem, KernelError, KernelId};

/// Most candidates top-k/top-p keeps (and the width of its output rows).
pub const MAX_TOP_K: usize = 128;

/// The order both argmax and top-k use: larger value first, then lower index.
/// NaN is never better than anything.
fn better(v: f32, i: usize, bv: f32, bi: usize) -> bool {
    v > bv || (v == bv && i < bi)
}

/// Index of the largest value of each row (`logits.len() / vocab` rows);
/// lowest index on ties; NaN never chosen; an all-NaN row gives 0.
pub fn argmax<T: Elem>(logits: &[T], vocab: usize, out: &mut [i32]) -> Result<(), KernelError> {
    if vocab == 0
        || !logits.len().is_multiple_of(vocab)
        || out.len() != logits.len() / vocab
        || vocab > i32::MAX as usize
    {
        return Err(KernelError::Shape {
            kernel: KernelId::Argmax,
            message: format!("{} logits, vocab {vocab}, {} rows out", logits.len(), out.len()),
        });
    }
    for (row, o) in logits.chunks(vocab).zip(out.iter_mut()) {
        let (mut bv, mut bi) = (f32::NEG_INFINITY, usize::MAX);
        for (i, v) in row.iter().enumerate() {
            if better(v.to_f32(), i, bv, bi) {
                (bv, bi) = (v.to_f32(), i);
            }
        }
        *o = if bi == usize::MAX { 0 } else { bi as i32 };
    }
    Ok(())
}

/// One row's sampling parameters (each an array of `rows` on the GPU).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// Keep the `top_k` best; `< 1` or above [`MAX_TOP_K`] means [`MAX_TOP_K`]
    /// (with the normaliser then over the whole vocabulary).
    pub top_k: i32,
    /// Keep the smallest prefix of mass `>= top_p`; outside `(0, 1)` disables it.
    pub top_p: f32,
    /// `1 / temperature`; taken as 1 unless finite and positive.
    pub inv_temp: f32,
    /// A uniform draw in `[0, 1)` that picks the token.
    pub uniform: f32,
}

/// What top-k/top-p keeps of one row, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Filtered {
    /// Token ids kept.
    pub ids: Vec<i32>,
    /// Their probabilities, renormalised over the kept set.
    pub probs: Vec<f32>,
    /// The sampled token (`-1` if nothing could be kept).
    pub token: i32,
}

/// Top-k/top-p filtering and the draw for one row of logits, with
/// `v = logit * inv_temp`:
/// 1. select the `k'` best by repeated max (`k' = top_k` when in
///    `1..=MAX_TOP_K`, else `MAX_TOP_K`; at most the vocabulary);
/// 2. `p_i = exp(v_i - v_max) / Z`, `Z` over the selected when `top_k >= 1`
///    and over the whole row otherwise;
/// 3. keep the smallest prefix whose running f32 sum of `p` reaches `top_p`,
///    and renormalise;
/// 4. the token is the first whose running sum of renormalised probabilities
///    exceeds `uniform` (else the last kept).
pub fn top_k_top_p<T: Elem>(row: &[T], params: &RowSampling) -> Filtered {
    let s = if params.inv_temp.is_finite() && params.inv_temp > 0.0 { params.inv_temp } else { 1.0 };
    let v: Vec<f32> = row.iter().map(|x| x.to_f32() * s).collect();
    let want = params.top_k;
    let k = if (1..=MAX_TOP_K as i32).contains(&want) { want as usize } else { MAX_TOP_K }.min(v.len());
    let mut sel: Vec<(f32, usize)> = Vec::with_capacity(k);
    for _ in 0..k {
        let last = sel.last().copied().unwrap_or((f32::INFINITY, usize::MAX));
        let mut best = (f32::NEG_INFINITY, usize::MAX);
        for (i, x) in v.iter().enumerate() {
            // Strictly after the last selected (`usize::MAX` as "no index yet"
            // sorts after everything, so `last` must be tested as the kernel's -1).
            let after = if sel.is_empty() { !x.is_nan() } else { better(last.0, last.1, *x, i) };
            if after && better(*x, i, best.0, best.1) {
                best = (*x, i);
            }
        }
        if best.1 == usize::MAX {
            break;
        }
        sel.push(best);
    }
    if sel.is_empty() {
        return Filtered { ids: vec![], probs: vec![], token: -1 };
    }
    let vmax = sel[0].0;
    let z: f32 = if want >= 1 {
        sel.iter().map(|(x, _)| (x - vmax).exp()).sum()
    } else {
        v.iter().filter(|x| !x.is_nan()).map(|x| ((x - vmax) as f64).exp()).sum::<f64>() as f32
    };
    let p: Vec<f32> = sel.iter().map(|(x, _)| (x - vmax).exp() / z).collect();
    let mut n = sel.len();
    if params.top_p > 0.0 && params.top_p < 1.0 {
        let mut cum = 0.0f32;
        for (i, pi) in p.iter().enumerate() {
            cum += pi;
            if cum >= params.top_p {
                n = i + 1;
                break;
            }
        }
    }
    let kept: f32 = p[..n].iter().sum();
    let probs: Vec<f32> = p[..n].iter().map(|pi| pi / kept).collect();
    let ids: Vec<i32> = sel[..n].iter().map(|(_, i)| *i as i32).collect();
    let mut token = ids[n - 1];
    let mut c = 0.0f32;
    for (id, q) in ids.iter().zip(&probs) {
        c += q;
        if params.uniform < c {
            token = *id;
            break;
        }
    }
    Filtered { ids, probs, token }
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use proptest::prelude::*;

    use super::*;
    use crate::reference::rng::TestRng;

    #[test]
    fn argmax_ties_nan_and_dtypes() {
        let mut out = [0i32; 3];
        let rows = [1.0f32, 3.0, 3.0, f32::NAN, f32::NAN, f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY, -1.0];
        argmax(&rows, 3, &mut out).unwrap();
        assert_eq!(out, [1, 0, 2]);
        let b: Vec<bf16> = [0.5f32, 0.25, 2.0, -7.0].iter().map(|x| bf16::from_f32(*x)).collect();
        argmax(&b, 4, &mut out[..1]).unwrap();
        assert_eq!(out[0], 2);
        assert!(argmax(&rows, 4, &mut out).is_err());
    }

    fn distinct_logits(rng: &mut TestRng, vocab: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..vocab).map(|i| i as f32 * 0.37 - vocab as f32 * 0.1).collect();
        rng.shuffle(&mut v);
        v
    }

    fn params(top_k: i32, top_p: f32) -> RowSampling {
        RowSampling { top_k, top_p, inv_temp: 1.0, uniform: 0.5 }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn top_k_keeps_exactly_the_k_largest(seed in any::<u64>(), vocab in 1usize..300, k in 1i32..=MAX_TOP_K as i32) {
            let mut rng = TestRng::new(seed);
            let v = distinct_logits(&mut rng, vocab);
            let f = top_k_top_p(&v, &params(k, 1.0));
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|a, b| v[*b].partial_cmp(&v[*a]).unwrap());
            let want: Vec<i32> = order[..(k as usize).min(vocab)].iter().map(|i| *i as i32).collect();
            prop_assert_eq!(&f.ids, &want);
            prop_assert!((f.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            prop_assert!(f.probs.windows(2).all(|w| w[0] >= w[1]));
        }

        #[test]
        fn top_p_keeps_the_smallest_prefix_reaching_p(seed in any::<u64>(), vocab in 1usize..=MAX_TOP_K, p in 0.05f32..0.95, temp in 0.3f32..3.0) {
            let mut rng = TestRng::new(seed);
            let v: Vec<f32> = rng.vec(vocab, -4.0, 4.0);
            let f = top_k_top_p(&v, &RowSampling { top_k: 0, top_p: p, inv_temp: 1.0 / temp, uniform: 0.5 });
            // Independent characterisation: token i is kept iff the mass of the
            // tokens strictly better than it is still below p.
            let probs: Vec<f64> = {
                let w: Vec<f64> = v.iter().map(|x| ((x / temp) as f64).exp()).collect();
                let z: f64 = w.iter().sum();
                w.iter().map(|x| x / z).collect()
            };
            let mut expect = Vec::new();
            for i in 0..vocab {
                let before: f64 = (0..vocab).filter(|j| better(v[*j] / temp, *j, v[i] / temp, i)).map(|j| probs[j]).sum();
                // Skip draws that sit on the boundary within float noise.
                prop_assume!((before - p as f64).abs() > 1e-5);
                if before < p as f64 {
                    expect.push(i as i32);
                }
            }
            let mut got = f.ids.clone();
            got.sort();
            prop_assert_eq!(got, expect);
        }

        #[test]
        fn the_draw_follows_the_cumulative_probabilities(seed in any::<u64>(), u in 0.0f32..1.0) {
            let mut rng = TestRng::new(seed);
            let v = distinct_logits(&mut rng, 50);
            let f = top_k_top_p(&v, &RowSampling { top_k: 10, top_p: 0.9, inv_temp: 1.0, uniform: u });
            let mut c = 0.0f32;
            let pos = f.probs.iter().position(|q| { c += q; u < c }).unwrap_or(f.ids.len() - 1);
            prop_assert_eq!(f.token, f.ids[pos]);
        }
    }

    #[test]
    fn edge_rules() {
        // top_p outside (0, 1) and k above the cap: all MAX_TOP_K kept.
        let v: Vec<f32> = (0..500).map(|i| i as f32 * 0.01).collect();
        assert_eq!(top_k_top_p(&v, &params(0, 1.0)).ids.len(), MAX_TOP_K);
        assert_eq!(top_k_top_p(&v, &params(1000, 0.0)).ids.len(), MAX_TOP_K);
        // k = 1 is greedy.
        let f = top_k_top_p(&v, &params(1, 0.5));
        assert_eq!((f.ids.as_slice(), f.token), (&[499][..], 499));
        // NaN is never kept; an all-NaN row keeps nothing.
        let f = top_k_top_p(&[f32::NAN, 1.0, f32::NAN], &params(3, 1.0));
        assert_eq!(f.ids, vec![1]);
        assert_eq!(top_k_top_p(&[f32::NAN; 4], &params(2, 1.0)).token, -1);
        // Ties go to the lower index.
        assert_eq!(top_k_top_p(&[2.0f32, 5.0, 5.0, 1.0], &params(2, 1.0)).ids, vec![1, 2]);
    }
}
