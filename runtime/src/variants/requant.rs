//! Re-quantizing a model's weights into another storage format.
//!
//! Every format is derived the same way: dequantize the base tensor to f32,
//! then quantize it to the target with candle's `QTensor::quantize`. Only
//! weight matrices (2-D tensors whose rows fit the target's block size) are
//! converted; norm vectors and other 1-D tensors stay f32, because they are
//! tiny and quantizing them costs accuracy for no memory.
//!
//! The same conversion feeds both the artifacts `arqon variants build` writes
//! and [`load_requantized`], the in-memory model used as the reference: an
//! f32 artifact loaded from disk therefore holds bit-for-bit the weights of
//! the in-memory f32 model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arqon_variants::Quantization;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::engine::{assemble, LoadedModel};
use crate::error::{Error, Result};
use crate::model::gguf::GgufFile;
use crate::model::weights::{load_weights, TensorSource, GGUF_NAMES};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;

/// The GGML storage type of a quantization.
pub fn ggml_dtype(q: Quantization) -> Result<GgmlDType> {
    Ok(match q {
        Quantization::F32 => GgmlDType::F32,
        Quantization::F16 => GgmlDType::F16,
        Quantization::Bf16 => GgmlDType::BF16,
        Quantization::Q8_0 => GgmlDType::Q8_0,
        Quantization::Q4_0 => GgmlDType::Q4_0,
        Quantization::Q4_1 => GgmlDType::Q4_1,
        Quantization::Other => {
            return Err(Error::InvalidRequest("quantization `other` cannot be built: name a format".into()))
        }
    })
}

/// The quantization a GGML type stands for.
pub fn quantization_of(t: GgmlDType) -> Quantization {
    match t {
        GgmlDType::F32 => Quantization::F32,
        GgmlDType::F16 => Quantization::F16,
        GgmlDType::BF16 => Quantization::Bf16,
        GgmlDType::Q8_0 => Quantization::Q8_0,
        GgmlDType::Q4_0 => Quantization::Q4_0,
        GgmlDType::Q4_1 => Quantization::Q4_1,
        _ => Quantization::Other,
    }
}

/// Converts one tensor `name` of the base to the `target` format (see the
/// module docs for which tensors are converted).
pub fn convert_tensor(name: &str, t: &QTensor, target: GgmlDType) -> Result<QTensor> {
    let dense: Tensor = t.dequantize(&Device::Cpu)?;
    let dims = dense.dims().to_vec();
    let is_matrix = dims.len() == 2 && dims[1].is_multiple_of(target.block_size()) && name != "rope_freqs.weight";
    let to = if is_matrix { target } else { GgmlDType::F32 };
    QTensor::quantize(&dense, to).map_err(|e| Error::InvalidRequest(format!("quantizing {name:?} to {to:?}: {e}")))
}

/// A GGUF file whose tensors are converted as they are read.
struct Requantizing<'a> {
    file: &'a mut GgufFile,
    target: GgmlDType,
    path: PathBuf,
}

impl TensorSource for Requantizing<'_> {
    fn path(&self) -> &Path {
        &self.path
    }
    fn contains(&self, name: &str) -> bool {
        self.file.content().tensor_infos.contains_key(name)
    }
    fn qtensor(&mut self, name: &str) -> Result<Arc<QTensor>> {
        let t = self.file.qtensor(name)?;
        Ok(Arc::new(convert_tensor(name, &t, self.target)?))
    }
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.qtensor(name)?.dequantize(&Device::Cpu)?)
    }
}

/// Loads a GGUF model with its weights converted to `q` in memory (no
/// artifact written). With [`Quantization::F32`] this is the in-memory f32
/// reference of the base.
pub fn load_requantized(path: &Path, q: Quantization) -> Result<LoadedModel> {
    let target = ggml_dtype(q)?;
    let mut f = GgufFile::open(path)?;
    let cfg = f.config()?;
    let tokenizer = Tokenizer::from_gguf(&f.vocab()?)?;
    let weights = load_weights(
        &mut Requantizing { file: &mut f, target, path: path.to_path_buf() },
        &cfg,
        &GGUF_NAMES,
        &Device::Cpu,
    )?;
    assemble(Llama::new(cfg, weights, Device::Cpu)?, tokenizer, path)
}
