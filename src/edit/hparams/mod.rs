//! Hyperparameters of the optimising methods (`rome`, `memit`, `ft`) as data: one JSON file per
//! model family beside this module (`llama.json`, `gpt2.json`), in the style of ROME's
//! `hparams/ROME/*.json`, read with unknown keys refused. docs/methods.md explains each value.

use crate::arch::Arch;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The v* optimisation shared by ROME and MEMIT, and ROME's key statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RomeParams {
    /// Default edited layer: round(`layer_fraction` · n_layer) (`--layer` overrides).
    pub layer_fraction: f64,
    /// Prefixes put before the prompt: k* is the mean key over the bare prompt and these, and
    /// v* is optimised on all of them (ROME's context templates).
    pub context_prefixes: Vec<String>,
    /// The KL prompt, `{}` standing for the subject ("{} is a" in ROME).
    pub kl_prompt: String,
    /// Adam steps of the v* optimisation (at most).
    pub v_num_grad_steps: usize,
    /// Adam step size.
    pub v_lr: f64,
    /// Weight of the decay term ‖δ‖ / ‖v₀‖².
    pub v_weight_decay: f64,
    /// ‖δ‖ is kept at most this factor times ‖v₀‖ (projection after each step).
    pub clamp_norm_factor: f64,
    /// Weight of KL(p_δ ‖ p₀) on the KL prompt's next token.
    pub kl_factor: f64,
    /// The optimisation stops once the loss is below this.
    pub early_stop_loss: f64,
    /// λ of C = E[a aᵀ] + λ·I, relative to the mean diagonal of E[a aᵀ].
    pub mom2_ridge: f64,
}

/// MEMIT: the same value optimisation at the last of several layers, spread over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemitParams {
    /// Number of consecutive layers edited, ending at the edited layer.
    pub layers: usize,
    /// ‖δ‖ bound relative to the residual stream's norm (replaces ROME's factor).
    pub clamp_norm_factor: f64,
    /// Weight w of the preserved statistics: ΔW = R Kᵀ (w·C + K Kᵀ)⁻¹, C = E[a aᵀ] per position
    /// over the statistics prompts (MEMIT's `mom2_update_weight`: 20000 for GPT-2 XL; about
    /// n_ff for SmolLM2, since kᵀC⁻¹k is about n_ff for a typical key).
    pub mom2_update_weight: f64,
}

/// FT: plain gradient descent on one FF2 matrix inside an ∞-norm ball.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtParams {
    /// Step size of each gradient step.
    pub lr: f64,
    /// Gradient steps (at most).
    pub steps: usize,
    /// ε: every entry of ΔW stays within ±ε.
    pub norm_constraint: f64,
    /// The steps stop once the loss is below this.
    pub early_stop_loss: f64,
}

/// Every optimising method's hyperparameters for one model family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodParams {
    /// ROME (and the value optimisation MEMIT shares).
    pub rome: RomeParams,
    /// MEMIT.
    pub memit: MemitParams,
    /// FT.
    pub ft: FtParams,
}

impl MethodParams {
    /// The built-in hyperparameters of `arch`'s family: GPT-2's, or the Llama file for the
    /// RMSNorm / gated-FFN families.
    pub fn for_arch(arch: Arch) -> Result<MethodParams> {
        let (file, text) = match arch {
            Arch::Gpt2 => ("gpt2.json", include_str!("gpt2.json")),
            // The RMSNorm / gated-FFN families share the values tuned on SmolLM2 (Llama).
            _ => ("llama.json", include_str!("llama.json")),
        };
        Self::parse(text).map_err(|e| Error::Invalid(format!("src/edit/hparams/{file}: {e}")))
    }

    /// Parses and checks one hyperparameter file.
    pub fn parse(text: &str) -> std::result::Result<MethodParams, String> {
        let p: MethodParams = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let r = &p.rome;
        let positive = [
            ("rome.v_lr", r.v_lr),
            ("rome.clamp_norm_factor", r.clamp_norm_factor),
            ("rome.mom2_ridge", r.mom2_ridge),
            ("memit.clamp_norm_factor", p.memit.clamp_norm_factor),
            ("memit.mom2_update_weight", p.memit.mom2_update_weight),
            ("ft.norm_constraint", p.ft.norm_constraint),
            ("ft.lr", p.ft.lr),
        ];
        let non_negative = [
            ("rome.v_weight_decay", r.v_weight_decay),
            ("rome.kl_factor", r.kl_factor),
            ("rome.early_stop_loss", r.early_stop_loss),
            ("ft.early_stop_loss", p.ft.early_stop_loss),
        ];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{key} must be a positive number, got {v}"));
            }
        }
        for (key, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{key} must be a non-negative number, got {v}"));
            }
        }
        if !(0.0..=1.0).contains(&r.layer_fraction) {
            return Err(format!(
                "rome.layer_fraction must be in [0, 1], got {}",
                r.layer_fraction
            ));
        }
        if !r.kl_prompt.contains("{}") {
            return Err(format!(
                "rome.kl_prompt {:?} has no {{}} for the subject",
                r.kl_prompt
            ));
        }
        if r.v_num_grad_steps == 0 || p.ft.steps == 0 || p.memit.layers == 0 {
            return Err(
                "rome.v_num_grad_steps, memit.layers and ft.steps must be at least 1".into(),
            );
        }
        Ok(p)
    }

    /// The default edited layer of a model with `n_layer` layers.
    pub fn default_layer(&self, n_layer: usize) -> usize {
        ((self.rome.layer_fraction * n_layer as f64).round() as usize).min(n_layer - 1)
    }
}
