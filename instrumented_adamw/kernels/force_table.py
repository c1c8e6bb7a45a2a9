"""The column layout of the force table (one float64 row per tensor): the last step's quantities, the interval sums,
then per-tensor counters. ``instrumented_adamw.optim.forces`` owns the table and its arithmetic; kernels that
record a step into rows on the device (``triton_adamw``) take the layout from here, below the optimizer layer."""

#: Per-step quantities, integrated over intervals. Order is the column order of the device table.
QUANTITIES = ("w_dot_u", "u_sq", "w_sq", "align", "inject", "decay", "higher_order", "eta_lambda")
#: What ``last_forces().to_dict()`` reports per tensor: the quantities plus the hyperparameters of that step:
#: ``lr`` and ``weight_decay`` of the decay (shrink η·λ), ``update_lr`` the step size of the update direction
#: (AdamW: η; Muon: η adjusted to the matrix shape by ``adjust_lr_fn``).
LAST_KEYS = QUANTITIES + ("lr", "weight_decay", "update_lr")
#: The four forces whose sum is Δ‖W‖² of a step.
FORCES = ("align", "inject", "decay", "higher_order")

N_QUANTITIES = len(QUANTITIES)
LAST_BLOCK = slice(0, len(LAST_KEYS))
SUM_BLOCK = slice(len(LAST_KEYS), len(LAST_KEYS) + N_QUANTITIES)
# Per-tensor counters after the interval sums (numbered in this order).
(
    START_W_SQ,  # ‖W‖² before the first step integrated in the interval
    STEPS,  # steps integrated (finite, not skipped)
    NONFINITE,  # steps whose reductions were NaN/Inf (kept out of the sums)
    LAST_FINITE,  # 1.0 if the last recorded step was finite
    UNMEASURED,  # steps that moved W unmeasured (track_every > 1): the interval's books cannot close (NaN)
    UNMEASURED_SINCE_LAST,  # unmeasured steps after the last measured one (closes ``last_residual``)
    START_KNOWN,  # 1.0 once a read set the start ‖W‖² from its exact norm (until then: the first step's own)
    WIDTH,
) = range(SUM_BLOCK.stop, SUM_BLOCK.stop + 8)


#: The table's layout, for kernels that update rows on the device themselves (``triton_adamw``): the first column
#: of the last-step and interval blocks, and each counter's column. ``ForceStats.record`` (optim/forces.py) is the
#: definition.
TABLE_LAYOUT = dict(
    WIDTH=WIDTH, N_LAST=len(LAST_KEYS), N_SUM=N_QUANTITIES, LAST=LAST_BLOCK.start, SUM=SUM_BLOCK.start,
    START_W_SQ=START_W_SQ, STEPS=STEPS, NONFINITE=NONFINITE, LAST_FINITE=LAST_FINITE,
    UNMEASURED_SINCE_LAST=UNMEASURED_SINCE_LAST,
    START_KNOWN=START_KNOWN,
)  # fmt: skip
