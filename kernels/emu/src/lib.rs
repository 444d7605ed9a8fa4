//! Arqon Serve's CUDA kernels, run on the host.
//!
//! `build.rs` compiles every `kernels/cuda/*.cu` as C++ against `include/emu.h`
//! (the CUDA subset the kernels use) into one shared object per source, as nvcc
//! makes one module per source; [`Emulator::entry`] looks an entry point up by
//! its name, as `cuModuleGetFunction` does, and [`Emulator::launch`] runs a
//! grid of blocks with each thread a fiber (`runtime/runtime.cpp`). So the very
//! sources the GPU runs are checked against the CPU references by `cargo test`
//! on any Linux machine, with what a GPU run alone would show:
//!   - barriers some threads never reach, and full-mask shuffles after lanes
//!     returned, are errors;
//!   - [`Order::Reverse`] runs the blocks, and each block's threads, from the
//!     last, so a read of shared memory that lacks its `__syncthreads`, or of
//!     global memory another block writes, sees the other value;
//!   - a [`Buffer`] ends exactly where an inaccessible page begins and starts out
//!     filled with 0xff bytes (NaN, or -1), so reads past its end stop the
//!     process with the kernel's name and unwritten outputs show.
//!
//! It is a correctness tool: nothing here is timed, and a kernel's speed says
//! nothing about the GPU's.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

/// Where build.rs put the shared objects.
const DIR: &str = env!("OUT_DIR");

/// The order blocks run in, and a block's threads between barriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Forward,
    Reverse,
}

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    c_int,
    extern "C" fn(*mut c_void),
    *mut c_void,
    *mut c_char,
    usize,
) -> c_int;
type AllocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void, usize);

/// A loaded shared object (never unloaded: entries handed out stay valid).
struct Library(*mut c_void);
// SAFETY: a dlopen handle may be used from any thread (dlsym is thread-safe).
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call on this thread.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dl error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl Library {
    fn open(file: &str) -> Result<Library, String> {
        let path = CString::new(format!("{DIR}/{file}")).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated path; the object is ours (build.rs), whose initialisers only register
        // thread-local storage.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            return Err(format!("loading {DIR}/{file}: {}", dlerror()));
        }
        Ok(Library(h))
    }

    fn symbol(&self, name: &str) -> Result<*mut c_void, String> {
        let c = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(self.0, c.as_ptr()) };
        if p.is_null() {
            return Err(format!("no entry point {name}: {}", dlerror()));
        }
        Ok(p)
    }
}

/// The runtime and the modules loaded so far.
pub struct Emulator {
    launch: LaunchFn,
    alloc: AllocFn,
    free: FreeFn,
    modules: Mutex<HashMap<String, &'static Library>>,
}

