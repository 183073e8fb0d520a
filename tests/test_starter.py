"""The starter model that ships with aucli: safe to load, picked last, and working on real video."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from aucli.checkpoint import STARTER, load_checkpoint
from aucli.pipeline import resolve_checkpoint
from media_fixtures import VIDEOS, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OPENFACE_AUS = [f"AU{a:02d}" for a in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45)]


def test_starter_ships_small_and_loads_without_pickled_code():
    assert STARTER.is_file(), "the starter checkpoint must ship inside the package"
    assert STARTER.stat().st_size <= 50 * 2**20
    raw = torch.load(STARTER, map_location="cpu", weights_only=True)  # raises on any pickled object
    assert {v.dtype for v in raw["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    meta = load_checkpoint(STARTER).metadata
    assert (meta.backbone, meta.au_set, meta.clip_length) == ("resnet18", "openface", 16)
    assert [f"AU{a:02d}" for a in meta.aus] == OPENFACE_AUS
    assert "OpenFace" in meta.source["description"] and meta.source["kind"] == "distilled"
    assert len(set(meta.thresholds)) > 1  # tuned per AU on held-out people


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUCLI_CHECKPOINT", raising=False)
    assert resolve_checkpoint() == STARTER
    mine = tiny_checkpoint(tmp_path / "weights" / "mine.pt")
    assert resolve_checkpoint() == Path("weights") / "mine.pt"
    env = tiny_checkpoint(tmp_path / "env.pt")
    monkeypatch.setenv("AUCLI_CHECKPOINT", str(env))
    assert resolve_checkpoint() == env
    flag = tiny_checkpoint(tmp_path / "flag.pt")
    assert resolve_checkpoint(flag) == flag
    assert mine.is_file()
    # 'starter' names the shipped model, as a flag or in the environment, unless a file has that name
    assert resolve_checkpoint("starter") == STARTER
    monkeypatch.setenv("AUCLI_CHECKPOINT", "starter")
    assert resolve_checkpoint() == STARTER
    own = tiny_checkpoint(tmp_path / "starter")
    assert resolve_checkpoint("starter") == Path("starter") and own.is_file()


def test_commands_accept_the_starter_name(tmp_path):
    """eval, calibrate and export take 'starter' for the shipped checkpoint (a user of a pip install
    does not know its path): they get past the checkpoint to the next problem, or do their job."""
    env = {k: v for k, v in os.environ.items() if k != "AUCLI_CHECKPOINT"}
    missing = str(tmp_path / "no-data")
    for args in (["eval", "--checkpoint", "starter", "--data-root", missing],
                 ["calibrate", "-c", "starter", "-o", str(tmp_path / "cal.pt"), "--data-root", missing]):
        done = subprocess.run([sys.executable, "-m", "aucli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "no-data" in done.stderr and "checkpoint not found" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "aucli", "export", "starter", "-o", "copy.pt"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "copy.pt").metadata.au_set == "openface"


def test_detect_with_no_flags_from_another_folder(tmp_path):
    """The README's main job: from any folder, no flags, the shipped model."""
    clip = tmp_path / "single_face.mp4"
    shutil.copy(VIDEOS / "single_face.mp4", clip)
    env = {k: v for k, v in os.environ.items() if k != "AUCLI_CHECKPOINT"}
    done = subprocess.run([sys.executable, "-m", "aucli", "detect", clip.name, "-o", "aus.csv"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    model_lines = [line for line in done.stderr.splitlines() if line.startswith("aucli: model ")]
    assert len(model_lines) == 1 and str(STARTER) in model_lines[0] and "OpenFace" in model_lines[0]
    table = pd.read_csv(tmp_path / "aus.csv")
    assert len(table) == 72
    assert [c for c in table.columns if c.endswith("_c")] == [f"{a}_c" for a in OPENFACE_AUS]
    assert [c for c in table.columns if c.endswith("_p")] == [f"{a}_p" for a in OPENFACE_AUS]
    assert table["success"].mean() > 0.9


@pytest.mark.slow
def test_model_card_figures_reproduce(tmp_path):
    """docs/models.md's held-out table equals `aucli eval` on the prepared corpus.

    Needs the teacher-labelled corpus prepared as the card says (AUCLI_DISTILL_DATA, default
    ../shared/distill prepared into .cache/distill); skipped where the corpus is absent.
    """
    data = Path(os.environ.get("AUCLI_DISTILL_DATA", ROOT / ".cache" / "distill"))
    corpus = ROOT.parent / "shared" / "distill"
    if not (data / "aucli_dataset.json").is_file():
        if not corpus.is_dir():
            pytest.skip("the teacher-labelled corpus is not here")
        subprocess.run([sys.executable, "-m", "aucli", "prepare", "videos", "--videos", corpus / "videos",
                        "--labels", corpus / "labels", "--index", corpus / "corpus.csv", "--test-fraction",
                        "0.15", "--seed", "0", "--workers", "2", "-o", data, "--quiet"], check=True)
    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "aucli", "eval", "--checkpoint", STARTER, "--data-root", data,
                    "--json", out, "--quiet"], check=True)
    measured = json.loads(out.read_text())
    card = (ROOT / "docs" / "models.md").read_text()
    rows = dict(re.findall(r"^\| (AU\d\d) \|[^|]*\| *([\d.]+) *\|", card, re.M))
    assert list(rows) == OPENFACE_AUS
    # Within 0.2 points: on another CPU a few frames near a threshold flip. Measured with the same
    # code on an AMD EPYC (Zen 4) against an Intel Xeon (third starter): up to 0.11 per AU, 52.37 against 52.4.
    # (The card's table is from the AMD machine.)
    for au, f1 in measured["f1"].items():
        assert float(rows[au]) == pytest.approx(f1, abs=0.2), au
    mean = re.search(r"^\| \*\*mean\*\* \|[^|]*\| \*\*([\d.]+)\*\* \|", card, re.M)
    assert mean and float(mean.group(1)) == pytest.approx(measured["mean_f1"], abs=0.06)
