"""Issue 17: every command ends in one line with a documented status, never a traceback.

Real signals to real processes: SIGINT/SIGTERM to ``mvld-train ae`` (which must leave a
checkpoint that ``--resume`` continues exactly), SIGINT/SIGTERM to ``mvld demo`` (which must
stop its receiver child), bad output paths, and the commands on an install without torch (an
import blocker stands in for the missing package; it raises what a missing package raises).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_fixtures import write_tiny_rig

from mvld.cli import main as mvld_main
from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.exits import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    command,
    deferred_stop_signals,
)
from mvld.model.checkpoint import checkpoint_paths

# --- the policy itself, with real signals to this process


def test_sigterm_and_ctrl_c_become_exit_codes_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    @command("mvld-x", extras="train")
    def terminated(argv: list[str] | None = None) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        return 0

    @command("mvld-x", extras="train")
    def interrupted(argv: list[str] | None = None) -> int:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert terminated([]) == EXIT_SIGTERM == 143
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is restored"
    assert capsys.readouterr().err.strip() == "mvld-x: stopped (SIGTERM)"
    assert interrupted([]) == EXIT_SIGINT == 130
    assert capsys.readouterr().err.strip() == "mvld-x: interrupted"


def test_a_stop_during_an_import_is_held_until_the_import_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Raised inside an import, a stop can abort the interpreter (a C extension that calls back
    into Python cannot unwind it), so it waits for the import to finish, then stops."""
    (tmp_path / "slow_to_import.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.2)  # the signal arrives here, inside the import\n"
        "FINISHED = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    @command("mvld-x", extras="train")
    def importing(argv: list[str] | None = None) -> int:
        import slow_to_import  # noqa: F401

        time.sleep(5)  # the held stop is raised before this returns
        return 0

    started = time.monotonic()
    assert importing([]) == EXIT_SIGTERM
    assert time.monotonic() - started < 4
    assert sys.modules["slow_to_import"].FINISHED, "the import was cut short"
    assert capsys.readouterr().err.strip() == "mvld-x: stopped (SIGTERM)"
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


# ``mvld-eval`` in a child that prints "main" once the command's stop handlers are installed
# (inside ``command``'s guard), so a signal sent on reading it never meets the default action.
CHILD_ANNOUNCING_MAIN = """
import contextlib, sys
import mvld.common.exits as exits
installing = exits.stop_signals_raise
@contextlib.contextmanager
def announced():
    with installing():
        print("main", flush=True)
        yield
exits.stop_signals_raise = announced
from mvld.train.eval_cli import main
sys.exit(main())
"""


@pytest.mark.slow  # a dozen interpreters importing torch
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, EXIT_SIGTERM), (signal.SIGINT, EXIT_SIGINT)]
)
def test_a_stop_while_torch_imports_ends_in_one_line_never_an_abort(
    signum: int, status: int
) -> None:
    """Signals spread over ``mvld-eval``'s start (torch's import): each ends with the stop's
    status and one line; before the fix some aborted in pybind11 ("terminate called")."""
    runs = []
    for delay in (0.0, 0.15, 0.3, 0.45, 0.6, 0.8):  # after main is entered, before torch is in
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD_ANNOUNCING_MAIN,
                "--model",
                str(DEFAULT_MODEL),
                "--data",
                "/nonexistent",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None and process.stdout.readline() == "main\n"
        runs.append((delay, process))
        time.sleep(delay)
        process.send_signal(signum)
    for delay, process in runs:
        _, stderr = process.communicate(timeout=120)
        assert "terminate called" not in stderr and "Traceback" not in stderr, (delay, stderr)
        if "dataset folder does not exist" in stderr:
            continue  # the command had already finished its work when the signal came
        assert process.returncode == status, (delay, process.returncode, stderr)
        assert len(stderr.strip().splitlines()) == 1, (delay, stderr)


def test_a_missing_optional_module_is_named_other_import_errors_are_not_hidden(
    capsys: pytest.CaptureFixture[str],
) -> None:
    @command("mvld-x", extras="train,eval")
    def needs(argv: list[str] | None = None) -> int:
        raise ModuleNotFoundError("No module named 'matplotlib'", name=argv[0])

    assert needs(["matplotlib"]) == EXIT_USAGE
    assert capsys.readouterr().err == (
        'mvld-x: matplotlib is not installed; this command needs pip install "mvld[train,eval]"\n'
    )
    assert needs(["pybullet"]) == EXIT_USAGE  # not in the command's extras: the sim one is added
    assert capsys.readouterr().err.endswith('pip install "mvld[train,eval,sim]"\n')
    with pytest.raises(ModuleNotFoundError):
        needs(["mvld.no_such_module"])  # a bug of ours, not a missing extra: keep the traceback


def test_deferred_signals_wait_for_the_step_and_a_second_one_stops_at_once() -> None:
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when a shell started us in the background
    with deferred_stop_signals() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert request and request.name == "SIGTERM"  # noted, nothing raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before


# --- bad output paths


