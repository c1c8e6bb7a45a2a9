"""The Triton kernels compiled ahead of time for sm_80 and sm_90, on a machine without a GPU.

What a GPU compiles on first use is fixed by what ``fused_adamw_reduce`` launches. A worker process per target
captures those launches on CPU tensors for every option the optimizer passes (dtype × amsgrad × maximize × grad
scale × found_inf, aligned and misaligned tensors, lr as a float, a float64 tensor or a misaligned view) and hands
them to each kernel's own ``warmup`` with a stand-in driver that names the target: the JIT builds exactly the
variant a GPU would (signature, constants, alignment attributes, compiler options), and Triton's bundled ``ptxas``
assembles it. Everything Triton happens in the workers, never in the test process: Triton's interpret mode is
fixed when ``triton`` is first imported (test_triton.py sets TRITON_INTERPRET=1 before it imports it), and the
interpreter leaves ``triton.language`` patched after a kernel calls a ``@triton.jit`` helper, which would break
compiling for real in the same process.

Checked for each variant and target:

* it compiles: a kernel change that breaks GPU compilation fails CI here;
* the options that are no variant (maximize, found_inf, alignment, lr's kind) map onto one compiled kernel;
* the fast path moves p, g, m, v (and max v) in 16-byte accesses only: (4 + amsgrad) streams loaded and
  (3 + amsgrad, + 1 with GradScaler: the unscaled gradient) stored, ``BLOCK · itemsize / threads / 16`` vectors
  per thread each (``ld.global.v4.b32`` in PTX, ``LDG.E.128`` / ``STG.E.128`` in SASS), and no more: a hint that
  leaked into the fallback would double them;
* the fallback (a misaligned tensor, or the ragged tail of a size that is not a multiple of 16 bytes) exists and
  moves one element per access;
* nothing lives in local memory: no ``.local`` in PTX, no ``LDL``/``STL`` in SASS, ``LOCAL:0 STACK:0`` in the
  cubin's resource usage (spills would show there). Registers per thread go into the test's user properties.

This says nothing about speed (no GPU runs here): it guards the code that the bandwidth target needs.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch

import instrumented_adamw
from instrumented_adamw.kernels.force_table import TABLE_LAYOUT

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)

TARGETS = {"sm_80": 80, "sm_90": 90}  # A100, H100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VECTOR_BYTES = 16  # one ld.global.v4.b32: the widest access a thread issues
WORKER_TIMEOUT_S = 600  # a cold compile of all variants for one target takes ~15 s on one core


# ---------------------------------------------------------------------------------------------------- worker
class _Target:
    """Stands in for Triton's CUDA driver: names the GPU to compile for; warming up a kernel needs nothing else."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


