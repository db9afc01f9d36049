//! A load into a [`TensorSink`]: the restore path for memory that already exists (a
//! model's parameters, a state dict, device memory).
//!
//! 1. Every shard header is read and checked; the sink is asked about every tensor
//!    ([`TensorSink::open`]) and all mismatches are reported together, before any tensor
//!    byte is read.
//! 2. Per shard, the byte ranges of the wanted tensors are cut into reads of at most one
//!    staging buffer, aligned for direct I/O, and streamed ([`Reader::read_stream`]) into
//!    a fixed set of buffers lent by the [`StagingPool`] (at most 16 MiB of 2 MiB buffers,
//!    [`load_staging`]): the engine keeps its queue depth in flight while copy threads take
//!    each finished buffer, hand every tensor piece in it to the sink with its CRC computed
//!    in the same pass, and give the buffer back.
//! 3. With `zero_copy_loads`, where the sink lends a tensor's host memory
//!    ([`TensorSink::host_memory`]) and that memory sits at the same phase as the tensor's
//!    file offset (modulo the direct-I/O memory alignment: 4 bytes on most NVMe, 512 on
//!    virtio and loop devices), the tensor's aligned interior is read straight into it,
//!    past the staging buffers; a copy thread then only computes its CRC, while the bytes
//!    are still in cache. Its unaligned head and tail (under one block each) go through
//!    staging.
//! 4. The per-piece CRCs are combined per tensor and checked against the shard header.
//!
//! Peak memory is the staging buffers, whatever the checkpoint's size.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use super::shard::{check_weight_map, open_shard, OpenShard, ShardRead};
use super::LoadOptions;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::io::aligned::{round_down_u64, round_up_u64};
use crate::io::pool::{staging_align, Shape};
use crate::io::stream::{Feed, LentSpan, ReadDst, ReadFeed, StreamRead};
use crate::io::{fault_in_spans, open_reader, PoolBuf, Reader, StagingPool};
use crate::report::LoadReport;
use crate::sink::{SinkWriter, TensorMeta, TensorSink};

/// Ranges closer than this are read as one (reading the gap costs less than another read).
const COALESCE_GAP: u64 = 1 << 20;

/// Bytes a tensor's aligned interior needs to be read straight into its destination (below
/// this one read of its own costs more than the copy it saves). Staged reads never join
/// across a direct part, whatever the gap ([`plan_reads`]).
const DIRECT_MIN: u64 = 1 << 20;

/// Copy threads of a load at most (fewer on a machine with fewer cores).
const MAX_COPY_THREADS: usize = 4;

/// Bytes per staging buffer (and per staged read) of a load at most: `chunk_size` when
/// smaller. What the device put in a buffer waits there until a copy thread has moved it
/// on, so smaller buffers are handed on sooner and, few enough ([`LOAD_STAGING_MAX`]), are
/// still in the CPU's last-level cache when the copy thread reads them. A save's chunk
/// stays large: its writes go from tensor memory or from buffers the copy just filled.
const LOAD_CHUNK_MAX: usize = 2 << 20;

/// Staging bytes one load lends at most (`staging_pool_size` when smaller; two buffers at
/// least). In place on the RAM-backed XFS of the README (2-vCPU AMD EPYC, 32 MiB L3), 1 GiB,
/// 8 alternating rounds, medians: 8 x 2 MiB 0.317 s and 4 x 2 MiB 0.302 s, against 0.349 s
/// for the save's 4 x 8 MiB, 0.366 s for 16 x 2 MiB and 0.385 s for 16 x 1 MiB; fio's read
/// 0.331 s. On ext4 (virtio) 8 x 2 MiB was level with 4 x 8 MiB (0.403 against 0.426 s).
const LOAD_STAGING_MAX: usize = 16 << 20;

/// The staging buffers of a load through the pool: their size and how many.
fn load_staging(config: &Config) -> (usize, usize) {
    let chunk = (config.chunk_size as usize).min(LOAD_CHUNK_MAX);
    let bytes = (config.staging_pool_size as usize).min(LOAD_STAGING_MAX);
    (chunk, (bytes / chunk).max(2))
}

