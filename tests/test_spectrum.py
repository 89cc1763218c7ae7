"""Spectrum of saved adapters: real peft adapters whose LoRA factors are set to known low-rank
updates, so singular values, ranks, scales, suggestions and similarities are known exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorasweep.analysis import report_sections, tool_plots
from lorasweep.tools import spectrum as sp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HIDDEN, INTER = 32, 64
ALL_TARGETS = ["query", "value", "dense"]  # dense: attention.output, intermediate, output, pooler


def orth(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


def factors(u, sigma, v, r, scale, rng):
    """B (out×r), A (r×in), both dense, with scale·B·A = U diag(σ) Vᵀ exactly (rank len(σ))."""
    q = orth(rng, r, len(sigma))
    return u @ np.diag(np.asarray(sigma) / scale) @ q.T, q @ v.T


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=INTER,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def lora_layers(model):
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            yield name.removeprefix("base_model.model."), mod


def save_adapter(path: Path, config, set_weights) -> Path:
    """Wrap a tiny BERT, call ``set_weights(name, module)`` per LoRA layer, save_pretrained."""
    model = peft.get_peft_model(tiny_bert(), config)
    with torch.no_grad():
        for name, mod in lora_layers(model):
            set_weights(name, mod)
    model.save_pretrained(path)
    return path


def setter(spectra: dict, rng, r: int, scale_of, vs: dict | None = None):
    """Set each module's ΔW to orthonormal U, V and the singular values ``spectra(name)``."""

    def set_weights(name, mod):
        out_f, in_f = mod.base_layer.weight.shape
        sigma = spectra(name)
        v = vs[name][:, : len(sigma)] if vs else orth(rng, in_f, len(sigma))
        b, a = factors(orth(rng, out_f, len(sigma)), sigma, v, r, scale_of(name), rng)
        mod.lora_B["default"].weight.copy_(torch.tensor(b))
        mod.lora_A["default"].weight.copy_(torch.tensor(a))

    return set_weights


def true_spectrum(name: str) -> list[float]:
    """Attention modules: true rank 3 (σ 3, 2, 1); mlp modules: true rank 5 (equal σ)."""
    return [3.0, 2.0, 1.0] if sp._group(name) == "attention" else [2.0] * 5


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    rng = np.random.default_rng(0)
    out = {}
    # r=16 on all linear layers, each ΔW of known true rank 3 (attention) or 5 (mlp).
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL_TARGETS)
    out["r16"] = save_adapter(root / "r16", cfg, setter(true_spectrum, rng, 16, lambda n: 2.0))
    # Similarity: r=8 and r=4 share their top right singular vectors; "far" uses orthogonal ones.
    names = [n for n, _ in lora_layers(peft.get_peft_model(tiny_bert(), _qv(8)))]
    basis = {n: orth(rng, HIDDEN, 16) for n in names}
    near = {n: b[:, :8] for n, b in basis.items()}
    far = {n: b[:, 8:] for n, b in basis.items()}
    desc = [8.0, 7, 6, 5, 4, 3, 2, 1]
    out["r8"] = save_adapter(root / "r8", _qv(8), setter(lambda n: desc, rng, 8, lambda n: 1, near))
    out["r4"] = save_adapter(
        root / "r4", _qv(4), setter(lambda n: desc[:4], rng, 4, lambda n: 2, near)
    )
    out["far"] = save_adapter(
        root / "far", _qv(4), setter(lambda n: desc[:4], rng, 4, lambda n: 2, far)
    )
    # rsLoRA with rank_pattern / alpha_pattern: ΔW = scale · (rank-1, σ=1): σ₁ must equal scale.
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["query", "value"],
        rank_pattern={"value": 4},
        alpha_pattern={"value": 2},
    )

    def unit(name, mod):
        mod.lora_A["default"].weight.zero_()
        mod.lora_B["default"].weight.zero_()
        mod.lora_A["default"].weight[0, 0] = 1.0
        mod.lora_B["default"].weight[0, 0] = 1.0

    out["rs"] = save_adapter(root / "rs", cfg, unit)
    out["untrained"] = save_adapter(root / "untrained", _qv(4), lambda n, m: None)
    return out


def _qv(r: int):
    return peft.LoraConfig(r=r, lora_alpha=8, target_modules=["query", "value"])


# --- linear algebra -------------------------------------------------------------------------


