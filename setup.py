"""Packaging beside pyproject.toml: the repository's configs/ (the editable recipes) ships in the
wheel as the package data folder pipelines/configs, mapped here rather than copied."""

from setuptools import find_packages, setup

setup(
  packages=find_packages(include=["ops*", "zoo*", "pipelines*"]) + ["pipelines.configs"],
  package_dir={"pipelines.configs": "configs"},
)
