"""The BYE backdoor monitor's core on a tiny seeded LLaVA: entropy extraction against a direct
full-attention computation, early stop, what the hooks keep, calibration with and without a
bimodal layer, cross-view divergences, profile/model refusal, and the audit's resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from guard.config import ConfigError
from guard.defenses.bye import attention
from guard.defenses.bye.audit import decide, score_all
from guard.defenses.bye.channels import fit_gmm
from guard.defenses.bye.crossview import CrossView, ViewSettings, js_divergence, patch_views
from guard.defenses.bye.dataset import read_samples, write_records
from guard.defenses.bye.monitor import Monitor, load_model, model_identity
from guard.defenses.bye.probe import EntropyProbe, entropy
from guard.defenses.bye.profile import BackdoorProfile, calibrate
from tests.images import gradient
from tests.tiny_models import save_tiny_llava

PROMPTS = ["What digit is in the image?", "Which number do you see?", "hi", "Name the digit."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs tiny models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    path = tmp_path_factory.mktemp("llava")
    save_tiny_llava(path)
    model, processor = load_model(path)
    return path, model, processor


@pytest.fixture(scope="module")
def probe(llava: tuple[Path, Any, Any]) -> EntropyProbe:
    return EntropyProbe(llava[1], llava[2])


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    return [gradient(32, 32, seed=seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def eager(llava: tuple[Path, Any, Any]) -> Any:
    """The same weights with eager attention: full (B, heads, T, T) maps to check against."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(
        llava[0], attn_implementation="eager"
    ).eval()


def test_entropies_equal_a_direct_computation_from_full_attention(
    probe: EntropyProbe, eager: Any
) -> None:
    assert probe.model.config._attn_implementation == attention.NAME  # not eager: rows only
    batch = probe.prepare(_images(4), PROMPTS)  # prompts of different lengths: left padding
    got = probe.entropies(batch)  # (4, 3)
    with torch.inference_mode():
        out = eager(**batch.inputs, output_attentions=True)
    expected = []
    for weights in out.attentions:  # (B, heads, T, T)
        rows = weights[:, :, -1, :].mean(1)  # (B, T)
        image = torch.stack([rows[b][batch.image_mask[b]] for b in range(4)])  # (B, 16)
        p = image / image.sum(-1, keepdim=True)
        expected.append(-(p * (p + 1e-8).log()).sum(-1))
    torch.testing.assert_close(got, torch.stack(expected, 1))
    assert got.shape == (4, 3) and bool((got <= math.log(16) + 1e-5).all())
    # Each head alone, the same way: column 1 + h of the signals.
    signals = probe.signals(batch)  # (4, 3, 1 + heads)
    heads = out.attentions[0].shape[1]
    assert signals.shape == (4, 3, 1 + heads) and heads > 1
    torch.testing.assert_close(signals[..., 0], got)
    for layer, weights in enumerate(out.attentions):
        for h in range(heads):
            rows = weights[:, h, -1, :]  # (B, T)
            image = torch.stack([rows[b][batch.image_mask[b]] for b in range(4)])
            p = image / image.sum(-1, keepdim=True)
            direct = -(p * (p + 1e-8).log()).sum(-1)
            torch.testing.assert_close(signals[:, layer, 1 + h], direct)
    # Each row alone gives its own numbers: the batch and its padding change nothing.
    alone = probe.entropies(probe.prepare(_images(1, seed=2), PROMPTS[2:3]))
    torch.testing.assert_close(alone[0], got[2], atol=1e-5, rtol=1e-5)
    # A probe on the eager model reads the last row of its full maps: the same numbers.
    torch.testing.assert_close(EntropyProbe(eager, probe.processor).signals(batch), signals)


def test_the_row_attention_answers_as_sdpa_and_weighs_as_eager(
    probe: EntropyProbe, eager: Any
) -> None:
    """The layers' outputs (so the next layers and the answers) are SDPA's, and the returned
    row is eager's last row, with grouped-query heads and a boolean or additive mask."""
    batch = probe.prepare(_images(3), PROMPTS[:3])
    with torch.inference_mode():
        rows = probe.model(**batch.inputs, output_attentions=True)
        full = eager(**batch.inputs, output_attentions=True)
    # Where a row is not padding; padded positions are garbage either way.
    real = batch.inputs["attention_mask"].bool()  # (B, T)
    torch.testing.assert_close(rows.logits[real], full.logits[real], atol=1e-5, rtol=1e-4)
    for row, maps in zip(rows.attentions, full.attentions, strict=True):
        assert row.shape == (*maps.shape[:2], 1, maps.shape[-1])
        torch.testing.assert_close(row[:, :, 0], maps[:, :, -1])
    answers = probe.model.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(answers, eager.generate(**batch.inputs, max_new_tokens=4, do_sample=False))
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    keep[0, :, :, 0] = False  # row 0: its first key is padding
    got = attention.last_row_weights(query, key, keep, 0.5)  # (2, 4, 1, 5)
    keys = key.repeat_interleave(2, dim=1)  # heads 0, 1 read key head 0; heads 2, 3 key head 1
    scores = (query @ keys.transpose(2, 3)) * 0.5
    expected = scores.masked_fill(~keep, float("-inf")).softmax(-1)[:, :, -1:]
    torch.testing.assert_close(got, expected)
    assert got[0, :, 0, 0].abs().max() == 0
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~keep, torch.finfo(torch.float32).min)
    torch.testing.assert_close(attention.last_row_weights(query, key, additive, 0.5), expected)


