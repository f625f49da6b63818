"""OpenAI's ImageNet zero-shot class names and prompt templates as open_clip ships them
(`open_clip/zero_shot_metadata.py` of the `open_clip_torch` wheel, a test dependency): the copy that
`evaluate/assets/imagenet_classes.txt` and `imagenet_templates.txt` were generated from and are tested against.

The file is parsed, never imported or executed (open_clip's package imports torchvision): the class names are
a tuple of string literals; each template is `lambda c: f'... {c} ...'`, read back as '... {} ...'.
"""

from __future__ import annotations

import ast
import importlib.metadata

DISTRIBUTION, FILE = "open_clip_torch", "open_clip/zero_shot_metadata.py"


def metadata_file() -> str | None:
  """The installed path of open_clip's zero_shot_metadata.py; None when open_clip_torch is not installed."""
  try:
    files = importlib.metadata.files(DISTRIBUTION) or []
  except importlib.metadata.PackageNotFoundError:
    return None
  return next((str(f.locate()) for f in files if str(f).replace("\\", "/").endswith(FILE)), None)


def _template(node: ast.expr) -> str:
  """`lambda c: f'a photo of a {c}.'` -> 'a photo of a {}.'"""
  if not (isinstance(node, ast.Lambda) and isinstance(node.body, ast.JoinedStr)):
    raise ValueError(f"line {node.lineno}: not a lambda returning an f-string")
  parts = []
  for value in node.body.values:
    if isinstance(value, ast.Constant):
      parts.append(value.value)
    elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
      parts.append("{}")
    else:
      raise ValueError(f"line {node.lineno}: unexpected f-string part")
  return "".join(parts)


def read(path: str) -> dict[str, list[str]]:
  """{'IMAGENET_CLASSNAMES': [...], 'OPENAI_IMAGENET_TEMPLATES': [...], 'SIMPLE_IMAGENET_TEMPLATES': [...]}."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  out = {}
  for node in tree.body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
      name = node.targets[0].id
      if name == "IMAGENET_CLASSNAMES":
        out[name] = list(ast.literal_eval(node.value))
      elif name.endswith("_TEMPLATES"):
        out[name] = [_template(element) for element in node.value.elts]
  return out
