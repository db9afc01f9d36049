//! Deterministic synthetic checkpoints for benchmarks and tests.
//!
//! [`SyntheticCheckpoint::generate`] builds the tensor list of a model family ([`Layout`]),
//! scaled so that the total is close to the requested size, and fills the tensors with
//! pseudo-random but finite, weight-like values derived from a seed (a counter-based
//! splitmix64, several GB/s per core, spread over the available cores). The same layout,
//! size, seed and dtype always give the same names, shapes and bytes.
//!
//! The tensors live in one page-aligned arena, each starting at a 64-byte boundary (the
//! alignment PyTorch's CPU allocator gives), in the order they are saved.
//!
//! (Over 500 lines only with its unit tests: the generator itself is about 430.)
//!
//! ```
//! use uring_ckpt::format::Dtype;
//! use uring_ckpt::synthetic::{Layout, SyntheticCheckpoint};
//!
//! let synth = SyntheticCheckpoint::generate(Layout::Gpt2, 1 << 20, 7, Dtype::BF16)?;
//! let ckpt = synth.checkpoint();
//! assert_eq!(ckpt.tensors.len(), synth.tensor_count());
//! assert_eq!(ckpt.data_bytes(), synth.data_bytes());
//! assert!(ckpt.tensors.iter().any(|t| t.name == "transformer.wte.weight"));
//! # Ok::<(), uring_ckpt::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use crate::checkpoint::{Checkpoint, TensorData, TensorView};
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::AlignedBuf;

/// Where each tensor starts in the arena, in bytes.
const TENSOR_ALIGN: u64 = 64;

/// Largest checkpoint [`SyntheticCheckpoint::generate`] accepts (1 TiB): beyond the memory
/// of most machines, and small enough that the tensor list stays reasonable.
pub const MAX_SYNTHETIC_BYTES: u64 = 1 << 40;

/// The model family whose tensor list a synthetic checkpoint copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// A realistic mix: a few large matrices, many small vectors, a scalar, and odd sizes
    /// that are not multiples of 4096 bytes (`[1000, 1003]`, vectors of 7, 4095, 4097
    /// elements). The last tensor absorbs the remainder so the total matches the request.
    #[default]
    Mixed,
    /// GPT-2 small (`transformer.wte`, `wpe`, blocks of `ln_1`, `attn.c_attn`, `attn.c_proj`,
    /// `ln_2`, `mlp.c_fc`, `mlp.c_proj`, then `ln_f`), with the number of blocks and, for
    /// small sizes, the hidden size and vocabulary scaled.
    Gpt2,
    /// Llama-7B-like (`model.embed_tokens`, layers of `q/k/v/o_proj`, `gate/up/down_proj`
    /// and two RMS norms, then `model.norm` and `lm_head`), scaled the same way.
    Llama,
}

impl Layout {
    /// `"mixed"`, `"gpt2"` or `"llama"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Mixed => "mixed",
            Layout::Gpt2 => "gpt2",
            Layout::Llama => "llama",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown layout {0:?}; expected mixed, gpt2 or llama")]
pub struct ParseLayoutError(pub String);

impl FromStr for Layout {
    type Err = ParseLayoutError;

    /// Parses `mixed`, `gpt2` or `llama`, in any case.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mixed" => Ok(Layout::Mixed),
            "gpt2" | "gpt-2" => Ok(Layout::Gpt2),
            "llama" => Ok(Layout::Llama),
            _ => Err(ParseLayoutError(s.to_owned())),
        }
    }
}

/// One tensor of a synthetic checkpoint: where its bytes are in the arena.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    name: String,
    shape: Vec<u64>,
    offset: usize,
    len: usize,
}

/// A synthetic checkpoint that owns its tensors' bytes; [`SyntheticCheckpoint::checkpoint`]
/// lends them out as a [`Checkpoint`] without copying.
pub struct SyntheticCheckpoint {
    arena: AlignedBuf,
    slots: Vec<Slot>,
    layout: Layout,
    dtype: Dtype,
    seed: u64,
    requested: u64,
}

impl fmt::Debug for SyntheticCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyntheticCheckpoint")
            .field("layout", &self.layout)
            .field("dtype", &self.dtype)
            .field("seed", &self.seed)
            .field("requested", &self.requested)
            .field("tensors", &self.slots.len())
            .field("data_bytes", &self.data_bytes())
            .finish()
    }
}

