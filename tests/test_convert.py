"""`aucli convert-official`: accepted layouts and refusals."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from aucli.cli import app
from aucli.model import MDHR
from aucli.model.reference import KEY_RULES, map_reference_keys, unwrap_state_dict
from reference_fixtures import REFERENCE_DIR, read_key_list, reference_state

runner = CliRunner()


def _bp4d_state():
    return reference_state(read_key_list(REFERENCE_DIR / "official_state_dict_bp4d_resnet50.txt"), 1, {})


def test_every_reference_key_has_a_rule_and_fills_the_model():
    for key_file, dataset, backbone in [
        ("official_state_dict_bp4d_resnet50.txt", "bp4d", "resnet50"),
        ("official_state_dict_disfa_resnet50.txt", "disfa", "resnet50"),
        ("official_state_dict_bp4d_swinb.txt", "bp4d", "swin_base"),
        ("official_state_dict_disfa_swinb.txt", "disfa", "swin_base"),
    ]:
        keys = {k: torch.empty(0) for k, _ in read_key_list(REFERENCE_DIR / key_file)}
        family = "swin" if backbone.startswith("swin") else "resnet"
        renamed, structural, unmatched = map_reference_keys(keys, family)
        assert unmatched == []
        with torch.device("meta"):  # structure only; no memory, no init cost
            own = MDHR(dataset, backbone).state_dict()
        assert set(renamed) == set(own)
        assert len(renamed) + len(structural) == len(keys)


def test_unwrap_accepts_bare_wrapped_and_prefixed():
    state = {"a.weight": torch.zeros(1)}
    assert unwrap_state_dict(state) == state
    assert unwrap_state_dict({"state_dict": {"module.a.weight": state["a.weight"]}}).keys() == state.keys()


def test_convert_bare_state_dict(tmp_path):
    src = tmp_path / "bare.pth"
    torch.save(_bp4d_state(), src)
    out = tmp_path / "m.pt"
    result = runner.invoke(app, ["convert-official", str(src), "-d", "bp4d", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_wrong_dataset_names_offending_keys_and_writes_nothing(tmp_path):
    src = tmp_path / "bp4d.pth"
    torch.save(_bp4d_state(), src)
    out = tmp_path / "m.pt"
    result = runner.invoke(app, ["convert-official", str(src), "-d", "disfa", "-o", str(out)])
    assert result.exit_code != 0
    assert "12 AUs but disfa has 8 (looks like bp4d): wrong --dataset?" in str(result.exception)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]


def test_wrong_backbone_is_named(tmp_path):
    src = tmp_path / "r50.pth"
    torch.save(_bp4d_state(), src)
    result = runner.invoke(app, ["convert-official", str(src), "-d", "bp4d", "-b", "swin_base", "-o", str(tmp_path / "m.pt")])
    assert result.exit_code != 0 and "wrong --backbone" in str(result.exception)


def test_extra_key_is_named(tmp_path):
    state = _bp4d_state()
    state["LRM.extra_head.weight"] = torch.zeros(2, 2)
    src = tmp_path / "x.pth"
    torch.save(state, src)
    result = runner.invoke(app, ["convert-official", str(src), "-d", "bp4d", "-o", str(tmp_path / "m.pt")])
    assert result.exit_code != 0 and "LRM.extra_head.weight" in str(result.exception)


def test_missing_key_is_named(tmp_path):
    state = _bp4d_state()
    del state["CRM.gat.bias"]
    src = tmp_path / "x.pth"
    torch.save(state, src)
    result = runner.invoke(app, ["convert-official", str(src), "-d", "bp4d", "-o", str(tmp_path / "m.pt")])
    assert result.exit_code != 0 and "hsr.gat.bias" in str(result.exception)


def test_not_a_checkpoint(tmp_path):
    src = tmp_path / "notes.pth"
    src.write_text("hello")
    result = runner.invoke(app, ["convert-official", str(src), "-d", "bp4d", "-o", str(tmp_path / "m.pt")])
    assert result.exit_code != 0 and "not a readable PyTorch checkpoint" in str(result.exception)


def test_rules_cover_scoring_vectors_in_the_documented_direction():
    rules = dict(KEY_RULES)
    assert rules[r"^CRM\.gat\.scoring_fn_source$"] == "hsr.gat.score_receiver"
    assert rules[r"^CRM\.gat\.scoring_fn_target$"] == "hsr.gat.score_neighbour"
