"""No input loses data, every mistake gets a clear message, interrupted work resumes (issue 13).

Each case was a raw traceback, a silent wrong result or lost data before; the command line runs
in process (tiny model patched in) unless a separate process is the point.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading

import pytest
from conftest import make_tiny_model

import beyond_top1 as bt
from beyond_top1 import models
from beyond_top1.cli import main
from beyond_top1.fileio import FolderBusyError, OutputError, folder_lock
from beyond_top1.lenses import LensFileError

TEXTS = ["The river flows through the old town.", "Paris is the capital of France."]


@pytest.fixture
def tiny(monkeypatch):
    """The CLI's models are a tiny one (fast); returns it."""
    model = make_tiny_model(n_layers=3)
    monkeypatch.setattr("beyond_top1.models.load_model", lambda *a, **k: model)
    return model


@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Data loss
# ---------------------------------------------------------------------------------------------


def test_saving_a_lens_never_touches_a_folder_it_did_not_write(tiny, tmp_path, capsys):
    user = tmp_path / "project"
    user.mkdir()
    (user / "config.json").write_text('{"model_type": "llama"}')
    (user / "other.txt").write_text("mine")
    before = snapshot(user)
    with pytest.raises(LensFileError, match="not a lens folder saved by beyond-top1"):
        bt.LogitLens(tiny).save(user)
    args = ["fit-lens", "--kind", "linear", "--texts-file", tmp_path / "t.txt", "--out", user]
    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    code, out, err = run(capsys, *args)
    assert code == 2 and "not a lens folder" in err and "fitted" not in out
    assert snapshot(user) == before
    # a lens folder of ours is replaced in place, and a user's note in it survives
    lens_dir = tmp_path / "lens"
    bt.LinearShortcutLens(tiny).save(lens_dir)
    (lens_dir / "notes.txt").write_text("keep me")
    assert run(capsys, *args[:-1], lens_dir)[0] == 0
    assert (lens_dir / "notes.txt").read_text() == "keep me"
    assert bt.load_lens(lens_dir, tiny).kind == "linear"


def test_a_lens_saved_into_the_current_folder(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    args = ["fit-lens", "--kind", "linear", "--texts-file", "../t.txt", "--out", "."]
    assert run(capsys, *args)[0] == 0  # an empty folder: it becomes the lens
    assert run(capsys, *args)[0] == 0  # and is replaced by the next fit, in place
    assert sorted(p.name for p in here.iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "weights.safetensors",
    ]
    assert bt.load_lens(here, tiny).kind == "linear"


@pytest.mark.parametrize("device", ["cuda", "banana", "cuda:7"])
def test_a_bad_device_leaves_the_model_cache_alone(smollm2, device):
    folder = models.smollm2_cache_path()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(ValueError, match="device"):
        bt.load_model("smollm2-135m", device=device)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-len", "5000"], "max_len must be an integer in \\[1, 64\\]"),
        (["--max-len", "0"], "max_len must be"),
        (["--max-len", "-5"], "max_len must be"),
        (["--batch-size", "0"], "batch_size must be"),
    ],
)
def test_a_scan_that_fails_validation_creates_nothing(
    tiny, texts_file, tmp_path, capsys, extra, message
):
    out = tmp_path / "scan"
    code, _, err = run(capsys, "scan", "--texts-file", texts_file, "--out", out, *extra)
    assert code == 2 and err.count("\n") == 1
    assert re.search(message, err), err
    assert not out.exists()
    assert run(capsys, "scan", "--texts-file", texts_file, "--out", out, "--k", "3")[0] == 0


def test_an_empty_text_is_refused_before_the_folder_is_made(tiny, tmp_path, capsys):
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "fine"}\n{"text": "   "}\n')
    out = tmp_path / "scan"
    code, _, err = run(capsys, "scan", "--texts-file", texts, "--out", out)
    assert code == 2 and "text 1 is empty" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Silent wrong results
# ---------------------------------------------------------------------------------------------


