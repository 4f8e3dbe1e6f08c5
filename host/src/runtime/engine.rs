//! The wasmtime engine: its configuration (deterministic, interruptible)
//! and the on-disk cache of compiled modules.

use std::collections::HashMap;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, Module};

/// How often the epoch advances. CPU limits are counted in these ticks, and
/// a running guest yields to other tasks at least this often.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

const CACHE_MAGIC: &[u8; 8] = b"CAIRNCW2";

/// Where compiled modules are cached, and the secret that authenticates
/// them: a `.cwasm` runs as native code, and anyone who can write the
/// directory (a workflow granted it, say) could otherwise plant one with a
/// matching plain checksum. The key lives in the database, not in the cache.
#[derive(Clone)]
pub struct ModuleCache {
    pub dir: PathBuf,
    pub key: [u8; 32],
}

/// HMAC-SHA-256 (RFC 2104) of `data` under `key`.
fn hmac(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
    let (mut inner, mut outer) = ([0x36u8; 64], [0x5cu8; 64]);
    for (i, k) in key.iter().enumerate() {
        inner[i] ^= k;
        outer[i] ^= k;
    }
    let inner_hash = Sha256::new().chain_update(inner).chain_update(data).finalize();
    Sha256::new().chain_update(outer).chain_update(inner_hash).finalize().into()
}

/// Pool slots of `cairn worker`'s engine: live instances at once (runs
/// executing, their branches, retries). Address space only: each slot
/// reserves its 4 GiB of linear memory, none of it resident until used.
pub const WORKER_POOL: u32 = 1024;

/// Bytes of each pooled table slot zeroed in place instead of released.
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// The engine and everything built once per process.
pub struct WasmEngine {
    engine: Engine,
    cache: Option<ModuleCache>,
    ticker_stop: Arc<AtomicBool>,
    /// Modules loaded by this process, by hash: every run of a module
    /// shares one copy of its code.
    loaded: Mutex<HashMap<String, Module>>,
}

impl WasmEngine {
    pub fn new(cache: Option<ModuleCache>) -> Result<Self> {
        Self::build(cache, None)
    }

    /// An engine whose instances come from a pool of `instances`
    /// pre-reserved slots: for hosts that create and drop many instances
    /// (`cairn worker`), where one mmap/munmap per instance, and the TLB
    /// shootdowns they cause, dominate. A foreground `cairn run` is faster
    /// without (no pool to set up).
    pub fn pooled(cache: Option<ModuleCache>, instances: u32) -> Result<Self> {
        Self::build(cache, Some(instances))
    }

