"""The import layering of the package, checked from the source: a module imports only modules of its own layer or
of lower ones (function-level imports included), nothing imports the CLI, the exporters never reach into training,
and the heavy runtimes load inside the functions that use them so `import mtu_export` stays fast."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtu_export"

# Lowest first. Every module of the package is listed once; a new module must be placed here.
LAYERS: dict[str, tuple[str, ...]] = {
    # image_processor imports no torch (it is copied into exported folders)
    "foundation": ("errors", "logs", "config", "machine", "metrics", "storage", "image_processor"),
    # tasks and ondevice import no torch (ondevice runs without it, on the task registry)
    # the shapes world (shapes/) is placed module by module: its recipes sit with training
    "tasks and data": (
        "tasks",
        "example",
        "ondevice",
        "shapes",
        "shapes.world",
        "shapes.vocab",
        "shapes.reader",
        "shapes.world_grid",
        "data",
        "conditioning",
        "cache",
    ),  # fmt: skip
    "model": ("moe", "sparse_unet", "upcycle", "checkpoint", "fold", "bundle", "pipelines", "objective", "sample"),
    "train and evaluate": ("loop", "shapes.pretrain", "train", "evaluate", "parity", "curves", "shapes.tiny"),
    "quantize": ("quantize",),
    "export": ("export", "generate"),
    "bench": ("bench",),
    "cli": ("display", "cli"),
}
# Pairs that the layers alone would allow but the design forbids (importer prefix, imported prefix).
FORBIDDEN = (("export", "train"), ("export", "loop"), ("export", "pretrain"), ("export", "cache"))
HEAVY = ("onnxruntime", "coremltools", "optimum", "onnx")  # imported inside functions only


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer a module (dotted, without the package prefix) belongs to: by its own name, else its package's."""
    for layer, names in LAYERS.items():
        if module in names:
            return layer
    top = module.split(".")[0]
    return next((layer for layer, names in LAYERS.items() if top in names), None)


def imported_modules(path: Path, package: Path) -> set[str]:
    """Package modules that a file imports anywhere in it, relative to the package, resolved to files."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            here = module_name(path, package).split(".")
            base = here[: len(here) - node.level + (path.name == "__init__.py")]
            names = [".".join(["mtu_export", *base, *([node.module] if node.module else [])])]
        for name in names:
            parts = name.split(".")
            if parts[0] != "mtu_export" or len(parts) < 2:
                continue
            relative = parts[1:]
            if (package.joinpath(*relative).with_suffix(".py")).is_file() or package.joinpath(*relative).is_dir():
                found.add(".".join(relative))
    return found


def violations(package: Path) -> list[str]:
    problems = []
    order = list(LAYERS)
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        if not module:
            continue
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{module} is in no layer: add it to LAYERS")
            continue
        for target in sorted(imported_modules(path, package)):
            if target == module or module.startswith(target + "."):
                continue  # a package's own __init__
            target_layer = layer_of(target)
            if target.split(".")[0] == "cli" or target == "display":
                if layer != "cli":
                    problems.append(f"{module} imports {target}: nothing below the CLI imports it")
                continue
            if target_layer is None:
                problems.append(f"{module} imports {target}, which is in no layer")
            elif order.index(target_layer) > order.index(layer):
                problems.append(f"{module} ({layer}) imports {target} ({target_layer}), a higher layer")
            for low, high in FORBIDDEN:
                if module.split(".")[0] == low and target.split(".")[0] == high:
                    problems.append(f"{module} imports {target}: {low} never imports {high}")
    return problems


def heavy_top_level_imports(package: Path) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found += [
                f"{module_name(path, package)} imports {n} at module level" for n in names if n.split(".")[0] in HEAVY
            ]
    return found


def task_name_tests(package: Path) -> list[str]:
    """Comparisons with a built-in task's or condition's name outside the task registry (tasks.py): what a task does
    belongs in its definition (the world's example families are the shapes world's own names, not tasks)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "tasks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                named = set().union(*(_strings(x) for x in (node.left, *node.comparators))) & REGISTRY_NAMES
                if named:
                    found.append(f"{module_name(path, package)}:{node.lineno} {ast.unparse(node)}")
    return found


# the built-in tasks and the conditions that are not also part names ("none" is also a quantize mode)
REGISTRY_NAMES = {"t2i", "edit", "sr", "inpaint", "source_latent", "low_res_rgb", "low_res_latent"}


def _strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(set(), *(_strings(e) for e in node.elts))
    return set()


def test_task_behaviour_lives_in_the_registry():
    assert task_name_tests(PACKAGE) == []


def test_a_task_name_test_outside_the_registry_is_caught(tmp_path: Path):
    copy = tmp_path / "mtu_export"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "sample.py").write_text(
        (copy / "sample.py").read_text() + '\n\ndef _late(task):\n    return task.name in ("sr", "x")\n'
    )
    assert [line.split(" ", 1)[1] for line in task_name_tests(copy)] == ["task.name in ('sr', 'x')"]


def test_package_respects_its_layers():
    assert violations(PACKAGE) == []


def test_every_module_has_a_layer_and_every_listed_name_exists():
    listed = {name for names in LAYERS.values() for name in names}
    placed = {name for name in listed if "." in name}  # modules of a package placed one by one (shapes/)
    listed = (listed - placed) | {name.split(".")[0] for name in placed}
    assert all(PACKAGE.joinpath(*name.split(".")).with_suffix(".py").is_file() for name in placed)
    present = {module_name(p, PACKAGE).split(".")[0] for p in PACKAGE.rglob("*.py")} - {""}
    assert listed == present, (
        f"listed but absent: {sorted(listed - present)}; present but unlisted: {sorted(present - listed)}"
    )


def test_heavy_runtimes_load_inside_functions():
    assert heavy_top_level_imports(PACKAGE) == []


def test_a_lower_layer_importing_a_higher_one_is_caught(tmp_path: Path):
    copy = tmp_path / "mtu_export"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    storage = copy / "storage.py"
    storage.write_text(storage.read_text() + "\n\ndef _late():\n    from mtu_export.export.onnx import export_onnx\n")
    (copy / "fold.py").write_text((copy / "fold.py").read_text() + "\nfrom mtu_export.cli import app\n")
    (copy / "export" / "prepare.py").write_text(
        (copy / "export" / "prepare.py").read_text() + "\nimport mtu_export.train\n"
    )
    (copy / "moe.py").write_text((copy / "moe.py").read_text() + "\nimport onnxruntime\n")
    found = violations(copy)
    assert "storage (foundation) imports export.onnx (export), a higher layer" in found
    assert "fold imports cli: nothing below the CLI imports it" in found
    assert "export.prepare imports train: export never imports train" in found
    assert heavy_top_level_imports(copy) == ["moe imports onnxruntime at module level"]
    assert len(found) == 3, found
