//! Unit tests of adapter parsing and checking, on the tiny fixture's config.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::model::safetensors::{read_config, SafetensorsFolder};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

fn synth_into(dir: &Path, targets: &[LoraTarget], seed: u64) -> ModelConfig {
    let (cfg, _) = read_config(&tiny()).unwrap();
    let w = SafetensorsFolder::open(&tiny()).unwrap().weights(&cfg, &candle_core::Device::Cpu).unwrap();
    let spec = SynthSpec { rank: 2, alpha: 4.0, targets: targets.to_vec(), seed, base_model: "tiny".into() };
    synth(&cfg, &w, &spec, dir).unwrap();
    cfg
}

#[test]
fn synth_round_trips_and_is_deterministic() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = synth_into(a.path(), &[LoraTarget::V, LoraTarget::Q], 7);
    synth_into(b.path(), &[LoraTarget::Q, LoraTarget::V], 7);
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(std::fs::read(a.path().join(f)).unwrap(), std::fs::read(b.path().join(f)).unwrap(), "{f}");
    }
    let ad = LoraAdapter::load(a.path(), &cfg, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ad.targets(), vec![LoraTarget::Q, LoraTarget::V]);
    assert_eq!(ad.config().target_modules, vec![LoraTarget::Q, LoraTarget::V]);
    assert_eq!(ad.config().scale(), 2.0);
    assert!(ad.check(&cfg).is_ok());
    let c = tempfile::tempdir().unwrap();
    synth_into(c.path(), &[LoraTarget::Q, LoraTarget::V], 8);
    assert_ne!(
        std::fs::read(a.path().join("adapter_model.safetensors")).unwrap(),
        std::fs::read(c.path().join("adapter_model.safetensors")).unwrap(),
        "another seed, other values"
    );
}

#[test]
fn an_adapter_for_another_base_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth_into(dir.path(), &[LoraTarget::Down], 1);
    let mut wider = cfg.clone();
    wider.intermediate_size = 256;
    match LoraAdapter::load(dir.path(), &wider, &candle_core::Device::Cpu).unwrap_err() {
        Error::AdapterMismatch { dir: d, tensor, .. } => {
            assert_eq!(d, dir.path());
            assert!(tensor.contains("mlp.down_proj.lora_A"), "{tensor}");
        }
        e => panic!("expected AdapterMismatch, got {e}"),
    }
    let mut shallower = cfg.clone();
    shallower.num_layers = 2;
    let e = LoraAdapter::load(dir.path(), &shallower, &candle_core::Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("layers.2.") && e.to_string().contains("2 layers"), "{e}");
    // Loaded for one base, checked against another: typed error, not a shape panic.
    let ad = LoraAdapter::load(dir.path(), &cfg, &candle_core::Device::Cpu).unwrap();
    assert!(matches!(ad.check(&wider), Err(Error::AdapterMismatch { .. })));
}

#[test]
fn bad_configs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth_into(dir.path(), &[LoraTarget::Q], 1);
    let path = dir.path().join("adapter_config.json");
    let good = std::fs::read_to_string(&path).unwrap();
    for (from, to, needle) in [
        ("\"LORA\"", "\"IA3\"", "peft_type"),
        ("\"none\"", "\"all\"", "bias"),
        ("\"r\": 2", "\"r\": 0", "r must be"),
        ("\"r\": 2", "\"r\": 3", "shape"),
        ("\"q_proj\"", "\"embed_tokens\"", "embed_tokens"),
    ] {
        assert!(good.contains(from), "{from}");
        std::fs::write(&path, good.replace(from, to)).unwrap();
        let e = LoraAdapter::load(dir.path(), &cfg, &candle_core::Device::Cpu).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains(&dir.path().display().to_string()), "{from}->{to}: {e}");
    }
    std::fs::write(&path, good).unwrap();
    std::fs::remove_file(dir.path().join("adapter_model.safetensors")).unwrap();
    let e = LoraAdapter::load(dir.path(), &cfg, &candle_core::Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    let e =
        LoraAdapter::load(Path::new("/nonexistent/adapter"), &cfg, &candle_core::Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
}

#[test]
fn registry_loads_replaces_and_unloads() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth_into(dir.path(), &[LoraTarget::Q], 1);
    let reg = AdapterRegistry::new(cfg, candle_core::Device::Cpu);
    assert!(reg.load("bad:name", dir.path()).is_err());
    let first = reg.load("fr", dir.path()).unwrap();
    let again = reg.load("fr", dir.path()).unwrap();
    assert!(!Arc::ptr_eq(&first, &again), "a reload replaces");
    assert!(Arc::ptr_eq(&reg.get("fr").unwrap(), &again));
    reg.load("de", dir.path()).unwrap();
    assert_eq!(reg.list(), vec!["de".to_string(), "fr".to_string()]);
    let held = reg.get("fr").unwrap();
    reg.unload("fr").unwrap();
    assert!(reg.get("fr").is_none());
    assert!(held.check(reg.base()).is_ok(), "a holder keeps a working adapter after unload");
    assert!(matches!(reg.unload("fr"), Err(Error::UnknownAdapter(_))));
    assert!(reg.load("x", Path::new("/nonexistent")).is_err());
    assert_eq!(reg.list(), vec!["de".to_string()], "a failed load changes nothing");
}

#[test]
fn target_names_parse() {
    assert_eq!("q_proj".parse::<LoraTarget>().unwrap(), LoraTarget::Q);
    assert_eq!("down".parse::<LoraTarget>().unwrap(), LoraTarget::Down);
    assert!("lm_head".parse::<LoraTarget>().is_err());
}
