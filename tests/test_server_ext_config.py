"""c.LightLLM traitlets become `lightllm-nb serve` options that the real CLI parser accepts."""

import pytest
from traitlets import TraitError
from traitlets.config import Config

from lightllm_nb.cli import build_parser
from lightllm_nb.server_ext.app import LightLLM


def test_every_setting_reaches_serve_under_its_flag():
    config = Config()
    config.LightLLM.update(model="demo", device="cpu", dtype="float32", kv_fraction=0.5, scheduler="aggressive",
                           max_running_per_user=3, max_waiting_per_user=7, prefix_cache_scope="shared",
                           extra_serve_args=["--block-size", "4"])
    args = build_parser().parse_args(["serve", *LightLLM(config=config).serve_args()])
    assert (args.model, args.device, args.dtype, args.scheduler) == ("demo", "cpu", "float32", "aggressive")
    assert (args.gpu_memory_utilization, args.max_running_per_user, args.max_waiting_per_user) == (0.5, 3, 7)
    assert args.block_size == 4 and args.prefix_cache_scope == "shared"


def test_unset_limits_leave_serves_defaults():
    defaults = build_parser().parse_args(["serve"])
    args = build_parser().parse_args(["serve", *LightLLM().serve_args()])
    assert args.max_waiting_per_user == defaults.max_waiting_per_user
    assert args.gpu_memory_utilization == defaults.gpu_memory_utilization


def test_tensor_parallel_degree_reaches_serve_and_nonsense_is_refused():
    assert build_parser().parse_args(["serve", *LightLLM(tp=2).serve_args()]).tp == 2
    with pytest.raises(TraitError, match="at least 1"):
        LightLLM(tp=0)
