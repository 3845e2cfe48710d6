"""The whole stage-2 model on tiny extractors: shapes, gradients, frozen extractors, checkpoint loading."""

import pytest
import torch
from omegaconf import OmegaConf

from model.sync_model import Synchformer, load_synchformer
from tests.reference_data import REPO
from tests.tiny import AUD_SEGMENT, TA, TINY_EXTRACTORS, TV, VIS_SEGMENT, D
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.utils import instantiate_from_config


def tiny_cfg(config: str = "sync.yaml", n_segments: int = 2):
    """The config's model at tiny sizes: only sizes change, the structure stays."""
    cfg = OmegaConf.load(REPO / "configs" / config)
    p = cfg.model.params
    for name, sizes in TINY_EXTRACTORS.items():
        p[name].params.update(sizes)
    p.vproj.params.in_features = p.aproj.params.in_features = D
    p.transformer.params.update(n_layer=2, n_head=2, n_embd=D)
    p.transformer.params.pos_emb_cfg.params.block_shape = [1 + n_segments * TV + 1 + n_segments * TA]
    return cfg


def tiny_model(config: str = "sync.yaml", n_segments: int = 2, **trainable) -> Synchformer:
    cfg = tiny_cfg(config, n_segments)
    for name, is_trainable in trainable.items():
        cfg.model.params[name].is_trainable = is_trainable
    torch.manual_seed(0)
    return instantiate_from_config(cfg.model)


def inputs(B: int = 2, S: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, S, *VIS_SEGMENT, generator=g), torch.randn(B, S, *AUD_SEGMENT, generator=g)


@pytest.mark.parametrize("config, n_classes", [("sync.yaml", 21), ("ft_synchability.yaml", 2)])
def test_forward_shapes_loss_and_frozen_extractors(config, n_classes):
    model = tiny_model(config)
    vis, aud = inputs()
    vfeat, afeat = model.extract_features(vis, aud)
    assert vfeat.shape == (2, 2, TV, D) and afeat.shape == (2, 2, TA, D)
    assert model(vis, aud)[0] is None
    loss, logits = model(vis, aud, targets=torch.tensor([0, n_classes - 1]))
    assert logits.shape == (2, n_classes) and torch.isfinite(logits).all() and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("vfeat_extractor.", "afeat_extractor.")):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # frozen extractors stay in eval mode (dropout, drop-path off) while the rest trains
    model.train()
    assert model.transformer.training and not model.vfeat_extractor.training and not model.afeat_extractor.training
    assert not any(m.training for m in model.vfeat_extractor.modules())


def test_wrong_input_layout_or_segment_count_is_explained():
    model = tiny_model(n_segments=2)
    vis, aud = inputs(S=2)
    with pytest.raises(ValueError, match=r"aud \(B, S, 1, F, Ta\)"):
        model(vis, aud.squeeze(2))
    vis, aud = inputs(S=3)
    with pytest.raises(ValueError, match="block_shape"):
        model(vis, aud)


def test_trainable_extractors_get_gradients():
    model = tiny_model(vfeat_extractor=True, afeat_extractor=True).train()
    vis, aud = inputs()
    model(vis, aud, targets=torch.tensor([1, 2]))[0].backward()
    assert model.vfeat_extractor.training and model.afeat_extractor.training
    assert model.vfeat_extractor.patch_embed_3d.proj.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.afeat_extractor.parameters())


def test_for_loop_over_segments_gives_the_same_logits():
    model = tiny_model().eval()
    vis, aud = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(vis, aud, for_loop=True)[1], model(vis, aud)[1], atol=1e-5, rtol=1e-5)


def test_standardized_features_ignore_each_channels_offset_and_scale():
    """With `standardize_features` the head sees each clip's features relative to their own mean and spread
    per channel, so a per-clip, per-channel affine change of the features leaves the logits as they are."""
    torch.manual_seed(0)
    vfeat, afeat = torch.randn(2, 2, TV, D), torch.randn(2, 2, TA, D)
    scale, shift = torch.rand(2, 1, 1, D) + 0.5, 3 * torch.randn(2, 1, 1, D)
    plain = tiny_model().eval()
    cfg = tiny_cfg()
    cfg.model.params.standardize_features = True
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model).eval()
    model.load_state_dict(plain.state_dict())  # no new weights
    with torch.no_grad():
        logits = model.forward_head(vfeat, afeat)
        moved = model.forward_head(vfeat * scale + shift, afeat * scale - shift)
        torch.testing.assert_close(moved, logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain.forward_head(vfeat * scale + shift, afeat), plain.forward_head(vfeat, afeat))


def test_longer_position_embedding_is_trimmed_shorter_rejected():
    three, two = tiny_model(n_segments=3), tiny_model(n_segments=2)
    two.load_state_dict(three.state_dict())
    n = two.transformer.pos_emb_cfg.pos_emb.shape[1]
    torch.testing.assert_close(two.transformer.pos_emb_cfg.pos_emb, three.transformer.pos_emb_cfg.pos_emb[:, :n])
    with pytest.raises(ValueError, match="fewer segments"):
        three.load_state_dict(two.state_dict())


def test_load_published_format_checkpoint(tmp_path):
    model = tiny_model().eval()
    path = tmp_path / "sync.pt"
    save_checkpoint({"model": model.state_dict(), "args": tiny_cfg(), "epoch": 3}, path)
    loaded, cfg = load_synchformer(path)
    assert not loaded.training and cfg.model.params.transformer.params.n_embd == D
    vis, aud = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(vis, aud)[1], model(vis, aud)[1], atol=0, rtol=0)


def test_load_bare_state_dict_with_ddp_prefix(tmp_path):
    model = tiny_model()
    path = tmp_path / "bare.pt"
    save_checkpoint({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="without the config"):
        load_synchformer(path)
    cfg_path = tmp_path / "cfg.yaml"
    OmegaConf.save(tiny_cfg(), cfg_path)
    loaded, _ = load_synchformer(path, cfg=cfg_path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)


def test_load_errors_are_clear(tmp_path):
    model = tiny_model()
    path = tmp_path / "sync.pt"
    save_checkpoint({"model": model.state_dict(), "args": tiny_cfg()}, path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_synchformer(truncated)
    deeper = tiny_cfg()
    deeper.model.params.transformer.params.n_layer = 3
    with pytest.raises(CheckpointError, match=r"do not fit .*16 missing .*transformer\.blocks\.2"):
        load_synchformer(path, cfg=deeper)
    fewer_classes = tiny_cfg()
    fewer_classes.data.num_off_cls = 5
    with pytest.raises(CheckpointError, match=r"size mismatch for transformer\.off_head\.weight"):
        load_synchformer(path, cfg=fewer_classes)


def test_old_transformer_target_name_is_patched(tmp_path):
    model = tiny_model()
    cfg = tiny_cfg()
    cfg.model.params.transformer.target = "model.modules.feature_selector.GlobalTransformer"
    path = tmp_path / "old.pt"
    save_checkpoint({"model": model.state_dict(), "args": cfg}, path)
    loaded, cfg = load_synchformer(path)
    assert cfg.model.params.transformer.target == "model.sync_model.GlobalTransformer"
