"""DeSync (scripts/desync.py): av-benchmark's numbers, the folder run's bookkeeping, and the model API
that av-benchmark and MMAudio call."""

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from dataset.avbench import AudioSegments, normalise_frames, video_frames
from dataset.io import decode_video_at_fps
from dataset.synthetic import ClipSpec, make_clip
from scripts import desync
from tests.reference_data import REFERENCE, REPO
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import untrained_config
from utils.detfill import det_state_dict
from utils.utils import instantiate_from_config

FIXTURES = REPO / "tests" / "fixtures" / "desync"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """configs/sync.yaml with 1-layer, 32-wide extractors at the published input sizes (224 px, 16 frames)."""
    cfg = untrained_config(REPO / "configs" / "sync.yaml", tiny=True, tiny_inputs=False)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "args": cfg, "epoch": 0}, path)
    return path


def write_wav(path, samples, sample_rate: int = 16000) -> None:
    """A float32 mono WAV file of `samples` (Ta,)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_f32le", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.asarray(samples, dtype=np.float32)[None], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three 8.5 s generated videos without audio and their audio files, plus the cases av-benchmark
    drops: an audio file of 5 s, a video that does not decode and a video without an audio file."""
    root = tmp_path_factory.mktemp("desync")
    videos, audio = root / "videos", root / "audio"
    videos.mkdir(), audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        make_clip(videos / f"v{i}.mp4", ClipSpec(duration_sec=8.5, seed=20 + i))
        write_wav(audio / f"v{i}.wav", rng.standard_normal(int(8.5 * 16000)) * 0.1)
    make_clip(videos / "short_audio.mp4", ClipSpec(duration_sec=8.5, seed=30))
    write_wav(audio / "short_audio.wav", rng.standard_normal(5 * 16000) * 0.1)
    (videos / "broken.mp4").write_bytes(os.urandom(4096))
    write_wav(audio / "broken.wav", rng.standard_normal(9 * 16000) * 0.1)
    make_clip(videos / "no_audio_file.mp4", ClipSpec(duration_sec=8.5, seed=31))
    return videos, audio


def run_desync(*argv) -> int:
    return desync.main(desync.get_parser().parse_args([str(a) for a in argv]))


