"""MkDocs hook: pages made at build time, so they cannot drift from their source.

- reference/configuration.md: every config key, rendered from the config's JSON schema
  (`PipelineConfig.model_json_schema()`, what `distilflow schema` prints);
- changelog.md: the repository's CHANGELOG.md.
"""

import json
from pathlib import Path

from mkdocs.structure.files import File

from distilflow.configs import schema
from distilflow.configs.library_settings import LibrarySettings

REPOSITORY = Path(__file__).resolve().parents[2]
LIBRARY_DOCS = {
    "trl": "https://huggingface.co/docs/trl",
    "peft": "https://huggingface.co/docs/peft",
    "transformers": "https://huggingface.co/docs/transformers",
}


def on_files(files, *, config):
    files.append(File.generated(config, "reference/configuration.md", content=configuration_reference()))
    files.append(File.generated(config, "changelog.md", content=(REPOSITORY / "CHANGELOG.md").read_text()))
    return files


def configuration_reference() -> str:
    root = schema.PipelineConfig.model_json_schema()
    page = ConfigurationPage(root["$defs"])
    page.add_section("", "", root, level=1)
    return "\n".join([
        "# Configuration reference",
        "",
        "Every key of a distilflow config, generated from the config's JSON schema (`distilflow schema` prints it;",
        "[Configuration](../configuration.md) explains the sections). A key without a default is required.",
        "",
        *page.lines,
    ])


class ConfigurationPage:
    """The markdown of the reference: one table per section, in the order the schema declares them."""

    def __init__(self, definitions: dict):
        self.definitions = definitions
        self.anchors: dict[str, str] = {}  # definition name -> the anchor of its table (the first key that holds it)
        self.lines: list[str] = []

    def add_section(self, anchor: str, heading: str, node: dict, level: int) -> None:
        if heading:
            self.lines += ["", f"{'#' * min(level, 6)} {heading} {{#{anchor}}}", ""]
            if node.get("description"):
                self.lines += [_cell(node["description"]), ""]
        own, library = self._split(node)
        nested = []
        if own:
            self.lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for key, field in own.items():
            key_path = f"{anchor}.{key}" if anchor else key
            for name, label in self._objects(field):
                if name not in self.anchors:
                    self.anchors[name] = f"{key_path}.{name}" if label else key_path
                    nested.append((name, key_path + label))
            self.lines.append(f"| `{key}` | {self._type(field)} | {self._default(field)} | "
                              f"{_cell(field.get('description', ''))} |")
        if library:
            self.lines += ["", library]
        for name, heading in nested:
            self.add_section(self.anchors[name], heading, self.definitions[name], level + 1)

    def _split(self, node: dict) -> tuple[dict, str]:
        """The section's own keys, and a sentence on the library class whose every field it also takes."""
        properties = node.get("properties", {})
        section = getattr(schema, node.get("title", ""), None)
        if not (isinstance(section, type) and issubclass(section, LibrarySettings)):
            return properties, ""
        own = {key: field for key, field in properties.items() if key in section.model_fields}
        library = section.library
        refused = ", ".join(f"`{key}`" for key in section.refused)
        home = LIBRARY_DOCS.get(library.split(".")[0])
        named = f"[`{library}`]({home})" if home else f"`{library}`"
        return own, (f"It also takes every field of {named} under the field's own name, passed on unchanged (the "
                     f"schema lists {len(properties) - len(own)} more keys, for editors to complete)"
                     + (f"; except {refused}, which distilflow sets itself." if refused else "."))

    def _objects(self, field: dict) -> list[tuple[str, str]]:
        """The definitions a key holds (its own table follows), with a label for each variant of a union."""
        variants = [each for each in field.get("oneOf", field.get("anyOf", [field])) if each.get("type") != "null"]
        if field.get("type") == "array":
            variants = [field["items"]]
        names = [each["$ref"].rsplit("/", 1)[1] for each in variants if "$ref" in each]
        if len(names) < 2:
            return [(name, "") for name in names]
        return [(name, f" ({self._variant(name)})") for name in names]

    def _variant(self, name: str) -> str:
        kind = self.definitions[name].get("properties", {}).get("type", {})
        return f"type: {kind['const']}" if "const" in kind else name

    def _type(self, field: dict) -> str:
        if "$ref" in field:
            name = field["$ref"].rsplit("/", 1)[1]
            return f"[{name}](#{self.anchors[name]})"
        if "const" in field:
            return f"`{field['const']}`"
        if "enum" in field:
            return "one of " + ", ".join(f"`{value}`" for value in field["enum"])
        for union in ("oneOf", "anyOf"):
            if union in field:
                return " or ".join(dict.fromkeys(self._type(each) for each in field[union]))
        kind = field.get("type", "any")
        if kind == "array":
            return f"list of {self._type(field.get('items', {}))}"
        if kind == "object":
            return "mapping"
        return {"string": "path" if field.get("format") == "path" else "text", "integer": "integer",
                "number": "number", "boolean": "boolean", "null": "null"}.get(kind, kind)

    def _default(self, field: dict) -> str:
        if "default" not in field:
            return "required"
        default = field["default"]
        if isinstance(default, dict) and default:
            return "see below"
        text = json.dumps(default)
        return f"`{text}`" if len(text) <= 40 else "see description"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
