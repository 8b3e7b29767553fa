"""ViT / MAE model: shapes, masking, bf16 autocast, torch.compile, export round trip."""

import torch
from safetensors.torch import load_file

from medfound.models.export import load_encoder, save_encoder
from medfound.models.mae import MAE, MAEConfig
from medfound.models.vit import VIT_CONFIGS, ViTEncoder, sincos_pos_embed


def micro_mae(**kw):
    return MAE(MAEConfig(encoder="vit-micro", decoder_width=32, decoder_depth=1, decoder_heads=2, **kw))


def test_shapes_and_masking():
    torch.manual_seed(0)
    m = micro_mae()
    x = torch.rand(3, 1, 64, 96)  # non-square works
    loss, pred, mask = m(x)
    assert pred.shape == (3, 4 * 6, 16 * 16) and mask.shape == (3, 24)
    assert torch.allclose(mask.sum(1), torch.full((3,), 24 - int(24 * 0.25), dtype=torch.float32))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(m.unpatchify(m.patchify(x), (4, 6)), x)
    # the reconstruction keeps visible patches exactly
    rec = m.reconstruct(x, pred, mask)
    vis = (1 - mask)[0].reshape(4, 6).repeat_interleave(16, 0).repeat_interleave(16, 1).bool()
    assert torch.allclose(rec[0, 0][vis], x[0, 0][vis], atol=1e-5)


def test_encoder_sees_only_visible_patches():
    m = micro_mae(mask_ratio=0.75)
    latent, mask, _ = m.forward_encoder(torch.rand(2, 1, 64, 64), 0.75)
    assert latent.shape == (2, 1 + 4, 64)


def test_bf16_autocast_runs_and_matches_fp32():
    torch.manual_seed(0)
    m = micro_mae()
    x = torch.rand(2, 1, 64, 64)
    torch.manual_seed(1)
    l32, _, _ = m(x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l16, pred, _ = m(x)
    assert pred.dtype == torch.bfloat16
    l16.backward()
    assert abs(float(l16) - float(l32)) < 0.05 * float(l32)


def test_compile_matches_eager(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # same RNG stream as eager for the mask
    torch.manual_seed(0)
    m = micro_mae()
    x = torch.rand(2, 1, 32, 32)
    compiled = torch.compile(m)
    torch.manual_seed(2)
    a = m(x)[0]
    torch.manual_seed(2)
    b = compiled(x)[0]
    assert torch.allclose(a, b, atol=1e-4)


def test_pos_embed_and_sizes():
    pe = sincos_pos_embed(64, 3, 5)
    assert pe.shape == (15, 64) and torch.all(pe.abs() <= 1)
    assert VIT_CONFIGS["vit-tiny"].width == 192 and VIT_CONFIGS["vit-base"].depth == 12


def test_export_reload_bit_exact(tmp_path):
    enc = ViTEncoder(VIT_CONFIGS["vit-micro"])
    save_encoder(enc, tmp_path, {"image_size": 64})
    back, cfg = load_encoder(tmp_path)
    a, b = enc.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(enc(x), back(x))
    assert cfg["architecture"]["width"] == 64 and cfg["image_size"] == 64
    assert set(load_file(str(tmp_path / "encoder.safetensors"))) == set(a)
