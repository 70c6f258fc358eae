"""Retrieval metric core: hand-computed toys, a PML oracle, a naive oracle, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.errors import CmpnasError
from cmpnas.evaluation import retrieval
from cmpnas.evaluation.retrieval import knn, l2_normalize, metrics_from_similarity, retrieval_metrics

METRIC_KEYS = ("top1", "top5", "top10", "map", "map_at_r", "r_precision")

# Toy D: separate query / gallery sets, gallery labels A A B B C D, q3 has label E (lone).
TOY_D_SIM = torch.tensor(
    [
        [0.9, 0.7, 0.8, 0.6, 0.5, 0.4],
        [0.9, 0.4, 0.6, 0.5, 0.8, 0.7],
        [0.8, 0.7, 0.6, 0.5, 0.9, 0.4],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ]
)
TOY_D_GALLERY_LABELS = torch.tensor([0, 0, 1, 1, 2, 3])
TOY_D_QUERY_LABELS = torch.tensor([0, 1, 2, 4])


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _emb(n: int, dim: int = 4) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(n))


def naive_metrics(sim: np.ndarray, q_labels, g_labels, *, exclude_self=False, ks=(1, 5, 10), lone="exclude"):
    """The metric definitions written out per query, in percent (independent of the module)."""
    per_query = []
    for i, row in enumerate(sim):
        items = [j for j in range(len(row)) if not (exclude_self and j == i)]
        ranked = sorted(items, key=lambda j: (-float(row[j]), j))
        rel = [int(g_labels[j] == q_labels[i]) for j in ranked]
        n_rel = sum(rel)
        if n_rel == 0:
            if lone == "fail":
                per_query.append(
                    {**{f"top{k}": 0.0 for k in ks}, "map": 0.0, "map_at_r": 0.0, "r_precision": 0.0}
                )
            continue
        prec = [sum(rel[: p + 1]) / (p + 1) for p in range(len(rel))]
        per_query.append(
            {
                **{f"top{k}": float(any(rel[:k])) for k in ks},
                "map": sum(r * p for r, p in zip(rel, prec, strict=True)) / n_rel,
                "map_at_r": sum(r * p for r, p in zip(rel[:n_rel], prec[:n_rel], strict=True)) / n_rel,
                "r_precision": sum(rel[:n_rel]) / n_rel,
            }
        )
    return {key: 100.0 * float(np.mean([q[key] for q in per_query])) for key in per_query[0]}


def clustered(n_classes: int, per_class: int, dim: int, seed: int, spread: float = 0.6):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=gen)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    emb = centers[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return emb, labels


def assert_metrics_close(ours: dict, expected: dict, keys=METRIC_KEYS, abs_tol=1e-9):
    for key in keys:
        assert ours[key] == pytest.approx(expected[key], abs=abs_tol), key


# ---------------------------------------------------------------------------------------- hand-computed toys


def test_toy_d_lone_query_excluded():
    got = metrics_from_similarity(TOY_D_SIM, TOY_D_QUERY_LABELS, TOY_D_GALLERY_LABELS)
    assert got["top1"] == pytest.approx(66.6667, abs=1e-3)
    assert got["top5"] == pytest.approx(100.0)
    assert got["map"] == pytest.approx(71.94, abs=1e-2)
    assert got["map_at_r"] == pytest.approx(50.0)
    assert got["r_precision"] == pytest.approx(50.0)
    assert (got["n_queries"], got["n_lone"]) == (3, 1)


def test_toy_d_lone_query_counts_as_failure():
    got = metrics_from_similarity(TOY_D_SIM, TOY_D_QUERY_LABELS, TOY_D_GALLERY_LABELS, lone_queries="fail")
    assert got["top1"] == pytest.approx(50.0)
    assert got["top5"] == pytest.approx(75.0)
    assert got["map"] == pytest.approx(100 * (5 / 6 + 0.325 + 1.0) / 4)  # q3 contributes AP 0
    assert (got["n_queries"], got["n_lone"]) == (4, 1)


def test_toy_d_through_embeddings():
    """Basis-vector gallery + similarity rows as queries: cosine keeps every row's ranking of toy D."""
    got = retrieval_metrics(TOY_D_SIM, TOY_D_QUERY_LABELS, torch.eye(6), TOY_D_GALLERY_LABELS)
    assert_metrics_close(got, metrics_from_similarity(TOY_D_SIM, TOY_D_QUERY_LABELS, TOY_D_GALLERY_LABELS))
    assert got["map"] == pytest.approx(71.94, abs=1e-2)


