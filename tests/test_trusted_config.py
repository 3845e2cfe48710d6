"""A config that did not come from the user (stored in a checkpoint, downloaded, or found in the model cache)
builds only this project's classes and the few library classes the published configs name; the user's own
YAML keeps full freedom. Cached published files are verified before use."""

import re

import pytest
import torch
from omegaconf import OmegaConf

import hubconf
from dataset.synthetic import ClipSpec, make_clip
from model.sync_model import Synchformer, load_synchformer
from tests.cli_driver import run_case
from tests.reference_data import REPO
from tests.test_cli import assert_one_line_error
from tests.test_inference import tiny_sync_cfg
from utils.checkpoint import save_checkpoint
from utils.config import ConfigError, check_targets, load_config
from utils.download import PUBLISHED_MODELS, DownloadError, md5sum
from utils.utils import instantiate_from_config


def hostile(cfg, where: str, command: str):
    """`cfg` with a target that runs `command` in the model (`where='model'`) or first among the test transforms."""
    cfg = cfg.copy()
    call = {"target": "os.system", "params": {"command": command}}
    if where == "model":
        cfg.model.params.vproj = call
    else:
        cfg.transform_sequence_test.insert(0, call)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trusted")
    cfg = tiny_sync_cfg()
    torch.manual_seed(0)
    return root, cfg, instantiate_from_config(cfg.model).state_dict()


def test_a_checkpoint_config_runs_no_code_in_any_command(tiny):
    root, cfg, state_dict = tiny
    make_clip(root / "videos" / "clip.mp4", ClipSpec(duration_sec=6.0, seed=1))
    clip = root / "videos" / "clip.mp4"
    cases, markers = [], []
    for where in ("model", "transforms"):
        marker = root / f"ran-{where}"
        markers.append(marker)
        ckpt = root / f"{where}.pt"
        save_checkpoint({"model": state_dict, "args": hostile(cfg, where, f"touch {marker}")}, ckpt)
        model = ["--ckpt_path", str(ckpt), "--device", "cpu"]
        for script, argv in [
            ("example.py", ["--vid_path", clip, "--reencode_dir", root / "vis"]),
            ("scripts/predict_offsets.py", [clip, "--out_dir", root / "offsets"]),
            ("scripts/desync.py", [root / "videos", "--out", root / "desync.json"]),
            ("scripts/resync.py", [clip, "--out", root / "fixed.mp4"]),
        ]:
            cases.append({"script": script, "argv": [*map(str, argv), *model]})
    results = [run_case(case) for case in cases]
    assert not any(marker.exists() for marker in markers)
    for case, result in zip(cases, results):
        assert_one_line_error(case["script"], result, "os.system", case["argv"][-3])


def test_what_a_checkpoint_config_may_build(tiny):
    root, cfg, state_dict = tiny
    ckpt = root / "plain.pt"
    save_checkpoint({"model": state_dict, "args": cfg}, ckpt)
    load_synchformer(ckpt)  # the project's classes and torch.nn.Linear
    for config in sorted((REPO / "configs").rglob("*.yaml")):  # what the shipped configs build is trusted
        check_targets(load_config([f"config={config}"]), str(config))
    # outside the allow-list: a library function, a function of the project (it writes files), a library class
    # that a project module imports, the same Linear by another name; at any depth
    refused = {
        "model.params.vproj": "os.system",
        "model.params.transformer.params.pos_emb_cfg": "dataset.io.reencode_video",
        "model.params.aproj": "dataset.io.Path",
        "transform_sequence_test[2]": "torch.nn.modules.linear.Linear",
    }
    for path, name in refused.items():
        bad = cfg.copy()
        OmegaConf.update(bad, f"{path}.target", name, merge=False)
        save_checkpoint({"model": state_dict, "args": bad}, ckpt)
        with pytest.raises(ConfigError, match=f"{ckpt} names '{re.escape(name)}' at {re.escape(path)}:"):
            load_synchformer(ckpt)
    # the user's own config may name what it likes
    mine = cfg.copy()
    mine.model.params.vproj.target = "torch.nn.modules.linear.Linear"
    load_synchformer(ckpt, cfg=mine)
    looped = cfg.copy()
    looped.data.crop_len_sec = "${data.crop_len_sec}"
    save_checkpoint({"model": state_dict, "args": looped}, ckpt)
    with pytest.raises(ConfigError, match=f"Could not resolve the values in {ckpt}: Recursive interpolation"):
        load_synchformer(ckpt)


def test_the_model_cache_is_verified_before_use(tiny, monkeypatch):
    """Files planted in (or changed in) the model cache of `torch.hub` are refused in one line naming the file."""
    root, cfg, state_dict = tiny
    exp = "24-01-04T16-39-21"
    monkeypatch.setenv("TORCH_HOME", str(root))  # torch.hub's folder: <TORCH_HOME>/hub
    monkeypatch.setattr("utils.download.PARENT_URL", "http://127.0.0.1:9/sync_models")  # offline
    exp_dir = root / "hub" / "synchformer" / exp
    ckpt, yaml = exp_dir / f"{exp}.pt", exp_dir / f"cfg-{exp}.yaml"
    save_checkpoint({"model": state_dict, "args": cfg}, ckpt)
    OmegaConf.save(cfg, yaml)
    with pytest.raises(DownloadError, match=f"download .* to {yaml} .* place it at {yaml} and its md5 in"):
        hubconf.synchformer_audioset()  # a config that was not downloaded here: fetched again
    (exp_dir / f"{yaml.name}.md5").write_text(md5sum(yaml))  # as a download leaves it
    with pytest.raises(DownloadError, match=f"^{ckpt} does not match its md5 .*: delete it"):
        hubconf.synchformer_audioset()  # not the published checkpoint
    monkeypatch.setitem(PUBLISHED_MODELS[exp], "md5", md5sum(ckpt)[:7])  # pretend it is
    assert isinstance(hubconf.synchformer_audioset(), Synchformer)
    OmegaConf.save(hostile(cfg, "model", f"touch {root / 'ran'}"), yaml)
    with pytest.raises(DownloadError, match=f"^{yaml} does not match its md5"):
        hubconf.synchformer_audioset()  # changed after it was downloaded
    (exp_dir / f"{yaml.name}.md5").write_text(md5sum(yaml))  # planted together with its record
    with pytest.raises(ConfigError, match=f"{yaml} names 'os.system'"):
        hubconf.synchformer_audioset()
    assert not (root / "ran").exists()