impl Emulator {
    /// The process's emulator (the runtime loaded on the first call).
    pub fn get() -> Result<&'static Emulator, String> {
        static EMU: OnceLock<Result<Emulator, String>> = OnceLock::new();
        EMU.get_or_init(|| {
            let rt = Box::leak(Box::new(Library::open("libarqon_emu_rt.so")?));
            // SAFETY: the runtime defines these with exactly these signatures (runtime.cpp).
            unsafe {
                Ok(Emulator {
                    launch: std::mem::transmute::<*mut c_void, LaunchFn>(rt.symbol("arqon_emu_launch")?),
                    alloc: std::mem::transmute::<*mut c_void, AllocFn>(rt.symbol("arqon_emu_alloc")?),
                    free: std::mem::transmute::<*mut c_void, FreeFn>(rt.symbol("arqon_emu_free")?),
                    modules: Mutex::new(HashMap::new()),
                })
            }
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// The address of entry point `name` in module `module` (a `kernels/cuda`
    /// source's stem), to be cast to its signature by [`Emulator::entry`].
    pub fn symbol(&self, module: &str, name: &str) -> Result<*mut c_void, String> {
        let lib = {
            let mut m = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match m.get(module) {
                Some(l) => *l,
                None => {
                    let l: &'static Library = Box::leak(Box::new(Library::open(&format!("{module}.so"))?));
                    m.insert(module.to_string(), l);
                    l
                }
            }
        };
        lib.symbol(name)
    }

    /// Entry point `name` of `module` as the function type `F`.
    ///
    /// # Safety
    /// `F` must be an `unsafe extern "C" fn` type with the entry's parameter
    /// types, in order, as the `.cu` source declares them.
    pub unsafe fn entry<F: Copy>(&self, module: &str, name: &str) -> Result<F, String> {
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>(), "F must be a function pointer");
        let p = self.symbol(module, name)?;
        // SAFETY: F is a function pointer type matching the symbol (the caller's contract).
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }

    /// Runs `thread` as every thread of a `grid` launch of `block` threads
    /// (x only, as our launches are) named `name`: on the calling thread,
    /// block after block, each thread a fiber. `thread` calls the entry point
    /// with the launch's arguments; inside it, the entry sees its own
    /// `threadIdx`, `blockIdx`, `blockDim` and `gridDim`.
    /// A panic in `thread` aborts the process: it cannot unwind through
    /// the fibers' C frames.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        order: Order,
        thread: &dyn Fn(),
    ) -> Result<(), String> {
        extern "C" fn call(ctx: *mut c_void) {
            // SAFETY: ctx is the `&&dyn Fn()` passed below, live for the whole launch.
            let f = unsafe { &*(ctx as *const &dyn Fn()) };
            f();
        }
        let c_name = CString::new(name).map_err(|e| e.to_string())?;
        let (g, b) = ([grid.0, grid.1, grid.2], [block, 1, 1]);
        let mut err = vec![0u8; 1024];
        let mut ctx: &dyn Fn() = thread;
        // SAFETY: the runtime reads grid/block (3 u32 each) and the name during the call, calls `call(ctx)`
        // on this OS thread only (fibers), and writes at most err.len() bytes, NUL-terminated, into err.
        let rc = unsafe {
            (self.launch)(
                c_name.as_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                c_int::from(order == Order::Reverse),
                call,
                (&mut ctx as *mut &dyn Fn()).cast(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
        Err(String::from_utf8_lossy(&err[..end]).into_owned())
    }
}

/// Element types a [`Buffer`] holds: plain values for which every bit
/// pattern is valid (a fresh buffer is 0xff bytes, and kernels write bits).
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid `Self`.
pub unsafe trait Plain: Copy {}
// SAFETY: integers and IEEE floats: every bit pattern is a value.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for i32 {}
// SAFETY: as above.
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for i64 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for f64 {}
// SAFETY: 16 bits of IEEE binary16, any pattern a value (NaNs included).
unsafe impl Plain for half::f16 {}
// SAFETY: 16 bits of bfloat16, any pattern a value (NaNs included).
unsafe impl Plain for half::bf16 {}

/// Device memory: `len` elements of `T` that end exactly where an
/// inaccessible page begins. The start is as aligned as the byte length is
/// (16-byte aligned when it is a multiple of 16): a kernel's vector path runs
/// where its own alignment test admits it.
pub struct Buffer<T: Plain> {
    ptr: *mut T,
    len: usize,
    emu: &'static Emulator,
}

impl<T: Plain> Buffer<T> {
    /// `len` elements, every byte 0xff (NaN in the float types, -1 in the ints).
    pub fn uninit(emu: &'static Emulator, len: usize) -> Buffer<T> {
        // SAFETY: the runtime's allocator; null only when mmap fails.
        let ptr = unsafe { (emu.alloc)(len * std::mem::size_of::<T>()) }.cast::<T>();
        assert!(!ptr.is_null(), "arqon-kernels-emu: out of memory for {len} elements");
        Buffer { ptr, len, emu }
    }

    /// A copy of `host`.
    pub fn from_slice(emu: &'static Emulator, host: &[T]) -> Buffer<T> {
        let b = Buffer::uninit(emu, host.len());
        // SAFETY: b holds host.len() elements, a fresh mapping disjoint from host.
        unsafe { std::ptr::copy_nonoverlapping(host.as_ptr(), b.ptr, host.len()) };
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of element `offset` (≤ len), as a kernel takes it.
    pub fn at(&self, offset: usize) -> *mut T {
        assert!(offset <= self.len, "offset {offset} past {} elements", self.len);
        // SAFETY: within the allocation, or one past its end.
        unsafe { self.ptr.add(offset) }
    }

    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: len initialised (0xff bytes or written) elements of a `Plain` type, valid in every bit
        // pattern.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl<T: Plain> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: the pointer and size the allocator gave.
        unsafe { (self.emu.free)(self.ptr.cast(), self.len * std::mem::size_of::<T>()) };
    }
}
