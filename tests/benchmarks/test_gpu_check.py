"""benchmarks/gpu_check.py runs (tiny, on CPU), so the device check cannot rot before a GPU runs it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--layers", "1", "--resolution", "64", "--dtype", "fp32", "--device", "cpu", "--steps", "2",
        "--eval-steps", "2", "--text-tokens", "16", "--prompts", "1", "--group", "2", "--eval-batch", "2",
        "--pos-embed-max-size", "16", "--repeat", "1"]


def test_the_device_check_runs_every_phase_on_a_tiny_model():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), *TINY], cwd=ROOT, check=False,
                          capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in ("teacher", "opd", "eval")}
    assert set(rows) == {"teacher", "opd", "eval"}, done.stdout
    for phase, images in (("teacher", 2), ("opd", 2), ("eval", 2)):
        assert int(rows[phase][1]) == images and float(rows[phase][2]) > 0 and float(rows[phase][4]) > 0
    assert "1 layers" in done.stdout and "forwards per image: teacher 10, opd 12, eval 4" in done.stdout
