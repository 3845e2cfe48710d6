"""Correct on GPUs, shown without one: the memory options (gradient checkpointing, the per-segment loop) change
no output or gradient; every published model runs forward and backward on the meta device without a tensor
elsewhere; the model and the DeSync scorer run on fake CUDA tensors in fp32, bf16 and fp16."""

import json
import os
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scripts import gpu_check
from scripts.desync import AVBenchScorer
from tests.reference_data import REPO
from tests.tiny import AUD_SEGMENT, TINY_EXTRACTORS, VIS_SEGMENT, D
from utils.config import untrained_config
from utils.precision import autocast
from utils.utils import instantiate_from_config


def tiny_avclip(**training) -> torch.nn.Module:
    """Stage 1 of configs/segment_avclip.yaml with `training` options, two blocks per extractor (the second with
    stochastic depth), 3 segments."""
    cfg = OmegaConf.load(REPO / "configs" / "segment_avclip.yaml")
    cfg.data.n_segments_train = 3
    cfg.training.update(training)
    cfg.model.params.n_embd = D
    for name, sizes in TINY_EXTRACTORS.items():
        cfg.model.params[name].params.update(sizes, ckpt_path=None)
    cfg.model.params.vfeat_extractor.params.depth = cfg.model.params.afeat_extractor.params.num_hidden_layers = 2
    torch.manual_seed(0)
    return instantiate_from_config(cfg.model)


def avclip_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    Tv, C, H, W = VIS_SEGMENT
    _, F, Ta = AUD_SEGMENT
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, C, Tv, H, W, generator=g), torch.randn(2, 3, Ta, F, generator=g)


def loss_and_grads(model: torch.nn.Module) -> tuple[dict, dict]:
    torch.manual_seed(2)  # the same dropout and stochastic depth
    out = model(*avclip_inputs())
    sum(out["losses"].values()).backward()
    outputs = {**out["losses"], "vfeat": out["rgb_features"][0], "afeat": out["audio_features"][0]}
    return outputs, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients_in_training():
    plain, checkpointed = tiny_avclip().train(), tiny_avclip(grad_checkpointing=True).train()
    assert checkpointed.v_encoder.grad_checkpointing and checkpointed.a_encoder.grad_checkpointing
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    (out, grads), (out_ck, grads_ck) = loss_and_grads(plain), loss_and_grads(checkpointed)
    assert grads.keys() == grads_ck.keys() and len(grads) > 40
    for name in out:
        assert torch.equal(out[name], out_ck[name]), name
    for name in grads:
        assert torch.equal(grads[name], grads_ck[name]), name


def test_gradient_checkpointing_keeps_fewer_activations():
    def saved_bytes(model: torch.nn.Module) -> int:
        sizes = []
        pack = lambda t: sizes.append(t.numel() * t.element_size()) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*avclip_inputs())
        return sum(sizes)

    plain, checkpointed = saved_bytes(tiny_avclip().train()), saved_bytes(tiny_avclip(grad_checkpointing=True).train())
    # the blocks keep only their inputs; the rest (patch embeddings, aggregators, loss) is unchanged
    assert checkpointed < 0.6 * plain, (checkpointed, plain)


def test_for_loop_encodes_one_segment_at_a_time_with_the_same_outputs_and_gradients():
    plain, looped = tiny_avclip().eval(), tiny_avclip(for_loop_segment_fwd=True).eval()
    batch_sizes = []  # of the first visual block: B=2 clips of S=3 segments, all at once or one segment at a time
    for model in (plain, looped):
        model.v_encoder.blocks[0].register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    # in eval mode: in training the loop draws the dropout of each segment separately
    (out, grads), (out_loop, grads_loop) = loss_and_grads(plain), loss_and_grads(looped)
    assert batch_sizes == [6, 2, 2, 2]
    for name in out:
        torch.testing.assert_close(out_loop[name], out[name], rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_loop[name], grads[name], rtol=1e-5, atol=1e-6)


