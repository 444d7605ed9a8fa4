//! The typed configuration of a Llama-family decoder, whatever file it came from.

use serde::Serialize;

/// How the rotary embedding pairs the dimensions of a head.
///
/// GGUF converters permute Q and K so llama.cpp can rotate adjacent pairs;
/// Hugging Face checkpoints rotate `(i, i + d/2)`. The weights decide, so the
/// loader sets this, never the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF's llama layout.
    Interleaved,
    /// Half-split pairs `(i, i + d/2)`: Hugging Face / GPT-NeoX layout.
    HalfSplit,
}

impl RopeStyle {
    /// The same pairing, as our kernels name it.
    pub fn pairs(self) -> arqon_kernels::reference::RopePairs {
        match self {
            RopeStyle::Interleaved => arqon_kernels::reference::RopePairs::Interleaved,
            RopeStyle::HalfSplit => arqon_kernels::reference::RopePairs::HalfSplit,
        }
    }
}

/// How rotary frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (linear interpolation).
    Linear {
        /// The interpolation factor.
        factor: f64,
    },
    /// Llama 3's frequency-band scaling.
    Llama3 {
        /// Factor applied to low frequencies.
        factor: f64,
        /// Wavelength band edges, as fractions of the original context.
        low_freq_factor: f64,
        /// See `low_freq_factor`.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as llama.cpp stores Llama 3 scaling (`rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

/// Everything the decoder needs to know about its shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// The architecture name as the checkpoint gives it.
    pub architecture: String,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than `num_heads` under GQA).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE pairing.
    pub rope_style: RopeStyle,
    /// RoPE long-context scaling.
    pub rope_scaling: RopeScaling,
    /// Longest sequence the model supports.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Checks internal consistency; `what` names the source for the message.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return Err(format!("rope_freqs has {} entries, expected {}", f.len(), self.head_dim / 2));
            }
        }
        Ok(())
    }

    /// The rotary angular frequency of each pair of a head (`head_dim / 2` values),
    /// with the configured scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                // As transformers computes it: theta^(2i/d) in float32, then 1/x.
                let base = (self.rope_theta as f32).powf((2 * i) as f32 / d as f32) as f64;
                let f = 1.0 / base;
                match &self.rope_scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::FreqFactors(ff) => f / ff[i] as f64,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let low_wavelen = original_max_position_embeddings / low_freq_factor;
                        let high_wavelen = original_max_position_embeddings / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            vocab_size: 10,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: RopeStyle::HalfSplit,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
        }
    }

    #[test]
    fn validation_catches_bad_gqa_and_odd_heads() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.num_kv_heads = 3;
        assert!(c.validate().unwrap_err().contains("multiple"));
        let mut c = cfg();
        c.head_dim = 15;
        assert!(c.validate().is_err());
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = cfg().rope_inv_freq();
        let mut c = cfg();
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let scaled = c.rope_inv_freq();
        // Highest frequency (wavelength 2π < 16) untouched; lowest divided by 8.
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((plain[last] / 8.0 - scaled[last]).abs() < 1e-12);
        // Monotone: scaling never raises a frequency.
        assert!(plain.iter().zip(&scaled).all(|(p, s)| s <= p));
    }
}
