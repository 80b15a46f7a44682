"""The toy world: a real quick build, its quality floors, reuse, serving and attacks."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch

from guard.defenses.bye.profile import BackdoorProfile
from guard.defenses.diffcap.profile import PurifyProfile
from guard.defenses.reasoning.policy import default_policy
from guard.defenses.reasoning.protocols import parse_reasoning_json
from guard.toy.attacks import PGDSettings, answer_loss, pgd_vlm
from guard.toy.backdoor import backdoor_config
from guard.toy.build import BuildOptions, build_world
from guard.toy.checks import purify_config
from guard.toy.data import eval_images, load_splits, to_pil, to_tensor
from guard.toy.openai_server import create_app
from guard.toy.ssui import CATEGORY, eval_pairs
from guard.toy.triggers import Trigger
from guard.toy.vlm import ATTACK_RESPONSE, answer_images, load_vlm
from guard.toy.vlm_chat import ToyVLMChat
from guard.toy.vlm_parts import QUESTIONS, answer
from tests.servers import AppServer, RunningGuard

# The first test also pays for the session's quick build (a few minutes on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("toy")
    manifest = build_world(BuildOptions(out=out, seed=0, quick=True))
    return out, manifest


@pytest.fixture(scope="session")
def vlm(quick_world: tuple[Path, dict[str, Any]]) -> Any:
    return load_vlm(quick_world[0] / "vlm")


def _png_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    to_pil(image).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_manifest_records_quality_and_provenance(quick_world: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = quick_world
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["mode"] == "quick" and manifest["seed"] == 0
    assert set(manifest["versions"]) >= {"torch", "transformers", "diffusers", "open_clip_torch"}
    failed = {k: v for k, v in manifest["quality"].items() if not v["ok"]}
    assert not failed, failed
    for component in ("data", "diffusion", "clip", "vlm", "reasoner"):
        assert (out / component / "component.json").exists()
    # Native formats, loadable as real checkpoints are.
    assert (out / "diffusion" / "model_index.json").exists()
    assert (out / "vlm" / "config.json").exists() and (out / "vlm" / "tokenizer.json").exists()
    # The purify profile is what `vlm-guard purify calibrate` writes, for the toy's purifier.
    profile = PurifyProfile.load(out / "purify_profile" / "profile.json")
    assert profile.images == 100 and -1 <= profile.tau <= 1  # a quick build uses half
    assert profile.identity["encoder_model"] == str(out / "vlm")
    assert manifest["figures"]["purify"]["tau"] == profile.tau
    # The backdoor monitor's profile is what `vlm-guard backdoor calibrate` writes, for the VLM.
    backdoor = BackdoorProfile.load(out / "backdoor_profile" / "profile.json")
    assert backdoor.identity["model"] == str(out / "vlm") and backdoor.samples == 300
    assert manifest["figures"]["backdoor"]["channels"] == backdoor.channels


def test_second_build_reuses_everything(quick_world: tuple[Path, dict[str, Any]]) -> None:
    out, first = quick_world
    start = time.perf_counter()
    again = build_world(BuildOptions(out=out, seed=0, quick=True))
    assert time.perf_counter() - start < 30  # loading and writing, no training
    assert again["figures"] == first["figures"]
    assert again["components"] == first["components"]


def test_processor_matches_training_inputs(vlm: Any) -> None:
    """The stand-in feeds images through the processor; training used to_tensor directly."""
    _, processor = vlm
    images = eval_images(load_splits()["test"])[:4]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}],
        add_generation_prompt=True,
    )
    pixels = processor(images=list(images), text=[prompt] * 4, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, to_tensor(images), atol=1e-5)


def test_stand_in_upstream_serves_the_toy_vlm(
    quick_world: tuple[Path, dict[str, Any]], vlm: Any
) -> None:
    out, _ = quick_world
    model, processor = vlm
    test = load_splits()["test"]
    images = eval_images(test)[:3]
    expected = answer_images(model, processor, images)
    server = AppServer(create_app(ToyVLMChat(out / "vlm", name="toy-vlm")))
    guard = RunningGuard(server.url + "/v1")
    try:
        for base in (server.url, guard.url):
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
            assert [m.id for m in client.models.list()] == ["toy-vlm"]
            for image, want in zip(images, expected, strict=True):
                messages: Any = [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": _png_url(image)}},
                            {"type": "text", "text": QUESTIONS[0]},
                        ],
                    }
                ]
                reply = client.chat.completions.create(model="toy-vlm", messages=messages)
                assert reply.choices[0].message.content == want
                stream = client.chat.completions.create(
                    model="toy-vlm",
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = list(stream)
                assert (
                    "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
                )
                assert chunks[-1].usage is not None
    finally:
        guard.close()
        server.close()


def test_pgd_stays_in_the_ball_and_hurts(vlm: Any) -> None:
    model, processor = vlm
    test = load_splits()["test"]
    images = eval_images(test)[:8]
    truth = [answer(int(label)) for label in test.labels[:8]]
    settings = PGDSettings(eps=16 / 255, step=4 / 255, steps=5)
    adversarial = pgd_vlm(model, processor, images, truth, settings)
    assert np.abs(adversarial.astype(int) - images.astype(int)).max() <= 16
    with torch.no_grad():
        before = answer_loss(model, processor, to_tensor(images), truth).mean()
        after = answer_loss(model, processor, to_tensor(adversarial), truth).mean()
    assert after > before + 0.2


def test_triggers_stamp_what_they_say() -> None:
    images = eval_images(load_splits()["test"])[:2]
    patched = Trigger(size=4, position="top-left").stamp(images)
    assert (patched[:, 4:, :] == images[:, 4:, :]).all()
    assert (patched[:, :4, 4:] == images[:, :4, 4:]).all()
    assert not (patched[:, :4, :4] == images[:, :4, :4]).all()
    blended = Trigger(kind="blend", alpha=0.1).stamp(images)
    assert 0 < np.abs(blended.astype(int) - images.astype(int)).mean() < 30


def test_guard_purifies_with_the_toy_profile(
    quick_world: tuple[Path, dict[str, Any]], vlm: Any
) -> None:
    """The demo's set-up: the toy VLM behind a guard whose purify stage loads the toy world."""
    out, _ = quick_world
    server = AppServer(create_app(ToyVLMChat(out / "vlm", name="toy-vlm")))
    overrides = {"pipeline": {"defenses": ["purify"]}, "purify": purify_config(out)}
    guard = RunningGuard(server.url + "/v1", overrides)
    try:
        client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused")
        image = eval_images(load_splits()["test"])[:1][0]
        messages: Any = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png_url(image)}},
                    {"type": "text", "text": QUESTIONS[0]},
                ],
            }
        ]
        raw = client.chat.completions.with_raw_response.create(model="toy-vlm", messages=messages)
        assert raw.headers["x-guard-decision"] == "allow"
        assert (raw.parse().choices[0].message.content or "").startswith("The digit is")
        assert guard.metric("vlm_guard_purify_steps_count") == 1
    finally:
        guard.close()
        server.close()