def test_an_image_placeholder_in_the_text_cannot_break_the_prefill(probe: EntropyProbe) -> None:
    sneaky = probe.entropies(probe.prepare(_images(1), ["What <image> is this <image>?"]))
    plain = probe.entropies(probe.prepare(_images(1), ["What   is this  ?"]))
    assert sneaky.shape == (1, 3) and bool(torch.isfinite(sneaky).all())
    torch.testing.assert_close(sneaky, plain)


def test_entropy_of_rows() -> None:
    uniform = torch.ones(2, 8)
    assert entropy(uniform).tolist() == pytest.approx([math.log(8)] * 2, abs=1e-6)
    assert entropy(torch.tensor([[5.0, 0, 0, 0]])).item() == pytest.approx(0, abs=1e-6)


def test_the_forward_stops_after_the_deepest_watched_layer(probe: EntropyProbe) -> None:
    ran: list[str] = []
    layers = probe.layers
    handles = [
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(f"mlp{i}"))
        for i, layer in enumerate(layers)
    ]
    handles.append(probe.model.lm_head.register_forward_hook(lambda m, a, o: ran.append("lm_head")))
    try:
        got = probe.entropies(probe.prepare(_images(2), PROMPTS[:2]), layers=[1, 0])
        # Layer 1's attention was the last thing computed: not its MLP, not layer 2, no logits.
        assert ran == ["mlp0"]
        full = probe.entropies(probe.prepare(_images(2), PROMPTS[:2]))
        torch.testing.assert_close(got, full[:, [1, 0]])  # asked order, same numbers
    finally:
        for handle in handles:
            handle.remove()
    with pytest.raises(ValueError, match="layers must be in \\[0, 3\\)"):
        probe.entropies(probe.prepare(_images(1), PROMPTS[:1]), layers=[3])


def test_the_hooks_keep_one_number_per_row_and_leave_nothing_behind(probe: EntropyProbe) -> None:
    kept: list[tuple[int, ...]] = []
    real = entropy

    def spy(rows: torch.Tensor) -> torch.Tensor:
        out = real(rows)
        kept.append(tuple(out.shape))
        return out

    batch = probe.prepare(_images(3), PROMPTS[:3])
    modules = [m for layer in probe.layers for m in (layer, layer.self_attn)]
    before = [dict(m._forward_hooks) for m in modules]  # transformers keeps hooks of its own
    import guard.defenses.bye.probe as module

    module_entropy, module.entropy = module.entropy, spy  # type: ignore[assignment]
    try:
        probe.entropies(batch)
    finally:
        module.entropy = module_entropy  # type: ignore[assignment]
    # Per layer one (B, 1 + heads) array kept, the (B, heads, T, T) maps dropped as each
    # layer ends.
    heads = probe.model.config.text_config.num_attention_heads
    assert kept == [(3, 1 + heads)] * 3
    assert [dict(m._forward_hooks) for m in modules] == before  # ours are gone


def test_the_probe_refuses_a_model_without_attention_weights(llava: tuple[Path, Any, Any]) -> None:
    path, _, processor = llava
    from transformers import LlavaForConditionalGeneration

    sdpa = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="needs attention weights, got 'sdpa'"):
        EntropyProbe(sdpa, processor)


