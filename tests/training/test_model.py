"""The CoTAP ViT against its contract and against a naive per-position reference of §2.2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cotap.training.models import build_model, list_models, model_config


def test_vits16_contract() -> None:
    torch.manual_seed(0)
    m = build_model("cotap_vits16").eval()
    with torch.no_grad():
        out = m.forward_features(torch.randn(2, 3, 224, 224))
    assert out["patch"].shape == (2, 14, 14, 768)
    assert out["cls"].shape == (2, 768)
    assert out["assign"].shape == (2, 14, 14, 64)
    torch.testing.assert_close(out["assign"].sum(-1), torch.ones(2, 14, 14), atol=1e-5, rtol=0)
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 224, 320))["patch"].shape == (1, 14, 20, 768)


def test_vitb16_width() -> None:
    m = build_model("cotap_vitb16", depth=2).eval()  # width does not depend on depth; keep it fast
    with torch.no_grad():
        out = m.forward_features(torch.randn(1, 3, 64, 48))
    assert out["patch"].shape == (1, 4, 3, 1536) and out["cls"].shape == (1, 1536)


def test_registry() -> None:
    assert {"cotap_vits16", "cotap_vits8", "cotap_vitb16", "cotap_vitb8"} <= set(list_models())
    assert model_config("cotap_vitb8").patch_size == 8
    with pytest.raises(KeyError):
        build_model("nope")
    with pytest.raises(TypeError, match="unknown config keys"):
        build_model("cotap_test", widht=3)


def test_rejects_sides_not_multiple_of_patch() -> None:
    m = build_model("cotap_test")
    with pytest.raises(ValueError, match="multiples of the patch size"):
        m.forward_features(torch.randn(1, 3, 33, 32))


def test_intermediate_layers() -> None:
    torch.manual_seed(0)
    m = build_model("cotap_test", depth=3).eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        layers = m.get_intermediate_layers(x, n=2)
        maps = m.get_intermediate_layers(x, n=1, reshape=True)
        train = m.forward_train(x)
    assert len(layers) == 2 and layers[0].shape == (2, 1 + 4 * 5, 32)
    assert maps[0].shape == (2, 32, 4, 5)
    # the last backbone output is the filter's `h`: the first half of the 2D patch feature before norm
    torch.testing.assert_close(train["last_input"], layers[0])


def test_position_embedding_interpolation_identity_and_shape() -> None:
    m = build_model("cotap_test")
    assert m.interpolate_pos_encoding(4, 4) is m.pos_embed
    assert m.interpolate_pos_encoding(3, 7).shape == (1, 1 + 21, 32)


def _naive_bicubic_1d(src: torch.Tensor, out: int, step: float) -> torch.Tensor:
    """Resample (..., n) to (..., out) with Keys' cubic (a = -0.75), half-pixel centres and clamped
    borders: output j reads the input at x = (j + 0.5) * step - 0.5."""
    a = -0.75

    def w(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        if d < 2:
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return 0.0

    n = src.shape[-1]
    cols = []
    for j in range(out):
        x = (j + 0.5) * step - 0.5
        base = math.floor(x)
        col = torch.zeros_like(src[..., 0])
        for tap in range(base - 1, base + 3):
            col = col + w(x - tap) * src[..., min(max(tap, 0), n - 1)]
        cols.append(col)
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_position_embedding_resampling_follows_dino(offset: float) -> None:
    """DINO and the CoTAP release resample by a scale of (g + 0.1) / g0, so a grid g reads the
    stored table at (j + 0.5) * g0 / (g + 0.1) - 0.5; offset 0 is plain size-based resampling."""
    torch.manual_seed(0)
    m = build_model("cotap_test", interpolate_offset=offset)  # 4x4 stored grid
    with torch.no_grad():
        m.pos_embed.normal_()
        for gh, gw in [(6, 6), (3, 7), (2, 2)]:
            got = m.interpolate_pos_encoding(gh, gw)
            table = m.pos_embed[0, 1:].reshape(4, 4, -1).permute(2, 0, 1)  # (D, 4, 4)
            rows = _naive_bicubic_1d(table.transpose(1, 2), gh, 4 / (gh + offset)).transpose(1, 2)
            want = _naive_bicubic_1d(rows, gw, 4 / (gw + offset))  # (D, gh, gw)
            torch.testing.assert_close(got[0, 1:], want.permute(1, 2, 0).reshape(gh * gw, -1))
            torch.testing.assert_close(got[0, 0], m.pos_embed[0, 0])


def test_saved_configs_without_the_offset_keep_size_based_resampling() -> None:
    from cotap.training.models import ViTConfig

    saved = model_config("cotap_test").to_dict()
    assert saved.pop("interpolate_offset") == 0.1  # new models resample as DINO
    assert ViTConfig.from_dict(saved).interpolate_offset == 0.0
    assert ViTConfig.from_dict({**saved, "interpolate_offset": 0.1}).interpolate_offset == 0.1
    with pytest.raises(ValueError, match="interpolate_offset"):
        build_model("cotap_test", interpolate_offset=1.0)


def _naive_filter(block, h: torch.Tensor, kernel: torch.Tensor, gh: int, gw: int):  # type: ignore[no-untyped-def]
    """Per-position, per-head, per-prototype loops of the §2.2 formulas (independent of the model code)."""
    b, n1, d = h.shape
    heads = block.attn.num_heads
    dh = d // heads
    m_count, _, k, _ = kernel.shape
    wq, wk, wv = block.attn.qkv.weight.split(d)
    bq, bk, bv = block.attn.qkv.bias.split(d)

    def ln(x, norm):  # type: ignore[no-untyped-def]
        return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, eps=1e-6)

    hn = ln(h, block.norm1)
    q = hn @ wq.T + bq  # (B, 1+N, D)
    protos = ln(kernel.permute(0, 2, 3, 1), block.norm_in)  # (M, k, k, D)
    keys = protos @ wk.T + bk
    vals = protos @ wv.T + bv
    out = torch.zeros(b, n1, d, dtype=h.dtype)
    assign = torch.zeros(b, gh * gw, m_count, dtype=h.dtype)
    r = k // 2
    for bi in range(b):
        for hd in range(heads):
            sl = slice(hd * dh, (hd + 1) * dh)
            vmean = vals[..., sl].mean(dim=(1, 2))  # (M, dh)
            kmean = keys[..., sl].mean(dim=(1, 2))
            # CLS
            s = torch.stack([(q[bi, 0, sl] * kmean[mi]).sum() for mi in range(m_count)]) / math.sqrt(m_count)
            a = torch.softmax(s, 0)
            out[bi, 0, sl] = (a[:, None] * vmean).sum(0)
            for i in range(gh):
                for j in range(gw):
                    s = torch.zeros(m_count, dtype=h.dtype)
                    for mi in range(m_count):
                        for u in range(-r, r + 1):
                            for v in range(-r, r + 1):
                                ii, jj = i + u, j + v
                                if 0 <= ii < gh and 0 <= jj < gw:
                                    s[mi] += (q[bi, 1 + ii * gw + jj, sl] * keys[mi, u + r, v + r, sl]).sum()
                    a = torch.softmax(s / math.sqrt(m_count), 0)
                    out[bi, 1 + i * gw + j, sl] = (a[:, None] * vmean).sum(0)
                    assign[bi, i * gw + j] += a / heads
    z = h + out @ block.attn.proj.weight.T + block.attn.proj.bias
    z = z + block.mlp.fc2(F.gelu(block.mlp.fc1(ln(z, block.norm2))))
    patch = ln(torch.cat([h[:, 1:], z[:, 1:]], -1), block.norm_out_patch)
    cls = ln(torch.cat([h[:, 0], z[:, 0]], -1), block.norm_out_cls)
    return patch, cls, assign


def test_filter_matches_naive_reference() -> None:
    torch.manual_seed(0)
    m = build_model("cotap_test", num_prototypes=5, embed_dim=16, num_heads=2).double().eval()
    # make the norms non-trivial so a swapped norm would show
    for p in m.parameters():
        p.data += 0.05 * torch.randn_like(p)
    fb = m.filter_block
    gh, gw = 3, 4
    h = torch.randn(2, 1 + gh * gw, 16, dtype=torch.float64)
    with torch.no_grad():
        patch, cls, assign = fb.filter(h, m.kernel, (gh, gw))
        ref_patch, ref_cls, ref_assign = _naive_filter(fb, h, m.kernel, gh, gw)
    torch.testing.assert_close(patch, ref_patch)
    torch.testing.assert_close(cls, ref_cls)
    torch.testing.assert_close(assign, ref_assign)


def test_prototypes_detached_in_main_forward() -> None:
    m = build_model("cotap_test")
    out = m.forward_features(torch.randn(1, 3, 32, 32))
    out["patch"].sum().backward()
    assert m.kernel.grad is None
    assert m.filter_block.norm_in.weight.grad is not None  # the block weights that transform prototypes learn


def test_no_filter_ablation_keeps_the_contract() -> None:
    torch.manual_seed(0)
    m = build_model("cotap_test", use_filter=False).eval()
    with torch.no_grad():
        out = m.forward_features(torch.randn(1, 3, 32, 32))
        h = m.get_intermediate_layers(torch.randn(1, 3, 32, 32) * 0, n=1)[0]
    assert out["patch"].shape == (1, 4, 4, 64) and out["cls"].shape == (1, 64)
    torch.testing.assert_close(out["assign"], torch.full((1, 4, 4, 64), 1 / 64))
    assert h.shape == (1, 17, 32)