impl SyntheticCheckpoint {
    /// Builds a checkpoint of `layout` whose tensors total close to `total_bytes` (within a
    /// few percent from 1 MiB up; tiny requests get the smallest model of the family), with
    /// elements of `dtype` (`BF16` or `F32`) filled deterministically from `seed`.
    ///
    /// Errors: another dtype, or a size above [`MAX_SYNTHETIC_BYTES`]. The memory is
    /// allocated at once: ask for no more than the machine has.
    pub fn generate(
        layout: Layout,
        total_bytes: u64,
        seed: u64,
        dtype: Dtype,
    ) -> Result<SyntheticCheckpoint> {
        let elem = match dtype {
            Dtype::BF16 => 2,
            Dtype::F32 => 4,
            other => {
                return Err(Error::InvalidCheckpoint(format!(
                    "synthetic checkpoints are BF16 or F32, not {other}"
                )))
            }
        };
        if total_bytes > MAX_SYNTHETIC_BYTES {
            return Err(Error::InvalidCheckpoint(format!(
                "synthetic checkpoint of {total_bytes} bytes is larger than the limit of {MAX_SYNTHETIC_BYTES}"
            )));
        }
        let target = (total_bytes / elem).max(1);
        let specs = match layout {
            Layout::Mixed => mixed_specs(target),
            Layout::Gpt2 => scaled_specs(&GPT2, target),
            Layout::Llama => scaled_specs(&LLAMA, target),
        };
        let mut slots = Vec::with_capacity(specs.len());
        let mut offset = 0u64;
        for (name, shape) in specs {
            let len = shape.iter().product::<u64>() * elem;
            offset = offset.div_ceil(TENSOR_ALIGN) * TENSOR_ALIGN;
            let (start, size) = (to_usize(offset)?, to_usize(len)?);
            slots.push(Slot { name, shape, offset: start, len: size });
            offset += len;
        }
        let mut arena = AlignedBuf::zeroed(to_usize(offset.div_ceil(8) * 8)?, 4096);
        let len = arena.capacity();
        arena.set_len(len);
        fill(&mut arena, seed, dtype);
        Ok(SyntheticCheckpoint { arena, slots, layout, dtype, seed, requested: total_bytes })
    }

    /// The tensors as a [`Checkpoint`] of borrowed views, with metadata naming the layout,
    /// dtype and seed.
    pub fn checkpoint(&self) -> Checkpoint<'_> {
        let tensors = self
            .slots
            .iter()
            .map(|s| TensorView {
                name: s.name.clone(),
                dtype: self.dtype,
                shape: s.shape.clone(),
                data: TensorData::Host(&self.arena[s.offset..s.offset + s.len]),
            })
            .collect();
        let mut ckpt = Checkpoint { tensors, ..Default::default() };
        ckpt.set_metadata("synthetic.layout", self.layout.as_str())
            .set_metadata("synthetic.dtype", self.dtype.as_str())
            .set_metadata("synthetic.seed", self.seed.to_string())
            .set_metadata("synthetic.requested_bytes", self.requested.to_string());
        ckpt
    }

    /// Sum of the tensors' byte sizes (what was achieved, not what was asked for).
    pub fn data_bytes(&self) -> u64 {
        self.slots.iter().map(|s| s.len as u64).sum()
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.slots.len()
    }

    /// The layout it copies.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}

fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| {
        Error::InvalidCheckpoint(format!("{n} bytes do not fit in this machine's address space"))
    })
}

/// Fewest layers a scaled model should keep when the size allows.
const MIN_LAYERS: u64 = 4;

/// A tensor's name and shape.
type Spec = (String, Vec<u64>);

/// Shapes of a model family at full size, and how it scales.
struct Family {
    hidden: u64,
    vocab: u64,
    ffn: u64,
    ctx: u64,
    specs: fn(&Dims) -> Vec<Spec>,
}

/// Dimensions of one scaled model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    hidden: u64,
    vocab: u64,
    ffn: u64,
    ctx: u64,
    layers: u64,
}

const GPT2: Family = Family { hidden: 768, vocab: 50257, ffn: 3072, ctx: 1024, specs: gpt2_specs };
const LLAMA: Family = Family { hidden: 4096, vocab: 32000, ffn: 11008, ctx: 0, specs: llama_specs };