def test_one_string_is_not_taken_for_a_list_of_texts(tiny):
    with pytest.raises(TypeError, match="not one string"):
        bt.scan(tiny, "Paris", progress=False)
    with pytest.raises(TypeError, match="not one string"):
        bt.LinearShortcutLens.fit(tiny, "Paris", progress=False)
    with pytest.raises(TypeError, match="not one string"):
        next(bt.stream_residuals(tiny, "Paris", progress=False))


def test_the_max_len_used_is_the_one_recorded(tiny, texts_file, tmp_path, capsys):
    args = ["scan", "--texts-file", texts_file, "--out", tmp_path / "a", "--max-len", "7"]
    assert run(capsys, *args)[0] == 0
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert settings["max_len"] == summary["settings"]["max_len"] == 7
    frame = bt.load_scan(tmp_path / "a").saturation
    assert frame["pos"].max() == 6  # tokens 1..6 of at most 7 are scored


def test_a_finished_scan_is_not_recomputed_on_resume(
    tiny, texts_file, tmp_path, capsys, monkeypatch
):
    import beyond_top1.scans.run as scans

    args = ["scan", "--texts-file", texts_file, "--out", tmp_path / "s", "--k", "3"]
    assert run(capsys, *args)[0] == 0
    before = snapshot(tmp_path / "s")

    def must_not_run(*a, **k):
        raise AssertionError("a finished scan was recomputed")

    monkeypatch.setattr(scans, "_run_shards", must_not_run)
    code, out, _ = run(capsys, *args, "--resume")
    assert code == 0 and "complete" in out and "mean strict tau" in out
    assert snapshot(tmp_path / "s") == before


def test_reproduce_checks_its_arguments_before_running_anything(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "reproduce", "--out", out, "--scale", "test", "--force", "nope")
    assert code == 2 and "--force nope: no such stage" in err and "scan-smollm2-135m" in err
    assert not out.exists()
    code, _, err = run(capsys, "reproduce", "--out", out, "--set", "scan_texts=-5")
    assert code == 2 and "scan_texts must be >= 1" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Messages instead of tracebacks
# ---------------------------------------------------------------------------------------------


def test_output_paths_that_cannot_be_written(tiny, texts_file, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for command in (
        ["scan", "--texts-file", texts_file, "--out", a_file],
        ["eval-lens", "--texts-file", texts_file, "--out", a_file],
        ["reproduce", "--scale", "test", "--out", a_file],
        ["fit-lens", "--kind", "linear", "--texts-file", texts_file, "--out", a_file / "x"],
    ):
        code, out, err = run(capsys, *command)
        assert code == 2 and str(a_file) in err and "fitted" not in out, (command, err)
    assert a_file.read_text() == "mine"
    # a folder the kernel will not let us create (even root cannot write under /proc)
    code, _, err = run(capsys, "scan", "--texts-file", texts_file, "--out", "/proc/bt-test/x")
    assert code == 2 and "/proc/bt-test" in err


def test_ctrl_c_during_a_scan_says_what_was_kept_and_how_to_resume(
    tiny, texts_file, tmp_path, capsys, monkeypatch
):
    import beyond_top1.scans.run as scans

    real, calls = scans._scan_batch, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scans, "_scan_batch", interrupted)
    out = tmp_path / "s"
    args = ["scan", "--texts-file", texts_file, "--out", out, "--batch-size", "1"]
    code, _, err = run(capsys, *[*args, "--k", "3"])
    assert code == 130 and err.count("\n") == 1
    assert f"kept in {out / 'shards'}" in err and "--resume" in err
    monkeypatch.setattr(scans, "_scan_batch", real)
    assert run(capsys, *args, "--k", "3", "--resume")[0] == 0
    assert len(bt.load_scan(out)) > 0


def test_texts_files_with_bad_bytes_or_a_bom(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nsecond \xff\xfe line\n")
    code, _, err = run(capsys, "scan", "--texts-file", bad, "--out", tmp_path / "o")
    assert code == 2 and f"{bad}:2: not UTF-8" in err
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "The cat sat."}\n{"text": "A dog ran."}\n')
    assert bt.load_texts(bom) == ["The cat sat.", "A dog ran."]