class OffDeviceOps(TorchDispatchMode):
    """Records every operation whose output is a tensor on another device than `device`."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.found = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != self.device:
                self.found.append(f"{func} -> {t.device} {tuple(t.shape)}")
        return out


def meta_model(config: str, tiny: bool = False) -> torch.nn.Module:
    """The published model of `config` (random weights; `tiny`: one narrow layer per part) on the meta device,
    with gradient checkpointing on."""
    cfg = untrained_config(REPO / "configs" / config, tiny, tiny_inputs=False)
    for name in ("vfeat_extractor", "afeat_extractor"):
        cfg.model.params[name].params.grad_checkpointing = True
    with torch.device("meta"):
        return instantiate_from_config(cfg.model).train()


def meta_step(model: torch.nn.Module, S: int) -> list[str]:
    """One forward and backward of S segments on the meta device; the operations whose output left it."""
    stage1 = hasattr(model, "v_encoder")
    v, a = (model.v_encoder, model.a_encoder) if stage1 else (model.vfeat_extractor, model.afeat_extractor)
    (C, Tv, H, W), (Ta, F) = v.segment_shape, a.segment_shape
    with OffDeviceOps("meta") as watch:
        if stage1:
            out = model(torch.randn(2, S, C, Tv, H, W, device="meta"), torch.randn(2, S, Ta, F, device="meta"))
            loss = sum(out["losses"].values())
        else:
            vis, aud = torch.randn(2, S, Tv, C, H, W, device="meta"), torch.randn(2, S, 1, F, Ta, device="meta")
            loss, _ = model(vis, aud, torch.zeros(2, dtype=torch.long, device="meta"))
        loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.device.type == "meta" for p in trainable)
    return watch.found


@pytest.mark.parametrize("config, S", [("sync.yaml", 14), ("ft_synchability.yaml", 13), ("segment_avclip.yaml", 2)])
def test_published_models_train_on_the_meta_device_only(config, S):
    assert meta_step(meta_model(config), S) == []


def test_a_tensor_made_on_the_cpu_in_forward_is_caught():
    # made on the CPU and copied over: no error anywhere, on a GPU a copy at every call
    model = meta_model("sync.yaml", tiny=True)
    model.transformer.register_forward_hook(lambda m, i, out: out + torch.zeros(out.shape[-1]).to(out.device))
    assert [op for op in meta_step(model, 14) if "cpu" in op] == ["aten.zeros.default -> cpu (21,)"]


@pytest.fixture
def fake_cuda():
    """Fake CUDA tensors (shapes, dtypes and devices, no data) on this machine without a GPU; torch.autocast
    asks whether CUDA and bf16 are there before it turns on."""
    with (
        FakeTensorMode(allow_non_fake_inputs=True),  # before the patches: it would take CUDA for real
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ):
        yield


@pytest.fixture
def stage2_on_meta() -> torch.nn.Module:
    """configs/sync.yaml at the published input sizes with one narrow layer per part (fake tensors cost per op)."""
    cfg = untrained_config(REPO / "configs" / "sync.yaml", tiny=True, tiny_inputs=False)
    with torch.device("meta"):
        return instantiate_from_config(cfg.model).eval()


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.half)])
def test_model_and_desync_scorer_on_fake_cuda(stage2_on_meta, fake_cuda, precision, dtype):
    model = stage2_on_meta.to_empty(device="cuda")
    (C, Tv, H, W), (Ta, F) = model.vfeat_extractor.segment_shape, model.afeat_extractor.segment_shape
    vis, aud = torch.randn(2, 14, Tv, C, H, W, device="cuda"), torch.randn(2, 14, 1, F, Ta, device="cuda")
    with torch.inference_mode(), autocast(precision, "cuda"):
        _, logits = model(vis, aud)
    assert (logits.device, logits.dtype, logits.shape) == (torch.device("cuda", 0), dtype, (2, 21))
    # av-benchmark's protocol: 8 s of uint8 frames and 24 spectrogram segments from the CPU (the loader's)
    scorer = AVBenchScorer(model, precision, duration_sec=8.0, batch_size=2, num_workers=0)
    frames = torch.zeros(2, 200, 3, H, W, dtype=torch.uint8)
    scored = scorer.logits(frames, torch.zeros(2, 24, 1, F, Ta))
    assert (scored.device, scored.dtype, scored.shape) == (torch.device("cuda", 0), torch.float32, (2, 2, 21))


CHECKS = ["environment", "train_fp32", "train_bf16", "train_fp16", "grad_checkpointing", "parity", "resume",
          "collectives", "desync", "bench_precision"]  # fmt: skip
FAST_DRY_RUN = ["--skip", "resume", "desync", "bench_precision"]  # their commands' CPU runs have tests of their own


@pytest.mark.parametrize(
    "skip",
    [
        FAST_DRY_RUN,
        pytest.param([], marks=pytest.mark.skipif(not os.environ.get("SYNCHFORMER_LONG_TESTS"), reason="minutes")),
    ],
)
def test_gpu_check_dry_run_on_the_cpu(tmp_path, capsys, skip):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), *skip]) == 0
    results = json.loads(out.read_text())
    ran = set(CHECKS) - set(skip[1:])
    assert set(results) == ran and all(results[name]["ok"] for name in ran - {"parity"})
    assert results["parity"]["ok"] is None and "--reference" in results["parity"]["skipped"]
    assert results["environment"]["torch"] == torch.__version__
    assert results["train_fp16"]["size"] == "tiny" and results["collectives"]["backend"] == "gloo"
    grad_ck = results["grad_checkpointing"]
    assert grad_ck["on"]["loss"] == pytest.approx(grad_ck["off"]["loss"], rel=1e-6)
    if "resume" in ran:
        assert results["resume"]["killed_after_epoch"] == 0 and results["resume"]["max_abs_weight_diff"] <= 1e-6
        assert results["desync"]["max_prob_diff"] == 0.0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"gpu_check on cpu: {len(ran)} of {len(ran)} checks")


def test_gpu_check_records_a_failing_check_and_runs_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "collectives", lambda device: 1 / 0)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), *FAST_DRY_RUN, "train_fp32"]) == 1
    results = json.loads(out.read_text())
    assert results["collectives"]["ok"] is False and "ZeroDivisionError" in results["collectives"]["error"]
    assert results["grad_checkpointing"]["ok"] and results["train_bf16"]["ok"]
