"""The kit's layout: data flows one way through its modules, and its own imports are where a reader looks."""

from __future__ import annotations

import ast

from conftest import ROOT

# The rooms from left to right (docs/developing.md, "The kit, module by module"): a module imports only from rooms
# before it.
ORDER = ["kit", "config", "files", "cli", "devices", "kaggle_api", "plots", "pth", "augment", "layout", "dataset",
         "synthetic", "download", "pipeline", "records", "checkpoint", "tensorboard_log", "manifest", "efficientnet_lite", "backbones",
         "recipe", "inference", "novelty", "train_step", "timer", "training", "lr_finder",
         "stage", "predict", "cam", "report", "publish", "export", "ensemble", "pseudo", "submit", "demo",
         "notebook", "remote", "__main__"]
LATE_ALLOWED = 10  # kit modules imported inside a function: only where they load a heavy framework (a comment says)


def kit_imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, imported at the top) for every import of the kit's own modules; TYPE_CHECKING blocks skipped."""
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "kit":
                names = ([child.module.split(".")[1]] if "." in child.module
                         else [alias.name if alias.name in ORDER else "kit" for alias in child.names])
                found.extend((name, top) for name in names)
            elif isinstance(child, ast.Import):
                found.extend((a.name.split(".")[1] if "." in a.name else "kit", top) for a in child.names
                             if a.name.split(".")[0] == "kit")
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))

    visit(tree, True)
    return found


def modules() -> dict[str, ast.AST]:
    return {("kit" if p.stem == "__init__" else p.stem): ast.parse(p.read_text()) for p in (ROOT / "kit").glob("*.py")}


def test_every_module_has_its_place_in_the_flow():
    assert sorted(modules()) == sorted(ORDER), "a new module needs its place in ORDER and in docs/developing.md"


def test_data_flows_one_way_and_there_are_no_import_circles():
    backwards = [f"kit.{module} imports kit.{imported}" for module, tree in modules().items()
                 for imported, _ in kit_imports(tree) if imported != module and ORDER.index(imported) > ORDER.index(module)]
    assert not backwards, "; ".join(backwards)


def test_the_kits_own_modules_are_imported_at_the_top():
    late = [(module, imported) for module, tree in modules().items() for imported, top in kit_imports(tree) if not top]
    assert len(late) <= LATE_ALLOWED, late
    for module, imported in late:
        assert imported in ("training", "lr_finder", "backbones", "cam"), f"kit.{module} imports kit.{imported} late"
