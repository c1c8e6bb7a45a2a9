"""The ZeRO-1/2 mapping in one process, on DeepSpeed's layout built by hand (the attributes ZeRO sets: each
parameter's ``_hp_mapping`` slice of a flat fp32 partition, padding between; the optimizer's groups replaced by the
partitions; ``step()`` called once per group with that group alone): bitwise torch's AdamW on the flat tensors, each
parameter's forces bitwise those of the unflattened run, one count per step, refusals that say what works. The
real engine on 2 ranks: tests/test_deepspeed.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from instrumented_adamw import InstrumentedAdamW, InstrumentedMuon
from tests.helpers import GROUPS, make_params, param_groups, set_grads

PAD = 3  # padding elements before each parameter's slice


def zero_layout(opt, params: dict[str, torch.nn.Parameter]) -> list[torch.Tensor]:
    """Replace each group's parameters with one flat fp32 copy, as ZeRO-1/2 does, with a fragment map on each."""
    flats = []
    for group, spec in zip(opt.param_groups, GROUPS, strict=True):
        members = [params[n] for n in spec["names"]]
        flat = torch.zeros(sum(p.numel() + PAD for p in members))
        at = 0
        for p in members:
            at += PAD
            view = flat.narrow(0, at, p.numel())
            view.copy_(p.detach().flatten())
            address = SimpleNamespace(start=at, numel=p.numel())
            p._hp_mapping = SimpleNamespace(hp_fragment=view, hp_fragment_address=address)
            p._dp_group = None
            at += p.numel()
        group["params"] = [flat]
        flats.append(flat)
    return flats


def flat_grads(params, flats) -> None:
    for flat, spec in zip(flats, GROUPS, strict=True):
        parts = []
        for n in spec["names"]:
            parts += [torch.zeros(PAD), params[n].grad.flatten()]
        flat.grad = torch.cat(parts)


def deepspeed_step(opt, params) -> None:
    """ZeRO-1/2's ``_optimizer_step``: each group alone in ``param_groups`` for its call; then the model's
    parameters take the updated fp32 values (DeepSpeed's all-gather)."""
    groups = opt.param_groups
    for g in range(len(groups)):
        opt.param_groups = [groups[g]]
        opt.step()
    opt.param_groups = groups
    with torch.no_grad():
        for p in params.values():
            p.copy_(p._hp_mapping.hp_fragment.view_as(p))


@pytest.mark.parametrize("flags", [{}, {"fused": True}, {"foreach": False}, {"amsgrad": True}])
def test_partitions_step_bitwise_and_forces_per_parameter(flags):
    plain_p, zero_p, ref_p = make_params(), make_params(), make_params()
    plain = InstrumentedAdamW(param_groups(plain_p, 0.1), **flags)
    ours = InstrumentedAdamW(param_groups(zero_p, 0.1), **flags)
    ref = torch.optim.AdamW(param_groups(ref_p, 0.1, named=False), **flags)
    flats, ref_flats = zero_layout(ours, zero_p), zero_layout(ref, ref_p)
    for step in range(4):
        for ps in (plain_p, zero_p, ref_p):
            set_grads(ps, step)
        flat_grads(zero_p, flats), flat_grads(ref_p, ref_flats)
        plain.step()
        deepspeed_step(ours, zero_p)
        deepspeed_step(ref, ref_p)
        if step == 1:  # a checkpoint load replaces the moments: the slices must follow the new tensors
            ours.load_state_dict(ours.state_dict())
            ref.load_state_dict(ref.state_dict())
        for a, b in zip(flats, ref_flats, strict=True):
            assert torch.equal(a, b), "the update of the flat partitions is torch's AdamW's, bitwise"
        expect, got = plain.read_forces(), ours.read_forces()
        assert list(got.names) == list(expect.names)
        if not flags.get("fused"):
            assert got.to_dict() == expect.to_dict(), "each parameter's forces, bitwise those of the unflattened run"
            assert (got.residual == expect.residual).all()
            continue
        # fused: the flat tensors are updated whole (torch's kernel rounds a tensor's last elements apart), û taken
        # in a second pass from the moments, where the unflattened run's kernel uses its own: fp32 rounding apart
        for name, e in expect.to_dict().items():
            budget = abs(e["align"]) + e["inject"] + abs(e["decay"])
            for key in ("align", "inject", "decay", "higher_order"):
                assert got.to_dict()[name][key] == pytest.approx(e[key], abs=1e-6 * budget), (name, key)
    assert int(ours._calls) == 4 and ours.state_dict()["param_groups"][0]["track_calls"] == 4


