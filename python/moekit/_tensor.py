"""Device arrays from any framework, and what one call needs around them.

Inputs are accepted as torch tensors (directly), anything with __cuda_array_interface__ (CuPy,
Numba, ...) or __dlpack__ (JAX, ...), or a DeviceArray wrapping a raw address. Only what a C call
needs is kept: the device address, shape, strides in elements, element kind, device and framework.

A `Call` gathers one entry point's arrays: it picks the framework that outputs and workspaces are
allocated from (torch tensors in -> torch tensors out, CuPy in -> CuPy out), the device (all arrays
must agree), and the stream (the caller's, else the framework's current stream, else the legacy
default stream), and it makes that device and stream current while it allocates, so the
framework's caching allocator orders every buffer on the stream that uses it.
"""
import ctypes
import sys

from . import _capi
from ._lib import invalid

# Element kinds: moekit dtypes plus the integer types of indices, masks and byte buffers.
F32, F16, BF16, I32, U8 = "f32", "f16", "bf16", "i32", "u8"
FLOATS = (F32, F16, BF16)
MOEKIT_DTYPE = {F32: _capi.MOEKIT_DTYPE_F32, F16: _capi.MOEKIT_DTYPE_F16, BF16: _capi.MOEKIT_DTYPE_BF16}
KIND_OF_DTYPE = {v: k for k, v in MOEKIT_DTYPE.items()}
ITEMSIZE = {F32: 4, F16: 2, BF16: 2, I32: 4, U8: 1}

# __cuda_array_interface__ typestr -> kind ("|b1" is a bool mask stored one byte per element).
_TYPESTR = {"<f4": F32, "<f2": F16, "<i4": I32, "|u1": U8, "<u1": U8, "|b1": U8}


def _contiguous_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


class DeviceArray(object):
    """A view of device memory: address, shape, strides (elements), kind, device, framework."""

    __slots__ = ("ptr", "shape", "strides", "kind", "device", "framework", "owner", "readonly")

    def __init__(self, ptr, shape, strides, kind, device=None, framework=None, owner=None, readonly=False):
        self.ptr = int(ptr or 0)        # device address (0 = NULL, fine for empty arrays)
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides)
        self.kind = kind
        self.device = device            # CUDA device index, or None when unknown
        self.framework = framework      # "torch", "cupy" or None
        self.owner = owner              # the framework object; keeps the memory alive
        self.readonly = readonly

    @classmethod
    def wrap(cls, ptr, shape, kind, strides=None, device=None):
        """A DeviceArray over a raw device address (for memory from another FFI). The caller keeps
        the memory alive and valid; moekit cannot check a raw address. kind: "f32", "f16", "bf16",
        "i32" or "u8"."""
        if kind not in ITEMSIZE:
            raise ValueError("kind %r is not one of %s" % (kind, ", ".join(sorted(ITEMSIZE))))
        shape = tuple(shape)
        return cls(ptr, shape, strides if strides is not None else _contiguous_strides(shape), kind, device)

    @property
    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self):
        return self.numel * ITEMSIZE[self.kind]

    def is_contiguous(self):
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def rows_are_dense(self):
        """2-D with unit stride along the last dimension (rows may be strided)."""
        return len(self.shape) == 2 and (self.shape[1] <= 1 or self.strides[1] == 1)

    def row_stride(self):
        """Elements between consecutive rows of a 2-D array (its width when it has <= 1 row)."""
        if self.shape[0] <= 1:
            return max(self.shape[1], self.strides[0] if self.shape[0] == 1 else 0)
        return self.strides[0]

    def __repr__(self):
        return "DeviceArray(ptr=0x%x, shape=%s, kind=%s, device=%s)" % (self.ptr, self.shape, self.kind, self.device)


def _torch():
    return sys.modules.get("torch")


def _cupy():
    return sys.modules.get("cupy")


