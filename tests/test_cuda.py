"""The same parity and precision checks on a CUDA device (foreach, fused, capturable). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_reductions, set_grads, twin_optimizers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("flags", [{"foreach": True}, {"foreach": False}, {"fused": True}, {"capturable": True}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_bitwise_parity_and_reductions(flags, dtype):
    pa, ref, pb, ours = twin_optimizers(flags, dtype, 0.01, device="cuda")
    for s in range(50):
        for params in (pa, pb):
            set_grads(params, s)
        pre = {n: p.detach().clone() for n, p in pb.items()}
        ref.step()
        ours.step()
    torch.cuda.synchronize()
    for a, b in zip(pa.values(), pb.values(), strict=True):
        assert torch.equal(a, b)
    r = ours.last_forces()
    for name, p in pb.items():
        wu, uu, ww = reference_reductions(
            pre[name].cpu(), {k: v.cpu() for k, v in ours.state[p].items()}, 0.9, 0.999, 1e-8, False
        )
        last = r.to_dict()[name]
        assert last["u_sq"] == pytest.approx(uu, rel=1e-5) and last["w_sq"] == pytest.approx(ww, rel=1e-5)
