"""A small graph description from which both workflow forms are generated, so they cannot drift:

* the API format (`{"id": {"class_type", "inputs", "_meta"}}`) that `/prompt` and
  `execution.validate_prompt` take, and
* the UI format (LiteGraph schema 0.4: nodes, links, widgets_values) that users drag onto the canvas.

The UI form needs each node's socket and widget order; it is read from the node classes in
ComfyUI's registry (`INPUT_TYPES`, `RETURN_TYPES`), so generation runs inside a ComfyUI that has
loaded this pack (see `workflows/build.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: shown on the canvas, never sent to the server, absent from the registry.
FRONTEND_ONLY = {"MarkdownNote", "Note"}


@dataclass(frozen=True)
class Output:
    node: "Node"
    slot: int


@dataclass
class Node:
    id: int
    class_type: str
    title: str | None
    inputs: dict[str, Any]
    column: int = 0
    row: int = 0

    def __getitem__(self, slot: int) -> Output:
        return Output(self, slot)


@dataclass
class Graph:
    name: str
    description: str
    nodes: list[Node] = field(default_factory=list)

    def add(self, class_type: str, title: str | None = None, *, at: tuple[int, int] | None = None,
            **inputs) -> Node:
        node = Node(len(self.nodes) + 1, class_type, title, inputs)
        if at is not None:
            node.column, node.row = at
        else:
            node.column = 1 + max((src.node.column for src in inputs.values() if isinstance(src, Output)),
                                  default=-1)
            node.row = sum(1 for n in self.nodes if n.column == node.column)
        self.nodes.append(node)
        return node

    def note(self, text: str, at: tuple[int, int]) -> Node:
        return self.add("MarkdownNote", "Note", at=at, text=text)

    # --- API format -----------------------------------------------------------------------
    def to_api(self, display_names: dict[str, str] | None = None) -> dict:
        """`_meta.title` is the node's title, else its display name, as the frontend's
        graphToPrompt writes it (checked against ComfyUI's frontend in a browser)."""
        display_names = display_names or {}
        prompt = {}
        for node in self.nodes:
            if node.class_type in FRONTEND_ONLY:
                continue
            inputs = {}
            for name, value in node.inputs.items():
                inputs[name] = [str(value.node.id), value.slot] if isinstance(value, Output) else value
            title = node.title or display_names.get(node.class_type) or node.class_type
            prompt[str(node.id)] = {"inputs": inputs, "class_type": node.class_type, "_meta": {"title": title}}
        return prompt

    # --- UI format ------------------------------------------------------------------------
    def to_ui(self, registry: dict) -> dict:
        links = []
        ui_nodes = []
        outgoing: dict[tuple[int, int], list[int]] = {}
        incoming: dict[tuple[int, str], int] = {}
        for node in self.nodes:
            for name, value in node.inputs.items():
                if isinstance(value, Output):
                    link_id = len(links) + 1
                    out_type = _return_types(registry[value.node.class_type])[value.slot]
                    links.append([link_id, value.node.id, value.slot, node.id, None, out_type])
                    outgoing.setdefault((value.node.id, value.slot), []).append(link_id)
                    incoming[(node.id, name)] = link_id
        order = {node.id: i for i, node in enumerate(self._topological())}
        for node in self.nodes:
            ui = {
                "id": node.id,
                "type": node.class_type,
                "pos": [40 + 380 * node.column, 40 + 320 * node.row],
                "size": [340, 260 if node.class_type not in FRONTEND_ONLY else 220],
                "flags": {},
                "order": order[node.id],
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "properties": {"Node name for S&R": node.class_type},
                "widgets_values": [],
            }
            if node.title:
                ui["title"] = node.title
            if node.class_type in FRONTEND_ONLY:
                ui["widgets_values"] = [node.inputs["text"]]
                ui_nodes.append(ui)
                continue
            cls = registry[node.class_type]
            for name, (kind, options) in _input_specs(cls):
                is_widget = is_widget_input(kind)
                link = incoming.get((node.id, name))
                if not is_widget or link is not None:
                    slot = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": link}
                    if is_widget:
                        slot["widget"] = {"name": name}
                    if link is not None:
                        links[link - 1][4] = len(ui["inputs"])
                    ui["inputs"].append(slot)
                if is_widget:  # a linked widget keeps a placeholder value, as the frontend does
                    given = name in node.inputs and link is None
                    ui["widgets_values"].append(node.inputs[name] if given else _default(kind, options))
                    if options.get("control_after_generate"):
                        ui["widgets_values"].append("fixed")
            for slot, (out_type, out_name) in enumerate(zip(_return_types(cls), _return_names(cls))):
                ui["outputs"].append({"name": out_name, "type": out_type,
                                      "links": outgoing.get((node.id, slot), []), "slot_index": slot})
            ui_nodes.append(ui)
        return {
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": len(links),
            "nodes": ui_nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "comfy-selfnpo": {"description": self.description}},
            "version": 0.4,
        }

    def _topological(self) -> list[Node]:
        done: list[Node] = []
        seen: set[int] = set()

        def visit(node: Node):
            if node.id in seen:
                return
            seen.add(node.id)
            for value in node.inputs.values():
                if isinstance(value, Output):
                    visit(value.node)
            done.append(node)

        for node in self.nodes:
            visit(node)
        return done


def is_widget_input(kind) -> bool:
    """Combos arrive as a list of choices (V1) or "COMBO" (V3); other widgets by type name."""
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _input_specs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = value[0]
            options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            yield name, (kind, options)


def _return_types(cls) -> list[str]:
    # V3 nodes expose the same V1 attributes ComfyUI's /object_info reads
    return list(cls.RETURN_TYPES)


def _return_names(cls) -> list[str]:
    names = getattr(cls, "RETURN_NAMES", None)
    return list(names) if names else _return_types(cls)


def _default(kind, options):
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    if kind == "COMBO":
        return (options.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind, None)
