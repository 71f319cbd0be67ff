//! Low-rank LoRA adapter GGUF that stock llama.cpp loads with `--lora` (and hot-swaps in
//! llama-server). For ΔW = Σᵢ uᵢ vᵢᵀ of rank r on W [out, in]: `lora_a` has ggml dims [in, r]
//! (rows vᵢ), `lora_b` has dims [r, out] (column i is uᵢ), and `adapter.lora.alpha` = r so that
//! llama.cpp's scale alpha / rank is exactly 1 and the adapter adds exactly ΔW·x.

use super::gguf::{GgufPlan, OutTensor};
use crate::arch::Arch;
use crate::delta::Delta;
use crate::weights::gguf::Value;
use crate::Result;
use std::path::Path;

/// Builds the adapter file contents for `deltas` (several deltas on one tensor are stacked).
pub fn adapter_plan(
    arch: Arch,
    deltas: &[Delta],
    provenance: &[(String, Value)],
) -> GgufPlan<'static> {
    let mut plan = GgufPlan::default();
    plan.set("general.architecture", Value::String(arch.name().into()));
    plan.set("general.type", Value::String("adapter".into()));
    plan.set("adapter.type", Value::String("lora".into()));
    // Per edited tensor: its name, output-side vectors and input-side vectors.
    type Factors<'d> = (String, Vec<&'d [f32]>, Vec<&'d [f32]>);
    let mut tensors: Vec<Factors> = Vec::new();
    for d in deltas {
        let entry = match tensors.iter_mut().find(|(n, _, _)| *n == d.tensor) {
            Some(e) => e,
            None => {
                tensors.push((d.tensor.clone(), Vec::new(), Vec::new()));
                tensors.last_mut().expect("just pushed")
            }
        };
        for (u, v) in d.out_vecs.iter().zip(&d.in_vecs) {
            entry.1.push(u);
            entry.2.push(v);
        }
    }
    // llama.cpp has one alpha per adapter and scales each pair by alpha / its rank: every pair is
    // padded with zero rows to the largest rank so that the scale is exactly 1 everywhere.
    let rank = tensors.iter().map(|t| t.1.len()).max().unwrap_or(1);
    plan.set("adapter.lora.alpha", Value::F32(rank as f32));
    for (k, v) in provenance {
        plan.set(k, v.clone());
    }
    for (name, us, vs) in tensors {
        let (n_out, n_in) = (us[0].len(), vs[0].len());
        let zeros_in = vec![0f32; n_in];
        let mut a = Vec::with_capacity(rank * n_in);
        for i in 0..rank {
            a.extend_from_slice(vs.get(i).copied().unwrap_or(&zeros_in));
        }
        let mut b = vec![0f32; n_out * rank];
        for (i, u) in us.iter().enumerate() {
            for (o, &x) in u.iter().enumerate() {
                b[o * rank + i] = x;
            }
        }
        plan.tensors
            .push(OutTensor::f32(&format!("{name}.lora_a"), &[rank, n_in], &a));
        plan.tensors.push(OutTensor::f32(
            &format!("{name}.lora_b"),
            &[n_out, rank],
            &b,
        ));
    }
    plan
}

/// Writes the adapter atomically.
pub fn write_adapter(
    path: &Path,
    arch: Arch,
    deltas: &[Delta],
    provenance: &[(String, Value)],
) -> Result<()> {
    adapter_plan(arch, deltas, provenance).write(path)
}
