"""SAM path: import guard, official-layout checkpoints at other sizes, LoRA fine-tune, adapters,
prompted segmentation with the embedding cache, propagation and evaluation — with a tiny config."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import run_cli
from medfound.data.phantoms import write_phantom_dataset
from medfound.models.sam import SAM_VARIANTS, build_sam, load_sam, load_sam_model, read_checkpoint


def test_guard_never_imports_torchvision():
    code = "import sys, medfound.models.sam as s; s.build_sam('tiny', 64); print('torchvision' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(build_sam("tiny", 1024).state_dict(), path)  # official key layout, as released at 1024
    return path


def test_official_layout_loads_at_other_sizes(tiny_pth):
    state = read_checkpoint(tiny_pth)
    assert "image_encoder.pos_embed" in state and "mask_decoder.iou_prediction_head.layers.0.weight" in state
    sam, info = load_sam(tiny_pth, 256)
    assert info["variant"] == "tiny" and sam.image_encoder.pos_embed.shape == (1, 16, 16, 64)
    glob = sam.image_encoder.blocks[SAM_VARIANTS["tiny"].global_attn[0]].attn.rel_pos_h
    assert glob.shape[0] == 2 * 16 - 1
    same, _ = load_sam(tiny_pth)  # native size: bit-exact
    assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items())


def test_bad_checkpoint(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "x.pth")
    r = run_cli("sam", "segment", "--model", tmp_path / "x.pth", "--input", tmp_path / "x.pth", "--output", tmp_path,
                "--box", "1,1,5,5")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_finetune_adapters_reload_segment(tiny_pth, tmp_path):
    ds = write_phantom_dataset(tmp_path / "ph", ("CT",), cases_per_modality=3)
    run = tmp_path / "run"
    r = run_cli("sam", "finetune", "--dataset", ds.root, "--base", tiny_pth, "--out", run, "--image-size", "64",
                "--max-steps", "6", "--checkpoint-every", "3", "--rank", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "adapters.safetensors").stat().st_size < 0.5 * tiny_pth.stat().st_size
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["rank"] == 2 and cfg["training"]["steps"] == 6 and cfg["targets"] == ["q", "v"]
    r = run_cli("sam", "finetune", "--dataset", ds.root, "--base", tiny_pth, "--out", run, "--image-size", "64",
                "--max-steps", "9", "--checkpoint-every", "3", "--rank", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["training"]["steps"] == 9
    sam, cfg = load_sam_model(run)
    assert cfg["adapted"]
    # box and points through the CLI, on a volume, written in its geometry
    img = ds.root / "imagesTr" / "phantom_ct_000_0000.nii.gz"
    for args in (["--box", "10,10,40,40"], ["--point", "30,30,1", "--point", "2,2,0"], ["--box", "10,10,40,40", "--propagate"]):
        r = run_cli("sam", "segment", "--model", run, "--input", img, "--output", tmp_path / "o", "--slice", "12", *args)
        assert r.returncode == 0, r.stderr[-2000:]
    import nibabel as nib

    a, b = nib.load(str(img)), nib.load(str(tmp_path / "o" / "phantom_ct_000.nii.gz"))
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    r = run_cli("sam", "evaluate", "--model", run, "--dataset", ds.root, "--out", tmp_path / "e.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "e.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 4 and lines[0] == "model,prompt,dice_mean,dice_std,n"


def test_finetune_ddp_two_cpu_processes(tiny_pth, tmp_path):
    """sam finetune over 2 CPU processes (gloo): the adapters are written and reported by rank 0 alone."""
    ds = write_phantom_dataset(tmp_path / "ph", ("CT",), cases_per_modality=3)
    run = tmp_path / "ddp"
    r = run_cli("sam", "finetune", "--dataset", ds.root, "--base", tiny_pth, "--out", run, "--image-size", "64",
                "--max-steps", "2", "--batch-size", "2", "--rank", "2", "--accelerator", "cpu", "--devices", "2",
                "--strategy", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("adapters") == 1 and (run / "adapters.safetensors").is_file()
    t = load_sam_model(run)[1]["training"]
    assert t["steps"] == 2 and t["world_size"] == 2 and t["global_batch"] == 4


def test_embedding_cache_reuses_encoder(tiny_pth):
    from medfound.data.phantoms import make_phantom
    from medfound.infer.sam_segment import SamSession

    sam, _ = load_sam(tiny_pth, 64)
    image, _ = make_phantom("CT", shape=(40, 40, 6))
    s = SamSession(sam.eval(), image, 64)
    s.segment(2, box=(5, 5, 30, 30))
    s.segment(2, points=[(10, 10)], labels=[1])
    s.segment(2, box=(0, 0, 20, 20), points=[(4, 4)], labels=[0])
    assert s.encoder_calls == 1
    s.segment(3, box=(5, 5, 30, 30))
    assert s.encoder_calls == 2
    z = SamSession(sam.eval(), image, 64, box_zoom=2.0)  # a box answered on its crop
    alone = z.logits(2, box=(10, 10, 20, 20))
    clicked = z.logits(2, box=(10, 10, 20, 20), points=[(12, 12)], labels=[0])
    assert z.encoder_calls == 1 and not np.allclose(alone, clicked)  # the click reuses the box's crop
    z.segment(2, box=(8, 10, 22, 20))
    z.segment(3, box=(8, 10, 22, 20))
    assert z.encoder_calls == 3  # another window, another slice: new crops


def test_flip_averages_the_mirrored_answer(tiny_pth):
    """--flip: the answer is the mean over the slice and its mirror image, so it is itself mirror-
    equivariant: the mirrored image with mirrored prompts gives the mirrored mask (2D and volumes)."""
    import dataclasses

    from medfound.data.phantoms import make_phantom
    from medfound.infer.sam_segment import SamSession

    sam, _ = load_sam(tiny_pth, 64)
    sam.eval()
    volume, _ = make_phantom("CT", shape=(64, 64, 4))
    for image, k in ((volume, 2), (dataclasses.replace(volume, array=volume.array[..., 1]), 0)):
        mirror = dataclasses.replace(image, array=np.ascontiguousarray(image.array[::-1]))
        plain, a, b = (SamSession(sam, im, 64, flip=f) for im, f in ((image, False), (image, True), (mirror, True)))
        box, point = (10, 12, 30, 40), (20, 25)
        la = a.logits(k, box=box, points=[point], labels=[1])
        lb = b.logits(k, box=(63 - 30, 12, 63 - 10, 40), points=[(63 - 20, 25)], labels=[1])
        assert la.shape == image.array.shape[:2] and np.allclose(la, lb[::-1], atol=1e-4)
        assert not np.allclose(la, plain.logits(k, box=box, points=[point], labels=[1]), atol=1e-4)
        assert a.encoder_calls + a.mirrored.encoder_calls == 2  # one embedding of each view


@pytest.mark.slow
def test_vit_b_official_layout_at_256(tmp_path):
    torch.save(build_sam("vit_b", 1024).state_dict(), tmp_path / "vit_b.pth")
    sam, info = load_sam(tmp_path / "vit_b.pth", 256)
    assert info["variant"] == "vit_b" and sam.image_encoder.pos_embed.shape == (1, 16, 16, 768)


def test_mae_encoder_as_sam_image_encoder(tmp_path):
    from medfound.models.export import save_encoder
    from medfound.models.vit import VIT_CONFIGS, ViTEncoder
    from medfound.train.sam_finetune import SamFinetuneConfig, run_sam_finetune

    enc = ViTEncoder(VIT_CONFIGS["vit-micro"])
    save_encoder(enc, tmp_path / "mae", {"image_size": 64})
    sam, info = load_sam(f"mae:{tmp_path / 'mae'}", 64)
    assert info["weights"] == "mae-encoder"
    assert torch.equal(sam.image_encoder.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    assert torch.equal(sam.image_encoder.blocks[1].mlp.lin2.weight, enc.blocks[1].mlp.fc2.weight)
    ds = write_phantom_dataset(tmp_path / "ph", ("CT",), cases_per_modality=3)
    run_sam_finetune(ds.root, f"mae:{tmp_path / 'mae'}", tmp_path / "run",
                     SamFinetuneConfig(image_size=64, max_steps=2, batch_size=2, progress=False, accelerator="cpu"))
    adapted, cfg = load_sam_model(tmp_path / "run")
    assert cfg["adapted"] and cfg["base"]["weights"] == "mae-encoder"


def test_qv_lora_adapts_query_and_value_only():
    from medfound.models.lora import QVLoRA

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 24)
    lora = QVLoRA(base, rank=2)
    x = torch.randn(3, 8)
    assert torch.allclose(lora(x), base(x))  # B = 0: starts as the base model
    torch.nn.init.normal_(lora.lora_q_B.weight)
    torch.nn.init.normal_(lora.lora_v_B.weight)
    d = lora(x) - base(x)
    assert d[:, :8].abs().sum() > 0 and d[:, 8:16].abs().sum() == 0 and d[:, 16:].abs().sum() > 0


def test_decoder_only_adaptation_on_several_datasets_caches_embeddings(tmp_path):
    """--rank 0: the encoder stays as it was (no adapters), each distinct slice is embedded once, several
    datasets train together with excluded structures left out, and the run reloads."""
    import json

    from medfound.models.sam import load_sam_model
    from medfound.train.sam_finetune import FrozenCache

    a = write_phantom_dataset(tmp_path / "a", ("CT",), cases_per_modality=2)
    b = write_phantom_dataset(tmp_path / "b", ("MR",), cases_per_modality=2, seed=4)
    run = tmp_path / "run"
    r = run_cli("sam", "finetune", "--dataset", a.root, "--dataset", b.root, "--base", "tiny", "--output", run,
                "--rank", "0", "--max-steps", "3", "--batch-size", "2", "--accelerator", "cpu", "--exclude-label", "kidney")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["rank"] == 0 and len(cfg["data"]["datasets"]) == 2 and cfg["data"]["excluded_labels"] == ["kidney"]
    assert all("kidney" not in cfg["classes"][k]["name"] for k in cfg["classes"])
    sam, c = load_sam_model(run)
    assert c["adapted"] and not any("lora_" in n for n, _ in sam.named_parameters())
    calls = []

    def encoder(x):
        calls.append(len(x))
        return torch.zeros(len(x), 4, 2, 2)

    cache = FrozenCache(encoder)
    x = torch.rand(3, 1, 8, 8)
    cache(x)
    cache(torch.cat([x[:2], torch.rand(1, 1, 8, 8)]))
    assert calls == [3, 1]  # a slice seen before is not embedded again


def test_sam_evaluate_named_structures(tmp_path):
    ds = write_phantom_dataset(tmp_path / "ph", ("CT",), cases_per_modality=1)
    out = tmp_path / "e.csv"
    r = run_cli("sam", "evaluate", "--dataset", ds.root, "--model", "tiny", "--label", "organ", "--output", out)
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "e_structures.csv").read_text().splitlines()[1:]
    assert rows and all(",organ," in row for row in rows)
    # another model is scored on the very same boxes: its clicks differ, its ellipse rows do not
    r = run_cli("sam", "evaluate", "--dataset", ds.root, "--label", "organ", "--output", tmp_path / "f.csv")
    assert r.returncode == 0, r.stderr
    other = (tmp_path / "f_structures.csv").read_text().splitlines()[1:]
    assert [x for x in rows if "ellipse" in x] == [x for x in other if "ellipse" in x]
    assert [x for x in rows if ",box," in x] != [x for x in other if ",box," in x]
    # --flip: the same boxes answered with mirror averaging (the shipped SAM zooms to each box's crop)
    r = run_cli("sam", "evaluate", "--dataset", ds.root, "--label", "organ", "--flip", "--output", tmp_path / "g.csv")
    assert r.returncode == 0, r.stderr
    flipped = (tmp_path / "g_structures.csv").read_text().splitlines()[1:]
    assert [x for x in flipped if "ellipse" in x] == [x for x in other if "ellipse" in x]
    assert [x for x in flipped if ",box," in x] != [x for x in other if ",box," in x]
