"""The layout of `persres ui`: three tabs (Concepts, Train, Generate), each event one handler of
`persres.ui.actions`. Built once per process over one `Session`, so the pipeline is loaded once
and every tab and browser sees the same registry.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import gradio as gr

from persres.interop import FORMATS
from persres.ui import actions
from persres.ui.address import check_exposure, check_serving  # noqa: F401  (check_exposure: part of this module's API)
from persres.ui.actions import Session

MAX_UPLOAD = "50mb"


def bind(fn, session: Session):
    """`fn(session, ...)` as an event handler of the page's inputs (Gradio reads the signature: the session is not one)."""
    def handler(*args, **kwargs):
        return fn(session, *args, **kwargs)

    signature = inspect.signature(fn)
    handler.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    handler.__name__ = fn.__name__
    return handler


def build(session: Session) -> gr.Blocks:
    with gr.Blocks(title="persres") as app:
        gr.Markdown("# persres\nLearn a concept from a few photos; draw several, each in its own region, in one pass.")
        gr.Markdown(actions.model_line(session))
        with gr.Tab("Concepts"):
            cards = gr.Gallery(label="concepts", columns=4, height="auto", allow_preview=True, elem_id="concept-cards")
            refresh = gr.Button("Refresh")
            with gr.Row():
                chosen = gr.Dropdown(label="concept", choices=actions.names(session), allow_custom_value=True)
                fmt = gr.Dropdown(list(FORMATS), value=FORMATS[0], label="export format")
            with gr.Row():
                show_btn, export_btn, doctor_btn = gr.Button("Show metadata"), gr.Button("Export"), gr.Button("Doctor")
            confirm = gr.Checkbox(label="yes, remove the chosen concept")
            remove_btn = gr.Button("Remove", variant="stop")
            metadata = gr.JSON(label="metadata")
            download = gr.File(label="export")
            status = gr.Textbox(label="status", interactive=False)
            with gr.Accordion("Import a pack or LoRA", open=False):
                upload = gr.File(label=".safetensors", file_types=[".safetensors"], type="filepath")
                import_name, import_class = gr.Textbox(label="name (a foreign LoRA)"), gr.Textbox(label="class word (a foreign LoRA)")
                import_btn = gr.Button("Import")
        with gr.Tab("Train"):
            defaults = actions.defaults(session)
            images = gr.File(label="3-15 images of one thing", file_count="multiple", file_types=["image"], type="filepath", elem_id="train-images")
            folder = gr.Textbox(label="or a folder on this machine (toy:NAME for a shipped toy concept)")
            with gr.Row():
                name = gr.Textbox(label="name", elem_id="train-name")
                class_word = gr.Textbox(label="class word (empty: suggested)", elem_id="train-class")
                suggest_btn = gr.Button("Suggest")
            scores = gr.Dataframe(headers=["class", "mean error", "draws"], label="suggestions", interactive=False)
            gr.Markdown("Defaults are the model's own where it recommends them, else the paper's.")
            with gr.Row():
                steps = gr.Number(value=defaults["steps"], label="steps", precision=0, elem_id="train-steps")
                lr = gr.Number(value=defaults["lr"], label="learning rate")
                rank_ratio = gr.Number(value=defaults["rank_ratio"], label="rank ratio")
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
                cancel_btn = gr.Button("Cancel", elem_id="train-cancel")
            trained = gr.Textbox(label="result", interactive=False, elem_id="train-result")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(elem_id="gen-prompt", label="prompt", placeholder="a V1 dog and a V2 cat on a sofa  (or <name>, <name:0.8>)")
            with gr.Row():
                concepts = gr.Dropdown(label="concepts (-c, in V1, V2 order; NAME:0.8 for a strength)", choices=actions.names(session),
                                       multiselect=True, allow_custom_value=True)
                insert = gr.Dropdown(label="insert <name> into the prompt", choices=actions.names(session))
            with gr.Row():
                lag = gr.Checkbox(value=True, label="LAG")
                gen_steps = gr.Number(value=defaults["gen_steps"], label="steps", precision=0, elem_id="gen-steps")
                guidance = gr.Number(value=defaults["guidance"], label="guidance")
                seed = gr.Number(value=0, label="seed", precision=0)
                count = gr.Number(value=2, label="count", precision=0, elem_id="gen-count")
                size = gr.Textbox(value="", label="size WxH (empty: the model's)")
            overlay = gr.Dropdown(label="show the regions of", choices=[], multiselect=True, allow_custom_value=True)
            with gr.Row():
                gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
                compare_btn = gr.Button("Compare: LAG vs without", elem_id="gen-compare")
            regions = gr.Textbox(label="regions", interactive=False, elem_id="gen-regions")
            outputs = gr.Gallery(label="images", columns=4, height="auto", elem_id="gen-gallery")
            png = gr.File(label="drop a persres PNG to load its settings", file_types=[".png"], type="filepath")

        def choices():
            names = actions.names(session)
            return gr.update(choices=names), gr.update(choices=names), gr.update(choices=names)

        app.load(bind(actions.gallery, session), None, cards)
        app.load(choices, None, [chosen, concepts, insert])
        refresh.click(bind(actions.gallery, session), None, cards).then(choices, None, [chosen, concepts, insert])
        show_btn.click(bind(actions.show, session), chosen, metadata, api_name="show")
        export_btn.click(bind(actions.export, session), [chosen, fmt], download, api_name="export")
        doctor_btn.click(bind(actions.doctor, session), None, status, api_name="doctor")
        remove_btn.click(bind(actions.remove, session), [chosen, confirm], status, api_name="remove").then(
            bind(actions.gallery, session), None, cards).then(choices, None, [chosen, concepts, insert])
        import_btn.click(bind(actions.import_file, session), [upload, import_name, import_class], status, api_name="import").then(
            bind(actions.gallery, session), None, cards).then(choices, None, [chosen, concepts, insert])
        suggest_btn.click(bind(actions.suggest, session), [images, folder], scores, api_name="suggest", concurrency_id="model",
                          concurrency_limit=1)
        training = train_btn.click(bind(actions.train, session), [images, folder, name, class_word, steps, lr, rank_ratio], trained,
                                   api_name="train", concurrency_id="model", concurrency_limit=1)
        training.then(bind(actions.gallery, session), None, cards).then(choices, None, [chosen, concepts, insert])
        cancel_btn.click(bind(actions.cancel, session), None, trained, queue=False, api_name="cancel")
        insert.input(lambda p, n: f"{p} <{n}>".strip() if n else p, [prompt, insert], prompt)
        concepts.change(lambda cs: gr.update(choices=[c.split(":")[0] for c in cs or ()], value=[c.split(":")[0] for c in cs or ()]),
                        concepts, overlay)
        gen_btn.click(bind(actions.generate, session), [prompt, concepts, lag, gen_steps, guidance, seed, count, size, overlay],
                      [outputs, regions], api_name="generate", concurrency_id="model", concurrency_limit=1)
        compare_btn.click(bind(actions.compare, session), [prompt, concepts, gen_steps, guidance, seed, count, size], outputs,
                          api_name="compare", concurrency_id="model", concurrency_limit=1)
        png.upload(actions.settings_from_png, png, [prompt, concepts, lag, gen_steps, guidance, seed], api_name="settings_from_png")
    return app


def serve(workspace, out_dir: Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, block: bool = True):
    """Launch the app; returns (app, url). Files served: the registry's reference sheets and the output folder only."""
    credentials = check_serving(host, port, auth)
    session = Session(workspace, Path(out_dir).resolve())
    session.out_dir.mkdir(parents=True, exist_ok=True)
    app = build(session)
    app.queue(default_concurrency_limit=1)
    allowed = [str(session.out_dir), str(workspace.registry.references_dir)]
    _, url, _ = app.launch(server_name=host, server_port=port, auth=credentials, share=False, allowed_paths=allowed,
                           max_file_size=MAX_UPLOAD, prevent_thread_lock=not block, quiet=True, footer_links=["api"],
                           show_error=True)
    return app, url
