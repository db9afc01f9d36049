//! The scratch directory a benchmark writes into, removed when dropped, and the Ctrl-C
//! handler that lets a run stop between two saves so that the directory still goes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cli::{Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether Ctrl-C was pressed since [`Workspace::create`]. A second Ctrl-C kills at once.
pub(super) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn install_sigint_handler() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_sigint), SaFlags::SA_RESETHAND, SigSet::empty());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and
    // SA_RESETHAND restores the default action so a second Ctrl-C terminates as usual.
    if let Err(e) = unsafe { sigaction(Signal::SIGINT, &action) } {
        log::warn!("cannot install a Ctrl-C handler ({e}); an interrupted run leaves its files");
    }
}

/// A scratch directory `<parent>/.uring-ckpt-<what>-<pid>` that is removed (with everything
/// in it) when dropped, unless asked to keep it. Ctrl-C stops a run between two
/// saves and the directory is removed on the way out.
pub(in crate::cli) struct Workspace {
    dir: PathBuf,
    keep: bool,
    next: std::cell::Cell<u32>,
}

impl Workspace {
    pub(in crate::cli) fn create(parent: Option<&Path>, what: &str, keep: bool) -> Result<Workspace> {
        let parent = parent.unwrap_or(Path::new("."));
        crate::cli::existing_dir(parent)?;
        let dir = parent.join(format!(".uring-ckpt-{what}-{}", std::process::id()));
        // The handler first: a Ctrl-C right after the directory appears must still remove it.
        install_sigint_handler();
        fs::create_dir(&dir).context(|| format!("create scratch directory {}", dir.display()))?;
        Ok(Workspace { dir, keep, next: std::cell::Cell::new(0) })
    }

    /// A new checkpoint path inside the scratch directory.
    pub(super) fn next_path(&self) -> PathBuf {
        let n = self.next.get();
        self.next.set(n + 1);
        self.dir.join(format!("ckpt-{n:04}"))
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}
