"""torch.hub entry points for the published Synchformer models, and for any other by name.

    model = torch.hub.load(".", "synchformer_audioset", source="local")  # eval mode, weights md5-verified
    model = torch.hub.load(".", "synchformer", "path/to/hf_folder", source="local")  # the Hugging Face Hub layout
    vfeat = torch.hub.load(".", "synchformer_features", source="local")(vis)  # (B, S, 16, 3, 224, 224) -> (B, S, 8, D)

(`"."`: a clone of this repository; from GitHub, its `owner/name` without `source`.)

Each but the last returns a `model.sync_model.Synchformer`; its config is at `model.cfg`. Published weights
are downloaded once into `<torch.hub.get_dir()>/synchformer/<experiment>/`, Hub models into the Hub's cache.
`precision` (fp32, bf16, fp16, int8, auto) is decided at `model.precision`: int8 returns the int8 CPU model;
bf16/fp16 store the Linear weights in that dtype (the pooling layers' stay float32), so run the model under
`torch.autocast(device_type, dtype=torch.bfloat16)` (or float16); the feature extractors enter it themselves."""

from pathlib import Path

import torch

dependencies = ["torch", "torchvision", "torchaudio", "omegaconf", "einops", "av", "transformers", "huggingface_hub"]


def synchformer(model_id: str, device: str = "cpu", precision: str = "fp32"):
    """A Synchformer by name: a published experiment id, a Hugging Face Hub model id (`owner/name`) or a folder of
    `save_pretrained` / scripts/convert_to_hf.py."""
    return _published(model_id, device, precision)


def synchformer_features(model_id: str = "24-01-04T16-39-21", audio: bool = False, device="cpu", precision="fp32"):
    """The segment feature extractors alone (`model.feature_extractor.SegmentFeatures`), by default the AudioSet
    model's, whose video features MMAudio conditions on; `audio=True` adds `extract_afeats`."""
    from model.pretrained import load_feature_extractor

    logdir = Path(torch.hub.get_dir()) / "synchformer"
    return load_feature_extractor(model_id, device=device, logdir=logdir, precision=precision, audio=audio)


def _published(exp_name: str, device: str, precision: str):
    from model.pretrained import load_model
    from utils.precision import resolve_precision

    precision = resolve_precision(precision, device)
    logdir = Path(torch.hub.get_dir()) / "synchformer"
    model, _ = load_model(exp_name, device=device, logdir=logdir, precision=precision)
    model.precision = precision
    return model.eval()


def synchformer_lrs3(device: str = "cpu", precision: str = "fp32"):
    """Stage 2 trained on LRS3 ('Full Scene'): 86.6 / 99.6 Acc@1 / ±1 class on LRS3."""
    return _published("23-12-23T18-33-57", device, precision)


def synchformer_vggsound(device: str = "cpu", precision: str = "fp32"):
    """Stage 2 trained on VGGSound: 43.8 / 60.2 on VGGSound-Sparse."""
    return _published("24-01-02T10-00-53", device, precision)


def synchformer_audioset(device: str = "cpu", precision: str = "fp32"):
    """Stage 2 trained on AudioSet: 47.2 / 67.4 on VGGSound-Sparse; the model behind DeSync."""
    return _published("24-01-04T16-39-21", device, precision)


def synchformer_synchronizability(device: str = "cpu", precision: str = "fp32"):
    """Synchronizability (2 classes, 1 = can be synchronised), AudioSet: Acc 73.5, ROC AUC 0.83."""
    return _published("24-01-22T20-34-52", device, precision)
