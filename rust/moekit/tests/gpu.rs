//! Device tests through the safe wrapper, against small CPU references written here: they check
//! that every argument reaches the right C parameter (a swapped pointer or stride gives a wrong
//! answer, not a crash to hope for). They are #[ignore]d, so a plain `cargo test` (the CPU suite)
//! lists them as ignored instead of passing them; the rust_gpu meson test runs them with
//! `-- --ignored` and reports SKIP (77) when no GPU answers (each test then prints "skipped: no
//! GPU", since cargo has no skip status). The CUDA runtime is opened with dlopen: nothing links it.
use std::ffi::{c_char, c_int, c_void, CString};

use moekit::experts::{ExpertsForward, MlpForward};
use moekit::layer::{LayerBackward, LayerForward, LayerGrads, LayerParams};
use moekit::router::{self, BackwardArgs, ForwardArgs};
use moekit::{
    DevicePtr, Dtype, ExpertsConfig, Layer, LayerConfig, MlpConfig, MlpHandle, PlanConfig, RouterConfig, Stream,
    TokenPlan, Workspace,
};

// ---------------------------------------------------------------------------------------------
// The CUDA runtime, opened at run time.

#[link(name = "dl")]
extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

struct Cuda {
    malloc: unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int,
    free: unsafe extern "C" fn(*mut c_void) -> c_int,
    memcpy: unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> c_int,
    synchronize: unsafe extern "C" fn() -> c_int,
}

const HOST_TO_DEVICE: c_int = 1;
const DEVICE_TO_HOST: c_int = 2;

/// The runtime when a CUDA device is present, else None (after printing the skip).
fn gpu() -> Option<&'static Cuda> {
    static CUDA: std::sync::OnceLock<Option<Cuda>> = std::sync::OnceLock::new();
    let cuda = CUDA.get_or_init(|| unsafe {
        let mut handle = std::ptr::null_mut();
        for name in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
            let n = CString::new(name).unwrap();
            handle = dlopen(n.as_ptr(), 2 /* RTLD_NOW */);
            if !handle.is_null() {
                break;
            }
        }
        if handle.is_null() {
            return None;
        }
        let sym = |s: &str| {
            let n = CString::new(s).unwrap();
            let p = dlsym(handle, n.as_ptr());
            assert!(!p.is_null(), "libcudart has no {s}");
            p
        };
        let count =
            std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_int) -> c_int>(sym("cudaGetDeviceCount"));
        let mut n: c_int = 0;
        if count(&mut n) != 0 || n == 0 {
            return None;
        }
        Some(Cuda {
            malloc: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int>(sym(
                "cudaMalloc",
            )),
            free: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void) -> c_int>(sym("cudaFree")),
            memcpy: std::mem::transmute::<
                *mut c_void,
                unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> c_int,
            >(sym("cudaMemcpy")),
            synchronize: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(sym(
                "cudaDeviceSynchronize",
            )),
        })
    });
    if cuda.is_none() {
        println!("skipped: no GPU");
    }
    cuda.as_ref()
}

/// A device buffer of `len` elements of T, freed on drop.
struct Buf<T: Copy> {
    cuda: &'static Cuda,
    ptr: *mut c_void,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Copy + Default> Buf<T> {
    fn new(cuda: &'static Cuda, len: usize) -> Self {
        let mut ptr = std::ptr::null_mut();
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        assert_eq!(unsafe { (cuda.malloc)(&mut ptr, bytes) }, 0, "cudaMalloc");
        Buf { cuda, ptr, len, _t: std::marker::PhantomData }
    }
    fn from(cuda: &'static Cuda, data: &[T]) -> Self {
        let b = Self::new(cuda, data.len());
        let bytes = std::mem::size_of_val(data);
        assert_eq!(unsafe { (cuda.memcpy)(b.ptr, data.as_ptr().cast(), bytes, HOST_TO_DEVICE) }, 0);
        b
    }
    fn filled(cuda: &'static Cuda, len: usize, value: T) -> Self {
        Self::from(cuda, &vec![value; len])
    }
    fn get(&self) -> Vec<T> {
        unsafe { (self.cuda.synchronize)() };
        let mut v = vec![T::default(); self.len];
        let bytes = self.len * std::mem::size_of::<T>();
        assert_eq!(unsafe { (self.cuda.memcpy)(v.as_mut_ptr().cast(), self.ptr, bytes, DEVICE_TO_HOST) }, 0);
        v
    }
    fn ptr(&self) -> DevicePtr<T> {
        DevicePtr::from_raw(self.ptr.cast())
    }
    fn void(&self) -> DevicePtr<c_void> {
        DevicePtr::from_raw(self.ptr)
    }
    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

impl<T: Copy> Drop for Buf<T> {
    fn drop(&mut self) {
        unsafe { (self.cuda.free)(self.ptr) };
    }
}

/// `len` elements at a device address that is not a Buf of its own (e.g. a plan array).
fn download<T: Copy + Default>(cuda: &'static Cuda, ptr: DevicePtr<T>, len: usize) -> Vec<T> {
    let mut v = vec![T::default(); len];
    unsafe {
        (cuda.synchronize)();
        let bytes = len * std::mem::size_of::<T>();
        assert_eq!((cuda.memcpy)(v.as_mut_ptr().cast(), ptr.as_ptr().cast(), bytes, DEVICE_TO_HOST), 0);
    }
    v
}

fn workspace(cuda: &'static Cuda, bytes: usize) -> (Buf<u8>, Workspace) {
    let b = Buf::<u8>::new(cuda, bytes.max(256));
    let w = Workspace::new(b.ptr(), bytes);
    (b, w)
}

/// Deterministic pseudo-random numbers in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn assert_close(got: &[f32], want: &[f64], rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= rtol * scale, "{what}[{i}] = {g}, want {w} (scale {scale})");
    }
}

