"""Runs many command lines of the real entry points in one Python process, so that a test pays for one
start of Python and torch instead of one per case:

    python -m tests.cli_driver CASES.json RESULTS.json

Each case is `{"script": "example.py", "argv": [...], "env": {...}, "setattr": {"module.NAME": value}}`:
the script runs as `__main__` (its `if __name__ == "__main__":` block included) with that `sys.argv` and
environment, and its exit status, stdout and stderr are recorded. An exception that escapes the script
is printed with its traceback, as the interpreter would, and counts as exit status 1.
"""

import contextlib
import importlib
import io
import json
import logging
import os
import runpy
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_case(case: dict) -> dict:
    out, err = io.StringIO(), io.StringIO()
    env_before = dict(os.environ)
    os.environ.update(case.get("env", {}))
    patched = []
    for name, value in case.get("setattr", {}).items():
        module, attr = name.rsplit(".", 1)
        module = importlib.import_module(module)
        patched.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)
    logging.root.handlers.clear()  # each script's `logging.basicConfig` must write to this case's stderr
    sys.argv = [case["script"], *case["argv"]]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO / case["script"]), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    for module, attr, value in patched:
        setattr(module, attr, value)
    os.environ.clear()
    os.environ.update(env_before)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps([run_case(case) for case in cases], indent=1))
