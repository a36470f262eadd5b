"""The training loop's evaluations: the validation loss of the weights after a step, logged as a row, and the counters
that pick the best checkpoint and stop the run early (train.early_stopping_patience, train.early_stopping_min_delta).

`TrainingLoop._after_step` evaluates at the cadence of train.eval_every (else at each epoch end) and at the last step
(lorafuse.training.loop); `evaluate_step` takes the loop and reads or sets its state, metrics and notes.
"""

from __future__ import annotations

import contextlib

from lorafuse.errors import LorafuseError
from lorafuse.training.objectives import evaluate
from lorafuse.training.steplog import eval_note, eval_row


def evaluate_step(loop) -> tuple[bool, str | None]:
    """Evaluate the loop's weights on its validation batches, log the row, update the best and patience counters.
    Returns (whether the loss is a new best, "early_stopping" when the patience is spent, else None)."""
    improved = _evaluate(loop)
    st, tc = loop.state, loop.tc
    patience = tc.early_stopping_patience
    if not (patience and st.evals_since_best >= patience):
        return improved, None
    delta = tc.early_stopping_min_delta
    loop.note(
        f"early stopping: no eval loss {f'more than {delta:g} ' if delta else ''}below the best in "
        f"{patience} evaluations (best {st.best_eval:.4f} at step {st.best_step})"
    )
    return improved, "early_stopping"


def _evaluate(loop) -> bool:
    """The evaluation's row logged and the counters updated; True when its loss is the best so far."""
    st = loop.state
    # with graphs, on their stream: an eager pass elsewhere would leave a cuBLAS workspace for the run's rest
    with loop.graphed.on_stream() if loop.graphed is not None else contextlib.nullcontext():
        out = evaluate(loop.objective, loop.model, loop.val_batches, loop.ctx, loop.world)
    if not out["units"]:
        raise LorafuseError(
            "the validation split has no target tokens (every label is masked)",
            "check data.val_path / data.val_size and data.completion_only",
        )
    row = eval_row(st.step, loop._epoch_float(), out, loop.objective)
    loop.metrics.append(row)
    loop.note(eval_note(row))
    loss = out["loss"]
    # patience restarts only on an improvement of more than min_delta; the best checkpoint follows any improvement
    enough = st.best_eval is None or loss < st.best_eval - loop.tc.early_stopping_min_delta
    st.evals_since_best = 0 if enough else st.evals_since_best + 1
    if st.best_eval is None or loss < st.best_eval:
        st.best_eval, st.best_step = loss, st.step
        return True
    return False
