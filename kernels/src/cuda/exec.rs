//! Where the kernels run: a GPU through cudarc ([`super::device::Gpu`]) or the CPU
//! emulator ([`super::emu::Emu`]), behind one interface: device buffers, a kernel launched
//! by name with its arguments, and the f16 matrix product. The step's device work
//! (`step/`) and the parity tests are written once against it, so the emulator runs the
//! same launches, with the same grids and argument lists, as the GPU.

use cudarc::driver::{DeviceRepr, LaunchConfig, ValidAsZeroBits};
use half::f16;
use std::ops::Range;

/// An element type of device buffers, with its letter in the emulator's kernel
/// signatures (f16 `h`, f32 `f`, u32 `u`, i32 `i`, u64 `l`, u8 `b`).
pub trait Elem:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + std::fmt::Debug + 'static
{
    const CODE: u8;
}

macro_rules! elem {
    ($($t:ty => $c:literal),*) => { $(impl Elem for $t { const CODE: u8 = $c; })* };
}
elem!(f16 => b'h', f32 => b'f', u32 => b'u', i32 => b'i', u64 => b'l', u8 => b'b');

/// One kernel argument, as the kernels take them: a device address (with its element
/// type) or a scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr {
        addr: u64,
        elem: u8,
    },
    /// A null pointer (the kernels' optional inputs).
    Null,
    I32(i32),
    U32(u32),
    F32(f32),
    U64(u64),
}

/// A device buffer of `T`s.
pub trait DevBuf<T: Elem> {
    /// Its device address.
    fn addr(&self) -> u64;
    /// Its length in elements.
    fn elems(&self) -> usize;
    /// The buffer as a kernel argument.
    fn arg(&self) -> Arg {
        Arg::Ptr {
            addr: self.addr(),
            elem: T::CODE,
        }
    }
    /// Elements `r` of the buffer as a kernel argument (a pointer to the first), or an
    /// error when `r` is not inside the buffer.
    fn arg_at(&self, r: Range<usize>) -> Result<Arg, ExecError> {
        self.arg_at_as::<T>(r)
    }
    /// Elements `r` as a kernel argument pointing at `U`s: the staging buffer's words hold
    /// the sampling parameters (f32, i32, u64), laid out for their alignment.
    fn arg_at_as<U: Elem>(&self, r: Range<usize>) -> Result<Arg, ExecError> {
        let addr = self.addr() + (r.start * std::mem::size_of::<T>()) as u64;
        if r.start > r.end
            || r.end > self.elems()
            || !addr.is_multiple_of(std::mem::align_of::<U>() as u64)
        {
            return Err(ExecError::Bounds(format!(
                "elements {r:?} of a buffer of {} (as {})",
                self.elems(),
                std::any::type_name::<U>()
            )));
        }
        Ok(Arg::Ptr {
            addr,
            elem: U::CODE,
        })
    }
}

/// Why a launch, copy or allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("{0}")]
    Gpu(#[from] super::device::GpuError),
    /// The emulator refused a launch or a kernel failed in it.
    #[error("emulator: {0}")]
    Emu(String),
    /// A launch's extents exceed its buffers.
    #[error("{0}")]
    Bounds(String),
}

/// A device the kernels run on. Work is in stream order: a download sees every launch
/// before it.
pub trait Exec: Send {
    type Buf<T: Elem>: DevBuf<T> + Send;
    /// Host memory that staging words are written into before [`Exec::send`]
    /// (page-locked on a GPU).
    type Host: Send;
    /// A captured sequence of launches, replayed as one: a CUDA graph on a GPU, the
    /// recorded launches in the emulator.
    type Graph: Send;