def test_an_unknown_model_gets_a_short_message_with_close_matches(capsys):
    with pytest.raises(models.UnknownModelError) as info:
        bt.load_model("gpt2-smal")
    message = str(info.value)
    assert len(message) < 400 and "gpt2-small" in message and "smollm2-135m" in message
    assert "beyond-top1 models --all" in message
    code, out, _ = run(capsys, "models", "--all")
    assert code == 0 and "gpt2-small" in out and "smollm2-135m" in out


def test_every_entry_point_checks_the_lens(tiny, tmp_path):
    other = make_tiny_model(seed=5)
    for call in (
        lambda lens: bt.top_tokens(tiny, "Paris is", lens=lens),
        lambda lens: bt.trajectory(tiny, "Paris is", lens=lens),
        lambda lens: bt.scan(tiny, ["Paris is nice"], lens=lens, progress=False),
    ):
        with pytest.raises(ValueError, match="built for another model"):
            call(bt.LogitLens(other))
        assert len(call("logit")) > 0  # the CLI's name works in Python too
    with pytest.raises(TypeError, match="must be a Lens, 'logit' or a saved lens folder"):
        bt.top_tokens(tiny, "Paris is", lens=3)
    saved = bt.LinearShortcutLens(tiny).save(tmp_path / "lens")
    assert len(bt.top_tokens(tiny, "Paris is", lens=str(saved))) > 0


# ---------------------------------------------------------------------------------------------
# Concurrency and sharing
# ---------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_at_once_with_the_holders_pid(tiny, tmp_path):
    out = tmp_path / "s"
    with folder_lock(out):
        with pytest.raises(FolderBusyError, match=f"PID {os.getpid()}"):
            bt.scan(tiny, TEXTS, out=out, progress=False)
        # and from another process, as two `--resume` runs would be
        code = (
            "import sys; from beyond_top1.fileio import folder_lock, FolderBusyError\n"
            "try:\n    folder_lock(sys.argv[1]).__enter__()\n"
            "except FolderBusyError as e:\n    print(e); sys.exit(3)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 3 and f"PID {os.getpid()}" in result.stdout
    bt.scan(tiny, TEXTS, out=out, k=3, progress=False)  # free again


def test_the_lock_is_one_per_folder_between_threads(tmp_path):
    entered = threading.Event()
    release = threading.Event()
    errors = []

    def hold():
        with folder_lock(tmp_path):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(10)
    try:
        with folder_lock(tmp_path):
            errors.append("entered twice")
    except FolderBusyError:
        pass
    release.set()
    thread.join()
    assert errors == []


def test_artifacts_have_ordinary_permissions(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        bt.scan(tiny, TEXTS, out=tmp_path / "s", k=3, progress=False)
        bt.LogitLens(tiny).save(tmp_path / "l")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "s").iterdir() if p.is_file()]
    files += [p for p in (tmp_path / "l").iterdir() if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]


def test_single_file_artifacts_replace_only_their_own(tiny, tmp_path):
    from matplotlib.figure import Figure

    from beyond_top1.figures import save_figure

    figure = Figure()
    figure.subplots().plot([0, 1])
    (tmp_path / "mine.png").write_bytes(b"a user's picture")
    with pytest.raises(OutputError, match="did not write"):
        save_figure(figure, tmp_path / "mine")
    assert (tmp_path / "mine.png").read_bytes() == b"a user's picture"
    save_figure(figure, tmp_path / "ours")
    save_figure(figure, tmp_path / "ours")  # its own: replaced
    view = bt.trajectory_view(bt.trajectory(tiny, "Paris is"))
    (tmp_path / "page.html").write_text("<html>my notes</html>")
    with pytest.raises(OutputError, match="did not write"):
        view.save(tmp_path / "page.html")
    view.save(tmp_path / "view.html")
    view.save(tmp_path / "view.html")  # its own: replaced
    assert "beyond-top1" in (tmp_path / "view.html").read_text()
