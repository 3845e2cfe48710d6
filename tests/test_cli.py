"""Every command fails on our errors with one line naming the file or setting, exit status 2 and no traceback
(`utils.cli.run_cli`); folder commands list what they skipped; the original's import paths work.

The command lines run in a subprocess: all of them in one `tests.cli_driver` process (one Python start
for all), and one as a plain `python example.py ...` process to pin the real interpreter's exit and output."""

import json
import os
import subprocess
import sys

import pytest
import torch

import dataset.dataset_utils
import dataset.io
from dataset.synthetic import ClipSpec, make_clip
from tests.bad_media import write_bad_videos
from tests.reference_data import REPO
from tests.test_inference import tiny_sync_cfg
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cli import UserError, report_skipped, run_cli
from utils.utils import instantiate_from_config

ENV = {k: v for k, v in os.environ.items() if k != "SYNCHFORMER_DEBUG"}
ENV |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad videos, a good 6 s clip, and checkpoints: a tiny one in the published format, and broken ones."""
    root = tmp_path_factory.mktemp("cli")
    problems = write_bad_videos(root / "bad")
    make_clip(root / "good" / "good.mp4", ClipSpec(duration_sec=6.0, seed=1))
    make_clip(root / "clip10.mp4", ClipSpec(duration_sec=10.0, seed=2))  # in the model's format: no re-encoding
    cfg = tiny_sync_cfg()
    torch.manual_seed(0)
    state_dict = instantiate_from_config(cfg.model).state_dict()
    save_checkpoint({"model": state_dict, "args": cfg, "epoch": 0}, root / "tiny.pt")
    (root / "truncated.pt").write_bytes((root / "tiny.pt").read_bytes()[:2000])
    (root / "random.pt").write_bytes(bytes(range(7, 256, 3)) * 10)
    save_checkpoint({"model": dict(list(state_dict.items())[1:]), "args": cfg}, root / "incompatible.pt")
    torch.save(load_checkpoint(root / "tiny.pt")["model"], root / "bare.pt")
    return root, problems


def cli_cases(root, work, problems) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """{label: (driver case, what its one error line must name)}: each bad video through each single-video
    command, bad checkpoints, settings and configs through the commands that read them."""
    tiny = ["--ckpt_path", str(root / "tiny.pt"), "--device", "cpu"]
    cases = {}

    def case(label, script, argv, *named, **extra):
        cases[label] = {"script": script, "argv": [str(a) for a in argv], **extra}, named

    for name, problem in problems.items():
        video = root / "bad" / name
        case(f"example {name}", "example.py", ["--vid_path", video, "--reencode_dir", work / "vis", *tiny], str(video),
             problem)  # fmt: skip
        case(f"predict_offsets {name}", "scripts/predict_offsets.py", [video, "--out_dir", work / "offsets", *tiny],
             str(video), problem)  # fmt: skip
    clip = ["--vid_path", root / "clip10.mp4", "--device", "cpu"]
    for ckpt, problem in [("nowhere.pt", "not found"), ("truncated.pt", "truncated"), ("random.pt", "Could not read"),
                          ("incompatible.pt", "1 missing"), ("bare.pt", "without the config")]:  # fmt: skip
        case(f"checkpoint {ckpt}", "example.py", [*clip, "--ckpt_path", root / ckpt], str(root / ckpt), problem)
    case("no cfg_path", "example.py", [*clip, "--ckpt_path", root / "bare.pt", "--cfg_path", root / "no.yaml"],
         "no.yaml")  # fmt: skip
    case("no model", "example.py", clip, "--exp_name")
    offline = {"utils.download.PARENT_URL": "http://127.0.0.1:9/sync_models"}
    case("offline download", "example.py", [*clip, "--exp_name", "24-01-04T16-39-21", "--logdir", work / "models"],
         "127.0.0.1:9/sync_models/24-01-04T16-39-21", "place it at", setattr=offline)  # fmt: skip
    case("unknown model", "example.py", [*clip, "--exp_name", "24-13-99", "--logdir", work / "models"], "24-13-99")
    case("window outside", "example.py", [*clip, "--v_start_i_sec", "8.0", *tiny], "clip10.mp4", "--v_start_i_sec")
    case("no GPU", "example.py", [*clip, "--device", "cuda:99", *tiny[:2]], "--device=cuda:99", "--device=cpu")
    case("no GPU bench", "scripts/bench/model.py", ["--tiny", "--device", "cuda:99"], "--device=cuda:99")
    case("bad device", "example.py", [*clip, "--device", "gpu0", *tiny[:2]], "--device=gpu0")
    case("empty folder", "scripts/predict_offsets.py", [work / "vis", *tiny], f"No videos in {work / 'vis'}")
    case("desync no folder", "scripts/desync.py", [work / "nowhere", *tiny], str(work / "nowhere"), "not a folder")
    case("desync output", "scripts/desync.py", [root / "good", "--out", work / "r.txt", *tiny], "r.txt", ".json")
    case("desync checkpoint", "scripts/desync.py", [root / "good", "--ckpt_path", root / "truncated.pt", *tiny[2:]],
         "truncated")  # fmt: skip
    case("no config", "main.py", [f"config={root / 'none.yaml'}"], "none.yaml")
    case("broken config", "main.py", [f"config={root / 'broken.yaml'}"], "broken.yaml")
    train = [f"config={REPO / 'configs' / 'tiny' / 'sync.yaml'}", f"logging.logdir={work / 'logs'}"]
    case("unknown key", "main.py", [*train, "trainig.lr=1"], "trainig.lr")
    case("unknown action", "main.py", [*train, "action=fly"], "fly")
    case("bad value", "main.py", [*train, "model.params.transformer.params.n_head=5"], "GlobalTransformer", "n_head=5")
    case("override typo", "main.py", [*train, "model.params.transformer.params.n_heads=4"], "n_heads")
    # the tiny overlay with a typo in its own file (its defaults list named by absolute paths)
    typo = (REPO / "configs" / "tiny" / "stage2.yaml").read_text().replace("n_head: 4", "n_heads: 4")
    (root / "typo_stage2.yaml").write_text(typo)
    (root / "typo.yaml").write_text(f"defaults: [{REPO / 'configs' / 'sync.yaml'}, {root / 'typo_stage2.yaml'}]\n")
    case("yaml typo", "main.py", [f"config={root / 'typo.yaml'}", *train[1:]], "typo_stage2.yaml", "n_heads", "n_head'")
    case("extractor checkpoint", "main.py", [*train, f"model.params.vfeat_extractor.params.ckpt_path={root}/no.pt"],
         f"{root}/no.pt")  # fmt: skip
    case("no metadata", "main.py", train, "vggsound.csv", "download_metadata")
    case("no GPU training", "main.py", [*train, "training.device=cuda:99"], "training.device=cuda:99")
    case("syncability", "scripts/test_syncability.py", [], "config_sync=")
    case("demo", "scripts/demo.py", ["--offset_sec", "3"], "--offset_sec 3")
    case("metadata offline", "scripts/download_metadata.py", ["--out", work / "meta", "--only", "lrs3_test.txt",
         "--base-url", "http://127.0.0.1:9/"], "http://127.0.0.1:9/lrs3_test.txt")  # fmt: skip
    case("debug", "example.py", ["--vid_path", root / "bad" / "empty.mp4", *tiny], "empty.mp4",
         env={"SYNCHFORMER_DEBUG": "1"})  # fmt: skip
    good = root / "good" / "good.mp4"
    case("resync 100 s", "scripts/resync.py", [good, "--offset_sec", "100", "--out", work / "f.mp4", *tiny], "100 s")
    # outputs that cannot be written: a file where a folder should be, a folder where a file should be
    case("predict_offsets out_dir in a file", "scripts/predict_offsets.py", [good, "--out_dir", good / "out", *tiny],
         f"cannot write {good / 'out'}", "--out_dir")  # fmt: skip
    case("desync out is a folder", "scripts/desync.py", [root / "good", "--out", work / "vis.json", *tiny], "vis.json")
    case("resync out_dir in a file", "scripts/resync.py", [root / "good", "--out_dir", good / "out", *tiny],
         f"cannot write {good / 'out'}", "--out_dir")  # fmt: skip
    if os.geteuid() != 0:  # permissions do not stop root
        case("read-only out_dir", "scripts/predict_offsets.py", [good, "--out_dir", work / "read-only", *tiny],
             "read-only", "Permission denied")  # fmt: skip
    for folder in ("mixed", "bad"):
        case(f"folder {folder}", "scripts/predict_offsets.py", [root / folder, "--out_dir", work / folder, *tiny])
    return cases


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    """{label: (what the error must name, result)} of every case of `cli_cases`, run in one driver process."""
    root, problems = files
    work = tmp_path_factory.mktemp("work")
    (work / "vis").mkdir()
    (work / "vis.json").mkdir()
    (work / "read-only").mkdir(mode=0o555)
    (root / "broken.yaml").write_text("model: [unclosed\n")
    (root / "mixed").mkdir()
    for name in problems:
        if (root / "bad" / name).exists():
            (root / "mixed" / name).symlink_to(root / "bad" / name)
    (root / "mixed" / "good.mp4").symlink_to(root / "good" / "good.mp4")
    cases = cli_cases(root, work, problems)
    (work / "cases.json").write_text(json.dumps([c for c, _ in cases.values()]))
    cmd = [sys.executable, "-m", "tests.cli_driver", str(work / "cases.json"), str(work / "results.json")]
    subprocess.run(cmd, cwd=work, env=ENV, check=True, timeout=600)
    results = json.loads((work / "results.json").read_text())
    return work, {label: (named, result) for (label, (_, named)), result in zip(cases.items(), results)}


def assert_one_line_error(label: str, result: dict, *named: str) -> str:
    """The case ended with exit status 2 and one `error:` line naming `named`, without a traceback."""
    output = f"{label}:\n" + result["stdout"] + result["stderr"]
    assert "Traceback" not in output, output
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert result["code"] == 2 and len(errors) == 1, output
    for name in named:
        assert name in errors[0], output
    return errors[0]


def test_every_command_fails_in_one_clear_line(runs):
    _, results = runs
    checked = [label for label in results if not label.startswith(("folder", "debug"))]
    assert len(checked) >= 2 * 9 + 25
    for label in checked:
        named, result = results[label]
        assert_one_line_error(label, result, *named)


def test_the_debug_switch_shows_the_traceback_of_our_errors(runs):
    _, results = runs
    _, result = results["debug"]
    assert result["code"] == 2 and "Traceback" in result["stderr"] and "BadVideoError" in result["stderr"]
    assert result["stderr"].splitlines()[-1].startswith("error: ") and "empty.mp4" in result["stderr"]


def test_folder_commands_skip_bad_files_and_list_them(files, runs):
    _, problems = files
    work, results = runs
    n_bad = len(problems) - 1  # all but the missing one are in the folders
    for folder, code, n_done in (("mixed", 0, 1), ("bad", 1, 0)):
        result = results[f"folder {folder}"][1]
        assert "Traceback" not in result["stdout"] + result["stderr"]
        assert result["code"] == code, result
        assert f"{n_done} videos done, {n_bad} skipped" in result["stdout"]
        listed = result["stderr"].split(f"Skipped {n_bad} item(s):\n", 1)[1].splitlines()
        reasons = dict(line.strip().split(": ", 1) for line in listed if line.startswith("  "))
        assert set(reasons) == set(problems) - {"missing.mp4"}
        for name, reason in reasons.items():
            assert problems[name] in reason, (name, reason)
    assert (work / "mixed" / "summary.csv").read_text().count("good.mp4") == 1
    assert not (work / "bad" / "summary.csv").exists()


def test_a_real_process_exits_2_with_one_line(files, tmp_path):
    root, _ = files
    missing = root / "bad" / "missing.mp4"
    cmd = [sys.executable, str(REPO / "example.py"), "--vid_path", str(missing), "--ckpt_path", str(root / "tiny.pt"),
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = f"error: {missing}: file does not exist (check the path; in a dataset, `vids_dir` and the split files)"
    assert proc.stderr.splitlines()[-1] == expected


def test_run_cli_keeps_the_traceback_of_a_bug_and_folder_status(capsys, monkeypatch):
    def too_short():
        raise UserError("x.mp4: too short (use a longer one)")

    monkeypatch.delenv("SYNCHFORMER_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(too_short)
    assert e.value.code == 2 and capsys.readouterr().err == "error: x.mp4: too short (use a longer one)\n"
    with pytest.raises(ZeroDivisionError):  # not ours: a bug, whose traceback the interpreter prints
        run_cli(lambda: 1 / 0)
    assert report_skipped([("a.mp4", "empty")], n_done=2) == 0
    assert report_skipped([("a.mp4", "empty")], n_done=0) == 1
    assert capsys.readouterr().err.count("  a.mp4: empty\n") == 2


def test_the_original_import_paths(tmp_path):
    from dataset.dataset_utils import get_video_and_audio, reencode_video

    assert get_video_and_audio is dataset.io.get_video_and_audio and reencode_video is dataset.io.reencode_video
    make_clip(tmp_path / "clip.mp4", ClipSpec(duration_sec=1.0, vfps=30, afps=22050, height=64, width=96))
    # the original's calls: reencode_video(path, vfps, afps, in_size), then get_video_and_audio(path, get_meta=True)
    new_path = reencode_video(str(tmp_path / "clip.mp4"), 25, 16000, 64, out_dir=tmp_path / "vis")
    rgb, audio, meta = dataset.dataset_utils.get_video_and_audio(new_path, True)
    assert rgb.shape == (25, 3, 64, 96) and rgb.dtype == torch.uint8
    assert meta == {"video": {"fps": [25.0]}, "audio": {"framerate": [16000]}}
    assert abs(len(audio) - 16000) <= 1024  # AAC pads its last frame
