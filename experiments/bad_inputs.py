"""Bad inputs and faults, tried as a user would (issue 13): exit code, message, anything lost.

Each case runs ``beyond-top1`` in a fresh process inside a scratch folder seeded with a user's
files; the table records the exit code, the first line of stderr, whether a traceback was
printed, and whether any file of the user's changed or vanished.

    python experiments/bad_inputs.py --out runs/bad_inputs.md
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from beyond_top1.fileio import write_signed_file

MODEL = ["--model", "untrained:gpt2-small"]  # offline, loads in seconds
HEADER = (
    "| case | exit | message (its own line: stderr on error, stdout on success) | traceback "
    "| user files lost or changed |"
)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "runs" not in p.relative_to(root).parts
    }


def seed_user_files(root: Path) -> None:
    (root / "hf_model").mkdir()
    (root / "hf_model" / "config.json").write_text('{"model_type": "llama"}\n')
    (root / "hf_model" / "other.txt").write_text("a user's file\n")
    (root / "texts.txt").write_text("The cat sat on the mat.\nParis is the capital of France.\n")
    (root / "bad.txt").write_bytes(b"fine\nsecond \xff line\n")
    (root / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "The cat sat on the mat."}\n')
    (root / "empty_line.jsonl").write_text('{"text": "fine"}\n{"text": "  "}\n')
    (root / "a_file").write_text("mine\n")
    sentences = [
        f"Sentence number {i} of a longer file, about the history of town {i}." for i in range(40)
    ]
    (root / "many.txt").write_text("\n".join(sentences) + "\n")


def default_sigint() -> None:
    """Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, and a
    child inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args: str, cwd: Path, interrupt_after: float | None = None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "beyond_top1", *args]
    if interrupt_after is None:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.time() + 300
    shards = cwd / "runs" / "interrupted" / "shards"
    while time.time() < deadline and process.poll() is None:  # Ctrl-C after the first shard
        if shards.is_dir() and any(shards.iterdir()):
            break
        time.sleep(0.2)
    time.sleep(interrupt_after)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def held(lock: Path) -> bool:
    """Whether another process holds the folder's lock (the file may outlive its holder)."""
    if not lock.exists():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def two_writers(scan: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A second ``--resume`` on the folder while a first one is running: the second's result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "beyond_top1", *scan, "--resume"]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen(command, cwd=cwd, env=env, preexec_fn=default_sigint, **pipes)
    lock = cwd / "runs" / "interrupted" / ".beyond-top1.lock"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not held(lock):
        time.sleep(0.1)
    second = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=300)
    return second


