//! Checkpoints: one safetensors file holding the model's variables (`model.<name>`), the
//! optimizer's state (`optim.<key>`) and, in its metadata, everything else as JSON. Written to a
//! temporary file and renamed, so a checkpoint on disk is always complete.

use crate::optim::OptimState;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::Path;

const META_KEY: &str = "lean_checkpoint";

/// The tensors and metadata of a checkpoint.
#[derive(Debug)]
pub struct Checkpoint<M> {
    /// Model variables by name.
    pub model: HashMap<String, Tensor>,
    /// Optimizer state.
    pub optim: OptimState,
    /// Everything else.
    pub meta: M,
}

/// Writes `path` atomically.
pub fn save_checkpoint<M: Serialize>(path: &Path, varmap: &VarMap, optim: &OptimState, meta: &M) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vec![];
    for (k, v) in varmap
        .data()
        .lock()
        .map_err(|_| Error::Checkpoint("varmap lock poisoned".into()))?
        .iter()
    {
        tensors.push((format!("model.{k}"), v.as_tensor().clone()));
    }
    for (k, t) in &optim.tensors {
        tensors.push((format!("optim.{k}"), t.clone()));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut info = serde_json::to_value(meta).map_err(|e| Error::Checkpoint(e.to_string()))?;
    info["optim_step"] = optim.step.into();
    let metadata = HashMap::from([(META_KEY.to_string(), info.to_string())]);
    lean_models::fs::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata), tmp)
    })
    .map_err(|(path, msg)| Error::Io { path, msg })
}

/// Reads a checkpoint written by [`save_checkpoint`].
pub fn load_checkpoint<M: DeserializeOwned>(path: &Path) -> Result<Checkpoint<M>> {
    let io = |e: String| Error::Io {
        path: path.to_path_buf(),
        msg: e,
    };
    let bytes = std::fs::read(path).map_err(|e| io(e.to_string()))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| io(format!("not a safetensors file: {e}")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| io("not a lean checkpoint (no training metadata): a plain weights file loads with `pretrained::load_weights` (`lean eval --weights`)".into()))?;
    let info: serde_json::Value = serde_json::from_str(json).map_err(|e| io(format!("corrupt metadata: {e}")))?;
    let step = info.get("optim_step").and_then(|v| v.as_u64()).unwrap_or(0);
    let meta: M = serde_json::from_value(info).map_err(|e| io(format!("metadata of another version: {e}")))?;
    let all = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| io(e.to_string()))?;
    let mut model = HashMap::new();
    let mut optim = OptimState {
        step,
        ..Default::default()
    };
    for (k, t) in all {
        if let Some(n) = k.strip_prefix("model.") {
            model.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix("optim.") {
            optim.tensors.insert(n.to_string(), t);
        }
    }
    Ok(Checkpoint { model, optim, meta })
}

/// Sets every variable of `varmap` from `tensors`; a missing or misshapen one is an error that
/// names it.
pub fn restore_vars(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> Result<()> {
    for (name, var) in varmap
        .data()
        .lock()
        .map_err(|_| Error::Checkpoint("varmap lock poisoned".into()))?
        .iter()
    {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::Checkpoint(format!("tensor {name} is missing")))?;
        if t.dims() != var.dims() {
            return Err(Error::Checkpoint(format!(
                "tensor {name} has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}
