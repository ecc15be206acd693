"""The command lines' result files (`bench --json`, `finetune --json`): written
atomically, read back checked.

`write_json` writes a temporary file beside the target and renames it over
the target, so a reader (or a run stopped mid-write) never sees half a file.
`read_json` loads a file and checks its content against a spec of the fields
its readers use, so that a malformed file is one clear error naming the file
and the field (the command lines turn it into a usage error), never a
traceback from deep inside a report.

A spec is a type or a tuple of types (NUMBER: int or float, not bool; None
allows null), `Record(required, optional)` for a JSON object with named
fields, `ListOf(spec)`, `MappingOf(spec)` (string keys), or `OneOf(*specs)`.
"""
import json
import numbers
import os
import shutil

NUMBER = "number"  # int or float, not bool


class SavedFileError(ValueError):
    """A result file that cannot be read or does not hold what its readers need."""


class Record:
    """A JSON object: `required` and `optional` {field: spec}; other fields are allowed."""

    def __init__(self, required, optional=None):
        self.required, self.optional = required, optional or {}


class OneOf:
    """Any one of `specs` (e.g. a row that ran, or a row that says why it could not)."""

    def __init__(self, *specs):
        self.specs = specs


class ListOf:
    """A list of `item`s (of exactly `length` items, if given)."""

    def __init__(self, item, length=None):
        self.item, self.length = item, length


class MappingOf:
    def __init__(self, value):
        self.value = value


def write_json(path, data):
    """Write `data` as JSON to `path` through a temporary file in the same folder, with
    the permissions a plain write gives (a new file's under the umask, or the old file's)."""
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "w") as file:
            json.dump(data, file, indent=1)
        if os.path.exists(path):
            shutil.copymode(path, partial)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise


def read_json(path, spec, what):
    """The content of JSON file `path`, checked against `spec`; SavedFileError naming
    `path`, and `what` the file should be (e.g. "a dps-fast bench result"), otherwise."""
    try:
        with open(path) as file:
            content = json.load(file)
    except OSError as error:
        raise SavedFileError(f"cannot read {path} ({error.strerror or error})") from None
    except ValueError as error:
        raise SavedFileError(f"{path} is not JSON ({error})") from None
    problem = misfit(content, spec)
    if problem is not None:
        raise SavedFileError(f"{path} is not {what}: {problem}")
    return content


def misfit(value, spec, path=""):
    """None if `value` fits `spec`, else what does not (naming the field by its `path`
    from the top: devices['cpu']['name'])."""
    def field(key):
        return f"{path}[{key!r}]" if path else str(key)

    where = path or "the file"
    if isinstance(spec, Record):
        if not isinstance(value, dict):
            return f"{where} must be an object; got {_kind(value)}"
        for key in spec.required:
            if key not in value:
                return f"{where} has no {key!r}"
        for key, item in {**spec.required, **spec.optional}.items():
            if key in value:
                problem = misfit(value[key], item, field(key))
                if problem is not None:
                    return problem
        return None
    if isinstance(spec, OneOf):
        problems = [misfit(value, s, path) for s in spec.specs]
        return None if None in problems else "; or ".join(problems)
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            return f"{where} must be a list; got {_kind(value)}"
        if spec.length is not None and len(value) != spec.length:
            return f"{where} must have {spec.length} items; got {len(value)}"
        return next((p for i, v in enumerate(value) if (p := misfit(v, spec.item, field(i)))), None)
    if isinstance(spec, MappingOf):
        if not isinstance(value, dict):
            return f"{where} must be an object; got {_kind(value)}"
        return next((p for k, v in value.items() if (p := misfit(v, spec.value, field(k)))), None)
    kinds = spec if isinstance(spec, tuple) else (spec,)
    if any(_is(value, kind) for kind in kinds):
        return None
    return f"{where} must be {' or '.join(_name(kind) for kind in kinds)}; got {_kind(value)}"


def _is(value, kind):
    if kind is None:
        return value is None
    if kind == NUMBER:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _name(kind):
    return {None: "null", NUMBER: "a number", float: "a number", int: "an integer", str: "a string",
            bool: "true or false", dict: "an object", list: "a list"}.get(kind, getattr(kind, "__name__", str(kind)))


def _kind(value):
    return json.dumps(value) if value is None or isinstance(value, bool) else _name(type(value))
