"""``--device``: a device this machine lacks is a clear error before anything is read."""

from __future__ import annotations

import pytest
import torch

from synthlesion.config import check_device
from synthlesion.errors import ConfigError


def test_cpu_passes_and_unknown_names_are_refused():
    assert check_device("cpu") == "cpu"
    assert check_device("cpu:0") == "cpu:0"  # torch takes it
    for bad in ("gpu", "cuda:x", "cpu:1", "", "tpu"):
        with pytest.raises(ConfigError, match="use cpu, cuda, cuda:N or mps"):
            check_device(bad)


def test_cuda_without_a_gpu_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU") as caught:
        check_device("cuda")
    assert "CUDA_VISIBLE_DEVICES=''" in str(caught.value) and "--device cpu" in str(caught.value)


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    for odd in ("cuda:", "cuda:01", "cuda:\u0661", "cuda:-1", " cuda:1x"):
        with pytest.raises(ConfigError, match="use cpu, cuda, cuda:N or mps"):
            check_device(odd)  # strings torch.device would refuse with a raw error
    with pytest.raises(ConfigError, match=r"2 GPU\(s\), cuda:0 to cuda:1"):
        check_device("cuda:2")


def test_the_sample_command_refuses_a_missing_gpu_as_a_usage_error(monkeypatch, capsys):
    from synthlesion.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["sample", "--model", "m", "--data", "d", "--splits", "s", "--out", "o"]
    assert main([*argv, "--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_the_api_refuses_it_too(monkeypatch):
    from synthlesion.pipelines.sampling import SampleOptions

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sample options: device 'cuda'"):
        SampleOptions(device="cuda")
