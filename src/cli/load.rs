//! `uring-ckpt load`: read a checkpoint (ours, a safetensors file or directory, a Hugging
//! Face index) and report how the reads went.

use std::path::PathBuf;

use uring_ckpt::inspect::TensorInfo;
use uring_ckpt::sink::{HostSink, SimulatedSink, TensorSink};
use uring_ckpt::source::SimulatedDevice;
use uring_ckpt::{CheckpointIO, LoadOptions, LoadReport, UringCheckpointIO};

use super::{
    engine_line, existing_checkpoint_path, latency_line, mib, print_fallbacks, single_config, GlobalOpts,
    Result,
};

/// Arguments of `load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Checkpoint directory, directory of *.safetensors files (with or without a Hugging
    /// Face model.safetensors.index.json), or one .safetensors file.
    dir: PathBuf,
    /// Load only these tensors (comma-separated names).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    names: Option<Vec<String>>,
    /// Skip the CRC-32 check of each tensor.
    #[arg(long)]
    no_verify: bool,
    /// Print the load report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
    /// Where the tensors go: existing `host` memory (the default: allocated and touched
    /// before the timed load, as a live model's parameters are, each tensor at the place in
    /// a page its bytes have in the file, as a restart of the program that saved it finds
    /// them, and loaded in place), `fresh` host memory allocated by the load (what a restart with no
    /// model yet gets: the kernel's zeroing of the new pages is in the time), the shard
    /// files `mapped` copy-on-write (a fresh load from the page cache, nothing zeroed or
    /// copied: `LoadOptions::map`), or a simulated device (`sim-device`: host-to-device
    /// copies at --device-gib-s on the device's copy thread, keeping nothing).
    #[arg(long, value_enum, default_value = "host")]
    into: Into,
    /// Copy bandwidth of the simulated device, GiB/s.
    #[arg(long, default_value_t = 25.0, value_name = "GIB_S")]
    device_gib_s: f64,
}

/// Where `load` puts the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Into {
    Fresh,
    Host,
    Mapped,
    SimDevice,
}

pub fn run(global: &GlobalOpts, args: LoadArgs) -> Result<()> {
    existing_checkpoint_path(&args.dir)?;
    // What it is, for the summary (reads a manifest or index at most, no shard).
    let (kind, shards) = uring_ckpt::store::identify(&args.dir)?;
    let config = single_config(global)?;
    let io = UringCheckpointIO::new(config.clone())?;
    let options = LoadOptions {
        names: args.names.clone(),
        verify: args.no_verify.then_some(false),
        map: args.into == Into::Mapped,
    };
    let mut uploaded = None;
    let (r, tensors, peak) = match args.into {
        Into::Fresh | Into::Mapped => {
            let loaded = io.load_checkpoint(&args.dir, &options)?;
            (loaded.report, loaded.tensors.len(), None)
        }
        Into::Host | Into::SimDevice => {
            let info = uring_ckpt::inspect::inspect(&config, &args.dir)?;
            let wanted = |name: &str| options.names.as_ref().is_none_or(|n| n.iter().any(|w| w == name));
            let wanted: Vec<_> = info.tensors.iter().filter(|t| wanted(&t.name)).collect();
            let sizes: Vec<(String, usize)> =
                wanted.iter().map(|t| (t.name.clone(), t.bytes as usize)).collect();
            let mut host = PhasedDests::default();
            let device = SimulatedDevice::new((args.device_gib_s * (1u64 << 30) as f64) as u64)?;
            let sink: Box<dyn TensorSink> = if args.into == Into::Host {
                host = PhasedDests::new(wanted.iter().copied());
                Box::new(host.sink()?)
            } else {
                let dests = sizes.iter().map(|(n, len)| (n.clone(), device.generated(*len, 0))).collect();
                Box::new(SimulatedSink::new(dests)?)
            };
            let before = memory::reset_peak();
            let loaded = io.load_into(&args.dir, &options, true, sink.as_ref())?;
            let peak = before.and_then(|b| memory::peak().map(|p| p.saturating_sub(b)));
            drop(sink);
            drop(host);
            if args.into == Into::SimDevice {
                uploaded = Some(device.bytes_uploaded());
            }
            (loaded.report, sizes.len(), peak)
        }
    };
    if args.json {
        // The load report, with where the tensors went and the peak memory the load added.
        let encode =
            |e: serde_json::Error| super::CliError::msg(format!("cannot encode the report as JSON: {e}"));
        let mut value = serde_json::to_value(&r).map_err(encode)?;
        if let Some(fields) = value.as_object_mut() {
            let into = serde_json::to_value(args.into).map_err(encode)?;
            fields.insert("into".into(), into);
            fields.insert("peak_extra_bytes".into(), peak.into());
            fields.insert("staging_pool_bytes".into(), config.staging_pool_size.into());
            fields.insert("device_bytes_uploaded".into(), uploaded.into());
        }
        let json = serde_json::to_string_pretty(&value).map_err(encode)?;
        println!("{json}");
        return Ok(());
    }
    print_report(&args, &r, (kind, shards), tensors, peak, config.staging_pool_size);
    Ok(())
}

