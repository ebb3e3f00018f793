"""A small graph description from which both workflow forms are generated, so they cannot drift:

* the API format (`{"id": {"class_type", "inputs", "_meta"}}`) that `/prompt` and
  `execution.validate_prompt` take, and
* the UI format (LiteGraph schema 0.4: nodes, links, widgets_values) that users drag onto the canvas
  and ComfyUI's template browser opens, with the models it needs and where to download them.

The UI form needs each node's socket and widget order; it is read from the node classes in
ComfyUI's registry (`INPUT_TYPES`, `RETURN_TYPES`), so generation runs inside a ComfyUI that has
loaded this pack (see `workflows/build.py`). Nodes are sized to their content and laid out in a grid
of columns and rows from those sizes (`node_size`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: shown on the canvas, never sent to the server, absent from the registry.
FRONTEND_ONLY = {"MarkdownNote", "Note"}


@dataclass(frozen=True)
class ModelFile:
    """A model file a workflow needs and where to get it. The frontend's missing-models dialog offers
    `url` for download into the `directory` model folder when no file `name` is there."""
    name: str
    url: str
    directory: str


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
    models: tuple[ModelFile, ...] = ()

    def __getitem__(self, slot: int) -> Output:
        return Output(self, slot)


@dataclass
class Graph:
    name: str  # file name of the API form (workflows/api/<name>.json)
    title: str  # what the template browser shows: the file name of the UI form
    description: str
    nodes: list[Node] = field(default_factory=list)
    models: list[ModelFile] = field(default_factory=list)  # needed, but not the value of a loader widget

    def add(self, class_type: str, title: str | None = None, *, at: tuple[int, int] | None = None,
            models: tuple[ModelFile, ...] = (), **inputs) -> Node:
        """`models`: the files this node's widgets name (its `properties.models`)."""
        node = Node(len(self.nodes) + 1, class_type, title, inputs, models=tuple(models))
        if at is not None:
            node.column, node.row = at
        else:
            node.column = 1 + max((src.node.column for src in inputs.values() if isinstance(src, Output)),
                                  default=-1)
            node.row = sum(1 for n in self.nodes if n.column == node.column)
        self.nodes.append(node)
        return node

    def note(self, *blocks: str, at: tuple[int, int]) -> Node:
        """A Markdown note from blocks (a heading, a paragraph, a list), one blank line apart."""
        return self.add("MarkdownNote", "Note", at=at, text="\n\n".join(blocks))

    def all_models(self) -> list[ModelFile]:
        return [m for node in self.nodes for m in node.models] + self.models

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
    def to_ui(self, registry: dict, display_names: dict[str, str] | None = None) -> dict:
        links, outgoing, incoming = self._links(registry)
        order = {node.id: i for i, node in enumerate(self._topological())}
        titles = {n.id: n.title or (display_names or {}).get(n.class_type) or n.class_type for n in self.nodes}
        ui_nodes = [_ui_node(node, titles[node.id], registry, links, outgoing, incoming, order[node.id])
                    for node in self.nodes]
        layout(self.nodes, ui_nodes)
        ui = {
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": len(links),
            "nodes": ui_nodes,
            "links": links,
            "groups": [],
            "config": {},
            # no saved view ("ds"): the frontend fits the whole graph into the window when it opens it
            "extra": {"comfy-selfnpo": {"title": self.title, "description": self.description,
                                        "api": f"workflows/api/{self.name}.json"}},
            "version": 0.4,
        }
        if self.models:
            ui["models"] = [asdict(m) for m in self.models]
        return ui

    def _links(self, registry: dict):
        """LiteGraph links [id, from node, from slot, to node, to slot (filled in later), type], and
        the link ids by (node, output slot) and by (node, input name)."""
        links: list[list] = []
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
        return links, outgoing, incoming

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


def _ui_node(node: Node, title: str, registry: dict, links: list, outgoing: dict, incoming: dict,
             order: int) -> dict:
    ui = {"id": node.id, "type": node.class_type, "pos": [0, 0], "size": [0, 0], "flags": {}, "order": order,
          "mode": 0, "inputs": [], "outputs": [], "properties": {"Node name for S&R": node.class_type},
          "widgets_values": []}
    if node.title:
        ui["title"] = node.title
    if node.models:
        ui["properties"]["models"] = [asdict(m) for m in node.models]
    if node.class_type in FRONTEND_ONLY:
        ui["widgets_values"] = [node.inputs["text"]]
        ui["size"] = note_size(node.inputs["text"])
        return ui
    cls = registry[node.class_type]
    widgets = []  # (name, options) of every widget, in order, for sizing
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
            widgets.append((name, ui["widgets_values"][-1], options))
            if options.get("control_after_generate"):
                ui["widgets_values"].append("fixed")
                widgets.append(("control_after_generate", "fixed", {}))
    for slot, (out_type, out_name) in enumerate(zip(_return_types(cls), _return_names(cls))):
        ui["outputs"].append({"name": out_name, "type": out_type,
                              "links": outgoing.get((node.id, slot), []), "slot_index": slot})
    ui["size"] = node_size(title, ui["inputs"], ui["outputs"], widgets)
    return ui


