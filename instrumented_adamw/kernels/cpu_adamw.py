"""Single-pass AdamW on CPU: the ``fused=True`` path of InstrumentedAdamW on CPU tensors.

torch's fused CPU AdamW reads p, g, m, v once and writes p, m, v once; tracking on top of it needs a snapshot of W
and a second pass over (W, m, v), several times torch's step. ``cpu_adamw.c`` does the update and the three
reductions ⟨W,û⟩, ‖û‖², ‖W‖² in the same read, multi-threaded (OpenMP), with the reductions accumulated in float64
in blocks summed in a fixed order (the result does not depend on the thread count).

**Bitwise equal to torch.** The parameters and moments are bit for bit those of ``torch.optim.AdamW(fused=True)``.
torch's CPU kernel does its arithmetic in the parameter's dtype, but the binary torch ships fuses some multiply-adds
(choices of the C++ compiler that built it) and its vectorised body and scalar tail chose differently. The C source
names each site where that can happen; :func:`load` runs torch's own kernel on probe data and picks, per dtype, the
variant of the body, of the tail and the vector width that reproduce it bit for bit. A dtype for which none does
is not served by the kernel.

**Needs a C compiler with OpenMP at run time** (``$CC``, else ``cc``, ``gcc`` or ``clang``), the first time only:
the library is built once (seconds) into ``$INSTRUMENTED_ADAMW_CACHE`` (default ``~/.cache/instrumented_adamw``),
keyed by the source, the compiler and its flags, and loaded with ctypes. Without one, or on Windows, or with
``INSTRUMENTED_ADAMW_CPU_KERNEL=0``, ``fused=True`` falls back to torch's fused update plus a second pass (still
bitwise equal, slower); :func:`status` says which and why, and the optimizer warns once.

Alternatives measured before choosing this (``docs/benchmarks.md``): a ``torch.compile``d update + reductions
(Inductor's C++ code generation) makes two passes, compiles slowly for a whole model and is not bitwise
(Inductor's CPU lerp rounds twice where torch fuses); recovering W from W₊ after torch's own step removes the
snapshot but keeps the second pass.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

#: Set to ``0`` to never build or use the kernel (``fused=True`` on CPU then takes the two-pass path).
ENV_SWITCH = "INSTRUMENTED_ADAMW_CPU_KERNEL"
#: Directory for the built library (default: ``$XDG_CACHE_HOME/instrumented_adamw`` or ``~/.cache/...``).
ENV_CACHE = "INSTRUMENTED_ADAMW_CACHE"

SOURCE = Path(__file__).with_name("cpu_adamw.c")
_ABI = 2  # IADAMW_ABI in the C source
_N_VARIANTS = 12  # N_VARIANTS in the C source: lerp (2) × second moment (3) × decay + step (2)
_DTYPES = (torch.float32, torch.float64)
_BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
# Vector instructions of the ATen kernel torch dispatches to, so the build never uses one the CPU lacks (a cache
# shared by machines of several kinds keys each build by these flags).
_ISA_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mprefer-vector-width=512"),
    "AVX2": ("-mavx2", "-mfma"),
}
_COMPILE_TIMEOUT_S = 300


class _Args(ctypes.Structure):
    """``iadamw_args`` of the C source, field for field."""

    _fields_ = [
        ("k", ctypes.c_int64),
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("exp_avg", ctypes.c_void_p),
        ("exp_avg_sq", ctypes.c_void_p),
        ("max_exp_avg_sq", ctypes.c_void_p),
        ("numel", ctypes.c_void_p),
        ("step", ctypes.c_void_p),
        ("tracked", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("lr", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("amsgrad", ctypes.c_int32),
        ("maximize", ctypes.c_int32),
        ("body_variant", ctypes.c_int32),
        ("tail_variant", ctypes.c_int32),
        ("tail_width", ctypes.c_int64),
        ("threads", ctypes.c_int32),
    ]


@dataclass(frozen=True)
class Rounding:
    """How torch's fused CPU kernel rounds, for one dtype: variants of its vector body and scalar tail, and the
    vector width (elements) that decides which elements are tail (the last ``numel % width`` of a tensor)."""

    body: int
    tail: int
    width: int


@dataclass(frozen=True)
class KernelStatus:
    """Whether ``fused=True`` on CPU runs the single-pass kernel, and why (not)."""

    available: bool
    reason: str
    library: str | None = None
    rounding: dict[str, Rounding] = field(default_factory=dict)  # dtype name -> what the probes found

    def __str__(self) -> str:
        if not self.available:
            return f"two-pass fallback: {self.reason}"
        dtypes = ", ".join(self.rounding)
        return f"single-pass C kernel ({dtypes}): {self.library}"


class _Unavailable(RuntimeError):
    pass


class CpuAdamW:
    """The loaded library and the rounding torch uses per dtype."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fn = {}
        self._reduce3 = {}
        for dtype, name in ((torch.float32, "float"), (torch.float64, "double")):
            fn = getattr(lib, f"iadamw_step_{name}")
            fn.argtypes = [ctypes.POINTER(_Args)]
            fn.restype = ctypes.c_int
            self._fn[dtype] = fn
            fn = getattr(lib, f"iadamw_reduce3_{name}")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32]
            fn.restype = ctypes.c_int
            self._reduce3[dtype] = fn
        self.rounding: dict[torch.dtype, Rounding] = {}

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.rounding

    def reduce3(self, w: Tensor, u: Tensor, out: Tensor) -> None:
        """``out[:] = [⟨w,u⟩, ‖u‖², ‖w‖²]`` in one read of w and u (contiguous CPU tensors of one dtype, float32 or
        float64, equal sizes; ``out`` a contiguous float64 CPU tensor of 3 elements), summed in float64."""
        code = self._reduce3[w.dtype](w.data_ptr(), u.data_ptr(), w.numel(), out.data_ptr(), torch.get_num_threads())
        if code:
            raise MemoryError(f"cpu_adamw: the reduction failed (code {code}: no memory for {w.numel()} elements)")

    def run(
        self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps: Tensor, tracked: Tensor, out: Tensor, *,
        amsgrad: bool, beta1: float, beta2: float, lr: float, weight_decay: float, eps: float, maximize: bool,
        rounding: Rounding,
    ) -> None:  # fmt: skip
        """One step over tensors of one dtype (contiguous, on the CPU). ``steps``: float64 [k], each tensor's step
        after this step's increment; ``tracked``: uint8 [k]; ``out``: float64 [k, 3], overwritten."""
        k = len(params)
        lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
        # One int64 tensor of data pointers per stream; it must live until the call returns.
        ptrs = torch.tensor([[t.data_ptr() for t in ts] for ts in lists], dtype=torch.int64)
        numel = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        row = ptrs.stride(0) * ptrs.element_size()
        base = ptrs.data_ptr()
        args = _Args(
            k=k, param=base, grad=base + row, exp_avg=base + 2 * row, exp_avg_sq=base + 3 * row,
            max_exp_avg_sq=base + 4 * row if amsgrad else None, numel=numel.data_ptr(), step=steps.data_ptr(),
            tracked=tracked.data_ptr(), out=out.data_ptr(), lr=lr, beta1=beta1, beta2=beta2,
            weight_decay=weight_decay, eps=eps, amsgrad=int(amsgrad), maximize=int(maximize),
            body_variant=rounding.body, tail_variant=rounding.tail, tail_width=rounding.width,
            threads=torch.get_num_threads(),
        )  # fmt: skip
        code = self._fn[params[0].dtype](ctypes.byref(args))  # ctypes releases the GIL for the call
        if code:
            raise MemoryError(f"cpu_adamw: the C kernel failed (code {code}: no memory for {k} tensors' work items)")


