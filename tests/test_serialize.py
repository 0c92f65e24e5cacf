"""save -> load round trips; damaged, mismatched and future files raise LoadError naming the file."""
from __future__ import annotations

import json
import os

import pytest
import torch

import relu2dlgn
from _models import AllForms, TinyNet, build, randomize_bn


def _roundtrip(dlgn, tmp_path, x):
    path = tmp_path / "m"
    dlgn.save(path)
    loaded = relu2dlgn.load(path)
    assert loaded.training == dlgn.training
    with torch.no_grad():
        for a, b in zip(dlgn(x) if isinstance(dlgn(x), tuple) else (dlgn(x),),
                        loaded(x) if isinstance(loaded(x), tuple) else (loaded(x),)):
            assert torch.equal(a, b)
    assert [s.as_dict() for s in loaded.sites] == [s.as_dict() for s in dlgn.sites]
    assert loaded.beta == dlgn.beta and loaded.mode == dlgn.mode and loaded.value_input == dlgn.value_input
    return loaded, path


@pytest.mark.parametrize("mode", ["dlgn", "dgn"])
def test_roundtrip_allforms(tmp_path, mode):
    dlgn = relu2dlgn.convert(randomize_bn(AllForms()).eval(), mode=mode, value_input="ones", beta=7.0).eval()
    loaded, _ = _roundtrip(dlgn, tmp_path, torch.randn(2, 3, 24, 24))
    loaded.train()
    loaded(torch.randn(2, 3, 24, 24))[0].sum().backward()          # still trainable
    assert all(p.grad is not None for p in loaded.gating.parameters())


def test_roundtrip_timm_vgg_with_specialisation(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    dlgn = relu2dlgn.convert(build("timm:vgg11"), mode="dlgn", example_inputs=x[:1]).eval()
    loaded, _ = _roundtrip(dlgn, tmp_path, x)
    with pytest.raises(relu2dlgn.SpecialisationError):
        loaded(torch.randn(1, 3, 224, 224))


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path):
    d1 = relu2dlgn.convert(TinyNet(), mode="dlgn").eval()
    d2 = relu2dlgn.convert(TinyNet(num_classes=3), mode="dlgn").eval()
    d1.save(tmp_path / "m")
    d2.save(tmp_path / "m")
    assert os.listdir(tmp_path) == ["m"]
    assert relu2dlgn.load(tmp_path / "m")(torch.randn(1, 3, 8, 8)).shape == (1, 3)