fn gpt2_specs(d: &Dims) -> Vec<Spec> {
    let h = d.hidden;
    let mut out = vec![
        ("transformer.wte.weight".to_owned(), vec![d.vocab, h]),
        ("transformer.wpe.weight".to_owned(), vec![d.ctx, h]),
    ];
    for i in 0..d.layers {
        let p = format!("transformer.h.{i}");
        out.extend([
            (format!("{p}.ln_1.weight"), vec![h]),
            (format!("{p}.ln_1.bias"), vec![h]),
            (format!("{p}.attn.c_attn.weight"), vec![h, 3 * h]),
            (format!("{p}.attn.c_attn.bias"), vec![3 * h]),
            (format!("{p}.attn.c_proj.weight"), vec![h, h]),
            (format!("{p}.attn.c_proj.bias"), vec![h]),
            (format!("{p}.ln_2.weight"), vec![h]),
            (format!("{p}.ln_2.bias"), vec![h]),
            (format!("{p}.mlp.c_fc.weight"), vec![h, d.ffn]),
            (format!("{p}.mlp.c_fc.bias"), vec![d.ffn]),
            (format!("{p}.mlp.c_proj.weight"), vec![d.ffn, h]),
            (format!("{p}.mlp.c_proj.bias"), vec![h]),
        ]);
    }
    out.push(("transformer.ln_f.weight".to_owned(), vec![h]));
    out.push(("transformer.ln_f.bias".to_owned(), vec![h]));
    out
}

fn llama_specs(d: &Dims) -> Vec<Spec> {
    let h = d.hidden;
    let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![d.vocab, h])];
    for i in 0..d.layers {
        let p = format!("model.layers.{i}");
        out.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![h, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![h, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![d.ffn, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![d.ffn, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, d.ffn]),
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        ]);
    }
    out.push(("model.norm.weight".to_owned(), vec![h]));
    out.push(("lm_head.weight".to_owned(), vec![d.vocab, h]));
    out
}

fn elements(specs: &[Spec]) -> u64 {
    specs.iter().map(|(_, s)| s.iter().product::<u64>()).sum()
}

/// The dimensions of `family` scaled to `hidden` (vocabulary, FFN width and context scale
/// with it) and `layers`.
fn scale(family: &Family, hidden: u64, layers: u64) -> Dims {
    let by = |full: u64| (full * hidden / family.hidden).max(if full == 0 { 0 } else { 8 });
    Dims { hidden, vocab: by(family.vocab), ffn: by(family.ffn), ctx: by(family.ctx), layers }
}

/// Chooses hidden size and layer count so that the model has close to `target` elements:
/// the widest hidden size (multiples of 32, down to 8) that lands within 2% of the target
/// with at least [`MIN_LAYERS`] layers, else the widest within 2%, else the closest fit. Large targets keep the full hidden size and add layers.
fn scaled_specs(family: &Family, target: u64) -> Vec<Spec> {
    let mut hiddens: Vec<u64> = (1..=family.hidden / 32).rev().map(|k| k * 32).collect();
    hiddens.extend([16, 8]);
    let mut best: Option<(f64, Dims)> = None;
    let mut close: Option<Dims> = None;
    for hidden in hiddens {
        let fixed = elements(&(family.specs)(&scale(family, hidden, 0)));
        let per_layer = elements(&(family.specs)(&scale(family, hidden, 1))) - fixed;
        let layers = if target > fixed {
            ((target - fixed) as f64 / per_layer as f64).round().max(1.0) as u64
        } else {
            1
        };
        let total = fixed + layers * per_layer;
        let error = (total as f64 - target as f64).abs() / target as f64;
        let dims = scale(family, hidden, layers);
        if error <= 0.02 && layers >= MIN_LAYERS {
            return (family.specs)(&dims);
        }
        if error <= 0.02 && close.is_none() {
            close = Some(dims);
        }
        if best.is_none_or(|(e, _)| error < e) {
            best = Some((error, dims));
        }
    }
    let dims = close.or(best.map(|(_, d)| d)).unwrap_or_else(|| scale(family, 8, 1));
    (family.specs)(&dims)
}