def test_track_every_counts_steps_not_calls():
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.1), track_every=2)
    flats = zero_layout(opt, params)
    for step in range(4):
        set_grads(params, step)
        flat_grads(params, flats)
        deepspeed_step(opt, params)
    out = opt.read_forces()
    assert set(out.steps) == {2} and set(out.unmeasured_steps) == {2}, "every group measured on steps 1 and 3"


def test_a_map_that_misses_elements_is_refused():
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.1))
    zero_layout(opt, params)
    del params["enc.bias"]._hp_mapping  # as if this parameter's elements were nowhere
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match=r"covers 0 of the 37 elements .* What works: DeepSpeed ZeRO stages 0, 1"):
        opt.step()


def test_muon_on_partitions_is_refused_with_what_works():
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = InstrumentedMuon([("w", w)], lr=0.02)
    flat = torch.zeros(w.numel())
    w._hp_mapping = SimpleNamespace(hp_fragment=flat, hp_fragment_address=SimpleNamespace(start=0, numel=48))
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn(48)
    with pytest.raises(RuntimeError, match="Muon's orthogonalisation.*Use ZeRO stage 0, DDP or FSDP2"):
        opt.step()


def test_name_parameters_after_the_swap():
    """The HF Trainer's callback names an optimizer built from model.parameters() after DeepSpeed swapped its groups
    (it crashed with a KeyError before): the rows follow the parameters."""
    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.1, named=False))
    flats = zero_layout(opt, params)
    set_grads(params, 0)
    flat_grads(params, flats)
    deepspeed_step(opt, params)
    assert opt.name_parameters(list(params.items())) == 4
    deepspeed_step(opt, params)
    out = opt.read_forces()
    assert sorted(out.names) == sorted(params) and set(out.steps) == {2}


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"zero_optimization": {"stage": 2}}, "the Trainer discards optimizers=(...)"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, 'has an "optimizer" section'),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            '"zero_force_ds_cpu_optimizer": false',
        ),  # fmt: skip
    ],
)
def test_hf_callback_under_deepspeed_says_why_and_what_works(config, says):
    """The three ways the HF Trainer ends up with DeepSpeed's optimizer instead of ours, each named (the real
    Trainer + DeepSpeed run of the first: tests/test_deepspeed.py)."""
    from instrumented_adamw.hf import _deepspeed_route

    args = SimpleNamespace(deepspeed=config, hf_deepspeed_config=SimpleNamespace(config=config))
    wrapped = SimpleNamespace(
        optimizer=SimpleNamespace(optimizer=torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))
    )
    message = _deepspeed_route(args, wrapped)
    assert says in message and "optimizer_cls_and_kwargs=(InstrumentedAdamW" in message and "got AdamW" in message


def test_a_partition_of_padding_only_joins_the_coverage_check():
    """A rank whose partition of a small group holds only padding (DeepSpeed pads groups to a multiple of the
    ranks) maps it as padding and takes part in the check the other ranks make, rather than refusing alone (which
    would leave them waiting in the check's all-reduce). In one process the other ranks' slices are missing, so
    the check itself refuses."""
    import copy

    params = make_params()
    opt = InstrumentedAdamW(param_groups(params, 0.1))
    flats = zero_layout(opt, params)
    for name in GROUPS[1]["names"]:  # this rank holds none of group 1's elements
        params[name]._hp_mapping = None
    flats[1].zero_()
    set_grads(params, 0)
    flat_grads(params, flats)
    with pytest.raises(RuntimeError, match=r"covers 0 of the \d+ elements"):
        deepspeed_step(opt, {n: params[n] for n in GROUPS[0]["names"]})
    with pytest.raises(RuntimeError, match="cannot be copied or pickled while DeepSpeed holds"):
        copy.deepcopy(opt)
