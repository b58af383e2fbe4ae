"""The package's layers import one way (README "Layout of the code").

Read from the source with ast, so that an import inside a function counts as much as one at the
top: a lazy import hides a circle from Python, not from this test.
"""

import ast
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "dreambooth_jax"
PACKAGE = PACKAGE_DIR.name

# What users type (python -m dreambooth_jax.<name>): only these may import cli_errors, and no
# other module may import them.
COMMANDS = frozenset(f"{PACKAGE}.{name}" for name in (
    "main", "sample", "evaluate", "convert", "benchmark", "plan", "identifiers",
    "toyworld.pretrain", "toyworld.experiment", "toyworld.judges"))

# Each module's layer, by the longest matching name (the package's own name matches every
# module); a module imports its own layer and those below, never one above.
BOTTOM, MODELS, DATA, TRAINING_AND_EVALUATION, TOP = range(5)
LAYERS = {
    PACKAGE: BOTTOM,  # the small shared helpers at top level, errors.py, failpoints.py
    f"{PACKAGE}.toyworld": BOTTOM,  # the world and its pretrained/ folder (builtin:toyworld)
    f"{PACKAGE}.models": MODELS,
    f"{PACKAGE}.data": DATA,
    f"{PACKAGE}.training": TRAINING_AND_EVALUATION,
    f"{PACKAGE}.evaluation": TRAINING_AND_EVALUATION,
    f"{PACKAGE}.toyworld.judges": TRAINING_AND_EVALUATION,
    f"{PACKAGE}.train": TOP,
    f"{PACKAGE}.cli_errors": TOP,
    **{command: TOP for command in COMMANDS},
}


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in sorted(PACKAGE_DIR.rglob("*.py")):
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


def _imports() -> dict[str, dict[str, int]]:
  """{module: {module of ours it imports: line}}, from every import statement at any depth.

  `from package import name` is an import of package.name when that is a module, else of the
  package (its __init__).
  """
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    edges = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package upwards
          package = name.split(".")[:len(name.split(".")) - (path.name != "__init__.py")]
          package = package[:len(package) - node.level + 1]
          base = ".".join(package + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                   for alias in node.names]
      else:
        continue
      for target in targets:
        if target in modules and target != name:
          edges.setdefault(target, node.lineno)
    graph[name] = edges
  return graph


def _where(graph: dict[str, dict[str, int]], module: str, target: str) -> str:
  return f"{module} imports {target} (line {graph[module][target]})"


def _circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """One circle through each group of modules that import each other (Tarjan's components)."""
  index, low, stack, groups = {}, {}, [], []

  def visit(module):
    index[module] = low[module] = len(index)
    stack.append(module)
    for target in graph[module]:
      if target not in index:
        visit(target)
        low[module] = min(low[module], low[target])
      elif target in stack:
        low[module] = min(low[module], index[target])
    if low[module] == index[module]:
      group = []
      while not group or group[-1] != module:
        group.append(stack.pop())
      if len(group) > 1:
        groups.append(set(group))

  for module in sorted(graph):
    if module not in index:
      visit(module)
  circles = []
  for group in groups:  # the shortest way from the group's first module back to itself
    start = min(group)
    paths = {target: [start, target] for target in graph[start] if target in group}
    queue = list(paths)
    while start not in paths:
      module = queue.pop(0)
      for target in graph[module]:
        if target in group and target not in paths:
          paths[target] = paths[module] + [target]
          queue.append(target)
    circles.append(paths[start])
  return circles


def test_no_import_circle():
  graph = _imports()
  circles = [" -> ".join(circle) + ": " + "; ".join(
      _where(graph, a, b) for a, b in zip(circle, circle[1:])) for circle in _circles(graph)]
  assert not circles, "import circle(s):\n" + "\n".join(circles)


def test_errors_imports_nothing_of_ours():
  graph = _imports()
  assert not graph[f"{PACKAGE}.errors"], "errors.py must stay at the bottom: " + "; ".join(
      _where(graph, f"{PACKAGE}.errors", target) for target in graph[f"{PACKAGE}.errors"])


def test_only_commands_import_cli_errors():
  graph = _imports()
  offending = [_where(graph, module, f"{PACKAGE}.cli_errors") for module in sorted(graph)
               if f"{PACKAGE}.cli_errors" in graph[module] and module not in COMMANDS]
  assert not offending, ("only the command modules map errors to exit statuses; raise an "
                         "errors.* class instead: " + "; ".join(offending))


def test_no_module_imports_a_command():
  graph = _imports()
  assert COMMANDS <= graph.keys(), f"no such command module: {sorted(COMMANDS - graph.keys())}"
  offending = [_where(graph, module, target) for module in sorted(graph) if module not in COMMANDS
               for target in sorted(graph[module]) if target in COMMANDS]
  assert not offending, ("a command module is the top; move what is shared below it: "
                         + "; ".join(offending))


def _layer(module: str) -> int:
  prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
  return LAYERS[prefix]


def test_no_module_imports_a_layer_above_its_own():
  graph = _imports()
  offending = [f"{_where(graph, module, target)}: layer {_layer(target)} above {_layer(module)}"
               for module in sorted(graph) for target in sorted(graph[module])
               if _layer(target) > _layer(module)]
  assert not offending, ("layers (0 bottom, 1 models, 2 data, 3 training and evaluation, 4 train "
                         "and the commands) import downwards only: " + "; ".join(offending))
