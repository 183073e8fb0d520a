"""The model plus `convert-official` reproduces the reference implementation's outputs (fixtures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import aucli
from aucli.cli import app
from reference_fixtures import FIXTURES, REFERENCE_DIR, load_fixture, reference_input, reference_state_for

PROB_TOL = 1e-5
AUX_TOL = 1e-4


def _input_for(fixture: dict[str, np.ndarray], backbone: str) -> torch.Tensor:
    batch = 2 if backbone == "resnet50" else 1  # fixtures/README.md
    frames = fixture["probs"].shape[0]
    x = reference_input((batch, frames // batch, 3, 224, 224), seed=0)
    assert float(x.double().sum()) == pytest.approx(float(fixture["input_sum"]), abs=1e-6)
    return x


def _max_errors(model, x, fixture) -> tuple[float, dict[str, float]]:
    with torch.no_grad():
        probs, aux = model(x, return_aux=True)
    rows = fixture["probs"].shape[0]
    prob_err = float(np.abs(probs.reshape(rows, -1).numpy() - fixture["probs"]).max())
    aux_err = {
        name: float(np.abs(v.reshape(rows, -1).numpy() - fixture[f"aux_{name}"]).max())
        for name, v in aux.items()
    }
    return prob_err, aux_err


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def converted(request, tmp_path_factory):
    """Write the fixture's reference checkpoint as the reference code saves it, convert it with the CLI."""
    name = request.param
    state, dataset, backbone = reference_state_for(name)
    fixture = load_fixture(REFERENCE_DIR / name)
    first = str(fixture["first_conv_key"])
    assert float(state[first].double().sum()) == pytest.approx(float(fixture["first_conv_sum"]), abs=1e-6)
    tmp = tmp_path_factory.mktemp(name.split(".")[0])
    source = tmp / "best_model.pth"
    # The reference saves {'epoch', 'state_dict' (DataParallel-prefixed), 'optimizer'} (spec §6.5).
    torch.save({"epoch": 24, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, source)
    out = tmp / "model.pt"
    result = CliRunner().invoke(
        app, ["convert-official", str(source), "--dataset", dataset, "--backbone", backbone, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    model = aucli.load_model(str(out))
    return model, _input_for(fixture, backbone), fixture, dataset, backbone


def test_fixture_parity(converted):
    model, x, fixture, dataset, backbone = converted
    assert model.metadata.au_set == dataset and model.metadata.backbone == backbone
    assert model.metadata.source["kind"] == "converted" and model.metadata.source["epoch"] == 24
    prob_err, aux_err = _max_errors(model, x, fixture)
    assert prob_err <= PROB_TOL
    assert set(aux_err) == set(model.au_set.branch_names)
    assert max(aux_err.values()) <= AUX_TOL


# Negative controls: each deliberate mistake must break parity, so the test above can fail.
def _swap_gat_vectors(model):
    gat = model.hsr.gat
    gat.score_receiver.data, gat.score_neighbour.data = gat.score_neighbour.data.clone(), gat.score_receiver.data.clone()


def _lsb_first(model):
    for b in range(len(model.au_set.branches)):
        shifts = getattr(model.hsr, f"_shifts_{b}")
        shifts.copy_(shifts.flip(0))


def _divisor_by_valid_terms(model):
    k = model.k

    def pool(x):
        return F.avg_pool3d(
            x.transpose(1, 2), (2 * k, 1, 1), stride=1, padding=(k, 0, 0), count_include_pad=False
        ).transpose(1, 2)

    model.mfd.temporal_pool = pool


@pytest.fixture(scope="module")
def bp4d_reference():
    from aucli.convert import model_from_reference_state

    name = "reference_bp4d_resnet50_seed0.npz"
    state, dataset, backbone = reference_state_for(name)
    fixture = load_fixture(REFERENCE_DIR / name)
    return model_from_reference_state(state, dataset, backbone), _input_for(fixture, backbone), fixture


@pytest.mark.parametrize("mistake", [_swap_gat_vectors, _lsb_first, _divisor_by_valid_terms])
def test_deliberate_mistakes_break_parity(bp4d_reference, mistake):
    import copy

    model, x, fixture = bp4d_reference
    broken = copy.deepcopy(model)
    mistake(broken)
    assert _max_errors(broken, x, fixture)[0] > 100 * PROB_TOL
