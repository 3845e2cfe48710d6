"""The feature extractors alone (model.feature_extractor.SegmentFeatures via model.pretrained.load_feature_extractor):
the full model's features from every source, strict loading of only the extractors' weights, chunks,
torch.compile, and the features of MMAudio's own code (tests/fixtures/mmaudio_features.*, see its "what")."""

import hashlib
import inspect
import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import hubconf
from dataset.avbench import AudioSegments, normalise_frames, segments, video_frames, window_slices
from dataset.io import decode_video_at_fps
from dataset.synthetic import ClipSpec, make_clip
from model.feature_extractor import SegmentFeatures
from model.modules.feat_extractors.visual.motionformer import MotionFormer
from model.pretrained import PUBLISHED_EXTRACTORS, load_feature_extractor, load_model
from tests.reference_data import REPO
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.config import load_config, untrained_config
from utils.detfill import det_state_dict
from utils.utils import get_obj_from_str, instantiate_from_config

FIXTURE = REPO / "tests" / "fixtures" / "mmaudio_features"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model (configs/tiny/sync.yaml: 32 px frames, 8 visual and 6 audio tokens per segment) saved in the
    published format, and inputs of 14 segments."""
    cfg = load_config([f"config={REPO / 'configs' / 'tiny' / 'sync.yaml'}"])
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "args": cfg}, path)
    vis, aud = torch.randn(2, 14, 16, 3, 32, 32), torch.randn(2, 14, 1, 32, 66)
    with torch.inference_mode():
        return path, vis, aud, model.extract_vfeats(vis), model.extract_afeats(aud)


def test_the_full_models_features_from_every_source(tiny, tmp_path):
    path, vis, aud, vfeat, afeat = tiny
    ckpt = load_checkpoint(path)
    torch.save(ckpt["model"], tmp_path / "synchformer_state_dict.pth")  # MMAudio's file: the bare state dict
    OmegaConf.save(ckpt["args"], tmp_path / "tiny.yaml")
    load_model(ckpt_path=path)[0].save_pretrained(tmp_path / "hf")
    sources = [
        dict(ckpt_path=path),
        dict(ckpt_path=tmp_path / "synchformer_state_dict.pth", cfg_path=tmp_path / "tiny.yaml"),
        dict(exp_name=tmp_path / "hf"),
    ]
    for source in sources:
        visual = load_feature_extractor(**source)
        assert {k.split(".")[0] for k in visual.state_dict()} == {"vfeat_extractor"}
        assert not visual.training and not any(p.requires_grad for p in visual.parameters())
        both = load_feature_extractor(**source, audio=True, chunk_segments=5)  # 28 segments in chunks of 5
        with torch.inference_mode():
            assert visual(vis).shape == (2, 14, 8, 32)
            torch.testing.assert_close(visual(vis), vfeat, rtol=0, atol=1e-6)
            torch.testing.assert_close(both.extract_vfeats(vis), vfeat, rtol=0, atol=1e-6)
            torch.testing.assert_close(both.extract_afeats(aud), afeat, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="audio=True"):
        visual.extract_afeats(aud)
    with torch.inference_mode():  # the torch.hub entry point
        torch.testing.assert_close(hubconf.synchformer_features(str(tmp_path / "hf"))(vis), vfeat, rtol=0, atol=1e-6)


def test_only_the_extractors_weights_are_read_and_all_of_them(tiny, tmp_path):
    path, vis, *_ = tiny
    ckpt = load_checkpoint(path)
    visual_only = {k: v for k, v in ckpt["model"].items() if k.startswith("vfeat_extractor.")}
    save_checkpoint({"model": visual_only, "args": ckpt["args"]}, tmp_path / "visual.pt")
    load_feature_extractor(ckpt_path=tmp_path / "visual.pt")  # no head, no audio extractor: enough for video
    with pytest.raises(
        CheckpointError, match=r"visual\.pt do not fit .*SegmentFeatures\): \d+ missing .*afeat_extractor"
    ):
        load_feature_extractor(ckpt_path=tmp_path / "visual.pt", audio=True)
    incomplete = dict(visual_only)
    del incomplete["vfeat_extractor.norm.weight"]
    save_checkpoint({"model": incomplete, "args": ckpt["args"]}, tmp_path / "incomplete.pt")
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. \['vfeat_extractor\.norm\.weight'\]\)"):
        load_feature_extractor(ckpt_path=tmp_path / "incomplete.pt")
    wider = ckpt["args"].copy()
    wider.model.params.vfeat_extractor.params.embed_dim = 64
    OmegaConf.save(wider, tmp_path / "wider.yaml")
    with pytest.raises(CheckpointError, match=r"size mismatch for vfeat_extractor\..*Check that the config"):
        load_feature_extractor(ckpt_path=path, cfg_path=tmp_path / "wider.yaml")


def test_without_a_config_the_published_extractors_are_built():
    """A bare state dict alone (MMAudio's synchformer_state_dict.pth) builds the extractors of configs/sync.yaml:
    their classes' defaults are the published parameters."""
    published = OmegaConf.load(REPO / "configs" / "sync.yaml").model.params
    for name, default in PUBLISHED_EXTRACTORS.items():
        assert default["target"] == published[name].target
        parameters = inspect.signature(get_obj_from_str(default["target"])).parameters
        for key, value in published[name].params.items():
            assert parameters[key].default == value, (name, key)


LONG = pytest.mark.skipif(not os.environ.get("SYNCHFORMER_LONG_TESTS"), reason="minutes: SYNCHFORMER_LONG_TESTS=1")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=LONG)])
def test_compiled_features_equal_eager(tiny, backend):
    """One graph (no breaks), chunks included; aot_eager traces as inductor does without generating kernels."""
    path, vis, _, vfeat, _ = tiny
    compiled = torch.compile(load_feature_extractor(ckpt_path=path, chunk_segments=8), backend=backend, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(vis), vfeat, rtol=1e-5, atol=1e-5)


