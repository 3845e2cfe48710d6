"""A trained Synchformer in the Hugging Face Hub layout: `config.json`, `model.safetensors` and a model card
(`README.md`), which `Synchformer.from_pretrained`, `load_model` and every command's `--exp_name` read.

    python scripts/convert_to_hf.py 24-01-04T16-39-21 --out hf/synchformer-audioset   # a published experiment
    python scripts/convert_to_hf.py logs/sync_models/<run> --out hf/my-model           # one of our training runs
    python scripts/convert_to_hf.py synchformer_state_dict.pth --cfg_path configs/sync.yaml --out hf/x
    hf upload <owner>/<name> hf/synchformer-audioset                                    # then, to publish it

The weights are stored as they are (float32): the converted model's outputs are the checkpoint's."""

import argparse
from pathlib import Path
from string import Template

from model.pretrained import load_model
from utils.cli import run_cli
from utils.config import cfg_get
from utils.download import PUBLISHED_MODELS
from utils.utils import atomic_path

# What the original's README publishes for its checkpoints: test data, metric, result
PUBLISHED_RESULTS = {
    "23-12-23T18-33-57": ("LRS3 ('Full Scene')", "Acc@1 / Acc@1 ±1 class", "86.6 / 99.6"),
    "24-01-02T10-00-53": ("VGGSound-Sparse", "Acc@1 / Acc@1 ±1 class", "43.8 / 60.2"),
    "24-01-04T16-39-21": ("VGGSound-Sparse", "Acc@1 / Acc@1 ±1 class", "47.2 / 67.4"),
    "24-01-22T20-34-52": ("VGGSound-Sparse", "synchronizability Acc / ROC AUC", "73.5 / 0.83"),
}


def model_card(name: str, repo_id: str, cfg) -> str:
    """The README.md of the converted model (scripts/model_card.md): what it is, the published results, usage,
    audio decoding, license, citation."""
    synchronizability = cfg.model.params.transformer.target.endswith("WithSyncabilityHead")
    rows = [
        f"| `{exp}`{' (this model)' if exp == name else ''} | {PUBLISHED_MODELS[exp]['what']} | {' | '.join(result)} |"
        for exp, result in PUBLISHED_RESULTS.items()
    ]
    audio = (
        "The published models were trained on audio decoded by FFmpeg 4.3 (PyAV 8.1-9.0), which dropped the 1024 "
        "priming samples at the start of AAC tracks, so their audio ran 64 ms ahead of the video. This model expects "
        "audio decoded that way (`data.audio_priming_compat: true`), as this code's decoder does on any PyAV version; "
        "a decoder that keeps the priming samples shifts its predictions by 64 ms, a third of an offset class."
        if cfg_get(cfg, "data.audio_priming_compat")
        else "This model was trained on audio decoded in exact sync (`data.audio_priming_compat: false`)."
    )
    return Template(Path(__file__).with_name("model_card.md").read_text()).substitute(
        name=name,
        repo_id=repo_id,
        task="whether a clip can be synchronised at all"
        if synchronizability
        else "the offset of the audio against the video",
        which="its row is marked" if name in PUBLISHED_RESULTS else "this model is not one of them",
        rows="\n".join(rows),
        audio=audio,
    )


def main(args) -> None:
    source, out = Path(args.source), Path(args.out)
    if source.is_file():
        model, cfg = load_model(ckpt_path=source, cfg_path=args.cfg_path, logdir=args.logdir)
    else:
        model, cfg = load_model(args.source, cfg_path=args.cfg_path, logdir=args.logdir)
    name = source.stem if source.is_file() else source.name
    with atomic_path(out / "README.md") as tmp:  # written first: save_pretrained keeps an existing card
        tmp.write_text(model_card(name, args.repo_id or f"<owner>/{out.name}", cfg))
    model.save_pretrained(out)
    print(f"Wrote {out}: config.json, model.safetensors, README.md")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="A published experiment, a training run folder or a checkpoint file")
    parser.add_argument("--out", required=True, help="The folder to write (config.json, model.safetensors, README.md)")
    parser.add_argument("--cfg_path", help="The config of a bare state dict (e.g. configs/sync.yaml)")
    parser.add_argument("--logdir", default="./logs/sync_models", help="Where published experiments are downloaded")
    parser.add_argument("--repo_id", help="The Hub id the model card's examples name (default: <owner>/<out name>)")
    return parser


if __name__ == "__main__":
    run_cli(lambda: main(get_parser().parse_args()))
