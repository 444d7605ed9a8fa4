//! The paged KV cache (vLLM's PagedAttention layout), owned by the engine
//! and lent to the model for each step.
//!
//! Per layer there is one key pool and one value pool of `num_blocks`
//! fixed-size blocks, each `[num_blocks, kv_heads, BLOCK_SIZE, head_dim]`
//! in the cache's dtype ([`KvShape::dtype`]: f32, or bf16/f16 in tensor
//! pools, vLLM's `--kv-cache-dtype`): the layout of the CUDA kernels (`arqon_kernels::reference::paged`)
//! and of the CPU decode attention ([`arqon_kernels::attention::CacheView`]).
//! A sequence owns a block table: its token `t` lives in block
//! `table[t / BLOCK_SIZE]` at offset `t % BLOCK_SIZE`. Blocks come from one
//! free list, so memory never fragments and a sequence wastes less than one
//! block (where a per-sequence buffer grown by doubling wasted up to half).
//!
//! A pool is either
//! - **fixed** ([`KvCache::new`], the server): sized once at start (from
//!   free memory, see `server`), it never grows. A step that needs more
//!   blocks than are free fails with [`Error::KvCacheFull`] before anything
//!   is written; the server's scheduler preempts sequences until a step's
//!   blocks are free, so there it does not happen;
//! - or **growable** ([`KvCache::growable`], the offline engine): when full
//!   it doubles, keeping every block id (blocks are the outer dimension).
//!
//! On the CPU the pools are plain host buffers, written with slice copies
//! and read in place by the decode kernel; on a GPU they are device tensors,
//! one per layer holding `[keys | values | room for one step's rotated
//! queries]` (so that one in-place op, [`KvCache::rope_write`], can write all
//! three), written with one `scatter_set` per pool or that fused op, gathered
//! with `index_select`.
//!
//! Invariant: a sequence's `len` only advances once a whole step has written
//! every layer, so a step that fails part-way leaves the cached tokens as
//! they were (blocks it reserved stay with the sequence).

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use arqon_kernels::attention::CacheView;
use arqon_kernels::reference::fused::RopeKvShape;
use arqon_kernels::reference::paged::PagedKvShape;
use candle_core::{DType, Device, Storage, Tensor};

use super::rope_op::{RopeKvWrite, RopeRows};
use crate::error::{Error, Result};

/// Tokens per block (vLLM's default, and what the CUDA kernels are tuned for).
pub const BLOCK_SIZE: usize = 16;

/// Rows of rotated queries each layer of a tensor-pooled cache has room
/// for: the fused RoPE + KV write ([`KvCache::rope_write`]) puts a step's
/// queries there, next to the keys and values it writes, for steps up to
/// the largest CUDA-graph bucket.
pub(crate) const QUERY_ROWS: usize = super::graph::BUCKETS[super::graph::BUCKETS.len() - 1];

/// Identifies one sequence in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

#[derive(Debug, Default)]
struct SeqKv {
    len: usize,
    blocks: Vec<u32>,
    /// The cached tokens' ids.
    tokens: Vec<u32>,
    /// The prefix hash of each full block, in order (prefix caching).
    hashes: Vec<u64>,
    /// Whose weights made its keys (see [`KvCache::attach_prefix`]); a
    /// sequence without one never shares or publishes blocks.
    namespace: Option<u64>,
}

/// Automatic prefix caching (vLLM's): a full block is known by the hash of
/// its tokens chained through every block before it, in a namespace. A
/// cached block whose last holder left stays cached but evictable; a block
/// is evicted (least recently released first) only when no free one is left.
#[derive(Debug, Default)]
struct Prefixes {
    enabled: bool,
    by_hash: HashMap<u64, u32>,
    hash_of: HashMap<u32, u64>,
    /// Cached blocks no sequence holds, by release tick (oldest first).
    evictable: BTreeMap<u64, u32>,
    released_at: HashMap<u32, u64>,
    tick: u64,
}

impl Prefixes {
    /// Forgets `block`'s hash, if it is published (`hash_of` holds exactly
    /// the published blocks: `by_hash[hash_of[b]] == b`).
    fn unpublish(&mut self, block: u32) {
        if let Some(h) = self.hash_of.remove(&block) {
            self.by_hash.remove(&h);
        }
    }
}

/// The hash of a block of `tokens` after the prefix hashed to `prev`.
fn chain(prev: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Shape of the cached tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Decoder layers.
    pub layers: usize,
    /// Query heads (tensor pools keep room for one step's rotated queries:
    /// see [`QUERY_ROWS`]).
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest sequence allowed.
    pub max_len: usize,
    /// What the pools hold: f32, or (tensor pools only) bf16 or f16. Keys
    /// and values are rounded to it as they are written and read back as
    /// f32 by every step that computes in f32.
    pub dtype: DType,
}

impl KvShape {
    /// Bytes one block holds, keys and values of every layer.
    pub fn block_bytes(&self) -> u64 {
        (2 * self.layers * self.kv_heads * BLOCK_SIZE * self.head_dim * self.dtype.size_in_bytes()) as u64
    }

    /// Blocks a sequence of `tokens` tokens holds.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_SIZE)
    }

    /// Full blocks of a sequence of `tokens` tokens: what a
    /// [`KvCache::fork`] of it shares (its partial last block is copied, as
    /// both go on writing it).
    pub fn full_blocks(tokens: usize) -> usize {
        tokens / BLOCK_SIZE
    }

    /// Blocks a [`KvCache::fork`] of a sequence of `tokens` tokens copies:
    /// its partial last block, if it has one.
    pub fn fork_copies(tokens: usize) -> usize {
        Self::blocks_for(tokens) - Self::full_blocks(tokens)
    }

    /// Elements of each layer's room for rotated queries (tensor pools).
    fn query_elems(&self) -> usize {
        QUERY_ROWS * self.q_heads * self.head_dim
    }

    /// Bytes of that room, all layers: what tensor pools hold besides blocks.
    pub fn query_room_bytes(&self) -> u64 {
        (self.layers * self.query_elems() * self.dtype.size_in_bytes()) as u64
    }

    /// Elements of one block of one layer's key (or value) pool.
    fn block_elems(&self) -> usize {
        self.kv_heads * BLOCK_SIZE * self.head_dim
    }
}

