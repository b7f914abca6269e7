"""Loading libmoekit and calling its C entry points through ctypes.

The library is looked up, in order, at $MOEKIT_LIB (a path), in the repository's build directories
next to this package (build/, build-gpu/, build-ci/), then by the dynamic linker (libmoekit.so.0,
e.g. after `meson install` or with LD_LIBRARY_PATH).

Every entry point is declared once from the prototype table in _capi.py (which a test keeps equal
to the C headers), so a call can never pass an argument of the wrong C type silently.
"""
import ctypes
import os
import threading

from . import _capi

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.abspath(os.path.join(_HERE, "..", ".."))

# moekit_status_t values (include/moekit/status.h; append-only, never reused).
SUCCESS = _capi.MOEKIT_STATUS_SUCCESS
INVALID_ARGUMENT = _capi.MOEKIT_STATUS_INVALID_ARGUMENT
UNSUPPORTED = _capi.MOEKIT_STATUS_UNSUPPORTED
WORKSPACE_TOO_SMALL = _capi.MOEKIT_STATUS_WORKSPACE_TOO_SMALL
MISALIGNED = _capi.MOEKIT_STATUS_MISALIGNED
CUDA_ERROR = _capi.MOEKIT_STATUS_CUDA_ERROR
CUBLAS_ERROR = _capi.MOEKIT_STATUS_CUBLAS_ERROR
NCCL_ERROR = _capi.MOEKIT_STATUS_NCCL_ERROR
NOT_AVAILABLE = _capi.MOEKIT_STATUS_NOT_AVAILABLE
OUT_OF_MEMORY = _capi.MOEKIT_STATUS_OUT_OF_MEMORY
INTERNAL_ERROR = _capi.MOEKIT_STATUS_INTERNAL_ERROR


class MoekitError(RuntimeError):
    """A moekit call failed.

    `status` is the moekit_status_t value and `message` the library's text, which names the entry
    point, the parameter and the value ("moekit_router_forward: top_k = 40 exceeds num_experts =
    32"). Checks made in Python before the call (shapes, dtypes, devices) raise the same classes
    with a message in the same form, prefixed by the Python function's name.
    """

    def __init__(self, status, message):
        self.status = int(status)
        self.message = message
        super().__init__("%s [%s]" % (message, _status_name(self.status)))


class InvalidArgumentError(MoekitError, ValueError):
    """MOEKIT_STATUS_INVALID_ARGUMENT: NULL where not allowed, a value out of range, a bad shape."""


class UnsupportedError(MoekitError, NotImplementedError):
    """MOEKIT_STATUS_UNSUPPORTED: valid arguments, but this combination is not implemented."""


class WorkspaceTooSmallError(MoekitError, ValueError):
    """MOEKIT_STATUS_WORKSPACE_TOO_SMALL."""


class MisalignedError(MoekitError, ValueError):
    """MOEKIT_STATUS_MISALIGNED: a pointer lacks the documented alignment."""


class CudaError(MoekitError):
    """MOEKIT_STATUS_CUDA_ERROR: the CUDA runtime reported an error (e.g. no device)."""


class CublasError(MoekitError):
    """MOEKIT_STATUS_CUBLAS_ERROR."""


class NcclError(MoekitError):
    """MOEKIT_STATUS_NCCL_ERROR."""


class NotAvailableError(MoekitError):
    """MOEKIT_STATUS_NOT_AVAILABLE: not built into this library (e.g. NCCL), or the loaded library
    lacks an entry point this package knows (an older libmoekit)."""


class OutOfMemoryError(MoekitError, MemoryError):
    """MOEKIT_STATUS_OUT_OF_MEMORY: a host allocation inside moekit failed."""


class InternalError(MoekitError):
    """MOEKIT_STATUS_INTERNAL_ERROR: a bug in moekit; please report the message."""


_ERROR_CLASSES = {
    INVALID_ARGUMENT: InvalidArgumentError,
    UNSUPPORTED: UnsupportedError,
    WORKSPACE_TOO_SMALL: WorkspaceTooSmallError,
    MISALIGNED: MisalignedError,
    CUDA_ERROR: CudaError,
    CUBLAS_ERROR: CublasError,
    NCCL_ERROR: NcclError,
    NOT_AVAILABLE: NotAvailableError,
    OUT_OF_MEMORY: OutOfMemoryError,
    INTERNAL_ERROR: InternalError,
}

_STATUS_NAMES = {v: k[len("MOEKIT_STATUS_"):].lower() for k, v in vars(_capi).items()
                 if k.startswith("MOEKIT_STATUS_")}


