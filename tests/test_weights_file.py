"""One reader for every weights file: the classifier's pretrained weights, a trained bundle's model.pt and
the GAN's checkpoints. Bad files give a typed error naming the file; a MemoryError is not disguised."""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from cxr_monai.errors import BundleError, WeightsError
from cxr_monai.gan.trainer import load_checkpoint
from cxr_monai.networks import load_torch_file, read_state_dict


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


_STATE = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([1.0, -1.0])}
_BAD_FILES = {
    "empty": b"",
    "text": b"not a checkpoint",
    "truncated": _saved(_STATE)[:200],
    "unsafe_pickle": pickle.dumps(
        collections.OrderedDict(a={1, 2}), protocol=2
    ),  # a set: refused by weights_only
}


@pytest.mark.parametrize("kind", sorted(_BAD_FILES))
@pytest.mark.parametrize("error", [WeightsError, BundleError])
def test_an_unreadable_file_gives_the_asked_error_naming_it(
    tmp_path: Path, kind: str, error: type[Exception]
) -> None:
    path = tmp_path / f"{kind}.pt"
    path.write_bytes(_BAD_FILES[kind])
    with pytest.raises(error, match=rf"{kind}\.pt is not a readable PyTorch weights file"):
        read_state_dict(path, error)  # type: ignore[arg-type]


def test_a_folder_or_a_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"absent\.pt is not a readable"):
        load_torch_file(tmp_path / "absent.pt")
    with pytest.raises(WeightsError, match=rf"{tmp_path.name} is not a readable"):
        load_torch_file(tmp_path)


def test_memory_error_is_not_reported_as_a_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(_saved(_STATE))

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(MemoryError):
        read_state_dict(path, BundleError)


@pytest.mark.parametrize("wrapper", [None, "network", "model", "state_dict"])
def test_plain_and_wrapped_state_dicts_read_the_same(tmp_path: Path, wrapper: str | None) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(_saved(_STATE if wrapper is None else {wrapper: _STATE, "epoch": 3}))
    state = read_state_dict(path)
    assert list(state) == ["weight", "bias"]
    assert all(torch.equal(state[key], _STATE[key]) for key in _STATE)


def test_a_file_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "numbers.pt"
    path.write_bytes(_saved({"epoch": 3, "loss": 0.5}))
    with pytest.raises(BundleError, match=r"numbers\.pt does not hold a state_dict"):
        read_state_dict(path, BundleError)


@pytest.mark.parametrize("kind", sorted(_BAD_FILES))
def test_the_gan_checkpoint_loader_names_a_bad_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"checkpoint_iteration={len(kind)}.pt"
    path.write_bytes(_BAD_FILES[kind])
    with pytest.raises(BundleError, match=rf"checkpoint {path} is not a readable PyTorch file"):
        load_checkpoint(path, {"generator": nn.Linear(3, 2)})