@pytest.mark.parametrize("out_f,in_f,r,scale", [(20, 12, 5, 1.0), (7, 30, 9, -0.5), (6, 4, 8, 3)])
def test_qr_path_equals_dense_svd(out_f, in_f, r, scale):
    rng = np.random.default_rng(r)
    b, a = rng.standard_normal((out_f, r)), rng.standard_normal((r, in_f))
    dense = scale * b @ a
    u, s, v = sp.lowrank_svd(b, a, scale)
    k = min(out_f, in_f, r)
    assert s.shape == (k,) and u.shape == (out_f, k) and v.shape == (in_f, k)
    np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False)[:k], rtol=1e-10)
    np.testing.assert_allclose(u @ np.diag(s) @ v.T, dense, atol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-10)


def test_qr_path_never_forms_the_full_matrix():
    import tracemalloc

    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((3000, 8)), rng.standard_normal((8, 3000))
    tracemalloc.start()
    _, s, _ = sp.lowrank_svd(b, a)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(s) == 8 and peak < 5e6  # the dense 3000×3000 float64 ΔW alone is 72 MB


def test_effective_and_energy_rank_definitions():
    assert sp.effective_rank([2.0, 2.0, 2.0, 0.0]) == pytest.approx(3.0)
    p = np.array([3, 2, 1]) / 6
    assert sp.effective_rank([3, 2, 1]) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert sp.effective_rank([0.0, 0.0]) == 0.0
    # energies 9, 4, 1 of 14: top-1 holds 64 %, top-2 92.9 %, top-3 100 %.
    assert [sp.energy_rank([3, 2, 1], e) for e in (0.6, 0.9, 0.93, 0.99, 1.0)] == [1, 2, 3, 3, 3]
    assert sp.energy_rank([0.0, 0.0], 0.9) == 0
    with pytest.raises(ValueError):
        sp.energy_rank([1.0], 0.0)


# --- one adapter ----------------------------------------------------------------------------


