//! Transparent huge pages or small pages for the snapshot area: first touch (faulting in
//! with `MADV_POPULATE_WRITE`, as a reservation does, and by a copy into fresh memory, as a
//! first save without one does), copies into an area already faulted in (later saves), and
//! a durable save written from the area (zero-copy O_DIRECT writes pin its pages).
//!
//! ```text
//! cargo run --release --example snapshot_pages -- --size 1GiB --dir DIR [--repeat 3]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use uring_ckpt::config::{format_size, parse_size, Config};
use uring_ckpt::format::Dtype;
use uring_ckpt::io::AlignedBuf;
use uring_ckpt::{Checkpoint, CheckpointIO, UringCheckpointIO};

struct Args {
    size: usize,
    dir: PathBuf,
    repeat: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { size: 1 << 30, dir: PathBuf::from("bench-out"), repeat: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => args.size = parse_size(&value()?).map_err(|e| e.to_string())? as usize,
            "--dir" => args.dir = PathBuf::from(value()?),
            "--repeat" => args.repeat = value()?.parse().map_err(|e| format!("--repeat: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn area(size: usize, huge: bool) -> AlignedBuf {
    if huge {
        AlignedBuf::zeroed(size, 4096)
    } else {
        AlignedBuf::zeroed_pages(size, 4096)
    }
}

/// Faults `buf` in with MADV_POPULATE_WRITE in 2 MiB steps, as a reservation does.
fn populate(buf: &mut AlignedBuf) -> Result<(), String> {
    let start = buf.as_mut_ptr() as usize;
    let len = buf.capacity();
    let step = 2 << 20;
    let mut at = 0;
    while at < len {
        let n = step.min(len - at);
        // SAFETY: the range lies in `buf`'s mapping; POPULATE_WRITE changes no byte.
        let rc = unsafe { libc::madvise((start + at) as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(format!("MADV_POPULATE_WRITE refused: {}", std::io::Error::last_os_error()));
        }
        at += n;
    }
    Ok(())
}

/// Copies `src` into `dst` on up to four threads (one per core), as a snapshot does.
fn copy(dst: &mut [u8], src: &[u8]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    let piece = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(piece).zip(src.chunks(piece)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
}

fn seconds(f: impl FnOnce()) -> f64 {
    let started = Instant::now();
    f();
    started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gib_s(bytes: usize, s: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / s
}

fn remove(io: &UringCheckpointIO, path: &Path) {
    if path.exists() {
        if let Err(e) = io.remove_checkpoint(path) {
            eprintln!("cannot remove {}: {e}", path.display());
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let size = args.size.next_multiple_of(4096);
    std::fs::create_dir_all(&args.dir)?;
    let src: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31)).collect();
    let io = UringCheckpointIO::new(Config::load(None)?)?;
    println!("area {} ; median of {} runs; GiB/s (seconds)", format_size(size as u64), args.repeat);
    println!(
        "{:<7} {:>18} {:>18} {:>18} {:>18}",
        "pages", "populate", "copy into fresh", "copy into faulted", "save from area"
    );
    for huge in [true, false] {
        let (mut populate_s, mut fresh_s, mut warm_s, mut save_s) = (vec![], vec![], vec![], vec![]);
        for run in 0..args.repeat {
            let mut buf = area(size, huge);
            populate_s.push(seconds(|| populate(&mut buf).expect("populate")));
            drop(buf);
            let mut buf = area(size, huge);
            fresh_s.push(seconds(|| copy(buf.as_full_mut_slice(), &src)));
            warm_s.push(seconds(|| copy(buf.as_full_mut_slice(), &src)));
            buf.set_len(size);
            let tensor = 64 << 20;
            let mut ck = Checkpoint::new();
            for (i, piece) in buf.chunks(tensor).enumerate() {
                ck.add(format!("t{i:04}"), Dtype::U8, &[piece.len() as u64], piece)?;
            }
            let path = args.dir.join(format!("pages-{}-{run}", if huge { "huge" } else { "small" }));
            remove(&io, &path);
            save_s.push(io.save_checkpoint(&ck, &path)?.seconds);
            remove(&io, &path);
        }
        let cell = |s: f64| format!("{:.2} ({:.3}s)", gib_s(size, s), s);
        println!(
            "{:<7} {:>18} {:>18} {:>18} {:>18}",
            if huge { "huge" } else { "small" },
            cell(median(populate_s)),
            cell(median(fresh_s)),
            cell(median(warm_s)),
            cell(median(save_s))
        );
    }
    Ok(())
}
