"""Benchmarks of meshweave against theory and peers (bench/README.md).

Each module is one experiment, run from the repository root as ``python -m bench.<name>``;
``bench._common`` holds what they share and ``bench._netns`` the shaped-link namespaces.
"""
