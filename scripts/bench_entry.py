"""Benchmark: what a new user waits for first.

1. Start-up of the ``synthlesion`` command (``synthlesion --help``, a fresh interpreter each
   time; median of five) and of ``import synthlesion`` (goal: under 2 s).
2. ``synthlesion demo --quick`` end to end in a fresh process (goal: at most 30 s, as the
   README says), with its stages (``demo.json``'s seconds: phantom, guards, training,
   sampling, build, evaluation).

Every figure is measured here, on this machine; the last line is one line of JSON.

Usage: python scripts/bench_entry.py [--skip-demo] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-demo", action="store_true", help="start-up figures only")
    parser.add_argument("--threads", type=int, default=None, help="the demo's torch threads")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    script = Path(sys.executable).with_name("synthlesion")  # the installed console script
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "synthlesion"]
    figures: dict = {"bench": "entry", "cpu_count": os.cpu_count()}
    _timed([*cli, "--help"], env)  # warm the file cache once
    helps = [_timed([*cli, "--help"], env) for _ in range(5)]
    imports = [_timed([sys.executable, "-c", "import synthlesion"], env) for _ in range(5)]
    figures["startup_help_s"] = round(statistics.median(helps), 3)
    figures["import_s"] = round(statistics.median(imports), 3)
    print(
        f"synthlesion --help {figures['startup_help_s']:.2f} s, import synthlesion "
        f"{figures['import_s']:.2f} s (goal: under 2 s)",
        flush=True,
    )
    if not args.skip_demo:
        out = Path(tempfile.mkdtemp(prefix="bench_entry_")) / "demo"
        command = [*cli, "demo", "--quick", "--no-progress", "--out", str(out)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        try:
            figures["demo_quick_s"] = round(_timed(command, env), 1)
            record = json.loads((out / "demo.json").read_text(encoding="utf-8"))
            figures["demo_quick_stages_s"] = record["seconds"]
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        print(
            f"synthlesion demo --quick {figures['demo_quick_s']:.1f} s (goal: at most 30 s); "
            f"stages {figures['demo_quick_stages_s']}",
            flush=True,
        )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
