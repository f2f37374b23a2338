"""Mutation testing: does the test suite notice plausible bugs?

    python tests/mutation/run.py                 # every mutant in tests/mutation/mutants.py
    python tests/mutation/run.py --list          # names, files, descriptions
    python tests/mutation/run.py --only rank_dropout_no_rescale --only exif_5_7_not_swapped
    python tests/mutation/run.py --timeout 300 --json results.json
    python tests/mutation/run.py --only exif_5_7_not_swapped --tests "tests/test_data_images.py::test_every_exif_orientation_gives_probed_size_and_reference_pixels"

Each mutant replaces one exact snippet of one source file. The repository is copied once (the
files `git ls-files --cached --others --exclude-standard` lists, as they are in the working tree)
into a temporary folder; every mutant is applied there, its test files run with
`python -m pytest -x -q -p no:xdist` (cwd = the copy, the copy first on PYTHONPATH, no bytecode
written, so an edited file is never shadowed by a stale .pyc), and the file is restored. The
working tree is never written to: other people may be editing it.

Outcomes: killed (tests failed or errored), survived (tests passed), timeout (counted as killed),
snippet not found / ambiguous (the source moved on: update the mutant), mutant does not
compile (a syntax break is not a plausible bug, so it is never counted), no tests (the named test
files ran nothing), baseline red (the unmutated copy already fails those tests, so a failure says
nothing; fix the tests first). Kill ratio = (killed + timeout) / (killed + timeout + survived);
mutants marked `equivalent` (no behaviour change to detect) are reported but left out of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mutants import MUTANTS, Mutant

REPO = HERE.parents[1]
PACKAGES = ("models", "data", "trainer")
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"]


def copy_repository(dest: Path) -> int:
    """Copy the repository's tracked and untracked-but-not-ignored files (working-tree contents)
    into `dest`; returns the number of files. Files deleted in the working tree are skipped."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    count = 0
    for rel in filter(None, listing):
        src = REPO / rel
        if not src.is_file() or src.is_symlink():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        count += 1
    return count


def child_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file must never meet a mutant's cached bytecode
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_isolation(copy: Path, env: dict[str, str]) -> None:
    """Make sure the child imports the copy, not the editable install in the working tree: the
    packages must resolve inside the copy, and a canary edit in the copy must be what is imported."""
    probe = "import importlib, sys; print('\\n'.join(importlib.import_module(p).__file__ for p in sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", probe, *PACKAGES], cwd=copy, env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        sys.exit(f"mutation: cannot import {PACKAGES} in the copy:\n{out.stderr}")
    for path in out.stdout.split():
        if not Path(path).resolve().is_relative_to(copy.resolve()):
            sys.exit(f"mutation: the child imports {path}, outside the copy {copy}; PYTHONPATH isolation failed")
    init = copy / "models" / "__init__.py"
    original = init.read_text()
    try:
        init.write_text(original + "\nMUTATION_CANARY = 1\n")
        out = subprocess.run([sys.executable, "-c", "import models; print(models.MUTATION_CANARY)"],
                             cwd=copy, env=env, capture_output=True, text=True, check=False)
    finally:
        init.write_text(original)
    if out.stdout.strip() != "1":
        sys.exit(f"mutation: an edit in the copy is not what the child imports:\n{out.stderr}")