def test_save_refuses_unrelated_directory_and_unwritable_parent(tmp_path):
    d = relu2dlgn.convert(TinyNet(), mode="dlgn")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(OSError, match="not a relu2dlgn save directory"):
        d.save(tmp_path / "data")
    assert os.listdir(tmp_path / "data") == ["precious.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="cannot create directory"):
        d.save(tmp_path / "afile" / "m")
    assert sorted(os.listdir(tmp_path)) == ["afile", "data"]
    d.save(tmp_path / "new" / "nested" / "m")                  # missing parents are created
    assert relu2dlgn.load(tmp_path / "new" / "nested" / "m").mode == "dlgn"


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m"
    relu2dlgn.convert(TinyNet(), mode="dlgn").save(path)
    return path


def test_load_truncated_weights(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(relu2dlgn.LoadError, match=r"model\.safetensors: corrupted or truncated"):
        relu2dlgn.load(saved)


def test_load_corrupted_graphs(saved):
    (saved / "graphs.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(relu2dlgn.LoadError, match=r"graphs\.pt: corrupted"):
        relu2dlgn.load(saved)


def test_load_weights_of_another_architecture(saved, tmp_path):
    other = tmp_path / "other"
    relu2dlgn.convert(TinyNet(num_classes=4), mode="dlgn").save(other)
    os.replace(other / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(relu2dlgn.LoadError, match=r"do not match.*value\.fc\.weight: \(4, 16\) vs \(10, 16\)"):
        relu2dlgn.load(saved)
    relu2dlgn.convert(AllForms(), mode="dlgn").save(other)
    os.replace(other / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(relu2dlgn.LoadError, match="missing.*unexpected"):
        relu2dlgn.load(saved)


def test_load_newer_format_and_garbage_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(relu2dlgn.LoadError, match="format version 99 .* newer relu2dlgn"):
        relu2dlgn.load(saved)
    (saved / "config.json").write_text("{")
    with pytest.raises(relu2dlgn.LoadError, match="config.json: unreadable or corrupted"):
        relu2dlgn.load(saved)


def test_load_not_a_model(tmp_path):
    with pytest.raises(relu2dlgn.LoadError, match="not a saved relu2dlgn model"):
        relu2dlgn.load(tmp_path)


def test_interrupted_replacement_falls_back_to_previous_save(tmp_path, monkeypatch):
    d1 = relu2dlgn.convert(TinyNet(), mode="dlgn").eval()
    d1.save(tmp_path / "m")
    real_rename = os.rename
    calls = []

    def dying_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:                      # the new directory never reaches its place
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        relu2dlgn.convert(TinyNet(num_classes=3), mode="dlgn").save(tmp_path / "m")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "m").exists()
    with pytest.warns(UserWarning, match="interrupted save"):
        loaded = relu2dlgn.load(tmp_path / "m")
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(loaded(x), d1(x))


@pytest.mark.parametrize("mode", ["dlgn", "dgn"])
def test_format_version_1_saves_still_load(mode):
    """Directories written by relu2dlgn 0.1 (format version 1, committed under tests/data) load and compute what
    they computed when they were saved; the DGN still equals its source network."""
    here = os.path.join(os.path.dirname(__file__), "data", "format_v1")
    ref = torch.load(os.path.join(here, "reference.pt"))
    loaded = relu2dlgn.load(os.path.join(here, mode))
    assert json.load(open(os.path.join(here, mode, "config.json")))["format_version"] == 1
    assert loaded.mode == mode and len(loaded.gate_specs) == len(loaded.sites) == 3
    with torch.no_grad():
        out = loaded.eval()(ref["x"])
    assert torch.equal(out, ref[mode])
    if mode == "dgn":
        assert torch.allclose(out, ref["src"], rtol=1e-6, atol=1e-6)


# -- integrity (issue 10, item 13): checksummed files, a config that must agree with the graphs ---------------

def _flip_a_bit(path, offset_from_end=64):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_records_a_checksum_of_each_file(saved):
    import hashlib
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["format_version"] == 2
    for name in ("model.safetensors", "graphs.pt"):
        assert cfg["files"][name]["sha256"] == hashlib.sha256((saved / name).read_bytes()).hexdigest()


def test_a_bit_flip_in_the_weights_is_a_load_error(saved):
    """A flipped bit in a weight used to load silently (a wrong model)."""
    _flip_a_bit(saved / "model.safetensors")
    with pytest.raises(relu2dlgn.LoadError, match=r"model[.]safetensors: sha256 checksum .* does not match"):
        relu2dlgn.load(saved)


def test_a_graph_file_from_another_save_is_a_load_error(saved, tmp_path):
    other = tmp_path / "other"
    relu2dlgn.convert(TinyNet(), mode="dlgn", beta=3.0).save(other)
    os.replace(other / "graphs.pt", saved / "graphs.pt")
    with pytest.raises(relu2dlgn.LoadError, match=r"graphs[.]pt: sha256 checksum .* does not match"):
        relu2dlgn.load(saved)


@pytest.mark.parametrize("key,value", [("mode", "dgn"), ("beta", 3.0), ("value_input", "ones"), ("pool", "avg")])
def test_a_config_that_disagrees_with_the_graphs_is_a_load_error(saved, key, value):
    """Edits to config.json used to be ignored silently on load."""
    cfg = json.loads((saved / "config.json").read_text())
    before = cfg[key]
    cfg[key] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(relu2dlgn.LoadError, match=rf"config[.]json.*{key}={value!r}.*{before!r}"):
        relu2dlgn.load(saved)


def test_a_config_without_checksums_is_refused_from_format_version_2(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["files"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(relu2dlgn.LoadError, match=r"config[.]json: no checksums"):
        relu2dlgn.load(saved)
