//! The MPI engine (feature `mpi`): the ranks of `mpirun -np N ...`, on one machine or many,
//! through the `mpi` crate over the system's MPI library (Open MPI: Debian's `openmpi-bin` and
//! `libopenmpi-dev`).
//!
//! MPI's handles may not cross threads, and a [`Collective`] is shared by the model's ops, so
//! one thread owns MPI (initialised with `MPI_THREAD_FUNNELED`: only it calls MPI) and serves
//! the collectives that [`MpiGroup`] forwards to it over a channel. Dropping the last handle
//! finalises MPI.

use super::Collective;
use candle_core::{DType, Tensor};
use lean_ops::Error as OpsError;
use mpi::collective::SystemOperation;
use mpi::traits::*;
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

type Reply<T> = SyncSender<Result<T, String>>;

enum Request {
    SumF32(Vec<f32>, Reply<Vec<f32>>),
    SumF64(Vec<f64>, Reply<Vec<f64>>),
    GatherF64(Vec<f64>, Reply<Vec<f64>>),
    Broadcast(Vec<u8>, usize, Reply<Vec<u8>>),
    Abort(i32),
}

/// The world of an MPI launch as a [`Collective`].
#[derive(Debug)]
pub struct MpiGroup {
    rank: usize,
    world: usize,
    requests: Mutex<Option<Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mpi request")
    }
}

impl MpiGroup {
    /// Initialises MPI (once per process) on its own thread and joins the world.
    pub fn init() -> crate::Result<MpiGroup> {
        let (tx, rx) = channel::<Request>();
        let (ready_tx, ready_rx) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("mpi".into())
            .spawn(move || {
                let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
                    let _ = ready_tx.send(Err("MPI is already initialised in this process".to_string()));
                    return;
                };
                let world = universe.world();
                let _ = ready_tx.send(Ok((world.rank() as usize, world.size() as usize)));
                while let Ok(req) = rx.recv() {
                    serve(&world, req);
                }
                // Dropping the universe calls MPI_Finalize.
            })
            .map_err(|e| crate::Error::Distributed(format!("cannot start the MPI thread: {e}")))?;
        let (rank, world) = ready_rx
            .recv()
            .map_err(|_| crate::Error::Distributed("the MPI thread died while initialising".into()))?
            .map_err(crate::Error::Distributed)?;
        Ok(MpiGroup {
            rank,
            world,
            requests: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Ends every rank of the launch with `code` (`MPI_Abort`): what a rank does on an error,
    /// so that the others do not wait forever in their next collective.
    pub fn abort(&self, code: i32) {
        if let Ok(Some(tx)) = self.requests.lock().as_deref() {
            let _ = tx.send(Request::Abort(code));
        }
        // MPI_Abort does not return; should it, leave anyway.
        std::thread::sleep(std::time::Duration::from_secs(5));
        std::process::exit(code);
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> lean_ops::Result<T> {
        let (tx, rx) = sync_channel(1);
        {
            let guard = self
                .requests
                .lock()
                .map_err(|_| OpsError::Collective("the MPI request queue is poisoned".into()))?;
            let queue = guard
                .as_ref()
                .ok_or_else(|| OpsError::Collective("MPI is finalised".into()))?;
            queue
                .send(make(tx))
                .map_err(|_| OpsError::Collective("the MPI thread has stopped".into()))?;
        }
        rx.recv()
            .map_err(|_| OpsError::Collective("the MPI thread has stopped".into()))?
            .map_err(OpsError::Collective)
    }
}

impl Drop for MpiGroup {
    fn drop(&mut self) {
        if let Ok(mut q) = self.requests.lock() {
            q.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// The same count on every rank, or an error naming both (MPI itself would read past buffers).
fn same_len(world: &impl Communicator, n: usize) -> Result<(), String> {
    let mut all = vec![0u64; world.size() as usize];
    world.all_gather_into(&(n as u64), &mut all[..]);
    match all.iter().enumerate().find(|(_, &m)| m != n as u64) {
        Some((r, m)) => Err(format!(
            "ranks disagree on the size of a collective: {n} values on rank {}, {m} on rank {r}",
            world.rank()
        )),
        None => Ok(()),
    }
}

fn serve(world: &impl Communicator, req: Request) {
    match req {
        Request::SumF32(v, reply) => {
            let r = same_len(world, v.len()).map(|_| {
                let mut out = vec![0f32; v.len()];
                world.all_reduce_into(&v[..], &mut out[..], SystemOperation::sum());
                out
            });
            let _ = reply.send(r);
        }
        Request::SumF64(v, reply) => {
            let r = same_len(world, v.len()).map(|_| {
                let mut out = vec![0f64; v.len()];
                world.all_reduce_into(&v[..], &mut out[..], SystemOperation::sum());
                out
            });
            let _ = reply.send(r);
        }
        Request::GatherF64(v, reply) => {
            let r = same_len(world, v.len()).map(|_| {
                let mut out = vec![0f64; v.len() * world.size() as usize];
                world.all_gather_into(&v[..], &mut out[..]);
                out
            });
            let _ = reply.send(r);
        }
        Request::Broadcast(mut bytes, root, reply) => {
            let root = world.process_at_rank(root as i32);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
            let _ = reply.send(Ok(bytes));
        }
        Request::Abort(code) => world.abort(code),
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> lean_ops::Result<Tensor> {
        let flat = t.flatten_all()?;
        let sum = match t.dtype() {
            DType::F32 => {
                let v = flat.to_vec1::<f32>()?;
                Tensor::new(self.call(|r| Request::SumF32(v, r))?, t.device())?
            }
            DType::F64 => {
                let v = flat.to_vec1::<f64>()?;
                Tensor::new(self.call(|r| Request::SumF64(v, r))?, t.device())?
            }
            dtype => {
                return Err(OpsError::DType {
                    op: "all_reduce_sum",
                    dtype,
                })
            }
        };
        Ok(sum.reshape(t.shape())?)
    }
    fn all_gather_f64(&self, local: &[f64]) -> lean_ops::Result<Vec<f64>> {
        let v = local.to_vec();
        self.call(|r| Request::GatherF64(v, r))
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> lean_ops::Result<Vec<u8>> {
        if root >= self.world {
            return Err(OpsError::Collective(format!(
                "broadcast root {root} is not a rank of this world of {}",
                self.world
            )));
        }
        self.call(|r| Request::Broadcast(bytes, root, r))
    }
}
