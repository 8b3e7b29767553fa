"""The environment the Makefile builds: the pinned CPU torch, and no vision package beside it
(PyPI's build does not import beside this torch and breaks lightning/peft at import, DESIGN.md)."""

import importlib.util

import torch


def test_pinned_torch_and_no_torchvision():
    assert torch.__version__.startswith("2.13.0")
    assert importlib.util.find_spec("torchvision") is None


def test_sam_modeling_imports_without_the_package_init():
    import sys

    import medfound.models.sam_import  # noqa: F401

    assert "segment_anything.modeling" in sys.modules and "segment_anything.predictor" not in sys.modules
