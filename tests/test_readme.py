"""The README's configuration reference and the typed config cannot drift apart: every key of every section and
every decoder option is documented, nothing documented is gone, and each documented default is the field's
default."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from conftest import REPO
from nnunetv2.model import model_dpt, model_primus, model_segformer, model_upernet
from nnunetv2.model.config import DecoderConfig, default_of
from nnunetv2.model.detail import DEFAULT_DETAIL_CHANNELS
from nnunetv2.vit.config import SECTIONS

ROW = re.compile(r"^\| `(?P<key>[a-z_0-9]+)` \| (?P<default>[^|]*) \|")
NO_VALUE_CELLS = ("(required)", "none", "plans'")  # a cell that names no YAML value: the field has none to show


def reference_tables() -> Dict[str, List[Tuple[str, str]]]:
    """Each section's (key, default cell) rows from README's "Configuration reference"."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    reference = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    tables: Dict[str, List[Tuple[str, str]]] = {}
    section = None
    for line in reference.splitlines():
        heading = re.match(r"^### `(\w+)`", line)
        if heading:
            section = heading.group(1)
            tables[section] = []
        elif section and (row := ROW.match(line)):
            tables[section].append((row["key"], row["default"].strip()))
    return tables


def documented_value(cell: str) -> Any:
    """The YAML value of a default cell that starts with one in backticks (``3e-5`` read as the float it is)."""
    literal = re.match(r"^`([^`]*)`", cell).group(1)
    value = yaml.safe_load(literal)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def test_every_section_is_documented():
    assert sorted(reference_tables()) == sorted(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_reference_lists_each_key_once_with_its_default(section):
    rows = reference_tables()[section]
    keys = [key for key, _ in rows]
    fields = {field.name: field for field in dataclasses.fields(SECTIONS[section])}
    assert len(keys) == len(set(keys)), f"a key of '{section}' is documented twice: {keys}"
    assert set(keys) == set(fields), (f"README's '{section}' table and the config differ: undocumented "
                                      f"{sorted(set(fields) - set(keys))}, documented but gone "
                                      f"{sorted(set(keys) - set(fields))}")
    for key, cell in rows:
        default = default_of(fields[key])
        if cell.startswith(NO_VALUE_CELLS):
            assert default is None or key == "model_path", f"{section}.{key}: README shows no default, config has " \
                                                            f"{default!r}"
        else:
            assert documented_value(cell) == default, f"{section}.{key}: README says {cell}, config has {default!r}"


def decoder_options_documented() -> Dict[str, List[Tuple[str, str]]]:
    """Each decoder module's (option, text in parentheses) pairs from README's "Decoders" table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("## Decoders", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].startswith("`model_"):
            rows[cells[0].strip("`")] = re.findall(r"`(\w+)` \(([^)]*)\)", cells[2])
    return rows


@pytest.mark.parametrize("module", [model_dpt, model_upernet, model_segformer, model_primus],
                         ids=lambda module: module.__name__.rsplit(".", 1)[-1])
def test_decoders_table_lists_each_option_with_its_default(module):
    """A default shown as a YAML value must be the field's; a field without one (None: derived from the
    backbone's width) is described in words."""
    documented = decoder_options_documented()[module.__name__.rsplit(".", 1)[-1]]
    shared = {field.name for field in dataclasses.fields(DecoderConfig)}
    fields = {field.name: field for field in dataclasses.fields(module.create_segmentation_model.config_class)
              if field.name not in shared}
    keys = [key for key, _ in documented]
    assert len(keys) == len(set(keys)) and set(keys) == set(fields), (keys, sorted(fields))
    for key, text in documented:
        default = default_of(fields[key])
        if default is not None:
            shown = yaml.safe_load(text.split(";")[0])
            assert shown == default, f"{module.__name__}.{key}: README says ({text}), config has {default!r}"


def test_detail_path_options_are_documented_with_their_defaults():
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert f"`detail_path` ({str(DecoderConfig.detail_path).lower()})" in text
    channels = re.search(r"`detail_channels` \([^)]*?(\[[0-9, ]+\])\)", text).group(1)
    assert yaml.safe_load(channels) == list(DEFAULT_DETAIL_CHANNELS)
