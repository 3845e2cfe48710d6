"""The Hugging Face Hub layout (config.json + model.safetensors): save_pretrained / from_pretrained,
scripts/convert_to_hf.py from every kind of source, and Hub ids and folders wherever a model is chosen.
Local folders only: nothing here reaches the network."""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import hubconf
from model.pretrained import load_feature_extractor, load_model
from model.sync_model import Synchformer
from scripts import convert_to_hf
from scripts.common import add_model_args, load_model_from_args, model_provenance
from tests.reference_data import REPO
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.config import load_config
from utils.download import PUBLISHED_MODELS, DownloadError, md5sum
from utils.utils import ConfigError, instantiate_from_config

CONFIGS = {"sync": "sync.yaml", "synchronizability": "ft_synchability.yaml"}


def tiny_checkpoint(path, kind: str = "sync", seed: int = 0):
    """The tiny config of `kind` (configs/tiny/) with random weights, in the published format."""
    cfg = load_config([f"config={REPO / 'configs' / 'tiny' / CONFIGS[kind]}"])
    torch.manual_seed(seed)
    save_checkpoint({"model": instantiate_from_config(cfg.model).state_dict(), "args": cfg, "epoch": 0}, path)
    return path


def inputs(n_segments: int = 14, seed: int = 1):
    torch.manual_seed(seed)
    return torch.randn(2, n_segments, 16, 3, 32, 32), torch.randn(2, n_segments, 1, 32, 66)  # the tiny input sizes


def logits(model, vis, aud):
    with torch.inference_mode():
        return model(vis, aud)[1]


