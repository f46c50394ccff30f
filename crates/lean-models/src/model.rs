//! The interface every network of the zoo implements.

use crate::layers::{LayerRow, Trace};
use crate::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use lean_ops::Cost;

/// An image classification network.
pub trait Model: Send + Sync + std::fmt::Debug {
    /// Logits (N, num_classes) of a batch (N, C, H, W), in train or eval mode; (N, K, H, W) for
    /// segmentation models.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// The outputs of the network's stages, shallow to deep (for use as a backbone). With the
    /// ImageNet stem these have strides 4, 8, 16, 32; small-image variants have no stem
    /// downsampling, so their strides are 4x smaller (deeper stages of a dilated ResNet keep
    /// their stride).
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>>;

    /// Channels of each tensor of [`Model::forward_features`].
    fn feature_channels(&self) -> Vec<usize>;

    /// The per-layer table for an input of shape `input` (N, C, H, W).
    fn trace(&self, input: &[usize], t: &mut Trace) -> Result<Vec<usize>>;

    /// The rows of the feature extractor only; returns the shapes of
    /// [`Model::forward_features`]' tensors.
    fn trace_features(&self, input: &[usize], t: &mut Trace) -> Result<Vec<Vec<usize>>>;

    /// Whether the output is per-pixel logits (N, K, H, W) (segmentation) rather than (N, K).
    fn is_segmentation(&self) -> bool {
        false
    }

    /// Folds every BatchNorm into the convolution before it: the fused inference path (the
    /// model is for eval only afterwards).
    fn fold_batchnorm(&mut self) -> Result<()>;

    /// Replaces the classifier by a new one with `num_classes` outputs, built from `vb` (for
    /// fine-tuning).
    fn reset_classifier(&mut self, num_classes: usize, vb: VarBuilder) -> Result<()>;

    /// Number of classes.
    fn num_classes(&self) -> usize;

    /// The per-layer rows for `input`.
    fn layers(&self, input: &[usize]) -> Result<Vec<LayerRow>> {
        let mut t = Trace::default();
        self.trace(input, &mut t)?;
        Ok(t.rows)
    }

    /// Total parameters and MACs for `input` (pass N = 1 for per-image MACs).
    fn cost(&self, input: &[usize]) -> Result<Cost> {
        let mut t = Trace::default();
        self.trace(input, &mut t)?;
        Ok(t.total())
    }
}

/// The classifier head of a model, or an error for a features-only backbone.
pub(crate) fn head<T>(h: &Option<T>) -> Result<&T> {
    h.as_ref().ok_or_else(|| crate::Error::Config {
        model: "backbone".into(),
        msg: "built features-only (as a backbone): it has no classifier; use forward_features".into(),
    })
}
