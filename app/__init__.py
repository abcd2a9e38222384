"""The Gradio app: layout (`app.layout`), handlers (`app.handlers`), the map page
(`app.map_html`), the model seam (`app.backend`) and the CLI (`app.main`, ``rsvlm-app``).

No model code lives here: the model is reached only through an injected `app.backend.Backend`.
"""

import os as _os

# No telemetry unless the user opts in: Gradio reads this when it is imported (its analytics and
# PyPI version check), and the Hugging Face hub client when it sends usage pings. Set here, in
# the package every entry point imports before Gradio, so `rsvlm-app`, `python -m app.main` and
# tests all start with them off; an explicit value in the environment wins.
_os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
