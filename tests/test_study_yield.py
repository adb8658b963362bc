"""The yield study's --quick mode runs end to end and writes its curve, table and round log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "study_yield.py"


def test_quick_study_writes_curves_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=1200)
    results = tmp_path / "quick" / "results"
    rounds = [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rounds} == {"random", "mig_label@loss", "mig@energy"}
    assert sorted(r["n_labels"] for r in rounds if r["arm"] == "random") == [8, 12, 16]
    picked = [p for r in rounds if r["arm"] == "mig_label@loss" for p in r["picks"]]
    assert len(picked) == len(set(picked)) == 8, "two rounds of 4 distinct picks"
    assert (results / "curve_ethanol.png").stat().st_size > 10_000
    summary = (results / "summary.md").read_text()
    assert "labels to random's final F" in summary and "mig_label@loss" in summary
    # a rerun finds every round recorded and only rewrites the report
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    assert len((results / "rounds.jsonl").read_text().splitlines()) == len(rounds)