/// Host memory for an in-place load, as a live model's parameters are: allocated and touched
/// (written) before the load, each tensor starting at its file offset's place in a page
/// (what the allocator of a restart of the program that saved it does again), so that its
/// aligned interior can be read straight into it.
#[derive(Default)]
pub(super) struct PhasedDests {
    /// Name, buffer, where the tensor starts in it, its bytes.
    dests: Vec<(String, Vec<u8>, usize, usize)>,
}

impl PhasedDests {
    /// Destinations for `tensors` (as `inspect` lists them).
    pub(super) fn new<'a>(tensors: impl IntoIterator<Item = &'a TensorInfo>) -> PhasedDests {
        const PAGE: usize = 4096;
        let placed = tensors.into_iter().map(|t| {
            let len = t.bytes as usize;
            let buf = vec![1u8; len + PAGE];
            let phase = (t.offset % PAGE as u64) as usize;
            let at = (phase + PAGE - buf.as_ptr() as usize % PAGE) % PAGE;
            (t.name.clone(), buf, at, len)
        });
        PhasedDests { dests: placed.collect() }
    }

    /// A sink over the destinations, by name.
    pub(super) fn sink(&mut self) -> uring_ckpt::Result<HostSink<'_>> {
        HostSink::new(self.dests.iter_mut().map(|(n, buf, at, len)| (n.clone(), &mut buf[*at..*at + *len])))
    }
}

fn print_report(
    args: &LoadArgs,
    r: &LoadReport,
    (kind, shards): (uring_ckpt::store::CheckpointKind, usize),
    tensors: usize,
    peak: Option<u64>,
    pool: u64,
) {
    let into = match args.into {
        Into::Fresh => "fresh host memory".to_owned(),
        Into::Mapped => "copy-on-write mappings of the shard files".to_owned(),
        Into::Host => "existing host memory, in place".to_owned(),
        Into::SimDevice => format!("a simulated device at {} GiB/s", args.device_gib_s),
    };
    println!("loaded {} into {into}", args.dir.display());
    println!("  kind         {}", kind.describe(shards));
    println!("  tensors      {tensors}");
    println!("  bytes        {} tensor bytes, {} read ({})", r.data_bytes, r.read_bytes, mib(r.read_bytes));
    println!("  time         {:.3} s", r.seconds);
    println!("  throughput   {:.1} MiB/s", r.throughput_mib_s);
    let verified = match (r.verified, kind) {
        (false, _) => "no",
        (true, uring_ckpt::store::CheckpointKind::UringCkpt) => "every tensor's CRC-32",
        (true, _) => "every stored CRC-32 (files not written by uring-ckpt store none; their structure and sizes are checked)",
    };
    println!("  verified     {verified}");
    println!("  engine       {}", engine_line(&r.engine));
    print_fallbacks(&r.engine);
    println!("  read lat.    {}", latency_line(&r.read_latency, None));
    if args.into == Into::Host {
        println!("  zero-copy    {} read straight into the destinations", mib(r.zero_copy_bytes));
    }
    let pages = r.fresh_pages;
    if pages.huge_bytes + pages.small_bytes > 0 {
        // Faulted in ahead of the reads with whichever page size was faster (io/prefault.rs).
        println!(
            "  fresh pages  {} in huge pages, {} in 4 KiB pages",
            mib(pages.huge_bytes),
            mib(pages.small_bytes)
        );
    }
    if let Some(peak) = peak {
        println!("  peak memory  {} over the destinations (staging pool {})", mib(peak), mib(pool));
    }
}

/// The process's resident memory, for the peak a load adds (Linux: `/proc/self`).
mod memory {
    /// Resets the peak resident size to the current one (`clear_refs` 5) and returns the
    /// current one in bytes, or `None` where the kernel does not offer it.
    pub fn reset_peak() -> Option<u64> {
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        status_kib("VmRSS:").map(|k| k * 1024)
    }

    /// The peak resident size since the last reset, in bytes.
    pub fn peak() -> Option<u64> {
        status_kib("VmHWM:").map(|k| k * 1024)
    }

    fn status_kib(key: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
    }
}
