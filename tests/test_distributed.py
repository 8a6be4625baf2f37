"""Data parallelism under torchrun: 2 gloo processes on this CPU, real texts, SmolLM2.

The references are one-process runs of the same command: scan folders must be byte-identical
(their timing aside), a linear lens equal within float64 round-off. A rank that raises stops
every rank with its message; a rank killed mid-scan stops the run, which then resumes to the
same files. Tests that launch the model on two ranks more than once a test (lenses, probes,
a finished or foreign folder) are marked slow: ``bash scripts/test.sh -m slow`` runs them
(about 9 minutes on a 2-core AMD EPYC).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("WORLD_SIZE", None)
ENV.pop("RANK", None)
SCAN = ["scan", "--batch-size", "1", "--max-len", "20", "--permutations", "0"]
SCAN += ["--shard-batches", "1"]  # 10 shards: each rank writes several, interleaved


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    from beyond_top1.data import wiki_texts

    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    texts = [" ".join(t.split())[:200] for t in wiki_texts(10, split="val")]
    path.write_text("\n".join(texts), encoding="utf-8")
    return path


def beyond_top1(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "beyond_top1", *args]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def torchrun(*args: str, cwd: Path, popen: bool = False):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "beyond_top1", *args]
    if popen:
        return subprocess.Popen(
            command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def same_scan_files(one: Path, two: Path) -> None:
    names = sorted(p.name for p in one.iterdir() if p.name != "timing.json")
    assert names == sorted(p.name for p in two.iterdir() if p.name != "timing.json")
    assert "trajectories.safetensors" in names and "saturation.parquet" in names
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.fixture(scope="module")
def one_process_scan(texts_file):
    run = beyond_top1(*SCAN, "--texts-file", str(texts_file), "--out", "one", cwd=texts_file.parent)
    assert run.returncode == 0, run.stderr
    return texts_file.parent / "one"


def test_a_scan_on_two_ranks_writes_the_files_of_one_process(texts_file, one_process_scan):
    cwd = texts_file.parent
    run = torchrun(*SCAN, "--texts-file", str(texts_file), "--out", "two", cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    same_scan_files(one_process_scan, cwd / "two")
    assert run.stdout.count("scanned ") == 1  # rank 0 reports, once
    assert '"ranks": 2' in (cwd / "two" / "timing.json").read_text()


@pytest.mark.slow
def test_a_finished_folder_resumes_as_it_is_and_a_foreign_one_is_refused(
    texts_file, one_process_scan, tmp_path
):
    """Under torchrun, ``--resume`` on a finished scan folder loads it (nothing rewritten), and
    rank 0's refusal of a folder holding someone else's file reaches the user as one clear
    message, no traceback, on every rank."""
    cwd = texts_file.parent
    before = {p.name: p.stat().st_mtime_ns for p in one_process_scan.iterdir()}
    run = torchrun(*SCAN, "--texts-file", str(texts_file), "--out", "one", "--resume", cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in one_process_scan.iterdir()} == before
    (tmp_path / "notes.txt").write_text("mine")
    run = torchrun(*SCAN, "--texts-file", str(texts_file), "--out", str(tmp_path), cwd=cwd)
    assert run.returncode != 0
    assert run.stderr.count("beyond-top1 did not write") >= 1, run.stderr[-3000:]
    assert "beyond_top1/" not in run.stderr  # no traceback of ours (torchrun prints its own)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


PROBE_RUNS = ("probe-one", "probe-two")


@pytest.mark.slow
def test_the_probe_command_on_two_ranks_writes_the_files_of_one_process(texts_file):
    """``probe`` end to end: its scan into ``OUT/scan`` and the dataset extraction shard over
    the ranks, rank 0 fits and writes; the files equal a one-process run's."""
    cwd = texts_file.parent
    args = ["probe", "--texts-file", str(texts_file), "--max-len", "20", "--batch-size", "2"]
    args += ["--k", "2", "--scan-k", "3", "--min-layer", "20", "--folds", "2"]
    one = beyond_top1(*args, "--out", "probe-one", cwd=cwd)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(*args, "--out", "probe-two", cwd=cwd)
    assert two.returncode == 0, two.stderr[-3000:]
    names = ("cv.json", "cv_folds.csv", "cv_per_layer.csv", "cv_per_class.csv")
    for name in (*names, "rows_per_layer.csv"):
        assert (cwd / "probe-one" / name).read_bytes() == (cwd / "probe-two" / name).read_bytes()
    # the probe file: the same arrays and metadata (its bytes are the same too since probes
    # are written by beyond_top1.safetensors_file; tests/test_probes.py checks that)
    from safetensors import safe_open

    files = [safe_open(str(cwd / run / "probe.safetensors"), "numpy") for run in PROBE_RUNS]
    assert files[0].metadata() == files[1].metadata()
    assert sorted(files[0].keys()) == sorted(files[1].keys())
    for key in files[0].keys():
        assert np.array_equal(files[0].get_tensor(key), files[1].get_tensor(key)), key
    same_scan_files(cwd / "probe-one" / "scan", cwd / "probe-two" / "scan")
    assert two.stdout.count("wrote ") == 1


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` started by the launcher ``parent``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent_pid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent_pid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_rank_killed_mid_scan_stops_the_run_which_resumes_to_the_same_files(
    texts_file, one_process_scan
):
    cwd = texts_file.parent
    args = [*SCAN, "--texts-file", str(texts_file), "--out", "killed"]
    launcher = torchrun(*args, cwd=cwd, popen=True)
    rank1_shard = cwd / "killed" / "shards" / "shard-00001.safetensors"
    deadline = time.monotonic() + 300
    killed = None
    rank0 = None
    while time.monotonic() < deadline and launcher.poll() is None:
        if rank1_shard.exists():
            killed, rank0 = _rank_pid(launcher.pid, 1), _rank_pid(launcher.pid, 0)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    output, _ = launcher.communicate(timeout=300)
    assert killed is not None, output[-2000:]
    assert launcher.returncode != 0
    assert "rank      : 1" in output and "SIGKILL" in output, output[-3000:]
    assert not (cwd / "killed" / "saturation.parquet").exists()
    time.sleep(1)
    assert rank0 is not None and not _alive(rank0)  # no rank is left behind
    resumed = torchrun(*args, "--resume", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_scan_files(one_process_scan, cwd / "killed")
    import json

    timing = [
        json.loads((d / "timing.json").read_text()) for d in (one_process_scan, cwd / "killed")
    ]
    assert timing[1]["tokens_scanned_now"] < timing[0]["tokens_scanned_now"]  # shards reused


@pytest.mark.slow
def test_a_linear_lens_fitted_on_two_ranks_equals_the_one_process_fit(texts_file):
    from beyond_top1 import load_model
    from beyond_top1.lenses import load_lens

    cwd = texts_file.parent
    fit = ["fit-lens", "--kind", "linear", "--texts-file", str(texts_file), "--batch-size", "2"]
    fit += ["--max-len", "20"]
    one = beyond_top1(*fit, "--out", "lens-one", cwd=cwd)
    assert one.returncode == 0, one.stderr
    two = torchrun(*fit, "--out", "lens-two", cwd=cwd)
    assert two.returncode == 0, two.stderr[-3000:]
    model = load_model()
    a, b = load_lens(cwd / "lens-one", model), load_lens(cwd / "lens-two", model)
    settings = [{k: v for k, v in x.fit_settings.items() if k != "seconds"} for x in (a, b)]
    assert settings[0] == settings[1]  # the same texts and token counts
    assert a.fit_settings["n_tokens"] > 100
    for name, x in a.state_dict().items():
        y = b.state_dict()[name]
        scale = x.double().abs().max().clamp_min(1e-30)
        assert float((x.double() - y.double()).abs().max() / scale) <= 1e-6, name


@pytest.mark.slow
def test_a_tuned_lens_trained_on_two_ranks_matches_the_one_process_heldout_kl(tmp_path):
    """Same global batch (4 texts: 2 per rank) and steps; gradients averaged over ranks."""
    from beyond_top1.data import wiki_texts

    texts = [" ".join(t.split())[:160] for t in wiki_texts(24, split="train")]
    (tmp_path / "train.txt").write_text("\n".join(texts), encoding="utf-8")
    args = ["fit-lens", "--kind", "tuned", "--texts-file", "train.txt", "--batch-size", "4"]
    args += ["--max-len", "16", "--max-steps", "6"]
    one = beyond_top1(*args, "--out", "tuned-one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", "tuned-two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    from beyond_top1 import load_model
    from beyond_top1.lenses import load_lens

    model = load_model()
    settings = [
        load_lens(tmp_path / n, model).training_settings for n in ("tuned-one", "tuned-two")
    ]
    assert settings[0]["steps"] == settings[1]["steps"] == 6
    assert settings[0]["tokens"] == settings[1]["tokens"]  # the same texts, split over ranks
    assert settings[1]["ranks"] == 2 and "ranks" not in settings[0]
    kl_one, kl_two = (sum(s["heldout_kl"]) / len(s["heldout_kl"]) for s in settings)
    assert abs(kl_two - kl_one) <= 0.02 * kl_one, (kl_one, kl_two)  # the criterion
    # Every row of each batch is used (tokens_per_layer > rows), so the row-weighted gradient
    # average is the one-process gradient up to rounding (the unembedding runs in bf16 where
    # the CPU has it, and Adam normalises small gradients): the trained translators' held-out
    # KL after the last step (before the best-checkpoint choice) agrees layer by layer (max
    # 8.5e-4 relative measured), while training moved it ~25x more than it disagrees.
    import pandas as pd

    history = [
        pd.read_csv(tmp_path / n / "training_history.csv") for n in ("tuned-one", "tuned-two")
    ]
    last = [h.query("step == 6")["heldout_kl"].to_numpy() for h in history]
    start = history[0].query("step == 0")["heldout_kl"].to_numpy()
    np.testing.assert_allclose(last[1], last[0], rtol=5e-3)
    moved = np.abs(last[0] - start).mean()
    assert moved > 10 * np.abs(last[1] - last[0]).max(), moved


@pytest.mark.slow
def test_lens_metrics_on_two_ranks_equal_the_one_process_metrics(texts_file):
    import pandas as pd

    cwd = texts_file.parent
    args = ["eval-lens", "--texts-file", str(texts_file), "--batch-size", "2", "--max-len", "20"]
    one = beyond_top1(*args, "--out", "eval-one", cwd=cwd)
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", "eval-two", cwd=cwd)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (pd.read_csv(cwd / name / "lens_metrics.csv") for name in ("eval-one", "eval-two"))
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 30
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12)
    assert two.stdout.count("wrote ") == 1


PYTHON_API = """
import sys, torch
import beyond_top1 as bt
from beyond_top1 import distributed
from beyond_top1.probes import task_dataset
from beyond_top1.lenses.metrics import quality_of_fit_matrix
from beyond_top1.replacement import fit_submodule_maps

where = distributed.ranks()
model = bt.load_model()
texts = open(sys.argv[1], encoding="utf-8").read().split("\\n")
scan = bt.scan(model, texts, k=5, batch_size=2, max_len=20, progress=False)  # in memory
data = task_dataset(model, scan, n_tasks=2, min_layer=20, progress=False)
maps = fit_submodule_maps(model, texts, layers=[3, 7], batch_size=3, max_len=20, progress=False)
fit = quality_of_fit_matrix(model, texts[:6], texts[6:], layers=[2, 9, 20], batch_size=2,
                            max_len=20, progress=False)
if where.is_main:
    torch.save({"top_ids": torch.as_tensor(scan.top_ids), "X": torch.as_tensor(data.X),
                "y": torch.as_tensor(data.y), "rows": torch.as_tensor(data.rows),
                "weight": maps.weight, "bias": maps.bias, "mean": maps.mean_output,
                "n_tokens": maps.n_tokens,
                "r2": torch.as_tensor(fit[["r2_linear", "r2_identity"]].to_numpy())}, sys.argv[2])
"""


@pytest.mark.slow
def test_probe_rows_and_submodule_maps_on_two_ranks_equal_one_process(texts_file, tmp_path):
    """The Python API under torchrun: an in-memory scan (gathered), probe rows (extracted per
    rank, all-reduced), sub-module maps and quality-of-fit maps (normal equations and squared
    errors all-reduced)."""
    script = tmp_path / "api.py"
    script.write_text(PYTHON_API, encoding="utf-8")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run = subprocess.run(
        [sys.executable, str(script), str(texts_file), str(one)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    run = subprocess.run(
        [*command, "2", str(script), str(texts_file), str(two)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    for name in ("top_ids", "X", "y", "rows"):
        assert torch.equal(a[name], b[name]), name  # the same batches: the same numbers
    assert len(a["y"]) > 20 and a["n_tokens"] == b["n_tokens"]
    assert a["r2"].shape == (3, 2)  # quality of fit: 3 layer pairs, linear and identity r²
    torch.testing.assert_close(a["r2"], b["r2"], rtol=1e-7, atol=1e-9)
    # The sums differ only in the order of float64 additions (~1e-16 relative); the ridge
    # system of ~90 tokens in 576 dimensions amplifies that by its condition number (~1e7),
    # measured at 1.2e-9 relative here: 1e-7 leaves room for other CPUs.
    for name, tolerance in (("weight", 1e-7), ("bias", 1e-7), ("mean", 1e-12)):
        for kind, x in a[name].items():
            y = b[name][kind]
            assert float((x - y).abs().max() / x.abs().max()) <= tolerance, (name, kind)


def test_the_normal_equations_all_reduce_to_the_one_process_sums(tmp_path):
    """float64 XᵀX summed over 2 gloo ranks equals the one-process sum within round-off."""
    script = tmp_path / "normal_equations.py"
    script.write_text(
        "import torch, sys\n"
        "from beyond_top1 import distributed\n"
        "from beyond_top1.lenses.least_squares import LeastSquaresAccumulator\n"
        "where = distributed.ranks()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "X, Y = torch.randn(101, 7, generator=g), torch.randn(101, 3, generator=g)\n"
        "acc = LeastSquaresAccumulator(7, 3, bias=True)\n"
        "for b in range(0, 101, 10):\n"
        "    if where.owns(b // 10):\n"
        "        acc.update(X[b:b + 10], Y[b:b + 10])\n"
        "acc.all_reduce(where)\n"
        "if where.is_main:\n"
        "    torch.save((acc.n_tokens, *acc.solve(0.0)), sys.argv[1])\n"
    )
    out = tmp_path / "solution.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    run = subprocess.run(
        [*command, "2", str(script), str(out)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    n, weight, bias = torch.load(out)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(101, 7, generator=g).double(), torch.randn(101, 3, generator=g).double()
    design = torch.cat([X, torch.ones(101, 1, dtype=torch.float64)], 1)
    import numpy as np

    reference = np.linalg.lstsq(design.numpy(), Y.numpy(), rcond=None)[0]
    assert n == 101
    np.testing.assert_allclose(weight.numpy(), reference[:7], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bias.numpy(), reference[7], rtol=1e-10, atol=1e-12)


def test_a_rank_that_raises_stops_every_rank_with_its_message(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import sys\n"
        "from beyond_top1 import distributed\n"
        "where = distributed.ranks()\n"
        "def work():\n"
        "    if where.rank == 1:\n"
        "        raise ValueError('text 7 is empty')\n"
        "    return 1\n"
        "try:\n"
        "    distributed.run_checked(work, where)\n"
        "except Exception as exc:\n"
        "    print(f'rank {where.rank} stopped: {type(exc).__name__}: {exc}', flush=True)\n"
        "    sys.exit(3)\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    run = subprocess.run(
        [*command, "2", str(script)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    out = run.stdout
    assert "rank 1 stopped: ValueError: text 7 is empty" in out
    assert "rank 0 stopped: RankFailedError: rank 1 failed: ValueError: text 7 is empty" in out


def test_commands_that_do_not_shard_refuse_torchrun(tmp_path):
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0"}
    command = [sys.executable, "-m", "beyond_top1", "reproduce", "--out", str(tmp_path / "e")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "reproduce does not run under torchrun yet" in run.stderr
    assert "Traceback" not in run.stderr


def test_without_torchrun_there_is_one_rank():
    from beyond_top1 import distributed

    where = distributed.ranks()
    assert (where.rank, where.world_size, where.active) == (0, 1, False)
    assert where.owned(5) == [0, 1, 2, 3, 4]
    two = distributed.Ranks(1, 2)
    assert two.owned(5) == [1, 3] and two.owns(3) and not two.owns(4)
    assert distributed.all_gather("x") == ["x"]
    assert torch.equal(distributed.all_reduce_sum(torch.ones(2)), torch.ones(2))