/// What a load into a sink did.
#[derive(Debug, Clone)]
pub struct LoadIntoReport {
    /// Bytes, seconds, engine, latency.
    pub report: LoadReport,
    /// Destinations no tensor of the checkpoint went to (empty when `strict`).
    pub missing: Vec<String>,
    /// Tensors of the checkpoint (among those asked for) with no destination, skipped
    /// (empty when `strict`).
    pub unexpected: Vec<String>,
}

/// One tensor going to the sink.
struct Target {
    name: String,
    slot: usize,
    /// `[begin, end)` in the shard file.
    begin: u64,
    end: u64,
    /// The CRC to check, when verifying and the header has one.
    crc: Option<u32>,
    /// The part `[lo, hi)` of the file read straight into the destination, whose host
    /// memory starts at `address` (see [`direct_part`]); the rest goes through staging.
    direct: Option<Direct>,
}

/// A tensor's part read straight into its destination.
#[derive(Debug, Clone, Copy)]
struct Direct {
    lo: u64,
    hi: u64,
    /// The address of the tensor's first byte.
    address: usize,
}

/// One read of a shard: `len` bytes at `offset`, into a staging buffer or (`lent`: the
/// target's index) straight into that target's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Planned {
    offset: u64,
    len: usize,
    lent: Option<usize>,
}

/// A finished read on its way to a copy thread.
struct Filled {
    shard: usize,
    read: StreamRead,
}

/// One tensor piece's CRC: target key, offset in the tensor, bytes, CRC.
type PieceCrc = (usize, u64, u64, crc32fast::Hasher);

/// Loads the checkpoint at `dir` into `sink` through staging buffers lent by `pool`.
///
/// With `strict`, a destination the checkpoint lacks or a tensor (among those asked for)
/// with no destination is a mismatch; without it they are skipped and listed in the report.
/// Any other mismatch (size, dtype, shape) is always an error. Errors of either kind come
/// together in one [`Error::Mismatch`], before any tensor byte is read.
///
/// On a read or CRC error the destinations may hold part of the checkpoint.
pub fn load_into(
    config: &Config,
    pool: &StagingPool,
    dir: &Path,
    options: &LoadOptions,
    strict: bool,
    sink: &dyn TensorSink,
) -> Result<LoadIntoReport> {
    let started = Instant::now();
    let crate::store::Opened { dir: handle, manifest, .. } = crate::store::open_any(dir)?;
    let verify = options.verify.unwrap_or(config.verify_on_load);
    let wanted = super::wanted_names(&manifest, options)?;
    let mut reader = open_reader(config, dir)?;
    let segment = super::segment_len(config);
    let mut shards: Vec<(OpenShard, Vec<Target>)> = Vec::new();
    let (mut problems, mut unexpected) = (Vec::new(), Vec::new());
    let mut read_bytes = 0u64;
    for info in &manifest.shards {
        let shard = open_shard(reader.as_mut(), &handle, info, ShardRead::Header, segment)?;
        check_weight_map(dir, &manifest.weight_map, info, &shard.header)?;
        read_bytes += info.header_len;
        let mut targets = Vec::new();
        for (i, entry) in shard.header.tensors.iter().enumerate() {
            if wanted.as_ref().is_some_and(|w| !w.contains(entry.name.as_str())) {
                continue;
            }
            let meta =
                TensorMeta { name: &entry.name, dtype: entry.dtype, shape: &entry.shape, len: entry.len() };
            match sink.open(&meta) {
                Ok(Some(slot)) => {
                    let begin = shard.header.data_start + entry.data_offsets.0;
                    let end = shard.header.data_start + entry.data_offsets.1;
                    // Buffered reads land anywhere; direct ones need the alignments.
                    let report = reader.report();
                    let (align, mem_align) = if report.direct_io {
                        (report.align as u64, report.mem_align as u64)
                    } else {
                        (1, 1)
                    };
                    let direct = sink
                        .host_memory(slot)
                        .filter(|_| config.zero_copy_loads)
                        .filter(|&(_, len)| len as u64 == end - begin)
                        .and_then(|(ptr, _)| direct_part(begin, end, ptr as usize, align, mem_align));
                    targets.push(Target {
                        name: entry.name.clone(),
                        slot,
                        begin,
                        end,
                        crc: shard.header.crcs[i].filter(|_| verify),
                        direct,
                    })
                }
                Ok(None) => unexpected.push(entry.name.clone()),
                Err(Error::InvalidCheckpoint(problem)) => problems.push(problem),
                Err(other) => return Err(other),
            }
        }
        shards.push((shard, targets));
    }
    let mut missing = sink.unclaimed();
    missing.sort();
    if strict {
        problems.extend(missing.drain(..).map(|name| format!("tensor {name:?} is not in the checkpoint")));
        problems.extend(unexpected.drain(..).map(|name| format!("tensor {name:?} has no destination")));
    }
    if !problems.is_empty() {
        return Err(Error::Mismatch { path: dir.to_path_buf(), problems });
    }
    let zero_copy_bytes: u64 =
        shards.iter().flat_map(|(_, t)| t).filter_map(|t| t.direct).map(|d| d.hi - d.lo).sum();
    let (data_bytes, streamed) = stream_shards(config, pool, reader.as_mut(), &mut shards, sink)?;
    read_bytes += streamed;
    for (shard, _) in &shards {
        reader.close(shard.file);
    }
    Ok(LoadIntoReport {
        report: LoadReport {
            read_latency: reader.stats().percentiles_us(),
            fresh_pages: reader.stats().fresh_pages,
            zero_copy_bytes,
            ..LoadReport::finished(started, data_bytes, read_bytes, verify, reader.report().clone())
        },
        missing,
        unexpected,
    })
}

