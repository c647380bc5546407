"""Requests written from a row's own columns: `prompt.template` (and `prompt.system`) as Jinja.

A labelling or synthetic-data job starts from plain data (a `text` column, a `topic` column),
not from Workers AI requests. With a template, each row's request is

    messages = [{"role": "system", "content": <system rendered>},   # when prompt.system is set
                {"role": "user",   "content": <template rendered>}]

rendered over the row's columns (`{{ text }}`, `{{ title | upper }}`), while the row's other
request fields (max_tokens, seed, lora, response_format, ...) still come from their columns.

The templates run in Jinja's immutable sandbox (no attribute access to Python internals, no
changing the row). A column the template names that is null in a row, or a template that fails
on a row's values, is that row's error; a template that does not parse, or names a column that
no input file has, stops the job before anything runs (`pipeline.generate.settings`,
`pipeline.generate.planning`).

Pure module: jinja2 only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a template can use that are not columns: Jinja's own globals.
_NOT_COLUMNS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace"})


class TemplateRowError(ValueError):
    """A template could not be rendered for one row: that row's error."""


@dataclass(frozen=True)
class RowTemplate:
    """The job's `prompt.template` / `prompt.system` and whether rows that hold a request keep it."""

    template: str
    """The user message, as Jinja over the row's columns."""
    system: str | None = None
    """The system message, as Jinja over the row's columns (null: none)."""
    keep_requests: bool = False
    """Rows whose `prompt` or `messages` is set keep their own request instead of the template."""
    request_columns: bool = True
    """Request fields (max_tokens, seed, lora, ...) are read from the row's columns of those names;
    false: the template alone makes the request (an input that is another job's output, whose
    `seed`, `lora` and `logprobs` columns describe that job's answers, not this job's requests)."""
    variables: dict = field(default_factory=dict)
    """`prompt.vars`: values the templates can use besides the columns (the labels of a recipe)."""

    @property
    def columns(self) -> tuple[str, ...]:
        """The input columns the templates name, sorted."""
        return tuple(c for c in _columns(self.template, self.system) if c not in self.variables)

    def messages(self, row: dict) -> list[dict]:
        """The row's chat messages. `row` maps column names to Python values (null: None)."""
        values = {**self.variables, **{k: v for k, v in row.items() if v is not None}}
        out = []
        if self.system is not None:
            out.append({"role": "system", "content": _render(self.system, values, "prompt.system")})
        out.append({"role": "user", "content": _render(self.template, values, "prompt.template")})
        return out


def template_problems(template, system, variables=None) -> list[str]:
    """What keeps `prompt.template` / `prompt.system` from being used, each naming the setting."""
    problems = []
    if variables is not None and not isinstance(variables, dict):
        problems.append(f"prompt.vars: must be a mapping of names to values (got {variables!r})")
    for name, text in (("prompt.template", template), ("prompt.system", system)):
        if text is None:
            continue
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{name}: must be Jinja text naming the row's columns, e.g. 'Label this review: {{{{ text }}}}' "
                            f"(got {text!r})")
            continue
        try:
            _compiled(text)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(f"{name}: not a valid Jinja template: {exc.message} (line {exc.lineno})")
    if template is None and system is not None:
        problems.append("prompt.system: needs prompt.template (the user message) as well")
    return problems


@functools.lru_cache(maxsize=8)
def _environment() -> ImmutableSandboxedEnvironment:
    # StrictUndefined: a missing or null column is an error, never silently empty text.
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@functools.lru_cache(maxsize=32)
def _compiled(text: str) -> jinja2.Template:
    return _environment().from_string(text)


@functools.lru_cache(maxsize=32)
def _columns(*texts: str | None) -> tuple[str, ...]:
    names: set[str] = set()
    for text in texts:
        if text is not None:
            names |= meta.find_undeclared_variables(_environment().parse(text))
    return tuple(sorted(names - _NOT_COLUMNS))


def _render(text: str, values: dict, setting: str) -> str:
    try:
        return _compiled(text).render(**values)
    except jinja2.UndefinedError as exc:
        missing = str(exc).split("'")[1] if str(exc).count("'") >= 2 else str(exc)
        raise TemplateRowError(f"column '{missing}' is null or missing in this row ({setting})") from None
    except Exception as exc:  # whatever a template does with one row's values is that row's error
        raise TemplateRowError(f"{type(exc).__name__}: {exc} ({setting})") from None