def test_toy_e_leave_one_out_euclidean():
    x = torch.tensor([0.0, 0.1, 1.0, 1.2, 0.45])
    labels = torch.tensor([0, 0, 1, 1, 1])
    sim = -(x[:, None] - x[None, :]).abs()
    got = metrics_from_similarity(sim, labels, labels, exclude_self=True)
    assert got["top1"] == pytest.approx(80.0)
    assert got["map"] == pytest.approx(88.33, abs=1e-2)
    assert got["map_at_r"] == pytest.approx(80.0)
    assert got["r_precision"] == pytest.approx(80.0)
    assert (got["n_queries"], got["n_lone"]) == (5, 0)


def test_self_is_not_a_relevant_item():
    """A class with one image is lone under leave-one-out although its own image is in the gallery."""
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    got = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)
    assert (got["n_queries"], got["n_lone"]) == (2, 1)
    assert got["top1"] == pytest.approx(100.0)
    failed = retrieval_metrics(emb, labels, emb, labels, exclude_self=True, lone_queries="fail")
    assert failed["top1"] == pytest.approx(200.0 / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_metric_ties_go_to_lower_index(dtype):
    """Equal scores rank by gallery index, so a lower-index irrelevant item beats a tied relevant one."""
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.1, 0.5, 0.5]], dtype=dtype)
    got = metrics_from_similarity(sim, _ids(0, 0), _ids(1, 0, 0), ks=(1, 2))
    assert got["top1"] == pytest.approx(50.0)  # query 0: g0 (wrong) before g1; query 1: g1 (right) first
    assert got["map"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 1.0) / 2)  # APs 0.583 and 1


