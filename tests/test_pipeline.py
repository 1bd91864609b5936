"""Pipeline baseline: layers split across stages give exactly the single-process output."""

import numpy as np
import pytest

from tpicore.dist.pipeline import plan_stages, run_local
from tpicore.errors import TpiError
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.weights.store import TensorStore


def test_plan_stages_partition():
    for L in (1, 3, 7, 80):
        for n in range(1, min(L, 9) + 1):
            stages = plan_stages(L, n)
            assert [l for s in stages for l in s] == list(range(L))
            assert all(len(s) >= 1 for s in stages)
    assert [len(s) for s in plan_stages(8, 2, [3, 1])] == [6, 2]
    with pytest.raises(TpiError, match="at most 3 devices"):
        plan_stages(3, 4)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pipeline_equals_single_process(hf_models, n):
    model_dir, _ = hf_models("wide")
    st = TensorStore.from_model_dir(model_dir)
    ref = generate(Device(st, ResidentSource(st), 32).step, [1, 5, 7, 9], 6, max_seq=32, keep_logits=True)
    gen = run_local(model_dir, n, [1, 5, 7, 9], 6, keep_logits=True)
    assert gen.tokens == ref.tokens
    assert np.array_equal(np.stack(gen.logits), np.stack(ref.logits))