/// The `mixed` layout for `target` elements.
fn mixed_specs(target: u64) -> Vec<Spec> {
    // Width of the large matrices: 4096 for large checkpoints, narrower for small ones.
    let width = (1u64 << ((target / 16).max(1).ilog2() / 2)).clamp(64, 4096);
    let groups = (target / (8 << 20)).clamp(2, 32);
    let mut planned: Vec<Spec> = Vec::new();
    // A scalar (a step counter, a loss scale) and an empty tensor come first.
    planned.push(("optimizer.step".to_owned(), vec![]));
    planned.push(("buffers.empty".to_owned(), vec![0]));
    let embed_rows = (target * 3 / 20 / width).max(1);
    planned.push(("embed.weight".to_owned(), vec![embed_rows, width]));
    let vectors: [(&str, u64); 5] =
        [("bias", 7), ("norm.weight", width), ("v4095", 4095), ("v4097", 4097), ("scale", 1)];
    let odd = 1000 * 1003;
    let small_per_group: u64 = vectors.iter().map(|(_, n)| n).sum::<u64>() + odd;
    let big_budget = target.saturating_sub(2 * embed_rows * width + groups * small_per_group);
    let rows = big_budget / groups / 2 / width;
    for g in 0..groups {
        let p = format!("blocks.{g}");
        if rows > 0 {
            planned.push((format!("{p}.proj.weight"), vec![rows, width]));
            planned.push((format!("{p}.fc.weight"), vec![width, rows]));
        }
        planned.push((format!("{p}.odd.weight"), vec![1000, 1003]));
        for (name, n) in vectors {
            planned.push((format!("{p}.{name}"), vec![n]));
        }
    }
    planned.push(("head.weight".to_owned(), vec![embed_rows, width]));
    // Keep what fits, in order; the remainder becomes one odd-sized vector at the end.
    let mut out = Vec::with_capacity(planned.len() + 1);
    let mut used = 0u64;
    for (name, shape) in planned {
        let n: u64 = shape.iter().product();
        if used + n <= target {
            used += n;
            out.push((name, shape));
        }
    }
    if used < target {
        out.push(("tail.weight".to_owned(), vec![target - used]));
    }
    out
}

/// Fills `buf` with finite, weight-like values of `dtype` (magnitudes between 2^-7 and
/// 2^-5, random sign and mantissa), one splitmix64 output per 8 bytes, indexed by position
/// so that any split over threads gives the same bytes.
fn fill(buf: &mut [u8], seed: u64, dtype: Dtype) {
    // Keep sign, mantissa and the lowest exponent bit; set the exponent to 120 or 121.
    let (keep, set) = match dtype {
        Dtype::F32 => (0x80FF_FFFF_80FF_FFFFu64, 0x3C00_0000_3C00_0000u64),
        _ => (0x80FF_80FF_80FF_80FFu64, 0x3C00_3C00_3C00_3C00u64),
    };
    let base = splitmix64(seed ^ 0x5EED_C4EC_4B01_0F00);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    let words = buf.len() / 8;
    let per_thread = words.div_ceil(threads).max(1 << 16) * 8;
    std::thread::scope(|scope| {
        for (t, part) in buf.chunks_mut(per_thread).enumerate() {
            let first = (t * per_thread / 8) as u64;
            scope.spawn(move || {
                let mut chunks = part.chunks_exact_mut(8);
                let mut i = first;
                for word in &mut chunks {
                    let v = (splitmix64(base.wrapping_add(i)) & keep) | set;
                    word.copy_from_slice(&v.to_le_bytes());
                    i += 1;
                }
                let rest = chunks.into_remainder();
                let v = ((splitmix64(base.wrapping_add(i)) & keep) | set).to_le_bytes();
                let n = rest.len();
                rest.copy_from_slice(&v[..n]);
            });
        }
    });
}

