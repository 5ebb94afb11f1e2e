"""Configs (YAML + --set, validation) and the CLI verbs of the foundation: score, convert."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import FP32_LOGPROB_ATOL, hf_token_logprobs, write_hf_model
from mopd_jax.cli import main
from mopd_jax.config import ConfigError, load_config
from mopd_jax.sharding import MeshConfig, MeshError, make_mesh

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.num_layers >= 1


def test_overrides_and_validation(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      ["optimizer.lr=3e-6", "model.num_layers=3", "mesh.tensor=2"])
    assert (cfg.optimizer.lr, cfg.model.num_layers, cfg.mesh.tensor) == (3e-6, 3, 2)
    assert cfg.model.hidden_size == 64  # the rest of the preset is kept
    cases = {
        "optimizer.lrr=1": r"optimizer.lrr: unknown key \(did you mean 'lr'\?\)",
        "model.num_kv_heads=3": "model.num_kv_heads: must divide",
        "optimizer.microbatches=0": "optimizer.microbatches: must be >= 1",
        "model.preset=qwen9": "model.preset: unknown preset 'qwen9'",
        "optimizer.lr=fast": "optimizer.lr: expected a number",
        "mesh.tensor=0": "mesh.tensor: must be a positive size",
    }
    for override, msg in cases.items():
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [override])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_mesh_errors_when_sizes_do_not_fit_devices():
    assert make_mesh(MeshConfig(fsdp=-1, tensor=2)).shape["fsdp"] == 4
    with pytest.raises(MeshError, match="needs 16 devices but 8 are available"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=4))
    with pytest.raises(MeshError, match="does not divide the 8 devices"):
        make_mesh(MeshConfig(fsdp=-1, tensor=3))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_moe")
    return path, write_hf_model(path, "moe", seed=3)


def test_score_json_matches_transformers(hf_dir, capsys):
    path, torch_model = hf_dir
    ids = [5, 17, 3, 96, 40, 2]
    assert main(["score", "--hf", str(path), "--tokens", ",".join(map(str, ids)), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == ids and out["logprobs"][0] is None
    ref = hf_token_logprobs(torch_model, np.array([ids]))[0]
    assert np.abs(np.array(out["logprobs"][1:]) - ref).max() <= FP32_LOGPROB_ATOL


def test_convert_roundtrip_keeps_scores(hf_dir, tmp_path, capsys):
    path, _ = hf_dir
    args = ["--tokens", "1,2,3,4,5", "--json"]
    main(["score", "--hf", str(path), *args])
    ref = json.loads(capsys.readouterr().out)["logprobs"]
    assert main(["convert", str(path), str(tmp_path / "ck"), "--to", "orbax"]) == 0
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    capsys.readouterr()
    for flag, d in [("--checkpoint", tmp_path / "ck"), ("--hf", tmp_path / "hf")]:
        main(["score", flag, str(d), *args])
        got = json.loads(capsys.readouterr().out)["logprobs"]
        np.testing.assert_allclose(got[1:], ref[1:], atol=1e-6)


def test_cli_errors_are_one_line(hf_dir, tmp_path, capsys):
    path, _ = hf_dir
    cases = [
        (["score", "--hf", str(path), "--tokens", "1,x"], "--tokens '1,x': expected comma"),
        (["score", "--hf", str(path), "--tokens", "1,500"], "outside the model's vocabulary"),
        (["score", "--hf", str(tmp_path / "missing"), "--tokens", "1,2"], "not a directory"),
        (["score", "--checkpoint", str(tmp_path), "--tokens", "1,2"], "model.json: missing"),
        (["convert", str(tmp_path), str(tmp_path / "o"), "--to", "hf"], "neither a mopd"),
    ]
    ck = tmp_path / "ck"
    assert main(["convert", str(path), str(ck), "--to", "orbax"]) == 0
    cases.append((["convert", str(path), str(ck), "--to", "orbax"], "already holds a model"))
    shutil.rmtree(ck / "params")
    (ck / "params").mkdir()  # a checkpoint whose weights were lost
    cases.append((["score", "--checkpoint", str(ck), "--tokens", "1,2"], "cannot restore"))
    capsys.readouterr()
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("\n") == 1, err


def test_every_verb_has_help(capsys):
    from mopd_jax.cli import build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert {"score", "convert", "bench"} <= set(verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: mopd " + verb in out
        assert f"example:\n  mopd {verb}" in out, out  # every verb shows an example
        assert "``" not in out  # module docstrings as help lose their markup
    for verb, flag in (("score", "--preset NAME"), ("generate", "--preset NAME"),
                       ("train", "--allow-config-change")):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert flag in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "(default: 3)" in capsys.readouterr().out  # defaults are shown
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mopd-jax ")