def test_bad_output_paths_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "report.html"
    a_file.write_text("not a folder")
    assert mvld_main(["demo", "--out", str(a_file)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip() == f"mvld demo: error: report folder {a_file} exists and is not a folder"
    assert mvld_main(["demo", "--out", str(a_file / "sub")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot write the report folder" in err and len(err.strip().splitlines()) == 1
    assert mvld_main(["keys", "node1", "--dir", str(a_file)]) == EXIT_USAGE
    assert "exists and is not a folder" in capsys.readouterr().err


# --- training: a signal saves the last finished step, --resume continues it exactly

TINY_AE = [
    "--image-size",
    "32",
    "--latent-dim",
    "16",
    "--channels",
    "8,16",
    "--latent-channels",
    "0",
    "--res-blocks",
    "0",
    "--batch-size",
    "16",
    "--lr-schedule",
    "constant",
    "--no-progress",
    "--threads",
    "1",
    "--val-every",
    "5",
    "--checkpoint-every",
    "0",
]


def _train(data: Path, out: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mvld.train.cli",
        "ae",
        "--data",
        str(data),
        "--out",
        str(out),
        *TINY_AE,
        *flags,
    ]


def _default_sigint() -> None:
    """A child started from a shell script with SIGINT ignored would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_training(data: Path, out: Path, signum: int) -> tuple[int, str]:
    """Start a long run, signal it once a few steps are done; (exit status, stderr)."""
    process = subprocess.Popen(
        _train(data, out, "--steps", "100000"),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "training did not get going"
            time.sleep(0.1)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stderr


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_rig(tmp_path_factory.mktemp("rig") / "data")


@pytest.mark.slow  # three training processes: ~15 s alone, minutes on a loaded machine
def test_sigint_saves_a_checkpoint_that_resume_continues_exactly(rig: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    status, stderr = _interrupt_training(rig, out, signal.SIGINT)
    assert status == EXIT_SIGINT, stderr
    assert "Traceback" not in stderr
    assert stderr.rstrip().endswith("mvld-train: interrupted")
    step = json.loads((out / "last.json").read_text())["step"]
    assert step >= 10 and f"SIGINT at step {step}/100000" in stderr
    assert (out / "last.train.safetensors").is_file()

    resumed = subprocess.run(
        _train(rig, out, "--steps", str(step + 3), "--resume"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(
        _train(rig, tmp_path / "straight", "--steps", str(step + 3)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert straight.returncode == 0, straight.stderr
    assert json.loads((out / "last.json").read_text())["step"] == step + 3
    assert (out / "last.safetensors").read_bytes() == (
        tmp_path / "straight" / "last.safetensors"
    ).read_bytes(), "the interrupted and resumed run differs from an uninterrupted one"


def test_sigterm_saves_a_checkpoint_and_exits_143(rig: Path, tmp_path: Path) -> None:
    status, stderr = _interrupt_training(rig, tmp_path, signal.SIGTERM)
    assert status == EXIT_SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.rstrip().endswith("mvld-train: stopped (SIGTERM)")
    assert json.loads((tmp_path / "last.json").read_text())["step"] >= 10


# --- the demo: Ctrl-C or SIGTERM stops its child processes too


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux /proc")
@pytest.mark.skipif(
    not checkpoint_paths(DEFAULT_MODEL)[0].is_file(), reason="the default model is not installed"
)
@pytest.mark.parametrize(
    ("signum", "status", "last_line"),
    [
        (signal.SIGINT, EXIT_SIGINT, "mvld: interrupted"),
        (signal.SIGTERM, EXIT_SIGTERM, "mvld: stopped (SIGTERM)"),
    ],
)
def test_a_stopped_demo_stops_its_receiver(
    tmp_path: Path, signum: int, status: int, last_line: str
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "mvld", "demo", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 60
        while not (children := _children(process.pid)):  # the receiver has been started
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the demo started no receiver"
            time.sleep(0.1)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr and stderr.rstrip().endswith(last_line)
    assert not any(_alive(child) for child in children), "a demo child outlived the demo"


# --- an install without torch: commands name the extra to install

_WITHOUT = """
import contextlib, importlib, importlib.abc, io, json, sys

BLOCKED = ("torch", "safetensors")

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
results = {}
for case in json.loads(sys.argv[1]):
    module, function, *argv = case
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = getattr(importlib.import_module(module), function)(argv)
        except SystemExit as exc:  # argparse's --help
            status = exc.code
        except BaseException as exc:
            status, err = repr(exc), io.StringIO(repr(exc))
    results[" ".join(case)] = [status, out.getvalue()[:200], err.getvalue()]
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "torch was imported"
print(json.dumps(results))
"""


def test_commands_without_torch_name_the_extra_and_help_still_works(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    needs = {  # the call -> (command name, extras it needs)
        ("mvld.entrypoints", "receiver", "--help"): ("mvld-receiver", "receiver"),
        ("mvld.train.cli", "main", "ae", "--data", "x", "--out", out): ("mvld-train", "train"),
        ("mvld.train.eval_cli", "main", "--data", "x", "--out", out): ("mvld-eval", "train,eval"),
        ("mvld.cli", "main", "demo", "--out", out): ("mvld", "edge,sim,receiver,eval"),
    }
    helps = [
        ("mvld.train.cli", "main", "ae", "--help"),
        ("mvld.train.eval_cli", "main", "--help"),
        ("mvld.entrypoints", "edge", "--help"),
        ("mvld.cli", "main", "demo", "--help"),
    ]
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT, json.dumps([*needs, *helps])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for case, (prog, extras) in needs.items():
        status, _, err = results[" ".join(case)]
        assert status == EXIT_USAGE, (case, status, err)
        assert err == (
            f'{prog}: torch is not installed; this command needs pip install "mvld[{extras}]"\n'
        ), case
    for case in helps:
        status, stdout, err = results[" ".join(case)]
        assert status == 0 and stdout.startswith("usage:"), (case, status, err)
