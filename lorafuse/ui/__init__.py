"""`lorafuse ui`: a local web page (Gradio) to set up, start, watch, compare and try fine-tunes.

Screens: runs (list, status, stop, resume; runs_screen.py), new run (the config form, planner verdict, data
preview, start; form_screen.py), curves (live metrics of several runs, config diff; curves_screen.py), chat and
export (chat_screen.py). The page only calls what the CLI calls: a run is `python -m lorafuse train <yaml>` in
a subprocess, the form validates with lorafuse.config.validate_config, the verdict is lorafuse.plan's.

Modules without Gradio (testable on their own): schema.py (form fields from the config models), runs.py (run
folders, status, the train processes), curves.py (metric series, config diff), checks.py (verdict, preview).
Gradio is imported by app.py and the *_screen.py modules only, which only `lorafuse ui` imports.
"""
