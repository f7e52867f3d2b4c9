"""Run the commands of README.md and docs/*.md as written, to catch drift between docs and code.

Each ```bash block of a page is read line by line (``\\`` continues a line; ``#`` starts a comment)
and its commands run in order, from the root of a scratch copy of the repository (the tracked files,
with this checkout's ``.venv`` linked in), so ``runs/...`` paths one command writes are there for
the next. Each page gets its own fresh copy (pages are read on their own: most start by training
``runs/quickstart``). Lines that cannot run here are skipped with their reason
(placeholders such as ``path/to/``, other hosts, servers, installs); everything else must exit 0.

``--quick`` shortens every ``jaxeff train`` to a few steps (dotted overrides appended) and skips the
experiments' studies, so the whole check takes minutes, not hours; without it each command runs
exactly as written.

    .venv/bin/python scripts/check_docs.py --quick            # every page
    .venv/bin/python scripts/check_docs.py --quick docs/peft.md
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (pattern, reason): lines that cannot run on this machine as written
SKIP = [
    (r"pytest", "the test suite (CI runs it)"),
    (r"-m venv|pip install", "set-up (the check runs inside the installed .venv)"),
    (r"tensorboard --logdir", "starts a server"),
    (r"path/to/|\bDIR\b|\bRUN\b|cfg\.yaml|\bmodels/|10\.0\.0\.1|<[a-z_]+>", "a placeholder, not a real path"),
    (r"runs/smol|runs/base_lora|runs/base_merged", "made from a placeholder above"),
    (r"distributed\.|JAX_CPU_COLLECTIVES|jax\.distributed", "multi-process launch (tested in tests/jaxeff/test_processes.py)"),
    (r"device_bench\.sh|--transformers-python|--peft-python|check_sm90\.py", "needs a GPU or a side environment"),
    (r"^\s*(export|cd|git worktree)\b", "shell set-up"),
    (r"^\s*(wait|done|for)\b", "a shell loop (multi-process launch)"),
]
QUICK_TRAIN = ["train.steps=4", "train.eval_every=4", "train.log_every=2", "train.eval_batches=1", "checkpoint.every=4"]
# page order: the quickstart run first (the other pages start from it)
FIRST = ["README.md"]


def commands(page: Path) -> list[str]:
    out, block, buf = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash" and not block
            buf = ""
            continue
        if not block:
            continue
        text = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        text = (buf + text).strip()
        buf = ""
        if text:
            out.append(text)
    return out


def setup_tail(cmd: str) -> str:
    """The README's set-up lines create the venv, install, then run something: keep what they run
    after the install (the check runs in the installed .venv)."""
    if "pip install" in cmd and "&&" in cmd:
        parts = [p.strip() for p in cmd.split("&&")]
        last = max(i for i, p in enumerate(parts) if "pip install" in p)
        return " && ".join(parts[last + 1 :])
    return cmd


def skip_reason(cmd: str, quick: bool) -> str | None:
    for pattern, reason in SKIP:
        if re.search(pattern, cmd):
            return reason
    if quick and "experiments/" in cmd:
        return "a study (runs without --quick)"
    return None


def quicken(cmd: str) -> str:
    """Append the short-run overrides to each ``jaxeff train`` of a command line."""
    parts = re.split(r"(&&|;)", cmd)
    return "".join(p.rstrip() + " " + " ".join(QUICK_TRAIN) + " " if re.search(r"jaxeff train\b", p) else p for p in parts).strip()


def scratch_copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="jaxeff_docs_"))
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        dst = tmp / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst)
    (tmp / ".venv").symlink_to(ROOT / ".venv")
    return tmp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pages", nargs="*", help="pages to check (default: README.md and docs/*.md)")
    p.add_argument("--quick", action="store_true", help="short training runs; skip the studies")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = p.parse_args(argv)
    pages = [Path(x) for x in args.pages] or [ROOT / f for f in FIRST] + sorted((ROOT / "docs").glob("*.md"))
    if not (ROOT / ".venv" / "bin" / "jaxeff").exists():
        print("error: .venv/bin/jaxeff not found (install first, see README)", file=sys.stderr)
        return 2
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    failed, ran, skipped = [], 0, 0
    t0 = time.time()
    for page in pages:  # each page in a fresh copy: its commands build on each other, not on other pages
        work = scratch_copy()
        rel = page.resolve().relative_to(ROOT)
        try:
            for cmd in filter(None, map(setup_tail, commands(page))):
                why = skip_reason(cmd, args.quick)
                if why:
                    skipped += 1
                    print(f"skip  {rel}: {cmd[:100]}  ({why})", flush=True)
                    continue
                run = quicken(cmd) if args.quick else cmd
                start = time.time()
                try:
                    r = subprocess.run(["bash", "-c", run], cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
                    code, tail = r.returncode, (r.stderr.strip().splitlines() or [""])[-1]
                except subprocess.TimeoutExpired:
                    code, tail = "timeout", ""
                ran += 1
                status = "ok   " if code == 0 else "FAIL "
                print(
                    f"{status} {rel}: {cmd[:100]}  [{time.time() - start:.0f} s]" + ("" if code == 0 else f"\n      exit {code}: {tail[:300]}"), flush=True
                )
                if code != 0:
                    failed.append(f"{rel}: {cmd}")
        finally:
            if args.keep:
                print(f"scratch copy kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    print(f"{ran - len(failed)} passed, {len(failed)} failed, {skipped} skipped ({time.time() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