def run_tests(copy: Path, env: dict[str, str], tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, last output lines) of pytest on `tests` in the copy."""
    start = time.monotonic()
    try:
        proc = subprocess.run([*PYTEST, *tests], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    seconds = time.monotonic() - start
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    # -q prints "FAILED <node id> - <message>" for the test that stopped the run (-x)
    failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    tail = failed[0][:160] if failed else "\n".join(lines[-3:])
    # pytest exit codes: 0 passed, 1 failed, 2 interrupted/collection error, 3 internal error,
    # 4 usage error, 5 nothing collected.
    outcome = {0: "passed", 1: "failed", 2: "failed", 3: "failed", 5: "no tests"}.get(proc.returncode, "usage error")
    return outcome, seconds, tail


def apply(copy: Path, m: Mutant) -> tuple[str | None, str | None]:
    """Write the mutant into the copy. Returns (original text, None) or (None, why not)."""
    path = copy / m.file
    if not path.is_file():
        return None, f"file {m.file} not found"
    text = path.read_text()
    n = text.count(m.original)
    if n == 0:
        return None, "snippet not found"
    if n > 1:
        return None, f"ambiguous snippet ({n} matches)"
    mutated = text.replace(m.original, m.replacement)
    if path.suffix == ".py":
        try:
            compile(mutated, str(path), "exec")
        except SyntaxError as exc:  # a broken file is not a plausible bug: never count it as killed
            return None, f"mutant does not compile ({exc.msg}, line {exc.lineno})"
    path.write_text(mutated)
    return text, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the mutants of tests/mutation/mutants.py in a copy of the repository.")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this mutant (repeatable; comma-separated names also work)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per mutant run before 'timeout' (default: 4x the baseline run + 60, or 600)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test set")
    ap.add_argument("--tests", nargs="+", metavar="NODE",
                    help="run these test files / node ids instead of each mutant's own (does a new test kill it?)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = ap.parse_args(argv)

    names = [n for chunk in args.only for n in chunk.split(",") if n]
    known = {m.name for m in MUTANTS}
    if len(known) != len(MUTANTS):
        sys.exit("mutation: duplicate mutant names in mutants.py")
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"mutation: unknown mutant(s) {unknown}; see --list")
    chosen = [m for m in MUTANTS if not names or m.name in names]
    if args.tests:
        chosen = [dataclasses.replace(m, tests=tuple(args.tests)) for m in chosen]

    if args.list:
        width = max(len(m.name) for m in chosen)
        for m in chosen:
            eq = "  [equivalent]" if m.equivalent else ""
            print(f"{m.name:<{width}}  {m.file}: {m.description}{eq}\n{'':<{width}}  tests: {' '.join(m.tests)}")
        print(f"{len(chosen)} mutants")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="lorasmith-mutation-"))
    copy = tmp / "repo"
    try:
        n_files = copy_repository(copy)
        env = child_env(copy)
        check_isolation(copy, env)
        print(f"copied {n_files} files to {copy}; the child imports the copy", flush=True)

        baseline: dict[tuple[str, ...], str] = {}
        limit: dict[tuple[str, ...], float] = {}
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                outcome, secs, tail = run_tests(copy, env, tests, args.timeout or 600.0)
                baseline[tests] = outcome
                # a mutant that makes the tests loop is a timeout (a kill), not a wait of hours
                limit[tests] = args.timeout or 4 * secs + 60
                mark = "" if outcome == "passed" else f"  <- {outcome}: mutants using these tests are not judged\n{tail}"
                print(f"baseline {' '.join(tests)}: {outcome} ({secs:.0f}s){mark}", flush=True)

        results = []
        for i, m in enumerate(chosen, 1):
            secs, detail = 0.0, ""
            if baseline.get(m.tests, "passed") != "passed":
                status = "baseline red"
            else:
                original, why = apply(copy, m)
                if original is None:
                    status = why
                else:
                    try:
                        timeout = limit.get(m.tests, args.timeout or 600.0)
                        outcome, secs, detail = run_tests(copy, env, m.tests, timeout)
                    finally:
                        (copy / m.file).write_text(original)
                    status = {"passed": "survived", "failed": "killed"}.get(outcome, outcome)
            results.append({"name": m.name, "file": m.file, "status": status, "seconds": round(secs, 1),
                            "equivalent": m.equivalent, "description": m.description, "tests": list(m.tests),
                            "detail": detail if status == "killed" else ""})
            eq = " (equivalent)" if m.equivalent else ""
            print(f"[{i}/{len(chosen)}] {m.name}: {status}{eq} ({secs:.0f}s)", flush=True)
            if status == "killed":
                print(f"    by {detail.splitlines()[-1] if detail else '?'}", flush=True)
                if m.equivalent:
                    print("    marked equivalent but killed: revisit its note", flush=True)
            elif status == "survived" and not m.equivalent:
                print(f"    survived: {m.description}", flush=True)
            elif status.startswith(("snippet", "ambiguous", "file", "mutant does not compile")):
                print(f"    {m.file}: update this mutant's snippet", flush=True)
    finally:
        if args.keep:
            print(f"copy kept at {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    judged = [r for r in results if r["status"] in ("killed", "timeout", "survived") and not r["equivalent"]]
    return 0 if all(r["status"] != "survived" for r in judged) else 1


def print_table(results: list[dict]) -> None:
    if not results:
        return
    w_name = max(len(r["name"]) for r in results)
    w_file = max(len(r["file"]) for r in results)
    w_status = max(len(r["status"]) for r in results) + len(" (equivalent)")
    print()
    print(f"{'mutant':<{w_name}}  {'file':<{w_file}}  {'status':<{w_status}}  seconds")
    for r in results:
        status = r["status"] + (" (equivalent)" if r["equivalent"] else "")
        print(f"{r['name']:<{w_name}}  {r['file']:<{w_file}}  {status:<{w_status}}  {r['seconds']:>7.1f}")
    detected = sum(r["status"] in ("killed", "timeout") for r in results if not r["equivalent"])
    survived = sum(r["status"] == "survived" for r in results if not r["equivalent"])
    equivalent = sum(bool(r["equivalent"]) for r in results)
    other = [r for r in results if r["status"] not in ("killed", "timeout", "survived")]
    judged = detected + survived
    ratio = f"{detected}/{judged} = {detected / judged:.0%}" if judged else "n/a"
    print(f"\nkill ratio {ratio} (killed or timed out / judged); {equivalent} equivalent mutant(s) left out; "
          f"{len(other)} not run ({', '.join(sorted({r['status'] for r in other})) or '-'})")


if __name__ == "__main__":
    sys.exit(main())
