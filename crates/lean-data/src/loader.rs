//! A batched loader: seeded shuffling, worker threads that decode and augment ahead of the
//! training loop (bounded prefetch), batches in order, tensors on any candle device.
//!
//! Randomness depends only on (seed, epoch, sample index): the same seed gives the same batches
//! whatever the number of workers, and a run resumed at an epoch sees the same data.

use crate::dataset::Dataset;
use crate::transforms::{Item, Pipeline};
use crate::{DataError, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Loader settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Reshuffle every epoch.
    pub shuffle: bool,
    /// Seed of the shuffling and the augmentation.
    pub seed: u64,
    /// Drop a last, incomplete batch.
    pub drop_last: bool,
    /// Worker threads (0 = decode on the calling thread).
    pub workers: usize,
    /// Batches prepared ahead per worker.
    pub prefetch: usize,
    /// This process's part of every epoch in data-parallel training.
    pub shard: Shard,
}

/// One rank's share of each epoch, by the rule of PyTorch's `DistributedSampler`: the epoch's
/// order (shuffled as for one process) is split round-robin, rank r taking positions r, r + W,
/// r + 2W, ... With `pad`, the order is first extended by its own first samples to a multiple of
/// W, so that every rank has as many samples (training: ranks step in lockstep); without, each
/// sample is seen exactly once and shards differ by at most one (evaluation).
///
/// With batches of b per rank, step k of rank r sees positions (k·b + j)·W + r: together the
/// ranks' k-th batches are the k-th batch of b·W of one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Pad the order to a multiple of `world`.
    pub pad: bool,
}

impl Default for Shard {
    /// The whole data set (one process).
    fn default() -> Self {
        Shard {
            rank: 0,
            world: 1,
            pad: false,
        }
    }
}

impl Shard {
    /// This rank's positions of an epoch's order.
    pub fn take(&self, order: Vec<usize>) -> Vec<usize> {
        if self.world <= 1 {
            return order;
        }
        let n = order.len();
        let total = if self.pad {
            n.div_ceil(self.world) * self.world
        } else {
            n
        };
        (self.rank..total).step_by(self.world).map(|p| order[p % n]).collect()
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            shuffle: true,
            seed: 0,
            drop_last: false,
            workers: 2,
            prefetch: 2,
            shard: Shard::default(),
        }
    }
}

/// One batch: images (N, C, H, W) f32 and targets — classes (N) u32, or masks (N, H, W) u32.
#[derive(Debug)]
pub struct Batch {
    /// The images.
    pub images: Tensor,
    /// The targets.
    pub targets: Tensor,
    /// The data-set indices of the samples.
    pub indices: Vec<usize>,
}

/// Mixes a seed with two counters (SplitMix64 finaliser).
pub fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Host-side batch before it becomes tensors.
struct RawBatch {
    shape: [usize; 3],
    pixels: Vec<f32>,
    targets: Vec<u32>,
    mask_hw: Option<(usize, usize)>,
    indices: Vec<usize>,
}

fn make_batch(ds: &dyn Dataset, pipe: &Pipeline, seed: u64, epoch: u64, indices: &[usize]) -> Result<RawBatch> {
    let mut items: Vec<Item> = Vec::with_capacity(indices.len());
    for &i in indices {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix_seed(seed, epoch, i as u64));
        items.push(pipe.apply(&ds.get(i)?, &mut rng));
    }
    let first = &items[0].image;
    let shape = [first.c, first.h, first.w];
    let mut pixels = Vec::with_capacity(items.len() * shape.iter().product::<usize>());
    let mut targets = vec![];
    for (it, &i) in items.iter().zip(indices) {
        if [it.image.c, it.image.h, it.image.w] != shape {
            return Err(DataError::Batch(format!(
                "sample {i} is {:?} after the transforms, the batch's first is {shape:?}: add a resize or crop",
                [it.image.c, it.image.h, it.image.w]
            )));
        }
        pixels.extend_from_slice(&it.image.data);
        match (&it.mask, it.class) {
            (Some(m), _) => targets.extend(m.iter().map(|&v| v as u32)),
            (None, Some(c)) => targets.push(c),
            (None, None) => unreachable!("every item has a class or a mask"),
        }
    }
    let mask_hw = items[0].mask.as_ref().map(|_| (shape[1], shape[2]));
    Ok(RawBatch {
        shape,
        pixels,
        targets,
        mask_hw,
        indices: indices.to_vec(),
    })
}

/// Batches over a data set with a transform pipeline.
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    pipeline: Arc<Pipeline>,
    cfg: LoaderConfig,
    device: Device,
}