_lock = threading.RLock()
_kernel: CpuAdamW | None = None
_status: KernelStatus | None = None
_library: CpuAdamW | None = None
_library_error: str | None = None


def library() -> CpuAdamW | None:
    """The built and loaded library, without probing torch's AdamW rounding (what the reductions need); None where
    it cannot be built or loaded (no compiler, Windows, switched off by the environment)."""
    global _library, _library_error
    if _library is not None or _library_error is not None:
        return _library
    with _lock:
        if _library is None and _library_error is None:
            try:
                _library = _open()
            except _Unavailable as exc:
                _library_error = str(exc)
    return _library


def load() -> CpuAdamW | None:
    """The kernel, built and probed on first call (thread-safe); None where it cannot serve (see :func:`status`)."""
    global _kernel, _status
    if _status is not None:
        return _kernel
    with _lock:
        if _status is None:
            try:
                _kernel = _load()
                _status = KernelStatus(
                    True, "", str(_kernel.path), {str(d).removeprefix("torch."): r for d, r in _kernel.rounding.items()}
                )
            except _Unavailable as exc:
                _kernel, _status = None, KernelStatus(False, str(exc))
    return _kernel


def status() -> KernelStatus:
    """Which CPU path ``fused=True`` takes in this process, and why (builds the kernel if not tried yet)."""
    load()
    assert _status is not None
    return _status