// ---------------------------------------------------------------------------------------------
// CPU references (f64).

/// Softmax, the top K in descending order (ties: lower index), normalised weights.
fn route_softmax(z: &[f64], k: usize, normalize: bool) -> (Vec<usize>, Vec<f64>) {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    let s: Vec<f64> = e.iter().map(|v| v / sum).collect();
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap().then(a.cmp(&b)));
    let idx: Vec<usize> = order[..k].to_vec();
    let mut w: Vec<f64> = idx.iter().map(|&i| s[i]).collect();
    if normalize && k > 1 {
        let t: f64 = w.iter().sum::<f64>() + 1e-20;
        w.iter_mut().for_each(|v| *v /= t);
    }
    (idx, w)
}

fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// One expert's swiglu FFN on one row: (x [H] @ W_gu [H, 2I]) -> silu(g) v * p -> @ W_down [I, H].
fn expert_row(x: &[f64], wgu: &[f64], wd: &[f64], h: usize, i: usize, p: f64) -> Vec<f64> {
    let u: Vec<f64> = (0..2 * i).map(|c| (0..h).map(|r| x[r] * wgu[r * 2 * i + c]).sum()).collect();
    let a: Vec<f64> = (0..i).map(|c| silu(u[c]) * u[i + c] * p).collect();
    (0..h).map(|c| (0..i).map(|r| a[r] * wd[r * h + c]).sum()).collect()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a GPU: run by the rust_gpu meson test (cargo test -- --ignored)"]
fn router_forward_and_backward() {
    let Some(cuda) = gpu() else { return };
    let (t, e, k) = (16usize, 8usize, 2usize);
    let cfg = RouterConfig::mixtral();
    let mut rng = Rng(1);
    // Distinct logits per row: a permutation of evenly spaced values (no near-ties).
    let logits: Vec<f32> =
        (0..t).flat_map(|r| (0..e).map(move |c| ((c * 5 + r * 3) % e) as f32 * 0.37 - 1.2)).collect();
    let z = Buf::from(cuda, &logits);
    let w = Buf::<f32>::filled(cuda, t * k, -1.0);
    let idx = Buf::<i32>::filled(cuda, t * k, -1);
    let load = Buf::<i32>::filled(cuda, e, -1);
    let (_ws_buf, ws) = workspace(cuda, cfg.forward_workspace_size(t as i64).unwrap());
    let args = ForwardArgs {
        num_tokens: t as i64,
        logits_dtype: Dtype::F32,
        logits: z.void(),
        logits_row_stride: e as i64,
        weights: w.ptr(),
        indices: idx.ptr(),
        expert_load: load.ptr(),
        ..Default::default()
    };
    unsafe { router::forward(&cfg, &args, ws, Stream::LEGACY) }.unwrap();
    let (got_w, got_idx, got_load) = (w.get(), idx.get(), load.get());
    let mut want_load = vec![0i32; e];
    let mut want_w = Vec::new();
    for r in 0..t {
        let (i, wr) = route_softmax(&to64(&logits[r * e..(r + 1) * e]), k, true);
        for (j, &x) in i.iter().enumerate() {
            assert_eq!(got_idx[r * k + j], x as i32, "token {r} choice {j}");
            want_load[x] += 1;
        }
        want_w.extend(wr);
    }
    assert_eq!(got_load, want_load);
    assert_close(&got_w, &want_w, 1e-6, "weights");

    // Backward: dL/dz for L = sum g w, against central differences of the reference.
    let g = rng.vec(t * k, 1.0);
    let gw = Buf::from(cuda, &g);
    let gz = Buf::<f32>::filled(cuda, t * e, f32::NAN);
    let (_wb, wsb) = workspace(cuda, cfg.backward_workspace_size(t as i64).unwrap());
    let bargs = BackwardArgs {
        num_tokens: t as i64,
        logits_dtype: Dtype::F32,
        logits: z.void(),
        logits_row_stride: e as i64,
        indices: idx.ptr(),
        grad_weights: gw.ptr(),
        grad_logits: gz.void(),
        grad_logits_row_stride: e as i64,
        ..Default::default()
    };
    unsafe { router::backward(&cfg, &bargs, wsb, Stream::LEGACY) }.unwrap();
    let got = gz.get();
    let mut want = vec![0f64; t * e];
    for r in 0..t {
        let row = to64(&logits[r * e..(r + 1) * e]);
        let loss = |zz: &[f64]| -> f64 {
            let (_, wr) = route_softmax(zz, k, true);
            wr.iter().zip(&g[r * k..(r + 1) * k]).map(|(a, b)| a * *b as f64).sum()
        };
        for c in 0..e {
            let (mut p, mut m) = (row.clone(), row.clone());
            p[c] += 1e-5;
            m[c] -= 1e-5;
            want[r * e + c] = (loss(&p) - loss(&m)) / 2e-5;
        }
    }
    assert_close(&got, &want, 1e-4, "grad_logits");
}

#[test]
#[ignore = "needs a GPU: run by the rust_gpu meson test (cargo test -- --ignored)"]
fn plan_permute_and_combine_round_trip() {
    let Some(cuda) = gpu() else { return };
    let (t, e, k, h) = (9usize, 4usize, 2usize, 16usize);
    let cfg = PlanConfig::new(e as i32, k as i32).alignment(4);
    let ids: Vec<i32> = (0..t * k).map(|s| ((s * 3 + s / k) % e) as i32).collect();
    let mask: Vec<u8> = (0..t).map(|i| (i % 4 != 3) as u8).collect();
    let mut rng = Rng(2);
    let x = rng.vec(t * h, 1.0);
    let (ids_d, mask_d, x_d) = (Buf::from(cuda, &ids), Buf::from(cuda, &mask), Buf::from(cuda, &x));
    let buffer = Buf::<u8>::new(cuda, cfg.buffer_size(t as i64).unwrap());
    let plan = TokenPlan::bind(&cfg, t as i64, buffer.ptr(), buffer.bytes()).unwrap();
    let (_wb, ws) = workspace(cuda, cfg.workspace_size(t as i64).unwrap());
    unsafe { plan.build(ids_d.ptr(), DevicePtr::null(), mask_d.ptr(), ws, Stream::LEGACY) }.unwrap();
    let r = plan.max_rows as usize;
    let xp = Buf::<f32>::filled(cuda, r * h, f32::NAN);
    unsafe {
        plan.permute(
            h as i64,
            Dtype::F32,
            x_d.void(),
            h as i64,
            DevicePtr::null(),
            xp.void(),
            DevicePtr::null(),
            Stream::LEGACY,
        )
    }
    .unwrap();
    let y = Buf::<f32>::filled(cuda, t * h, f32::NAN);
    unsafe { plan.combine(h as i64, Dtype::F32, xp.void(), DevicePtr::null(), y.void(), h as i64, Stream::LEGACY) }
        .unwrap();
    // Offsets: each expert's rows rounded up to 4; the unweighted round trip gives K x for real
    // tokens and 0 for masked ones.
    let got_offsets = download(cuda, plan.expert_offsets(), e + 1);
    let mut want_offsets = vec![0i32];
    for ex in 0..e {
        let n = (0..t * k).filter(|&s| mask[s / k] != 0 && ids[s] == ex as i32).count() as i32;
        want_offsets.push(want_offsets[ex] + (n + 3) / 4 * 4);
    }
    assert_eq!(got_offsets, want_offsets);
    let want: Vec<f64> = (0..t * h).map(|i| if mask[i / h] != 0 { k as f64 * x[i] as f64 } else { 0.0 }).collect();
    assert_close(&y.get(), &want, 1e-6, "combine(permute(x))");
}

#[test]
#[ignore = "needs a GPU: run by the rust_gpu meson test (cargo test -- --ignored)"]
fn grouped_experts_forward() {
    let Some(cuda) = gpu() else { return };
    let (e, h, i) = (2usize, 16usize, 8usize);
    let offsets = vec![0i32, 3, 5];
    let rows = 6usize; // one row past the total: never written
    let cfg = ExpertsConfig::new(e as i32, h as i32, i as i32).dtype(Dtype::F32);
    let mut rng = Rng(3);
    let (x, wgu, wd) = (rng.vec(rows * h, 1.0), rng.vec(e * h * 2 * i, 0.25), rng.vec(e * i * h, 0.3));
    let p = rng.vec(rows, 1.0);
    let (od, xd, wgud, wdd, pd) = (
        Buf::from(cuda, &offsets),
        Buf::from(cuda, &x),
        Buf::from(cuda, &wgu),
        Buf::from(cuda, &wd),
        Buf::from(cuda, &p),
    );
    let out = Buf::<f32>::filled(cuda, rows * h, 7.0);
    let (_wb, ws) = workspace(cuda, cfg.forward_workspace_size(rows as i64).unwrap());
    let args = ExpertsForward {
        max_rows: rows as i64,
        expert_offsets: od.ptr(),
        xp: xd.void(),
        row_weights: pd.ptr(),
        w_gate_up: wgud.void(),
        w_down: wdd.void(),
        out: out.void(),
        ..Default::default()
    };
    unsafe { cfg.forward(&args, ws, Stream::LEGACY) }.unwrap();
    let got = out.get();
    let mut want = Vec::new();
    for ex in 0..e {
        for r in offsets[ex] as usize..offsets[ex + 1] as usize {
            want.extend(expert_row(
                &to64(&x[r * h..(r + 1) * h]),
                &to64(&wgu[ex * h * 2 * i..(ex + 1) * h * 2 * i]),
                &to64(&wd[ex * i * h..(ex + 1) * i * h]),
                h,
                i,
                p[r] as f64,
            ));
        }
    }
    assert_close(&got[..5 * h], &want, 1e-5, "experts out");
    assert!(got[5 * h..].iter().all(|&v| v == 7.0), "the row past the total is untouched");
}

#[test]
#[ignore = "needs a GPU: run by the rust_gpu meson test (cargo test -- --ignored)"]
fn dense_mlp_forward() {
    let Some(cuda) = gpu() else { return };
    let (t, h, i) = (5usize, 16usize, 8usize);
    let cfg = MlpConfig::new(h as i32, i as i32).dtype(Dtype::F32);
    let mut rng = Rng(4);
    let (x, wgu, wd) = (rng.vec(t * h, 1.0), rng.vec(h * 2 * i, 0.25), rng.vec(i * h, 0.3));
    let (xd, wgud, wdd) = (Buf::from(cuda, &x), Buf::from(cuda, &wgu), Buf::from(cuda, &wd));
    let y = Buf::<f32>::filled(cuda, t * h, f32::NAN);
    let handle = MlpHandle::new().unwrap();
    let (_wb, ws) = workspace(cuda, cfg.forward_workspace_size(t as i64).unwrap());
    let args = MlpForward {
        num_tokens: t as i64,
        x: xd.void(),
        w_gate_up: wgud.void(),
        w_down: wdd.void(),
        out: y.void(),
        ..Default::default()
    };
    unsafe { handle.forward(&cfg, &args, ws, Stream::LEGACY) }.unwrap();
    let want: Vec<f64> =
        (0..t).flat_map(|r| expert_row(&to64(&x[r * h..(r + 1) * h]), &to64(&wgu), &to64(&wd), h, i, 1.0)).collect();
    assert_close(&y.get(), &want, 1e-5, "mlp y");
}

/// The layer in f64 on the CPU (Mixtral-style router, swiglu experts, no shared MLP):
/// y [T, H] from x [T, H], W_r [E, H], W_gu [E, H, 2I], W_down [E, I, H].
#[allow(clippy::too_many_arguments)]
fn layer_reference(
    x: &[f64], wr: &[f64], wgu: &[f64], wd: &[f64], t: usize, h: usize, e: usize, k: usize, i: usize,
) -> Vec<f64> {
    let mut y = vec![0f64; t * h];
    for r in 0..t {
        let xr = &x[r * h..(r + 1) * h];
        let z: Vec<f64> = (0..e).map(|c| (0..h).map(|j| xr[j] * wr[c * h + j]).sum()).collect();
        let (idx, w) = route_softmax(&z, k, true);
        for (j, &ex) in idx.iter().enumerate() {
            let o = expert_row(
                xr,
                &wgu[ex * h * 2 * i..(ex + 1) * h * 2 * i],
                &wd[ex * i * h..(ex + 1) * i * h],
                h,
                i,
                w[j],
            );
            for c in 0..h {
                y[r * h + c] += o[c];
            }
        }
    }
    y
}

#[test]
#[ignore = "needs a GPU: run by the rust_gpu meson test (cargo test -- --ignored)"]
fn layer_forward_and_backward() {
    let Some(cuda) = gpu() else { return };
    let (t, h, e, k, i) = (6usize, 16usize, 4usize, 2usize, 8usize);
    let cfg =
        LayerConfig::from_sizes(RouterConfig::new(e as i32, k as i32).normalize(true), h as i32, i as i32, Dtype::F32);
    let layer = Layer::new(&cfg).unwrap();
    let mut rng = Rng(5);
    let (x, wr, wgu, wd) =
        (rng.vec(t * h, 1.0), rng.vec(e * h, 0.8), rng.vec(e * h * 2 * i, 0.25), rng.vec(e * i * h, 0.3));
    let gy = rng.vec(t * h, 1.0);
    let (xd, wrd, wgud, wdd, gyd) =
        (Buf::from(cuda, &x), Buf::from(cuda, &wr), Buf::from(cuda, &wgu), Buf::from(cuda, &wd), Buf::from(cuda, &gy));
    let y = Buf::<f32>::filled(cuda, t * h, f32::NAN);
    let saved = Buf::<u8>::new(cuda, cfg.saved_size(t as i64).unwrap());
    let (fwd, bwd) = cfg.workspace_size(t as i64).unwrap();
    let (_wb, ws) = workspace(cuda, fwd.max(bwd));
    let params =
        LayerParams { router_weight: wrd.void(), w_gate_up: wgud.void(), w_down: wdd.void(), ..Default::default() };
    let f = LayerForward {
        num_tokens: t as i64,
        x: xd.void(),
        params,
        y: y.void(),
        saved: saved.ptr(),
        saved_bytes: saved.bytes(),
        ..Default::default()
    };
    unsafe { layer.forward(&f, ws, Stream::LEGACY) }.unwrap();
    let (x64, wr64, wgu64, wd64) = (to64(&x), to64(&wr), to64(&wgu), to64(&wd));
    assert_close(&y.get(), &layer_reference(&x64, &wr64, &wgu64, &wd64, t, h, e, k, i), 1e-4, "layer y");

    let gx = Buf::<f32>::filled(cuda, t * h, f32::NAN);
    let gwd = Buf::<f32>::filled(cuda, e * i * h, f32::NAN);
    let b = LayerBackward {
        num_tokens: t as i64,
        x: xd.void(),
        params,
        saved: saved.ptr(),
        saved_bytes: saved.bytes(),
        grad_y: gyd.void(),
        grad_x: gx.void(),
        grads: LayerGrads { w_down: gwd.void(), ..Default::default() },
        ..Default::default()
    };
    unsafe { layer.backward(&b, ws, Stream::LEGACY) }.unwrap();
    // Central differences of L = <y, gy> in f64 (the routing is stable at this step size).
    let loss = |xx: &[f64], dd: &[f64]| -> f64 {
        layer_reference(xx, &wr64, &wgu64, dd, t, h, e, k, i).iter().zip(&gy).map(|(a, b)| a * *b as f64).sum()
    };
    let fd = |v: &[f64], j: usize, f: &dyn Fn(&[f64]) -> f64| {
        let (mut p, mut m) = (v.to_vec(), v.to_vec());
        p[j] += 1e-5;
        m[j] -= 1e-5;
        (f(&p) - f(&m)) / 2e-5
    };
    let want_gx: Vec<f64> = (0..t * h).map(|j| fd(&x64, j, &|xx| loss(xx, &wd64))).collect();
    let want_gwd: Vec<f64> = (0..e * i * h).map(|j| fd(&wd64, j, &|dd| loss(&x64, dd))).collect();
    assert_close(&gx.get(), &want_gx, 1e-3, "layer dx");
    assert_close(&gwd.get(), &want_gwd, 1e-3, "layer dW_down");
}
