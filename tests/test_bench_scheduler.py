"""bench/scheduler.py's scoring: objectives, the steady-state trim, and records saved by one run
scored again under other objectives."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from lightllm_nb.sim.simulator import RequestRecord

_spec = importlib.util.spec_from_file_location("bench_scheduler", Path(__file__).parents[1] / "bench" / "scheduler.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench   # its dataclasses look their module up while being defined
_spec.loader.exec_module(bench)


def record(i, *, arrival=0.0, ttft=0.1, finished=1.0, gap=0.05, output_len=10):
    return RequestRecord(f"r{i}", arrival, 5, output_len, admitted=arrival, first_token=arrival + ttft,
                         finished=finished, last_token=finished, longest_gap=gap)


def test_objectives_count_ttft_mean_tpot_and_the_longest_gap():
    strict = bench.Objectives(ttft=1.0, tpot=0.2, gap=0.5)
    assert strict.met(record(0))
    assert not strict.met(record(1, ttft=1.5))
    assert not strict.met(record(2, gap=0.6))                     # one stall is enough to miss
    assert not strict.met(record(3, finished=10.0))               # mean TPOT (10 - 0.1) / 9 > 0.2
    assert bench.Objectives(ttft=1.0, tpot=math.inf).met(record(4, gap=100.0))
    assert str(bench.Objectives(10, math.inf, 1.5)) == "TTFT<=10s, max gap<=1.5s"


def test_steady_part_drops_the_first_and_last_completions():
    records = [record(i, finished=float(i)) for i in range(10)]
    kept, duration = bench.steady_part(records, 99.0, trim=2)
    assert sorted(r.request_id for r in kept) == [f"r{i}" for i in range(2, 8)]
    assert duration == 7.0 - 1.0          # from the 2nd completion to the 2nd-last
    assert bench.steady_part(records, 99.0, trim=0) == (records, 99.0)
    with pytest.raises(ValueError, match="trim"):
        bench.steady_part(records, 99.0, trim=5)


def test_saved_records_are_scored_again_under_other_objectives(tmp_path, capsys):
    saved = tmp_path / "records.jsonl"
    bench.main(["--sim", "--synthetic", "--clients", "6", "--num-requests", "40", "--kv-tokens", "2048",
                "--max-tokens", "256", "--max-prompt", "256", "--warmup", "10", "--policies", "aggressive,past_future",
                "--save-records", str(saved)])
    capsys.readouterr()
    assert len(saved.read_text().splitlines()) == 2

    def rows(*objectives):
        bench.main(["--from-records", str(saved), *objectives])
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "clients" in line]

    lenient = rows("--ttft-slo", "1e9", "--tpot-slo", "inf")
    assert len(lenient) == 2 and all("| 100% |" in row for row in lenient)
    assert all("| 0% |" in row for row in rows("--ttft-slo", "0"))