@settings(max_examples=30, deadline=None)
@given(
    n_query=st.integers(1, 10),
    n_gallery=st.integers(2, 25),
    exclude_self=st.booleans(),
    wide=st.booleans(),
    numpy_sort=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tied_scores_match_naive_definitions(n_query, n_gallery, exclude_self, wide, numpy_sort, seed):
    """Integer similarities (many exact ties; every ranking branch) against the definitions."""
    gen = torch.Generator().manual_seed(seed)
    if exclude_self:
        n_gallery = n_query = max(n_query, 2)
    sim = torch.randint(-3, 4, (n_query, n_gallery), generator=gen).to(
        torch.float64 if wide else torch.float32
    )
    q_labels = torch.randint(0, 3, (n_query,), generator=gen)
    g_labels = q_labels if exclude_self else torch.randint(0, 3, (n_gallery,), generator=gen)
    expected = naive_metrics(
        sim.numpy(), q_labels.tolist(), g_labels.tolist(), exclude_self=exclude_self, lone="fail"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval, "_NUMPY_SORT_ON_CPU", numpy_sort)  # False: the torch (GPU) branch on CPU
        got = metrics_from_similarity(
            sim, q_labels, g_labels, exclude_self=exclude_self, lone_queries="fail", chunk_size=3
        )
    assert_metrics_close(got, expected)


# ------------------------------------------------------------------------------------------------- oracles


def test_matches_pytorch_metric_learning_symmetric():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, labels = clustered(n_classes=6, per_class=12, dim=8, seed=3, spread=1.0)
    emb = torch.cat([emb, torch.randn(1, 8)])  # a singleton class: lone once self is removed
    labels = torch.cat([labels, torch.tensor([99])])
    normed = l2_normalize(emb)
    include = ("precision_at_1", "mean_average_precision_at_r", "mean_average_precision", "r_precision")
    pml = AccuracyCalculator(include=include, k=None).get_accuracy(normed, labels)
    ours = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)
    assert ours["top1"] == pytest.approx(100 * pml["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(100 * pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["map"] == pytest.approx(100 * pml["mean_average_precision"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(100 * pml["r_precision"], abs=1e-6)
    assert (ours["n_queries"], ours["n_lone"]) == (72, 1)
    assert 0 < ours["map_at_r"] < 100  # the data is neither trivial nor hopeless


@pytest.mark.parametrize("lone", ["exclude", "fail"])
def test_heterogeneous_leave_one_out_matches_naive(lone):
    """Query and gallery embed the same images with different models; PML cannot check this case."""
    gallery, labels = clustered(n_classes=5, per_class=8, dim=6, seed=7, spread=1.2)
    labels[-1] = 42  # lone under leave-one-out
    query = gallery + 0.8 * torch.randn(gallery.shape, generator=torch.Generator().manual_seed(8))
    sim = (l2_normalize(query) @ l2_normalize(gallery).T).numpy()
    expected = naive_metrics(sim, labels.tolist(), labels.tolist(), exclude_self=True, lone=lone)
    # (no loop over backends: the metrics rank the whole gallery and ignore ``backend``; the knn backends
    # are compared with the naive ranking in the knn tests below)
    got = retrieval_metrics(query, labels, gallery, labels, exclude_self=True, lone_queries=lone)
    assert_metrics_close(got, expected)
    assert got["n_lone"] == 1


# ---------------------------------------------------------------------------------------------------- knn


def naive_knn(query: torch.Tensor, gallery: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    scores = query.double() @ gallery.double().T
    rows = []
    for i, row in enumerate(scores.tolist()):
        items = [j for j in range(len(row)) if not (exclude_self and j == i)]
        rows.append(sorted(items, key=lambda j: (-row[j], j))[:k])
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_backends_identical_heterogeneous(exclude_self):
    gen = torch.Generator().manual_seed(0)
    gallery = l2_normalize(torch.randn(60, 12, generator=gen))
    query = l2_normalize(gallery + 0.7 * torch.randn(60, 12, generator=gen))  # self is often not the top hit
    s_faiss, i_faiss = knn(query, gallery, 7, exclude_self=exclude_self, backend="faiss")
    s_torch, i_torch = knn(query, gallery, 7, exclude_self=exclude_self, backend="torch", chunk_size=16)
    assert torch.equal(i_faiss, i_torch) and torch.equal(s_faiss, s_torch)
    assert i_torch.dtype == torch.int64 and s_torch.dtype == torch.float32 and i_torch.shape == (60, 7)
    assert torch.equal(i_torch, naive_knn(query, gallery, 7, exclude_self))
    assert bool((s_torch[:, :-1] >= s_torch[:, 1:]).all())
    self_hits = (i_torch == torch.arange(60).unsqueeze(1)).any(dim=1)
    if exclude_self:
        assert not bool(self_hits.any())
    else:
        assert bool(self_hits.any()) and not bool(self_hits.all())  # the hetero case is genuinely not trivial


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_ties_go_to_lower_index(backend):
    """30 identical vectors: every score ties, so the k results must be the lowest eligible indices."""
    same = torch.ones(30, 4) / 2
    _, idx = knn(same, same, 5, exclude_self=True, backend=backend)
    assert idx[0].tolist() == [1, 2, 3, 4, 5]
    assert idx[3].tolist() == [0, 1, 2, 4, 5]
    assert idx[29].tolist() == [0, 1, 2, 3, 4]
    # duplicates of a far item inside an otherwise well-separated gallery
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0], [0.8, 0.6]])
    _, idx = knn(torch.tensor([[1.0, 0.0]]), gallery, 3, backend=backend)
    assert idx.tolist() == [[1, 3, 4]]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 40),
    dim=st.integers(1, 5),
    k_frac=st.floats(0.0, 1.0),
    exclude_self=st.booleans(),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_knn_backends_agree_with_many_ties(n, dim, k_frac, exclude_self, chunk, seed):
    """Small-integer vectors tie often (also at rank k); both backends must follow the naive order."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randint(-2, 3, (n, dim), generator=gen).float()
    gallery = torch.randint(-2, 3, (n, dim), generator=gen).float()
    eligible = n - 1 if exclude_self else n
    k = 1 + int(k_frac * (eligible - 1))
    expected = naive_knn(query, gallery, k, exclude_self)
    for backend in ("faiss", "torch"):
        _, idx = knn(query, gallery, k, exclude_self=exclude_self, backend=backend, chunk_size=chunk)
        assert torch.equal(idx, expected), backend


def test_exact_rescoring_is_a_fixed_order_sum():
    """The CPU (cumsum) and GPU (loop) rescoring paths must add in the same order: bit-identical scores."""
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(7, 33, generator=gen).double()
    gallery = torch.randn(50, 33, generator=gen).double()
    candidates = torch.randint(0, 50, (7, 9), generator=gen)
    fast = retrieval._exact_scores(query, gallery, candidates)
    assert torch.equal(fast, retrieval._exact_scores_loop(query, gallery, candidates))
    assert torch.allclose(fast, (query.unsqueeze(1) * gallery[candidates]).sum(-1))


def test_rank_keys_order_scores_then_lower_index():
    """Packed sort keys: the numpy and torch recipes agree and sort by (score, -index)."""
    scores = torch.tensor([[0.5, -0.0, 0.0, -1e-45, float("-inf"), 0.5, -2.0, float("inf"), 1e-45, -0.5]])
    relevant = torch.tensor([[True, False, True, False, True, True, False, False, True, False]])
    keys = retrieval._rank_keys(scores, relevant)
    assert torch.equal(keys, torch.from_numpy(retrieval._rank_keys_numpy(scores, relevant)))
    assert torch.equal(keys & 1, relevant.long())
    order = torch.sort(keys, dim=1, descending=True).indices[0].tolist()
    assert order == [7, 0, 5, 8, 1, 2, 3, 9, 6, 4]  # -0.0 == 0.0 tie: index 1 before 2


# ------------------------------------------------------------------------------------------------ properties


@st.composite
def retrieval_problem(draw):
    n_query, n_gallery = draw(st.integers(1, 12)), draw(st.integers(1, 30))
    dim, n_classes, seed = draw(st.integers(2, 6)), draw(st.integers(1, 5)), draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_query, dim, generator=gen),
        torch.randint(0, n_classes, (n_query,), generator=gen),
        torch.randn(n_gallery, dim, generator=gen),
        torch.randint(0, n_classes, (n_gallery,), generator=gen),
        torch.randperm(n_gallery, generator=gen),
    )


@settings(max_examples=30, deadline=None)
@given(problem=retrieval_problem())
def test_gallery_permutation_invariance_and_topk_monotone(problem):
    query, q_labels, gallery, g_labels, perm = problem
    base = retrieval_metrics(query, q_labels, gallery, g_labels, lone_queries="fail")
    permuted = retrieval_metrics(query, q_labels, gallery[perm], g_labels[perm], lone_queries="fail")
    assert_metrics_close(permuted, base)
    assert base["top1"] <= base["top5"] <= base["top10"]
    assert base["map_at_r"] <= base["map"] + 1e-9  # the R-prefix of AP, same 1/R weights
    for key in METRIC_KEYS:
        assert 0.0 <= base[key] <= 100.0


@settings(max_examples=30, deadline=None)
@given(problem=retrieval_problem(), chunk=st.integers(1, 13), exclude_self=st.booleans())
def test_chunk_size_does_not_change_results(problem, chunk, exclude_self):
    query, q_labels, gallery, g_labels, _ = problem
    if exclude_self:  # leave-one-out on the query images, embedded a second time with noise
        gallery, g_labels = query + 0.3 * torch.randn_like(query), q_labels
    kwargs = dict(exclude_self=exclude_self, lone_queries="fail")
    reference = retrieval_metrics(query, q_labels, gallery, g_labels, chunk_size=1024, **kwargs)
    chunked = retrieval_metrics(query, q_labels, gallery, g_labels, chunk_size=chunk, **kwargs)
    assert_metrics_close(chunked, reference, abs_tol=1e-12)
    assert (chunked["n_queries"], chunked["n_lone"]) == (reference["n_queries"], reference["n_lone"])


def test_query_chunks_not_a_multiple_of_chunk_size(monkeypatch):
    query, labels = clustered(n_classes=4, per_class=9, dim=5, seed=11, spread=1.5)
    query, labels = query[:-1], labels[:-1]  # Q = 35
    gallery, g_labels = clustered(n_classes=4, per_class=6, dim=5, seed=12, spread=1.5)
    sim = (l2_normalize(query) @ l2_normalize(gallery).T).numpy()
    expected = naive_metrics(sim, labels.tolist(), g_labels.tolist())
    assert_metrics_close(retrieval_metrics(query, labels, gallery, g_labels, chunk_size=8), expected)
    reference_knn = knn(l2_normalize(query), l2_normalize(gallery), 4, backend="torch")
    # the memory cap also splits blocks: force 2-row blocks whatever chunk_size says
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMENTS", 2 * len(gallery))
    assert_metrics_close(retrieval_metrics(query, labels, gallery, g_labels, chunk_size=1024), expected)
    for backend in ("torch", "faiss"):
        got = knn(l2_normalize(query), l2_normalize(gallery), 4, backend=backend, chunk_size=8)
        assert torch.equal(got[1], reference_knn[1])


def test_l2_normalize_unit_rows_and_zero_safe():
    out = l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda: retrieval_metrics(_emb(3), _ids(0, 0, 0), _emb(3, 5), _ids(0, 0, 0)), id="width"
        ),
        pytest.param(
            lambda: retrieval_metrics(_emb(3), _ids(0, 0, 0), _emb(4), _ids(0, 0, 0, 0), exclude_self=True),
            id="self-needs-same-set",
        ),
        pytest.param(
            lambda: retrieval_metrics(_emb(3), _ids(0, 0), _emb(3), _ids(0, 0, 0)), id="label-count"
        ),
        pytest.param(
            lambda: retrieval_metrics(_emb(3), torch.zeros(3), _emb(3), _ids(0, 0, 0)), id="float-labels"
        ),
        pytest.param(
            lambda: retrieval_metrics(_emb(3), _ids(0, 0, 0), _emb(3), _ids(1, 1, 1)), id="all-lone"
        ),
        pytest.param(
            lambda: retrieval_metrics(_emb(3), _ids(0, 0, 0), _emb(3), _ids(0, 0, 0), lone_queries="skip"),
            id="lone-mode",
        ),
        pytest.param(
            lambda: knn(_emb(3), _emb(3), 1, backend="annoy"),
            id="backend",
        ),
        pytest.param(
            lambda: retrieval_metrics(
                torch.full((3, 4), float("nan")), _ids(0, 0, 0), _emb(3), _ids(0, 0, 0)
            ),
            id="nan",
        ),
        pytest.param(lambda: knn(_emb(3), _emb(3), 3, exclude_self=True), id="k-too-big"),
        pytest.param(lambda: knn(_emb(3), _emb(3), 1, chunk_size=0), id="chunk-size"),
        pytest.param(
            lambda: metrics_from_similarity(torch.randn(2, 3), _ids(0, 0), _ids(0, 0, 0), exclude_self=True),
            id="self-needs-square",
        ),
    ],
)
def test_bad_input_raises_user_error(call):
    with pytest.raises(CmpnasError):
        call()
