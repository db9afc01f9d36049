//! [`SimulatedSink`]: a load into memory on a [`SimulatedDevice`], each piece copied from
//! the staging buffer by the device's copy thread at its bandwidth.

use super::{check_range, Claims, Expect, SinkWriter, TensorMeta, TensorSink};
use crate::error::{Error, Result};
use crate::source::{SimulatedTensor, TensorSource};

/// Named tensors on a simulated device, filled by a load. A tensor of the checkpoint with
/// no destination here is skipped; one of another size is a mismatch. Destinations made
/// with [`crate::source::SimulatedDevice::generated`] keep nothing (for measuring loads of
/// any size without the memory).
pub struct SimulatedSink {
    dests: Vec<(String, SimulatedTensor)>,
    claims: Claims,
}

impl SimulatedSink {
    /// A sink over `dests`, by tensor name; two with the same name are refused.
    pub fn new(dests: Vec<(String, SimulatedTensor)>) -> Result<SimulatedSink> {
        let claims = Claims::new(dests.iter().map(|(name, _)| name.clone()).collect())?;
        Ok(SimulatedSink { dests, claims })
    }

    /// The destination of `name`.
    pub fn tensor(&self, name: &str) -> Option<&SimulatedTensor> {
        self.dests.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

impl TensorSink for SimulatedSink {
    fn open(&self, tensor: &TensorMeta<'_>) -> Result<Option<usize>> {
        self.claims.claim(tensor, |slot| Expect { len: self.dests[slot].1.len(), dtype: None, shape: None })
    }

    fn unclaimed(&self) -> Vec<String> {
        self.claims.unclaimed()
    }

    fn writer(&self) -> Result<Box<dyn SinkWriter + '_>> {
        Ok(Box::new(SimulatedWriter { sink: self }))
    }
}

struct SimulatedWriter<'s> {
    sink: &'s SimulatedSink,
}

impl SinkWriter for SimulatedWriter<'_> {
    fn write(
        &mut self,
        slot: usize,
        at: u64,
        bytes: &[u8],
        crc: Option<&mut crc32fast::Hasher>,
    ) -> Result<()> {
        let (name, tensor) =
            self.sink.dests.get(slot).ok_or_else(|| Error::Internal(format!("no destination {slot}")))?;
        let start = check_range(name, tensor.len(), at, bytes.len())?;
        if let Some(crc) = crc {
            crc.update(bytes);
        }
        // Synchronous, as a copy followed by a stream synchronize: nothing to flush.
        tensor.upload_at(start, bytes)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}