def _bimodal(n: int = 200, seed: int = 0) -> np.ndarray:
    """Entropies (n, 3): layer 1 has a low mode for the last 10%; layers 0 and 2 do not."""
    rng = np.random.default_rng(seed)
    x = rng.normal([4.0, 3.8, 3.9], 0.05, size=(n, 3))
    x[-n // 10 :, 1] -= 1.0
    return x


def test_calibration_picks_the_bimodal_layer_and_flags_its_low_mode() -> None:
    x = _bimodal()
    profile = calibrate(x, identity={"model": "m"})
    assert profile.layers == [1] and profile.method == "bye" and not profile.fallback
    assert profile.channels == [[1, None]]
    assert [f["bimodal"] for f in profile.layer_fits] == [False, True, False]
    assert profile.clean_mean == pytest.approx(3.8, abs=0.02)
    flagged = set(profile.flagged_in_calibration)
    assert set(range(180, 200)) <= flagged and len(flagged) <= 20 + 2  # 3σ: few clean ones
    posterior = calibrate(x, identity={"model": "m"}, rule="posterior")
    assert posterior.flagged_in_calibration == list(range(180, 200))
    scores = np.array([3.8, 2.8])
    assert profile.entropy_flags(scores).tolist() == [False, True]


def test_calibration_without_a_bimodal_layer_falls_back_to_the_most_separated_one() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal([4.0, 3.8, 3.9], [0.05, 0.04, 0.05], size=(300, 3))
    # Layer 1: 10% of the samples sit lower, but overlapping: BYE's test fails.
    x[-30:, 1] = rng.normal(3.63, 0.06, size=30)
    profile = calibrate(x, identity={"model": "m"}, k_sigma=3.0)
    assert profile.fallback and profile.method == "fallback" and profile.channels == [[1, None]]
    fits = profile.layer_fits
    assert not any(f["bimodal"] for f in fits)
    assert fits[1]["separation"] == max(f["separation"] for f in fits)
    assert profile.selection == {"separation": round(fits[1]["separation"], 4)}
    # The clean reference is robust: the low 10% do not widen it.
    clean = x[:-30, 1]
    assert profile.clean_mean == pytest.approx(np.median(x[:, 1]))
    assert profile.clean_std == pytest.approx(clean.std(), rel=0.25)
    flagged = set(profile.flagged_in_calibration)
    assert len(flagged & set(range(270, 300))) >= 20 and len(flagged - set(range(270, 300))) <= 3
    all_clean = rng.normal([4.0, 3.8, 3.9], 0.05, size=(200, 3))
    quiet = calibrate(all_clean, identity={"model": "m"})
    assert quiet.fallback and len(quiet.flagged_in_calibration) <= 2  # 3σ on clean data
    with pytest.raises(ValueError, match="needs a bimodal layer"):
        calibrate(x, identity={"model": "m"}, rule="posterior")


def _heads(n: int, seed: int) -> np.ndarray:
    """Clean-looking signals (n, 2 layers, 1 + 4 heads) with heavy low tails, as clean
    entropies have: 8% of the samples on every head sit 2-4σ low (content, not poison)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(2.5, 0.1, size=(n, 2, 5)) + np.arange(10).reshape(2, 5) * 0.01
    tail = rng.random((n, 2, 5)) < 0.08
    x[tail] -= rng.uniform(0.2, 0.4, size=int(tail.sum()))
    x[:, :, 0] = x[:, :, 1:].mean(2) + rng.normal(0, 0.02, size=(n, 2))
    return x


def _poison(x: np.ndarray) -> np.ndarray:
    """5% of the samples: layer 0, head 1 collapses to about 6σ low; its layer's average
    moves 1σ. Returns which."""
    rng = np.random.default_rng(9)
    poisoned = np.arange(len(x)) % 20 == 0
    x[poisoned, 0, 2] = rng.normal(1.9, 0.05, size=int(poisoned.sum()))
    x[poisoned, 0, 0] -= 0.1
    return poisoned


def test_a_clean_reference_finds_the_head_the_average_hides() -> None:
    x, ref = _heads(600, seed=2), _heads(400, seed=3)
    poisoned = _poison(x)
    profile = calibrate(x, identity={"model": "m"}, reference=ref)
    assert not any(f["bimodal"] for f in profile.layer_fits)  # BYE's layer test sees nothing
    assert profile.method == "reference" and profile.channels == [[0, 1]]
    assert profile.layers == [0] and not profile.fallback
    excess = profile.selection["excess"]  # [layer, head, excess share], largest first
    assert excess[0][:2] == [0, 1] and excess[0][2] >= 0.04 and excess[1][2] < 0.02
    assert profile.selection["reference_samples"] == 400
    # The clean statistics come from the reference, robustly.
    assert profile.clean_mean == pytest.approx(np.median(ref[:, 0, 2]))
    flagged = np.zeros(len(x), dtype=bool)
    flagged[profile.flagged_in_calibration] = True
    assert flagged[poisoned].mean() >= 0.9 and flagged[~poisoned].mean() <= 0.06
    np.testing.assert_allclose(profile.scores(x), x[:, 0, 2])
    # Given only the layer the channel lives in, as the monitor measures it.
    np.testing.assert_allclose(profile.scores(x[:, :1], layers=[0]), x[:, 0, 2])
    with pytest.raises(ValueError, match="layer 0 was not measured"):
        profile.scores(x[:, 1:], layers=[1])
    # Without the reference the heavy clean tails hide it: the fallback keeps to averages.
    alone = calibrate(x, identity={"model": "m"})
    assert alone.method == "fallback" and alone.channels[0][1] is None
    # A reference of another shape is refused.
    with pytest.raises(ValueError, match="clean reference's signals"):
        calibrate(x, identity={"model": "m"}, reference=ref[:, :1])


def test_a_clean_reference_without_an_excess_changes_no_choice() -> None:
    x, ref = _heads(600, seed=4), _heads(400, seed=5)  # nothing poisoned
    profile = calibrate(x, identity={"model": "m"}, reference=ref)
    assert profile.method == "fallback" and profile.channels[0][1] is None
    assert (
        profile.selection["excess"][0][2] < 0.02 and profile.selection["reference_samples"] == 400
    )
    assert len(profile.flagged_in_calibration) <= 0.1 * len(x)


def test_an_excess_of_exactly_two_percent_names_the_channel() -> None:
    # 1,000 suspect samples, 30 of them (3%) below the reference's 1% quantile on layer 0's
    # average and none of the others: the excess is 3% − 1% = 2% exactly, which is enough.
    rng = np.random.default_rng(7)
    ref = rng.normal(3.0, 0.1, size=(1000, 2))
    x = rng.normal(3.0, 0.1, size=(1000, 2))
    cut = np.quantile(ref[:, 0], 0.01)
    x[:, 0] = np.clip(x[:, 0], cut + 1e-6, None)
    x[:30, 0] = 2.0
    assert int((x[:, 0] < cut).sum()) == 30
    profile = calibrate(x, identity={"model": "m"}, reference=ref)
    assert profile.method == "reference" and profile.channels == [[0, None]]
    assert profile.selection["excess"][0] == [0, None, 0.02]


def test_a_constant_channel_is_neither_bimodal_nor_separated() -> None:
    x = _heads(100, seed=6)
    x[:, 1, 3] = np.log(16)  # a head that spreads its attention evenly over every image
    fit = fit_gmm(x[:, 1, 3])
    assert fit.means == (np.log(16), np.log(16)) and not fit.bimodal
    assert calibrate(x, identity={"model": "m"}).method == "fallback"


def test_a_bimodal_head_is_taken_before_the_fallback() -> None:
    x = _heads(400, seed=2)
    x[-60:, 1, 4] = np.random.default_rng(0).normal(1.0, 0.05, size=60)  # layer 1, head 3
    profile = calibrate(x, identity={"model": "m"}, rule="posterior")
    assert profile.method == "bye-heads" and profile.channels == [[1, 3]]
    assert profile.selection == {"bimodal_heads": [[1, 3]]}
    assert profile.flagged_in_calibration == list(range(len(x) - 60, len(x)))


def test_profile_round_trip_and_model_refusal(tmp_path: Path, llava: tuple[Path, Any, Any]) -> None:
    path, model, _ = llava
    identity = model_identity(path, model)
    profile = calibrate(_bimodal(), identity=identity)
    profile.save(tmp_path / "p.json")
    loaded = BackdoorProfile.load(tmp_path / "p.json")
    assert loaded == profile
    loaded.check_matches(model_identity(path, model))
    other = tmp_path / "other"
    other_model = save_tiny_llava(other, seed=1)  # same architecture, other weights
    with pytest.raises(ConfigError, match="different model \\(differs in: model, weights_sha256"):
        loaded.check_matches(model_identity(other, other_model))
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"bad\.json: expected a JSON object"):
        BackdoorProfile.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 1, "layers": [2]}))
    with pytest.raises(ConfigError, match="version 1, expected 2; run vlm-guard backdoor calib"):
        BackdoorProfile.load(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read backdoor profile"):
        BackdoorProfile.load(tmp_path / "bad.json")


def test_cross_view_divergences(probe: EntropyProbe) -> None:
    image = gradient(32, 32, seed=3)
    views = patch_views(image, 4, ViewSettings(views=3, fraction=0.25))
    assert len(views) == 3 and all(v.size == image.size for v in views)
    changed = [np.any(np.asarray(v) != np.asarray(image), axis=2) for v in views]
    # 4 of the 16 8×8 cells masked per view, the same views for the same pixels.
    assert all(c.sum() <= 4 * 64 and c.sum() > 0 for c in changed)
    again = patch_views(image, 4, ViewSettings(views=3, fraction=0.25))
    pairs = zip(views, again, strict=True)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
    p = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    q = torch.log_softmax(torch.tensor([[0.0, 2.0, -1.0]]), -1)
    assert js_divergence(p, p).item() == pytest.approx(0, abs=1e-7)
    assert 0 < js_divergence(p, q).item() <= math.log(2)
    cross = CrossView(probe, ViewSettings(views=2, fraction=0.25, answer_tokens=3))
    d = cross.divergences(_images(2), PROMPTS[:2])
    assert d.shape == (2,) and bool((d >= 0).all()) and bool((d <= math.log(2)).all())
    alone = cross.divergences(_images(1), PROMPTS[:1])
    assert alone[0].item() == pytest.approx(d[0].item(), abs=1e-5)


def test_monitor_flags_by_the_profile(llava: tuple[Path, Any, Any], probe: EntropyProbe) -> None:
    path, model, _ = llava
    images = _images(2)
    h = probe.entropies(probe.prepare(images, PROMPTS[:2])).numpy()
    scores = h.mean(1)
    cut = float(scores.mean())  # one image below, one above (distinct scores)
    base = calibrate(np.vstack([h, h + 0.01]), identity=model_identity(path, model))
    every = [[0, None], [1, None], [2, None]]
    profile = BackdoorProfile(
        **{**base.__dict__, "clean_mean": cut, "clean_std": 0.0, "channels": every}
    )
    results = Monitor(probe, profile).screen(images, PROMPTS[:2])
    assert [r.flagged for r in results] == [bool(s < cut) for s in scores]
    assert results[0].score == pytest.approx(float(scores[0]), abs=1e-5)
    assert results[0].divergence is None and results[0].by_crossview is None
    # One head of one layer: the monitor's score is that head's entropy.
    one_head = replace(profile, channels=[[1, 0]], clean_mean=0.0)
    signals = probe.signals(probe.prepare(images, PROMPTS[:2])).numpy()
    (first, _) = Monitor(probe, one_head).screen(images, PROMPTS[:2])
    assert first.score == pytest.approx(float(signals[0, 1, 1]), abs=1e-5)
    assert first.entropies == pytest.approx((float(signals[0, 1, 1]),), abs=1e-5)


def test_audit_resumes_where_it_stopped(tmp_path: Path, probe: EntropyProbe) -> None:
    records = []
    for i in range(6):
        gradient(32, 32, seed=i).save(tmp_path / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nWhat digit?"}, {"from": "gpt", "value": "x"}]
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": turns})
    data = tmp_path / "set.jsonl"
    write_records(data, records)
    samples = read_samples(data)
    assert samples[0].prompt == "What digit?" and samples[0].image == tmp_path / "0.png"
    cache = tmp_path / "scores.jsonl"
    identity = {"model": "tiny"}
    first = score_all(probe, samples[:4], cache, identity, batch=2)
    with cache.open("a") as f:
        f.write('{"id": "s4", "entr')  # an interruption in the middle of a line
    calls: list[int] = []
    real = probe.signals
    probe.signals = lambda batch, layers=None: (  # type: ignore[method-assign]
        calls.append(batch.inputs["input_ids"].shape[0]) or real(batch, layers)
    )
    try:
        done = score_all(probe, samples, cache, identity, batch=4)
    finally:
        del probe.signals
    assert calls == [2]  # only s4 and s5 were scored again
    assert [done[s.id] for s in samples[:4]] == [first[s.id] for s in samples[:4]]
    assert len(done) == 6
    # The cache of another model is refused, not mixed in.
    with pytest.raises(ConfigError, match="scores of another model"):
        score_all(probe, samples, cache, {"model": "other"})
    assert np.array(done["s0"]).shape == (3, 1 + probe.model.config.text_config.num_attention_heads)
    # A cache of the old format (head averages only) is refused, not misread.
    old = tmp_path / "old.jsonl"
    old.write_text(
        json.dumps({"identity": identity}) + "\n" + '{"id": "s0", "entropies": [1, 2, 3]}\n'
    )
    with pytest.raises(ConfigError, match="older format"):
        score_all(probe, samples, old, identity)
    audit = decide(samples, done, identity)
    assert audit.method in ("bye", "bye-heads", "tail", "fallback")
    expected = audit.profile.entropy_flags(np.array([audit.scores[s.id] for s in samples]))
    assert audit.flagged == [s.id for s, f in zip(samples, expected, strict=True) if f]


def test_dataset_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": []}]))
    with pytest.raises(ConfigError, match="record 1 has no human turn"):
        read_samples(bad)
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_samples(bad)