/// The part of a tensor at `[begin, end)` of the file whose memory starts at `address` that
/// can be read straight into that memory: from the first multiple of `align` (the offset
/// alignment) to the last, when the memory there is `mem_align`-aligned (the tensor sits at
/// the file's phase) and the part holds at least [`DIRECT_MIN`] bytes.
fn direct_part(begin: u64, end: u64, address: usize, align: u64, mem_align: u64) -> Option<Direct> {
    let (lo, hi) = (round_up_u64(begin, align), round_down_u64(end, align));
    let at = (address as u64).checked_add(lo - begin)?;
    (hi >= lo + DIRECT_MIN && at % mem_align.max(1) == 0).then_some(Direct { lo, hi, address })
}

/// The parts of target `t` within `[start, end)` that go through staging: all of it, or
/// what lies outside its direct part.
fn staged_parts(t: &Target, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    let (from, to) = (t.begin.max(start), t.end.min(end));
    let parts = match t.direct {
        None => [(from, to), (0, 0)],
        Some(d) => [(from, to.min(d.lo)), (from.max(d.hi), to)],
    };
    parts.into_iter().filter(|&(a, b)| a < b)
}

/// The reads that cover `targets` (sorted by `begin`), in file order: their direct parts
/// (see [`direct_part`]) as lent reads; the rest as staged reads, ranges closer than
/// [`COALESCE_GAP`] merged, starts aligned down to `align`. All are cut into reads of at
/// most `chunk` bytes (a multiple of `align`); a direct part's ends are multiples of
/// `align` already. The reads never overlap.
fn plan_reads(targets: &[Target], align: u64, chunk: u64) -> VecDeque<Planned> {
    // (start, end, lent target); consecutive staged ranges merged.
    let mut ranges: Vec<(u64, u64, Option<usize>)> = Vec::new();
    let stage = |ranges: &mut Vec<(u64, u64, Option<usize>)>, (from, to): (u64, u64)| {
        let start = round_down_u64(from, align);
        match ranges.last_mut() {
            Some(last) if last.2.is_none() && start <= last.1 + COALESCE_GAP => last.1 = last.1.max(to),
            _ => ranges.push((start, to, None)),
        }
    };
    for (i, t) in targets.iter().enumerate().filter(|(_, t)| t.end > t.begin) {
        match t.direct {
            None => stage(&mut ranges, (t.begin, t.end)),
            Some(d) => {
                if t.begin < d.lo {
                    stage(&mut ranges, (t.begin, d.lo));
                }
                ranges.push((d.lo, d.hi, Some(i)));
                if d.hi < t.end {
                    stage(&mut ranges, (d.hi, t.end));
                }
            }
        }
    }
    let mut reads = VecDeque::new();
    for (mut at, end, lent) in ranges {
        while at < end {
            let n = chunk.min(end - at);
            reads.push_back(Planned { offset: at, len: n as usize, lent });
            at += n;
        }
    }
    reads
}

