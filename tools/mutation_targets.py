"""What ``tools/mutate.py`` mutates: each core module with the test files that cover it, and the mutants known to
be equivalent, with the reason each cannot be told apart from the original."""

from __future__ import annotations

#: Module -> the test files that cover it, fastest and most sensitive first (``-x`` stops at the first failure).
TARGETS = {
    "instrumented_adamw/optim/forces.py": [
        "tests/test_forces.py", "tests/test_behaviour.py", "tests/test_dropin.py", "tests/test_monitor_aggregates.py",
        "tests/test_parity.py", "tests/test_muon.py",
    ],
    "instrumented_adamw/optim/adamw.py": [
        "tests/test_behaviour.py", "tests/test_dropin.py", "tests/test_torch_optim_db.py", "tests/test_parity.py",
        "tests/test_steady_state.py", "tests/test_cpu_kernel.py", "tests/test_triton.py",
    ],
    "instrumented_adamw/optim/functional.py": [
        "tests/test_behaviour.py", "tests/test_parity.py", "tests/test_torch_optim_db.py", "tests/test_dropin.py",
    ],
    "instrumented_adamw/monitor.py": [
        "tests/test_monitor_aggregates.py", "tests/test_steady_state.py", "tests/test_dropin.py",
        "tests/test_monitor.py", "tests/test_evidence_logging.py",
    ],
    "instrumented_adamw/weibull/fit.py": [
        "tests/test_weibull.py", "tests/test_weibull_parity.py", "tests/test_diagnostics.py",
    ],
    "train/checkpoint.py": ["tests/test_checkpoint.py", "tests/test_train_faults.py", "tests/test_train_loop.py"],
}  # fmt: skip

