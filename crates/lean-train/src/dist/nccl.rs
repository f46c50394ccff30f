//! The NCCL engine (feature `nccl`): one GPU per rank of an MPI launch. Gradients on the GPU are
//! summed by NCCL's all-reduce, device to device; MPI bootstraps NCCL (rank 0's unique id is
//! broadcast to the others) and carries the small host-side collectives (statistics, counts,
//! the run folder's name).
//!
//! As with MPI, NCCL's communicator may not cross threads: one thread owns it and runs the
//! all-reduces [`NcclGroup`] forwards to it. Built and type-checked on machines without a GPU
//! (CI's `scripts/cuda-toolchain.sh check`); it has not yet run on a GPU.

use super::mpi::MpiGroup;
use super::Collective;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use lean_ops::Error as OpsError;
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

type Job = (Tensor, SyncSender<Result<Tensor, String>>);

/// An MPI world whose ranks each drive one GPU, with NCCL for the tensor collectives.
#[derive(Debug)]
pub struct NcclGroup {
    mpi: MpiGroup,
    device: Device,
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The local rank of an MPI launch (the rank among the processes of this machine), which picks
/// this process's GPU; 0 outside a launch.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(0)
}

impl NcclGroup {
    /// Joins the MPI world, gives this process GPU number `local_rank()` of those visible as
    /// its only one (`CUDA_VISIBLE_DEVICES`, so that it is `cuda:0` here and in checkpoints) and
    /// sets up NCCL over it. Every rank calls it at the same point, before anything opens a
    /// CUDA device.
    pub fn init() -> crate::Result<NcclGroup> {
        let err = |e: String| crate::Error::Distributed(e);
        let local = local_rank();
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
        let gpus: Vec<&str> = visible.split(',').filter(|s| !s.is_empty()).collect();
        let mine = match gpus.get(local) {
            Some(g) => g.to_string(),
            None if gpus.is_empty() => local.to_string(),
            None => {
                return Err(err(format!(
                    "local rank {local} has no GPU: CUDA_VISIBLE_DEVICES lists {} ({visible})",
                    gpus.len()
                )))
            }
        };
        std::env::set_var("CUDA_VISIBLE_DEVICES", &mine);
        let mpi = MpiGroup::init()?;
        let device = Device::new_cuda(0)?;
        // Rank 0 makes the id, MPI hands it to the others.
        let id = if mpi.rank() == 0 {
            let id = Id::new().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![]
        };
        let id = mpi.broadcast_bytes(id, 0).map_err(|e| err(e.to_string()))?;
        let internal: [std::ffi::c_char; 128] =
            std::array::from_fn(|i| id.get(i).copied().unwrap_or(0) as std::ffi::c_char);
        let (rank, world) = (mpi.rank(), mpi.world_size());
        let stream = device.as_cuda_device()?.cuda_stream();
        let (tx, rx) = channel::<Job>();
        let (ready_tx, ready_rx) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("nccl".into())
            .spawn(move || {
                let comm = match Comm::from_rank(stream, rank, world, Id::uninit(internal)) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("ncclCommInitRank: {e:?}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Ok((t, reply)) = rx.recv() {
                    let r = t
                        .apply_op1_no_bwd(&AllReduce { comm: &comm })
                        .map_err(|e| e.to_string());
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| err(format!("cannot start the NCCL thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| err("the NCCL thread died while initialising".into()))?
            .map_err(err)?;
        Ok(NcclGroup {
            mpi,
            device,
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// This rank's GPU.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Ends every rank of the launch (see [`MpiGroup::abort`]).
    pub fn abort(&self, code: i32) {
        self.mpi.abort(code)
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if let Ok(mut q) = self.jobs.lock() {
            q.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// Sum over the ranks of a contiguous f32 tensor on the GPU, as a candle op (the way to make a
/// tensor of a new CUDA buffer).
struct AllReduce<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("nccl-all-reduce: the tensor is on the CPU")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let dev = s.device.clone();
        let src = s.as_cuda_slice::<f32>()?;
        let src = match l.contiguous_offsets() {
            Some((start, end)) => src.slice(start..end),
            None => candle_core::bail!("nccl-all-reduce: the tensor is not contiguous"),
        };
        let mut dst = dev.alloc_zeros::<f32>(n)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn world_size(&self) -> usize {
        self.mpi.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> lean_ops::Result<Tensor> {
        if !t.device().is_cuda() || t.dtype() != candle_core::DType::F32 {
            return self.mpi.all_reduce_sum(t);
        }
        let (tx, rx) = sync_channel(1);
        {
            let guard = self
                .jobs
                .lock()
                .map_err(|_| OpsError::Collective("the NCCL job queue is poisoned".into()))?;
            let jobs = guard
                .as_ref()
                .ok_or_else(|| OpsError::Collective("NCCL is shut down".into()))?;
            jobs.send((t.contiguous()?, tx))
                .map_err(|_| OpsError::Collective("the NCCL thread has stopped".into()))?;
        }
        rx.recv()
            .map_err(|_| OpsError::Collective("the NCCL thread has stopped".into()))?
            .map_err(OpsError::Collective)
    }
    fn all_gather_f64(&self, local: &[f64]) -> lean_ops::Result<Vec<f64>> {
        self.mpi.all_gather_f64(local)
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> lean_ops::Result<Vec<u8>> {
        self.mpi.broadcast_bytes(bytes, root)
    }
}