/// Streams every shard's reads through the staging buffers to the copy threads; returns
/// the tensor bytes delivered and the bytes read.
fn stream_shards(
    config: &Config,
    pool: &StagingPool,
    reader: &mut dyn Reader,
    shards: &mut [(OpenShard, Vec<Target>)],
    sink: &dyn TensorSink,
) -> Result<(u64, u64)> {
    let report = reader.report();
    let align = report.align as u64;
    let (chunk, buffers) = load_staging(config);
    let shape = Shape { chunk, align: staging_align(report.align, report.mem_align) };
    for (_, targets) in shards.iter_mut() {
        targets.sort_by_key(|t| t.begin);
    }
    let data_bytes: u64 = shards.iter().flat_map(|(_, t)| t).map(|t| t.end - t.begin).sum();
    let plans: Vec<VecDeque<Planned>> =
        shards.iter().map(|(_, targets)| plan_reads(targets, align, chunk as u64)).collect();
    let read_bytes: u64 = plans.iter().flatten().map(|r| r.len as u64).sum();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_COPY_THREADS);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |err: Error| {
        failed.store(true, Ordering::Release);
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(err);
    };
    let shards_ro: &[(OpenShard, Vec<Target>)] = shards;
    let (work_tx, work_rx) = mpsc::channel::<Filled>();
    let work_rx = Mutex::new(work_rx);
    let (back_tx, back_rx) = mpsc::channel::<PoolBuf>();
    let stop_faulting = AtomicBool::new(false);
    let crcs: Vec<PieceCrc> = std::thread::scope(|scope| {
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (work_rx, back_tx, fail, failed) = (&work_rx, back_tx.clone(), &fail, &failed);
            let spawned = std::thread::Builder::new()
                .name(format!("uring-ckpt-load-copy-{i}"))
                .spawn_scoped(scope, move || copy_worker(sink, shards_ro, work_rx, &back_tx, failed, fail));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) if workers.is_empty() => fail(Error::io("spawn a load copy thread", "(thread)", e)),
                Err(_) => break, // fewer copy threads
            }
        }
        drop(back_tx);
        if !workers.is_empty() {
            let idle = pool.lend(shape, buffers);
            // The buffers in the order the feed takes them (from the end), faulted in ahead
            // on a helper while the first reads run (a no-op walk for buffers used before).
            let spans: Vec<(usize, usize)> =
                idle.iter().rev().map(|b| (b.as_ptr() as usize, b.capacity())).collect();
            let stop_faulting = &stop_faulting;
            // SAFETY: the spans are the lent buffers. Until the helper is joined below, each
            // is held by the feed, a read in flight, the work channel or a copy thread, which
            // sends it back to the feed; none goes back to the pool (which may free it)
            // before the feed is dropped, after that join.
            let faulting = std::thread::Builder::new()
                .name("uring-ckpt-load-prefault".into())
                .spawn_scoped(scope, move || unsafe { fault_in_spans(&spans, stop_faulting) })
                .ok();
            let mut feed = PoolFeed {
                idle,
                back: back_rx,
                work: work_tx,
                reads: VecDeque::new(),
                targets: &[],
                shard: 0,
                failed: &failed,
            };
            for (i, plan) in plans.into_iter().enumerate() {
                if plan.is_empty() {
                    continue;
                }
                (feed.shard, feed.reads, feed.targets) = (i, plan, &shards_ro[i].1);
                if let Err(err) = reader.read_stream(shards_ro[i].0.file, &mut feed) {
                    fail(err);
                    break;
                }
            }
            stop_faulting.store(true, Ordering::Relaxed);
            if let Some(helper) = faulting {
                let _ = helper.join();
            }
            drop(feed); // closes the work channel: the copy threads finish
        }
        let mut crcs = Vec::new();
        for worker in workers {
            match worker.join() {
                Ok(mut part) => crcs.append(&mut part),
                Err(_) => fail(Error::Internal("a load copy thread panicked".into())),
            }
        }
        crcs
    });
    if let Some(err) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    check_crcs(shards_ro, crcs)?;
    Ok((data_bytes, read_bytes))
}

