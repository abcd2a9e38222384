"""The page: components laid out in `build_layout`, events wired in `wire`; all behaviour lives in
`app.handlers` and reaches the model only through the injected `AppContext.backend`."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app import handlers as h
from app.files import LEASES
from app.guards import public, reject
from app.handlers import AppContext, SessionState, UIUpdate
from app.serving import client_of
from tiles import release_memory

log = logging.getLogger(__name__)

CSS = """
#rsvlm-notice p { color: #b45309; margin: 0; }
.rsvlm-table { border-collapse: collapse; font-size: 13px; width: 100%; margin-bottom: 8px; }
.rsvlm-table th, .rsvlm-table td { border-bottom: 1px solid #ddd; padding: 3px 6px;
  text-align: left; vertical-align: top; word-break: break-word; }
.rsvlm-table caption { text-align: left; font-weight: 600; padding: 4px 0; }
#rsvlm-semantics h4 { margin: 6px 0 2px 0; }
#rsvlm-semantics .rsvlm-table td:nth-child(2), #rsvlm-semantics .rsvlm-table th:nth-child(2) {
  white-space: nowrap; word-break: normal; }
.rsvlm-progress { display: flex; gap: 8px; align-items: center; font-size: 13px; }
.rsvlm-progress progress { flex: 1; height: 14px; }
"""

#: Order of the panels an `UIUpdate` fills.
PANELS = ("map_html", "chip_image", "chat", "semantics_html", "detections_html", "prompt",
          "progress_html", "notice")


@dataclass
class Page:
    """Handles on the components `wire` needs."""

    state: gr.State
    status: gr.Markdown
    timer: gr.Timer
    map_html: gr.HTML
    chip_image: gr.AnnotatedImage
    chat: gr.Chatbot
    semantics_html: gr.HTML
    detections_html: gr.HTML
    prompt: gr.Code
    progress_html: gr.HTML
    stop: gr.Button
    min_score: gr.Slider
    notice: gr.Markdown
    question: gr.Textbox
    send: gr.Button
    clear: gr.Button
    quick_classify: gr.Button
    quick_describe: gr.Button
    quick_find: gr.Button
    quick_count: gr.Button
    quick_class: gr.Textbox
    use_view: gr.Button
    allow_network: gr.Checkbox
    upload: gr.File
    drawn: gr.Textbox
    view: gr.Textbox
    click: gr.Textbox
    export_geojson: gr.Button
    export_gpkg: gr.Button
    export_file: gr.File
    api_image: gr.File
    api_bbox: gr.Textbox
    api_question: gr.Textbox
    api_class: gr.Textbox
    api_answer: gr.Textbox
    api_geojson: gr.Textbox
    api_info: gr.JSON

    def outputs(self) -> list[gr.components.Component]:
        return [getattr(self, name) for name in PANELS]


def build_layout(ctx: AppContext) -> tuple[gr.Blocks, Page]:
    # analytics_enabled=False: no telemetry or version check from this page (see docs/app.md).
    # delete_cache: Gradio's own copies (uploads, chip images, served exports) go after 3 h.
    with gr.Blocks(title="RS-VLM: chat with the map", analytics_enabled=False,
                   delete_cache=(1800, 3 * 3600)) as demo:
        # The session's files go with its state (expiry) or its tab (`demo.unload` in `wire`).
        state = gr.State(None, time_to_live=3 * 3600, delete_callback=_close_state)
        with gr.Row():
            gr.Markdown("## RS-VLM — ask the map", elem_id="rsvlm-title")
            status = gr.Markdown(h.status_markdown(ctx), elem_id="rsvlm-status")
        timer = gr.Timer(1.0, active=not h.backend_ready(ctx))
        notice = gr.Markdown("", elem_id="rsvlm-notice")
        parts: dict[str, Any] = {}
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                parts.update(_map_panel())
            with gr.Column(scale=2):
                parts.update(_chat_panel())
        parts.update(_results_panel())
        attribution = ctx.region.attribution if ctx.region is not None else ""
        gr.Markdown(f"<small>{h.esc(attribution)}</small>")
        parts.update(_hidden_inputs())
    return demo, Page(state=state, status=status, timer=timer, notice=notice, **parts)


def _map_panel() -> dict[str, Any]:
    """The map, its "current view" button and network switch, and the upload box."""
    map_html = gr.HTML("", elem_id="rsvlm-map", js_on_load=None)
    with gr.Row():
        use_view = gr.Button("Ask about the current view", size="sm",
                             elem_id="rsvlm-use-view")
        allow_network = gr.Checkbox(
            False, label="Fetch tiles from the internet (click outside the imagery)",
            elem_id="rsvlm-allow-network")
    upload = gr.File(label="Upload GeoTIFF / PNG / JPEG", type="filepath",
                     file_types=[".tif", ".tiff", ".png", ".jpg", ".jpeg"],
                     elem_id="rsvlm-upload", height=130)
    return {"map_html": map_html, "use_view": use_view, "allow_network": allow_network,
            "upload": upload}


def _chat_panel() -> dict[str, Any]:
    """Chat, question box, progress and stop, quick actions, and the last exact prompt."""
    chat = gr.Chatbot(label="Chat", height=430, elem_id="rsvlm-chat",
                      sanitize_html=True, allow_tags=False, latex_delimiters=[],
                      buttons=["copy"])
    with gr.Row():
        question = gr.Textbox(placeholder="Ask about the chip (the dashed box)…",
                              show_label=False, scale=5, elem_id="rsvlm-question",
                              max_length=h.MAX_QUESTION_CHARS)
        send = gr.Button("Ask", variant="primary", scale=1, elem_id="rsvlm-send")
    with gr.Row(equal_height=True):
        progress_html = gr.HTML("", elem_id="rsvlm-progress")
        stop = gr.Button("Stop", size="sm", variant="stop", elem_id="rsvlm-stop",
                         scale=0, min_width=70)
    with gr.Row():
        quick_classify = gr.Button("Classify scene", size="sm",
                                   elem_id="rsvlm-classify")
        quick_describe = gr.Button("Describe", size="sm", elem_id="rsvlm-describe")
        quick_find = gr.Button("Find", size="sm", elem_id="rsvlm-find")
        quick_count = gr.Button("Count", size="sm", elem_id="rsvlm-count")
        quick_class = gr.Textbox("buildings", show_label=False, max_length=60,
                                 elem_id="rsvlm-class", min_width=90)
        clear = gr.Button("Clear chat", size="sm")
    with gr.Accordion("Exact prompt and raw answer of the last question",
                      open=False):
        prompt = gr.Code("", language=None, elem_id="rsvlm-prompt", lines=6)
    return {"chat": chat, "question": question, "send": send, "progress_html": progress_html,
            "stop": stop, "quick_classify": quick_classify, "quick_describe": quick_describe,
            "quick_find": quick_find, "quick_count": quick_count, "quick_class": quick_class,
            "clear": clear, "prompt": prompt}


def _results_panel() -> dict[str, Any]:
    """The chip with its boxes, semantics, the detections table, score filter and exports."""
    with gr.Row(equal_height=False):
        chip_image = gr.AnnotatedImage(label="Chip (what the model sees) and its boxes",
                                       height=360, elem_id="rsvlm-chip")
        with gr.Column():
            gr.Markdown("### Semantics")
            semantics_html = gr.HTML("", elem_id="rsvlm-semantics")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            detections_html = gr.HTML("", elem_id="rsvlm-detections")
        with gr.Column(scale=1):
            min_score = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Minimum score",
                                  info="hides weaker detections on the map and here",
                                  elem_id="rsvlm-min-score")
            export_geojson = gr.Button("Export GeoJSON", elem_id="rsvlm-export-geojson")
            export_gpkg = gr.Button("Export GeoPackage", elem_id="rsvlm-export-gpkg")
            export_file = gr.File(label="Export", elem_id="rsvlm-export-file",
                                  interactive=False, visible=False)
    return {"chip_image": chip_image, "semantics_html": semantics_html,
            "detections_html": detections_html, "min_score": min_score,
            "export_geojson": export_geojson, "export_gpkg": export_gpkg,
            "export_file": export_file}


def _hidden_inputs() -> dict[str, Any]:
    """The map bridge's text boxes and the gradio_client API's inputs and outputs."""
    # The map's postMessage bridge writes into these; "hidden" keeps them in the DOM.
    drawn = gr.Textbox(visible="hidden", elem_id="rsvlm-drawn")
    view = gr.Textbox(visible="hidden", elem_id="rsvlm-view")
    click = gr.Textbox(visible="hidden", elem_id="rsvlm-click")
    # Inputs/outputs of the gradio_client API (see docs/app.md).
    with gr.Group(visible=False):
        api_image = gr.File(type="filepath")
        api_bbox = gr.Textbox()
        api_question = gr.Textbox()
        api_class = gr.Textbox()
        api_answer = gr.Textbox()
        api_geojson = gr.Textbox()
        api_info = gr.JSON()
    return {"drawn": drawn, "view": view, "click": click, "api_image": api_image,
            "api_bbox": api_bbox, "api_question": api_question, "api_class": api_class,
            "api_answer": api_answer, "api_geojson": api_geojson, "api_info": api_info}


def _close_state(state: SessionState | None) -> None:
    if state is not None:
        state.close()


def _session_key(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _values(update: UIUpdate) -> list[Any]:
    """An `UIUpdate` as output values (``gr.skip()`` where a panel stays as it is)."""
    if update.notice:
        gr.Warning(update.notice)
    out: list[Any] = []
    for name in PANELS:
        value = getattr(update, name)
        if name == "notice":
            value = h.markdown_text(value) if value else ""
        out.append(gr.skip() if value is None else value)
    return out


def wire(ctx: AppContext, demo: gr.Blocks, p: Page) -> None:
    """Connect events to handlers. UI events are private (they carry session state); the
    gradio_client API is the named endpoints at the end."""
    outs = [p.state, *p.outputs()]

    def start(request: gr.Request) -> list[Any]:
        state, update = h.start_session(ctx, _session_key(request))
        return [state, *_values(update)]

    demo.load(start, None, outs, **_PRIVATE)
    def on_unload(request: gr.Request) -> None:
        ctx.files.close(_session_key(request) or "")

    demo.unload(on_unload)
    p.timer.tick(lambda: (h.status_markdown(ctx), gr.Timer(active=not h.backend_ready(ctx))),
                 None, [p.status, p.timer], queue=False, **_PRIVATE)
    _wire_map(ctx, p, outs)
    _wire_chat(ctx, p, outs)
    _wire_filter_and_export(ctx, p, outs)
    _wire_api(ctx, p)


#: UI events carry session state: they are no part of the gradio_client API.
_PRIVATE: dict[str, Any] = {"api_visibility": "private"}


def _ensure(ctx: AppContext, state: SessionState | None,
            request: gr.Request | None = None) -> SessionState:
    return state if state is not None else h.start_session(ctx, _session_key(request))[0]


def _wire_map(ctx: AppContext, p: Page, outs: list[Any]) -> None:
    """Drawing a box, the current view, clicks on the map, and uploads."""
    def on_draw(state: SessionState | None, payload: str) -> list[Any]:
        state = _ensure(ctx, state)
        return [state, *_values(h.on_draw(ctx, state, payload))]

    def on_view(state: SessionState | None, payload: str) -> list[Any]:
        state = _ensure(ctx, state)
        return [state, *_values(h.use_view(ctx, state, payload))]

    def on_click(state: SessionState | None, payload: str, allow: bool) -> list[Any]:
        state = _ensure(ctx, state)
        return [state, *_values(h.on_map_click(ctx, state, payload, allow))]

    def on_upload(state: SessionState | None, path: str | None, request: gr.Request
                  ) -> list[Any]:
        state = _ensure(ctx, state, request)
        try:
            return [state, *_values(h.upload(ctx, state, path))]
        finally:
            release_memory()  # a big decode's memory goes back to the system

    p.drawn.change(on_draw, [p.state, p.drawn], outs, **_PRIVATE)
    p.use_view.click(on_view, [p.state, p.view], outs, **_PRIVATE)
    p.click.change(on_click, [p.state, p.click, p.allow_network], outs, **_PRIVATE)
    p.upload.upload(on_upload, [p.state, p.upload], outs, **_PRIVATE)


def _wire_chat(ctx: AppContext, p: Page, outs: list[Any]) -> None:
    """Questions (typed or quick actions, which may scan a whole area), stop and clear."""
    def on_ask(state: SessionState | None, question: str) -> Iterator[list[Any]]:
        state = _ensure(ctx, state)
        for update in h.ask(ctx, state, question):
            yield [state, *_values(update)]

    def on_stop(state: SessionState | None) -> None:
        if state is not None:
            h.stop(state)

    def on_clear(state: SessionState | None) -> list[Any]:
        state = _ensure(ctx, state)
        return [state, *_values(h.clear_chat(state))]

    ask_args: dict[str, Any] = {"outputs": outs, **_PRIVATE}
    p.send.click(on_ask, [p.state, p.question], **ask_args).then(
        lambda: "", None, p.question, **_PRIVATE)
    p.question.submit(on_ask, [p.state, p.question], **ask_args).then(
        lambda: "", None, p.question, **_PRIVATE)
    def quick(action: str):
        def run(state: SessionState | None, cls: str) -> Iterator[list[Any]]:
            try:
                question = h.quick_question(action, cls)
            except h.UserError as exc:
                reject("quick action", str(exc))
                yield [_ensure(ctx, state), *_values(UIUpdate(notice=str(exc)))]
                return
            yield from on_ask(state, question)

        return run

    for button, action in ((p.quick_classify, "classify"), (p.quick_describe, "describe"),
                           (p.quick_find, "find"), (p.quick_count, "count")):
        button.click(quick(action), [p.state, p.quick_class], **ask_args)
    p.clear.click(on_clear, [p.state], outs, **_PRIVATE)
    # Not queued: it must get through while the answer it stops holds a queue slot.
    p.stop.click(on_stop, [p.state], None, queue=False, **_PRIVATE)


def _wire_filter_and_export(ctx: AppContext, p: Page, outs: list[Any]) -> None:
    """The minimum-score filter and the GeoJSON / GeoPackage exports."""
    def on_min_score(state: SessionState | None, value: float) -> list[Any]:
        state = _ensure(ctx, state)
        return [state, *_values(h.set_min_score(ctx, state, value))]

    def on_export(state: SessionState | None, fmt: str, request: gr.Request) -> Any:
        state = _ensure(ctx, state, request)
        path, message = h.export(ctx, state, fmt)
        if path is None:
            gr.Warning(message)
            return gr.skip()
        gr.Info(message)
        if state.files is not None:  # Gradio serves a copy: to this browser, for this session
            state.files.served(path, client_of(request))
        return gr.File(value=str(path), visible=True)

    p.min_score.release(on_min_score, [p.state, p.min_score], outs, **_PRIVATE)

    def export_as(fmt: str):
        def run(state: SessionState | None, request: gr.Request) -> Any:
            return on_export(state, fmt, request)

        return run

    p.export_geojson.click(export_as("geojson"), [p.state], p.export_file, **_PRIVATE)
    p.export_gpkg.click(export_as("gpkg"), [p.state], p.export_file, **_PRIVATE)


def _api_call(ctx: AppContext, endpoint: str, image: str | None, bbox: str, question: Any,
              progress: gr.Progress) -> Iterator[tuple[str, str]]:
    """A stateless API call. A generator, so that a client's ``job.cancel()`` (which closes
    it) stops a scan after its current tile and ``job.status()`` shows the loading and scan
    progress. Rejections are one log line and a `gr.Error` without a traceback; the
    uploaded file is deleted once answered."""
    cancel = threading.Event()
    done: dict[str, Any] = {}
    said: dict[str, Any] = {"message": "Starting", "n": None, "total": None}

    def say(message: str, n: int | None, total: int | None) -> None:
        said.update(message=message, n=n, total=total)

    def work() -> None:
        try:
            text = question() if callable(question) else question
            with LEASES.lease(image):  # the upload is deleted once no call uses it
                done["out"] = h.api_ask(ctx, image, bbox, text, say=say, cancel=cancel)
        except Exception as exc:  # re-raised below, in the request's thread
            done["error"] = exc
        finally:
            release_memory()

    worker = threading.Thread(target=work, name="rsvlm-api", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.5)
            if worker.is_alive():  # progress is reported from the request's own thread
                n, total = said["n"], said["total"]
                progress((n, total) if n is not None and total else None,
                         desc=said["message"])
                yield said["message"] + " …", ""
    finally:
        cancel.set()  # the client went away: a scan stops after its current tile
    error = done.get("error")
    if isinstance(error, h.UserError):
        reject(endpoint, str(error))
        raise gr.Error(str(error), print_exception=False) from None
    if error is not None:
        log.error("%s failed: %s", endpoint, type(error).__name__, exc_info=error)
        raise gr.Error(public(f"The request failed ({type(error).__name__}: {error})."),
                       print_exception=False) from None
    yield done["out"]


def _wire_api(ctx: AppContext, p: Page) -> None:
    """The gradio_client API: named endpoints /ask, /find, /describe, /classify and /info."""
    def api_ask(image: str | None, bbox: str, question: str,
                progress: gr.Progress = gr.Progress()) -> Iterator[tuple[str, str]]:
        yield from _api_call(ctx, "/ask", image, bbox, question, progress)

    def api_find(image: str | None, bbox: str, cls: str,
                 progress: gr.Progress = gr.Progress()) -> Iterator[tuple[str, str]]:
        yield from _api_call(ctx, "/find", image, bbox, lambda: h.quick_question("find", cls),
                             progress)

    def api_describe(image: str | None, bbox: str,
                     progress: gr.Progress = gr.Progress()) -> Iterator[tuple[str, str]]:
        yield from _api_call(ctx, "/describe", image, bbox,
                             lambda: h.quick_question("describe"), progress)

    def api_classify(image: str | None, bbox: str,
                     progress: gr.Progress = gr.Progress()) -> Iterator[tuple[str, str]]:
        yield from _api_call(ctx, "/classify", image, bbox,
                             lambda: h.quick_question("classify"), progress)

    pair = [p.api_answer, p.api_geojson]
    api_button = gr.Button(visible=False)
    api_button.click(api_ask, [p.api_image, p.api_bbox, p.api_question], pair, api_name="ask")
    api_button.click(api_find, [p.api_image, p.api_bbox, p.api_class], pair, api_name="find")
    api_button.click(api_describe, [p.api_image, p.api_bbox], pair, api_name="describe")
    api_button.click(api_classify, [p.api_image, p.api_bbox], pair, api_name="classify")
    api_button.click(lambda: json.loads(json.dumps(ctx.backend.info, default=str)), None,
                     p.api_info, api_name="info", queue=False)


def build_demo(ctx: AppContext) -> gr.Blocks:
    demo, page = build_layout(ctx)
    with demo:  # event listeners attach inside the Blocks context
        wire(ctx, demo, page)
    return demo