def reset() -> None:
    """Forget the loaded kernel, its status and the warning given, so the next :func:`load` tries again (tests, a
    new ``$CC``)."""
    global _kernel, _status, _warned, _library, _library_error
    with _lock:
        _kernel, _status, _warned, _library, _library_error = None, None, False, None, None


def serves(dtype_name: str, warn: bool = True) -> bool:
    """Whether the kernel serves this dtype; under ``torch.compile`` a constant decided (and built) at trace time.
    Where the kernel cannot be built or loaded at all, warns once (``warn``: the caller asked for the fast path)."""
    kernel = load()
    if kernel is None:
        if warn:
            _warn_unavailable()
        return False
    return kernel.supports(getattr(torch, dtype_name))


# What ``torch.compiler.assume_constant_result`` does to a function, without importing the compiler (seconds of
# start-up for every user, compiling or not). tests/test_cpu_kernel.py checks that the public decorator still
# marks functions this way.
serves._dynamo_marked_constant = True  # type: ignore[attr-defined]


_warned = False


def _warn_unavailable() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"InstrumentedAdamW(fused=True) on CPU: the single-pass kernel is not available ({status().reason}), so "
            "tracking takes the two-pass path (torch's fused update, then a pass for the reductions), several times "
            "slower; parameters are the same bitwise. instrumented_adamw.kernels.cpu_adamw.status() says which path is "
            "active.",
            stacklevel=2,
        )


def _open() -> CpuAdamW:
    """Build (or find in the cache) and load the library."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        raise _Unavailable(f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
    if sys.platform == "win32":
        raise _Unavailable("not built on Windows (set up for gcc/clang with OpenMP)")
    path = _build()
    try:
        lib = ctypes.CDLL(str(path))
        if lib.iadamw_abi() != _ABI:
            raise _Unavailable(f"{path} has ABI {lib.iadamw_abi()}, expected {_ABI}")
    except OSError as exc:
        raise _Unavailable(f"could not load {path}: {exc}") from exc
    return CpuAdamW(lib, path)


def _load() -> CpuAdamW:
    """The library with torch's rounding probed per dtype; raises where no dtype can be served."""
    kernel = library()
    if kernel is None:
        raise _Unavailable(_library_error or "unavailable")
    misses = []
    for dtype in _DTYPES:
        try:
            kernel.rounding[dtype] = _probe(kernel, dtype)
        except _Unavailable as exc:
            misses.append(str(exc))
    if not kernel.rounding:
        raise _Unavailable("; ".join(misses))
    return kernel


def _compiler() -> str:
    cc = os.environ.get("CC")
    if cc:
        found = shutil.which(cc)
        if found is None:
            raise _Unavailable(f"CC={cc} is not an executable")
        return found
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    raise _Unavailable("no C compiler found: install gcc or clang (with OpenMP), or set CC")


def _flags() -> tuple[str, ...]:
    isa = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ())
    return _BASE_FLAGS + isa


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "instrumented_adamw"


