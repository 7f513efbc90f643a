"""Mutation check: do the tests catch deliberate breaks of the formulas they guard?

    python tests/mutations.py              # every mutation (slow: minutes; not part of CI)
    python tests/mutations.py ddpm         # only those whose name contains "ddpm"
    python tests/mutations.py --list       # list them

Each test file may define a module-level literal list MUTATIONS of dicts:
    {"name": "ddpm-decoder-edges",                      # unique, short
     "file": "ddpm.py",                                 # the file to break (relative to the project root)
     "find": "text that occurs exactly once",           # ... replaced by
     "replace": "the broken text",
     "tests": ["tests/test_ddpm.py::test_decoder_edges"]}  # the tests that should fail
For each one this script copies the project to a temporary folder, applies the break there (the working
tree is never touched), runs the named tests and reports CAUGHT (they failed), SURVIVED (they passed: the
tests do not guard that formula) or STALE (the find text is not in the file exactly once: update it).
Exit status 1 if any mutation survived or went stale. Run it before resolving an issue that touches a formula.
"""
import ast
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collect():
    """Every MUTATIONS entry of tests/test_*.py, read with ast (the test modules are not imported)."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MUTATIONS" for t in node.targets):
                out += ast.literal_eval(node.value)
    names = [m["name"] for m in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        sys.exit(f"mutations.py: duplicate mutation names: {', '.join(sorted(dup))}")
    return out


def run_one(m, workdir):
    """Apply one mutation in workdir, run its tests, undo it; return (verdict, seconds)."""
    path = os.path.join(workdir, m["file"])
    original = open(path).read()
    if original.count(m["find"]) != 1:
        return "STALE", 0.0
    with open(path, "w") as f:
        f.write(original.replace(m["find"], m["replace"]))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m["tests"]],
                           cwd=workdir, capture_output=True, text=True, timeout=1800)
        verdict = {0: "SURVIVED", 1: "CAUGHT"}.get(r.returncode, f"ERROR (pytest exit {r.returncode})")
    finally:
        with open(path, "w") as f:
            f.write(original)
    return verdict, time.time() - t0


def main(argv):
    muts = collect()
    if "--list" in argv:
        for m in muts:
            print(f"{m['name']:40s} {m['file']:14s} {' '.join(m['tests'])}")
        return 0
    pattern = next((a for a in argv if not a.startswith("-")), "")
    muts = [m for m in muts if pattern in m["name"]]
    if not muts:
        print(f"mutations.py: no mutation matches {pattern!r}", file=sys.stderr)
        return 2
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "project")
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache"))
        for m in muts:
            verdict, secs = run_one(m, work)
            bad += verdict != "CAUGHT"
            print(f"{verdict:9s} {m['name']:40s} ({secs:.0f} s)", flush=True)
    print(f"{len(muts) - bad} of {len(muts)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
