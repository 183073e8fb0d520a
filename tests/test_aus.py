"""AU tables: everything dataset-specific is derived from one table per AU set."""

from __future__ import annotations

import numpy as np
import pytest

from aucli.aus import BP4D, DISFA, get_au_set

# Spec §3.7, rows/cols in AU order: the published BP4D cross-region adjacency.
BP4D_ADJ = """
0 0 0 1 0 1 1 1 1 1 1 1
0 0 0 1 0 1 1 1 1 1 1 1
0 0 0 1 0 1 1 1 1 1 1 1
1 1 1 0 1 1 1 1 1 1 1 1
0 0 0 1 0 1 1 1 1 1 1 1
1 1 1 1 1 0 1 1 1 0 0 0
1 1 1 1 1 1 0 0 0 1 1 1
1 1 1 1 1 1 0 0 0 1 1 1
1 1 1 1 1 1 0 0 0 1 1 1
1 1 1 1 1 0 1 1 1 0 0 0
1 1 1 1 1 0 1 1 1 0 0 0
1 1 1 1 1 0 1 1 1 0 0 0
"""


def test_orders_and_names():
    assert BP4D.aus == (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
    assert DISFA.aus == (1, 2, 4, 6, 9, 12, 25, 26)
    assert BP4D.labels[0] == "AU01" and DISFA.labels[-1] == "AU26"
    assert get_au_set("BP4D") is BP4D
    with pytest.raises(ValueError):
        get_au_set("ck+")


def test_adjacency_derived_from_branches_matches_spec():
    expected = np.array([[int(v) for v in row.split()] for row in BP4D_ADJ.strip().splitlines()])
    np.testing.assert_array_equal(BP4D.adjacency, expected)
    for s in (BP4D, DISFA):
        adj = s.adjacency
        assert (adj == adj.T).all() and (np.diag(adj) == 0).all()
        same = s.branch_index[:, None] == s.branch_index[None, :]
        assert (adj[same] == 0).all() and (adj[~same] == 1).all()


def test_aux_class_counts():
    assert BP4D.aux_classes == [16, 2, 8, 16]
    assert DISFA.aux_classes == [8, 4, 8]
    assert BP4D.branch_names == ["up", "mid", "down1", "down2"]


def test_region_classes_are_msb_first():
    # BP4D up = 8*AU1 + 4*AU2 + 2*AU4 + AU7; down2 = 8*AU10 + 4*AU17 + 2*AU23 + AU24 (spec §3.5).
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(200, 12))
    col = {au: i for i, au in enumerate(BP4D.aus)}
    classes = BP4D.encode_regions(labels)
    np.testing.assert_array_equal(
        classes[:, 0], 8 * labels[:, col[1]] + 4 * labels[:, col[2]] + 2 * labels[:, col[4]] + labels[:, col[7]]
    )
    np.testing.assert_array_equal(classes[:, 1], labels[:, col[6]])
    np.testing.assert_array_equal(
        classes[:, 2], 4 * labels[:, col[12]] + 2 * labels[:, col[14]] + labels[:, col[15]]
    )
    np.testing.assert_array_equal(
        classes[:, 3], 8 * labels[:, col[10]] + 4 * labels[:, col[17]] + 2 * labels[:, col[23]] + labels[:, col[24]]
    )
    # The paper's Fig. 2 example: AU1=1, AU2=1, AU4=0 -> class 6 (DISFA up branch).
    one = np.zeros((1, 8), dtype=int)
    one[0, 0] = one[0, 1] = 1
    assert DISFA.encode_regions(one)[0, 0] == 6


@pytest.mark.parametrize("au_set", [BP4D, DISFA])
def test_decode_inverts_encode(au_set):
    labels = np.random.default_rng(1).integers(0, 2, size=(100, au_set.num_aus))
    np.testing.assert_array_equal(au_set.decode_regions(au_set.encode_regions(labels)), labels)


def test_unknown_labels_count_as_absent_bits():
    labels = np.full((1, 12), 9)
    assert (BP4D.encode_regions(labels) == 0).all()


def test_loss_weights_follow_the_reference_formula():
    # BP4D fold 1 training positive rates and the released weights (spec §5.4).
    rates = np.array([0.184, 0.146, 0.198, 0.440, 0.571, 0.567, 0.540, 0.457, 0.176, 0.342, 0.166, 0.148])
    released = np.array([1.342985, 1.689665, 1.248091, 0.561356, 0.433044, 0.435894,
                         0.457287, 0.541004, 1.408054, 0.722762, 1.493145, 1.666711])
    frames = 100_000
    labels = (np.arange(frames)[:, None] < (rates * frames)[None, :]).astype(int)
    w = BP4D.loss_weights(labels)
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(w, released, rtol=5e-3)  # rates are printed to 3 decimals


def test_loss_weights_ignore_unknown_labels():
    labels = np.array([[1, 0], [0, 1], [9, 9], [-1, 0]] * 10)
    from aucli.aus import AUSet, Branch

    tiny = AUSet("tiny", (1, 2), (Branch("up", "up", (1,)), Branch("mid", "mid", (2,))), False)
    w = tiny.loss_weights(labels)
    # AU1: 10 positives of 20 known; AU2: 10 of 30 known.
    np.testing.assert_allclose(w, np.array([2.0, 3.0]) / 5.0 * 2)


def test_openface_set_is_derived_like_the_others():
    s = get_au_set("openface")
    assert s.aus == (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45)
    assert 28 not in s.aus
    assert s.aux_classes == [64, 4, 16, 32]
    assert s.branch_blocks
    # AU45 (blink) and AU1 share the upper-face branch: not linked; AU45 and AU12 are.
    i = {au: n for n, au in enumerate(s.aus)}
    assert s.adjacency[i[45], i[1]] == 0 and s.adjacency[i[45], i[12]] == 1
    assert s.adjacency[i[12], i[20]] == 0 and s.adjacency[i[12], i[25]] == 1
    labels = np.zeros((3, 17), dtype=np.int64)
    labels[0, i[1]] = labels[0, i[45]] = 1
    classes = s.encode_regions(labels)
    assert classes[0, 0] == 0b100001  # MSB first: AU1 then 2, 4, 5, 7, 45
    np.testing.assert_array_equal(s.decode_regions(classes), (labels == 1).astype(np.int64))
    assert all(name for name in s.names)
