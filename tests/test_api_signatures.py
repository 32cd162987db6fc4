"""
Every public function, class and method of improved-diffusion exists in
iddpm_fast under the same module and name, and accepts the same calls: the
same parameters in the same order, of the same kind, with the same defaults.
Extra parameters are allowed only after them and only with defaults, so no
call written for the original can fail or change meaning.

tests/fixtures/api_signatures.json was written from the original by
tests/fixtures/make_api_signatures.py.
"""

import importlib
import inspect
import json
import pathlib

import pytest

API = json.loads((pathlib.Path(__file__).parent / "fixtures" / "api_signatures.json").read_text())

_VAR = ("VAR_POSITIONAL", "VAR_KEYWORD")


def _cases():
    for module, entries in sorted(API.items()):
        for name, entry in sorted(entries.items()):
            if entry["class"]:
                for method, params in sorted(entry["methods"].items()):
                    yield pytest.param(module, name, method, params, id=f"{module}.{name}.{method}")
            else:
                yield pytest.param(module, name, None, entry["params"], id=f"{module}.{name}")


def signature_problems(fn, expected):
    """What keeps `fn` from accepting every call `expected` accepts ([] if nothing)."""
    params = list(inspect.signature(fn).parameters.values())
    problems = []
    for i, want in enumerate(expected):
        if i >= len(params):
            problems.append(f"parameter {want['name']!r} is missing")
            continue
        got = params[i]
        if got.name != want["name"] or got.kind.name != want["kind"]:
            problems.append(f"parameter {i} is {got.name!r} ({got.kind.name}), the original's is "
                            f"{want['name']!r} ({want['kind']})")
            continue
        got_default = None if got.default is inspect.Parameter.empty else repr(got.default)
        if got_default != want["default"]:
            problems.append(f"{got.name!r} defaults to {got_default}, the original's to {want['default']}")
    for extra in params[len(expected):]:
        if extra.kind.name not in _VAR and extra.default is inspect.Parameter.empty:
            problems.append(f"extra parameter {extra.name!r} has no default")
    return problems


@pytest.mark.parametrize("module, name, method, params", list(_cases()))
def test_public_api_matches_improved_diffusion(module, name, method, params):
    mod = importlib.import_module(f"iddpm_fast.{module}")
    assert hasattr(mod, name), f"iddpm_fast.{module} has no {name}"
    obj = getattr(mod, name)
    if method is not None:
        assert inspect.isclass(obj), f"iddpm_fast.{module}.{name} is not a class"
        assert hasattr(obj, method), f"iddpm_fast.{module}.{name} has no method {method}"
        obj = getattr(obj, method)
    assert signature_problems(obj, params) == []


def test_the_signature_check_can_fail():
    expected = [{"name": "tensor", "kind": "POSITIONAL_OR_KEYWORD", "default": None},
                {"name": "scale", "kind": "POSITIONAL_OR_KEYWORD", "default": "1.0"}]

    def renamed(x, scale=1.0):
        pass

    def other_default(tensor, scale=2.0):
        pass

    def extra_required(tensor, scale=1.0, *, out):
        pass

    def keyword_only(tensor, *, scale=1.0):
        pass

    def same(tensor, scale=1.0, extra=None, **kwargs):
        pass

    assert signature_problems(same, expected) == []
    for fn in (renamed, other_default, extra_required, keyword_only):
        assert signature_problems(fn, expected), fn.__name__
