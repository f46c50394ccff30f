//! Collectives for data-parallel training, and synchronised BatchNorm.
//!
//! [`Collective`] is the small interface a process group offers: its rank and size, an
//! element-wise sum of a tensor over the ranks, an all-gather of host values and a broadcast
//! of bytes. Its engines live elsewhere (MPI and NCCL in lean-train, behind features); here are
//! [`Local`] (one process: every collective is the identity) and [`ThreadGroup`] (ranks as
//! threads of one process, for tests and single-machine use).
//!
//! Synchronised BatchNorm ("SyncBN") normalises with statistics over the batches of every rank
//! instead of the local one. It is switched on for the current thread by
//! [`sync_batch_norm`]; train-mode [`crate::BatchNorm2d`] layers then combine their statistics
//! across the group in the forward pass and their gradient sums in the backward pass, so that
//! W ranks with batches of b normalise (and differentiate) exactly as one process with the
//! combined batch of W·b, up to the order of floating-point sums.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use std::cell::RefCell;
use std::fmt::Debug;
use std::sync::{Arc, Condvar, Mutex};

/// A process group: the collectives data-parallel training needs. Every rank must call the same
/// collectives in the same order with the same sizes; a call returns once every rank made it.
pub trait Collective: Send + Sync + Debug {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over the ranks of an f32 or f64 tensor of the same shape on every rank.
    /// Every rank receives the same values (same bits).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Each rank's `local` values (the same length on every rank), concatenated in rank order.
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>>;
    /// Rank `root`'s `bytes` on every rank (the other ranks' argument is ignored).
    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Result<Vec<u8>>;
}

pub(crate) fn collective_err(msg: impl Into<String>) -> Error {
    Error::Collective(msg.into())
}

/// The group of one process: every collective returns its input.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>, _root: usize) -> Result<Vec<u8>> {
        Ok(bytes)
    }
}

/// Ranks as threads of one process, exchanging through shared memory. Sums are taken in rank
/// order, so every rank gets the same bits.
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Exchange>,
}

#[derive(Debug)]
struct Exchange {
    world: usize,
    state: Mutex<Round>,
    turn: Condvar,
}

/// One exchange round: ranks deposit, then (once all have) read; the next round waits for the
/// last reader.
#[derive(Debug, Default)]
struct Round {
    slots: Vec<Option<Vec<u8>>>,
    filled: usize,
    readers: usize,
    draining: bool,
}

