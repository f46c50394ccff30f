//! Data-parallel training: the pieces a [`crate::Trainer`] uses when it is one rank of a
//! process group ([`Collective`]).
//!
//! Each rank reads its shard of every epoch ([`lean_data::Shard`], PyTorch's
//! `DistributedSampler` rule), runs forward and backward on its own batch, and the gradients
//! are summed over the ranks in buckets of about [`BUCKET_BYTES`] and divided by the number of
//! ranks ([`average_gradients`]): every rank then takes the same optimizer step, as one process
//! with the combined batch would. BatchNorm optionally normalises over the combined batch too
//! (SyncBN, [`lean_ops::dist::sync_batch_norm`]); without it each rank's running statistics
//! are replaced by rank 0's before evaluation and checkpoints ([`broadcast_vars`]), as
//! PyTorch's DistributedDataParallel does with its buffers. Rank 0 alone writes the run folder.
//!
//! The engines: [`Local`] and [`ThreadGroup`] here, MPI ([`mpi`], feature `mpi`) for
//! processes on one or several machines, NCCL ([`nccl`], feature `nccl`) for a GPU per rank.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
pub use lean_ops::dist::{sum_over_ranks, Collective, Local, ThreadGroup};

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

/// The (rank, number of ranks) an MPI launcher (`mpirun`, `srun`) gave this process, read from
/// its environment (Open MPI's, MPICH's / Intel MPI's or PMIx's variables); None outside one.
pub fn launcher_rank() -> Option<(usize, usize)> {
    let var = |k: &str| std::env::var(k).ok()?.parse::<usize>().ok();
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
    ]
    .iter()
    .find_map(|(r, n)| Some((var(r)?, var(n)?)))
}

/// Gradient bytes all-reduced at once (PyTorch DDP's default bucket, 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

fn dist_err(e: lean_ops::Error) -> Error {
    Error::Distributed(e.to_string())
}

/// Replaces the gradient of each of `params` by its mean over the ranks of `group`, summing
/// in buckets of up to `bucket_bytes`. A parameter without a gradient counts as zero (every
/// rank runs the same graph, so the same ones are missing everywhere).
pub fn average_gradients(
    group: &dyn Collective,
    grads: &mut GradStore,
    params: &[Var],
    bucket_bytes: usize,
) -> Result<()> {
    let world = group.world_size();
    if world <= 1 {
        return Ok(());
    }
    let mut bucket: Vec<&Var> = vec![];
    let mut bytes = 0;
    for (i, p) in params.iter().enumerate() {
        bucket.push(p);
        bytes += p.elem_count() * p.dtype().size_in_bytes();
        if bytes >= bucket_bytes || i + 1 == params.len() {
            reduce_bucket(group, grads, &bucket, world)?;
            (bucket, bytes) = (vec![], 0);
        }
    }
    Ok(())
}

fn reduce_bucket(group: &dyn Collective, grads: &mut GradStore, bucket: &[&Var], world: usize) -> Result<()> {
    let flat: Vec<Tensor> = bucket
        .iter()
        .map(|p| match grads.get(p.as_tensor()) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
            None => Tensor::zeros(p.elem_count(), DType::F32, p.device()),
        })
        .collect::<candle_core::Result<_>>()?;
    let summed = group.all_reduce_sum(&Tensor::cat(&flat, 0)?).map_err(dist_err)?;
    let mean = (summed / world as f64)?;
    let mut at = 0;
    for p in bucket {
        let n = p.elem_count();
        let g = mean.narrow(0, at, n)?.reshape(p.shape())?.to_dtype(p.dtype())?;
        grads.insert(p.as_tensor(), g);
        at += n;
    }
    Ok(())
}

/// Sets `vars` on every rank to their values on rank `root`.
pub fn broadcast_vars(group: &dyn Collective, vars: &[Var], root: usize) -> Result<()> {
    if group.world_size() <= 1 {
        return Ok(());
    }
    for v in vars {
        let t = v.as_tensor();
        let bytes = if group.rank() == root { tensor_bytes(t)? } else { vec![] };
        let got = group.broadcast_bytes(bytes, root).map_err(dist_err)?;
        let want = t.elem_count() * t.dtype().size_in_bytes();
        if got.len() != want {
            return Err(Error::Distributed(format!(
                "rank {root} sent {} bytes for a variable of shape {:?} ({want} bytes here): the ranks built different models",
                got.len(),
                t.dims()
            )));
        }
        v.set(&Tensor::from_raw_buffer(&got, t.dtype(), t.dims(), t.device())?)?;
    }
    Ok(())
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U32 => t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        d => return Err(Error::Distributed(format!("cannot broadcast a {d:?} variable"))),
    })
}

/// Fails unless every rank holds the same `vars` (compared by a checksum of their values):
/// after each epoch, so that ranks that drifted apart are an error, not a silent mix.
pub fn check_in_step(group: &dyn Collective, vars: &[Var]) -> Result<()> {
    if group.world_size() <= 1 {
        return Ok(());
    }
    // One sequential pass on the host: the same bits on every rank whatever its thread count.
    let mut sum = [0f64; 2];
    for v in vars {
        for x in v.as_tensor().to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()? {
            sum[0] += x;
            sum[1] += x * x;
        }
    }
    let all = group.all_gather_f64(&sum).map_err(dist_err)?;
    if let Some((r, _)) = all.chunks_exact(2).enumerate().find(|(_, c)| *c != sum) {
        return Err(Error::Distributed(format!(
            "rank {} and rank {r} hold different weights (checksums {sum:?} and {:?}): the ranks diverged",
            group.rank(),
            &all[2 * r..2 * r + 2]
        )));
    }
    Ok(())
}
