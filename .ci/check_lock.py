"""Exits 1 (naming them) when an installed package differs from requirements.lock: CI must
run the suite on exactly the locked versions."""

import importlib.metadata
import pathlib
import re
import sys

lock = pathlib.Path(__file__).resolve().parents[1] / "requirements.lock"
wrong = []
for line in lock.read_text().splitlines():
    match = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
    if not match:
        continue
    name, version = match.groups()
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        wrong.append(f"{name} {installed} (locked {version})")
if wrong:
    sys.exit(f"{lock.name}: installed versions differ: {', '.join(wrong)}")
print(f"{lock.name}: all {sum(1 for l in lock.read_text().splitlines() if '==' in l)} locked versions installed")
