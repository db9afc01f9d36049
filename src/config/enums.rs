//! The keyword settings of [`Config`](super::Config), each declared once with its names (see
//! `config_enum!`).

config_enum! {
    /// Which I/O engine writes and reads shard files.
    pub enum EngineKind("engine") {
        /// io_uring, falling back to `Pwrite` and then `Buffered` when it is unavailable.
        #[default]
        Auto = "auto",
        /// io_uring only (an error where it is unavailable).
        Uring = "uring" | "io_uring",
        /// A thread pool of `pwrite`/`pread` calls (`io_threads` threads).
        Pwrite = "pwrite",
        /// `std::fs` buffered I/O, the baseline.
        Buffered = "buffered",
    }
}

config_enum! {
    /// How a shard is made durable before the checkpoint is committed.
    pub enum FsyncPolicy("fsync policy") {
        /// `fdatasync` each shard (data and the metadata needed to read it back).
        #[default]
        Fdatasync = "fdatasync",
        /// `fsync` each shard (data and all metadata).
        Fsync = "fsync",
        /// Never sync. **Unsafe for real checkpoints**: a crash or power loss after the
        /// "commit" can leave a checkpoint that is torn or missing. For benchmarks of the
        /// write path only.
        Never = "never",
    }
}

config_enum! {
    /// How [`AsyncCheckpointIO`](crate::AsyncCheckpointIO) takes the bytes from the sources.
    pub enum AsyncMode("async mode") {
        /// Through the bounded staging ring: memory is the staging pool, and the sources are
        /// released ("staged") once their last chunk is in the ring.
        #[default]
        Stream = "stream",
        /// Copy the whole checkpoint into (reused) host memory first, release the sources,
        /// then write from that copy: the shortest stall, memory the size of the checkpoint
        /// per save in flight (as `torch.distributed.checkpoint.async_save` does).
        Snapshot = "snapshot",
    }
}

config_enum! {
    /// What a save does when another save of the same checkpoint path holds the lock (see
    /// [`crate::lock`]).
    pub enum LockMode("lock mode") {
        /// Fail at once with [`Error::Locked`](crate::error::Error::Locked), which names the
        /// lock file. The default: two trainers writing one path is a bug to report, not to
        /// hide.
        #[default]
        Fail = "fail",
        /// Wait until the other save finishes, then save.
        Wait = "wait",
    }
}

/// `"a"`, `"a or b"`, `"a, b or c"`: the names an error message offers.
pub(super) fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_list_the_names() {
        assert_eq!(
            EngineKind::parse("spdk"),
            Err("unknown engine \"spdk\"; expected auto, uring, pwrite or buffered".to_owned())
        );
        assert_eq!(
            FsyncPolicy::parse("x"),
            Err("unknown fsync policy \"x\"; expected fdatasync, fsync or never".to_owned())
        );
        assert_eq!(
            AsyncMode::parse("x"),
            Err("unknown async mode \"x\"; expected stream or snapshot".to_owned())
        );
        assert_eq!(LockMode::parse("x"), Err("unknown lock mode \"x\"; expected fail or wait".to_owned()));
        assert_eq!(one_of(&["a"]), "a");
    }

    #[test]
    fn serde_is_exact_and_aliases_work() {
        #[derive(Debug, serde::Deserialize)]
        struct Doc {
            engine: EngineKind,
        }
        let doc: Doc = toml::from_str("engine = \"io_uring\"").expect("alias");
        assert_eq!(doc.engine, EngineKind::Uring);
        let err = toml::from_str::<Doc>("engine = \"URING\"").expect_err("case matters in TOML");
        assert!(
            err.to_string()
                .contains("unknown variant `URING`, expected one of `auto`, `uring`, `pwrite`, `buffered`"),
            "{err}"
        );
        assert_eq!(toml::Value::try_from(LockMode::Wait).expect("serializes"), toml::Value::from("wait"));
    }
}
