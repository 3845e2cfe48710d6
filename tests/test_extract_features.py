"""Feature caches (scripts/extract_features.py, utils/feature_cache.py): the model's own features of
av-benchmark's preprocessing, in shards that load by memory mapping, resumable, over several processes."""

import json
import multiprocessing as mp
import os
import socket
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dataset.avbench import SEGMENT_FRAMES, STEP_FRAMES, AudioSegments, normalise_frames, segments, video_frames
from dataset.synthetic import ClipSpec, make_clip
from model.sync_model import load_synchformer
from scripts import extract_features
from tests.reference_data import REPO
from utils.checkpoint import save_checkpoint
from utils.cli import UserError
from utils.config import untrained_config
from utils.feature_cache import INDEX, FeatureCache
from utils.utils import instantiate_from_config


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """configs/sync.yaml with 1-layer, 32-wide extractors at the published input sizes (224 px, 16 frames)."""
    cfg = untrained_config(REPO / "configs" / "sync.yaml", tiny=True, tiny_inputs=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint({"model": instantiate_from_config(cfg.model).state_dict(), "args": cfg, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three generated clips with their audio (1.5 s, 2.2 s, 1.5 s) and one file that does not decode."""
    folder = tmp_path_factory.mktemp("videos")
    for name, seconds in (("a", 1.5), ("b", 2.2), ("c", 1.5)):
        make_clip(folder / f"{name}.mp4", ClipSpec(duration_sec=seconds, height=120, width=160, seed=len(name)))
    (folder / "broken.mp4").write_bytes(os.urandom(2048))
    return folder


def extract(videos, out, ckpt, *argv) -> int:
    argv = [videos, "--out", out, "--ckpt_path", ckpt, "--device", "cpu", "--num_workers", "0", *argv]
    return extract_features.main(extract_features.get_parser().parse_args([str(a) for a in argv]))


@torch.inference_mode()
def test_features_are_the_models_own_in_shards_that_load_memory_mapped(tiny_ckpt, videos, tmp_path):
    out = tmp_path / "cache"
    # 2 videos a shard, 3 segments a model call: calls and shards span videos
    argv = ["--audio", "--duration", "1", "--shard_size", "2", "--batch_segments", "3", "--batch_size", "2"]
    assert extract(videos, out, tiny_ckpt, *argv) == 0
    cache = FeatureCache(out)
    assert sorted(cache) == ["a.mp4", "b.mp4", "c.mp4"]
    assert list(cache.skipped) == ["broken.mp4"] and "cannot" in cache.skipped["broken.mp4"]
    model, _ = load_synchformer(tiny_ckpt)
    for name in cache:
        vis = segments(normalise_frames(video_frames(videos / name, 1.0)), SEGMENT_FRAMES, STEP_FRAMES)
        aud = AudioSegments(1.0)(videos / name)  # (2, 1, 128, 66)
        features = cache[name]
        torch.testing.assert_close(features["visual"], model.extract_vfeats(vis[None])[0])  # (2, 8, 32)
        torch.testing.assert_close(features["audio"], model.extract_afeats(aud[None])[0])  # (2, 6, 32)
    # whole shards load too, and the rows of the index are each video's
    shards = sorted(out.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    first = load_file(shards[0])
    assert first["visual"].shape == (4, 8, 32) and first["audio"].shape == (4, 6, 32)
    torch.testing.assert_close(first["visual"][2:4], cache["b.mp4"]["visual"], rtol=0, atol=0)
    with safe_open(shards[1], framework="pt") as f:
        assert json.loads(f.metadata()["provenance"]) == cache.provenance


def test_whole_videos_visual_only(tiny_ckpt, videos, tmp_path):
    assert extract(videos, tmp_path / "cache", tiny_ckpt, "--duration", "0") == 0
    cache = FeatureCache(tmp_path / "cache")
    # 1.5 s: 37 frames, 3 segments; 2.2 s: 55 frames, 5 segments; no audio asked for
    assert {name: tuple(f["visual"].shape) for name, f in ((n, cache[n]) for n in cache)} == {
        "a.mp4": (3, 8, 32),
        "b.mp4": (5, 8, 32),
        "c.mp4": (3, 8, 32),
    }
    assert "audio" not in cache["a.mp4"] and cache.provenance["audio"] is None


def test_resume_does_only_the_new_videos_and_refuses_other_settings(tiny_ckpt, videos, tmp_path):
    folder, out = tmp_path / "videos", tmp_path / "cache"
    folder.mkdir()
    for name in ("a.mp4", "broken.mp4"):
        (folder / name).symlink_to(videos / name)
    assert extract(folder, out, tiny_ckpt, "--duration", "1") == 0
    first = (out / "shard-00000.safetensors").read_bytes()
    (folder / "b.mp4").symlink_to(videos / "b.mp4")
    assert extract(folder, out, tiny_ckpt, "--duration", "1") == 0
    # a.mp4 is not redone: its shard stays, b.mp4 (and the retried broken.mp4) make the next one
    assert (out / "shard-00000.safetensors").read_bytes() == first
    cache = FeatureCache(out)
    assert cache.videos["b.mp4"]["shard"] == "shard-00001.safetensors" and load_file(out / "shard-00001.safetensors")[
        "visual"
    ].shape == (2, 8, 32)
    assert sorted(cache) == ["a.mp4", "b.mp4"] and list(cache.skipped) == ["broken.mp4"]
    index = (out / INDEX).read_text()
    for other in (["--duration", "2"], ["--duration", "1", "--audio"], ["--duration", "1", "--precision", "bf16"]):
        with pytest.raises(UserError, match="not with this run's settings"):
            extract(folder, out, tiny_ckpt, *other)
    assert (out / INDEX).read_text() == index


def test_a_shard_left_by_a_killed_run_is_never_overwritten(tiny_ckpt, videos, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "shard-00003.safetensors").write_bytes(b"rows that a log may point to")
    assert extract(videos, out, tiny_ckpt, "--duration", "1") == 0
    assert (out / "shard-00003.safetensors").read_bytes() == b"rows that a log may point to"
    assert {FeatureCache(out).videos[n]["shard"] for n in ("a.mp4", "b.mp4")} == {"shard-00004.safetensors"}


def test_an_index_never_reads_outside_its_folder(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "shard-00000.safetensors").write_bytes(b"")
    entry = {"shard": "../shard-00000.safetensors", "rows": {"visual": [0, 1]}}
    (tmp_path / "cache" / INDEX).write_text(json.dumps({"provenance": {}, "videos": {"x": entry}, "skipped": {}}))
    with pytest.raises(UserError, match="is missing"):
        FeatureCache(tmp_path / "cache")["x"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, port: int, cwd, argv: list[str]) -> None:
    """A forked process of a two-process run: its own working directory and the variables torchrun sets."""
    os.chdir(cwd)
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.exit(extract_features.main(extract_features.get_parser().parse_args(argv)))


def test_two_processes_on_two_machines_leave_the_whole_cache_on_rank_0(tiny_ckpt, videos, tmp_path):
    """Two gloo processes in their own working directories (as two nodes without a shared file system)."""
    argv = [str(videos), "--out", "cache", "--ckpt_path", str(tiny_ckpt), "--device", "cpu", "--num_workers", "0"]
    argv += ["--duration", "1", "--batch_size", "1"]
    port, procs = free_port(), []
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        # forked, so that the processes need not import torch again
        procs.append(mp.get_context("fork").Process(target=run_rank, args=(rank, port, tmp_path / f"node{rank}", argv)))
        procs[-1].start()
    for p in procs:
        p.join(timeout=120)
        p.kill()  # a process still waiting for the other, when that one failed
    assert [p.exitcode for p in procs] == [0, 0]
    cache = FeatureCache(tmp_path / "node0" / "cache")
    assert sorted(cache) == ["a.mp4", "b.mp4", "c.mp4"] and list(cache.skipped) == ["broken.mp4"]
    assert all(cache[n]["visual"].shape == (2, 8, 32) for n in cache)
    assert not (tmp_path / "node1" / "cache").exists()