CASES = [
    (
        "lens saved over a folder with someone's config.json",
        ["fit-lens", "--kind", "linear", "--texts-file", "texts.txt", "--out", "hf_model", *MODEL],
    ),
    (
        "lens saved to --out . (a user's folder)",
        ["fit-lens", "--kind", "linear", "--texts-file", "texts.txt", "--out", ".", *MODEL],
    ),
    ("--device cuda on a machine without CUDA", ["lens", "hello", "--device", "cuda"]),
    ("--device banana", ["lens", "hello", "--device", "banana"]),
    (
        "scan --max-len 5000",
        ["scan", "--texts-file", "texts.txt", "--max-len", "5000", "--out", "runs/s1", *MODEL],
    ),
    (
        "scan --max-len 0",
        ["scan", "--texts-file", "texts.txt", "--max-len", "0", "--out", "runs/s2", *MODEL],
    ),
    (
        "scan --max-len -5",
        ["scan", "--texts-file", "texts.txt", "--max-len", "-5", "--out", "runs/s3", *MODEL],
    ),
    (
        "scan --batch-size 0",
        ["scan", "--texts-file", "texts.txt", "--batch-size", "0", "--out", "runs/s4", *MODEL],
    ),
    (
        "scan of a file with an empty text",
        ["scan", "--texts-file", "empty_line.jsonl", "--out", "runs/s5", *MODEL],
    ),
    (
        "reproduce --force nonexistent-stage",
        ["reproduce", "--scale", "test", "--out", "runs/r", "--force", "nonexistent-stage"],
    ),
    (
        "reproduce --set scan_texts=-5",
        ["reproduce", "--scale", "test", "--out", "runs/r", "--set", "scan_texts=-5"],
    ),
    ("scan --out that is a file", ["scan", "--texts-file", "texts.txt", "--out", "a_file", *MODEL]),
    (
        "scan --out under /proc (cannot be created)",
        ["scan", "--texts-file", "texts.txt", "--out", "/proc/bt/x", *MODEL],
    ),
    (
        "fit-lens --out under a file (after the fit, before)",
        [
            "fit-lens",
            "--kind",
            "linear",
            "--texts-file",
            "texts.txt",
            "--out",
            "a_file/lens",
            *MODEL,
        ],
    ),
    ("reproduce --out <file>", ["reproduce", "--scale", "test", "--out", "a_file"]),
    (
        "non-UTF-8 bytes in --texts-file",
        ["scan", "--texts-file", "bad.txt", "--out", "runs/s6", *MODEL],
    ),
    (
        "UTF-8 BOM in .jsonl (accepted)",
        ["scan", "--texts-file", "bom.jsonl", "--out", "runs/s7", "--k", "3", *MODEL],
    ),
    ("unknown --model", ["lens", "hello", "--model", "gpt2-smal"]),
    ("lens --lens for another model", ["lens", "hello", "--lens", "runs/gpt2-lens"]),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    if args.out and Path(args.out).exists() and HEADER.encode() not in Path(args.out).read_bytes():
        p.error(f"--out {args.out}: refusing to replace a file this script did not write")
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    seed_user_files(root)
    # a lens fitted on another model, for the last case
    cli("fit-lens", "--kind", "linear", "--texts-file", "texts.txt", "--out", "runs/gpt2-lens",
        *MODEL, cwd=root)  # fmt: skip
    rows = []
    for name, command in CASES:
        before = snapshot(root)
        result = cli(*command, cwd=root)
        rows.append((name, result, before, snapshot(root)))
    # Ctrl-C during a scan, then --resume; two writers on one folder
    before = snapshot(root)
    scan = ["scan", "--texts-file", "many.txt", "--out", "runs/interrupted", "--batch-size",
            "1", "--k", "3", *MODEL]  # fmt: skip
    rows.append(("Ctrl-C during a scan (after its first shard)",
                 cli(*scan, cwd=root, interrupt_after=0.5), before, snapshot(root)))  # fmt: skip
    before = snapshot(root)
    rows.append(("a second writer while --resume runs", two_writers(scan, root), before,
                 snapshot(root)))  # fmt: skip
    before = snapshot(root)
    rows.append(("... then the same command with --resume", cli(*scan, "--resume", cwd=root),
                 before, snapshot(root)))  # fmt: skip
    rows.append(("--resume on the finished scan", cli(*scan, "--resume", cwd=root), before,
                 snapshot(root)))  # fmt: skip
    lines = [HEADER, "|---|---|---|---|---|"]
    for name, result, before, after in rows:
        if result.returncode == 0:  # what it printed, not its progress bars
            message = (result.stdout.strip().splitlines() or [""])[0]
        else:  # the tool's own line (progress bars end in carriage returns)
            err = result.stderr.replace("\r", "\n").splitlines()
            ours = [line[line.index("beyond-top1") :] for line in err if "beyond-top1" in line]
            message = (ours or [line for line in err if line.strip()] or [""])[0]
        lost = [k for k in before if before[k] != after.get(k)]
        lines.append(
            f"| {name} | {result.returncode} | {message[:160].replace('|', '/')} | "
            f"{'yes' if 'Traceback' in result.stderr else 'no'} | "
            f"{', '.join(lost) if lost else 'none'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:  # replaces only a table this script wrote (its header is the signature)
        write_signed_file(args.out, lambda tmp: tmp.write_text(table + "\n"), HEADER.encode())
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