def _build() -> Path:
    """The library for this source, compiler and flags: from the cache, else compiled into it (atomically, so
    processes building at once, e.g. the ranks of one node, each end with a whole file)."""
    cc = _compiler()
    flags = _flags()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Unavailable(f"cannot run the C compiler {cc}: {exc}") from exc
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), version.encode(), " ".join(flags).encode(), platform.machine()):
        key.update(part if isinstance(part, bytes) else part.encode())
    directory = _cache_dir()
    path = directory / f"cpu_adamw-{key.hexdigest()[:20]}.so"
    if path.exists():
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cpu_adamw-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise _Unavailable(f"cannot write the kernel library under {directory} (set {ENV_CACHE}): {exc}") from exc
    try:
        cmd = [cc, *flags, "-o", tmp, str(SOURCE), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            raise _Unavailable(f"the C compiler {cc} did not run: {exc}") from exc
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise _Unavailable(f"the C compiler failed ({' '.join(cmd)}): {tail}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------------- probes
# Tensor sizes: for the body, multiples of 64 elements (no tail at any vector width); for the tail, every
# remainder modulo 16 and a tensor over three work items of the C kernel (8192 elements each).
_BODY_SIZES = (4096, 64, 192)
_TAIL_SIZES = (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 17, 31, 33, 63, 65, 100, 127, 1000, 3 * 8192 + 13)
# Hyperparameters that make every rounding choice visible (operands of similar size) and take both branches of
# torch's lerp (weight 1 − β1 below and above 0.5), AMSGrad and maximize. (lr, β1, β2, weight decay, amsgrad, max.)
_PROBE_CONFIGS = (
    (0.05, 0.9, 0.95, 0.3, False, False),
    (0.02, 0.2, 0.9, 0.0, True, True),
    (0.1, 0.6, 0.5, 0.1, True, False),
)
_PROBE_STEPS = 3


class _Probe:
    """One set of probe tensors (flat buffers split into views) in two copies: torch's and ours."""

    def __init__(self, sizes: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        self.sizes = sizes
        self.start = {
            "p": torch.randn(n, generator=g, dtype=torch.float64).to(dtype),
            "m": (0.5 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype),
            "v": (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).to(dtype),
        }
        self.start["vmax"] = self.start["v"] * (0.9 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
        self.grads = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(_PROBE_STEPS)]

    def views(self, buf: Tensor) -> list[Tensor]:
        return list(buf.split(self.sizes))

    def run_torch(self, cfg) -> dict[str, Tensor]:
        lr, b1, b2, wd, ams, maxi = cfg
        state = {k: v.clone() for k, v in self.start.items()}
        steps = [torch.tensor(4.0) for _ in self.sizes]
        for g in self.grads:
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                self.views(state["p"]), self.views(g.clone()), self.views(state["m"]), self.views(state["v"]),
                self.views(state["vmax"]) if ams else [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd,
                eps=1e-3, amsgrad=ams, maximize=maxi,
            )  # fmt: skip
        return state

    def run_ours(self, kernel: CpuAdamW, cfg, rounding: Rounding) -> dict[str, Tensor]:
        lr, b1, b2, wd, ams, maxi = cfg
        state = {k: v.clone() for k, v in self.start.items()}
        k = len(self.sizes)
        tracked = torch.ones(k, dtype=torch.uint8)
        out = torch.empty(k, 3, dtype=torch.float64)
        for s, g in enumerate(self.grads):
            steps = torch.full((k,), 5.0 + s, dtype=torch.float64)
            kernel.run(
                self.views(state["p"]), self.views(g), self.views(state["m"]), self.views(state["v"]),
                self.views(state["vmax"]), steps, tracked, out, amsgrad=ams, beta1=b1, beta2=b2, lr=lr,
                weight_decay=wd, eps=1e-3, maximize=maxi, rounding=rounding,
            )  # fmt: skip
        return state


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _probe(kernel: CpuAdamW, dtype: torch.dtype) -> Rounding:
    """Find the rounding of torch's fused CPU AdamW for ``dtype``: first the body's variant (run through the
    kernel's tail code, which takes the variant at run time), then the vector width and the tail's variant."""
    name = str(dtype).removeprefix("torch.")
    everything_tail = 1 << 62

    def matches(probe: _Probe, want: list[dict[str, Tensor]], rounding: Rounding) -> bool:
        return all(_same(w, probe.run_ours(kernel, c, rounding)) for w, c in zip(want, _PROBE_CONFIGS, strict=True))

    body_probe = _Probe(_BODY_SIZES, dtype, seed=0)
    want = [body_probe.run_torch(cfg) for cfg in _PROBE_CONFIGS]
    body = next((v for v in range(_N_VARIANTS) if matches(body_probe, want, Rounding(0, v, everything_tail))), None)
    if body is None:
        raise _Unavailable(f"torch {torch.__version__}'s fused CPU AdamW rounds {name} unlike every kernel variant")
    tail_probe = _Probe(_TAIL_SIZES, dtype, seed=1)
    want = [tail_probe.run_torch(cfg) for cfg in _PROBE_CONFIGS]
    itemsize = torch.empty((), dtype=dtype).element_size()
    first = 64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32
    for width in dict.fromkeys(b // itemsize for b in (first, 64, 32, 16) if b >= itemsize):
        for tail in range(_N_VARIANTS):
            if matches(tail_probe, want, Rounding(body, tail, width)):
                return Rounding(body, tail, width)
    raise _Unavailable(
        f"torch {torch.__version__}'s fused CPU AdamW rounds the last elements of {name} tensors unlike every "
        "kernel variant"
    )


# ---------------------------------------------------------------------------------------------- step
def _step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], steps: Tensor, tracked: list[bool], lr: float, beta1: float, beta2: float,
    weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
) -> Tensor:  # fmt: skip
    """float64 [k, 3] reductions (zero rows for untracked tensors); one kernel call per dtype."""
    kernel = load()
    if kernel is None:
        raise RuntimeError(f"cpu_adamw: the kernel is not available ({status().reason})")
    out = torch.empty(len(params), 3, dtype=torch.float64)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    flags = torch.tensor(tracked, dtype=torch.uint8)
    for dtype, idx in by_dtype.items():
        whole = len(idx) == len(params)

        def pick(ts, idx=idx, whole=whole):
            return ts if whole or not ts else [ts[i] for i in idx]

        sel = torch.tensor(idx)
        part = out if whole else torch.empty(len(idx), 3, dtype=torch.float64)
        kernel.run(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs),
            steps if whole else steps[sel], flags if whole else flags[sel], part, amsgrad=amsgrad, beta1=beta1,
            beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize, rounding=kernel.rounding[dtype],
        )  # fmt: skip
        if not whole:
            out[sel] = part
    return out


@torch.library.custom_op("instrumented_adamw::cpu_adamw_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs",
                                                                             "max_exp_avg_sqs"))  # fmt: skip