@pytest.mark.parametrize("kind", ["sync", "synchronizability"])
def test_save_and_from_pretrained_give_the_checkpoints_outputs(kind, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / f"{kind}.pt", kind)
    model, cfg = load_model(ckpt_path=ckpt)
    model.save_pretrained(tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert set(config) == {"model", "data"} and config["model"]["target"] == "model.sync_model.Synchformer"
    assert load_file(tmp_path / "hf" / "model.safetensors").keys() == load_checkpoint(ckpt)["model"].keys()
    loaded = Synchformer.from_pretrained(tmp_path / "hf")
    assert not loaded.training and loaded.cfg.data == cfg.data
    vis, aud = inputs(cfg.data.n_segments)
    expected = logits(model, vis, aud)
    assert expected.shape == (2, 2 if kind == "synchronizability" else 21)
    torch.testing.assert_close(logits(loaded, vis, aud), expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same weights as a published-format checkpoint, a bare state dict + config, a training run folder
    and a published experiment already downloaded into a logdir."""
    root = tmp_path_factory.mktemp("sources")
    ckpt = tiny_checkpoint(root / "tiny.pt")
    ckpt_dict = load_checkpoint(ckpt)
    torch.save(ckpt_dict["model"], root / "synchformer_state_dict.pth")
    OmegaConf.save(ckpt_dict["args"], root / "cfg.yaml")
    for run in (root / "runs" / "25-06-01T10-00-00", root / "logs" / "24-01-04T16-39-21"):
        run.mkdir(parents=True)
        (run / f"{run.name}.pt").symlink_to(ckpt)
        OmegaConf.save(ckpt_dict["args"], run / f"cfg-{run.name}.yaml")
    published_cfg = root / "logs" / "24-01-04T16-39-21" / "cfg-24-01-04T16-39-21.yaml"
    published_cfg.with_name(published_cfg.name + ".md5").write_text(md5sum(published_cfg))  # as downloaded
    return root


def convert(*argv) -> None:
    convert_to_hf.main(convert_to_hf.get_parser().parse_args([str(a) for a in argv]))


def test_convert_to_hf_from_every_source(sources, tmp_path, monkeypatch):
    """The converted model's outputs equal the checkpoint's; the card names the paper, the results, the license
    and, for a published experiment, marks its own row."""
    # the tiny checkpoint stands in for the published one, whose md5 is checked
    monkeypatch.setitem(PUBLISHED_MODELS["24-01-04T16-39-21"], "md5", md5sum(sources / "tiny.pt"))
    expected_model, _ = load_model(ckpt_path=sources / "tiny.pt")
    vis, aud = inputs()
    expected = logits(expected_model, vis, aud)
    cases = {
        "published format": [sources / "tiny.pt"],
        "bare state dict": [sources / "synchformer_state_dict.pth", "--cfg_path", sources / "cfg.yaml"],
        "training run": [sources / "runs" / "25-06-01T10-00-00"],
        "published experiment": ["24-01-04T16-39-21", "--logdir", sources / "logs", "--repo_id", "me/sf-audioset"],
    }
    for label, argv in cases.items():
        out = tmp_path / label.replace(" ", "_")
        convert(*argv, "--out", out)
        torch.testing.assert_close(logits(Synchformer.from_pretrained(out), vis, aud), expected, rtol=0, atol=1e-6)
        card = (out / "README.md").read_text()
        for fact in ("license: mit", "arxiv.org/abs/2401.16423", "| 47.2 / 67.4 |", "64 ms", "from_pretrained("):
            assert fact in card, (label, fact)
    card = (tmp_path / "published_experiment" / "README.md").read_text()
    assert "`24-01-04T16-39-21` (this model) | stage 2, AudioSet | VGGSound-Sparse |" in card
    assert 'Synchformer.from_pretrained("me/sf-audioset")' in card
    assert "(this model)" not in (tmp_path / "training_run" / "README.md").read_text()


def test_every_model_choice_takes_a_hub_folder(sources, tmp_path):
    """--exp_name and --ckpt_path of the commands and the torch.hub entry points load a Hub folder."""
    convert(sources / "tiny.pt", "--out", tmp_path / "hf")
    vis, aud = inputs()
    expected = logits(load_model(ckpt_path=sources / "tiny.pt")[0], vis, aud)
    parser = argparse.ArgumentParser()
    add_model_args(parser, default_exp=None)
    for argv in (["--exp_name", tmp_path / "hf"], ["--ckpt_path", tmp_path / "hf"]):
        args = parser.parse_args([str(a) for a in [*argv, "--device", "cpu"]])
        model, _ = load_model_from_args(args)
        torch.testing.assert_close(logits(model, vis, aud), expected, rtol=0, atol=1e-6)
        # what the resumable outputs record: the folder's weights, hashed
        weights = hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest()
        assert model_provenance(args)["model_sha256"] == hashlib.sha256(bytes.fromhex(weights)).hexdigest()
        features = load_model_from_args(args, loader=load_feature_extractor, audio=True)
        with torch.inference_mode():
            torch.testing.assert_close(features.extract_afeats(aud), model.extract_afeats(aud), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(hubconf.synchformer(str(tmp_path / "hf")), vis, aud), expected, rtol=0, atol=1e-6)
    # a folder without weights, a Hub id that is not a model id
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(DownloadError, match="has no model.safetensors"):
        load_model(tmp_path / "empty")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "hf")


def test_a_planted_config_json_runs_nothing(sources, tmp_path):
    """config.json comes with downloaded weights: a target outside this project's classes is refused before
    anything is built, by every loader."""
    convert(sources / "tiny.pt", "--out", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    ran = tmp_path / "ran"
    config["model"]["params"]["vfeat_extractor"] = {"target": "os.system", "params": {"command": f"touch {ran}"}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    for load in (Synchformer.from_pretrained, load_model, load_feature_extractor):
        with pytest.raises(ConfigError, match=r"names 'os\.system' at model\.params\.vfeat_extractor"):
            load(tmp_path / "hf")
    assert not ran.exists()


def test_a_hub_id_without_network_fails_in_one_line(tmp_path):
    """A Hub id that is not in the cache, with no network (HF_HUB_OFFLINE=1 stands for it): exit status 2 and
    one line that names the id, in a real process."""
    cmd = [sys.executable, str(REPO / "scripts" / "convert_to_hf.py"), "someone/synchformer-x", "--out", tmp_path]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "'someone/synchformer-x'" in proc.stderr and "local folder" in proc.stderr
