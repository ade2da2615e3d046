"""Scoring answers with a Python function named on the command line ('module:function'): the gold reward of
held-out answers (`--gold_reward`) and the training reward of stage 3 (`--reward_fn`) go through here.

The function is called as `fn(prompts, responses, finished, **columns)`:
    prompts[i]    the prompt text, decoded without special tokens ("\\n\\nHuman: ...\\n\\nAssistant:")
    responses[i]  the answer decoded without special tokens, cut at its first EOS (which is left out)
    finished[i]   whether the answer ended with EOS within the length budget
    columns       the prompt rows' extra dataset columns, one list per column, when the data has any (a
                  function without **kwargs gets only the columns it names as parameters)
and returns one number, or one object with `.score` (and optionally a string `.label`), per answer. A
function that raises, returns the wrong number of scores or a non-finite one stops the run with a message
naming the function and the sample.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScoreFunction:
    """A scoring function: `fn(prompts, responses, finished, **columns)` -> one score per answer.
    `labels`: the labels it can give, recorded even when none occurs; `flag`: the flag that named it."""

    name: str  # "module:function"
    fn: Callable[..., Sequence[Any]]
    labels: tuple[str, ...] = ()
    flag: str = "--gold_reward"


def import_score_function(name: str, flag: str) -> Callable[..., Sequence[Any]]:
    """'module:function' -> the function (importable from the working directory or PYTHONPATH). SystemExit
    naming `flag` and what is wrong when it cannot be imported or is not callable."""
    module_name, sep, function = name.partition(":")
    if not sep or not module_name or not function:
        raise SystemExit(f"{flag} {name!r}: expected 'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path:  # a launcher puts the script's directory first, not the working directory
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise SystemExit(
                f"{flag} {name}: no module {module_name!r} in the working directory ({cwd}) or on PYTHONPATH"
            ) from None
        raise SystemExit(_import_failure(flag, name, module_name, e)) from None
    except Exception as e:
        raise SystemExit(_import_failure(flag, name, module_name, e)) from None
    fn = getattr(module, function, None)
    if fn is None:
        raise SystemExit(f"{flag} {name}: module {module_name!r} has no {function!r}")
    if not callable(fn):
        raise SystemExit(f"{flag} {name}: {function!r} is a {type(fn).__name__}, not a function")
    return fn


def load_score_function(name: str | None, flag: str) -> ScoreFunction | None:
    """`ScoreFunction` of a 'module:function' flag value (None when the flag was not given), imported and
    checked before any compute (`import_score_function`)."""
    return None if name is None else ScoreFunction(name, import_score_function(name, flag), flag=flag)


def _import_failure(flag: str, name: str, module_name: str, e: Exception) -> str:
    """The module was found, but importing it raised: say where in it."""
    frames = traceback.extract_tb(e.__traceback__)
    where = next(
        (f"{f.filename}, line {f.lineno}" for f in reversed(frames) if "importlib" not in f.filename), ""
    )
    if isinstance(e, SyntaxError) and e.filename:
        where = f"{e.filename}, line {e.lineno}"
    return f"{flag} {name}: importing module {module_name!r} raised {type(e).__name__}: {e}" + (
        f" ({where})" if where else ""
    )


def call_score_function(
    sf: ScoreFunction,
    prompts: list[str],
    responses: list[str],
    finished: list[bool],
    columns: dict[str, list[Any]] | None = None,
    what: str = "held-out",
) -> tuple[list[float], list[str | None]]:
    """Call `sf` on a batch of answers -> (scores, labels; None where it gave no label). `what` says whose
    answers they are in messages ("held-out": "held-out sample 3"; "rank 0's rollout").

    SystemExit naming the function and the sample when it raises (the batch is retried one answer at a time
    to find the sample), returns the wrong number of scores, a non-number, a non-finite score or a label
    that is not a string."""
    n = len(prompts)
    columns = _accepted_columns(sf.fn, columns or {})
    try:
        out = list(sf.fn(list(prompts), list(responses), list(finished), **columns))
    except Exception as e:
        culprit = _first_raising_sample(sf, prompts, responses, finished, columns)
        where = (
            f"{what} sample {culprit} (answer {responses[culprit]!r})"
            if culprit is not None
            else f"{n} answers"
        )
        raise SystemExit(f"{sf.flag} {sf.name} raised {type(e).__name__}: {e} on {where}") from None
    if len(out) != n:
        raise SystemExit(f"{sf.flag} {sf.name} returned {len(out)} scores for {n} {what} answers")
    scores, labels = [], []
    for i, item in enumerate(out):
        score, label = getattr(item, "score", item), getattr(item, "label", None)
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
            raise SystemExit(
                f"{sf.flag} {sf.name} gave {what} sample {i} the score {score!r}; expected a finite number "
                f"(answer {responses[i]!r})"
            )
        if label is not None and not isinstance(label, str):
            raise SystemExit(f"{sf.flag} {sf.name} gave {what} sample {i} a non-string label {label!r}")
        scores.append(float(score))
        labels.append(label)
    return scores, labels


def _first_raising_sample(
    sf: ScoreFunction,
    prompts: list[str],
    responses: list[str],
    finished: list[bool],
    columns: dict[str, list[Any]],
) -> int | None:
    for i in range(len(prompts)):
        try:
            sf.fn([prompts[i]], [responses[i]], [finished[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception:
            return i
    return None


def _accepted_columns(fn: Callable[..., Any], columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The extra columns `fn` can take: all of them when it has **kwargs, else those it names."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: pass everything, as documented
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return columns
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in named}