def _step_op(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], steps: Tensor, tracked: list[bool], lr: float, beta1: float, beta2: float,
    weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
) -> Tensor:  # fmt: skip
    """The kernel as an operator, so that ``torch.compile`` around ``opt.step()`` calls it inside the graph."""
    return _step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, tracked, lr, beta1, beta2,
                 weight_decay, eps, amsgrad, maximize)  # fmt: skip


@_step_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, tracked, lr, beta1, beta2, weight_decay, eps,
      amsgrad, maximize):  # fmt: skip
    return params[0].new_empty((len(params), 3), dtype=torch.float64)


def fused_adamw_cpu(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], tracked: list[bool], *, amsgrad: bool, beta1: float,
    beta2: float, lr: float, weight_decay: float, eps: float, maximize: bool,
) -> Tensor:  # fmt: skip
    """torch's fused AdamW step on CPU tensors (contiguous; float32 or float64 as :func:`serves` says) and the
    reductions ``[⟨W,û⟩, ‖û‖², ‖W‖²]`` of every tensor as a float64 [k, 3] tensor (zero rows where not tracked).

    The steps are incremented as ``torch.optim.adam._fused_adam`` does, and read by the kernel as floats, as
    torch's kernel reads them."""
    torch._foreach_add_(state_steps, 1)
    steps = torch.stack(state_steps).to(torch.float32).to(torch.float64)
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], steps, list(tracked), float(lr),
            float(beta1), float(beta2), float(weight_decay), float(eps), bool(amsgrad), bool(maximize))  # fmt: skip
    if torch.compiler.is_compiling():
        return _step_op(*args)
    return _step(*args)