def test_folder_run_lists_what_it_cannot_score_and_never_substitutes(tiny_ckpt, folder, tmp_path, capsys):
    videos, audio = folder
    out = tmp_path / "r.json"
    assert run_desync(videos, "--audio_dir", audio, "--ckpt_path", tiny_ckpt, "--out", out, "--device", "cpu") == 0
    result = json.loads(out.read_text())
    assert [v["video"] for v in result["videos"]] == ["v0.mp4", "v1.mp4", "v2.mp4"]
    reasons = {s["video"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"short_audio.mp4", "broken.mp4", "no_audio_file.mp4"}
    assert "audio is shorter than 8 s" in reasons["short_audio.mp4"] and "short_audio.wav" in reasons["short_audio.mp4"]
    assert "broken.mp4" in reasons["broken.mp4"]
    assert "no audio file no_audio_file.*" in reasons["no_audio_file.mp4"]
    for v in result["videos"]:
        assert [(w["start_sec"], w["end_sec"]) for w in v["windows"]] == [(0.0, 4.8), (3.2, 8.0)]
        for w in v["windows"]:
            assert len(w["probs"]) == 21 and sum(w["probs"]) == pytest.approx(1, abs=1e-5)
            assert w["prob"] == max(w["probs"]) and -2 <= w["offset_sec"] <= 2
        assert v["desync"] == pytest.approx(np.mean([abs(w["offset_sec"]) for w in v["windows"]]))
    windows = [w for v in result["videos"] for w in v["windows"]]
    assert result["desync"] == pytest.approx(np.mean([abs(w["offset_sec"]) for w in windows]))
    assert (result["n_scored"], result["protocol"], result["precision"]) == (3, "av-benchmark", "fp32")
    captured = capsys.readouterr()
    assert f"DeSync: {result['desync']:.4f} s over 3 videos (6 windows), 3 skipped" in captured.out
    assert "short_audio.mp4" in captured.err and "no_audio_file.mp4" in captured.err


def test_nothing_scored_exits_1(tiny_ckpt, folder, tmp_path):
    videos, _ = folder
    empty_audio = tmp_path / "no_audio"
    empty_audio.mkdir()
    out = tmp_path / "r.csv"
    assert run_desync(videos, "--audio_dir", empty_audio, "--ckpt_path", tiny_ckpt, "--out", out) == 1
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all("no audio file" in r["skipped_reason"] for r in rows)


def test_resume_scores_only_what_is_missing_and_redoes_a_torn_record(tiny_ckpt, folder, tmp_path, capsys):
    """The log beside the results counts as done: its records (marked here with an impossible value) come
    back unchanged; a record cut off by a kill is scored again and its line replaced, not glued onto."""
    videos, audio = folder
    args = [videos, "--audio_dir", audio, "--ckpt_path", tiny_ckpt, "--device", "cpu", "--num_workers", "0"]
    for suffix in (".json", ".csv"):
        out = tmp_path / f"r{suffix}"
        run_desync(*args, "--out", out)
        first = out.read_text()
        assert run_desync(*args, "--out", out) == 0 and out.read_text() == first  # nothing left to do
    out, log = tmp_path / "r.json", tmp_path / "r.json.progress.jsonl"
    header, *lines = log.read_text().splitlines(keepends=True)
    v0 = json.loads(next(line for line in lines if '"key": "v0.mp4"' in line))
    v0["record"]["desync"] = 99.0
    v2 = next(line for line in lines if '"key": "v2.mp4"' in line)
    kept = [line for line in lines if '"key": "v0.mp4"' not in line and line != v2]
    log.write_text(header + json.dumps(v0) + "\n" + "".join(kept) + v2[:40])  # killed while writing v2.mp4
    run_desync(*args, "--out", out)
    resumed = {v["video"]: v for v in json.loads(out.read_text())["videos"]}
    assert resumed["v0.mp4"]["desync"] == 99.0 and set(resumed) == {"v0.mp4", "v1.mp4", "v2.mp4"}
    assert json.loads(log.read_text().splitlines()[-1])["key"] == "v2.mp4"  # its own line, after the cut
    assert resumed["v2.mp4"]["desync"] <= 2  # scored again


def test_a_rerun_with_another_model_or_precision_is_refused_and_changes_nothing(tiny_ckpt, folder, tmp_path):
    from utils.cli import UserError

    videos, audio = folder
    out = tmp_path / "r.json"
    args = [videos, "--audio_dir", audio, "--device", "cpu", "--num_workers", "0", "--out", out]
    assert run_desync(*args, "--ckpt_path", tiny_ckpt) == 0
    before = (out.read_bytes(), (tmp_path / "r.json.progress.jsonl").read_bytes())
    other = tmp_path / "other.pt"
    save_checkpoint({**load_checkpoint(tiny_ckpt), "epoch": 1}, other)
    with pytest.raises(UserError, match=r"precision='fp32'.*another --out"):
        run_desync(*args, "--ckpt_path", tiny_ckpt, "--precision", "bf16")
    with pytest.raises(UserError, match=r"\(model, model_sha256 differ\)"):
        run_desync(*args, "--ckpt_path", other)
    assert (out.read_bytes(), (tmp_path / "r.json.progress.jsonl").read_bytes()) == before


def test_colliding_names_are_listed_and_never_merged(tiny_ckpt, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("x.mp4", "x.MP4", "x.mkv"):
        make_clip(videos / name, ClipSpec(duration_sec=8.5, seed=1))
    out = tmp_path / "r.json"
    assert run_desync(videos, "--ckpt_path", tiny_ckpt, "--device", "cpu", "--out", out) == 1  # nothing scored
    result = json.loads(out.read_text())
    assert result["videos"] == [] and [s["video"] for s in result["skipped"]] == ["x.MP4", "x.mkv", "x.mp4"]
    assert "its output name 'x' is also that of x.mkv, x.mp4" in result["skipped"][0]["reason"]


def test_csv_has_a_row_per_video(tiny_ckpt, folder, tmp_path):
    videos, audio = folder
    run_desync(videos, "--audio_dir", audio, "--ckpt_path", tiny_ckpt, "--out", tmp_path / "r.json")
    run_desync(videos, "--audio_dir", audio, "--ckpt_path", tiny_ckpt, "--out", tmp_path / "r.csv")
    result = json.loads((tmp_path / "r.json").read_text())
    with open(tmp_path / "r.csv") as f:
        rows = {r["video"]: r for r in csv.DictReader(f)}
    for v in result["videos"]:
        row = rows[v["video"]]
        assert float(row["desync"]) == pytest.approx(v["desync"]) and row["skipped_reason"] == ""
        for name, w in zip(("first", "last"), v["windows"]):
            assert float(row[f"{name}_offset_sec"]) == pytest.approx(w["offset_sec"])
            assert float(row[f"{name}_prob"]) == pytest.approx(w["prob"])
    assert rows["broken.mp4"]["skipped_reason"] and rows["broken.mp4"]["desync"] == ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_without_a_shared_folder_give_rank_0_the_results_of_one_process(tiny_ckpt, folder, tmp_path):
    """Two launchers (--nnodes 2, c10d on loopback, gloo), each in its own working directory with a relative
    --out: rank 0's file holds every video, scored and skipped, as one process writes it; rank 1 writes nothing."""
    videos, audio = folder
    argv = [videos, "--audio_dir", audio, "--ckpt_path", tiny_ckpt, "--device", "cpu", "--num_workers", "0"]
    assert run_desync(*argv, "--out", tmp_path / "one.json") == 0
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = []
    for node in (0, 1):
        (tmp_path / f"node{node}").mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node)]
        cmd += ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
        cmd += [str(REPO / "scripts" / "desync.py"), *map(str, argv), "--out", "out.json"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path / f"node{node}", env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert json.loads((tmp_path / "node0" / "out.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert not (tmp_path / "node1" / "out.json").exists()


def test_the_api_of_av_benchmark_and_mmaudio_agrees_with_forward(tiny_ckpt):
    """extract_vfeats / extract_afeats / compare_v_a on the layouts av-benchmark passes give forward's logits."""
    from model.sync_model import load_synchformer

    model, _ = load_synchformer(tiny_ckpt)
    torch.manual_seed(1)
    vis, aud = torch.randn(2, 14, 16, 3, 224, 224), torch.randn(2, 14, 1, 128, 66)
    with torch.inference_mode():
        _, logits = model(vis, aud)
        # av-benchmark: each segment as a clip of its own, (B*S, 1, T, C, H, W)
        vfeat = model.extract_vfeats(vis.flatten(0, 1).unsqueeze(1)).unflatten(0, (2, 14)).squeeze(2)
        afeat = model.extract_afeats(aud)
        assert vfeat.shape[:2] == afeat.shape[:2] == (2, 14)
        torch.testing.assert_close(model.compare_v_a(vfeat, afeat), logits, rtol=1e-5, atol=1e-5)


def test_the_readme_example_of_that_api_runs_on_the_bare_state_dict(tiny_ckpt, tmp_path, monkeypatch):
    """README's example: synchformer_state_dict.pth (the published checkpoint's 'model' entry alone) loads
    with the config, and the three calls give forward's logits (a tiny config stands in for the published one)."""
    from omegaconf import OmegaConf

    from model.sync_model import load_synchformer
    from utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_ckpt)
    torch.save(ckpt["model"], tmp_path / "synchformer_state_dict.pth")
    OmegaConf.save(ckpt["args"], tmp_path / "tiny.yaml")
    readme = (REPO / "README.md").read_text()
    example = readme.split("checkpoint's `model` entry) with the published config:\n\n```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(example.replace("configs/sync.yaml", "tiny.yaml"), scope)
    model, _ = load_synchformer(tiny_ckpt)
    with torch.inference_mode():
        _, logits = model(scope["vis"], scope["aud"])
    torch.testing.assert_close(scope["logits"], logits, rtol=1e-5, atol=1e-5)


# --- av-benchmark's own numbers (tests/fixtures/desync/avbench_cases.json, see its "what") ---


def avbench_cases() -> dict:
    path = FIXTURES / "avbench_cases.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())["cases"]


CASE_MEDIA = {  # (video, audio) of each case, as avbench_cases.json's "what" describes them
    "a": (
        REFERENCE / "desync/videos/a_insync_3qesirWAGt4_20000_30000.mp4",
        REFERENCE / "desync/audio/a_insync_3qesirWAGt4_20000_30000.wav",
    ),
    "b": (FIXTURES / "b_30fps_640x360.mp4", REFERENCE / "desync/audio/a_insync_3qesirWAGt4_20000_30000.wav"),
    "c": (REFERENCE / "desync/videos/a_insync_3qesirWAGt4_20000_30000.mp4", FIXTURES / "c_44k1_stereo.flac"),
}


def case_paths(name: str):
    if not all(p.is_file() for p in CASE_MEDIA[name]):
        pytest.skip(f"media of case {name} not found: {CASE_MEDIA[name]}")
    return CASE_MEDIA[name]


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_inputs_equal_av_benchmarks(name):
    case = avbench_cases()[name]
    video, audio = case_paths(name)
    # the frames the fps filter picks, bit for bit
    decoded = decode_video_at_fps(video, 25, 200)  # (200, 3, H, W) uint8
    assert hashlib.sha256(decoded.contiguous().numpy().tobytes()).hexdigest() == case["frames_sha256"]
    sums = normalise_frames(video_frames(video, 8.0)).double().sum((1, 2, 3))  # of (200, 3, 224, 224)
    np.testing.assert_allclose(sums.numpy(), case["video_frame_sums"], rtol=0, atol=5e-3)
    mel = AudioSegments(8.0)(audio)  # (24, 1, 128, 66)
    np.testing.assert_allclose(mel.double().sum((1, 2, 3)).numpy(), case["mel_segment_sums"], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(mel[:, 0, 10, 20].numpy(), case["mel_probe"], rtol=0, atol=1e-4)


def depth1_model(ckpt_dir):
    """The published architecture with one block in each deep stack, filled with det_state_dict(seed=0)."""
    cfg = untrained_config(REPO / "configs" / "sync.yaml", tiny=False)
    cfg.model.params.vfeat_extractor.params.depth = 1
    cfg.model.params.afeat_extractor.params.num_hidden_layers = 1
    cfg.model.params.transformer.params.n_layer = 1
    model = instantiate_from_config(cfg.model)
    path = ckpt_dir / "depth1.pt"
    save_checkpoint({"model": det_state_dict(model.state_dict(), seed=0), "args": cfg}, path)
    return path


@pytest.fixture(scope="module")
def avbench_folder(tmp_path_factory):
    """The fixture cases laid out as av-benchmark reads them: videos and audio in two folders, paired by stem."""
    root = tmp_path_factory.mktemp("avbench")
    (root / "videos").mkdir(), (root / "audio").mkdir()
    for name in avbench_cases():
        video, audio = case_paths(name)
        (root / "videos" / f"{name}.mp4").symlink_to(video)
        (root / "audio" / f"{name}{audio.suffix}").symlink_to(audio)
    return root


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_desync_equals_av_benchmarks(avbench_folder, precision, tmp_path):
    """Probabilities within 2e-4 of av-benchmark's own, the same offsets and the same DeSync (reduced-depth
    model, every input pipeline); bf16 keeps every window's argmax."""
    cases = avbench_cases()
    out = tmp_path / "r.json"
    ckpt = depth1_model(tmp_path)
    args = ["--audio_dir", avbench_folder / "audio", "--ckpt_path", ckpt, "--out", out, "--precision", precision]
    assert run_desync(avbench_folder / "videos", *args, "--device", "cpu", "--num_workers", "0") == 0
    result = json.loads(out.read_text())
    for video in result["videos"]:
        expected = cases[video["video"].removesuffix(".mp4")]["depth1"]
        for w, key, offset in zip(video["windows"], ("logits_first", "logits_last"), expected["offsets_signed"]):
            probs = torch.softmax(torch.tensor(expected[key], dtype=torch.float64), -1).numpy()
            if precision == "fp32":
                np.testing.assert_allclose(w["probs"], probs, rtol=0, atol=2e-4)
            assert w["offset_sec"] == pytest.approx(offset, abs=1e-6)
        assert video["desync"] == pytest.approx(expected["desync"], abs=1e-6)
    assert result["desync"] == pytest.approx(np.mean([cases[n]["depth1"]["desync"] for n in cases]), abs=1e-6)


@pytest.mark.skipif(not os.environ.get("SYNCHFORMER_LONG_TESTS"), reason="full-size model: SYNCHFORMER_LONG_TESTS=1")
def test_desync_equals_av_benchmarks_full_size(avbench_folder, tmp_path):
    cases = avbench_cases()
    cfg = untrained_config(REPO / "configs" / "sync.yaml", tiny=False)
    model = instantiate_from_config(cfg.model)
    ckpt = tmp_path / "full.pt"
    save_checkpoint({"model": det_state_dict(model.state_dict(), seed=0), "args": cfg}, ckpt)
    out = tmp_path / "r.json"
    args = ["--audio_dir", avbench_folder / "audio", "--ckpt_path", ckpt, "--out", out, "--device", "cpu"]
    assert run_desync(avbench_folder / "videos", *args) == 0
    for video in json.loads(out.read_text())["videos"]:
        expected = cases[video["video"].removesuffix(".mp4")]["full"]
        for w, key in zip(video["windows"], ("logits_first", "logits_last")):
            probs = torch.softmax(torch.tensor(expected[key], dtype=torch.float64), -1).numpy()
            np.testing.assert_allclose(w["probs"], probs, rtol=0, atol=2e-4)
        assert video["desync"] == pytest.approx(expected["desync"], abs=1e-6)


def test_synchformer_protocol_with_and_without_separate_audio(tmp_path):
    """--protocol synchformer: the original test pipeline (its own tiny model at 32 px); a separate file
    with the samples the video's track decodes to gives the same result."""
    from dataset.io import get_video_and_audio
    from tests.test_inference import tiny_sync_cfg

    cfg = tiny_sync_cfg()
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint({"model": instantiate_from_config(cfg.model).state_dict(), "args": cfg}, ckpt)
    videos, audio = tmp_path / "videos", tmp_path / "audio"
    videos.mkdir(), audio.mkdir()
    for i in range(2):
        make_clip(videos / f"v{i}.mp4", ClipSpec(duration_sec=8.0, seed=10 + i))
        write_wav(audio / f"v{i}.wav", get_video_and_audio(videos / f"v{i}.mp4")[1])
    results = []
    for extra in ([], ["--audio_dir", audio]):
        out = tmp_path / f"r{len(extra)}.json"
        assert run_desync(videos, "--protocol", "synchformer", "--ckpt_path", ckpt, "--out", out, *extra) == 0
        result = json.loads(out.read_text())
        assert result["protocol"] == "synchformer" and result["n_scored"] == 2
        for v in result["videos"]:
            # the first and the last 4.8 s of the 8 s video (its decoded audio ends 64 ms early: upstream issue #11)
            (s0, e0), (s1, e1) = [(w["start_sec"], w["end_sec"]) for w in v["windows"]]
            assert (s0, e0) == (0.0, 4.8) and e1 - s1 == pytest.approx(4.8) and 7.9 <= e1 <= 8.0
        results.append([v["windows"] for v in result["videos"]])
    assert results[0] == results[1]
