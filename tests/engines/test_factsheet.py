"""Fact-sheet verbalizer: CV facts and OCR measured against SYNTHETIC renders, and the engine's request flow."""

from __future__ import annotations

import io
import json

import dspy
import pytest
from dspy.lm15 import ImagePart, Message, Request, UnsupportedFeatureError
from PIL import Image, ImageDraw

from blpo_dspy.data.synthetic import COLOURS, BannerSpec, generate_specs, render_banner
from blpo_dspy.engines.factsheet import (
    FACTSHEET_LIMITATIONS,
    FactSheet,
    FactSheetCache,
    FactSheetEngine,
    colour_name,
    compute_fact_sheet,
)
from blpo_dspy.task import Task
from blpo_dspy.testing import ScriptedEngine

DESCRIPTION = "A blue banner with three red circles."


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _facts_match(sheet: FactSheet, spec: BannerSpec) -> dict[str, bool]:
    logos = [s for s in sheet.shapes if s.kind == "square" and s.colour == spec.logo_colour and s.corner]
    return {
        "count": sheet.shape_counts().get((spec.drawn_shape_colour, spec.shape), 0) == spec.drawn_count,
        "background": sheet.background == spec.background,
        "logo": len(logos) == 1 and logos[0].position == spec.drawn_logo_corner,
    }


def test_named_colours_of_the_synthetic_palette() -> None:
    for name, rgb in COLOURS.items():
        assert colour_name(rgb) == name
    assert colour_name((10, 10, 120)) == "blue"
    assert colour_name((250, 250, 245)) == "white"


def test_cv_facts_count_shapes_colours_and_logo_corner_on_synthetic_renders() -> None:
    specs = generate_specs(40, variant="ordinal", seed=21)
    results = [_facts_match(compute_fact_sheet(render_banner(spec), ocr=False), spec) for spec in specs]
    for key in ("count", "background", "logo"):
        rate = sum(r[key] for r in results) / len(results)
        assert rate >= 0.95, f"{key} accuracy {rate:.0%} on 40 synthetic renders"
    kinds = {spec.shape for spec in specs}
    assert kinds == {"circle", "triangle", "star"}  # every shape kind was exercised


def test_simple_drawing_gives_exact_facts() -> None:
    image = Image.new("RGB", (300, 300), COLOURS["white"])
    draw = ImageDraw.Draw(image)
    draw.ellipse((120, 120, 180, 180), fill=COLOURS["red"])
    draw.rectangle((10, 10, 50, 50), fill=COLOURS["blue"])
    draw.rectangle((200, 240, 290, 270), fill=COLOURS["green"])
    draw.regular_polygon((240, 60, 30), 3, fill=COLOURS["orange"])
    sheet = compute_fact_sheet(image, ocr=False)
    assert sheet.background == "white"
    assert sheet.shape_counts() == {
        ("red", "circle"): 1,
        ("blue", "square"): 1,
        ("green", "rectangle"): 1,
        ("orange", "triangle"): 1,
    }
    by_colour = {s.colour: s for s in sheet.shapes}
    assert by_colour["red"].position == "center" and not by_colour["red"].corner
    assert by_colour["blue"].position == "top-left" and by_colour["blue"].corner
    assert by_colour["green"].position == "bottom-right"
    text = sheet.render()
    assert "Background colour: white." in text
    assert "1 red circle (" in text and "top-left corner" in text
    assert sheet.palette[0][0] == "white"


def test_ocr_reads_headlines_and_text_is_excluded_from_shapes() -> None:
    pytest.importorskip("rapidocr_onnxruntime", reason="RapidOCR is part of the [local] extra")
    specs = generate_specs(12, seed=5)
    headline_ok = 0
    facts_ok = 0
    for spec in specs:
        sheet = compute_fact_sheet(_png(render_banner(spec)))
        headline_ok += any(t.text == spec.drawn_headline for t in sheet.texts)
        facts_ok += all(_facts_match(sheet, spec).values())
        assert not any(s.colour in ("white", "black") for s in sheet.shapes), "text glyphs leaked into shapes"
    assert headline_ok / len(specs) >= 0.9, f"OCR read {headline_ok}/{len(specs)} headlines exactly"
    assert facts_ok / len(specs) >= 0.9
    sheet = compute_fact_sheet(_png(render_banner(specs[0])))
    assert f'Text "{specs[0].drawn_headline}" at the bottom-center' in sheet.render()


def test_cache_computes_each_image_once() -> None:
    cache = FactSheetCache()
    data = _png(render_banner(generate_specs(1, seed=9)[0]))
    first = cache.get(data, ocr=False)
    second = cache.get(data, ocr=False)
    assert first is second
    assert (cache.hits, cache.misses) == (1, 1)


def test_verbalizer_rewrites_the_fact_sheet_under_the_instruction() -> None:
    task = Task.load("compliance")
    spec = generate_specs(2, seed=13)[0]
    text = ScriptedEngine.answering(DESCRIPTION)
    lm = dspy.LM("factsheet/test", engine=FactSheetEngine(text, ocr=False), cache=False)
    instruction = "Count the shapes of each colour and name the corner of the square logo."
    verbalizer = dspy.Predict(task.verbalizer_signature(instruction))
    with dspy.context(lm=lm):
        prediction = verbalizer(image=dspy.Image(render_banner(spec)), brief=spec.brief)
    assert prediction.description == "A blue banner with three red circles."

    (rewrite,) = text.requests
    assert not any(isinstance(p, ImagePart) for m in rewrite.messages for p in m.parts)
    assert isinstance(rewrite.system, str) and instruction in rewrite.system
    prompt = rewrite.messages[0].text or ""
    assert f"Background colour: {spec.background}." in prompt
    assert spec.brief in prompt and "does NOT describe the image" in prompt
    assert lm.history[-1]["usage"]["completion_tokens"] == 9

    # A different instruction reaches the text LM: the I2T instruction really matters.
    other = dspy.Predict(task.verbalizer_signature("Describe only the colours."))
    with dspy.context(lm=lm):
        other(image=dspy.Image(render_banner(spec)), brief=spec.brief)
    assert "Describe only the colours." in str(text.requests[-1].system)
    assert instruction not in str(text.requests[-1].system)