/// The reader's end: reads of the current shard into the buffers (or lent memory),
/// finished ones to the copy threads, buffers back from them.
struct PoolFeed<'a> {
    idle: Vec<PoolBuf>,
    back: mpsc::Receiver<PoolBuf>,
    work: mpsc::Sender<Filled>,
    reads: VecDeque<Planned>,
    /// The current shard's targets (what lent reads land in).
    targets: &'a [Target],
    shard: usize,
    failed: &'a AtomicBool,
}

impl PoolFeed<'_> {
    fn stopped() -> Error {
        Error::Internal("the load's copy threads stopped".into())
    }
}

impl ReadFeed for PoolFeed<'_> {
    fn next(&mut self, wait: bool) -> Result<Feed> {
        if self.failed.load(Ordering::Acquire) {
            return Err(PoolFeed::stopped());
        }
        let Some(&Planned { offset, len, lent }) = self.reads.front() else {
            return Ok(Feed::End);
        };
        if let Some(i) = lent {
            let t = &self.targets[i];
            let address = t.direct.map(|d| d.address).expect("a lent read's target has a direct part");
            self.reads.pop_front();
            // SAFETY: `offset..offset + len` lies in the target's direct part, inside
            // `[begin, end)`, and its destination holds exactly `end - begin` bytes (checked
            // when the part was chosen), so the span lies in the destination, which the sink
            // lends to this load alone (`TensorSink::host_memory`). The reads never overlap
            // and the copy threads never write a direct part (`staged_parts`), so nothing
            // else writes the span; they read it only after the read is handed back.
            let span = unsafe { LentSpan::new((address + (offset - t.begin) as usize) as *mut u8, len) };
            return Ok(Feed::Read(StreamRead { dst: ReadDst::Lent(span), offset, len, tag: i }));
        }
        let buf = match self.idle.pop() {
            Some(buf) => buf,
            None => match self.back.try_recv() {
                Ok(buf) => buf,
                Err(mpsc::TryRecvError::Empty) if !wait => return Ok(Feed::NotNow),
                Err(mpsc::TryRecvError::Empty) => self.back.recv().map_err(|_| PoolFeed::stopped())?,
                Err(mpsc::TryRecvError::Disconnected) => return Err(PoolFeed::stopped()),
            },
        };
        self.reads.pop_front();
        Ok(Feed::Read(StreamRead { dst: ReadDst::Staged(buf), offset, len, tag: 0 }))
    }

    fn done(&mut self, read: StreamRead) -> Result<()> {
        self.work.send(Filled { shard: self.shard, read }).map_err(|_| PoolFeed::stopped())
    }
}

/// A copy thread: hands every tensor piece of each finished read to the sink with its CRC,
/// flushes, and gives the buffer back. After a failure (its own or another thread's) it
/// only gives buffers back, so the reader never waits for one in vain.
fn copy_worker(
    sink: &dyn TensorSink,
    shards: &[(OpenShard, Vec<Target>)],
    work: &Mutex<mpsc::Receiver<Filled>>,
    back: &mpsc::Sender<PoolBuf>,
    failed: &AtomicBool,
    fail: &(dyn Fn(Error) + Sync),
) -> Vec<PieceCrc> {
    let mut crcs = Vec::new();
    let mut writer = match sink.writer() {
        Ok(writer) => Some(writer),
        Err(err) => {
            fail(err);
            None
        }
    };
    loop {
        let next = work.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(Filled { shard, read }) = next else { break };
        let StreamRead { dst, offset, len, tag } = read;
        match dst {
            ReadDst::Lent(span) => {
                let t = &shards[shard].1[tag];
                if t.crc.is_some() && !failed.load(Ordering::Acquire) {
                    let mut crc = crc32fast::Hasher::new();
                    crc.update(span.as_slice());
                    crcs.push((target_key(shard, tag), offset - t.begin, len as u64, crc));
                }
            }
            ReadDst::Staged(buf) => {
                if let Some(w) = writer.as_mut().filter(|_| !failed.load(Ordering::Acquire)) {
                    if let Err(err) =
                        copy_read(w.as_mut(), shard, &shards[shard].1, offset, &buf, len, &mut crcs)
                    {
                        // No copy may still read the buffer when it goes back.
                        let _ = w.flush();
                        fail(err);
                    }
                }
                // The reader may have stopped: then the buffer simply goes back to the pool.
                let _ = back.send(buf);
            }
        }
    }
    crcs
}