def _status_name(status):
    return _STATUS_NAMES.get(status, "status %d" % status)


def error_class(status):
    """The exception class raised for a moekit_status_t value."""
    return _ERROR_CLASSES.get(status, MoekitError)


def invalid(function, fmt, *args):
    """An InvalidArgumentError for a check made in Python, in the library's message form."""
    return InvalidArgumentError(INVALID_ARGUMENT, "%s: %s" % (function, fmt % args if args else fmt))


_lock = threading.Lock()
_lib = None
_path = None


def _candidates():
    env = os.environ.get("MOEKIT_LIB")
    if env:
        yield env
        return  # an explicit choice is never silently replaced by another library
    for build in ("build", "build-gpu", "build-ci"):
        yield os.path.join(_REPO, build, "libmoekit.so")
    yield "libmoekit.so.0"


def lib():
    """The loaded library (ctypes.CDLL); raises OSError listing every place it looked."""
    global _lib, _path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            tried = []
            for path in _candidates():
                if os.sep in path and not os.path.exists(path):
                    tried.append(path + " (missing)")
                    continue
                try:
                    handle = ctypes.CDLL(path)
                except OSError as e:
                    tried.append("%s (%s)" % (path, e))
                    continue
                if not hasattr(handle, "moekit_get_version"):
                    tried.append(path + " (not libmoekit)")
                    continue
                _path = path
                _lib = handle
                break
            else:
                raise OSError("libmoekit not found; build it (meson) or set MOEKIT_LIB to its path. "
                              "Tried: " + "; ".join(tried))
    return _lib


def library_path():
    """Where the loaded library came from (as given to the dynamic loader)."""
    lib()
    return _path


_declared = {}


def fn(name):
    """The C function `name` with the argument and result types of its prototype in _capi."""
    f = _declared.get(name)
    if f is None:
        proto = _capi.PROTOTYPES.get(name)
        if proto is None:
            raise KeyError("%s is not a moekit entry point known to this package" % name)
        try:
            f = getattr(lib(), name)
        except AttributeError:
            raise NotAvailableError(NOT_AVAILABLE, "%s: not exported by %s (library version %s); this "
                                    "package needs a newer libmoekit" % (name, _path, _raw_version()))
        restype, args = proto
        f.restype = restype
        f.argtypes = [t for _, t in args]
        _declared[name] = f
    return f


def status_string(status):
    """moekit_status_string: a short English description of a status."""
    return fn("moekit_status_string")(int(status)).decode()


def last_error():
    """The last-error message of this thread (copied out, so it stays valid)."""
    copy = fn("moekit_copy_last_error")
    n = copy(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    copy(buf, n + 1)
    return buf.value.decode(errors="replace")


def clear_last_error():
    fn("moekit_clear_last_error")()


def check(status):
    """Raises the MoekitError subclass for a non-zero status, with the library's message."""
    if status != SUCCESS:
        raise error_class(status)(status, last_error() or status_string(status))


def call(name, *args):
    """Calls the entry point `name` (returning moekit_status_t), raising on failure."""
    check(fn(name)(*args))


def size_query(name, *args):
    """Calls a size query `name` whose last parameter is a size_t out-pointer after `args` (the
    *_workspace_size / *_buffer_size / *_saved_size entry points) and returns the size."""
    n = ctypes.c_size_t()
    call(name, *(args + (ctypes.byref(n),)))
    return n.value


def _raw_version():
    return fn("moekit_get_version")()


def version():
    """(major, minor, patch) of the loaded library."""
    v = _raw_version()
    return v // 10000, (v // 100) % 100, v % 100


def dtype_size(dtype):
    """moekit_dtype_size: bytes of one element, 0 for an unknown value."""
    return fn("moekit_dtype_size")(int(dtype))


class OwnedHandle(object):
    """Base of the classes that own one C handle (MlpHandle, Layer, EP).

    `_open` creates it through a `*_create` entry point whose last parameter is the handle's
    address; close() (or the end of a `with` block, or garbage collection) destroys it once through
    the matching `*_destroy`, which is looked up at creation so that it still resolves during
    interpreter shutdown. After close() the handle is NULL and `_live` raises.
    """

    def _open(self, create, destroy, *args):
        self._handle = ctypes.c_void_p()
        call(create, *(args + (ctypes.byref(self._handle),)))
        self._destroy = fn(destroy)

    def _live(self, function, message):
        if not self._handle:
            raise invalid(function, message)
        return self._handle

    def close(self):
        if self._handle:
            h, self._handle = self._handle, ctypes.c_void_p()
            self._destroy(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
