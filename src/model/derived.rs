//! Values made from a model's weights on first use and kept with the model.

use crate::Result;
use candle_core::{Tensor, TensorId};
use std::any::Any;
use std::sync::{Arc, Mutex};

/// Values computed from one of a model's tensors on first use and kept with the model (its
/// clones share them): the lens's int16 copy of the unembedding. Each is keyed by the id of
/// the tensor it came from (candle tensors are immutable), so a tensor replaced later is never
/// served the old value; one value per type is kept.
#[derive(Clone, Default)]
pub struct Derived(Arc<Mutex<Vec<Slot>>>);

/// A derived value and the tensor it came from.
type Slot = (TensorId, Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |s| s.len());
        write!(f, "Derived({n} values)")
    }
}

impl Derived {
    /// The `T` derived from `from`: made by `make` on the first call for this tensor, then
    /// returned as made (calls wait for one another; an error is returned, not kept).
    pub fn get_or_make<T: Any + Send + Sync>(
        &self,
        from: &Tensor,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        let mut slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let found = slots
            .iter()
            .find(|(id, v)| *id == from.id() && v.is::<T>())
            .map(|(_, v)| v.clone());
        if let Some(v) = found.and_then(|v| v.downcast::<T>().ok()) {
            return Ok(v);
        }
        let value = Arc::new(make()?);
        slots.retain(|(_, v)| !v.is::<T>());
        slots.push((from.id(), value.clone()));
        Ok(value)
    }
}
