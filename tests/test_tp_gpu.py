"""Tensor parallelism on two GPUs (NCCL): a Llama-3.2-1B-shaped model's greedy batch equals tp=1.

Run on a machine with at least 2 GPUs (the device tool's nvidia-h200-x2), never in CI:
    LIGHTLLM_NB_TEST_TOKENIZER=<tokenizer folder> python -m pytest -q -m gpu tests/test_tp_gpu.py
Random weights are written once as safetensors (the workers load from a path). float32, so the
all-reduce's different summation order cannot flip a near-tie between two tokens.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightllm_nb.engine.engine import Engine
from lightllm_nb.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from roofline import SHAPES  # noqa: E402
from tp import write_random_folder  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nvidia-h200-x2)")]


@pytest.mark.timeout(600)
def test_tp2_greedy_batch_equals_tp1_on_a_1b_shape(tmp_path, demo_tokenizer):
    folder = write_random_folder(SHAPES["llama-1b"], demo_tokenizer, tmp_path / "llama-1b")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 30000, n).tolist() for n in (5, 40, 300, 1000)]
    sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = {}
    for tp in (1, 2):
        with Engine(str(folder), tp=tp, dtype="float32", kv_tokens=16384, progress=False) as engine:
            outputs[tp] = [c.token_ids for c in engine.generate(prompt_token_ids=prompts, sampling=sampling)]
            if tp == 2:
                assert len(engine.model.workers) == 1 and engine.model.config.num_kv_heads == 4
    assert outputs[2] == outputs[1]
