"""Non-blank lines of the code against its budget: the reading path (the files that hold the
algorithm, in the README's reading order) at most 1,400, train.py at most 450, and no file but
the tests over 600.

    python experiments/lines.py           # the table
    python experiments/lines.py --check   # the same, exit 1 when a limit is broken
"""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
READING = ("losses.py", "sampler.py", "cluster.py", "models.py", "lars.py", "train.py")
LIMITS = {"reading path": 1400, "train.py": 450, "any other file": 600}


def non_blank(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def code_files():
    """Every .py and .sh file of the repository but the tests, relative to its root."""
    files = []
    for folder in ("", "experiments", ".ci"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith((".py", ".sh")) and not name.startswith("test_"):
                files.append(os.path.join(folder, name))
    return files


def main(argv):
    counts = {path: non_blank(os.path.join(ROOT, path)) for path in code_files()}
    reading = sum(counts[path] for path in READING)
    print("| file | non-blank lines |\n|---|---|")
    for path, n in counts.items():
        print(f"| {path}{' (reading path)' if path in READING else ''} | {n} |")
    print(f"| reading path ({' + '.join(READING)}) | {reading} |")
    broken = [f"the reading path has {reading} > {LIMITS['reading path']}"] * (
        reading > LIMITS["reading path"])
    broken += [f"train.py has {counts['train.py']} > {LIMITS['train.py']}"] * (
        counts["train.py"] > LIMITS["train.py"])
    broken += [f"{path} has {n} > {LIMITS['any other file']}" for path, n in counts.items()
               if n > LIMITS["any other file"]]
    for line in broken:
        print(f"over budget: {line}", file=sys.stderr)
    if "--check" in argv and broken:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
