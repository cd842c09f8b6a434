//! The forward pass an [`crate::Engine`] runs: our CPU kernels, or candle tensors on a
//! device. Both run the one LazyLLM step ([`lazy::step_batch`]), which is generic over
//! [`Forward`].

use candle_core::DeviceLocation;
use lazyserve_model::{Config, Forward, Model, TensorModel};

use crate::lazy::{self, LayerState, SequenceState, StepInput};
use crate::Result;

/// What computes a step.
pub enum Backend {
    /// Our CPU kernels.
    Cpu(Model),
    /// candle tensors on a device (a GPU, or candle's CPU device in tests).
    Tensor(TensorModel),
}

impl From<Model> for Backend {
    fn from(m: Model) -> Self {
        Self::Cpu(m)
    }
}

impl From<TensorModel> for Backend {
    fn from(m: TensorModel) -> Self {
        Self::Tensor(m)
    }
}

impl Backend {
    pub fn config(&self) -> &Config {
        match self {
            Self::Cpu(m) => m.config(),
            Self::Tensor(m) => Forward::config(m),
        }
    }

    /// Our CPU model, when that is what runs.
    pub fn cpu(&self) -> Option<&Model> {
        match self {
            Self::Cpu(m) => Some(m),
            Self::Tensor(_) => None,
        }
    }

    /// Where steps run, for logs: `cpu`, or the device and compute dtype.
    pub fn describe(&self) -> String {
        match self {
            Self::Cpu(_) => "cpu".into(),
            Self::Tensor(m) => {
                let device = match m.device().location() {
                    DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                    DeviceLocation::Cpu => "candle-cpu".into(),
                    other => format!("{other:?}"),
                };
                format!("{device} {}", m.dtype().as_str())
            }
        }
    }

    /// [`lazy::step_with`] on this backend.
    pub fn step_with(
        &self,
        state: &mut SequenceState,
        tokens: &[u32],
        on_layer: &mut dyn FnMut(usize, &LayerState) -> Result<()>,
    ) -> Result<Vec<f32>> {
        match self {
            Self::Cpu(m) => lazy::step_with(m, state, tokens, on_layer),
            Self::Tensor(m) => lazy::step_with(m, state, tokens, on_layer),
        }
    }

    /// [`lazy::step_batch`] on this backend.
    pub fn step_batch(
        &self,
        inputs: &mut [StepInput<'_>],
        on_layer: &mut dyn FnMut(usize, usize, &LayerState) -> Result<()>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        match self {
            Self::Cpu(m) => lazy::step_batch(m, inputs, on_layer),
            Self::Tensor(m) => lazy::step_batch(m, inputs, on_layer),
        }
    }
}