def test_fact_sheet_only_mode_and_text_requests_pass_through() -> None:
    task = Task.load("compliance")
    spec = generate_specs(2, seed=13)[1]
    text = ScriptedEngine.answering('{"rationale": "fine", "label": "yes"}')
    lm = dspy.LM("factsheet/test", engine=FactSheetEngine(text, rewrite=False, ocr=False), cache=False)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        prediction = dspy.Predict(task.verbalizer_signature())(image=dspy.Image(render_banner(spec)), brief="b")
        assert prediction.description.startswith("Image 320x200 (landscape)")
        assert f"Background colour: {spec.background}." in prediction.description
        assert text.requests == []  # no rewrite
        judged = dspy.Predict(task.judge_signature("text"))(description="d", brief="b")
    assert judged.label == "yes"
    assert len(text.requests) == 1  # the text-only judge request went to the text engine


def test_rewrite_needs_a_text_engine_and_limitations_are_stated() -> None:
    with pytest.raises(ValueError, match="text_engine"):
        FactSheetEngine(None, rewrite=True)
    assert "does not" in FACTSHEET_LIMITATIONS and "objects" in FACTSHEET_LIMITATIONS
    state = FactSheetEngine(None, rewrite=False).dump_state()
    assert state["rewrite"] is False and state["text_engine"] is None
    assert FactSheetEngine.load_state(state).rewrite is False


def test_remote_images_are_refused_with_a_clear_error() -> None:
    engine = FactSheetEngine(None, rewrite=False)
    request = Request(model="factsheet/test", messages=(Message.user((ImagePart(url="https://example.org/a.png"),)),))
    with pytest.raises(UnsupportedFeatureError, match="cannot fetch"):
        engine.complete(request)


def test_text_fields_can_be_left_out_of_the_rewrite() -> None:
    task = Task.load("compliance")
    spec = generate_specs(1, seed=17)[0]
    text = ScriptedEngine.answering(DESCRIPTION)
    engine = FactSheetEngine(text, ocr=False, include_text_fields=False)
    with dspy.context(lm=dspy.LM("factsheet/test", engine=engine, cache=False)):
        dspy.Predict(task.verbalizer_signature())(image=dspy.Image(render_banner(spec)), brief=spec.brief)
    prompt = text.requests[0].messages[0].text or ""
    assert spec.brief not in prompt and "Context given with the image" not in prompt
    assert f"Background colour: {spec.background}." in prompt
    state = engine.dump_state()
    assert state["include_text_fields"] is False
    restored = FactSheetEngine.load_state(json.loads(json.dumps(state)))
    assert restored.include_text_fields is False


def test_the_text_engine_is_restored_with_its_own_class() -> None:
    engine = FactSheetEngine(ScriptedEngine(model="rewriter"), ocr=False)
    state = json.loads(json.dumps(engine.dump_state()))  # what a saved file holds
    assert state["text_engine"] == {"class": "blpo_dspy.testing:ScriptedEngine", "state": {"model": "rewriter"}}
    restored = FactSheetEngine.load_state(state)
    assert type(restored.text_engine) is ScriptedEngine and restored.text_engine.model == "rewriter"
    assert restored.rewrite is True and restored.ocr is False
    for bad, why in [
        ({"class": "blpo_dspy.testing:NoSuchEngine", "state": {}}, "'text_engine.class': .* cannot be imported"),
        ({"class": "no_such_module_xyz:Engine", "state": {}}, "'text_engine.class': .* cannot be imported"),
        ({"class": "blpo_dspy.task:Task", "state": {}}, "'text_engine.class': .* no load_state"),
        ({"class": "blpo_dspy.testing:ScriptedEngine", "state": "model"}, "'text_engine.state': expected an object"),
        ("blpo_dspy.testing:ScriptedEngine", "'text_engine': expected an object, got str"),
    ]:
        with pytest.raises(TypeError, match=why):
            FactSheetEngine.load_state({**state, "text_engine": bad})


def test_a_text_engine_saved_before_classes_were_recorded_is_a_llamacpp_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from blpo_dspy.engines import llamacpp

    seen: list[dict] = []
    monkeypatch.setattr(llamacpp.LlamaCppEngine, "load_state", classmethod(lambda cls, st: seen.append(st) or "llama"))
    legacy = {**FactSheetEngine(None, rewrite=False).dump_state(), "text_engine": {"model": None, "n_ctx": 2048}}
    assert FactSheetEngine.load_state(legacy).text_engine == "llama"
    assert seen == [{"model": None, "n_ctx": 2048}]


def test_an_lm_with_the_engine_round_trips_through_dspy_s_own_save_and_load() -> None:
    lm = dspy.LM("factsheet/test", engine=FactSheetEngine(ScriptedEngine(model="rewriter"), ocr=False), cache=False)
    state = json.loads(json.dumps(lm.dump_state()))
    with pytest.raises(ValueError, match="Refusing to import custom serialized engine"):
        dspy.BaseLM.load_state(state)  # DSPy's gate for untrusted files stays in front of both classes
    engine = dspy.BaseLM.load_state(state, allow_custom_lm_class=True).engine
    assert type(engine) is FactSheetEngine and engine.ocr is False
    assert type(engine.text_engine) is ScriptedEngine and engine.text_engine.model == "rewriter"