def _is_torch(obj):
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def _is_cupy(obj):
    cupy = _cupy()
    return cupy is not None and isinstance(obj, cupy.ndarray)


def _torch_kinds(torch):
    return {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16,
            torch.int32: I32, torch.uint8: U8, torch.bool: U8}


def _from_torch(t, name, function):
    torch = _torch()
    if not t.is_cuda:
        raise invalid(function, "%s must be a CUDA tensor (got device %s)", name, t.device)
    kinds = _torch_kinds(torch)
    if t.dtype not in kinds:
        raise invalid(function, "%s has dtype %s; moekit takes float32, float16, bfloat16, int32, uint8 "
                      "or bool here", name, t.dtype)
    return DeviceArray(t.data_ptr(), t.shape, t.stride(), kinds[t.dtype], t.device.index, "torch", t)


def _from_cai(obj, name, function):
    cai = obj.__cuda_array_interface__
    kind = _TYPESTR.get(cai["typestr"])
    if kind is None:
        raise invalid(function, "%s has typestr %r; moekit takes %s through __cuda_array_interface__ "
                      "(bfloat16 needs torch or DLPack)", name, cai["typestr"], ", ".join(sorted(_TYPESTR)))
    if cai.get("mask") is not None:
        raise invalid(function, "%s is a masked array; moekit takes plain device arrays", name)
    shape = tuple(cai["shape"])
    itemsize = ITEMSIZE[kind]
    if cai.get("strides") is None:
        strides = _contiguous_strides(shape)
    else:
        if any(s % itemsize for s in cai["strides"]):
            raise invalid(function, "%s has byte strides %s, not multiples of its %d-byte elements",
                          name, tuple(cai["strides"]), itemsize)
        strides = tuple(s // itemsize for s in cai["strides"])
    ptr, readonly = cai["data"]
    if _is_cupy(obj):
        device, framework = obj.device.id, "cupy"
    else:
        device, framework = None, None
    return DeviceArray(ptr, shape, strides, kind, device, framework, obj, bool(readonly))


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_kDLCUDA = 2
_kDLCUDAManaged = 13
# (DLDataTypeCode, bits) -> kind: kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6.
_DL_KINDS = {(2, 32): F32, (2, 16): F16, (4, 16): BF16, (0, 32): I32, (1, 8): U8, (6, 8): U8}


def _capsule_pointer(capsule):
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return get(capsule, b"dltensor")


def _from_dlpack(obj, name, function, stream):
    # The producer makes its pending work visible to `stream` (DLPack: 1 = legacy default stream).
    try:
        capsule = obj.__dlpack__(stream=stream if stream else 1)
    except TypeError:
        capsule = obj.__dlpack__()
    # A legacy (unversioned) capsule holds a DLManagedTensor, which starts with its DLTensor; the
    # capsule stays referenced by the DeviceArray, and its destructor releases the producer's memory.
    t = _DLTensor.from_address(_capsule_pointer(capsule))
    if t.device.device_type not in (_kDLCUDA, _kDLCUDAManaged):
        raise invalid(function, "%s is not in CUDA device memory (DLPack device type %d)", name,
                      t.device.device_type)
    kind = _DL_KINDS.get((t.dtype.code, t.dtype.bits))
    if kind is None or t.dtype.lanes != 1:
        raise invalid(function, "%s has an unsupported DLPack dtype (code %d, bits %d, lanes %d)", name,
                      t.dtype.code, t.dtype.bits, t.dtype.lanes)
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = tuple(t.strides[i] for i in range(t.ndim)) if t.strides else _contiguous_strides(shape)
    return DeviceArray((t.data or 0) + t.byte_offset, shape, strides, kind, t.device.device_id, None,
                       (obj, capsule))


def _framework_device(obj):
    """(framework, device index) of an argument without converting it."""
    if _is_torch(obj):
        return "torch", (obj.device.index if obj.is_cuda else None)
    if _is_cupy(obj):
        return "cupy", obj.device.id
    if isinstance(obj, DeviceArray):
        return obj.framework, obj.device
    return None, None


def stream_handle(stream):
    """An int cudaStream_t from an int, a torch.cuda.Stream (.cuda_stream) or a CuPy stream (.ptr)."""
    for attr in ("cuda_stream", "ptr"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    return int(stream)


class Call(object):
    """The framework, device and stream of one entry point's call (see the module docstring).

    Use as a context manager around the allocations and the C call:
        with Call("moekit.router_forward", stream, [logits, bias, ...]) as c:
            z = c.input(logits, "logits", FLOATS, ndim=2)
            w = c.output(weights, "weights", F32, (T, K))
            ...
    """

    def __init__(self, function, stream=None, objects=(), framework=None, device=None):
        self.function = function
        fw, dev = framework, device
        for obj in objects:
            if obj is None:
                continue
            f, d = _framework_device(obj)
            if fw is None and f is not None:
                fw = f
            if d is not None:
                if dev is not None and d != dev:
                    raise invalid(function, "arguments are on different CUDA devices (%d and %d)", dev, d)
                dev = d
        self.framework = fw
        self.device = dev
        self.stream = self._resolve_stream(stream)
        self._contexts = []

    def _resolve_stream(self, stream):
        if stream is not None:
            return stream_handle(stream)
        if self.framework == "torch":
            return int(_torch().cuda.current_stream(self.device).cuda_stream)
        if self.framework == "cupy":
            cupy = _cupy()
            if self.device is None:
                return int(cupy.cuda.get_current_stream().ptr)
            with cupy.cuda.Device(self.device):
                return int(cupy.cuda.get_current_stream().ptr)
        return 0

    def __enter__(self):
        if self.framework == "torch" and self.device is not None:
            torch = _torch()
            self._contexts.append(torch.cuda.device(self.device))
            if self.stream != torch.cuda.current_stream(self.device).cuda_stream:
                s = (torch.cuda.default_stream(self.device) if self.stream == 0
                     else torch.cuda.ExternalStream(self.stream, device=self.device))
                self._contexts.append(torch.cuda.stream(s))
        elif self.framework == "cupy":
            cupy = _cupy()
            if self.device is not None:
                self._contexts.append(cupy.cuda.Device(self.device))
            self._contexts.append(cupy.cuda.Stream.null if self.stream == 0
                                  else cupy.cuda.ExternalStream(self.stream))
        for cm in self._contexts:
            cm.__enter__()
        return self

    def __exit__(self, *exc):
        while self._contexts:
            self._contexts.pop().__exit__(*exc)
        return False

    @property
    def stream_arg(self):
        return ctypes.c_void_p(self.stream or None)

    # -- arguments ---------------------------------------------------------------------------------

    def array(self, obj, name):
        """Any supported array as a DeviceArray (no checks beyond it being CUDA memory)."""
        if isinstance(obj, DeviceArray):
            return obj
        if _is_torch(obj):
            return _from_torch(obj, name, self.function)
        if hasattr(obj, "__cuda_array_interface__"):
            return _from_cai(obj, name, self.function)
        if hasattr(obj, "__dlpack__"):
            return _from_dlpack(obj, name, self.function, self.stream)
        raise invalid(self.function, "%s: expected a CUDA array (torch tensor, __cuda_array_interface__ or "
                      "__dlpack__), got %s", name, type(obj).__name__)

    def _check(self, a, name, kinds, shape, ndim, contiguous):
        f = self.function
        if kinds is not None and a.kind not in kinds:
            raise invalid(f, "%s has element type %s; expected %s", name, a.kind, " or ".join(kinds))
        if ndim is not None and len(a.shape) != ndim:
            raise invalid(f, "%s must have %d dimensions, got shape %s", name, ndim, a.shape)
        if shape is not None:
            if len(a.shape) != len(shape) or any(e is not None and e != s for s, e in zip(a.shape, shape)):
                raise invalid(f, "%s has shape %s; expected %s", name, a.shape,
                              "(%s)" % ", ".join("*" if e is None else str(e) for e in shape))
        if contiguous == "rows":
            if not a.rows_are_dense():
                raise invalid(f, "%s must be 2-D with contiguous rows (strides %s)", name, a.strides)
        elif contiguous and not a.is_contiguous():
            raise invalid(f, "%s must be contiguous (shape %s, strides %s); call .contiguous() first",
                          name, a.shape, a.strides)
        if self.device is not None and a.device is not None and a.device != self.device:
            raise invalid(f, "%s is on CUDA device %d, the call on %d", name, a.device, self.device)
        return a

    def input(self, obj, name, kinds=None, shape=None, ndim=None, contiguous=True):
        """A checked input; None stays None (NULL)."""
        if obj is None:
            return None
        return self._check(self.array(obj, name), name, kinds, shape, ndim, contiguous)

    def output(self, obj, name, kind, shape, zero=False, contiguous=True):
        """The caller's output checked against (kind, shape), or a fresh one from the framework."""
        if obj is None:
            return self.empty(shape, kind, zero)
        a = self._check(self.array(obj, name), name, (kind,), shape, None, contiguous)
        if a.readonly:
            raise invalid(self.function, "%s is read-only", name)
        return a

    # -- allocation --------------------------------------------------------------------------------

    def empty(self, shape, kind, zero=False):
        """A new array of the call's framework on its device, ordered on its stream."""
        shape = tuple(int(s) for s in shape)
        if self.framework == "torch":
            torch = _torch()
            dtype = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16, I32: torch.int32,
                     U8: torch.uint8}[kind]
            device = torch.device("cuda", self.device if self.device is not None else torch.cuda.current_device())
            t = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
            return _from_torch(t, "output", self.function)
        if self.framework == "cupy":
            cupy = _cupy()
            if kind == BF16:
                raise invalid(self.function, "CuPy has no bfloat16 arrays: pass bf16 tensors from torch")
            dtype = {F32: cupy.float32, F16: cupy.float16, I32: cupy.int32, U8: cupy.uint8}[kind]
            a = (cupy.zeros if zero else cupy.empty)(shape, dtype=dtype)
            return _from_cai(a, "output", self.function)
        raise invalid(self.function, "cannot allocate an output for arrays that are neither torch tensors nor "
                      "CuPy arrays: pass every output buffer explicitly")

    def workspace(self, nbytes, given=None):
        """(workspace, bytes to pass): the caller's uint8 buffer as given (its whole size is passed,
        so the library reports one that is too small or misaligned), else nbytes of scratch from
        the framework (None when 0; torch and CuPy pools align blocks to >= 256 bytes)."""
        if given is not None:
            w = self.input(given, "workspace", (U8,), ndim=1)
            return w, w.nbytes
        if nbytes == 0:
            return None, 0
        w = self.empty((nbytes,), U8)
        if w.ptr % _capi.MOEKIT_WORKSPACE_ALIGNMENT:
            raise invalid(self.function, "the framework returned a workspace at 0x%x, not %d-byte aligned",
                          w.ptr, _capi.MOEKIT_WORKSPACE_ALIGNMENT)
        return w, nbytes

    def view_i32(self, buffer, byte_offset, count):
        """An int32 view of count elements at byte_offset into a U8 array from empty()."""
        owner = buffer.owner
        sub = owner[byte_offset:byte_offset + 4 * count]
        if self.framework == "torch":
            return sub.view(_torch().int32)
        return sub.view(_cupy().int32)


def ptr(a):
    """ctypes pointer argument for a DeviceArray or None (NULL)."""
    return ctypes.c_void_p(a.ptr or None) if a is not None else ctypes.c_void_p(None)


def result(a, given):
    """What a Python function returns for an output: the caller's object when one was given, else
    the framework object allocated for it."""
    return given if given is not None else a.owner
