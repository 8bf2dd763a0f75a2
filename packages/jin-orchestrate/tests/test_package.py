"""Packaging contract: a single-sourced version, and the leaves pinned by compatible ranges."""

import importlib.metadata

from packaging.requirements import Requirement

import jin_orchestrate

LEAVES = ("jin-encoders", "jin-backbone", "jin-zjepa", "jin-data")


def test_version_matches_installed_metadata():
    assert jin_orchestrate.__version__ == importlib.metadata.version("jin-orchestrate")


def test_leaves_are_required_with_compatible_release_ranges():
    requires = [Requirement(r) for r in importlib.metadata.requires("jin-orchestrate") or []]
    by_name = {r.name: r for r in requires if not r.marker}
    for leaf in LEAVES:
        spec = list(by_name[leaf].specifier)
        assert len(spec) == 1 and spec[0].operator == "~=", f"{leaf}: {by_name[leaf].specifier}"
        installed = importlib.metadata.version(leaf)
        assert by_name[leaf].specifier.contains(installed), f"{leaf} {installed} outside {spec[0]}"
