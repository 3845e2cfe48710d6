"""Synchformer feature caches: the segment features of every video in a folder, for models that condition on
them (MMAudio's generator takes the visual ones) or compare them.

    python scripts/extract_features.py VIDEO_DIR --out DIR [--audio | --audio_dir AUDIO_DIR] [--duration 8]
    torchrun --nproc-per-node N scripts/extract_features.py VIDEO_DIR --out DIR ...

The preprocessing is av-benchmark's and MMAudio's, shared with `scripts/desync.py` (`dataset/avbench.py`):
frames at 25 fps picked by FFmpeg's fps filter, 224 px bicubic on the short side, centre crop, segments of 16
frames every 8. Each video gives `visual` (S, 8, 768) of its first `--duration` seconds (S = 24 for 8 s; 0: the
whole video); with `--audio` (the video's own track) or `--audio_dir` (`AUDIO_DIR/<video stem>.*`) also
`audio` (S, 6, 768) of 0.64 s log-mel segments every 0.32 s. Features are stored in float32.

DIR gets safetensors shards of `--shard_size` videos and `index.json`, whose `skipped` lists the videos left
out with the reasons (format: `utils/feature_cache.py`; read it with `FeatureCache(DIR)[name]`). With several
processes (torchrun on one or several nodes) every rank decodes and runs its share of the videos and sends the
features to rank 0, which alone writes: the whole cache is in DIR on rank 0's machine, no shared file system
needed. An interrupted run resumes from `DIR/progress.jsonl`; one with another model, precision, duration or
audio into the same DIR is refused."""

import argparse
import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm

from dataset.avbench import SEGMENT_FRAMES, SIZE, STEP_FRAMES, DesyncInputs, normalise_frames, segments
from model.pretrained import load_feature_extractor
from scripts.common import (
    VIDEO_SUFFIXES,
    add_model_args,
    find_pairs,
    load_model_from_args,
    model_provenance,
    results_log_on_rank0,
)
from utils import dist
from utils.cli import UserError, number, report_skipped, run_cli
from utils.feature_cache import LOG, ShardWriter, write_index
from utils.precision import autocast
from utils.resumable import output_folder
from utils.utils import reuse_freed_memory


class BatchExtractor:
    """Decoded videos (items of `DesyncInputs`) -> ([(name, {stream: (S, t, D) float32})], [(name, reason)]);
    the segments of all the videos go through the extractors `batch_segments` at a time."""

    def __init__(self, model, precision: str, audio: bool, batch_segments: int):
        shape = tuple(model.vfeat_extractor.segment_shape)
        if shape != (3, SEGMENT_FRAMES, SIZE, SIZE):
            raise UserError(f"the model takes (C, T, H, W) {shape} segments, not av-benchmark's 16-frame 224 px ones")
        self.model, self.precision, self.audio, self.batch_segments = model, precision, audio, batch_segments
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def run(self, extract, videos: list[torch.Tensor], prepare=lambda x: x) -> list[torch.Tensor]:
        """`extract` on the segments of each video (S_i, ...) -> its features (S_i, t, D) on the CPU."""
        flat = torch.cat(videos)  # (sum S_i, ...)
        out = []
        for chunk in flat.split(self.batch_segments):
            with autocast(self.precision, self.device):
                out.append(extract(prepare(chunk.to(self.device))[None])[0].float().cpu())  # (n, t, D)
        # clones: a view would carry (and pickle, when gathered) the whole batch's storage
        return [f.clone() for f in torch.cat(out).split([len(v) for v in videos])]

    def __call__(self, items: list[dict]) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
        ok = [it for it in items if "skip" not in it]
        skipped = [(it["name"], it["skip"]) for it in items if "skip" in it]
        if not ok:
            return [], skipped
        vis = [segments(it["frames"], SEGMENT_FRAMES, STEP_FRAMES) for it in ok]  # (S, 16, 3, 224, 224) uint8 each
        streams = {"visual": self.run(self.model.extract_vfeats, vis, normalise_frames)}
        if self.audio:
            streams["audio"] = self.run(self.model.extract_afeats, [it["audio"] for it in ok])  # of (S, 1, 128, 66)
        return [(it["name"], {k: f[i] for k, f in streams.items()}) for i, it in enumerate(ok)], skipped


