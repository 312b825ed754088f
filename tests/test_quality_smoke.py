"""experiments/quality.py end to end at a toy size: every method, one seed, all outputs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "experiments" / "quality.py"


@pytest.mark.slow
def test_quality_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("quality_exp", QUALITY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--tiny", "--out", str(tmp_path), "--seeds", "1", "--layers", "2",
                       "--pretrain-steps", "8", "--steps", "4", "--probe-steps", "2",
                       "--lisa-interval", "2", "--lisa-layers", "1", "--max-ft-records", "120",
                       "--ft-test", "16", "--methods", "full", "lora", "lisa", "lisa_imp"])
    for name in ("quality.json", "quality.md", "quality_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert set(saved["summary"]) == {"full", "lora", "lisa", "lisa_imp"}
    assert saved["settings"]["steps"] == 4 and saved["settings"]["lisa_layers"] == 1
    assert saved["environment"]["jax"] and saved["environment"]["devices"] >= 1
    for m, s in report["summary"].items():
        assert s["seeds"] == 1 and 0 < s["test_loss"] < 20, (m, s)
        assert len(report["runs"][m][0]["train_losses"]) == 4
    probs = report["importance_probe"]["probs"]
    assert len(probs) == 2 and abs(sum(probs) - 1.0) < 1e-6
    assert "LISA uniform held-out loss" in report["sentence"]