impl Loader {
    /// A loader of `dataset` through `pipeline`, producing tensors on `device`.
    pub fn new(dataset: Arc<dyn Dataset>, pipeline: Pipeline, cfg: LoaderConfig, device: Device) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(DataError::Batch("batch_size must be at least 1".into()));
        }
        if cfg.shard.world == 0 || cfg.shard.rank >= cfg.shard.world {
            return Err(DataError::Batch(format!(
                "shard rank {} is not a rank of a group of {}",
                cfg.shard.rank, cfg.shard.world
            )));
        }
        Ok(Loader {
            dataset,
            pipeline: Arc::new(pipeline),
            cfg,
            device,
        })
    }

    /// Samples of an epoch (this rank's share when sharded).
    pub fn num_samples(&self) -> usize {
        let (n, s) = (self.dataset.len(), self.cfg.shard);
        match (s.world, s.pad) {
            (0 | 1, _) => n,
            (w, true) => n.div_ceil(w),
            (w, false) => n / w + usize::from(s.rank < n % w),
        }
    }

    /// Number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.num_samples(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of `epoch` (this rank's share of it when sharded), split into batches.
    pub fn batches_of(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix_seed(
                self.cfg.seed,
                epoch,
                u64::MAX,
            )));
        }
        let order = self.cfg.shard.take(order);
        let mut batches: Vec<Vec<usize>> = order.chunks(self.cfg.batch_size).map(<[usize]>::to_vec).collect();
        if self.cfg.drop_last && batches.last().is_some_and(|b| b.len() < self.cfg.batch_size) {
            batches.pop();
        }
        batches
    }

    /// The batches of `epoch`, in order, prepared by the workers.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let batches = Arc::new(self.batches_of(epoch));
        let total = batches.len();
        let workers = self.cfg.workers.min(total);
        let mut receivers = vec![];
        let mut handles = vec![];
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
            let (ds, pipe, batches, seed) = (
                self.dataset.clone(),
                self.pipeline.clone(),
                batches.clone(),
                self.cfg.seed,
            );
            handles.push(std::thread::spawn(move || {
                for b in (w..batches.len()).step_by(workers) {
                    let r = make_batch(ds.as_ref(), &pipe, seed, epoch, &batches[b]);
                    if tx.send((b, r)).is_err() {
                        return; // the iterator was dropped
                    }
                }
            }));
            receivers.push(rx);
        }
        EpochIter {
            next: 0,
            total,
            batches,
            receivers,
            handles,
            pending: BTreeMap::new(),
            dataset: self.dataset.clone(),
            pipeline: self.pipeline.clone(),
            seed: self.cfg.seed,
            epoch,
            device: self.device.clone(),
        }
    }
}

/// The batches of one epoch.
pub struct EpochIter {
    next: usize,
    total: usize,
    batches: Arc<Vec<Vec<usize>>>,
    receivers: Vec<Receiver<(usize, Result<RawBatch>)>>,
    handles: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Result<RawBatch>>,
    dataset: Arc<dyn Dataset>,
    pipeline: Arc<Pipeline>,
    seed: u64,
    epoch: u64,
    device: Device,
}

impl EpochIter {
    fn raw(&mut self, b: usize) -> Result<RawBatch> {
        if self.receivers.is_empty() {
            return make_batch(
                self.dataset.as_ref(),
                &self.pipeline,
                self.seed,
                self.epoch,
                &self.batches[b],
            );
        }
        // Batch b comes from worker b % workers, in that worker's order.
        while !self.pending.contains_key(&b) {
            let w = b % self.receivers.len();
            match self.receivers[w].recv() {
                Ok((i, r)) => {
                    self.pending.insert(i, r);
                }
                Err(_) => return Err(DataError::Batch(format!("loader worker {w} stopped"))),
            }
        }
        self.pending.remove(&b).expect("present")
    }

    fn to_tensors(&self, r: RawBatch) -> Result<Batch> {
        let n = r.indices.len();
        let [c, h, w] = r.shape;
        let images = Tensor::from_vec(r.pixels, (n, c, h, w), &self.device)?;
        let targets = match r.mask_hw {
            Some((mh, mw)) => Tensor::from_vec(r.targets, (n, mh, mw), &self.device)?,
            None => Tensor::from_vec(r.targets, n, &self.device)?,
        };
        Ok(Batch {
            images,
            targets,
            indices: r.indices,
        })
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let b = self.next;
        self.next += 1;
        Some(self.raw(b).and_then(|r| self.to_tensors(r)))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