impl ThreadGroup {
    /// A group of `world` ranks: hand element `r` to the thread of rank `r`.
    pub fn new(world: usize) -> Vec<Arc<ThreadGroup>> {
        let shared = Arc::new(Exchange {
            world,
            state: Mutex::new(Round {
                slots: vec![None; world],
                ..Round::default()
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| {
                Arc::new(ThreadGroup {
                    rank,
                    shared: shared.clone(),
                })
            })
            .collect()
    }

    /// Every rank's bytes, in rank order.
    fn exchange(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let ex = &self.shared;
        let poisoned = |_| collective_err("a rank of the thread group panicked");
        let mut s = ex.state.lock().map_err(poisoned)?;
        while s.draining {
            s = ex.turn.wait(s).map_err(poisoned)?;
        }
        s.slots[self.rank] = Some(mine);
        s.filled += 1;
        if s.filled == ex.world {
            s.draining = true;
            ex.turn.notify_all();
        }
        while !s.draining {
            s = ex.turn.wait(s).map_err(poisoned)?;
        }
        let all: Vec<Vec<u8>> = s.slots.iter().map(|v| v.clone().unwrap_or_default()).collect();
        s.readers += 1;
        if s.readers == ex.world {
            *s = Round {
                slots: vec![None; ex.world],
                ..Round::default()
            };
            ex.turn.notify_all();
        }
        Ok(all)
    }
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f64(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let flat = t.flatten_all()?;
        let all = match t.dtype() {
            DType::F32 => {
                let v = flat.to_vec1::<f32>()?;
                let parts = self.exchange(v.iter().flat_map(|x| x.to_le_bytes()).collect())?;
                let mut sum = vec![0f32; v.len()];
                for p in &parts {
                    check_len(p.len(), 4 * v.len())?;
                    for (s, c) in sum.iter_mut().zip(p.chunks_exact(4)) {
                        *s += f32::from_le_bytes(c.try_into().expect("4 bytes"));
                    }
                }
                Tensor::new(sum, t.device())?
            }
            DType::F64 => {
                let v = flat.to_vec1::<f64>()?;
                let parts = self.exchange(f64_bytes(&v))?;
                let mut sum = vec![0f64; v.len()];
                for p in &parts {
                    check_len(p.len(), 8 * v.len())?;
                    sum.iter_mut().zip(bytes_f64(p)).for_each(|(s, x)| *s += x);
                }
                Tensor::new(sum, t.device())?
            }
            dtype => {
                return Err(Error::DType {
                    op: "all_reduce_sum",
                    dtype,
                })
            }
        };
        Ok(all.reshape(t.shape())?)
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        let parts = self.exchange(f64_bytes(local))?;
        let mut out = Vec::with_capacity(local.len() * parts.len());
        for p in &parts {
            check_len(p.len(), 8 * local.len())?;
            out.extend(bytes_f64(p));
        }
        Ok(out)
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Result<Vec<u8>> {
        if root >= self.shared.world {
            return Err(collective_err(format!(
                "broadcast root {root} is not a rank of this group of {}",
                self.shared.world
            )));
        }
        let mine = if self.rank == root { bytes } else { vec![] };
        Ok(self.exchange(mine)?.swap_remove(root))
    }
}

fn check_len(got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(collective_err(format!(
            "ranks disagree on the size of a collective: {got} bytes against {want}"
        )));
    }
    Ok(())
}

thread_local! {
    static SYNC_BN: RefCell<Option<Arc<dyn Collective>>> = const { RefCell::new(None) };
}

/// While alive, train-mode BatchNorm on this thread synchronises over its group; dropping it
/// restores what was in force before.
#[must_use = "SyncBN is on only while the scope lives"]
#[derive(Debug)]
pub struct SyncBatchNormScope {
    previous: Option<Arc<dyn Collective>>,
}

/// Turns on synchronised BatchNorm over `group` for this thread (see the module docs).
pub fn sync_batch_norm(group: Arc<dyn Collective>) -> SyncBatchNormScope {
    let previous = SYNC_BN.with(|s| s.borrow_mut().replace(group));
    SyncBatchNormScope { previous }
}

impl Drop for SyncBatchNormScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SYNC_BN.with(|s| *s.borrow_mut() = previous);
    }
}

/// The group train-mode BatchNorm synchronises over on this thread, if any.
pub(crate) fn sync_group() -> Option<Arc<dyn Collective>> {
    SYNC_BN.with(|s| s.borrow().clone())
}

/// Per-channel batch statistics of every rank combined: from this rank's `m` values per
/// channel with (biased) `mean` and `var`, the group's (mean, var, count). The combination
/// (Chan et al.'s pairwise formula, in rank order) is the same on every rank.
pub(crate) fn combine_moments(
    group: &dyn Collective,
    mean: &[f64],
    var: &[f64],
    m: usize,
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let c = mean.len();
    let mut local = Vec::with_capacity(1 + 2 * c);
    local.push(m as f64);
    local.extend_from_slice(mean);
    local.extend_from_slice(var);
    let all = group.all_gather_f64(&local)?;
    let ranks: Vec<&[f64]> = all.chunks_exact(1 + 2 * c).collect();
    let total: f64 = ranks.iter().map(|r| r[0]).sum();
    let gmean: Vec<f64> = (0..c)
        .map(|ch| ranks.iter().map(|r| r[0] * r[1 + ch]).sum::<f64>() / total)
        .collect();
    let gvar = (0..c)
        .map(|ch| {
            let s: f64 = ranks
                .iter()
                .map(|r| r[0] * (r[1 + c + ch] + (r[1 + ch] - gmean[ch]).powi(2)))
                .sum();
            s / total
        })
        .collect();
    Ok((gmean, gvar, total as usize))
}

/// Element-wise sums over the ranks of each rank's `local` values (the same length on every
/// rank), taken in rank order: the same bits on every rank. The identity in a group of one.
pub fn sum_over_ranks(group: &dyn Collective, local: &[f64]) -> Result<Vec<f64>> {
    if group.world_size() <= 1 {
        return Ok(local.to_vec());
    }
    let all = group.all_gather_f64(local)?;
    let mut sum = vec![0.0; local.len()];
    for part in all.chunks_exact(local.len().max(1)) {
        sum.iter_mut().zip(part).for_each(|(s, v)| *s += v);
    }
    Ok(sum)
}

/// [`sum_over_ranks`] of two per-channel vectors of the same length.
pub(crate) fn sum_over_group(group: &dyn Collective, parts: [&[f64]; 2]) -> Result<[Vec<f64>; 2]> {
    let c = parts[0].len();
    let mut sums = sum_over_ranks(group, &[parts[0], parts[1]].concat())?;
    let second = sums.split_off(c);
    Ok([sums, second])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn on_threads<T: Send + 'static>(
        world: usize,
        f: impl Fn(Arc<ThreadGroup>) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|g| {
                let f = f.clone();
                std::thread::spawn(move || f(g))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    }

    #[test]
    fn thread_group_collectives_agree_on_every_rank() {
        let out = on_threads(3, |g| {
            let r = g.rank() as f32;
            let mut got = vec![];
            // Several rounds back to back: a fast rank must not overtake the others.
            for round in 0..20 {
                let t = Tensor::new(&[r, 10.0 * r + round as f32], &Device::Cpu).unwrap();
                got.push(g.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap());
            }
            let gathered = g.all_gather_f64(&[g.rank() as f64; 2]).unwrap();
            let b = g.broadcast_bytes(vec![g.rank() as u8; 3 + g.rank()], 1).unwrap();
            (got, gathered, b)
        });
        for (got, gathered, b) in out {
            for (round, v) in got.iter().enumerate() {
                assert_eq!(v, &[3.0, 30.0 + 3.0 * round as f32]);
            }
            assert_eq!(gathered, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(b, vec![1u8; 4]);
        }
    }

    #[test]
    fn combined_moments_equal_those_of_the_whole_batch() {
        let data: Vec<Vec<f64>> = vec![vec![1.0, 2.0, 4.0], vec![-3.0, 0.5, 7.0, 9.0, 1e3]];
        let all: Vec<f64> = data.concat();
        let n = all.len() as f64;
        let mean = all.iter().sum::<f64>() / n;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let out = on_threads(2, move |g| {
            let d = &data[g.rank()];
            let m = d.iter().sum::<f64>() / d.len() as f64;
            let v = d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / d.len() as f64;
            combine_moments(g.as_ref(), &[m], &[v], d.len()).unwrap()
        });
        for (gm, gv, count) in out {
            assert_eq!(count, 8);
            assert!((gm[0] - mean).abs() < 1e-12 * mean.abs().max(1.0));
            assert!((gv[0] - var).abs() < 1e-12 * var);
        }
    }

    #[test]
    fn mismatched_sizes_are_an_error_not_garbage() {
        let out = on_threads(2, |g| g.all_gather_f64(&vec![1.0; 1 + g.rank()]).map(|_| ()));
        assert!(out
            .iter()
            .all(|r| matches!(r, Err(Error::Collective(m)) if m.contains("disagree"))));
    }
}