/// Hands the staged pieces of `targets` that lie in the `len` bytes read at `offset` into
/// `buf` to the sink, then waits until it no longer reads the buffer.
fn copy_read(
    writer: &mut dyn SinkWriter,
    shard: usize,
    targets: &[Target],
    offset: u64,
    buf: &PoolBuf,
    len: usize,
    crcs: &mut Vec<PieceCrc>,
) -> Result<()> {
    let (start, end) = (offset, offset + len as u64);
    let first = targets.partition_point(|t| t.end <= start);
    for (i, t) in targets.iter().enumerate().skip(first) {
        if t.begin >= end {
            break;
        }
        for (from, to) in staged_parts(t, start, end) {
            let bytes = &buf.as_full_slice()[(from - start) as usize..(to - start) as usize];
            let mut crc = t.crc.map(|_| crc32fast::Hasher::new());
            writer.write(t.slot, from - t.begin, bytes, crc.as_mut())?;
            if let Some(crc) = crc {
                crcs.push((target_key(shard, i), from - t.begin, to - from, crc));
            }
        }
    }
    writer.flush()
}

/// A target's index across shards, for the CRC pieces (shard in the high bits).
fn target_key(shard: usize, index: usize) -> usize {
    (shard << 32) | index
}

/// Combines each tensor's piece CRCs in order and checks them against its header's.
fn check_crcs(shards: &[(OpenShard, Vec<Target>)], mut crcs: Vec<PieceCrc>) -> Result<()> {
    crcs.sort_by_key(|&(key, at, _, _)| (key, at));
    let mut pieces = crcs.into_iter().peekable();
    for (s, (shard, targets)) in shards.iter().enumerate() {
        for (i, t) in targets.iter().enumerate() {
            let Some(expected) = t.crc else { continue };
            let (mut whole, mut covered) = (crc32fast::Hasher::new(), 0u64);
            while let Some((_, at, len, part)) = pieces.next_if(|&(key, ..)| key == target_key(s, i)) {
                if at != covered {
                    return Err(Error::Internal(format!(
                        "tensor {:?}: a piece at {at}, expected {covered}",
                        t.name
                    )));
                }
                whole.combine(&part);
                covered += len;
            }
            if covered != t.end - t.begin {
                return Err(Error::Internal(format!(
                    "tensor {:?}: {covered} of {} bytes copied",
                    t.name,
                    t.end - t.begin
                )));
            }
            let actual = whole.finalize();
            if actual != expected {
                return Err(Error::Crc {
                    path: shard.path.clone(),
                    tensor: t.name.clone(),
                    expected,
                    actual,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn target(begin: u64, end: u64, address: Option<usize>, align: u64, mem_align: u64) -> Target {
        Target {
            name: format!("t{begin}"),
            slot: 0,
            begin,
            end,
            crc: None,
            direct: address.and_then(|a| direct_part(begin, end, a, align, mem_align)),
        }
    }

    /// Every byte of every target is covered exactly once: by a lent read of its own direct
    /// part, or by staged reads (which never overlap each other or a direct part).
    fn check_cover(targets: &[Target], reads: &VecDeque<Planned>, align: u64, chunk: u64) {
        let mut spans: Vec<(u64, u64)> = reads.iter().map(|r| (r.offset, r.offset + r.len as u64)).collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "reads overlap: {spans:?}");
        for r in reads {
            assert!(r.offset % align == 0 && r.len as u64 <= chunk, "{r:?}");
            match r.lent {
                Some(i) => {
                    let d = targets[i].direct.expect("a lent read's target is direct");
                    assert!(d.lo <= r.offset && r.offset + r.len as u64 <= d.hi, "{r:?} outside {d:?}");
                    assert_eq!(r.len as u64 % align, 0, "{r:?}");
                }
                None => assert!(targets
                    .iter()
                    .filter_map(|t| t.direct)
                    .all(|d| { r.offset + r.len as u64 <= d.lo || r.offset >= d.hi })),
            }
        }
        for (i, t) in targets.iter().enumerate() {
            let mut covered = 0;
            for r in reads {
                let (s, e) = (r.offset, r.offset + r.len as u64);
                let parts: Vec<(u64, u64)> = match r.lent {
                    Some(j) if j == i => vec![(s, e)],
                    Some(_) => vec![],
                    None => staged_parts(t, s, e).collect(),
                };
                covered += parts.iter().map(|(a, b)| b - a).sum::<u64>();
            }
            assert_eq!(covered, t.end - t.begin, "target {i}: {t:?}", t = (t.begin, t.end, t.direct));
        }
    }

    #[test]
    fn a_tensor_at_the_files_phase_gets_its_aligned_interior_read_directly() {
        let (align, mem) = (512, 512);
        // File offset 4096 + 64, memory 64 bytes past a page: the same phase.
        let d = direct_part(4160, 4160 + 3 * MIB + 100, 0x7000_0040, align, mem).expect("direct");
        assert_eq!((d.lo, d.hi), (4608, round_down_u64(4160 + 3 * MIB + 100, 512)));
        // Another phase (memory 16 past a page), or too small: none.
        assert!(direct_part(4160, 4160 + 3 * MIB, 0x7000_0010, align, mem).is_none());
        assert!(direct_part(4160, 4160 + MIB, 0x7000_0040, align, mem).is_none());
        // A memory alignment of 4 (NVMe) takes any 4-byte-aligned phase.
        assert!(direct_part(4160, 4160 + 3 * MIB, 0x7000_0010, align, 4).is_some());
        // Buffered reads (alignments of 1): the whole tensor.
        let d = direct_part(4161, 4161 + 3 * MIB, 0x7000_0003, 1, 1).expect("buffered");
        assert_eq!((d.lo, d.hi), (4161, 4161 + 3 * MIB));
    }

    #[test]
    fn planned_reads_cover_every_byte_once_with_direct_parts_lent() {
        let (align, chunk) = (512u64, 4 * MIB);
        let base = 0x7f00_0000_0000usize;
        let mut targets = Vec::new();
        let mut at = 4096 + 64;
        // Direct, staged (off phase), small, direct again, an empty one, a long direct one, a
        // direct one closer than the coalescing gap to its neighbours' staged ends, small.
        for (len, phase_ok) in [
            (3 * MIB + 7, true),
            (5 * MIB, false),
            (1000, true),
            (2 * MIB + 600, true),
            (0, true),
            (11 * MIB + 1, true),
            (MIB + 1500, true),
            (3000, true),
        ] {
            let address = base + (at % 4096) as usize + if phase_ok { 0 } else { 8 };
            targets.push(target(at, at + len, Some(address), align, 512));
            at += len;
        }
        assert!(targets[0].direct.is_some() && targets[1].direct.is_none() && targets[2].direct.is_none());
        assert!(targets[3].direct.is_some() && targets[5].direct.is_some() && targets[6].direct.is_some());
        let reads = plan_reads(&targets, align, chunk);
        assert!(reads.iter().filter(|r| r.lent.is_some()).count() >= 5, "{reads:?}");
        check_cover(&targets, &reads, align, chunk);
        // With no lent memory at all the plan is staged reads only, covering the same bytes.
        let staged: Vec<Target> = targets.iter().map(|t| target(t.begin, t.end, None, align, 512)).collect();
        let reads = plan_reads(&staged, align, chunk);
        assert!(reads.iter().all(|r| r.lent.is_none()));
        check_cover(&staged, &reads, align, chunk);
    }

    #[test]
    fn a_load_stages_through_at_most_16_mib_of_2_mib_buffers_and_at_least_two() {
        let config = |chunk: u64, pool: u64| {
            Config::builder().chunk_size(chunk).staging_pool_size(pool).build().expect("config")
        };
        assert_eq!(load_staging(&Config::default()), (2 * MIB as usize, 8), "8 MiB chunks, 32 MiB pool");
        assert_eq!(load_staging(&config(8 * MIB, 8 * MIB * 64)), (2 * MIB as usize, 8), "a large pool");
        assert_eq!(load_staging(&config(8 * MIB, 16 * MIB)), (2 * MIB as usize, 8));
        assert_eq!(load_staging(&config(64 * 1024, 256 * 1024)), (64 * 1024, 4), "small chunks are kept");
        assert_eq!(load_staging(&config(MIB, 2 * MIB)), (MIB as usize, 2), "double buffering");
    }
}
