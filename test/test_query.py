"""TextScorer: closed-set labels and calibrated free-text queries (toy backend + real ConSE)."""
import numpy as np
import pytest
import torch
from skimage import data

from geopurify_ros.query import CANONICAL_NEGATIVES, TextScorer


class ToyBackend:
    """Each known word is a basis vector; prompt templates are ignored by taking the last word."""

    name = "toy"
    words = ["chair", "table", "sofa", "object", "things", "stuff", "texture", "lamp"]
    dim = len(words)
    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0
        self.encoded = []

    def encode_text(self, texts):
        self.calls += 1
        self.encoded += list(texts)
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            out[i, self.words.index(t.rstrip(".").split()[-1])] = 1.0
        return out


def vec(word, scale=1.0):
    v = torch.zeros(ToyBackend.dim)
    v[ToyBackend.words.index(word)] = scale
    return v


@pytest.fixture
def toy():
    return ToyBackend()


def test_label_picks_most_similar_class(toy):
    s = TextScorer(toy, ["chair", "table", "sofa"], templates=["a photo of a {}."])
    feats = torch.stack([vec("table"), vec("chair") + 0.3 * vec("sofa"), vec("sofa", 0.2)])  # unnormalised rows
    labels, scores = s.label(feats)
    assert labels.tolist() == [1, 0, 2] and labels.dtype == torch.long
    assert scores.dtype == torch.float32 and ((scores > 1 / 3) & (scores <= 1)).all()
    assert toy.encoded == ["a photo of a chair.", "a photo of a table.", "a photo of a sofa."]



def test_default_templates_follow_backend_text_templates(toy):
    # A backend with `text_templates` (ConSE: those of its ImageNet support) sets the class/query context ...
    toy.text_templates = ("indoors, a {}.",)       # the toy backend reads the last word
    s = TextScorer(toy, ["chair", "table"])
    assert s.templates == ("indoors, a {}.",)
    assert toy.encoded == ["indoors, a chair.", "indoors, a table."]
    # ... explicit templates (config prompt_templates) still win.
    assert TextScorer(toy, ["chair"], templates=["a photo of a {}."]).templates == ("a photo of a {}.",)


def test_conse_text_templates_match_support():
    from geopurify_ros.features import make_backend
    b = make_backend("conse", device="cpu")
    assert TextScorer(b, ["chair"]).templates == b.text_templates == b.templates

def test_query_calibrated_against_canonical_negatives(toy):
    s = TextScorer(toy, ["chair", "table"])
    feats = torch.stack([vec("lamp"), vec("object"), vec("chair"), torch.zeros(ToyBackend.dim)])
    q = s.query(feats, "lamp")
    assert q.shape == (4,) and ((q >= 0) & (q <= 1)).all()
    assert q[0] > 0.99 and q[1] < 0.01 and q[2] == pytest.approx(0.5, abs=1e-6) and q[3] == pytest.approx(0.5)
    # A user negative that matches the feature suppresses it.
    assert s.query(feats[2:3], "lamp", negatives=["chair"])[0] < 0.01
    assert set(CANONICAL_NEGATIVES) <= set(s.negatives)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_query_raises(toy, text):
    s = TextScorer(toy, ["chair", "table"])
    with pytest.raises(ValueError, match="text: empty query"):
        s.query(torch.zeros(3, ToyBackend.dim), text)


def test_text_embeddings_cached_per_text(toy):
    s = TextScorer(toy, ["chair", "table"])
    feats = torch.rand(10, ToyBackend.dim)
    s.query(feats, "lamp")
    calls = toy.calls
    s.query(feats, "lamp")
    s.query(feats, "  lamp ")
    s.label(feats)
    assert toy.calls == calls
    s.query(feats, "sofa")
    assert toy.calls == calls + 1 and toy.encoded[-1] == "a photo of a sofa."   # only the new text


def test_text_cache_is_bounded_least_recently_used_first(toy, monkeypatch):
    import geopurify_ros.query as query
    monkeypatch.setattr(query, "MAX_CACHED_TEXTS", 3)
    s = TextScorer(toy, ["chair", "table"])
    for text in ("a lamp", "one lamp", "big lamp", "red lamp", "the lamp"):   # distinct texts, same embedding
        s.embed([text])
    assert list(s._cache) == ["big lamp", "red lamp", "the lamp"]           # a long-running node does not grow
    calls = toy.calls
    s.embed(["big lamp"])                                   # cached; now the most recently used
    assert toy.calls == calls
    s.embed(["a lamp"])                                     # evicted earlier: encoded again, drops "red lamp"
    assert toy.calls == calls + 1 and list(s._cache) == ["the lamp", "big lamp", "a lamp"]
    torch.testing.assert_close(s.embed(["a lamp"]), s.embed(["the lamp"]))


def test_bad_inputs(toy):
    with pytest.raises(ValueError, match="class_names"):
        TextScorer(toy, [])
    with pytest.raises(ValueError, match="templates"):
        TextScorer(toy, ["chair"], templates=["no placeholder"])
    s = TextScorer(toy, ["chair", "table"])
    with pytest.raises(ValueError, match="features"):
        s.label(torch.zeros(4, 3))


def test_batched_half_precision_matches_unchunked(toy):
    n = 500_000
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(n, ToyBackend.dim, generator=g).half()         # as stored in the voxel map
    small = TextScorer(toy, ["chair", "table", "sofa"], chunk_size=65536)
    big = TextScorer(toy, ["chair", "table", "sofa"], chunk_size=n)
    l1, s1 = small.label(feats)
    l2, s2 = big.label(feats)
    assert torch.equal(l1, l2) and torch.allclose(s1, s2)
    q1, q2 = small.query(feats, "lamp"), big.query(feats, "lamp")
    assert q1.shape == (n,) and torch.allclose(q1, q2)
    assert len(small.label(feats[:0])[0]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_features(toy):
    s = TextScorer(toy, ["chair", "table"])
    feats = torch.stack([vec("table"), vec("lamp")]).cuda()
    labels, scores = s.label(feats)
    q = s.query(feats, "lamp")
    assert labels.device.type == "cuda" and q.device.type == "cuda"
    assert labels[0].item() == 1 and q[1] > 0.99


def test_conse_query_localises_cat():
    from geopurify_ros.features import make_backend
    from test_features import crop_to
    b = make_backend("conse", device="cpu")
    s = TextScorer(b, ["cat", "cup of coffee", "rocket"])
    img = np.concatenate([crop_to(data.chelsea(), 480, 320), crop_to(data.coffee(), 480, 320)], axis=1)
    feats = b.encode_image(img)                                     # (h, w, D)
    h, w, _ = feats.shape
    left, right = slice(0, w // 2 - 1), slice(w // 2 + 1, w)        # one cell margin at the seam
    cat = s.query(feats.reshape(-1, b.dim), "cat").view(h, w)
    coffee = s.query(feats.reshape(-1, b.dim), "coffee").view(h, w)
    assert cat[:, left].mean() > cat[:, right].mean() + 0.2
    assert coffee[:, right].mean() > coffee[:, left].mean() + 0.2
    labels, _ = s.label(feats.reshape(-1, b.dim))
    labels = labels.view(h, w)
    assert (labels[:, left] == 0).float().mean() > 0.8 and (labels[:, right] == 1).float().mean() > 0.8