def main(args) -> int:
    reuse_freed_memory()
    device = args.device or ("cpu" if args.precision == "int8" else None)
    env = dist.init_distributed(device=device, timeout_min=args.dist_timeout_min)
    args.device = str(env.device)
    audio_dir = Path(args.audio_dir) if args.audio_dir else None
    pairs, unpaired = find_pairs(Path(args.video_dir), audio_dir)
    if not pairs and not unpaired:
        raise UserError(f"{args.video_dir}: no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) to extract")
    audio = args.audio or audio_dir is not None
    # the extractors alone (and the audio one only when asked for): no synchronisation head is built
    model = load_model_from_args(args, loader=load_feature_extractor, audio=audio)
    extractor = BatchExtractor(model, args.precision, audio, args.batch_segments)
    # rank 0 alone reads and writes the output, so that no shared file system is needed; the others learn
    # from it what is done (or why the run cannot go on)
    audio_source = str(audio_dir.resolve()) if audio_dir else ("the videos' own" if audio else None)

    def provenance() -> dict:  # on rank 0 only: it hashes the checkpoint
        return {**model_provenance(args), "duration_sec": args.duration, "audio": audio_source}

    log, done = results_log_on_rank0(env.is_main, lambda: output_folder(args.out, "--out") / LOG, provenance)
    todo = [p for p in pairs if p.name not in done]
    if done:
        logging.info(f"Resuming: {len(done)} videos already in {args.out}, {len(todo)} to go")
    inputs = DesyncInputs(todo[env.rank :: env.world_size], args.duration, audio)
    loader = torch.utils.data.DataLoader(inputs, args.batch_size, num_workers=args.num_workers, collate_fn=list)
    batches = map(extractor, loader)
    writer = ShardWriter(Path(args.out), log, args.shard_size) if env.is_main else None
    with tqdm(total=len(todo), desc="Features", unit="video", disable=not env.is_main) as bar:
        # every rank takes part in every round (with nothing once its share is done); rank 0 writes them all
        for _ in range(math.ceil(len(todo) / (env.world_size * args.batch_size))):
            for features, skipped in dist.all_gather_objects(next(batches, ([], []))):
                bar.update(len(features) + len(skipped))
                for name, f in features if env.is_main else []:
                    writer.add(name, f)
                for name, reason in skipped if env.is_main else []:
                    logging.warning(f"Skipping {name}: {reason}")
                    log.append(name, {"skip": reason})
    code = 0
    if env.is_main:
        writer.flush()
        videos, skipped = write_index(Path(args.out), log, unpaired)
        print(f"Features of {len(videos)} videos in {args.out} ({len(skipped)} skipped)")
        code = report_skipped(sorted(skipped.items()), len(videos), "extracted")
    dist.cleanup()
    return code


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video_dir", help="A folder of videos")
    parser.add_argument("--out", required=True, help="The cache folder (shards, index.json)")
    parser.add_argument("--audio", action="store_true", help="Also audio features, of each video's own track")
    parser.add_argument("--audio_dir", help="Also audio features, of the audio files named like the videos here")
    parser.add_argument(
        "--duration", type=number(float, 0), default=8.0, help="Seconds of each video (0: the whole video)"
    )
    parser.add_argument("--batch_size", type=number(int, 1), default=8, help="Videos each process decodes per round")
    parser.add_argument("--batch_segments", type=number(int, 1), default=48, help="Segments per feature-extractor call")
    parser.add_argument("--shard_size", type=number(int, 1), default=256, help="Videos per safetensors shard")
    parser.add_argument("--num_workers", type=number(int, 0), default=2, help="Decoding processes")
    parser.add_argument(
        "--dist_timeout_min", type=number(float, 0, above=True), default=10, help="How long ranks wait for each other"
    )
    add_model_args(parser, default_exp="24-01-04T16-39-21")
    return parser


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_cli(lambda: main(get_parser().parse_args()))