# --- sizes and layout ---------------------------------------------------------------------
# A node is saved at a size that shows all of its content in ComfyUI's frontend: the whole title,
# every widget's label and value, the whole text of a text box or note. Never below what the
# frontend computes as the minimum (LGraphNode.computeSize: LiteGraph.NODE_* metrics, BaseWidget
# margins), which would make it grow the node on load. The frontend measures text; the average
# character widths below err on the wide side. scripts/frontend_check measures the result in the
# real frontend with its fonts.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
MIN_WIDTH = 140
WIDGET_PADDING = 86  # the widget's margins, arrows and minimum value width
WIDGET_TEXT_PADDING = 100  # label-to-edge margins and paddings of a widget showing label and value
TITLE_CHAR_WIDTH = 8.3
LABEL_CHAR_WIDTH = 6.4  # slot names, widget labels and values
TEXT_BOX = dict(char_width=4.7, line_height=19, padding=24, min_height=50)  # multi-line text widgets
NOTE = dict(width=440, char_width=5.1, line_height=11, heading=24, block_gap=10, padding=30)  # Markdown notes
GAP = (60, 40)  # between columns, between rows
ORIGIN = (40, 40)


def _wrapped_lines(text: str, width: float, char_width: float) -> int:
    per_line = max(1, int(width / char_width))
    return sum(max(1, -(-len(line) // per_line)) for line in str(text).splitlines() or [""])


def _display(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def node_size(title: str, inputs: list[dict], outputs: list[dict], widgets: list[tuple]) -> list[int]:
    """Width and height (below the title bar) that show this node's content; `widgets` holds
    (name, value, options) of every widget in order."""
    sockets = [i for i in inputs if "widget" not in i]
    rows = max(len(sockets), len(outputs), 1)
    input_width = max((LABEL_CHAR_WIDTH * len(i["name"]) for i in sockets), default=0)
    output_width = max((LABEL_CHAR_WIDTH * len(o["name"]) for o in outputs), default=0)
    slots_width = input_width + output_width + 2 * SLOT_HEIGHT + (5 if input_width and output_width else 0)
    line_widgets = [(n, v) for n, v, o in widgets if not o.get("multiline")]
    widget_width = max((LABEL_CHAR_WIDTH * len(n) + WIDGET_PADDING for n, _ in line_widgets), default=0)
    value_width = max((LABEL_CHAR_WIDTH * (len(n) + len(_display(v))) + WIDGET_TEXT_PADDING
                       for n, v in line_widgets), default=0)
    title_width = TITLE_HEIGHT * 2 + TITLE_CHAR_WIDTH * len(title)
    width = max(slots_width, widget_width, value_width, title_width, MIN_WIDTH * (1.5 if widgets else 1))
    # the frontend shares a node's spare height evenly between its text boxes: each gets the largest need
    text_needs = [max(TEXT_BOX["min_height"], TEXT_BOX["padding"] + TEXT_BOX["line_height"] *
                      _wrapped_lines(v, width - 2 * TEXT_BOX["padding"], TEXT_BOX["char_width"]))
                  for _, v, o in widgets if o.get("multiline")]
    text_box = max(text_needs, default=0)
    height = rows * SLOT_HEIGHT
    height += sum((text_box if o.get("multiline") else WIDGET_HEIGHT) + 4 for _, _, o in widgets)
    if widgets:
        height += 8
    return [round(width), round(height + 6)]


def note_size(text: str) -> list[int]:
    """A Markdown note: a fixed width, tall enough for its blocks (headings, paragraphs, list items)
    wrapped at that width."""
    height = NOTE["padding"]
    for block in text.split("\n\n"):
        if block.startswith("#"):
            height += NOTE["heading"]
        else:
            height += NOTE["line_height"] * _wrapped_lines(block, NOTE["width"] - 40, NOTE["char_width"])
        height += NOTE["block_gap"]
    return [NOTE["width"], round(height)]


def layout(nodes: list[Node], ui_nodes: list[dict]) -> None:
    """Place the grid cells (column, row) from the node sizes: a column is as wide as its widest
    node, a row as tall as its tallest (title bar included); empty rows take no space."""
    cells = {(n.column, n.row): ui for n, ui in zip(nodes, ui_nodes)}
    if len(cells) != len(nodes):
        raise ValueError("two nodes in one grid cell: give one of them another `at=`")
    columns = sorted({c for c, _ in cells})
    rows = sorted({r for _, r in cells})
    width = {c: max(ui["size"][0] for (col, _), ui in cells.items() if col == c) for c in columns}
    height = {r: max(ui["size"][1] for (_, row), ui in cells.items() if row == r) + TITLE_HEIGHT for r in rows}
    x = {c: ORIGIN[0] + sum(width[p] + GAP[0] for p in columns if p < c) for c in range(max(columns) + 1)}
    y = {r: ORIGIN[1] + TITLE_HEIGHT + sum(height[p] + GAP[1] for p in rows if p < r) for r in range(max(rows) + 1)}
    for (column, row), ui in cells.items():
        ui["pos"] = [x[column], y[row]]


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
