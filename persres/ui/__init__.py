"""`persres ui`: a local web app (Gradio) over `persres.Workspace` — the registry as a gallery,
training with progress and cancel, generation with each concept's region in view.

`persres.ui.app` holds the layout, `persres.ui.actions` what each button does (one library
call each). Needs the `ui` extra: `pip install "persres[ui]"`.
"""