/// One layer's key or value pool.
#[derive(Debug)]
enum Pool {
    /// Host memory (the CPU device), read in place by the decode kernel.
    Host(Vec<f32>),
    /// A flat device tensor: a view of its layer's tensor ([`KvCache::layers`]).
    Device(Tensor),
}

/// Keys and values of every live sequence, in blocks.
#[derive(Debug)]
pub struct KvCache {
    shape: KvShape,
    device: Device,
    num_blocks: usize,
    growable: bool,
    /// Keep the pools as tensors even on the CPU (tests of the device path).
    tensor_pools: bool,
    /// This cache among the process's (a captured step names the pools it
    /// writes by it and [`KvCache::blocks_total`]).
    id: u64,
    /// Held while the cache lives (see [`KvCache::liveness`]).
    alive: std::sync::Arc<()>,
    k: Vec<Pool>,
    v: Vec<Pool>,
    /// Tensor pools: each layer's one tensor, `[keys | values | queries]`
    /// (its `k` and `v` are views of it); empty for host pools.
    layers: Vec<Tensor>,
    /// Free block ids; the last is handed out first, so a freed block (its
    /// memory already touched) is the next one reused.
    free: Vec<u32>,
    /// Holders of each block (sequences sharing a cached prefix).
    refs: Vec<u32>,
    prefixes: Prefixes,
    seqs: HashMap<SeqId, SeqKv>,
}

/// Where one step's new tokens go in the pools ([`KvCache::slots`]).
#[derive(Debug)]
pub(crate) struct StepSlots {
    /// Rows of the step (tokens of all its chunks).
    rows: usize,
    /// The pool row of `head_dim` elements of each (KV head, step row),
    /// head-major as the step's `[kv_heads, rows, head_dim]` keys are.
    dest: Vec<u32>,
    /// `dest` with each entry repeated `head_dim` times, on the device (the
    /// scatter index of a device pool; `None` for host pools).
    index: Option<Tensor>,
}

/// Blocks a growable pool starts with.
const INITIAL_BLOCKS: usize = 16;

impl KvCache {
    /// A fixed pool of `num_blocks` blocks on `device`. Host pools are
    /// zeroed lazily by the OS (pages cost memory once written); device
    /// pools are allocated now, so an out-of-memory error comes here.
    pub fn new(shape: KvShape, num_blocks: usize, device: Device) -> Result<Self> {
        Self::fixed_pools(shape, num_blocks, device, false)
    }

    /// [`KvCache::new`] for a model that decodes on the paged attention op
    /// ([`crate::model::Llama::paged_attention`]): on the CPU too, the pools
    /// are tensors (a GPU's always are).
    pub fn for_paged_op(shape: KvShape, num_blocks: usize, device: Device) -> Result<Self> {
        Self::fixed_pools(shape, num_blocks, device, true)
    }

    fn fixed_pools(shape: KvShape, num_blocks: usize, device: Device, tensor_pools: bool) -> Result<Self> {
        if num_blocks > u32::MAX as usize {
            return Err(Error::InvalidRequest(format!("{num_blocks} KV blocks: at most {} fit a block id", u32::MAX)));
        }
        let mut kv = Self::empty(shape, device, false);
        kv.tensor_pools = tensor_pools;
        kv.grow_to(num_blocks)?;
        // Made before the engine thread that uses it starts.
        crate::device::settle(&kv.device)?;
        Ok(kv)
    }

    /// A pool that starts small and doubles whenever a step needs more
    /// blocks than are free (for the offline engine and tests).
    pub fn growable(shape: KvShape, device: Device) -> Self {
        Self::empty(shape, device, true)
    }

    fn empty(shape: KvShape, device: Device, growable: bool) -> Self {
        KvCache {
            shape,
            device,
            num_blocks: 0,
            growable,
            tensor_pools: false,
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            alive: std::sync::Arc::new(()),
            k: Vec::new(),
            v: Vec::new(),
            layers: Vec::new(),
            free: Vec::new(),
            refs: Vec::new(),
            prefixes: Prefixes::default(),
            seqs: HashMap::new(),
        }
    }

    /// Enlarges every pool to `blocks` blocks, keeping the contents and ids.
    fn grow_to(&mut self, blocks: usize) -> Result<()> {
        let (old, elems) = (self.num_blocks, self.shape.block_elems());
        if blocks <= old {
            return Ok(());
        }
        let host = self.device.is_cpu() && !self.tensor_pools;
        let dtype = self.shape.dtype;
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || (host && dtype != DType::F32) {
            return Err(Error::InvalidRequest(format!(
                "a {dtype:?} KV cache needs tensor pools (a GPU, or the paged attention op); host pools are f32"
            )));
        }
        let layers = self.shape.layers;
        if host {
            let grow = |pools: &mut Vec<Pool>| {
                for p in pools.iter_mut() {
                    if let Pool::Host(b) = p {
                        b.resize(blocks * elems, 0.0);
                    }
                }
                // New pools zeroed lazily by the OS (`vec!` of zeros).
                pools.resize_with(layers, || Pool::Host(vec![0f32; blocks * elems]));
            };
            grow(&mut self.k);
            grow(&mut self.v);
        } else {
            let pool = blocks * elems;
            let (mut k, mut v, mut tensors) = (Vec::new(), Vec::new(), Vec::new());
            for l in 0..layers {
                let t = Tensor::zeros(2 * pool + self.shape.query_elems(), dtype, &self.device)?;
                if let (Some(Pool::Device(old_k)), Some(Pool::Device(old_v))) = (self.k.get(l), self.v.get(l)) {
                    t.slice_set(old_k, 0, 0)?;
                    t.slice_set(old_v, 0, pool)?;
                }
                k.push(Pool::Device(t.narrow(0, 0, pool)?));
                v.push(Pool::Device(t.narrow(0, pool, pool)?));
                tensors.push(t);
            }
            (self.k, self.v, self.layers) = (k, v, tensors);
        }
        // New ids go under the free ones, lowest handed out first.
        let mut free: Vec<u32> = (old as u32..blocks as u32).rev().collect();
        free.append(&mut self.free);
        self.free = free;
        self.refs.resize(blocks, 0);
        self.num_blocks = blocks;
        Ok(())
    }