/// The splitmix64 output for counter `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const LAYOUTS: [Layout; 3] = [Layout::Mixed, Layout::Gpt2, Layout::Llama];

    fn plan(layout: Layout, bytes: u64, elem: u64) -> Vec<Spec> {
        let target = (bytes / elem).max(1);
        match layout {
            Layout::Mixed => mixed_specs(target),
            Layout::Gpt2 => scaled_specs(&GPT2, target),
            Layout::Llama => scaled_specs(&LLAMA, target),
        }
    }

    #[test]
    fn layouts_parse_and_display() {
        for l in LAYOUTS {
            assert_eq!(l.to_string().parse::<Layout>(), Ok(l));
        }
        assert_eq!("GPT2".parse::<Layout>(), Ok(Layout::Gpt2));
        assert!("bert".parse::<Layout>().is_err());
    }

    #[test]
    fn sizes_are_close_to_the_target_and_names_unique() {
        // Plans only (no allocation), so large sizes are cheap to check.
        for layout in LAYOUTS {
            for elem in [2u64, 4] {
                for mib in [1u64, 3, 10, 64, 100, 512, 1024] {
                    let bytes = mib << 20;
                    let specs = plan(layout, bytes, elem);
                    let total = elements(&specs) * elem;
                    let error = (total as f64 - bytes as f64).abs() / bytes as f64;
                    assert!(error < 0.05, "{layout} {mib}MiB x{elem}: got {total} bytes ({error:.3})");
                    let names: HashSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
                    assert_eq!(names.len(), specs.len(), "{layout} {mib}MiB: duplicate names");
                }
            }
        }
    }

    #[test]
    fn real_shapes_at_full_size() {
        let specs = plan(Layout::Gpt2, 248 << 20, 2);
        assert!(specs.iter().any(|(n, s)| n == "transformer.wte.weight" && s == &[50257, 768]));
        assert!(specs.iter().any(|(n, s)| n == "transformer.h.0.attn.c_attn.weight" && s == &[768, 2304]));
        let specs = plan(Layout::Llama, 13 << 30, 2);
        assert!(specs.iter().any(|(n, s)| n == "model.embed_tokens.weight" && s == &[32000, 4096]));
        assert!(specs.iter().any(|(n, s)| n == "model.layers.0.mlp.down_proj.weight" && s == &[4096, 11008]));
        let specs = plan(Layout::Mixed, 512 << 20, 2);
        assert!(specs.iter().any(|(_, s)| s == &[1000, 1003]));
        for n in [7, 4095, 4097] {
            assert!(specs.iter().any(|(_, s)| s == &[n]), "vector of {n}");
        }
    }

    #[test]
    fn tiny_and_huge_requests_do_not_panic() {
        for layout in LAYOUTS {
            for bytes in [0u64, 1, 100, 4096, 64 << 10] {
                let s = SyntheticCheckpoint::generate(layout, bytes, 1, Dtype::BF16).expect("generates");
                assert!(s.tensor_count() > 0);
                assert_eq!(s.checkpoint().validate().map_err(|e| e.to_string()), Ok(()));
            }
            let huge = plan(layout, 64 << 30, 2);
            assert!(elements(&huge) > 0);
        }
        assert!(SyntheticCheckpoint::generate(Layout::Mixed, u64::MAX, 1, Dtype::BF16).is_err());
        assert!(SyntheticCheckpoint::generate(Layout::Mixed, 1 << 20, 1, Dtype::U8).is_err());
    }

    #[test]
    fn deterministic_and_byte_counts_right() {
        for layout in LAYOUTS {
            let a = SyntheticCheckpoint::generate(layout, 3 << 20, 42, Dtype::F32).expect("a");
            let b = SyntheticCheckpoint::generate(layout, 3 << 20, 42, Dtype::F32).expect("b");
            let c = SyntheticCheckpoint::generate(layout, 3 << 20, 43, Dtype::F32).expect("c");
            let (ca, cb, cc) = (a.checkpoint(), b.checkpoint(), c.checkpoint());
            assert_eq!(ca.tensors.len(), cb.tensors.len());
            let mut differs = false;
            for ((x, y), z) in ca.tensors.iter().zip(&cb.tensors).zip(&cc.tensors) {
                assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
                assert_eq!(x.data.host_bytes(), y.data.host_bytes(), "{}", x.name);
                differs |= x.data.host_bytes() != z.data.host_bytes();
                let expected = Dtype::F32.byte_len(&x.shape).expect("fits");
                assert_eq!(x.data.len() as u64, expected, "{}", x.name);
                assert_eq!(x.data.host_bytes().map(|b| b.as_ptr() as usize % 64), Some(0));
            }
            assert!(differs, "{layout}: another seed gives other bytes");
            assert_eq!(ca.data_bytes(), a.data_bytes());
            assert_eq!(ca.validate().map_err(|e| e.to_string()), Ok(()));
        }
    }

    #[test]
    fn values_are_finite() {
        let s = SyntheticCheckpoint::generate(Layout::Mixed, 1 << 20, 9, Dtype::BF16).expect("bf16");
        for t in s.checkpoint().tensors {
            for pair in t.data.host_bytes().unwrap_or_default().chunks_exact(2) {
                let v = f32::from_bits(u32::from(u16::from_le_bytes([pair[0], pair[1]])) << 16);
                assert!(v.is_finite() && v.abs() < 0.05 && v.abs() >= 1.0 / 128.0, "{v}");
            }
        }
        let s = SyntheticCheckpoint::generate(Layout::Gpt2, 1 << 20, 9, Dtype::F32).expect("f32");
        for t in s.checkpoint().tensors {
            for q in t.data.host_bytes().unwrap_or_default().chunks_exact(4) {
                let v = f32::from_le_bytes([q[0], q[1], q[2], q[3]]);
                assert!(v.is_finite() && v.abs() < 0.05, "{v}");
            }
        }
    }
}
