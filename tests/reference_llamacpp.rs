//! Our tokens and logits against llama.cpp's on the default model
//! (`shared/fixtures/llamacpp_greedy.json`: llama-cpp-python 0.3.36, CPU).

mod common;

use arqon_runtime::chat::Message;
use arqon_runtime::model::{argmax, rows, LogitsFor, SeqChunk};
use serde_json::Value;

struct Fixture {
    name: String,
    prompt_text: Option<String>,
    messages: Option<Vec<Message>>,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    top5: Vec<Vec<(u32, f32)>>,
}

fn fixtures() -> Vec<Fixture> {
    let text = std::fs::read_to_string(common::shared_fixture("llamacpp_greedy.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    v["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Fixture {
            name: f["name"].as_str().unwrap().to_string(),
            prompt_text: f["prompt_text"].as_str().map(String::from),
            messages: f["messages"].as_array().map(|m| {
                m.iter().map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())).collect()
            }),
            prompt_ids: ids(&f["prompt_ids"]),
            generated_ids: ids(if f["raw_generate_ids_no_eos_stop"].is_array() {
                &f["raw_generate_ids_no_eos_stop"]
            } else {
                &f["generated_ids"]
            }),
            top5: f["top5_logits_per_step"]
                .as_array()
                .unwrap()
                .iter()
                .map(|step| {
                    step.as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                        .collect()
                })
                .collect(),
        })
        .collect()
}

#[test]
fn tokenization_matches_llamacpp() {
    let e = common::default_engine();
    for f in fixtures() {
        let ours = match (&f.messages, &f.prompt_text) {
            (Some(m), _) => e.encode_chat(m).unwrap(),
            (None, Some(p)) => e.encode_prompt(p).unwrap(),
            _ => panic!("{}: no prompt", f.name),
        };
        assert_eq!(ours, f.prompt_ids, "{}: tokenization differs", f.name);
    }
}

// The issue asked for partings only below a 0.05 margin and logits within
// 0.1. llama.cpp itself does not reach that against this fixture: the same
// llama-cpp-python 0.3.36 built on a 2-core AVX-512 Xeon
// (`bench/llamacpp-self-agreement.py`) parts from the fixture's run at
// plain_code step 12 (fixture margin 0.12) and chat_sky step 25 (0.097);
// before that, the largest top-5 logit difference per step has mean 0.23,
// p90 0.40 and max 0.80 (plain_capital step 13), over 101 of 128 equal
// tokens. CPU SIMD paths (8-bit activation rounding, f16 KV cache, summation
// order) alone move 30-unit logits that much, and a few steps amplify tiny
// differences: plain_capital step 13 moves by 1.1-1.3 in our engine whenever
// any f32 summation order changes. The bounds below are that measured
// spread, with headroom; a real bug (wrong RoPE, norm or head layout) moves
// logits by whole units at every step, which the mean bound catches.

/// Where llama.cpp's own top-two margin is below this, the engines may pick
/// differently (measured partings: llama.cpp against itself at 0.12, ours
/// at up to 0.19 with earlier kernels, 0.17 now).
const PART_MARGIN: f32 = 0.25;
/// The mean over steps of the largest top-5 logit difference (llama.cpp
/// against itself: 0.23).
const MEAN_LOGIT_TOL: f32 = 0.35;
/// The largest top-5 logit difference at any step (llama.cpp against
/// itself: 0.80; ours 0.70 now, and up to 1.27 with earlier kernels, at the
/// amplifying step above).
const MAX_LOGIT_TOL: f32 = 1.6;

/// Greedy decoding step by step, comparing logits with llama.cpp's top-5 at
/// every step until the first step where the two engines pick differently.
#[test]
fn greedy_tokens_and_logits_match_llamacpp() {
    let mut e = common::default_engine();
    let mut full_matches = 0;
    let (mut equal_tokens, mut total_tokens) = (0, 0);
    let mut step_diffs = Vec::new();
    let all = fixtures();
    for f in &all {
        let seq = e.add_sequence().unwrap();
        let mut input = f.prompt_ids.clone();
        let mut ours = Vec::new();
        let mut maxd = 0f32;
        let mut maxc = 0f32;
        for (step, theirs_top5) in f.top5.iter().enumerate() {
            let logits =
                e.step(&[SeqChunk { seq, tokens: &input, adapter: None }], LogitsFor::LastOfEachChunk).unwrap();
            let row = rows(&logits).unwrap().remove(0);
            let id = argmax(&row);
            let margin = theirs_top5[0].1 - theirs_top5[1].1;
            let their_id = f.generated_ids[step];
            let describe = || {
                let mut our_top: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
                our_top.sort_by(|a, b| b.1.total_cmp(&a.1));
                format!("llama.cpp top5 {theirs_top5:?}\n     our top5 {:?}", &our_top[..5])
            };
            if id != their_id {
                assert!(
                    margin < PART_MARGIN,
                    "{}: step {step}: we chose {id}, llama.cpp {their_id}, although its top-two margin is {margin:.4}\n{}",
                    f.name,
                    describe()
                );
                eprintln!("{}: parted at step {step} (llama.cpp margin {margin:.4})\n{}", f.name, describe());
                break;
            }
            let (top_id, top_l) = theirs_top5[0];
            let mut step_max = 0f32;
            for (tid, tl) in theirs_top5 {
                let d = (row[*tid as usize] - tl).abs();
                step_max = step_max.max(d);
                let dc = ((row[*tid as usize] - row[top_id as usize]) - (tl - top_l)).abs();
                maxc = maxc.max(dc);
                assert!(d < MAX_LOGIT_TOL, "{}: step {step}: logit of {tid} differs by {d:.4}\n{}", f.name, describe());
            }
            maxd = maxd.max(step_max);
            step_diffs.push(step_max);
            ours.push(id);
            input = vec![id];
        }
        e.remove_sequence(seq);
        equal_tokens += ours.len();
        total_tokens += f.generated_ids.len();
        if ours == f.generated_ids {
            full_matches += 1;
        }
        eprintln!(
            "{}: {} of {} greedy tokens equal, max top5 logit diff {maxd}, centred {maxc}",
            f.name,
            ours.len(),
            f.generated_ids.len()
        );
    }
    // Measured (16-row Q4_1/Q8_0 kernels with exact integer block sums, CPU
    // decode attention): plain_capital, plain_code and bench_prompt_128 equal
    // over all 32 tokens, chat_sky parts at step 20 (llama.cpp margin 0.17):
    // 116 of 128 tokens, mean 0.25 (llama.cpp on another CPU: 101, 0.23; our
    // earlier 4-row kernels: 98). Which near-tie flips is rounding noise:
    // changing only the rounding mode of the 8-bit activations, or one
    // summation order, moves these steps.
    let mean = step_diffs.iter().sum::<f32>() / step_diffs.len() as f32;
    eprintln!("{equal_tokens} of {total_tokens} tokens equal; mean largest top-5 difference per step {mean:.4}");
    assert!(mean < MEAN_LOGIT_TOL, "mean largest top-5 logit difference {mean:.4} over {} steps", step_diffs.len());
    assert!(full_matches >= 1, "no fixture matches over all 32 tokens");
    assert!(equal_tokens * 10 >= total_tokens * 7, "only {equal_tokens} of {total_tokens} greedy tokens equal");
}
