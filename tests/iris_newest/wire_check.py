#!/usr/bin/env python3
"""Checks our proto/newest against the installed newest Iris package (its generated classes).

Runs with the interpreter of the newest-Iris venv (scripts/setup); tests/iris_newest_wire.rs
calls it. Subcommands:

  descriptors FILE   FILE is our encoded FileDescriptorSet. Every message, enum and service
                     method we declare must exist in the package under the same full name, with
                     the same fields (name, number, type, repeated, oneof, map key/value), the
                     same enum values and the same reserved numbers. Prints one mismatch per
                     line; exits 1 if there is any.
  roundtrip          Reads JSON lines {"type": full name, "bytes": base64, "json": {...}} on
                     stdin: bytes our types encoded, and the same message in proto3 JSON with
                     proto field names, made from our descriptors. For each, decodes the bytes
                     with the package's class, compares the result field by field with "json",
                     and encodes the package's own message built from "json". Writes one JSON
                     line {"type", "diffs": [...], "bytes": base64} per input line.
"""

from __future__ import annotations

import base64
import json
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass

# Importing the generated modules fills the default pool with the package's descriptors.
import finelog.rpc.logging_pb2  # noqa: F401
import iris.rpc.controller_pb2  # noqa: F401
import iris.rpc.iris_logging_pb2  # noqa: F401
import iris.rpc.job_pb2  # noqa: F401
import iris.rpc.time_pb2  # noqa: F401
import iris.rpc.worker_pb2  # noqa: F401

PACKAGE = descriptor_pool.Default()


_SCALAR_NAMES = {v: k[len("TYPE_") :].lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}


def _type_of(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return _SCALAR_NAMES[field.type]


def _real_oneof(field: FieldDescriptor) -> str:
    oneof = field.containing_oneof
    # proto3 `optional` makes a synthetic one-member oneof; edition 2023's presence does not.
    if oneof is None or (len(oneof.fields) == 1 and oneof.name == f"_{field.name}"):
        return ""
    return oneof.name


def _field_facts(field: FieldDescriptor) -> tuple:
    return (field.number, _type_of(field), field.is_repeated, _real_oneof(field))


def _reserved(full_name: str, pool) -> set[int]:
    proto = descriptor_pb2.DescriptorProto()
    pool.FindMessageTypeByName(full_name).CopyToProto(proto)
    return {n for r in proto.reserved_range for n in range(r.start, r.end)}


def compare_descriptors(ours_path: str) -> list[str]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(open(ours_path, "rb").read())
    ours = descriptor_pool.DescriptorPool()
    for file in fds.file:
        ours.Add(file)
    problems: list[str] = []

    def message(name: str) -> None:
        mine = ours.FindMessageTypeByName(name)
        try:
            theirs = PACKAGE.FindMessageTypeByName(name)
        except KeyError:
            problems.append(f"message {name}: not in the package")
            return
        mine_fields = {f.name: _field_facts(f) for f in mine.fields}
        their_fields = {f.name: _field_facts(f) for f in theirs.fields}
        for fname in sorted(mine_fields.keys() | their_fields.keys()):
            a, b = mine_fields.get(fname), their_fields.get(fname)
            if a != b:
                problems.append(f"{name}.{fname}: ours (number, type, repeated, oneof) {a}, the package's {b}")
        if _reserved(name, ours) != _reserved(name, PACKAGE):
            problems.append(
                f"{name}: reserved {sorted(_reserved(name, ours))}, the package reserves {sorted(_reserved(name, PACKAGE))}"
            )
        for nested in mine.nested_types:
            message(nested.full_name)
        for nested in mine.enum_types:
            enum(nested.full_name)

    def enum(name: str) -> None:
        mine = ours.FindEnumTypeByName(name)
        try:
            theirs = PACKAGE.FindEnumTypeByName(name)
        except KeyError:
            problems.append(f"enum {name}: not in the package")
            return
        a = {v.name: v.number for v in mine.values}
        b = {v.name: v.number for v in theirs.values}
        if a != b:
            problems.append(f"enum {name}: ours {a}, the package's {b}")

    for file in fds.file:
        fd = ours.FindFileByName(file.name)
        for m in fd.message_types_by_name.values():
            message(m.full_name)
        for e in fd.enum_types_by_name.values():
            enum(e.full_name)
        for service in fd.services_by_name.values():
            try:
                theirs = PACKAGE.FindServiceByName(service.full_name)
            except KeyError:
                problems.append(f"service {service.full_name}: not in the package")
                continue
            for method in service.methods:
                their = theirs.methods_by_name.get(method.name)
                a = (method.input_type.full_name, method.output_type.full_name)
                b = (their.input_type.full_name, their.output_type.full_name) if their else None
                if a != b:
                    problems.append(f"rpc {service.full_name}/{method.name}: ours {a}, the package's {b}")
    return problems


def _diff(path: str, ours, theirs, out: list[str]) -> None:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(ours.keys() | theirs.keys()):
            _diff(f"{path}.{key}", ours.get(key), theirs.get(key), out)
    elif isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _diff(f"{path}[{i}]", a, b, out)
    elif ours != theirs:
        out.append(f"{path}: ours {ours!r}, the package decoded {theirs!r}")


def roundtrip() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        item = json.loads(line)
        cls = GetMessageClass(PACKAGE.FindMessageTypeByName(item["type"]))
        diffs: list[str] = []
        try:
            decoded = cls.FromString(base64.b64decode(item["bytes"]))
            # A number the package does not know lands in its unknown fields, so the field
            # goes missing from its JSON: the comparison reports it.
            as_json = json_format.MessageToDict(decoded, preserving_proto_field_name=True)
            _diff(item["type"], item["json"], as_json, diffs)
        except message.DecodeError as e:
            diffs.append(f"{item['type']}: our bytes do not decode in the package's class: {e}")
        try:
            theirs = json_format.ParseDict(item["json"], cls()).SerializeToString(deterministic=True)
        except json_format.ParseError as e:
            diffs.append(f"{item['type']}: the package's class does not take our JSON: {e}")
            theirs = b""
        print(
            json.dumps(
                {
                    "type": item["type"],
                    "diffs": diffs,
                    "bytes": base64.b64encode(theirs).decode(),
                }
            ),
            flush=True,
        )


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "descriptors":
        problems = compare_descriptors(sys.argv[2])
        for p in problems:
            print(p)
        return 1 if problems else 0
    if len(sys.argv) == 2 and sys.argv[1] == "roundtrip":
        roundtrip()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
