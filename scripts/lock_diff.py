"""Print how the packages installed in a virtual environment differ from a lock file.

    python scripts/lock_diff.py requirements/lock.txt .venv-latest
"""

import re
import subprocess
import sys


def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^ ;]+)", line.strip())
        if m:
            out[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2].split("+")[0]
    return out


def main(lock_path: str, venv: str) -> int:
    locked = pins(open(lock_path))
    frozen = subprocess.run([f"{venv}/bin/python", "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    installed = pins(frozen)
    changes = [f"  {n}: {locked[n]} -> {installed[n]}" for n in sorted(locked.keys() & installed.keys())
               if locked[n] != installed[n]]
    changes += [f"  {n}: new, {installed[n]}" for n in sorted(installed.keys() - locked.keys())]
    changes += [f"  {n}: {locked[n]}, no longer installed" for n in sorted(locked.keys() - installed.keys())]
    print("\n".join(changes) if changes else "  no differences")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
