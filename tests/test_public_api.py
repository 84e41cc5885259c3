"""`model/__init__.py` is the stable public face: its names resolve, and importing it is cheap."""
import subprocess
import sys

import model
from conftest import ROOT


def test_every_exported_name_resolves_to_the_object_of_its_room():
    from model.lora.layers import inject_lora
    from model.sd.loader import load_pipeline
    from model.validator.train import train
    for name in model.__all__:
        assert getattr(model, name) is not None, name
    assert model.load_pipeline is load_pipeline and model.inject_lora is inject_lora
    assert model.train_classifier is train  # renamed on the way out


def test_an_unknown_name_is_an_attribute_error():
    try:
        model.no_such_entry_point
    except AttributeError as e:
        assert "no_such_entry_point" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_import_model_loads_no_room():
    code = "import sys, model; print(sorted(m for m in sys.modules if m.startswith('model.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
