"""What a `torch.export` program may do: the rules `check_program` applies to its JSON (no torch).

torch 2.13 turns parts of a `.pt2`'s JSON into code (see `workers.programfile`):
a node's `target` is resolved by `getattr` and called, and every symbolic size
goes through `sympy.sympify` (Python `eval`). A program passes when it calls
ATen operators only (and the few `operator`/`math`/`torch.sym_*` functions that
compute sizes), its sizes are plain sympy expressions, its names are
identifiers, and it was exported in eval mode.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from basis.errors import ModelError


# The calls a program may make. ATen operators are tensor math; `operator`, `math` and `torch.sym_*`
# functions appear where sizes are computed (`x.shape[0] // 2`). Everything else is refused.
_ATEN = re.compile(r"torch\.ops\.aten\.([a-z][a-z0-9_]*|_[a-z][a-z0-9_]*)\.([A-Za-z][A-Za-z0-9_]*)")
_REFUSED_ATEN = {"from_file"}  # reads a file named by the program
_OPERATOR = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le",
             "gt", "ge", "and_", "or_", "xor", "not_", "invert", "getitem", "lshift", "rshift"}
_MATH = {"ceil", "floor", "trunc", "sqrt", "log", "exp"}
_SYM = {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum"}


def _allowed_target(target: str) -> bool:
    module, _, name = target.partition(".")
    if module == "_operator":
        return name in _OPERATOR
    if module == "math":
        return name in _MATH
    if module == "torch" and name in _SYM:
        return True
    match = _ATEN.fullmatch(target)
    return match is not None and match.group(1) not in _REFUSED_ATEN


# A symbolic size as torch 2.13 writes it: sympy constructors of integers and size symbols, e.g.
# "Mul(Integer(16), Symbol('s19', positive=True, integer=True))". No attribute access, no other names.
_EXPR_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<string>'[A-Za-z_][A-Za-z0-9_]*')"
                         r"|(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<op>\*\*|//|[-+*/(),=]))")
_EXPR_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "StrictLessThan", "LessThan", "GreaterThan", "StrictGreaterThan", "Equality", "Unequality",
    "And", "Or", "Not", "true", "false", "True", "False", "oo", "nan", "zoo", "int_oo", "Piecewise",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "TruncToFloat", "ToFloat", "PowByNatural", "FloatPow", "RoundToInt",
    "RoundDecimal", "LShift", "RShift", "Identity", "IsNonOverlappingAndDenseIndicator",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero",
}


def check_expression(text: str, uri: str) -> None:
    """Refuse a symbolic size that is not a plain sympy expression (torch passes it to `sympy.sympify`: `eval`).

    Example:
        >>> check_expression("Mul(Integer(16), Symbol('s19', positive=True, integer=True))", "m.pt2")
        >>> check_expression("__import__('os').system('true')", "m.pt2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        basis.errors.ModelError: model 'm.pt2' holds the symbolic size "__import__('os').system('true')", ...
    """
    position = 0
    text = str(text)
    while position < len(text):
        match = _EXPR_TOKEN.match(text, position)
        bad = match is None or (match.group("name") is not None and match.group("name") not in _EXPR_NAMES
                                and not re.fullmatch(r"[a-z]+[0-9]+", match.group("name")))
        if bad:
            raise ModelError(f"model {uri!r} holds the symbolic size {text!r}, which is not a plain expression "
                             f"of sizes (torch would evaluate it as Python); batch-infer refuses it")
        position = match.end()  # type: ignore[union-attr]


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_fqn(fqn: str, uri: str) -> None:
    if not all(re.fullmatch(r"[A-Za-z0-9_]+", part) and not part.startswith("__") for part in str(fqn).split(".")):
        raise ModelError(f"model {uri!r} names a weight {fqn!r}, which is not a dotted Python name")


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) of every mapping entry in a JSON tree, depth first."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def check_program(model: Mapping[str, Any], uri: str) -> None:
    """Refuse a program whose JSON torch would turn into code beyond tensor math (see the module docstring)."""
    try:
        graph = model["graph_module"]["graph"]
        nodes = graph["nodes"]
        signature = model["graph_module"]["signature"]
    except (KeyError, TypeError) as exc:
        raise ModelError(f"model {uri!r}: the program's JSON has no graph ({exc})") from exc
    for key, value in _walk(model):
        if key == "expr_str":
            check_expression(value, uri)
        elif key == "name" and isinstance(value, str) and not _IDENTIFIER.fullmatch(value):
            raise ModelError(f"model {uri!r} names a value {value!r}, which is not a Python identifier")
        elif key in ("parameter_name", "buffer_name", "tensor_constant_name") and isinstance(value, str):
            check_fqn(value, uri)
        elif key in ("as_graph", "as_custom_obj", "as_operator"):
            raise ModelError(f"model {uri!r} passes a {key[3:].replace('_', ' ')} to an operator (a control-flow or "
                             f"custom operator), which batch-infer does not run; export plain tensor code")
    for node in nodes:
        target = str(node.get("target", ""))
        if not _allowed_target(target):
            raise ModelError(
                f"model {uri!r} calls {target!r}; batch-infer runs programs of ATen operators only (export a "
                f"plain nn.Module with torch.export.export; custom or control-flow operators are not supported)")
        _check_eval_mode(node, uri)
    for spec in signature.get("output_specs", []):
        if set(spec) - {"user_output"}:
            raise ModelError(f"model {uri!r} writes to {sorted(set(spec))[0].replace('_', ' ')} when it runs "
                             f"(a module in training mode): call model.eval() before torch.export.export")


def _check_eval_mode(node: Mapping[str, Any], uri: str) -> None:
    flags = {"torch.ops.aten.dropout.default": "train", "torch.ops.aten.batch_norm.default": "training",
             "torch.ops.aten.native_batch_norm.default": "training"}
    flag = flags.get(node.get("target", ""))
    if flag and any(i.get("name") == flag and i.get("arg", {}).get("as_bool") for i in node.get("inputs", [])):
        raise ModelError(f"model {uri!r} was exported in training mode ({node['target']} with {flag}=True): "
                         f"call model.eval() before torch.export.export")