    /// A zeroed buffer of `n` elements.
    fn zeros<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>, ExecError>;
    /// A buffer holding `v`.
    fn upload<T: Elem>(&self, v: &[T]) -> Result<Self::Buf<T>, ExecError>;
    /// The first `n` elements of `b`.
    fn download<T: Elem>(&self, b: &Self::Buf<T>, n: usize) -> Result<Vec<T>, ExecError>;
    /// Elements `r` of `b`.
    fn download_at<T: Elem>(&self, b: &Self::Buf<T>, r: Range<usize>) -> Result<Vec<T>, ExecError>;
    /// Launches `kernel` over `cfg` with `args` (enqueued on a GPU; run to completion in
    /// the emulator).
    fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<(), ExecError>;
    /// `y[rows × n] = x[rows × k] · w[n × k]ᵀ`, with `w` starting `w_row0` rows in: f16
    /// inputs, f32 accumulation and output.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: &Self::Buf<f16>,
        w: &Self::Buf<f16>,
        w_row0: usize,
        y: &mut Self::Buf<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), ExecError>;
    /// Host staging memory for `n` words.
    fn host(&self, n: usize) -> Result<Self::Host, ExecError>;
    /// The words of `h`, to read or write (waits for the last copy into or out of them to
    /// finish).
    fn host_words<'a>(&self, h: &'a mut Self::Host) -> Result<&'a mut [u32], ExecError>;
    /// Enqueues the copy of words `r` of `h` into the same words of `dst`.
    fn send(
        &self,
        h: &Self::Host,
        r: Range<usize>,
        dst: &mut Self::Buf<u32>,
    ) -> Result<(), ExecError>;
    /// Enqueues the copy of elements `r` of `src` (of 4 bytes each: tokens, logits) into
    /// the words of `h` from word `at`, as their bits (read them through
    /// [`Exec::host_words`], which waits for it).
    fn receive<T: Elem>(
        &self,
        src: &Self::Buf<T>,
        r: Range<usize>,
        h: &mut Self::Host,
        at: usize,
    ) -> Result<(), ExecError>;
    /// Starts capturing: launches and products are recorded into a graph, not run.
    fn begin_capture(&self) -> Result<(), ExecError>;
    /// Ends the capture begun last (always leaving capture mode) and returns its graph.
    fn end_capture(&self) -> Result<Self::Graph, ExecError>;
    /// Enqueues a captured graph: its launches, with the arguments they were captured with.
    fn replay(&self, g: &Self::Graph) -> Result<(), ExecError>;
    /// Device memory free now, in bytes (to size the KV cache from what is left).
    fn free_memory(&self) -> Result<usize, ExecError>;
    /// Makes the device current on the calling thread. A step calls it first: the engine
    /// steps on another thread than the one that opened the device, and the cuBLAS call
    /// and the staging copy run in whatever context is current (with several GPUs,
    /// possibly another device's).
    fn make_current(&self) -> Result<(), ExecError>;
    /// The most threads a block of `kernel` may have (on a GPU, what its registers per
    /// thread allow).
    fn max_threads(&self, kernel: &str) -> Result<usize, ExecError>;
    /// Its multiprocessors (SMs): how many blocks run side by side, to size a launch's
    /// grid (the attention split of a step with few rows).
    fn multiprocessors(&self) -> Result<usize, ExecError>;
    /// The most shared memory one block may have, static and dynamic together (Hopper:
    /// 227 KB; the `gemv` kernels' staged rows take what their shape needs).
    fn max_shared_bytes(&self) -> Result<usize, ExecError>;
    /// Waits for all enqueued work.
    fn synchronize(&self) -> Result<(), ExecError>;
    /// Whether kernels launch as programmatic dependent launches (each may be scheduled
    /// while the one before it runs, and waits inside for it: [`super::launch`]).
    fn dependent_launch(&self) -> bool {
        false
    }
    /// Turns dependent launches on or off from the next launch on, where the device has
    /// them; says whether they are on.
    fn set_dependent_launch(&self, _on: bool) -> bool {
        false
    }
    /// What it is, for logs and reports.
    fn describe(&self) -> String;
}

/// Checks a copy of elements `r` of a buffer of `len` `T`s into `words` host words from
/// word `at`: `T` of one word, `r` inside the buffer, and room for it.
pub(super) fn check_receive<T: Elem>(
    r: &Range<usize>,
    len: usize,
    words: usize,
    at: usize,
) -> Result<(), ExecError> {
    let room = words.saturating_sub(at);
    if std::mem::size_of::<T>() != 4
        || r.start > r.end
        || r.end > len
        || at > words
        || r.len() > room
    {
        return Err(ExecError::Bounds(format!(
            "receiving elements {r:?} of a buffer of {len} {} into words from {at} of {words}",
            std::any::type_name::<T>()
        )));
    }
    Ok(())
}

/// Checks a copy of words `r` from host words (`words` of them) into the same words of a
/// device buffer of `len`.
pub(super) fn check_send(r: &Range<usize>, len: usize, words: usize) -> Result<(), ExecError> {
    if r.start > r.end || r.end > len || r.end > words {
        return Err(ExecError::Bounds(format!(
            "sending words {r:?} into a buffer of {len} from {words} words"
        )));
    }
    Ok(())
}

/// Checks a product's extents against its buffers.
pub(super) fn check_gemm(
    lens: (usize, usize, usize),
    w_row0: usize,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    let (x, w, y) = lens;
    if rows * k > x || (w_row0 + n) * k > w || rows * n > y {
        return Err(ExecError::Bounds(format!(
            "gemm of {rows}×{k} by rows {w_row0}..{} of a {k}-wide matrix into {rows}×{n} \
             exceeds its buffers ({x}, {w}, {y} elements)",
            w_row0 + n
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer's address and length, which is all `arg_at` reads.
    struct At(u64, usize);
    impl DevBuf<u32> for At {
        fn addr(&self) -> u64 {
            self.0
        }
        fn elems(&self) -> usize {
            self.1
        }
    }

    #[test]
    fn sub_buffer_arguments_stay_inside_and_aligned() {
        let b = At(4096, 10);
        assert_eq!(
            b.arg_at(2..5).unwrap(),
            Arg::Ptr {
                addr: 4104,
                elem: b'u'
            }
        );
        assert_eq!(
            b.arg_at_as::<u64>(2..6).unwrap(),
            Arg::Ptr {
                addr: 4104,
                elem: b'l'
            }
        );
        assert!(b.arg_at(8..11).is_err(), "past the end");
        assert!(b.arg_at_as::<u64>(1..3).is_err(), "u64s at an odd word");
        assert!(b.arg_at(10..10).is_ok(), "an empty range at the end");
    }
}
