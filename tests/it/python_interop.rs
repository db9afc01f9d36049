//! Shards written by every engine load with the upstream Python `safetensors` package,
//! byte-identical to the source, with `zlib.crc32` equal to the stored CRC. The venv is
//! created under the repository by `scripts/python-env.sh` (numpy + safetensors from PyPI).
//! Set URING_CKPT_SKIP_PYTHON=1 to skip on a machine without Python or the package index.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bytes, scratch, small_config, ENGINES};
use uring_ckpt::format::Dtype;
use uring_ckpt::{Checkpoint, CheckpointIO, UringCheckpointIO};

fn venv_python() -> Option<PathBuf> {
    if std::env::var_os("URING_CKPT_SKIP_PYTHON").is_some() {
        println!("skipped: URING_CKPT_SKIP_PYTHON is set");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-env.sh");
    let out = Command::new("bash").arg(&script).output().expect("run scripts/python-env.sh");
    assert!(out.status.success(), "python-env.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

struct Source {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn sources() -> Vec<Source> {
    let mut out = Vec::new();
    for (i, &dtype) in Dtype::ALL.iter().enumerate() {
        for (j, shape) in [vec![], vec![0], vec![1], vec![7, 13], vec![1000, 1003]].into_iter().enumerate() {
            let Some(len) = dtype.byte_len(&shape) else { continue };
            if dtype.bits() % 8 != 0 {
                continue; // sub-byte dtypes: whole bytes only for even counts, skipped here
            }
            let mut data = bytes((i * 10 + j) as u64, len as usize);
            if dtype == Dtype::Bool {
                data.iter_mut().for_each(|b| *b &= 1); // numpy bools must be 0 or 1
            }
            out.push(Source { name: format!("{}.{j}", dtype.as_str().to_lowercase()), dtype, shape, data });
        }
    }
    out
}

fn write_expected(dir: &Path, sources: &[Source]) {
    fs::create_dir_all(dir).expect("mkdir");
    let mut index = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let file = format!("{i}.bin");
        fs::write(dir.join(&file), &s.data).expect("write expected");
        index.push(
            serde_json::json!({"name": s.name, "dtype": s.dtype.as_str(), "shape": s.shape, "file": file}),
        );
    }
    fs::write(dir.join("index.json"), serde_json::json!({ "tensors": index }).to_string()).expect("index");
}

#[test]
fn upstream_safetensors_loads_every_engines_shards() {
    let Some(python) = venv_python() else { return };
    let dir = scratch();
    let sources = sources();
    let expected = dir.path().join("expected");
    write_expected(&expected, &sources);
    let mut ck = Checkpoint::new();
    for s in &sources {
        ck.add(s.name.clone(), s.dtype, &s.shape, &s.data).expect("tensor");
    }
    for engine in ENGINES {
        let mut config = small_config(engine);
        config.max_shard_size = 1 << 20; // several shards, some of numpy dtypes only
        let path = dir.path().join(engine.as_str());
        UringCheckpointIO::new(config).expect("config").save_checkpoint(&ck, &path).expect("save");
        let checker = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_shards.py");
        let out = Command::new(&python).arg(&checker).arg(&path).arg(&expected).output().expect("run python");
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{engine}: {stdout}");
        assert!(out.status.success(), "{engine}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(&format!("{} passed, 0 failed", sources.len())), "{stdout}");
        assert!(!stdout.contains("checked 0 tensors through"), "load_file must have run: {stdout}");
    }
}

#[test]
fn upstream_safetensors_loads_shards_whose_data_region_has_a_phase() {
    let Some(python) = venv_python() else { return };
    let dir = scratch();
    // Tensors 64 bytes past a page, as torch allocates them: the data region follows.
    let shapes: [(Dtype, Vec<u64>); 5] = [
        (Dtype::F32, vec![256, 1024]),
        (Dtype::BF16, vec![512, 512]),
        (Dtype::I64, vec![7, 13]),
        (Dtype::F16, vec![0]),
        (Dtype::U8, vec![300_001]),
    ];
    let mut sources = Vec::new();
    let mut starts = Vec::new();
    let mut at = 0usize;
    for (i, (dtype, shape)) in shapes.iter().enumerate() {
        let len = dtype.byte_len(shape).expect("size") as usize;
        let start = at.next_multiple_of(4096) + 64;
        sources.push(Source {
            name: format!("t{i}"),
            dtype: *dtype,
            shape: shape.clone(),
            data: bytes(i as u64, len),
        });
        starts.push(start);
        at = start + len;
    }
    let mut arena = uring_ckpt::io::AlignedBuf::zeroed(at.next_multiple_of(4096), 4096);
    arena.set_len(at.next_multiple_of(4096));
    for (s, &start) in sources.iter().zip(&starts) {
        arena[start..start + s.data.len()].copy_from_slice(&s.data);
    }
    let expected = dir.path().join("expected");
    write_expected(&expected, &sources);
    let mut ck = Checkpoint::new();
    for (s, &start) in sources.iter().zip(&starts) {
        ck.add(s.name.clone(), s.dtype, &s.shape, &arena[start..start + s.data.len()]).expect("tensor");
    }
    for engine in ENGINES {
        let path = dir.path().join(engine.as_str());
        let io = UringCheckpointIO::new(small_config(engine)).expect("config");
        let report = io.save_checkpoint(&ck, &path).expect("save");
        if report.engine.direct_io {
            let align = (report.engine.align as u64).max(4096);
            assert!(report.zero_copy_bytes >= (3 << 19) - 2 * align, "{engine}: {report:?}");
        }
        let checker = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_shards.py");
        let out = Command::new(&python)
            .arg(&checker)
            .arg(&path)
            .arg(&expected)
            .arg("64")
            .output()
            .expect("run python");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{engine}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(&format!("{} passed, 0 failed", sources.len())), "{stdout}");
    }
}
