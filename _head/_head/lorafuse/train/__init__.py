"""Training: the loop (loop.py), the loss (loss.py), optimizers and schedules (optim.py), checkpoints
(checkpoint.py), metrics and progress (metrics.py), and the entry points (api.py):

    lorafuse.train.api.run(cfg, resume="auto", force=False)      # what `lorafuse train` runs
    lorafuse.train(model, tokenizer, data, output_dir=..., ...)  # the Python API (api.train)

`lorafuse.train` is both this package and the Python API function: once any `lorafuse.train.*` module is
imported, Python binds the package to the name `lorafuse.train`, which would hide the function that
`lorafuse/__init__.py` exports lazily. Calling the package therefore calls `api.train`, so
`lorafuse.train(model, tok, "data.jsonl", output_dir="out")` works whatever was imported first.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from lorafuse.train.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
