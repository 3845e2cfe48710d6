"""utils.resumable: the log of finished items that every resumable command writes."""

import errno
import json

import pytest

from utils import resumable
from utils.cli import UserError
from utils.resumable import OutputError, ResultLog, output_folder

PROVENANCE = {"model_sha256": "ab12", "precision": "fp32", "stride_sec": 1.28}


def test_records_come_back_and_another_provenance_is_refused_leaving_the_file_as_it_was(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ResultLog(path, PROVENANCE, "--out")
    log.append("a.mp4", {"offset": 0.2})
    log.append("b.mp4", [1, 2])
    assert ResultLog(path, dict(PROVENANCE), "--out").records == {"a.mp4": {"offset": 0.2}, "b.mp4": [1, 2]}
    before = path.read_bytes()
    with pytest.raises(UserError, match=r"precision='fp32'.*\(precision, stride_sec differ\).*another --out"):
        ResultLog(path, {**PROVENANCE, "precision": "bf16", "stride_sec": 2.56}, "--out")
    assert path.read_bytes() == before


def test_a_torn_tail_is_cut_off_and_never_glued_to_the_next_record(tmp_path):
    path = tmp_path / "log.jsonl"
    ResultLog(path, PROVENANCE, "--out").append("a.mp4", 1)
    intact = path.read_bytes()
    for torn in (b'{"key": "b.mp4", "rec', b'{"key": "b.mp4", "record": 2}'):  # the second lacks its newline
        path.write_bytes(intact + torn)
        log = ResultLog(path, PROVENANCE, "--out")
        assert log.records == {"a.mp4": 1} and path.read_bytes() == intact
        log.append("c.mp4", 3)
        assert ResultLog(path, PROVENANCE, "--out").records == {"a.mp4": 1, "c.mp4": 3}
        assert [json.loads(line) for line in path.read_text().splitlines()][-1] == {"key": "c.mp4", "record": 3}


def test_a_full_disk_is_one_line_about_the_output_and_leaves_no_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    log = ResultLog(path, PROVENANCE, "--out_dir")
    intact = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resumable.os, "fsync", full)
    with pytest.raises(OutputError, match=f"cannot write {path}: No space left on device.*--out_dir"):
        log.append("a.mp4", 1)
    assert path.read_bytes() == intact


def test_a_file_or_a_folder_in_the_way_is_one_line_naming_it(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(OutputError, match="taken/sub: Not a directory.*--out_dir"):
        output_folder(tmp_path / "taken" / "sub", "--out_dir")
    (tmp_path / "log.jsonl").mkdir()
    with pytest.raises(OutputError, match="log.jsonl: Is a directory.*--out"):
        ResultLog(tmp_path / "log.jsonl", PROVENANCE, "--out")