def test_true_rank_is_recovered_from_a_saved_r16_adapter(adapters):
    spec = sp.adapter_spectrum(adapters["r16"])
    by_name = {m["name"]: m for m in spec["modules"]}
    assert "encoder.layer.1.attention.self.query" in by_name
    assert len(spec["modules"]) == 2 * 5 + 1  # q, v, attn out, intermediate, out; pooler
    for m in spec["modules"]:
        true = true_spectrum(m["name"])
        s = np.array(m["singular_values"])
        assert m["r"] == 16 and len(s) == 16 and m["scale"] == 2.0
        np.testing.assert_allclose(s[: len(true)], true, rtol=1e-5)
        assert np.all(s[len(true) :] < 1e-5 * s[0])  # the other 13 (or 11) are ~0
        assert m["numerical_rank"] == len(true)
        if len(true) == 3:
            p = np.array(true) / sum(true)
            assert m["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), 1e-4)
            assert m["energy_rank"] == {"0.9": 2, "0.99": 3}
        else:
            assert m["effective_rank"] == pytest.approx(5.0, 1e-4)
            assert m["energy_rank"] == {"0.9": 5, "0.99": 5}
    q = by_name["encoder.layer.0.attention.output.dense"]
    assert q["group"] == "attention" and q["type"] == "attention.output.dense" and q["layer"] == 0
    assert by_name["encoder.layer.0.output.dense"]["group"] == "mlp"
    assert spec["groups"]["attention"]["max_energy_rank"] == {"0.9": 2, "0.99": 3}
    assert spec["groups"]["mlp"]["max_energy_rank"] == {"0.9": 5, "0.99": 5}
    assert spec["by_type"]["attention.self.query"]["modules"] == 2
    assert set(spec["by_layer"]) == {"0", "1", "None"}
    assert spec["suggested_rank"] == 5 and spec["nominal_rank"] == 16


def test_scales_follow_rslora_rank_and_alpha_patterns(adapters):
    mods = {m["name"]: m for m in sp.adapter_spectrum(adapters["rs"])["modules"]}
    q, v = (
        mods["encoder.layer.0.attention.self.query"],
        mods["encoder.layer.0.attention.self.value"],
    )
    assert (q["r"], v["r"]) == (8, 4)
    assert q["singular_values"][0] == pytest.approx(16 / math.sqrt(8))  # alpha / sqrt(r)
    assert v["singular_values"][0] == pytest.approx(2 / math.sqrt(4))  # alpha_pattern, r_pattern
    assert q["energy_rank"]["0.99"] == 1 and q["effective_rank"] == pytest.approx(1.0)


def test_untrained_adapter_reports_zero_rank(adapters):
    spec = sp.adapter_spectrum(adapters["untrained"])
    assert all(m["energy_rank"]["0.9"] == 0 and m["effective_rank"] == 0 for m in spec["modules"])
    assert any("zero" in n for n in spec["notes"])
    assert sp.suggest(spec)["suggested_rank"] == 1


def test_dora_is_analysed_with_a_note(tmp_path):
    cfg = peft.LoraConfig(r=8, target_modules=["query"], use_dora=True)
    rng = np.random.default_rng(1)
    path = save_adapter(tmp_path / "dora", cfg, setter(lambda n: [1.0, 0.5], rng, 8, lambda n: 1))
    spec = sp.adapter_spectrum(path)
    assert spec["variant"] == "dora" and any("DoRA" in n for n in spec["notes"])
    np.testing.assert_allclose(spec["modules"][0]["singular_values"][:2], [1.0, 0.5], rtol=1e-5)


def test_adalora_update_includes_e_and_scaling(tmp_path):
    cfg = peft.AdaLoraConfig(init_r=6, lora_alpha=12, total_step=10, target_modules=["query"])

    def set_weights(name, mod):
        mod.lora_A["default"].zero_()
        mod.lora_B["default"].zero_()
        mod.lora_E["default"].zero_()
        for i, e in enumerate([4.0, 1.0]):  # ΔW = B diag(E) A · alpha / init_r
            mod.lora_A["default"][i, i] = 1.0
            mod.lora_B["default"][i, i] = 1.0
            mod.lora_E["default"][i, 0] = e

    spec = sp.adapter_spectrum(save_adapter(tmp_path / "ada", cfg, set_weights))
    assert spec["variant"] == "adalora"
    s = spec["modules"][0]["singular_values"]
    np.testing.assert_allclose(s[:2], [4.0 * 2, 1.0 * 2])
    assert max(s[2:]) == 0.0


def test_bf16_adapter_is_read_without_torch_dtypes(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    src = adapters["r16"]
    (tmp_path / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: t.bfloat16() for k, t in tensors.items()}, tmp_path / "adapter_model.safetensors")
    spec = sp.adapter_spectrum(tmp_path)
    assert spec["dtype"] == "BF16"
    ref = sp.adapter_spectrum(src)
    for m, r in zip(spec["modules"], ref["modules"]):
        np.testing.assert_allclose(m["singular_values"][:3], r["singular_values"][:3], rtol=3e-2)
        assert m["numerical_rank"] == r["numerical_rank"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        sp.adapter_spectrum(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        sp.adapter_spectrum(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="LOHA"):
        sp.adapter_spectrum(tmp_path)


# --- suggestion -----------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["group", "type"])
def test_suggested_rank_pattern_builds_the_intended_peft_model(adapters, by):
    spec = sp.adapter_spectrum(adapters["r16"])
    sug = sp.suggest(spec, energy=0.9, by=by)
    assert sug["suggested_rank"] == 5 and sug["suggested_rank_pow2"] == 8
    assert sug["group_ranks"] == {"attention": 2, "mlp": 5}
    assert sug["type_ranks"]["attention.self.query"] == 2
    assert sp.suggest(spec, 0.99, power_of_two=True)["variant"] == {"rank": 8}
    assert sp.suggest(spec, 0.99)["variant"] == {"rank": 5}
    assert sug["pattern_variant"] == {"rank_pattern": sug["suggested_rank_pattern"]}
    # The pattern must mean to peft what we meant, including the ambiguous "output.dense".
    cfg = peft.LoraConfig(
        r=16, target_modules=ALL_TARGETS, rank_pattern=sug["suggested_rank_pattern"]
    )
    built = {
        n: m.lora_A["default"].weight.shape[0]
        for n, m in lora_layers(peft.get_peft_model(tiny_bert(), cfg))
    }
    want = {n: 2 if sp._group(n) == "attention" else 5 for n in built}
    assert built == want
    # Shortest readable keys; BERT's "output.dense" also ends "attention.output.dense": anchored.
    keys = ["attention.output.dense", "query", "value", "intermediate.dense", r"\d+\.output\.dense"]
    assert list(sug["suggested_rank_pattern"]) == [*keys, "pooler.dense"]


def test_saturated_modules_are_flagged(adapters):
    sug = sp.suggest(sp.adapter_spectrum(adapters["r8"]), energy=0.999)  # needs all 8
    assert sug["saturated"] and "higher-rank pilot" in sug["note"]
    assert "note" not in sp.suggest(sp.adapter_spectrum(adapters["r16"]), 0.99)


# --- similarity -----------------------------------------------------------------------------


def test_similarity_of_shared_and_orthogonal_subspaces(adapters):
    near = sp.subspace_similarity(adapters["r8"], adapters["r4"])
    assert len(near["modules"]) == 4 and not near["only_in_a"]
    for m in near["modules"]:
        phi = np.array(m["phi"])
        assert phi.shape == (8, 4) and (m["r_a"], m["r_b"]) == (8, 4)
        np.testing.assert_allclose(np.diag(phi), 1.0, atol=1e-6)  # same top-4 directions
        assert m["phi_at_min"] == pytest.approx(1.0, abs=1e-6)
        assert m["random_baseline"] == pytest.approx(4 / HIDDEN)
    far = sp.subspace_similarity(adapters["r8"], adapters["far"])
    assert far["mean_phi_at_min"] < 1e-6 and far["mean_top_k"] < 1e-6
    left = sp.subspace_similarity(adapters["r8"], adapters["r4"], side="left")
    assert left["side"] == "left" and left["mean_phi_at_min"] < 0.9  # random left vectors
    with pytest.raises(ValueError, match="side"):
        sp.subspace_similarity(adapters["r8"], adapters["r4"], side="up")


def test_phi_matches_the_papers_formula_with_a_dense_svd(adapters):
    rng = np.random.default_rng(3)
    b1, a1 = rng.standard_normal((10, 5)), rng.standard_normal((5, 12))
    b2, a2 = rng.standard_normal((10, 3)), rng.standard_normal((3, 12))
    v1 = np.linalg.svd(b1 @ a1)[2].T
    v2 = np.linalg.svd(b2 @ a2)[2].T
    phi = sp._phi_matrix(sp.lowrank_svd(b1, a1)[2], sp.lowrank_svd(b2, a2)[2])
    for i in range(1, 6):
        for j in range(1, 4):
            ref = np.linalg.norm(v1[:, :i].T @ v2[:, :j]) ** 2 / min(i, j)
            assert phi[i - 1, j - 1] == pytest.approx(ref, abs=1e-10)


# --- outputs --------------------------------------------------------------------------------


def test_cli_json_shape(adapters):
    out = sp.analyze_adapter(adapters["r16"], other=adapters["r16"], energy=0.99, power_of_two=True)
    text = json.dumps(out)  # JSON-serialisable
    back = json.loads(text)
    assert {"modules", "suggested_rank", "suggested_rank_pattern", "similarity"} <= set(back)
    m = back["modules"][0]
    assert {"name", "r", "singular_values", "effective_rank", "energy_rank"} <= set(m)
    assert set(m["energy_rank"]) == {"0.9", "0.99"}
    assert back["suggested_rank"] == 8  # 5 rounded up
    assert back["similarity"]["mean_phi_at_min"] == pytest.approx(1.0)  # itself


def test_plots_and_report_section(adapters, tmp_path):
    specs = [sp.adapter_spectrum(adapters[k]) for k in ("r16", "r8")]
    for f in (
        tool_plots.plot_spectra(specs, tmp_path / "s.png"),
        tool_plots.plot_similarity(
            sp.subspace_similarity(adapters["r8"], adapters["r4"]), tmp_path / "h.png"
        ),
    ):
        assert f.read_bytes()[:4] == b"\x89PNG" and f.stat().st_size > 5000
    dirs = {"lora/r=16/seed=0": adapters["r16"], "lora/r=8/seed=0": adapters["r8"]}
    html = report_sections.spectrum_section_html({**dirs, "lora/r=2/seed=0": tmp_path / "missing"})
    assert "lora/r=16/seed=0" in html and "lora/r=8/seed=0" in html
    assert "data:image/png;base64," in html and "not analysed" in html
    assert "highest-rank adapter (lora/r=16/seed=0): rank <b>5</b>" in html
    assert "No saved adapters" in report_sections.spectrum_section_html({})


def test_import_and_analysis_do_not_load_torch(adapters):
    code = (
        "import sys, lorasweep; before = set(sys.modules)\n"
        "import lorasweep.analysis.report_sections as s\n"
        f"s.spectrum_section_html({{'a': {str(adapters['r16'])!r}}})\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "assert not new & {'torch', 'transformers', 'peft'}, new\n"
    )
    env_path = str(Path(sp.__file__).parents[1])
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": env_path},
    )
    assert res.returncode == 0, res.stderr
