"""scripts/gpu_check.sh's CPU fallback: the same steps as on a GPU (no venv, no tests), at tiny sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_fallback_runs_every_step_and_reports_ratios(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "NO_VENV": "1", "PYTHON": sys.executable, "TESTS": "",
           "OUT": str(tmp_path / "check"),
           "SLICE": "--model tiny-2l-64d --tokens 1k --width 64 --k 4 --batch-size 64 --steps 2 --cpu-steps 1 --cpu-width 32"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert report["device_name"] == "cpu" and report["harvest"]["tokens"] >= 1000
    assert report["harvest"]["harvest_vs_forward"] > 0 and report["gemm_peak_tflops"] > 0
    assert report["train"]["in_memory"] and report["train"]["step_s"] > 0
    assert report["train_cpu_1_process"]["width"] == 32 and report["train_cpu_1_process"]["latent_tok_s"] > 0
    for line in ("harvest / forward =", "encoder GEMM", "process = "):
        assert line in proc.stdout
