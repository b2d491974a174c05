"""Packages are found, never listed: every package under sspry/ (features, store, query, v1, ...) and,
for each top-level directory mapped under [tool.setuptools.package-dir] in pyproject.toml (server/ ->
sspry.server, client/ -> sspry.client, ...), that package and everything under it. Everything else
(metadata, dependencies, scripts, the mapping itself) lives in pyproject.toml; tests/test_wheel.py
checks the built wheel holds every file of those packages and runs installed."""

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def packages() -> list[str]:
    mapping = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = set(find_packages(where=str(HERE), include=["sspry", "sspry.*"]))
    for package, directory in mapping.items():
        found.add(package)
        found.update(f"{package}.{sub}" for sub in find_packages(where=str(HERE / directory)))
    return sorted(found)


setup(packages=packages())