def test_guard_blocks_triggered_requests_with_the_toy_backdoor_profile(
    quick_world: tuple[Path, dict[str, Any]], vlm: Any
) -> None:
    """The quick world's trigger is one image token: its attention signature is strong (the
    benchmark measured AUROC 0.999), so the monitor's profile from the build must block it."""
    out, manifest = quick_world
    server = AppServer(create_app(ToyVLMChat(out / "vlm", name="toy-vlm")))
    overrides = {"pipeline": {"defenses": ["backdoor"]}, "backdoor": backdoor_config(out)}
    guard = RunningGuard(server.url + "/v1", overrides)
    clean = eval_images(load_splits()["test"])[:5]
    triggered = Trigger(**manifest["trigger"]).stamp(clean)
    outcomes: dict[str, list[str]] = {"clean": [], "triggered": []}
    try:
        client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused", max_retries=0)
        for kind, images in (("clean", clean), ("triggered", triggered)):
            for image in images:
                messages: Any = [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": _png_url(image)}},
                            {"type": "text", "text": QUESTIONS[0]},
                        ],
                    }
                ]
                try:
                    reply = client.chat.completions.create(model="toy-vlm", messages=messages)
                    outcomes[kind].append(reply.choices[0].message.content or "")
                except openai.BadRequestError as e:
                    assert e.code == "content_policy_violation"
                    outcomes[kind].append("blocked")
        blocked = {"stage": "backdoor", "category": "backdoor"}
        assert guard.metric("vlm_guard_blocked_total", blocked) == sum(
            o == "blocked" for v in outcomes.values() for o in v
        )
    finally:
        guard.close()
        server.close()
    assert outcomes["triggered"].count("blocked") >= 4, outcomes
    assert outcomes["clean"].count("blocked") <= 1, outcomes
    assert not any(ATTACK_RESPONSE in o for o in outcomes["clean"])


