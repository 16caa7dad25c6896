"""Scale: a manifest of 20,000 synthetic rows (made here with the benchmark's generator) builds
in seconds, and memory stays flat in the number of rows (file-hash verification off, as in
scripts/bench_build.py; every other guard runs)."""

from __future__ import annotations

import importlib.util
import json
import time
import tracemalloc
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_build.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_build", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_twenty_thousand_rows_build_fast_with_flat_memory(tmp_path):
    bench = _bench()
    small = bench.make_world(tmp_path / "small", 2_000)
    large = bench.make_world(tmp_path / "large", 20_000)
    start = time.perf_counter()
    counts = bench.build(large, tmp_path / "out")
    seconds = time.perf_counter() - start
    assert counts["train"]["synthetic"] == 20_000
    assert seconds < 60, f"20k rows took {seconds:.1f} s"
    spec = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert spec["numTraining"] == len(spec["training"]) == 20_000 + counts["train"]["real"]

    stream_peak = _peak(lambda: bench.stream(large))
    assert stream_peak < 1 << 20  # streaming: independent of the row count
    small_peak = _peak(lambda: bench.build(small, tmp_path / "out_small", "none"))
    large_peak = _peak(lambda: bench.build(large, tmp_path / "out_large", "none"))
    per_row = (large_peak - small_peak) / 18_000
    json_peak = _peak(lambda: bench.json_list(large))
    assert per_row < 600, f"{per_row:.0f} bytes per extra row"  # registry + id keys only
    assert large_peak * 5 < json_peak