# --- MMAudio's own numbers ---


def mmaudio_reference() -> tuple[dict, dict]:
    return json.loads(FIXTURE.with_suffix(".json").read_text()), dict(np.load(FIXTURE.with_suffix(".npz")))


@pytest.fixture(scope="module")
def mmaudio_clips(tmp_path_factory) -> dict:
    """{name: (path, (200, 3, 224, 224) frames normalised as MMAudio does)}: the fixture's clips, generated again
    and checked to decode to the frames MMAudio's features were computed on."""
    root = tmp_path_factory.mktemp("mmaudio")
    clips = {}
    for name, clip in mmaudio_reference()[0]["clips"].items():
        path = root / f"{name}.mp4"
        make_clip(path, ClipSpec(**clip["spec"]))
        frames = decode_video_at_fps(path, 25, 200)
        assert hashlib.sha256(frames.contiguous().numpy().tobytes()).hexdigest() == clip["frames_sha256"], name
        clips[name] = path, normalise_frames(video_frames(path, 8.0))
    return clips


def assert_equals_mmaudio(features: SegmentFeatures, clips: dict, variant: str, every_segment: bool = False) -> dict:
    """The features of each clip's kept segments (`every_segment`: of all 24) equal MMAudio's to 1e-5, their
    per-segment statistics to 1e-6; returns {name: (1, S, 8, 768) features}."""
    reference, arrays = mmaudio_reference()
    out = {}
    for name, (_, frames) in clips.items():
        kept = reference["kept_segments"][name]
        keep = list(range(24)) if every_segment else kept
        with torch.inference_mode():
            feats = features(segments(frames, 16, 8)[keep].unsqueeze(0))[0]  # in: (1, S, 16, 3, 224, 224)
        for segment, expected in zip(kept, arrays[f"{variant}/{name}"]):
            torch.testing.assert_close(feats[keep.index(segment)], torch.from_numpy(expected), rtol=0, atol=1e-5)
        stats = reference["variants"][variant][name]
        for key, values in {
            "segment_means": feats.double().mean((1, 2)),
            "segment_stds": feats.double().std((1, 2)),
        }.items():
            np.testing.assert_allclose(values.numpy(), np.asarray(stats[key])[keep], rtol=0, atol=1e-6)
        out[name] = feats.unsqueeze(0)
    return out


def test_features_equal_mmaudios(mmaudio_clips):
    """MotionFormer with one block (the published width and input size), deterministic weights: MMAudio's
    features of three segments of each clip (two with a flash)."""
    features = SegmentFeatures(MotionFormer(depth=1))
    features.load_state_dict(det_state_dict(features.state_dict(), seed=0))
    assert_equals_mmaudio(features.eval(), mmaudio_clips, "depth1")


@LONG
def test_features_equal_mmaudios_full_size_and_bf16_keeps_the_desync_top1(mmaudio_clips, tmp_path):
    """The published architecture from a bare state dict without a config, as MMAudio loads it: all 24 segments
    of both clips; in bf16 the DeSync head (av-benchmark's two windows) picks the same offsets."""
    cfg = untrained_config(REPO / "configs" / "sync.yaml")
    model = instantiate_from_config(cfg.model).eval()
    model.load_state_dict(det_state_dict(model.state_dict(), seed=0))
    torch.save(model.state_dict(), tmp_path / "synchformer_state_dict.pth")
    features = load_feature_extractor(ckpt_path=tmp_path / "synchformer_state_dict.pth", chunk_segments=8)
    fp32 = assert_equals_mmaudio(features, mmaudio_clips, "full", every_segment=True)
    bf16 = load_feature_extractor(ckpt_path=tmp_path / "synchformer_state_dict.pth", precision="bf16")
    for name, (path, frames) in mmaudio_clips.items():
        with torch.inference_mode():
            afeat = model.extract_afeats(AudioSegments(8.0)(path).unsqueeze(0))  # (1, 24, 6, 768)
            vfeat_bf16 = bf16(segments(frames, 16, 8).unsqueeze(0))
            for w in window_slices(24):
                expected = model.compare_v_a(fp32[name][:, w], afeat[:, w]).argmax(-1)
                assert torch.equal(model.compare_v_a(vfeat_bf16[:, w].float(), afeat[:, w]).argmax(-1), expected)