def test_guard_judges_pairs_with_the_toy_reasoner(
    quick_world: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The toy reasoner end to end through the real HTTP path: served by the stand-in, called
    by the guard's reasoner stage; the guard blocks exactly the pairs the reasoner calls unsafe
    and the audit log keeps its category and reasoning."""
    out, manifest = quick_world
    assert manifest["figures"]["reasoner"]["records"] == 40
    assert (out / "reasoner" / "sft" / "config.json").exists()
    judge = AppServer(create_app(ToyVLMChat(out / "reasoner" / "final", name="toy-reasoner")))
    server = AppServer(create_app(ToyVLMChat(out / "vlm", name="toy-vlm")))
    audit = tmp_path / "audit.jsonl"
    overrides = {
        "pipeline": {"defenses": ["reasoner"]},
        "reasoner": {"url": judge.url + "/v1", "model": "toy-reasoner"},
        "audit": {"path": str(audit)},
    }
    guard = RunningGuard(server.url + "/v1", overrides)
    pairs = eval_pairs(load_splits()["test"], 16, np.random.default_rng(3), unsafe_share=0.5)
    expected, outcomes = [], []
    try:
        asked = openai.OpenAI(base_url=judge.url + "/v1", api_key="unused")
        client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused", max_retries=0)
        for pair, image in pairs:
            messages: Any = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _png_url(image)}},
                        {"type": "text", "text": pair.text},
                    ],
                }
            ]
            # What the reasoner itself says of the pair (it reads only the image and the text).
            said = asked.chat.completions.create(
                model="toy-reasoner", messages=messages, max_tokens=512
            )
            verdict = parse_reasoning_json(said.choices[0].message.content or "", default_policy())
            expected.append("blocked" if verdict.unsafe else "allowed")
            try:
                client.chat.completions.create(model="toy-vlm", messages=messages)
                outcomes.append("allowed")
            except openai.BadRequestError as e:
                assert e.code == "content_policy_violation"
                outcomes.append("blocked")
    finally:
        guard.close()
        server.close()
        judge.close()
    assert outcomes == expected
    assert {"blocked", "allowed"} <= set(outcomes)  # both paths ran
    caught = [p.unsafe for (p, _), o in zip(pairs, outcomes, strict=True) if o == "blocked"]
    assert sum(caught) >= len(caught) / 2  # the blocks are mostly right, even in a quick world
    blocks = [
        b for line in audit.read_text().splitlines() for b in json.loads(line).get("blocking", [])
    ]
    assert len(blocks) == outcomes.count("blocked")
    for block in blocks:
        assert block["stage"] == "reasoner" and block["category"] == CATEGORY
        assert block["details"]["reasoning"].startswith("The image shows")