    fn build(cache: Option<ModuleCache>, pool: Option<u32>) -> Result<Self> {
        let mut config = Config::new();
        // A history must replay the same on any CPU.
        config.cranelift_nan_canonicalization(true);
        config.relaxed_simd_deterministic(true);
        // CPU limits and fair sharing of worker threads (see executor).
        config.epoch_interruption(true);
        // One memory per instance: the memory limit is then the instance's.
        config.wasm_multi_memory(false);
        // CAIRN_PERFMAP=1: name guest functions for `perf` (/tmp/perf-PID.map).
        if std::env::var_os("CAIRN_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if let Some(n) = pool {
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_core_instances(n)
                .total_memories(n)
                .total_tables(n)
                .total_stacks(n)
                .max_memory_size(4 << 30)
                // Return memory in batches: one round of TLB shootdowns for
                // many slots.
                .decommit_batch_size(64);
            // A slot's table stays resident and is zeroed in place (its
            // entries are then filled lazily, on first use): releasing it
            // made every instance fault it back in, and filling all of it up
            // front resolved every function of the module (a registry lookup
            // each) where a run calls a handful indirectly. Tables are small
            // (8 bytes an entry); only the part in use is zeroed.
            pool.table_keep_resident(TABLE_KEEP_RESIDENT);
            // Data segments are mapped copy-on-write from the module's
            // memory image (Wasmtime's default): a run need not touch every
            // page of its data (11 in a typical guest). With two executor threads,
            // copying them up front had been about 5% faster (each
            // copy-on-write fault also flushed the other core's TLB); with
            // one executor thread per core but one, the image is 3-8% faster.
            // Not used: keeping a slot's touched linear-memory pages resident
            // and resetting them in place (`linear_memory_keep_resident` with
            // `pagemap_scan`). It saves the next instance its page faults (a
            // quarter of W2's CPU here), but Wasmtime 48 resets only the dirty
            // pages that are present: one the kernel swapped out is neither
            // reset nor released, so the next instance in the slot would read
            // the previous run's memory (bytecodealliance/wasmtime#14357).
            // Worth turning on once a Wasmtime release resets swapped pages
            // too. Without `pagemap_scan` the option zeroes memory from
            // address 0, and Rust guests put their 1 MiB stack there: a run
            // touches about 13 pages, and zeroing 1.1 MiB per instance cost
            // far more (+135 µs a run) than faulting them.
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("wasmtime configuration: {e}"))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), ticker_stop.clone());
        thread::Builder::new().name("cairn-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;
        Ok(WasmEngine { engine, cache, ticker_stop, loaded: Mutex::default() })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A module this process has loaded already, by hash.
    pub fn loaded(&self, hash: &str) -> Option<Module> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()
    }

    /// A module by hash: from the compiled cache when possible, otherwise
    /// compiled from `bytes()` and cached for next time.
    pub fn load(&self, hash: &str, bytes: impl FnOnce() -> Result<Vec<u8>>) -> Result<Module> {
        if let Some(module) = self.loaded(hash) {
            return Ok(module);
        }
        let module = self.load_uncached(hash, bytes)?;
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).insert(hash.to_string(), module.clone());
        Ok(module)
    }

    fn load_uncached(&self, hash: &str, bytes: impl FnOnce() -> Result<Vec<u8>>) -> Result<Module> {
        if let Some(path) = self.cache_path(hash) {
            match self.load_cached(&path) {
                Ok(Some(module)) => return Ok(module),
                Ok(None) => {}
                Err(e) => {
                    // The cache is disposable: a bad entry is replaced.
                    eprintln!("cairn: ignoring bad compiled-module cache entry {}: {e:#}", path.display());
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let bytes = bytes()?;
        self.compile(hash, &bytes)
    }

    /// Compile `bytes` (whose SHA-256 is `hash`) and cache the result.
    pub fn compile(&self, hash: &str, bytes: &[u8]) -> Result<Module> {
        let compiled = self.engine.precompile_module(bytes).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        if let Some(path) = self.cache_path(hash)
            && let Some(cache) = &self.cache
            && let Err(e) = write_cache_entry(&path, &compiled, &cache.key)
        {
            eprintln!("cairn: could not cache the compiled module at {}: {e:#}", path.display());
        }
        // SAFETY: `compiled` was produced by this engine a moment ago.
        unsafe { Module::deserialize(&self.engine, &compiled) }.map_err(|e| anyhow::anyhow!("{e:#}"))
    }

    fn cache_path(&self, hash: &str) -> Option<PathBuf> {
        let cache = self.cache.as_ref()?;
        // Keyed by everything that decides whether native code fits: engine
        // settings, CPU features, wasmtime and cairn versions; and by the
        // key, so that each database's entries have a directory of their own.
        let mut h = DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        hmac(&cache.key, b"cairn cache directory").hash(&mut h);
        let dir = &cache.dir;
        Some(dir.join(format!("{:016x}", h.finish())).join(format!("{hash}.cwasm")))
    }

    fn load_cached(&self, path: &Path) -> Result<Option<Module>> {
        let file = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Only this user's private files, in this user's private directory.
        check_private(&file.metadata()?, 0o022, path)?;
        if let Some(dir) = path.parent() {
            check_private(&fs::symlink_metadata(dir)?, 0o077, dir)?;
        }
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut data)?;
        // A .cwasm runs as native code: check it is whole and ours first.
        if data.len() < 40 || &data[..8] != CACHE_MAGIC {
            bail!("not a cache entry");
        }
        let (sum, payload) = data[8..].split_at(32);
        let key = &self.cache.as_ref().context("no cache")?.key;
        if hmac(key, payload).as_slice() != sum {
            bail!("its authentication code does not match (written with another key, or changed)");
        }
        // SAFETY: the file lives in our private (0700) cache directory and
        // its authentication code, under the database's key, is ours.
        let module = unsafe { Module::deserialize(&self.engine, payload) }.map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(Some(module))
    }
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn write_cache_entry(path: &Path, compiled: &[u8], key: &[u8; 32]) -> Result<()> {
    let dir = path.parent().context("cache path has no parent")?;
    private_dir(dir)?;
    let tmp =
        dir.join(format!(".{}.{}.tmp", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&tmp);
    // Exclusive and not through a link: nobody else's file is written.
    let mut f =
        fs::OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o600).open(&tmp)?;
    f.write_all(CACHE_MAGIC)?;
    f.write_all(&hmac(key, compiled))?;
    f.write_all(compiled)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The cache's own directory inside the one the user named: created 0700
/// if missing (the user's directory is created if missing, never changed),
/// and refused unless it is a directory of this user that nobody else can
/// use, since what it holds runs as native code.
fn private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    check_private(&meta, 0o077, dir)
}

/// Owned by this user, with none of `forbidden` mode bits.
fn check_private(meta: &fs::Metadata, forbidden: u32, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        bail!("{} belongs to another user (uid {}); it is not used", path.display(), meta.uid());
    }
    if meta.mode() & forbidden != 0 {
        bail!("{} is open to other users (mode {:o}); it is not used", path.display(), meta.mode() & 0o7777);
    }
    Ok(())
}

/// SHA-256 of a module's bytes, hex: its identity everywhere.
pub fn module_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The default cache directory: `$XDG_CACHE_HOME/cairn` or `~/.cache/cairn`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("cairn").join("modules"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 1: a 20-byte key (padded with zeros like any short key).
        let mut key = [0u8; 32];
        key[..20].fill(0x0b);
        let mac = super::hmac(&key, b"Hi There");
        assert_eq!(hex::encode(mac), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
    }
}
