"""The SavedModel signature reader on real SavedModels built by TensorFlow (the example's
Keras export path and a tf.Module with other dtypes and an unknown rank), compared with what
TensorFlow itself reports of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.domain.savedmodel import SavedModelError, read_signature
from tests.registryutil import build_savedmodels


@pytest.fixture(scope="session")
def real_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    where = tmp_path_factory.mktemp("savedmodels")
    return where, build_savedmodels(where)


@pytest.mark.parametrize("kind", ["keras", "module"])
def test_signature_matches_tensorflow(real_models: tuple[Path, dict[str, Any]], kind: str) -> None:
    where, tf_view = real_models
    ours = read_signature((where / kind / "saved_model.pb").read_bytes())
    assert ours == tf_view[kind]
    assert ours["method_name"] == "tensorflow/serving/predict"


def test_the_keras_export_reads_as_the_example_defines_it(
    real_models: tuple[Path, dict[str, Any]],
) -> None:
    where, _ = real_models
    sig = read_signature((where / "keras" / "saved_model.pb").read_bytes())
    assert sig["inputs"] == {"features": {"dtype": "DT_FLOAT", "shape": [-1, 20]}}
    assert sig["outputs"] == {"output_0": {"dtype": "DT_FLOAT", "shape": [-1, 1]}}


def test_real_file_truncated_or_corrupted_is_a_typed_error(
    real_models: tuple[Path, dict[str, Any]],
) -> None:
    where, _ = real_models
    data = (where / "module" / "saved_model.pb").read_bytes()
    for cut in range(1, len(data), max(1, len(data) // 500)):
        try:
            read_signature(data[:cut])
        except SavedModelError:
            pass
    with pytest.raises(SavedModelError):
        read_signature(data[: len(data) - 3])
    with pytest.raises(SavedModelError):
        read_signature(b"\x12\xff\xff\xff\xff\x0f" + data)
