"""hf-hub: and local-dir: model names: a folder export.py wrote serves as
--arch (fine-tuning, linear probe) and as CASS's ViT arm at another image
size than it was saved at, its checkpoints rebuild (also once the folder is
gone, from what they record), and a missing folder or an unreachable Hub end
in one clear line before any data is read."""
import shutil

import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from plumbing import backbone
from plumbing import checkpoint
from tools import export
import finetune
import pretrain_cass
from errors import UserError
from plumbing.models import arch_record, check_arch, create_model, from_checkpoint, is_transformer
from plumbing.pixels import AUTO

SIZE = 48  # not the folder's 32 px: the position embeddings must be resampled to it


@pytest.fixture
def folder(cass_run, tmp_path) -> str:
    """cass_run's 32 px test_vit as a local-dir: name."""
    export.main(export.parse_args(["--ckpt", str(cass_run / "vit.pt"), "--out", str(tmp_path / "hf")]))
    return f"local-dir:{tmp_path / 'hf'}"


def folder_weights(name: str) -> dict[str, torch.Tensor]:
    return timm.create_model(name, pretrained=True).state_dict()


def test_a_local_dir_vit_is_built_at_the_requested_size_with_the_folders_weights(folder):
    model = create_model(folder, img_size=SIZE, pretrained=True)
    saved = folder_weights(folder)
    assert is_transformer(folder)  # save_for_hf writes fixed_input_size False for test_vit; its architecture counts
    assert model.pos_embed.shape[1] == 1 + (SIZE // 16) ** 2 != saved["pos_embed"].shape[1]
    assert torch.equal(model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("linear", [False, True])
def test_fine_tune_and_linear_probe_a_local_dir_model(folder, demo_data, tmp_path, linear):
    out = tmp_path / "ft"
    finetune.main(finetune.parse_args(["--arch", folder, "--data", str(demo_data), "--img-size", str(SIZE),
                                       "--epochs", "1", "--workers", "0", "--resamples", "10", "--out", str(out),
                                       *(["--linear"] if linear else [])]))
    ckpt = checkpoint.load(out / "model_seed0.pt", kind="model")
    assert ckpt["arch"] == folder and ckpt["img_size"] == SIZE and ckpt["method"] == "supervised"
    assert ckpt["timm_arch"] == "test_vit"  # rebuilds without the folder
    model = from_checkpoint(ckpt)
    assert model.num_classes == 4 and model.pos_embed.shape[1] == 1 + (SIZE // 16) ** 2
    if linear:  # a frozen backbone: the folder's own weights, not a random initialisation
        saved = folder_weights(folder)
        assert torch.equal(model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])


def test_cass_pretrains_with_a_local_dir_vit_arm(folder, demo_data, tmp_path):
    # the CNN arm starts from a local weights file too: --pretrained must not reach for the network
    resnet = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), resnet)
    out = tmp_path / "cass"
    pretrain_cass.main(pretrain_cass.parse_args([
        "--data", str(demo_data), "--out", str(out), "--epochs", "1", "--cnn", "test_resnet", "--vit", folder,
        "--cnn-weights", str(resnet), "--img-size", str(SIZE), "--bs", "8", "--workers", "0"]))
    ckpt = checkpoint.load(out / "vit.pt", kind="model")
    assert ckpt["arch"] == folder and ckpt["img_size"] == SIZE and ckpt["timm_arch"] == "test_vit"
    assert from_checkpoint(ckpt).pos_embed.shape[1] == 1 + (SIZE // 16) ** 2


def test_a_checkpoint_that_records_the_architecture_rebuilds_without_the_folder(folder):
    model = create_model(folder, img_size=SIZE, pretrained=True)
    ckpt = checkpoint.model_record(model, arch=folder, img_size=SIZE, mean=[0.5] * 3, std=[0.5] * 3,
                                   method="supervised", **arch_record(folder))
    assert ckpt["timm_arch"] == "test_vit" and "img_size" not in ckpt["model_args"]
    shutil.rmtree(folder.removeprefix("local-dir:"))
    rebuilt = from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    unrecorded = {key: value for key, value in ckpt.items() if key not in ("timm_arch", "model_args")}
    with pytest.raises(UserError, match="is not a folder with a config.json"):  # the name alone needs the folder
        from_checkpoint(unrecorded)


def test_a_pretrained_checkpoint_of_a_local_dir_model_stays_a_source_without_the_folder(folder, tmp_path):
    model = create_model(folder, img_size=SIZE, pretrained=True)
    path = tmp_path / "vit.pt"
    checkpoint.save(checkpoint.model_record(model, arch=folder, img_size=SIZE, mean=[0.5] * 3, std=[0.5] * 3,
                                            method="cass", **arch_record(folder)), path)
    shutil.rmtree(folder.removeprefix("local-dir:"))
    source = backbone.from_file(str(path), None, AUTO)
    assert (source.arch, source.timm_arch) == (folder, "test_vit") and is_transformer(source.timm_arch)
    assert set(source.record) == {"timm_arch", "model_args"}  # what its fine-tuned checkpoints record in turn


def test_registry_names_record_nothing_more():
    assert arch_record("test_vit") == {}


@pytest.mark.parametrize("argv", [["--vit", "local-dir:{tmp}/missing"], ["--cnn", "hf-hub:someone/not-cached"]])
def test_a_missing_folder_or_an_unreachable_hub_fails_before_any_data_is_read(tmp_path, monkeypatch, argv):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # no retries against the network
    flag, name = argv
    args = pretrain_cass.parse_args(["--data", str(tmp_path / "no-data"), flag, name.format(tmp=tmp_path),
                                     "--no-pretrained", "--workers", "0"])
    with pytest.raises(UserError) as err:
        pretrain_cass.validate(args)
    message = str(err.value)
    assert "\n" not in message
    assert "config.json" in message if flag == "--vit" else "local-dir:FOLDER" in message and "--weights" in message


def test_an_unprefixed_hub_id_is_told_to_use_a_prefix():
    with pytest.raises(UserError, match="hf-hub:org/name"):
        check_arch("org/name")