    /// Which pools this cache's are: its own id and its size, which changes
    /// whenever a growable cache moves them.
    pub(crate) fn pools_id(&self) -> (u64, usize) {
        (self.id, self.num_blocks)
    }

    /// A handle that dies with the cache: captured steps keep one, so those
    /// that write a dropped cache's pools go ([`super::graph`]).
    pub(crate) fn liveness(&self) -> std::sync::Weak<()> {
        std::sync::Arc::downgrade(&self.alive)
    }

    /// Whether the pools are tensors (device pools, or host ones kept as tensors).
    pub(crate) fn has_tensor_pools(&self) -> bool {
        matches!(self.k.first(), Some(Pool::Device(_)))
    }

    /// The device the pools live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The shape of the cached tensors.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// A growable cache whose pools are tensors even on the CPU (the layout
    /// a GPU uses, for the paged attention op).
    pub(crate) fn growable_tensors(shape: KvShape, device: Device) -> Self {
        let mut kv = Self::empty(shape, device, true);
        kv.tensor_pools = true;
        kv
    }

    /// The key and value pools of `layer` as flat tensors (GPU caches, or
    /// [`KvCache::growable_tensors`]): views of the layer's one tensor.
    pub(crate) fn tensor_pools(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match (&self.k[layer], &self.v[layer]) {
            (Pool::Device(k), Pool::Device(v)) => Ok((k, v)),
            _ => Err(Error::InvalidRequest("the paged attention op got a host KV cache".into())),
        }
    }

    /// Registers a new, empty sequence.
    pub fn add(&mut self, seq: SeqId) -> Result<()> {
        if self.seqs.contains_key(&seq) {
            return Err(Error::InvalidRequest(format!("sequence {} already exists", seq.0)));
        }
        self.seqs.insert(seq, SeqKv::default());
        Ok(())
    }

