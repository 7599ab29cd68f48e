"""An API-format ComfyUI workflow drawn as its node graph (for the docs: no ComfyUI frontend needed).

    python -m persres.comfyui.graph persres/comfyui/workflows/persres-two-concepts.json docs/img/comfyui-two-concepts.png

Nodes are boxes in columns by how many links lie before them, each with its class and its widget
values; a link is a line from the output it leaves to the input it feeds, named by that input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, LINE, PAD, GAP_X, GAP_Y = 300, 16, 10, 90, 28
PERSRES = (44, 106, 160)  # persres's nodes stand out from ComfyUI's own
OTHER = (70, 70, 78)


def _columns(prompt: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def of(node: str) -> int:
        if node not in depth:
            links = [v[0] for v in prompt[node]["inputs"].values() if isinstance(v, list)]
            depth[node] = 1 + max((of(n) for n in links), default=-1)
        return depth[node]

    for node in prompt:
        of(node)
    return depth


def _lines(node: dict) -> list[str]:
    out = []
    for name, value in node["inputs"].items():
        if not isinstance(value, list):
            text = json.dumps(value) if not isinstance(value, str) else f'"{value}"'
            out.append(f"{name}: {text[:42]}")
    return out


def draw(prompt: dict) -> Image.Image:
    font = ImageFont.load_default()
    column = _columns(prompt)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    heights = {n: PAD * 2 + LINE * (1 + len(_lines(prompt[n])) + len(prompt[n]["inputs"])) for n in prompt}
    filled: dict[int, int] = {}
    for node in sorted(prompt, key=lambda n: (column[n], int(n) if n.isdigit() else n)):
        c = column[node]
        x, y = PAD + c * (WIDTH + GAP_X), filled.get(c, PAD)
        boxes[node] = (x, y, x + WIDTH, y + heights[node])
        filled[c] = y + heights[node] + GAP_Y
    size = (max(b[2] for b in boxes.values()) + PAD, max(b[3] for b in boxes.values()) + PAD)
    image = Image.new("RGB", size, (30, 30, 34))
    pen = ImageDraw.Draw(image)
    for node, (x0, y0, x1, y1) in boxes.items():
        kind = prompt[node]["class_type"]
        pen.rounded_rectangle((x0, y0, x1, y1), 8, fill=(50, 50, 56), outline=(120, 120, 130))
        pen.rounded_rectangle((x0, y0, x1, y0 + LINE + PAD), 8, fill=PERSRES if kind.startswith("Persres") else OTHER)
        pen.text((x0 + PAD, y0 + PAD // 2), f"#{node} {kind}", fill=(255, 255, 255), font=font)
        for i, line in enumerate(_lines(prompt[node])):
            pen.text((x0 + PAD, y0 + PAD + LINE * (i + 1)), line, fill=(200, 200, 205), font=font)
    for node, data in prompt.items():
        x0, y0, _, _ = boxes[node]
        links = [(name, v) for name, v in data["inputs"].items() if isinstance(v, list)]
        for i, (name, (source, output)) in enumerate(links):
            y = y0 + PAD + LINE * (1 + len(_lines(data)) + i) + LINE // 2
            sx, sy = boxes[source][2], boxes[source][1] + PAD + LINE // 2 + LINE * output
            pen.line((sx, sy, sx + GAP_X // 2, sy, sx + GAP_X // 2, y, x0, y), fill=(150, 200, 120), width=2)
            pen.ellipse((x0 - 4, y - 4, x0 + 4, y + 4), fill=(150, 200, 120))
            pen.text((x0 + PAD, y - LINE // 2 + 2), f"<- {name}", fill=(150, 200, 120), font=font)
    return image


def main(argv: list[str] | None = None) -> None:
    workflow, out = (argv or sys.argv[1:])[:2]
    draw(json.loads(Path(workflow).read_text())).save(out)


if __name__ == "__main__":
    main()