#: Equivalent mutants: changes no test can observe because the program computes the same values (a shortcut for
#: zero weight decay, where x·(1 − lr·0) is x bitwise), or that differ only on hardware this suite cannot run (CUDA
#: branches, covered by tests/test_cuda.py on a GPU). Keyed by the module, the stripped source line and the change;
#: each is listed in the report with its reason and left out of the kill rate's denominator. A sixth element, the
#: mutant's ``nth``, picks one of several equal changes on one line (two ``1 - trim`` on a line, say).
_ON_ACCELERATORS = "the branch for steps on an accelerator (CPU steps take the other one): tests/test_cuda.py"
_ZERO_DECAY = "decay by 1 − lr·0 multiplies by 1.0 exactly: the shortcut saves a pass, not a value"
_W = "instrumented_adamw/weibull/fit.py"
_C = "train/checkpoint.py"
_O = "instrumented_adamw/optim/adamw.py"
_FURTHER_OUT = "a start one rank further out: the loop that follows walks to the same exact rank"
_ABOVE_TRIM = "lower ≤ 1: the changed clip moves only bins above 1 − trim, of weight ≤ 0, dropped either way"
#: weibull.py source lines holding several listed mutants.
_LO = "lo = max(1, math.ceil(trim * n + 0.5) - 1)"
_HI = "hi = min(n, math.floor((1 - trim) * n + 0.5) + 1)"
_HI_LOOP = "while hi >= 1 and position(hi) > 1 - trim:"
_SPREAD = "if not cxx > 1e-12 * max(abs(sxx), 1e-300):"
_CLIP = "f_lo, f_hi = np.clip(lower, trim, 1 - trim), np.clip(upper, trim, 1 - trim)"
_QUAD_CALL = "return integrate.quad(g, a, b, limit=200, epsabs=1e-13, epsrel=1e-12)[0] / (b - a)"
_HI_STOPS = "position(1) = 0.5/n ≤ 0.5 < 1 − trim, so the loop stops before hi reaches 1 either way"
_QUAD = "the anchors' quadrature tolerances: the anchors move by ≤ 1.2e-13 relative, below every test's tolerance"
EQUIVALENT = {
    ("instrumented_adamw/optim/forces.py", "recorded, 0.0, block[:, UNMEASURED_SINCE_LAST] + unmeasured.double()",
     "operator", "Add", "Sub"): "the count is only ever compared with zero, and a count of −n is as nonzero as n",
    ("instrumented_adamw/optim/functional.py", "if weight_decay != 0:", "constant", "0", "1"): _ZERO_DECAY,
    ("instrumented_adamw/optim/functional.py", "torch._foreach_add_(device_state_steps, 1)", "remove_call",
     "torch._foreach_add_(device_state_steps, 1)", "pass"): _ON_ACCELERATORS,
    ("instrumented_adamw/optim/functional.py", "torch._foreach_add_(device_state_steps, 1)", "constant", "1", "2"):
        _ON_ACCELERATORS,
    # weibull.py: the trim ranks. The closed-form start is refined by the loops to the exact rank, so a start one
    # rank further out (never inside) gives the same [lo, hi]; a start inside is caught by the rank tests.
    (_W, _LO, "constant", "1", "2", 1): _FURTHER_OUT,
    (_W, _LO, "operator", "Add", "Sub"): _FURTHER_OUT,
    (_W, _LO, "constant", "0.5", "1.0"): _FURTHER_OUT,
    (_W, _HI, "constant", "1", "2", 0): _FURTHER_OUT,
    (_W, _HI, "constant", "0.5", "1.0"): _FURTHER_OUT,
    (_W, "while lo <= n and position(lo) < trim:", "compare0", "LtE", "Lt"):
        "position(n) = (n − 0.5)/n ≥ 0.5 > trim, so the loop stops before lo reaches n either way",
    (_W, _HI_LOOP, "compare0", "GtE", "Gt"):
        _HI_STOPS,
    (_W, _HI_LOOP, "constant", "1", "2", 0):
        _HI_STOPS,
    (_W, "if a.numel() <= chunk:", "compare0", "LtE", "Lt"):
        "a tensor of exactly one chunk: the chunked branch yields that one piece, the same values",
    (_W, "w: Tensor, who: str, center: bool = False, dtype: torch.dtype | None = None", "constant", "False", "True"):
        "both callers pass center, so the default is never used",
    (_W, "sum_sq = sum_abs = 0.0", "constant", "0.0", "1.0"): "with no elements n = 0 raises before the sums are read",
    (_W, "if n < total:", "compare0", "Lt", "LtE"):
        "without zeros (n = total) the filter a[a > 0] keeps every element: the same tensor (non-finite input raises)",
    (_W, _SPREAD, "compare0", "Gt", "GtE"):
        "differs only where cxx equals 1e-12·|sxx| exactly, a floating-point tie no data can be aimed at",
    (_W, _SPREAD, "constant", "1e-300", "2e-300"):
        "the floor applies only when sxx = 0 exactly, and then cxx = 0 raises either way",
    (_W, _CLIP, "operator", "Sub", "Add", 0): _ABOVE_TRIM,
    (_W, _CLIP, "constant", "1", "2", 0): _ABOVE_TRIM,
    (_W, "keep = (weight > 0) & (counts > 0)", "compare0", "Gt", "GtE", 1):
        "weight > 0 already implies counts > 0: an empty bin has lower = upper exactly",
    **{(_W, _QUAD_CALL, "constant", a, b): _QUAD for a, b in (("200", "201"), ("1e-13", "2e-13"), ("1e-12", "2e-12"))},
    (_W, "cxy = mean(lambda f: (x(f) - mx) * (y(f) - my))", "operator", "Sub", "Add"):
        "(x + mx)(y − my) = cxy + 2·mx·mean(y − my), and mean(y − my) = 0 (likewise for y): ≤ 1e-13 apart",
    # optim.py: guards whose other branch is caught again further on
    (_O, 'if isinstance(group["lr"], Tensor) or isinstance(group["betas"][0], Tensor):', "constant", "0", "1"):
        "torch accepts betas only both floats or both tensors: betas[1] tells what betas[0] does",
    (_O, '_, foreach = _default_to_fused_or_foreach(params, group["differentiable"], use_fused=False)', "constant",
     "False", "True"): "only the helper's second result (foreach) is read; use_fused changes the first",
    (_O, "others = [ts[i] for ts in local[1 : 5 if amsgrad else 4]]", "constant", "5", "6"):
        "local holds five lists: the slice to 6 is the slice to 5",
    (_O, "params = local[0]  # then grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs", "constant", "0", "1"):
        "the grads stand in for the params: same device and dtype, and a non-contiguous param has non-contiguous "
        "moments (created like it), which the loop checks",
    (_O, 'if p.device.type != "cpu" or not p.is_contiguous() or p.is_complex():', "boolop", "Or", "And"):
        "each case is refused again below: the first tensor's device, the moments' strides (created like the param), "
        "no complex dtype served",
    # train/checkpoint.py
    (_C, "STATE_FORMAT = 2", "constant", "2", "3"):
        "a version tag the writer and the reader share: any value reads what it writes (other versions are refused "
        "by design, and no state of an older format is committed to test against)",
    (_C, "model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)", "constant", "True", "False"):
        "transformers 5 writes safetensors either way (under 4.x test_snapshot_is_a_verified_hf_directory kills it)",
    (_C, "p.mkdir(exist_ok=True)", "constant", "True", "False"):
        "the directory was just found missing: only another process creating it in between could tell",
    (_C, "elif pointer != directory.name and dir_step(Path(pointer)) < state.step:", "compare0", "Lt", "LtE"):
        "equal steps under different names: step_name never writes two names for one step",
    (_C, "local = [t for t in local if t.is_floating_point() and t.numel()]", "boolop", "And", "Or"):
        "integer and empty tensors are always finite: checking them too changes no answer",
}  # fmt: skip
