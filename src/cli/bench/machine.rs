//! Where the benchmark runs: kernel, CPUs, memory, and the storage under the directory.

use std::fs;
use std::path::Path;

use serde::Serialize;

use super::storage::Storage;

/// Where the benchmark runs.
#[derive(Debug, Serialize)]
pub(in crate::cli) struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    memory_gib: f64,
    dir: String,
    #[serde(flatten)]
    storage: Storage,
}

impl Machine {
    pub(in crate::cli) fn probe(dir: &Path) -> Machine {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
            .unwrap_or("unknown")
            .to_owned();
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        let canonical = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_gib,
            dir: canonical.display().to_string(),
            storage: Storage::probe(&canonical),
        }
    }

    pub(in crate::cli) fn describe(&self) -> String {
        format!(
            "machine: Linux {}, {} CPU(s) ({}), {:.1} GiB RAM\nstorage: directory {} on {}",
            self.kernel, self.cpus, self.cpu_model, self.memory_gib, self.dir, self.storage.summary
        )
    }
}