class _Recorder:
    """Takes a kernel's place in the module and keeps each launch (grid, arguments) instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def _tensor(numel: int, dtype: torch.dtype, misaligned: bool, value: float = 0.0) -> torch.Tensor:
    """A tensor, or a view one element into a larger one: 2 or 4 bytes off a 16-byte boundary."""
    base = torch.full((numel + 1,), value, dtype=dtype)
    return base[1:] if misaligned else base[:numel].clone()


def record_launches(module, dtype: torch.dtype, amsgrad: bool, scaled: bool, into: bool = False) -> dict[str, list]:
    """Every launch ``fused_adamw_reduce`` makes for these settings, over the options that should make no variant
    (with ``into``, the second launch records into a force table: η and λ of every sign and size)."""
    recorders = {"update": _Recorder(), "sum": _Recorder()}
    kernels = module._adamw_block, module._sum_partials
    module._adamw_block, module._sum_partials = recorders["update"], recorders["sum"]
    try:
        for maximize, found, misaligned in itertools.product((False, True), repeat=3):
            sizes = (2048, 4810, 5)  # full blocks, a ragged tail, a tensor smaller than a block
            ps, gs, ms, vs, vmaxs = ([_tensor(n, dtype, misaligned) for n in sizes] for _ in range(5))
            # lr as the optimizer passes it: a Python float, or a tensor (float64, or a misaligned float32 view).
            lr = torch.tensor([1e-3], dtype=torch.float64) if misaligned else 1e-3
            scale = _tensor(1, torch.float32, misaligned, 1024.0) if scaled else None
            found_inf = _tensor(1, torch.float32, misaligned) if found else None
            record = None
            if into:
                table = torch.zeros(4, TABLE_LAYOUT["WIDTH"], dtype=torch.float64)
                eta, lam = (0.0, 1.0) if misaligned else (3e-4, 0.1 * (1 + maximize))
                record = module.RecordInto(table, torch.tensor([2, -1, 0]), eta, lam)
            module.fused_adamw_reduce(
                ps, gs, ms, vs, vmaxs if amsgrad else [], torch.ones(len(sizes)), lr=lr, weight_decay=0.1,
                beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=amsgrad, maximize=maximize, grad_scale=scale,
                found_inf=found_inf, record=record,
            )  # fmt: skip
    finally:
        module._adamw_block, module._sum_partials = kernels
    return {name: r.launches for name, r in recorders.items()}


def update_name(dtype: str, amsgrad: bool, scaled: bool) -> str:
    return f"update-{dtype}-{'amsgrad' if amsgrad else 'adamw'}-{'grad_scale' if scaled else 'unscaled'}"


def compile_all(capability: int, out: Path) -> None:
    """Worker: compile every variant for one target; write ``<name>.ptx``, ``<name>.sass`` (SASS and resource
    usage, from the ``cuobjdump`` bundled with the wheel, like ``ptxas``) and ``index.json``."""
    import triton
    from triton.runtime.driver import driver

    from instrumented_adamw.kernels import triton_adamw

    driver.set_active(_Target(capability))
    jobs = [
        (update_name(dtype, amsgrad, scaled), "update", [(DTYPES[dtype], amsgrad, scaled)])
        for dtype, amsgrad, scaled in itertools.product(DTYPES, (False, True), (False, True))
    ]
    jobs.append(("sum", "sum", [(dtype, False, False) for dtype in DTYPES.values()]))
    jobs.append(("sum-record", "sum", [(dtype, False, False, True) for dtype in DTYPES.values()]))
    kernels = {"update": triton_adamw._adamw_block, "sum": triton_adamw._sum_partials}
    index = {}
    for name, kernel, settings in jobs:
        try:
            recorded = [launch for s in settings for launch in record_launches(triton_adamw, *s)[kernel]]
            built = {}
            for grid, args, kwargs in recorded:
                k = kernels[kernel].warmup(*args, grid=grid, **kwargs)
                built[k.hash] = k
            k = next(iter(built.values()))
            (out / f"{name}.ptx").write_text(k.asm["ptx"])
            cubin = out / f"{name}.cubin"
            cubin.write_bytes(k.asm["cubin"])
            dump = [triton.knobs.nvidia.cuobjdump.path, "--dump-sass", "--dump-resource-usage", str(cubin)]
            (out / f"{name}.sass").write_text(subprocess.run(dump, capture_output=True, text=True, check=True).stdout)
            index[name] = {"launches": len(recorded), "variants": len(built), "num_warps": k.metadata.num_warps}
        except Exception:  # reported by the test of this variant, with the compiler's message
            index[name] = {"error": traceback.format_exc()}
    index["BLOCK"] = triton_adamw.BLOCK
    (out / "index.json").write_text(json.dumps(index, indent=1))


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Both targets compiled by two worker processes at once (one per core), into a fresh Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    # The worker imports the same source tree as this session.
    root = str(Path(instrumented_adamw.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else root
    workers = {}
    try:
        for target, capability in TARGETS.items():
            out = tmp_path_factory.mktemp(target)
            cmd = [sys.executable, __file__, str(capability), str(out)]
            workers[target] = (out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        results = {}
        for target, (out, proc) in workers.items():
            log = proc.communicate(timeout=WORKER_TIMEOUT_S)[0].decode(errors="replace")
            assert proc.returncode == 0, f"the {target} compile worker failed:\n{log}"
            results[target] = (out, json.loads((out / "index.json").read_text()))
        return results
    finally:
        for _, proc in workers.values():
            if proc.poll() is None:  # a worker past its timeout, or left behind by the other's failure
                proc.kill()
                proc.wait()


def variant(compiled, target: str, name: str) -> tuple[str, str, dict]:
    """PTX, SASS with resource usage, and what the worker noted (launches, variants built, warps, BLOCK)."""
    out, index = compiled[target]
    info = index[name]
    if "error" in info:
        pytest.fail(f"{name} does not compile for {target}:\n{info['error']}")
    return (out / f"{name}.ptx").read_text(), (out / f"{name}.sass").read_text(), {**info, "BLOCK": index["BLOCK"]}


def global_accesses(ptx: str) -> Counter:
    """(ld|st, bytes per access) of every global load and store in the PTX, e.g. ('ld', 16) for v4.b32."""
    out: Counter = Counter()
    for op, mods in re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)+)", ptx):
        parts = mods.split(".")
        lanes = next((int(m[1:]) for m in parts if re.fullmatch(r"v\d", m)), 1)
        bits = next(int(m[1:]) for m in reversed(parts) if re.fullmatch(r"[bfsu]\d+", m))
        out[op, lanes * bits // 8] += 1
    return out


def sass_report(text: str) -> tuple[Counter, dict[str, int]]:
    """SASS memory instructions (``LDG.E.128`` → ('LDG', 16)) and the resource usage (REG, STACK, LOCAL, ...)."""
    width = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    sass: Counter = Counter()
    for op, mods in re.findall(r"\b(LDG|STG|LDL|STL)((?:\.\w+)*)", text):
        sass[op, next((width[m] for m in mods.split(".") if m in width), 4)] += 1
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[1]))
    return sass, {k: int(v) for k, v in usage.items()}


def assert_no_local_memory(ptx: str, sass: Counter, usage: dict[str, int]) -> None:
    assert ".local" not in ptx, "the PTX uses local memory"
    assert not any(op in ("LDL", "STL") for op, _ in sass), f"ptxas spilled to local memory: {sass}"
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_update_kernel_moves_16_byte_vectors_and_never_spills(compiled, target, dtype, amsgrad, scaled, request):
    ptx, sass_text, info = variant(compiled, target, update_name(dtype, amsgrad, scaled))
    # maximize, found_inf, the tensors' alignment and lr's kind are decided at run time: one variant for all.
    assert info["variants"] == 1, f"{info['launches']} launches built {info['variants']} variants"
    itemsize = DTYPES[dtype].itemsize
    elements = info["BLOCK"] // (32 * info["num_warps"])  # per thread and stream
    vectors = elements * itemsize // VECTOR_BYTES
    assert vectors >= 1, "a block too small to give every thread one 16-byte vector"
    # p, g, m, v (, max v) in; p, m, v (, max v) and with GradScaler the unscaled g (as torch's kernel) out
    loaded, stored = 4 + amsgrad, 3 + amsgrad + scaled

    access = global_accesses(ptx)
    assert access["ld", VECTOR_BYTES] == loaded * vectors, access
    assert access["st", VECTOR_BYTES] == stored * vectors, access
    # The fallback: one element per access (fp32 also counts the scalar loads of lr, the step, the scale, found_inf).
    assert access["ld", itemsize] >= loaded * elements and access["st", itemsize] >= stored * elements, access
    assert not {size for _, size in access} - {VECTOR_BYTES, 8, 4, itemsize}, access

    sass, usage = sass_report(sass_text)
    assert sass["LDG", VECTOR_BYTES] == loaded * vectors and sass["STG", VECTOR_BYTES] == stored * vectors, sass
    assert_no_local_memory(ptx, sass, usage)
    request.node.user_properties.append(("registers", usage["REG"]))
    counts = {f"{op}.{size}B": n for (op, size), n in sorted(access.items())}
    request.node.user_properties.append(("ptx_global_accesses", counts))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["sum", "sum-record"])
def test_partial_sums_kernel_compiles_without_local_memory(compiled, target, name, request):
    """The second launch, with and without the table update: one variant each whatever η, λ, rows or alignment
    (η and λ travel as bits, never as a specialised value); the table update compiled without FMA contraction."""
    ptx, sass_text, info = variant(compiled, target, name)
    assert info["variants"] == 1, f"{info['launches']} launches built {info['variants']} variants"
    sass, usage = sass_report(sass_text)
    assert_no_local_memory(ptx, sass, usage)
    assert "fma.rn.f64" not in ptx, "the table update must round as torch's separate multiply and add"
    if name == "sum-record":
        assert "mul.rn.f64" in ptx and "st.global.b64" in ptx  # the forces and the row really are in the kernel
    request.node.user_properties.append(("registers", usage["REG"]))


if __name__ == "__main__":  # the compile worker: python tests/test_kernel_ptx.py CAPABILITY OUT_DIR
    compile_all(int(sys.argv[1]), Path(sys.argv[2]))
