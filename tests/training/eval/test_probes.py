"""Linear probe, retrieval, overclustering and kNN on features whose answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cotap.training.eval.knn import KnnConfig, knn_scores, run_knn
from cotap.training.eval.linear import LinearConfig, run_linear
from cotap.training.eval.overcluster import OverclusterConfig, kmeans, run_overcluster
from cotap.training.eval.retrieval import RetrievalConfig, patch_label_distribution, run_retrieval

from .helpers import make_features, onehot, stripe_grids

C, GRID = 5, 4


@pytest.fixture(scope="module")
def classes() -> tuple[torch.Tensor, torch.Tensor]:
    return stripe_grids(24, GRID, C, seed=0), stripe_grids(12, GRID, C, seed=1)


def test_patch_label_distribution_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (2, 8, 12), generator=g).to(torch.uint8)
    masks[0, :4, :4] = 255  # a fully ignored patch
    masks[1, 0, 0] = 255
    dist = patch_label_distribution(masks, (2, 3), 3 + 1)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                block = masks[n, i * 4 : (i + 1) * 4, j * 4 : (j + 1) * 4].flatten().tolist()
                valid = [v for v in block if v != 255]
                ref = [valid.count(c) / len(valid) if valid else 0.0 for c in range(4)]
                assert dist[n, i, j].tolist() == pytest.approx(ref)
    assert dist[0, 0, 0].sum() == 0


def test_retrieval_of_one_hot_codes_is_perfect_and_shuffled_is_not(classes) -> None:
    tr, va = classes
    train = make_features(onehot(tr, C), tr)
    val = make_features(onehot(va, C), va)
    metrics, preds = run_retrieval(train, val, C, RetrievalConfig(), keep=3, progress=False)
    assert metrics["miou"] == 1.0
    assert preds.shape == (3, GRID * 8, GRID * 8)
    g = torch.Generator().manual_seed(0)
    flat = onehot(va, C).reshape(-1, 16)
    shuffled = flat[torch.randperm(flat.shape[0], generator=g)].reshape(va.shape[0], GRID, GRID, 16)
    bad, _ = run_retrieval(train, make_features(shuffled, va), C, RetrievalConfig(), progress=False)
    assert bad["miou"] < 0.4


def test_retrieval_memory_is_bounded_and_seeded(classes) -> None:
    tr, va = classes
    train, val = make_features(onehot(tr, C), tr), make_features(onehot(va, C), va)
    a, _ = run_retrieval(train, val, C, RetrievalConfig(memory_size=50, seed=3), progress=False)
    b, _ = run_retrieval(train, val, C, RetrievalConfig(memory_size=50, seed=3), progress=False)
    assert a["memory_size"] == 50 and a["train_patches"] == 24 * GRID * GRID
    assert a == b


def test_linear_probe_learns_oracle_features_and_not_random_ones(classes) -> None:
    tr, va = classes
    cfg = LinearConfig(samples=240, batch_size=8, lr=0.1)
    metrics, preds = run_linear(
        make_features(onehot(tr, C), tr), make_features(onehot(va, C), va), C, cfg, keep=2, progress=False
    )
    assert metrics["miou"] > 0.97
    assert metrics["train_loss"] < metrics["train_loss_start"] and metrics["steps"] == 30
    assert preds.shape == (2, GRID * 8, GRID * 8)
    g = torch.Generator().manual_seed(1)
    rand_tr = torch.randn(24, GRID, GRID, 16, generator=g)
    rand_va = torch.randn(12, GRID, GRID, 16, generator=g)
    bad, _ = run_linear(make_features(rand_tr, tr), make_features(rand_va, va), C, cfg, progress=False)
    assert bad["miou"] < 0.35


def test_linear_probe_is_deterministic(classes) -> None:
    tr, va = classes
    g = torch.Generator().manual_seed(2)
    noisy = onehot(tr, C) + 0.5 * torch.randn(24, GRID, GRID, 16, generator=g)
    cfg = LinearConfig(samples=48, batch_size=8, seed=7)
    args = (make_features(noisy, tr), make_features(onehot(va, C), va), C, cfg)
    a, _ = run_linear(*args, progress=False)
    b, _ = run_linear(*args, progress=False)
    assert a == b


def test_kmeans_recovers_separated_blobs() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.arange(4).repeat_interleave(50)
    x = centres[truth] + 0.3 * torch.randn(200, 2, generator=g)
    found = kmeans(x, 4, seed=0)
    assign = ((x[:, None] - found[None]) ** 2).sum(-1).argmin(1)
    for k in range(4):  # each true blob lands in exactly one cluster, each cluster in one blob
        assert assign[truth == k].unique().numel() == 1
    assert assign.unique().numel() == 4
    assert torch.equal(found, kmeans(x, 4, seed=0))


def test_overcluster_of_oracle_features(classes) -> None:
    _, va = classes
    g = torch.Generator().manual_seed(0)
    val = make_features(onehot(va, C) + 0.01 * torch.randn(12, GRID, GRID, 16, generator=g), va)
    metrics, kept = run_overcluster(val, C, OverclusterConfig(clusters=(C, 2 * C)), keep=2)
    assert metrics["per_k"][f"K{C}"]["matching"] == "hungarian"
    assert metrics["per_k"][f"K{C}"]["miou"] == pytest.approx(1.0)
    assert metrics["per_k"][f"K{2 * C}"]["matching"] == "many_to_one"
    assert metrics["per_k"][f"K{2 * C}"]["miou"] == pytest.approx(1.0)
    assert kept[C].shape == (2, GRID * 8, GRID * 8)
    rand = make_features(torch.randn(12, GRID, GRID, 16, generator=g), va)
    bad, _ = run_overcluster(rand, C, OverclusterConfig())
    assert bad["miou"] < 0.4


def reference_knn(train, labels, query, k, num_classes, t):
    out = []
    for q in query:
        sims = [(float(F.cosine_similarity(q, x, dim=0)), int(y)) for x, y in zip(train, labels, strict=True)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += torch.tensor(s / t).exp().item()
        out.append(votes)
    return torch.tensor(out)


def test_knn_scores_match_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    query = torch.randn(5, 6, generator=g)
    got = knn_scores(train, labels, query, 7, 3, 0.5, chunk=2)
    assert torch.allclose(got, reference_knn(train, labels, query, 7, 3, 0.5), rtol=1e-4)


def test_knn_top5_counts_only_classes_that_got_votes() -> None:
    """With k = 1 one class gets a vote: top-5 is top-1, as DINO's narrow(1, 0, min(5, k))."""
    g = torch.Generator().manual_seed(3)
    xtr, ytr = torch.randn(40, 6, generator=g), torch.randint(0, 8, (40,), generator=g)
    xva, yva = torch.randn(30, 6, generator=g), torch.randint(0, 8, (30,), generator=g)
    m = run_knn(xtr, ytr, xva, yva, 8, KnnConfig(ks=(1, 20)))
    assert m["top5@k1"] == m["top1@k1"]
    assert m["top5@k20"] >= m["top1@k20"]


def test_knn_on_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 8, generator=g) * 5
    ytr, yva = torch.arange(4).repeat(25), torch.arange(4).repeat(5)
    xtr = means[ytr] + torch.randn(100, 8, generator=g)
    xva = means[yva] + torch.randn(20, 8, generator=g)
    m = run_knn(xtr, ytr, xva, yva, 4, KnnConfig(ks=(10, 20)))
    assert m["top1@k10"] == 1.0 and m["top1@k20"] == 1.0
    shuffled = run_knn(xtr, ytr[torch.randperm(100, generator=g)], xva, yva, 4, KnnConfig(ks=(10,)))
    assert shuffled["top1@k10"] < 0.6
