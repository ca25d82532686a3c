"""The JSON Schema of the spec language, generated from the pydantic models and the installed methods.

``schemas/prunespec.schema.json`` is this schema for the built-in methods (``prunespec schema
--builtins-only`` prints it); with plugins installed, ``prunespec schema`` covers their methods too, so
that a rule naming method X has its ``options`` checked against X's options model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .methods.base import MethodInfo
from .spec import Spec

SCHEMA_ID = "https://prunespec.dev/schemas/prunespec.schema.json"


def build_schema(methods: Mapping[str, MethodInfo]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a spec whose methods are ``methods``."""
    schema = Spec.model_json_schema()
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    rule = defs["Rule"]
    rule["properties"]["method"]["enum"] = sorted(methods)
    conditions = []
    for name in sorted(methods):
        info = methods[name]
        about = f"Options of `{name}`." + (f" {info.summary}" if info.summary else "")
        try:
            options = info.options_model.model_json_schema(ref_template=f"#/$defs/{name}__{{model}}")
        except Exception as exc:  # load_methods drops such methods; one added by hand must not break the rest
            options = {"type": "object", "description": f"{about} (its options model gives no JSON Schema: {exc})"}
        else:
            for def_name, def_schema in options.pop("$defs", {}).items():
                defs[f"{name}__{def_name}"] = def_schema
            options["description"] = about
        then: dict[str, Any] = {"properties": {"options": options}}
        replaced = info.method.amount_replaced_by
        if info.takes_amount and replaced:  # either an amount, or the options that replace it, not both
            given = {
                "required": ["options"],
                "properties": {"options": {"anyOf": [{"required": [key]} for key in replaced]}},
            }
            no_amount = {"not": {"anyOf": [{"required": ["amount"]}, {"required": ["sparsity"]}]}}
            then["oneOf"] = [
                {"required": ["amount"], "not": given},
                {"required": ["sparsity"], "not": given},
                {"allOf": [given, no_amount]},
            ]
        elif info.takes_amount:
            then["oneOf"] = [{"required": ["amount"]}, {"required": ["sparsity"]}]
        else:
            then["not"] = {"anyOf": [{"required": ["amount"]}, {"required": ["sparsity"]}]}
        conditions.append({"if": {"properties": {"method": {"const": name}}, "required": ["method"]}, "then": then})
    rule["allOf"] = conditions
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "prunespec spec",
        "description": "A declarative pruning spec for PyTorch models (prunespec, spec language version 1).",
    }


def schema_json(methods: Mapping[str, MethodInfo]) -> str:
    """:func:`build_schema` as stable, pretty-printed JSON text (what is committed under ``schemas/``)."""
    return json.dumps(build_schema(methods), indent=2, sort_keys=True) + "\n"
