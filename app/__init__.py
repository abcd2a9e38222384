"""The Gradio app: layout (`app.layout`), handlers (`app.handlers`), the map page
(`app.map_html`), the model seam (`app.backend`) and the CLI (`app.main`, ``rsvlm-app``).

No model code lives here: the model is reached only through an injected `app.backend.Backend`.
"""