    /// Drops a sequence and returns its blocks to the pool (a cached prefix
    /// block stays cached, evictable). Unknown ids are ignored.
    pub fn remove(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for b in s.blocks.into_iter().rev() {
                self.release(b);
            }
        }
    }

    /// Turns automatic prefix caching on: sequences given a namespace by
    /// [`KvCache::attach_prefix`] publish their full blocks and reuse others'.
    pub fn enable_prefix_caching(&mut self) {
        self.prefixes.enabled = true;
    }

    /// A namespace for [`KvCache::attach_prefix`] from whatever identifies
    /// the weights that compute the keys (a variant's name and artifact).
    pub fn namespace(of: impl Hash) -> u64 {
        let mut h = DefaultHasher::new();
        of.hash(&mut h);
        h.finish()
    }

    /// Starts the empty sequence `seq` on the longest cached prefix of
    /// `prompt` in `namespace` (whole blocks, leaving at least the prompt's
    /// last token to compute) and returns how many tokens it holds already.
    /// From now on the sequence publishes its own full blocks there. Without
    /// prefix caching this does nothing and returns 0.
    pub fn attach_prefix(&mut self, seq: SeqId, namespace: u64, prompt: &[u32]) -> Result<usize> {
        if !self.prefixes.enabled {
            return Ok(0);
        }
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        if s.len > 0 || !s.blocks.is_empty() {
            return Err(Error::InvalidRequest(format!("sequence {}: a prefix attaches only to an empty one", seq.0)));
        }
        s.namespace = Some(namespace);
        let p = &mut self.prefixes;
        let mut prev = namespace;
        for block in prompt[..prompt.len().saturating_sub(1)].chunks_exact(BLOCK_SIZE) {
            let h = chain(prev, block);
            let Some(&b) = p.by_hash.get(&h) else { break };
            if self.refs[b as usize] == 0 {
                if let Some(t) = p.released_at.remove(&b) {
                    p.evictable.remove(&t);
                }
            }
            self.refs[b as usize] += 1;
            s.blocks.push(b);
            s.hashes.push(h);
            s.tokens.extend_from_slice(block);
            prev = h;
        }
        s.len = s.tokens.len();
        Ok(s.len)
    }

    /// Starts the empty sequence `child` as a copy of `parent` (vLLM's fork,
    /// for the `n` choices of one prompt): it shares `parent`'s full blocks,
    /// held once more, and gets its own copy of the partial last block, so
    /// each goes on from the same cached tokens. Needs one free block when
    /// the length is not a multiple of [`BLOCK_SIZE`]; on error `child` is
    /// left empty.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        let p = self.seqs.get(&parent).ok_or(Error::UnknownSequence(parent.0))?;
        let c = self.seqs.get(&child).ok_or(Error::UnknownSequence(child.0))?;
        if c.len > 0 || !c.blocks.is_empty() {
            return Err(Error::InvalidRequest(format!("sequence {}: a fork starts only an empty one", child.0)));
        }
        let len = p.len;
        let shared = KvShape::full_blocks(len);
        let tail = (KvShape::fork_copies(len) > 0).then(|| p.blocks[shared]);
        let forked = SeqKv {
            len,
            blocks: p.blocks[..shared].to_vec(),
            tokens: p.tokens.clone(),
            hashes: p.hashes.clone(),
            namespace: p.namespace,
        };
        for &b in &forked.blocks {
            self.refs[b as usize] += 1;
        }
        self.seqs.insert(child, forked);
        let Some(src) = tail else { return Ok(()) };
        if let Err(e) = self.reserve(&[(child, 0)]) {
            self.remove(child);
            self.seqs.insert(child, SeqKv::default());
            return Err(e);
        }
        let dst = *self.seqs[&child].blocks.last().expect("reserved the tail block");
        let elems = self.shape.block_elems();
        let (src, dst) = (src as usize * elems, dst as usize * elems);
        for pool in self.k.iter_mut().chain(self.v.iter_mut()) {
            match pool {
                Pool::Host(buf) => buf.copy_within(src..src + elems, dst),
                Pool::Device(t) => {
                    // The block into a buffer of its own first (a tensor cannot
                    // be read and written at once); `copy` would clone the pool.
                    let block = t.narrow(0, src, elems)?.force_contiguous()?;
                    t.slice_set(&block, 0, dst)?;
                }
            }
        }
        Ok(())
    }

    /// A block for a sequence to write: a free one, else the least recently
    /// released cached one (evicted from the prefix cache).
    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.prefixes.evictable.pop_first()?;
                self.prefixes.released_at.remove(&b);
                self.prefixes.unpublish(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One holder of `block` is done with it.
    fn release(&mut self, block: u32) {
        let r = &mut self.refs[block as usize];
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        let p = &mut self.prefixes;
        if p.hash_of.contains_key(&block) {
            p.tick += 1;
            p.evictable.insert(p.tick, block);
            p.released_at.insert(block, p.tick);
        } else {
            self.free.push(block);
        }
    }

    /// Whether the cache holds `seq`.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Tokens cached for `seq`.
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        self.seqs.get(&seq).map(|s| s.len).ok_or(Error::UnknownSequence(seq.0))
    }

    /// The block table of `seq`: its blocks in token order.
    pub fn block_table(&self, seq: SeqId) -> Result<&[u32]> {
        self.seqs.get(&seq).map(|s| &s.blocks[..]).ok_or(Error::UnknownSequence(seq.0))
    }

    /// Live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Blocks in the pool.
    pub fn blocks_total(&self) -> usize {
        self.num_blocks
    }

    /// Blocks no sequence holds (free, or cached and evictable).
    pub fn blocks_free(&self) -> usize {
        self.free.len() + self.prefixes.evictable.len()
    }

    /// Blocks no sequence holds that keep a cached prefix.
    pub fn blocks_cached(&self) -> usize {
        self.prefixes.evictable.len()
    }

    /// Bytes of the blocks sequences hold (each shared block once).
    pub fn bytes(&self) -> u64 {
        (self.num_blocks - self.blocks_free()) as u64 * self.shape.block_bytes()
    }

    /// Makes room for `extra` more tokens of each `(seq, extra)`, all or
    /// nothing: when the pool cannot hold them all (and cannot grow), nothing
    /// is taken and the error says how many blocks were missing.
    pub(crate) fn reserve(&mut self, want: &[(SeqId, usize)]) -> Result<()> {
        // Each sequence's (blocks held, blocks needed).
        let mut counts = Vec::with_capacity(want.len());
        for &(seq, extra) in want {
            let s = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
            if s.len + extra > self.shape.max_len {
                return Err(Error::ContextOverflow {
                    prompt_tokens: s.len,
                    max_tokens: extra,
                    context: self.shape.max_len,
                });
            }
            counts.push((s.blocks.len(), KvShape::blocks_for(s.len + extra)));
        }
        let more: usize = counts.iter().map(|(have, need)| need.saturating_sub(*have)).sum();
        if more > self.blocks_free() {
            if !self.growable {
                return Err(Error::KvCacheFull { needed: more, free: self.blocks_free() });
            }
            let used = self.num_blocks - self.blocks_free();
            self.grow_to((used + more).max(2 * self.num_blocks).max(INITIAL_BLOCKS))?;
        }
        for (&(seq, _), (have, need)) in want.iter().zip(counts) {
            let new: Vec<u32> = (have..need).map(|_| self.take().expect("counted above")).collect();
            self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?.blocks.extend(new);
        }
        Ok(())
    }

    /// Where a step's new tokens go: `chunks` are `(seq, n)` in row order,
    /// each the next `n` tokens of `seq` (into blocks [`KvCache::reserve`]
    /// took). Built once per step and used by every layer's
    /// [`KvCache::write`]; on a device pool it holds the scatter index there.
    pub(crate) fn slots(&self, chunks: &[(SeqId, usize)]) -> Result<StepSlots> {
        let kvh = self.shape.kv_heads;
        let cells = self.step_cells(chunks)?;
        let rows = cells.len();
        // Pool row (of `head_dim` elements) of every (head, step row).
        let mut dest = vec![0u32; kvh * rows];
        for (r, (b, o)) in cells.into_iter().enumerate() {
            for h in 0..kvh {
                dest[h * rows + r] = ((b * kvh + h) * BLOCK_SIZE + o) as u32;
            }
        }
        let index = match self.k.first() {
            Some(Pool::Device(_)) => {
                let hd = self.shape.head_dim;
                let full: Vec<u32> = dest.iter().flat_map(|d| std::iter::repeat_n(*d, hd)).collect();
                Some(Tensor::from_vec(full, (kvh * rows, hd), &self.device)?)
            }
            _ => None,
        };
        Ok(StepSlots { rows, dest, index })
    }

    /// The cache slot (`block * BLOCK_SIZE + offset`) of each new token of
    /// `chunks`, in row order, as `[rows]` i32 on the cache's device: where
    /// [`KvCache::rope_write`] puts them.
    pub(crate) fn token_slots(&self, chunks: &[(SeqId, usize)]) -> Result<Tensor> {
        let cells = self.step_cells(chunks)?;
        let slots = cells
            .iter()
            .map(|(b, o)| {
                i32::try_from(b * BLOCK_SIZE + o)
                    .map_err(|_| Error::InvalidRequest(format!("KV slot of block {b} does not fit an i32")))
            })
            .collect::<Result<Vec<i32>>>()?;
        Ok(Tensor::from_vec(slots, cells.len(), &self.device)?)
    }

    /// The (block, offset) of each new token of `chunks` (`(seq, n)`: the
    /// next `n` tokens of `seq`, into blocks [`KvCache::reserve`] took), in
    /// row order.
    fn step_cells(&self, chunks: &[(SeqId, usize)]) -> Result<Vec<(usize, usize)>> {
        let mut cells = Vec::with_capacity(chunks.iter().map(|(_, n)| n).sum());
        for &(seq, n) in chunks {
            let s = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
            if s.blocks.len() * BLOCK_SIZE < s.len + n {
                return Err(Error::InvalidRequest(format!("sequence {}: write before reserve", seq.0)));
            }
            cells.extend((s.len..s.len + n).map(|t| (s.blocks[t / BLOCK_SIZE] as usize, t % BLOCK_SIZE)));
        }
        Ok(cells)
    }

    /// Writes `k` and `v` (`[kv_heads, rows, head_dim]`, contiguous: a step's
    /// new keys and values, or some rows of them) at `layer` where `slots`
    /// says. On a device pool this is one scatter for the keys and one for
    /// the values. The lengths are not advanced: see [`KvCache::advance`].
    pub(crate) fn write(&mut self, layer: usize, (k, v): (&Tensor, &Tensor), slots: &StepSlots) -> Result<()> {
        let (kvh, hd) = (self.shape.kv_heads, self.shape.head_dim);
        let rows = slots.rows;
        if k.dims() != [kvh, rows, hd] || v.dims() != [kvh, rows, hd] {
            return Err(Error::InvalidRequest(format!("KV write of {:?} for {rows} slots", k.dims())));
        }
        let pool_rows = self.num_blocks * kvh * BLOCK_SIZE;
        for (src, pool) in [(k, &mut self.k[layer]), (v, &mut self.v[layer])] {
            match pool {
                Pool::Host(buf) => {
                    let src = src.to_dtype(DType::F32)?;
                    let (storage, layout) = src.storage_and_layout();
                    let Storage::Cpu(cpu) = &*storage else {
                        return Err(Error::InvalidRequest("a host KV pool got device keys".into()));
                    };
                    if !layout.is_contiguous() {
                        return Err(Error::InvalidRequest("KV writes want contiguous keys and values".into()));
                    }
                    let src = &cpu.as_slice::<f32>()?[layout.start_offset()..][..kvh * rows * hd];
                    for (row, d) in src.chunks_exact(hd).zip(&slots.dest) {
                        buf[*d as usize * hd..][..hd].copy_from_slice(row);
                    }
                }
                Pool::Device(t) => {
                    let index = slots.index.as_ref().ok_or_else(|| {
                        Error::InvalidRequest("KV slots built for a host pool, written to a device pool".into())
                    })?;
                    // Rounded to the pool's dtype (no copy when it is the keys').
                    let src = src.to_dtype(t.dtype())?.contiguous()?.reshape((kvh * rows, hd))?;
                    t.reshape((pool_rows, hd))?.scatter_set(index, &src, 0)?;
                }
            }
        }
        Ok(())
    }

    /// The fused form of RoPE and [`KvCache::write`] for tensor pools, one
    /// op ([`RopeKvWrite`]): rotates the queries and keys of `qkv` (a step's
    /// stacked q/k/v projection, `[rows, (q_heads + 2 * kv_heads) *
    /// head_dim]`, in the pools' dtype) by `rope`'s rows, writes the keys and
    /// values at `layer` in `slots` ([`KvCache::token_slots`]), and returns the rotated queries,
    /// `[rows, q_heads * head_dim]`: a view of the layer's room for them,
    /// good until its next fused write. Only where [`KvCache::fuses_rope`]
    /// says so (else an error, nothing written).
    pub(crate) fn rope_write(&mut self, layer: usize, qkv: &Tensor, rope: &RopeRows, slots: &Tensor) -> Result<Tensor> {
        let (s, rows) = (self.shape, slots.dim(0)?);
        let (Some(t), true) = (self.layers.get(layer), self.fuses_rope(rows)) else {
            return Err(Error::InvalidRequest(format!("a fused RoPE + KV write of {rows} rows into this KV cache")));
        };
        let op = RopeKvWrite::new(
            RopeKvShape {
                tokens: rows,
                q_heads: s.q_heads,
                cache: PagedKvShape {
                    num_blocks: self.num_blocks,
                    kv_heads: s.kv_heads,
                    block_size: BLOCK_SIZE,
                    head_dim: s.head_dim,
                },
                max_pos: rope.rows,
                pairs: rope.pairs,
            },
            (qkv, &rope.cos_sin, &rope.positions, slots),
        );
        t.inplace_op1(&op)?;
        let queries = 2 * self.num_blocks * s.block_elems();
        Ok(t.narrow(0, queries, rows * s.q_heads * s.head_dim)?.reshape((rows, s.q_heads * s.head_dim))?)
    }

    /// Whether a step of `rows` rows can take [`KvCache::rope_write`]: tensor
    /// pools, and rows that fit the room for queries.
    pub(crate) fn fuses_rope(&self, rows: usize) -> bool {
        !self.layers.is_empty() && (1..=QUERY_ROWS).contains(&rows)
    }

    /// Where the keys and values of `seq` at `layer` lie, for the CPU decode
    /// kernel: each pool's buffer and the sequence's view of it.
    pub(crate) fn host_view(&self, seq: SeqId, layer: usize) -> Result<[(&[f32], CacheView<'_>); 2]> {
        let s = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        let (Pool::Host(k), Pool::Host(v)) = (&self.k[layer], &self.v[layer]) else {
            return Err(Error::InvalidRequest("the CPU decode attention got a device KV cache".into()));
        };
        let view = CacheView::paged(&s.blocks, self.shape.kv_heads, BLOCK_SIZE, self.shape.head_dim);
        Ok([(k, view), (v, view)])
    }

    /// The first `len` cached keys and values of `seq` at `layer` as
    /// contiguous `[kv_heads, len, head_dim]` f32 tensors (gathered from its
    /// blocks; for attention that runs as a matmul).
    pub(crate) fn history(&self, seq: SeqId, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let (kvh, hd) = (self.shape.kv_heads, self.shape.head_dim);
        let s = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        let used = KvShape::blocks_for(len);
        if used > s.blocks.len() {
            return Err(Error::InvalidRequest(format!("sequence {}: {len} tokens are not cached", seq.0)));
        }
        let gather = |pool: &Pool| -> Result<Tensor> {
            match pool {
                Pool::Host(buf) => {
                    let view = CacheView::paged(&s.blocks, kvh, BLOCK_SIZE, hd);
                    let mut out = Vec::with_capacity(kvh * len * hd);
                    for h in 0..kvh {
                        view.runs(buf, h, len, hd).for_each(|run| out.extend_from_slice(run));
                    }
                    Ok(Tensor::from_vec(out, (kvh, len, hd), &self.device)?)
                }
                Pool::Device(t) => {
                    let ids = Tensor::from_slice(&s.blocks[..used], used, &self.device)?;
                    let blocks = t.reshape((self.num_blocks, kvh, BLOCK_SIZE, hd))?.index_select(&ids, 0)?;
                    let heads = blocks.transpose(0, 1)?.contiguous()?.reshape((kvh, used * BLOCK_SIZE, hd))?;
                    Ok(heads.narrow(1, 0, len)?.to_dtype(DType::F32)?.contiguous()?)
                }
            }
        };
        Ok((gather(&self.k[layer])?, gather(&self.v[layer])?))
    }

    /// Commits `tokens`, just written, as the next tokens of `seq`; with
    /// prefix caching, publishes the blocks they fill.
    pub(crate) fn advance(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        s.len += tokens.len();
        s.tokens.extend_from_slice(tokens);
        let (Some(ns), true) = (s.namespace, self.prefixes.enabled) else { return Ok(()) };
        let p = &mut self.prefixes;
        while (s.hashes.len() + 1) * BLOCK_SIZE <= s.len {
            let i = s.hashes.len();
            let h = chain(s.hashes.last().copied().unwrap_or(ns), &s.tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
            s.hashes.push(h);
            let b = s.blocks[i];
            // The first block computed for a prefix is the one published.
            if let std::collections::hash_map::Entry::Vacant(e) = p.by_hash.entry(h) {
                e.insert(b);
                p.hash_of.insert(b, h);
            }
        }
        Ok(())
    }

    /// Forgets the last tokens of `seq` so it holds `len` (used to undo a
    /// speculative step), returning the blocks past it to the pool. Blocks
    /// it published past `len` are unpublished: they will be rewritten.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        if len < s.len && !len.is_multiple_of(BLOCK_SIZE) && self.refs[s.blocks[len / BLOCK_SIZE] as usize] > 1 {
            // Its tokens past `len` would be rewritten under another holder.
            return Err(Error::InvalidRequest(format!("sequence {}: cannot truncate into a shared block", seq.0)));
        }
        s.len = s.len.min(len);
        s.tokens.truncate(s.len);
        let full = s.len / BLOCK_SIZE;
        for &b in s.blocks.iter().take(s.hashes.len()).skip(full) {
            self.prefixes.unpublish(b);
        }
        s.hashes.truncate(full);
        let dropped: Vec<u32> = s.blocks.drain(KvShape::blocks_for(s.len)..).collect();
        for b in dropped.into_iter().rev() {
            self.release(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape { layers: 2, q_heads: 4, kv_heads: 2, head_dim: 4, max_len: 100, dtype: DType::F32 };

    /// `[kv_heads, n, head_dim]` keys whose value encodes (head, token, dim).
    fn rows(first_token: usize, n: usize, sign: f32) -> Tensor {
        let (kvh, hd) = (SHAPE.kv_heads, SHAPE.head_dim);
        let data: Vec<f32> = (0..kvh * n * hd)
            .map(|i| {
                let (h, t, d) = (i / (n * hd), (i / hd) % n, i % hd);
                sign * (h * 10_000 + (first_token + t) * 10 + d) as f32
            })
            .collect();
        Tensor::from_vec(data, (kvh, n, hd), &Device::Cpu).unwrap()
    }

    /// Appends `n` tokens to `seq` on every layer, through `reserve`, `slots`, `write`, `advance`.
    fn push(kv: &mut KvCache, seq: SeqId, n: usize) -> Result<()> {
        push_tagged(kv, seq, n, 0)
    }

    /// [`push`], the keys encoding token `tag + t` for position `t`.
    fn push_tagged(kv: &mut KvCache, seq: SeqId, n: usize, tag: usize) -> Result<()> {
        kv.reserve(&[(seq, n)])?;
        let start = kv.len(seq)?;
        let (k, v) = (rows(tag + start, n, 1.0), rows(tag + start, n, -1.0));
        let slots = kv.slots(&[(seq, n)])?;
        for l in 0..SHAPE.layers {
            kv.write(l, (&k, &v), &slots)?;
        }
        kv.advance(seq, &(start..start + n).map(|t| t as u32).collect::<Vec<_>>())
    }

    /// A fixed pool of `blocks`, host buffers or (`tensors`) the tensors a GPU uses.
    fn fixed(blocks: usize, tensors: bool) -> KvCache {
        let mut kv = KvCache::empty(SHAPE, Device::Cpu, false);
        kv.tensor_pools = tensors;
        kv.grow_to(blocks).unwrap();
        kv
    }

    #[test]
    fn tokens_come_back_in_order_across_blocks() {
        for tensors in [false, true] {
            tokens_in_order(fixed(8, tensors));
        }
    }

    fn tokens_in_order(mut kv: KvCache) {
        let (a, b) = (SeqId(1), SeqId(2));
        kv.add(a).unwrap();
        kv.add(b).unwrap();
        // Interleaved appends, so the two sequences' blocks alternate in the pool.
        for (seq, n) in [(a, 5), (b, 17), (a, 12), (b, 1), (a, 20)] {
            push(&mut kv, seq, n).unwrap();
        }
        assert_eq!(kv.len(a).unwrap(), 37);
        assert_eq!(kv.block_table(a).unwrap().len(), 3);
        assert_eq!(kv.block_table(b).unwrap().len(), 2);
        assert_eq!(kv.blocks_free(), 3);
        assert_eq!(kv.bytes(), 5 * SHAPE.block_bytes());
        for (seq, len) in [(a, 37), (b, 18)] {
            let (k, v) = kv.history(seq, 1, len).unwrap();
            assert_eq!(k.to_vec3::<f32>().unwrap(), rows(0, len, 1.0).to_vec3::<f32>().unwrap());
            assert_eq!(v.to_vec3::<f32>().unwrap(), rows(0, len, -1.0).to_vec3::<f32>().unwrap());
        }
        if kv.tensor_pools {
            assert!(kv.host_view(a, 0).is_err());
            return;
        }
        // The decode kernel's view reads the same token where the table says.
        let [(kb, view), _] = kv.host_view(a, 0).unwrap();
        let t = 33; // block 2, offset 1
        let at = view.blocks[t / BLOCK_SIZE] as usize * view.block_stride + view.head_stride + (t % BLOCK_SIZE) * 4;
        assert_eq!(kb[at], 10_000.0 + 330.0);
    }

    #[test]
    fn a_fork_shares_full_blocks_and_copies_the_partial_one() {
        for tensors in [false, true] {
            forks(fixed(6, tensors));
        }
    }

    fn forks(mut kv: KvCache) {
        let (parent, child, aligned) = (SeqId(1), SeqId(2), SeqId(3));
        let keys = |kv: &KvCache, seq, len| kv.history(seq, 1, len).unwrap().0.to_vec3::<f32>().unwrap();
        kv.add(parent).unwrap();
        kv.add(child).unwrap();
        push(&mut kv, parent, 37).unwrap(); // 2 full blocks and 5 tokens of a third
        kv.fork(parent, child).unwrap();
        let (pt, ct) = (kv.block_table(parent).unwrap().to_vec(), kv.block_table(child).unwrap().to_vec());
        assert_eq!((pt[..2] == ct[..2], pt[2] != ct[2]), (true, true), "{pt:?} {ct:?}");
        assert_eq!((kv.len(child).unwrap(), kv.blocks_free()), (37, 2));
        assert_eq!(kv.bytes(), 4 * SHAPE.block_bytes(), "shared blocks count once");
        // Each goes on writing its own copy of the third block.
        push(&mut kv, parent, 3).unwrap();
        push_tagged(&mut kv, child, 3, 1000).unwrap();
        assert_eq!(keys(&kv, parent, 40), rows(0, 40, 1.0).to_vec3::<f32>().unwrap());
        let mut want = rows(0, 37, 1.0).to_vec3::<f32>().unwrap();
        for (h, more) in want.iter_mut().zip(rows(1037, 3, 1.0).to_vec3::<f32>().unwrap()) {
            h.extend(more);
        }
        assert_eq!(keys(&kv, child, 40), want);
        // The shared blocks outlive the parent.
        kv.remove(parent);
        assert_eq!(kv.blocks_free(), 3);
        assert_eq!(keys(&kv, child, 40), want);
        // A block-aligned fork copies nothing; with no block free for a
        // partial one, a fork fails and leaves the child empty.
        kv.add(aligned).unwrap();
        push(&mut kv, child, 8).unwrap();
        assert_eq!((kv.len(child).unwrap(), kv.blocks_free()), (48, 3));
        kv.fork(child, aligned).unwrap();
        assert_eq!((kv.len(aligned).unwrap(), kv.blocks_free()), (48, 3));
        push(&mut kv, child, 1).unwrap();
        let (filler, late) = (SeqId(4), SeqId(5));
        kv.add(filler).unwrap();
        push(&mut kv, filler, 32).unwrap(); // the last two free blocks
        kv.add(late).unwrap();
        let err = kv.fork(child, late).unwrap_err();
        assert!(matches!(err, Error::KvCacheFull { needed: 1, free: 0 }), "{err}");
        assert_eq!((kv.len(late).unwrap(), kv.block_table(late).unwrap().len()), (0, 0));
        for s in [child, aligned, filler, late] {
            kv.remove(s);
        }
        assert_eq!(kv.blocks_free(), 6, "every hold was returned");
    }

    #[test]
    fn a_full_fixed_pool_refuses_whole_steps_and_changes_nothing() {
        let mut kv = KvCache::new(SHAPE, 3, Device::Cpu).unwrap();
        let (a, b) = (SeqId(1), SeqId(2));
        kv.add(a).unwrap();
        kv.add(b).unwrap();
        push(&mut kv, a, 20).unwrap(); // 2 blocks
                                       // 13 more for b (1 block) and 13 for a (a has 12 spare in its block, needs 1 more): 2 > 1 free.
        let err = kv.reserve(&[(b, 13), (a, 13)]).unwrap_err();
        assert!(matches!(err, Error::KvCacheFull { needed: 2, free: 1 }), "{err}");
        assert_eq!((kv.blocks_free(), kv.block_table(b).unwrap().len()), (1, 0));
        kv.reserve(&[(b, 13), (a, 12)]).unwrap();
        assert_eq!(kv.blocks_free(), 0);
        // Freed blocks are handed out again.
        kv.remove(a);
        assert_eq!(kv.blocks_free(), 2);
        kv.add(SeqId(3)).unwrap();
        push(&mut kv, SeqId(3), 32).unwrap();
        assert_eq!(kv.blocks_free(), 0);
        let err = kv.reserve(&[(SeqId(3), 101)]).unwrap_err();
        assert!(matches!(err, Error::ContextOverflow { .. }), "{err}");
    }

    #[test]
    fn a_growable_pool_doubles_and_keeps_what_it_holds() {
        for tensors in [false, true] {
            let mut kv = KvCache::growable(SHAPE, Device::Cpu);
            kv.tensor_pools = tensors;
            doubles(kv);
        }
    }

    fn doubles(mut kv: KvCache) {
        assert_eq!(kv.blocks_total(), 0);
        kv.add(SeqId(1)).unwrap();
        push(&mut kv, SeqId(1), 40).unwrap(); // 3 blocks of the first 16
        assert_eq!(kv.blocks_total(), INITIAL_BLOCKS);
        kv.add(SeqId(2)).unwrap();
        assert!(matches!(push(&mut kv, SeqId(2), 101), Err(Error::ContextOverflow { .. })));
        push(&mut kv, SeqId(2), 99).unwrap(); // 7 blocks: 6 left
        assert_eq!(kv.blocks_total(), INITIAL_BLOCKS);
        kv.add(SeqId(3)).unwrap();
        push(&mut kv, SeqId(3), 99).unwrap(); // 7 more: the pool doubles
        assert_eq!(kv.blocks_total(), 2 * INITIAL_BLOCKS);
        let (k, _) = kv.history(SeqId(1), 0, 40).unwrap();
        assert_eq!(k.to_vec3::<f32>().unwrap(), rows(0, 40, 1.0).to_vec3::<f32>().unwrap());
    }

    #[test]
    fn truncation_returns_whole_blocks_past_the_end() {
        for tensors in [false, true] {
            truncates(fixed(4, tensors));
        }
    }

    fn truncates(mut kv: KvCache) {
        kv.add(SeqId(1)).unwrap();
        push(&mut kv, SeqId(1), 40).unwrap();
        assert_eq!(kv.blocks_free(), 1);
        kv.truncate(SeqId(1), 17).unwrap();
        assert_eq!((kv.len(SeqId(1)).unwrap(), kv.blocks_free()), (17, 2));
        kv.truncate(SeqId(1), 16).unwrap();
        assert_eq!(kv.blocks_free(), 3);
        // Re-appended tokens overwrite the forgotten ones.
        push(&mut kv, SeqId(1), 3).unwrap();
        let (k, _) = kv.history(SeqId(1), 0, 19).unwrap();
        assert_eq!(k.to_vec3::<f32>().unwrap(), rows(0, 19, 1.0).to_vec3::<f32>().unwrap());
    }

    #[test]
    fn a_cached_prefix_is_shared_then_evicted_last() {
        let mut kv = KvCache::new(SHAPE, 6, Device::Cpu).unwrap();
        kv.enable_prefix_caching();
        let ns = KvCache::namespace("variant-a");
        let prompt: Vec<u32> = (0..40).collect();
        // A computes 40 tokens: two full blocks are published.
        kv.add(SeqId(1)).unwrap();
        assert_eq!(kv.attach_prefix(SeqId(1), ns, &prompt).unwrap(), 0);
        push(&mut kv, SeqId(1), 40).unwrap();
        let a_blocks = kv.block_table(SeqId(1)).unwrap().to_vec();
        // B, same prompt: shares A's two full blocks, computes the rest.
        kv.add(SeqId(2)).unwrap();
        assert_eq!(kv.attach_prefix(SeqId(2), ns, &prompt).unwrap(), 32);
        assert_eq!(kv.block_table(SeqId(2)).unwrap(), &a_blocks[..2]);
        assert_eq!(kv.blocks_free(), 3); // 6 - A's 3; B's two are A's
        let (k, _) = kv.history(SeqId(2), 1, 32).unwrap();
        assert_eq!(k.to_vec3::<f32>().unwrap(), rows(0, 32, 1.0).to_vec3::<f32>().unwrap());
        // Another namespace (other weights), or another first block: nothing shared.
        kv.add(SeqId(3)).unwrap();
        assert_eq!(kv.attach_prefix(SeqId(3), KvCache::namespace("variant-b"), &prompt).unwrap(), 0);
        let mut other = prompt.clone();
        other[3] = 99;
        kv.add(SeqId(4)).unwrap();
        assert_eq!(kv.attach_prefix(SeqId(4), ns, &other).unwrap(), 0);
        // A whole-block prompt keeps its last token to compute: 31 tokens give one block.
        kv.add(SeqId(5)).unwrap();
        assert_eq!(kv.attach_prefix(SeqId(5), ns, &prompt[..32]).unwrap(), 16);
        for s in [3, 4, 5] {
            kv.remove(SeqId(s));
        }
        // A and B leave: the two published blocks stay cached, A's partial one is freed.
        kv.remove(SeqId(1));
        assert_eq!(kv.blocks_free(), 3 + 1);
        kv.remove(SeqId(2));
        assert_eq!((kv.blocks_free(), kv.blocks_cached(), kv.bytes()), (6, 2, 0));
        // A newcomer takes the free blocks first, so the prefix survives...
        kv.add(SeqId(6)).unwrap();
        kv.attach_prefix(SeqId(6), ns, &[7; 20]).unwrap();
        push(&mut kv, SeqId(6), 64).unwrap();
        kv.add(SeqId(7)).unwrap();
        assert_eq!(kv.attach_prefix(SeqId(7), ns, &prompt).unwrap(), 32);
        kv.remove(SeqId(7));
        // ...and is evicted when nothing else is left.
        push(&mut kv, SeqId(6), 32).unwrap();
        assert_eq!(kv.blocks_cached(), 0);
        kv.add(SeqId(8)).unwrap();
        assert!(kv.reserve(&[(SeqId(8), 1)]).is_err());
        kv.remove(SeqId(8));
        kv.add(SeqId(9)).unwrap();
        kv.remove(SeqId(6));
        assert_eq!(kv.attach_prefix(SeqId(9), ns, &prompt).unwrap(), 0);
    }

    #[test]
    fn blocks_written_then_truncated_are_not_published() {
        let mut kv = KvCache::new(SHAPE, 8, Device::Cpu).unwrap();
        kv.enable_prefix_caching();
        let ns = KvCache::namespace(1u8);
        kv.add(SeqId(1)).unwrap();
        kv.attach_prefix(SeqId(1), ns, &[]).unwrap();
        push(&mut kv, SeqId(1), 20).unwrap(); // block 0 published
        push(&mut kv, SeqId(1), 14).unwrap(); // block 1 published (a "draft")
        kv.truncate(SeqId(1), 25).unwrap(); // the draft is undone
        let prompt: Vec<u32> = (0..40).collect();
        kv.add(SeqId(2)).unwrap();
        assert_eq!(kv.attach_prefix(SeqId(2), ns, &prompt).unwrap(), 16);
        // Truncating into the shared block is refused.
        assert!(kv.truncate(SeqId(1), 10).is_err());
        kv.truncate(SeqId(2), 16).unwrap();
    }
}
